"""Segmentation scores from a confusion matrix (rows: ground truth, columns: prediction)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from segsearch.trainer.sample import IGNORE_INDEX


def confusion_matrix(truth: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> np.ndarray:
    """truth, prediction (...,) long; pixels with truth 255 are ignored -> (C, C) int64."""
    valid = truth != IGNORE_INDEX
    pairs = truth[valid] * num_classes + prediction[valid]
    counts = torch.bincount(pairs.reshape(-1).cpu(), minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).numpy().astype(np.int64)


@dataclass
class Scores:
    confusion: np.ndarray

    @property
    def iou(self) -> np.ndarray:
        """(C,) per-class IoU; NaN for a class absent from both truth and prediction."""
        true_positive = np.diag(self.confusion).astype(float)
        union = self.confusion.sum(0) + self.confusion.sum(1) - true_positive
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, true_positive / union, np.nan)

    @property
    def miou(self) -> float:
        return float(np.nanmean(self.iou))

    @property
    def pixel_accuracy(self) -> float:
        return float(np.diag(self.confusion).sum() / max(self.confusion.sum(), 1))

    def to_dict(self, class_names: list[str]) -> dict:
        return {
            "mIoU": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, self.iou)},
            "confusion": self.confusion.tolist(),
        }
