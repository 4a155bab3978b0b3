"""Segment prototypes: the re-normalised mean embedding of each segment.

SPML's loss compares every pixel embedding with segment prototypes, and the gradient of that
loss must reach the network *through* the prototypes, so everything here is plain
differentiable torch (``index_add`` over flattened global segment ids, no Python loop over
segments or images). The same code runs on CPU and CUDA: it follows the tensors' device.
On CUDA ``index_add`` sums with float atomics, so prototypes can differ between runs in the
last bits (k-means itself avoids it for its assignments; see ``kmeans._cluster_sums``).

Shapes: ``B`` images, ``D`` embedding channels, ``H x W`` pixels, ``K`` segments per image.
Segment ``k`` of image ``b`` has the global id ``b * K + k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this norm a summed embedding is treated as zero (an empty segment, or embeddings that
# cancel exactly), and its prototype is the zero vector instead of a NaN direction.
NORM_EPS = 1e-12


def _check_segment_ids(segment_ids: Tensor, num_segments: int) -> None:
    """Raise ValueError for ids that are not a (B, H, W) long map in [0, num_segments)."""
    if segment_ids.dim() != 3:
        raise ValueError(f"segment_ids must be (B, H, W), got shape {tuple(segment_ids.shape)}")
    if segment_ids.dtype != torch.long:
        raise ValueError(f"segment_ids must be torch.long, got {segment_ids.dtype}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if segment_ids.numel() and (
        int(segment_ids.min()) < 0 or int(segment_ids.max()) >= num_segments
    ):
        raise ValueError(f"segment_ids must lie in [0, {num_segments})")


def flatten_segments(segment_ids: Tensor, num_segments: int) -> Tensor:
    """Global segment ids ``(B*H*W,)``: segment ``k`` of image ``b`` becomes ``b*K + k``.

    Pixels are flattened in ``(b, y, x)`` order, matching ``embeddings.permute(0, 2, 3, 1)``.
    """
    _check_segment_ids(segment_ids, num_segments)
    batch = segment_ids.shape[0]
    offsets = torch.arange(batch, device=segment_ids.device).view(batch, 1, 1) * num_segments
    return (segment_ids + offsets).reshape(-1)


def segment_counts(segment_ids: Tensor, num_segments: int) -> Tensor:
    """Number of pixels in each segment, ``(B, K)`` long (zero for empty segments)."""
    flat = flatten_segments(segment_ids, num_segments)
    counts = torch.bincount(flat, minlength=segment_ids.shape[0] * num_segments)
    return counts.view(segment_ids.shape[0], num_segments)


def segment_sums(embeddings: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Sum of the embeddings of each segment, ``(B, K, D)``; differentiable in ``embeddings``.

    ``embeddings`` is ``(B, D, H, W)``; ``segment_ids`` is ``(B, H, W)`` long in ``[0, K)``.
    Memory: one ``(B*H*W, D)`` view of the embeddings plus the ``(B*K, D)`` result.
    """
    if embeddings.dim() != 4:
        raise ValueError(f"embeddings must be (B, D, H, W), got shape {tuple(embeddings.shape)}")
    batch, dim, height, width = embeddings.shape
    if tuple(segment_ids.shape) != (batch, height, width):
        raise ValueError(
            f"segment_ids shape {tuple(segment_ids.shape)} does not match embeddings "
            f"(B, H, W) = {(batch, height, width)}"
        )
    flat_ids = flatten_segments(segment_ids, num_segments)
    pixels = embeddings.permute(0, 2, 3, 1).reshape(-1, dim)
    sums = embeddings.new_zeros(batch * num_segments, dim).index_add(0, flat_ids, pixels)
    return sums.view(batch, num_segments, dim)


def segment_prototypes(embeddings: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Unit-norm mean embedding of each segment, ``(B, K, D)``.

    The normalised sum equals the normalised mean, so no division by the counts is needed.
    Empty segments give zero vectors (mask them with ``segment_counts(...) > 0``). Gradients
    flow to ``embeddings``; ``F.normalize`` clamps the norm at ``NORM_EPS`` so an empty
    segment contributes a zero gradient rather than NaN.
    """
    sums = segment_sums(embeddings, segment_ids, num_segments)
    return F.normalize(sums, p=2, dim=-1, eps=NORM_EPS)


def relabel_contiguous(segment_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Renumber each image's segment ids to ``0..n_b-1`` keeping their order.

    Returns ``(relabelled (B, H, W) long, n_b (B,) long)``: ids that no pixel of image ``b``
    uses are dropped, so every id below ``n_b`` is non-empty. Useful after splitting
    k-means segments by weak labels or contours, and before storing segments in the index.
    """
    if segment_ids.dim() != 3 or segment_ids.dtype != torch.long:
        raise ValueError("segment_ids must be a (B, H, W) torch.long tensor")
    if segment_ids.numel() == 0:
        return segment_ids.clone(), segment_ids.new_zeros(segment_ids.shape[0])
    num_ids = int(segment_ids.max()) + 1
    used = segment_counts(segment_ids, num_ids) > 0  # (B, num_ids)
    new_id_of_old = torch.cumsum(used.long(), dim=1) - 1  # (B, num_ids)
    relabelled = torch.gather(new_id_of_old, 1, segment_ids.reshape(segment_ids.shape[0], -1))
    return relabelled.view_as(segment_ids), used.sum(dim=1)
