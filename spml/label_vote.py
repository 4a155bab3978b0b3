"""Labelling segments by k-nearest-neighbour vote over labelled training prototypes.

SPML labels a segment at inference by the classes of its nearest labelled training segments
(the label bank of the checkpoint). Training builds the bank (`trainer.label_bank`); the
indexer, the service and evaluation vote with it, so the vote lives here in the core package.
"""
from __future__ import annotations

import torch

from segsearch.spml.checkpoint import LabelBank


def knn_vote(
    queries: torch.Tensor, bank: LabelBank, num_classes: int, k: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """queries (S, D) unit norm -> (labels (S,), vote share (S,)), majority of the k nearest."""
    if bank.prototypes.shape[0] == 0:
        raise ValueError("the label bank is empty: no training segment carried a weak label")
    k = min(k, bank.prototypes.shape[0])
    similarity = queries @ bank.prototypes.to(queries.device).t()
    nearest = similarity.topk(k, dim=1).indices
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    votes.scatter_add_(1, bank.labels.to(queries.device)[nearest], torch.ones_like(nearest, dtype=votes.dtype))
    share, label = votes.max(dim=1)
    return label, share / k
