"""Evaluation: mIoU of test images labelled by segment retrieval, beside trivial baselines.

Each test image is over-segmented by spherical k-means on the model's embeddings; each
segment is labelled by k-NN vote among the labelled training prototypes (as SPML does) and
the label map is scored against the ground truth. On the *same* segments we also score
chance (a random class per segment), a colour-histogram descriptor and the untrained
backbone's mean-pooled features, each with its own bank built from the same training
segments and weak labels. Cross-entropy baselines are additionally scored by their own
classifier (their natural prediction).

The vote here is the closed-set `knn_vote`: the test images hold only the training classes and
mIoU scores a class for every pixel, so every segment is labelled as before the label bank had
open-set thresholds (the indexer and the service use `open_set_vote`, which leaves segments
the bank does not cover unlabelled; `trainer.label_calibration` sets its thresholds).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from segsearch.spml.checkpoint import load_checkpoint
from segsearch.spml.embedding import EmbeddingNet
from segsearch.spml.kmeans import KMeansConfig
from segsearch.spml.prototypes import flatten_segments, segment_prototypes
from segsearch.trainer.config import TrainConfig
from segsearch.trainer.config import EvalConfig  # noqa: F401  (re-exported: evaluate(EvalConfig(...)))
from segsearch.trainer.datasets import load_split
from segsearch.trainer.descriptors import pixel_descriptors
from segsearch.spml.label_vote import knn_vote
from segsearch.trainer.label_bank import build_label_banks, segment_batch
from segsearch.trainer.scores import Scores, confusion_matrix
from segsearch.trainer.overlays import overlay_sheet, plot_confusion
from segsearch.trainer.prepared import PreparedSet, prepare_set
from segsearch.spml.device import resolve_device
from segsearch.trainer.train import prepare_training_data
from segsearch.trainer.weak_labels import WeakLabelConfig

logger = logging.getLogger(__name__)
BASELINE_DESCRIPTORS = ("colour_histogram", "backbone")


@dataclass
class EvalReport:
    class_names: list[str]
    scores: dict[str, Scores] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {name: s.to_dict(self.class_names) for name, s in self.scores.items()}

    @property
    def primary(self) -> str | None:
        """The model's own prediction: SPML k-NN, or a CE baseline's classifier."""
        return next((n for n in self.scores if "SPML" in n or "classifier" in n), None)

    def summary(self) -> str:
        lines = [f"{'predictor':<28}{'mIoU':>8}{'pixel acc':>11}"]
        lines += [f"{name:<28}{100 * s.miou:>7.1f}%{100 * s.pixel_accuracy:>10.1f}%"
                  for name, s in self.scores.items()]
        if self.primary is not None:
            lines.append(f"\nper-class IoU ({self.primary}):")
            lines += [f"  {name:<26}{'-' if iou != iou else f'{100 * iou:.1f}%':>8}"
                      for name, iou in zip(self.class_names, self.scores[self.primary].iou)]
        return "\n".join(lines)


@torch.no_grad()
def predict_batch(model, features, images, banks, kmeans, num_classes, k, generator, method):
    """-> {predictor name: (B, h, w) labels} for one batch, all on the model's segments."""
    embeddings, segment_ids = segment_batch(model, features, kmeans)
    batch, num_segments = segment_ids.shape[0], kmeans.num_segments
    flat = flatten_segments(segment_ids, num_segments).view_as(segment_ids)
    predictions = {}
    for name, bank in banks.items():
        # the model's embeddings are already at hand from the segmentation
        pixels = embeddings if name == "model" else pixel_descriptors(name, model, images, features)
        prototypes = segment_prototypes(pixels, segment_ids, num_segments).reshape(batch * num_segments, -1)
        labels, _ = knn_vote(prototypes, bank, num_classes, k)
        predictions[f"{name} k-NN" if name != "model" else "SPML k-NN" if method == "spml"
                    else f"{method} embedding k-NN"] = labels[flat]
    random_labels = torch.randint(num_classes, (batch * num_segments,), generator=generator)
    predictions["chance"] = random_labels.to(flat.device)[flat]
    if model.classifier is not None:
        logits = model.logits(model.raw_embeddings(features.float()))
        predictions[f"{method} classifier"] = logits.argmax(1)
    return predictions


def evaluate_prepared(model, method, banks, test: PreparedSet, class_names, config: EvalConfig,
                      device) -> tuple[EvalReport, dict]:
    """Scores every predictor on `test`; returns the report and full-resolution predictions
    of the first `config.overlays` images (for pictures)."""
    kmeans = KMeansConfig(grid=tuple(config.inference_grid), iterations=config.kmeans_iterations)
    generator = torch.Generator().manual_seed(config.seed)
    num_classes = len(class_names)
    confusions, examples = {}, {}
    for start in range(0, len(test), 16):
        index = torch.arange(start, min(start + 16, len(test)))
        images = test.images[index].to(device)
        features = test.features[index].to(device).float()
        predictions = predict_batch(model, features, images, banks, kmeans, num_classes,
                                    config.k, generator, method)
        truth = test.masks[index].to(device)
        for name, labels in predictions.items():
            full = _upsample(labels, truth.shape[-2:])
            confusions[name] = confusions.get(name, 0) + confusion_matrix(truth, full, num_classes)
            if start < config.overlays:
                examples.setdefault(name, []).extend(full[: config.overlays - start].cpu().numpy())
    return EvalReport(class_names, {n: Scores(c) for n, c in confusions.items()}), examples


def _upsample(labels: torch.Tensor, size) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) nearest neighbour."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def evaluate_checkpoint(config: EvalConfig) -> EvalReport:
    device = resolve_device(config.device)
    checkpoint = load_checkpoint(config.checkpoint)
    train_config = TrainConfig.from_dict(checkpoint.train_state.get("train_config", {}))
    train_config.progress = config.progress
    if config.data is not None:
        train_config.data = config.data
    model = checkpoint.build_model().to(device)
    class_names = model.config.class_names
    test_split = load_split(train_config.data, "test")
    test = prepare_set(test_split.samples, len(class_names), WeakLabelConfig(kind="full"), model,
                       edge_source="none", progress=config.progress)
    banks = {"model": checkpoint.label_bank} if checkpoint.label_bank is not None else {}
    if config.baselines:
        banks.update(_baseline_banks(model, train_config, config, device))
    report, examples = evaluate_prepared(model, checkpoint.method, banks, test, class_names,
                                         config, device)
    out_dir = Path(config.out_dir or Path(config.checkpoint).parent)
    write_report(report, examples, test, out_dir, model_version=checkpoint.model_version)
    return report


def _baseline_banks(model: EmbeddingNet, train_config: TrainConfig, config: EvalConfig, device):
    """Baseline banks from the training images, weak labels and the model's segments."""
    train_config.freeze_backbone = True  # features are needed for every descriptor
    prepared, _ = prepare_training_data(train_config, model, contours=False)
    kmeans = KMeansConfig(grid=tuple(config.inference_grid), iterations=config.kmeans_iterations)
    return build_label_banks(model, prepared, kmeans, device, BASELINE_DESCRIPTORS)


def write_report(report: EvalReport, examples: dict, test: PreparedSet, out_dir: Path,
                 model_version: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "eval.json", "w") as handle:
        json.dump({"model_version": model_version, "scores": report.to_dict()}, handle, indent=1)
    count = len(next(iter(examples.values()), []))
    images = [img.permute(1, 2, 0).numpy() for img in test.images[:count]]
    truths = [mask.numpy() for mask in test.masks[:count]]
    primary = report.primary
    if primary is not None and count:
        overlay_sheet(images, truths, examples[primary], report.class_names,
                      out_dir / "eval_overlays.png", title=primary)
        plot_confusion(report.scores[primary].confusion, report.class_names,
                       out_dir / "eval_confusion.png", title=primary)
    logger.info("wrote eval.json, eval_overlays.png and eval_confusion.png in %s", out_dir)
