"""The SegSort+ pixel-to-segment contrastive loss (SPML, Ke et al. ICLR 2021).

For pixel embedding `e_i` and segment prototypes `p_l` (all unit norm), with a boolean
positive set `P(i)` and negative set `N(i)` given by one of SPML's relations:

    loss_i = -log( Σ_{s∈P(i)} exp(κ p_s·e_i) / (Σ_{s∈P(i)} exp(κ p_s·e_i) + Σ_{l∈N(i)} exp(κ p_l·e_i)) )

Prototypes that are in neither set do not enter the pixel's softmax. The loss is averaged over
pixels that have at least one positive and one candidate at all; pixels with no positive
(e.g. unlabelled pixels for the annotation relation) contribute nothing. Computed with
logsumexp so that large κ does not overflow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PixelSum:
    """A loss term as (sum over pixels, number of pixels) instead of their mean.

    Why: under data-parallel training each process sees part of the global batch; the
    processes add their counts up and divide their sums by the *global* count, so the
    result is the mean over the whole global batch (see trainer/ddp.py).
    `weight * term` scales the sum, like `weight * loss` does for a mean.
    """

    total: torch.Tensor
    count: int

    def __rmul__(self, weight: float) -> "PixelSum":
        return PixelSum(weight * self.total, self.count)


def segsort_loss(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    concentration: float,
    reduction: str = "mean",
) -> torch.Tensor | PixelSum:
    """Mean SegSort+ loss.

    embeddings: (N, D) unit-norm pixel embeddings.
    prototypes: (P, D) unit-norm segment prototypes (may carry gradients).
    positive, negative: (N, P) bool masks; must not overlap.
    Returns a scalar; zero (with a graph) when no pixel has a positive. With
    reduction="sum", a PixelSum of the per-pixel losses and the number of pixels they cover.
    """
    logits = concentration * embeddings @ prototypes.t()  # (N, P)
    neg_inf = torch.finfo(logits.dtype).min
    positive_logits = logits.masked_fill(~positive, neg_inf)
    candidate_logits = logits.masked_fill(~(positive | negative), neg_inf)
    has_positive = positive.any(dim=1)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not bool(has_positive.any()):
        zero = logits.sum() * 0.0
        return zero if reduction == "mean" else PixelSum(zero, 0)
    log_numerator = torch.logsumexp(positive_logits[has_positive], dim=1)
    log_denominator = torch.logsumexp(candidate_logits[has_positive], dim=1)
    if reduction == "sum":
        return PixelSum((log_denominator - log_numerator).sum(), int(has_positive.sum()))
    return (log_denominator - log_numerator).mean()


def segsort_plus_positives(
    same_group: torch.Tensor, own_segment: torch.Tensor
) -> torch.Tensor:
    """SegSort+ positive set, as in the released SPML code.

    same_group: (N, P) bool, prototypes sharing the pixel's label / tag / region.
    own_segment: (N, P) bool, one True per row at the pixel's own segment (or all False
    when the pixel's segment is not among the prototypes).
    Why: when other segments share the pixel's group, the pixel is pulled towards *them*
    (its own segment is excluded from both numerator and denominator), which forces the
    embedding to generalise across segments; otherwise it falls back to its own segment.
    Returns (positive, excluded) masks, both (N, P) bool.
    """
    others = same_group & ~own_segment
    has_others = others.any(dim=1, keepdim=True)
    positive = torch.where(has_others, others, own_segment)
    excluded = own_segment & has_others
    return positive, excluded
