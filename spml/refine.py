"""Segment borders finer than the embedding stride: assign pixels of a finer grid to k-means
centroids.

Why: k-means runs on the stride-4 embedding map, so a map upsampled by nearest neighbour has
stair steps of 4 network-input pixels. Here the embedding map is bilinearly upsampled to a
finer grid (at most `refine_size` per side, so the cost is bounded whatever the image size),
and every pixel of it takes the nearest centroid in the very space the k-means used,
`normalize(concat(normalize(embedding), coord_weight * yx))`, with `yx` continued to the
finer pixels' centres (so a pixel on a stride-4 centre has the k-means coordinates). Borders
then fall where the interpolated embedding crosses between two centroids, not on the grid.

Clusters the k-means left empty are never chosen (their centroid is stale). Same code on CPU
and GPU; the similarity is computed in chunks of pixels, so memory stays `K x chunk` floats,
and channels-first throughout (no transposed copy of the upsampled map).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segsearch.spml.prototypes import NORM_EPS

ROW_CHUNK = 32768


def finer_size(shape: tuple[int, int], refine_size: int, low_size: tuple[int, int]) -> tuple[int, int]:
    """The grid a map of image size `shape` (H, W) is refined to: each side at most
    `refine_size` and the image's own, and never coarser than the embedding map `low_size`
    (`refine_size` 0: the embedding map itself, i.e. no refinement)."""
    if refine_size <= 0:
        return int(low_size[0]), int(low_size[1])
    return (max(min(int(shape[0]), refine_size), int(low_size[0])),
            max(min(int(shape[1]), refine_size), int(low_size[1])))


def continued_coordinates(low: int, high: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """`(high,)` the k-means coordinate (`linspace(-0.5, 0.5, low)` on the `low` pixel centres)
    at the centres of `high` pixels spanning the same extent (half-pixel convention, as
    bilinear upsampling with `align_corners=False`)."""
    centre = (torch.arange(high, device=device, dtype=dtype) + 0.5) * low / high - 0.5
    return centre / max(low - 1, 1) - 0.5


@torch.inference_mode()
def assign_finer(embeddings: torch.Tensor, centroids: torch.Tensor, used: torch.Tensor,
                 size: tuple[int, int], coord_weight: float) -> torch.Tensor:
    """k-means ids on a finer grid for one image.

    embeddings: `(D, h, w)` unit-norm embedding map; centroids: `(K, D + 2)` the k-means
    centroids; used: `(K,)` bool, clusters with pixels; size: the finer `(H', W')`.
    Returns `(H', W')` long ids in [0, K).
    """
    dim, low_h, low_w = embeddings.shape
    if (low_h, low_w) == tuple(size):
        upsampled = embeddings.float()
    else:
        upsampled = F.interpolate(embeddings[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    pixels = upsampled.reshape(dim, -1)  # (D, N), channels first: no transpose of the big map
    inverse_norm = pixels.square().sum(dim=0).clamp_min(NORM_EPS ** 2).rsqrt()  # (N,)
    ys = continued_coordinates(low_h, size[0], embeddings.device)
    xs = continued_coordinates(low_w, size[1], embeddings.device)
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=0).reshape(2, -1)  # (2, N)
    centroids = centroids.to(pixels)
    penalty = torch.where(used, 0.0, float("inf")).to(pixels).view(-1, 1)
    ids = torch.empty(pixels.shape[1], dtype=torch.long, device=pixels.device)
    for start in range(0, pixels.shape[1], ROW_CHUNK):
        part = slice(start, start + ROW_CHUNK)
        # cosine with each centroid, up to the positive per-pixel norm of the concatenated
        # feature, which leaves the argmax unchanged
        similarity = (centroids[:, :dim] @ pixels[:, part]) * inverse_norm[part] \
            + coord_weight * (centroids[:, dim:] @ coords[:, part]) - penalty
        ids[part] = similarity.argmax(dim=0)
    return ids.view(size)
