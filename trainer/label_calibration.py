"""Calibrating the label bank's open-set thresholds on held-out images.

Why: a k-NN vote always names a class, so without a threshold a segment of a class the model
never saw (a horse, for a bank of textures) still gets a confident label. A threshold on the
vote only means something when measured on images the bank was *not* built from: on the
training images every segment sits next to its own prototype. So at the end of training the
held-out split is segmented as the bank's segments are (same k-means grid), and for
each held-out segment we take the cosine similarity of its nearest labelled prototype and the
winning class's vote share. Each threshold is the `quantile` of its held-out distribution, so
about 1 - quantile of in-distribution segments pass each test and at least 1 - 2 * quantile
pass both (the fraction actually kept is logged).

What it does not measure: the held-out segments are the trainer's (k-means on the training
image size, as the bank's own), not the indexer's (refined, tiny ones merged, and regions that
merge several), and the shares are counted with the indexer's default k
(`SegmenterConfig.knn_k`); an index built with another k or on other images keeps a somewhat
different fraction of its in-distribution segments labelled.

Cost: one backbone pass over the held-out images (cached on disk like every split's
features), one k-means and one (S, M) matmul: seconds on two CPU cores for the demo.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from segsearch.errors import DatasetError
from segsearch.spml.checkpoint import LabelBank
from segsearch.spml.config import SegmenterConfig
from segsearch.spml.embedding import EmbeddingNet
from segsearch.spml.kmeans import KMeansConfig
from segsearch.spml.label_vote import VoteDetails, covered, vote_details
from segsearch.spml.prototypes import segment_counts, segment_prototypes, segment_sums
from segsearch.trainer.datasets import DataConfig, load_split
from segsearch.trainer.label_bank import segment_batch
from segsearch.trainer.prepared import PreparedSet, prepare_set
from segsearch.trainer.weak_labels import WeakLabelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """The thresholds and what they do on the held-out segments they were measured on."""

    min_similarity: float
    min_share: float
    segments: int  # held-out segments measured
    kept_fraction: float  # of them, those the calibrated bank still labels


def quantile_thresholds(details: VoteDetails, quantile: float) -> tuple[float, float]:
    """Held-out votes (S segments) -> (min_similarity, min_share) at `quantile` in (0, 1)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    if details.shares.numel() == 0:
        raise ValueError("no held-out segment to calibrate on")
    similarity = torch.quantile(details.nearest_similarity.double().cpu(), quantile)
    share = torch.quantile(details.shares.double().cpu(), quantile)
    return float(similarity.clamp(-1.0, 1.0)), float(share.clamp(0.0, 1.0))


def calibrate(details: VoteDetails, bank: LabelBank, quantile: float) -> tuple[LabelBank, Calibration]:
    """The bank with thresholds at `quantile` of the held-out `details`, and the record."""
    min_similarity, min_share = quantile_thresholds(details, quantile)
    calibrated = replace(bank, min_similarity=min_similarity, min_share=min_share)
    kept = covered(details, calibrated).float().mean().item()
    return calibrated, Calibration(min_similarity, min_share, int(details.shares.numel()), kept)


@torch.no_grad()
def held_out_votes(model: EmbeddingNet, test: PreparedSet, bank: LabelBank, kmeans: KMeansConfig,
                   k: int, device: torch.device, batch_size: int = 16) -> VoteDetails:
    """The vote of every non-empty held-out segment (one (S,) entry each) that is mostly
    image content (VOC's padding is no content; its segments would drag the thresholds)."""
    model.eval()
    bank = replace(bank, prototypes=bank.prototypes.to(device).float(), labels=bank.labels.to(device))
    num_classes = int(bank.labels.max()) + 1
    parts = []
    for start in range(0, len(test), batch_size):
        index = torch.arange(start, min(start + batch_size, len(test)))
        embeddings, segment_ids = segment_batch(model, test.features[index].to(device).float(), kmeans)
        prototypes = segment_prototypes(embeddings, segment_ids, kmeans.num_segments)  # (B, K, D)
        keep = _mostly_valid(segment_ids, test.valid_mask(index).to(device), kmeans.num_segments)
        parts.append(vote_details(prototypes[keep], bank, num_classes, k))
    return VoteDetails(*(torch.cat(column) for column in zip(*parts)))


def _mostly_valid(segment_ids: torch.Tensor, valid: torch.Tensor, num_segments: int) -> torch.Tensor:
    """segment_ids (B, h, w), valid (B, h, w) bool -> (B, K) bool: non-empty, > half valid."""
    counts = segment_counts(segment_ids, num_segments)
    valid_counts = segment_sums(valid[:, None].float(), segment_ids, num_segments)[..., 0]
    return (counts > 0) & (2 * valid_counts > counts)


def calibrate_on_held_out(model: EmbeddingNet, bank: LabelBank, data: DataConfig, kmeans: KMeansConfig,
                          quantile: float, device: torch.device, k: int = SegmenterConfig.knn_k,
                          progress: bool = False) -> LabelBank:
    """The trainer's step: thresholds from the held-out images of `data`: its validation split
    (the mosaic's), else its test split (VOC has no validation list here), so that a mosaic's
    test images stay unseen by every setting of the model. `quantile` 0 (or no held-out split
    that can be read) keeps the bank uncalibrated, covering everything."""
    if quantile <= 0:
        logger.info("label bank left uncalibrated (label quantile 0): every segment gets a label")
        return bank
    split = _held_out_split(data)
    if split is None:
        return bank
    held_out = prepare_set(split.samples, len(split.class_names), WeakLabelConfig(kind="full"), model,
                           edge_source="none", progress=progress)
    calibrated, record = calibrate(held_out_votes(model, held_out, bank, kmeans, k, device), bank, quantile)
    logger.info("label bank calibrated on %d held-out segments at quantile %.3f: min_similarity %.4f, "
                "min_share %.3f; %.1f%% of them keep a label", record.segments, quantile,
                record.min_similarity, record.min_share, 100 * record.kept_fraction)
    return calibrated


def _held_out_split(data: DataConfig):
    """The validation split of `data`, else its test split, else None (logged)."""
    try:
        return load_split(data, "val")
    except DatasetError as error:
        logger.info("calibrating the label bank on the test split: %s", error)
    try:
        return load_split(data, "test")
    except DatasetError as error:
        logger.warning("label bank left uncalibrated, every segment will get a label: %s", error)
        return None
