"""Labelling segments by k-nearest-neighbour vote over labelled training prototypes.

SPML labels a segment at inference by the classes of its nearest labelled training segments
(the label bank of the checkpoint). Training builds the bank (`trainer.label_bank`); the
indexer, the service and evaluation vote with it, so the vote lives here in the core package.

Two votes share one computation (`vote_details`):

- `knn_vote` is the closed-set vote: every segment gets the majority class of its k nearest
  labelled prototypes. Evaluation uses it (mIoU scores a class for every pixel and has no
  "unknown" class).
- `open_set_vote` is what the indexer and the service label with: a segment the bank does not
  cover gets no label (`NO_LABEL`) and score 0. "Not covered" means its nearest labelled
  prototype is less similar than the bank's `min_similarity`, or the winning class holds less
  than `min_share` of the k votes; both thresholds are calibrated on held-out images at the
  end of training (`trainer.label_calibration`). A bank without thresholds (an old
  checkpoint) covers every segment, so both votes then agree.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from segsearch.spml.checkpoint import LabelBank

NO_LABEL = -1  # the class id `open_set_vote` gives a segment the bank does not cover


class VoteDetails(NamedTuple):
    """Per query segment, all `(S,)`: the majority class, its vote share in (0, 1] (votes /
    min(k, M)), and the cosine similarity of the nearest labelled prototype in [-1, 1]."""

    labels: torch.Tensor
    shares: torch.Tensor
    nearest_similarity: torch.Tensor


def vote_details(queries: torch.Tensor, bank: LabelBank, num_classes: int, k: int = 20) -> VoteDetails:
    """queries (S, D) unit norm -> the vote and the nearest similarity (one (S, M) matmul)."""
    if bank.prototypes.shape[0] == 0:
        raise ValueError("the label bank is empty: no training segment carried a weak label")
    k = min(k, bank.prototypes.shape[0])
    similarity = queries @ bank.prototypes.to(queries.device).t()
    top = similarity.topk(k, dim=1)
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    votes.scatter_add_(1, bank.labels.to(queries.device)[top.indices],
                       torch.ones_like(top.indices, dtype=votes.dtype))
    share, label = votes.max(dim=1)
    return VoteDetails(label, share / k, top.values[:, 0])


def knn_vote(
    queries: torch.Tensor, bank: LabelBank, num_classes: int, k: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """queries (S, D) unit norm -> (labels (S,), vote share (S,)), majority of the k nearest.
    Closed set: ignores the bank's thresholds (see the module docstring)."""
    details = vote_details(queries, bank, num_classes, k)
    return details.labels, details.shares


def covered(details: VoteDetails, bank: LabelBank) -> torch.Tensor:
    """(S,) bool: the bank covers the segment (near enough and a clear enough majority)."""
    return (details.nearest_similarity >= bank.min_similarity) & (details.shares >= bank.min_share)


def open_set_vote(
    queries: torch.Tensor, bank: LabelBank, num_classes: int, k: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """queries (S, D) unit norm -> (labels (S,) int64, scores (S,) float).

    Where the bank covers the segment: the majority class and its vote share, in
    [max(min_share, 1/k), 1]. Where it does not: `NO_LABEL` and score 0 exactly.
    """
    details = vote_details(queries, bank, num_classes, k)
    keep = covered(details, bank)
    labels = torch.where(keep, details.labels, torch.full_like(details.labels, NO_LABEL))
    return labels, torch.where(keep, details.shares, torch.zeros_like(details.shares))
