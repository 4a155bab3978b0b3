"""Batched spherical (von Mises-Fisher) k-means over-segmentation, as in SPML.

Each pixel's feature is ``normalize(concat(embedding, coord_weight * yx))`` with ``yx`` in
``[-0.5, 0.5]``: the coordinates keep segments spatially compact, the embedding keeps them
inside one object. Centroids start on a regular ``rows x cols`` grid (the normalised mean of
each grid cell, as SPML's grid initial labels do), then ``iterations`` rounds of

    assign: each pixel to the centroid of highest cosine similarity (ties: lowest index)
    update: each centroid to the normalised mean of its pixels

run for all images at once (a Python loop over iterations only). The result's segment ids
come from the last assignment; its prototypes are the normalised means of the *embedding*
part only (``segment_prototypes``), computed with autograd so a loss can train through them.
The assignment itself is not differentiable and runs under ``torch.no_grad``.

Empty clusters never produce NaN. With ``empty_cluster="keep"`` (default) an empty cluster
keeps its previous centroid (it may win pixels back later); with ``"reseed"`` it moves to
the worst-fitting pixel of its image (lowest similarity to its own centroid; distinct pixels
for several empty clusters), which tends to use all ``K`` segments.

Memory: the assignment holds a ``(B, H*W, K)`` similarity matrix; off the CPU the update
holds a one-hot matrix of the same size (a batched matmul rather than ``index_add``, so that
it is deterministic on CUDA too). In float32 that is ``4 * B * H * W * K`` bytes each: B=16
at 64x64 with K=144 (12x12 inference grid) is about 38 MB, B=16 at 40x40 with K=36 about
3.7 MB, plus the ``(B, H*W, D+2)`` features.

Same code on CPU and CUDA: everything follows the device of ``embeddings`` (only the
centroid sums pick ``index_add`` or the one-hot matmul by device; both are tested to agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from segsearch.spml.config import KMeansConfig  # noqa: F401  (the k-means settings, torch-free)
from segsearch.spml.prototypes import NORM_EPS, segment_counts, segment_prototypes

@dataclass
class KMeansResult:
    """Output of ``spherical_kmeans`` for a batch of ``B`` images.

    segment_ids: (B, H, W) long in [0, K).
    prototypes: (B, K, D) unit-norm mean embedding per segment; zero where not valid.
        Carries autograd history from the input embeddings.
    valid: (B, K) bool, True for non-empty segments.
    centroids: (B, K, D + 2) final unit-norm centroids in the coordinate-augmented space
        (no grad); use with ``kmeans_features`` and ``kmeans_objective``.
    num_segments: K.
    """

    segment_ids: Tensor
    prototypes: Tensor
    valid: Tensor
    centroids: Tensor
    num_segments: int


def coordinate_grid(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Pixel coordinates ``(H*W, 2)`` as ``(y, x)`` in ``[-0.5, 0.5]``, row-major order."""
    ys = torch.linspace(-0.5, 0.5, height, device=device, dtype=dtype)
    xs = torch.linspace(-0.5, 0.5, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_y, grid_x], dim=-1).reshape(-1, 2)


def kmeans_features(embeddings: Tensor, coord_weight: float) -> Tensor:
    """Unit-norm clustering features ``(B, H*W, D+2)`` from embeddings ``(B, D, H, W)``.

    ``normalize(concat(normalize(embedding), coord_weight * yx))``; computed in at least
    float32 (half-precision embeddings are promoted) and without autograd history.
    """
    if embeddings.dim() != 4 or not embeddings.is_floating_point():
        raise ValueError(
            f"embeddings must be a floating (B, D, H, W) tensor, got {embeddings.dtype} "
            f"{tuple(embeddings.shape)}"
        )
    batch, dim, height, width = embeddings.shape
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    pixels = embeddings.detach().to(dtype).permute(0, 2, 3, 1).reshape(batch, height * width, dim)
    pixels = F.normalize(pixels, dim=-1, eps=NORM_EPS)
    coords = coordinate_grid(height, width, device=embeddings.device, dtype=dtype)
    coords = (coord_weight * coords).expand(batch, -1, -1)
    return F.normalize(torch.cat([pixels, coords], dim=-1), dim=-1, eps=NORM_EPS)


def grid_labels(height: int, width: int, grid: tuple[int, int], device=None) -> Tensor:
    """Initial cell index of each pixel, ``(H, W)`` long, row-major over ``rows x cols`` cells.

    Cells are as equal as integer division allows (``row = floor(y * rows / H)``); when the
    image is smaller than the grid some cells hold no pixel.
    """
    rows, cols = grid
    row = torch.arange(height, device=device) * rows // height
    col = torch.arange(width, device=device) * cols // width
    return row.view(-1, 1) * cols + col.view(1, -1)


def _cell_centre_indices(height: int, width: int, grid: tuple[int, int], device=None) -> Tensor:
    """Flat pixel index ``(K,)`` of the pixel nearest each grid cell's centre."""
    rows, cols = grid
    ys = ((torch.arange(rows, device=device) + 0.5) * height / rows).long().clamp(max=height - 1)
    xs = ((torch.arange(cols, device=device) + 0.5) * width / cols).long().clamp(max=width - 1)
    return (ys.view(-1, 1) * width + xs.view(1, -1)).reshape(-1)


def assign(features: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid by cosine similarity.

    features (B, N, F) and centroids (B, K, F), both unit norm. Returns
    ``(ids (B, N) long, similarity (B, N))``; ties go to the lowest centroid index.
    """
    similarities = torch.bmm(features, centroids.transpose(1, 2))  # (B, N, K)
    best, ids = similarities.max(dim=-1)
    return ids, best


def _cluster_counts(ids: Tensor, num_clusters: int) -> Tensor:
    """Pixels per cluster, ``(B, K)`` long, from ids ``(B, N)``."""
    batch = ids.shape[0]
    offsets = torch.arange(batch, device=ids.device).view(-1, 1) * num_clusters
    counts = torch.bincount((ids + offsets).reshape(-1), minlength=batch * num_clusters)
    return counts.view(batch, num_clusters)


def _cluster_sums(
    features: Tensor, ids: Tensor, num_clusters: int, matmul: bool | None = None
) -> Tensor:
    """Sum of each cluster's features, ``(B, K, F)``, deterministic on every device.

    On CPU ``index_add`` over global ids (sequential, so deterministic, and faster than the
    matmul there: bench/kmeans_speed.py). Elsewhere (``matmul=None`` picks by device) a one-hot ``(B, N, K)`` batched
    matmul, because ``index_add`` on CUDA uses float atomics whose summation order, and so
    the last bits and possibly later assignments, change from run to run.
    """
    batch, _, dim = features.shape
    if matmul is None:
        matmul = features.device.type != "cpu"
    if matmul:
        one_hot = F.one_hot(ids, num_clusters).to(features.dtype)  # (B, N, K)
        return torch.bmm(one_hot.transpose(1, 2), features)
    offsets = torch.arange(batch, device=ids.device).view(-1, 1) * num_clusters
    sums = features.new_zeros(batch * num_clusters, dim)
    sums.index_add_(0, (ids + offsets).reshape(-1), features.reshape(-1, dim))
    return sums.view(batch, num_clusters, dim)


def update_centroids(
    features: Tensor, ids: Tensor, previous: Tensor
) -> tuple[Tensor, Tensor]:
    """Normalised mean of each cluster's features; empty clusters keep ``previous``.

    features (B, N, F), ids (B, N) long in [0, K), previous (B, K, F). Returns
    ``(centroids (B, K, F), counts (B, K) long)``. A cluster whose features sum to (almost)
    zero also keeps its previous centroid, so the result is always finite.
    """
    num_clusters = previous.shape[1]
    sums = _cluster_sums(features, ids, num_clusters)
    counts = _cluster_counts(ids, num_clusters)
    norms = sums.norm(dim=-1, keepdim=True)
    keep_old = (counts == 0).unsqueeze(-1) | (norms <= NORM_EPS)
    centroids = torch.where(keep_old, previous, sums / norms.clamp_min(NORM_EPS))
    return centroids, counts


def reseed_empty(
    features: Tensor, similarity: Tensor, centroids: Tensor, counts: Tensor
) -> Tensor:
    """Move each empty cluster to a worst-fitting pixel of its image.

    similarity (B, N) is each pixel's similarity to its assigned centroid. The j-th empty
    cluster of an image (in index order) takes that image's j-th least similar pixel, so
    several empty clusters get distinct pixels. Returns new centroids (B, K, F).
    """
    batch, num_pixels, _ = features.shape
    num_clusters = centroids.shape[1]
    depth = min(num_clusters, num_pixels)
    worst = torch.sort(similarity, dim=1, stable=True).indices[:, :depth]  # (B, depth)
    empty = counts == 0
    rank = (torch.cumsum(empty.long(), dim=1) - 1).clamp(0, depth - 1)  # (B, K)
    pixel = torch.gather(worst, 1, rank)  # (B, K)
    seeds = torch.gather(features, 1, pixel.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    return torch.where(empty.unsqueeze(-1), seeds, centroids)


def initial_centroids(
    features: Tensor, height: int, width: int, config: KMeansConfig
) -> Tensor:
    """Grid initialisation, ``(B, K, F)`` unit norm (see ``KMeansConfig.init``)."""
    centre = _cell_centre_indices(height, width, config.grid, device=features.device)
    centre_features = features[:, centre, :]  # (B, K, F)
    if config.init == "cell_centre":
        return centre_features
    labels = grid_labels(height, width, config.grid, device=features.device).reshape(1, -1)
    centroids, _ = update_centroids(
        features, labels.expand(features.shape[0], -1), centre_features
    )
    return centroids


def run_kmeans(
    features: Tensor, height: int, width: int, config: KMeansConfig
) -> tuple[Tensor, Tensor]:
    """Core loop on prepared features (B, H*W, F). Returns ``(ids (B, N), centroids (B, K, F))``.

    The centroids are those after the final update, i.e. the normalised means of the
    returned assignment (for clusters left empty: the previous or re-seeded centroid).
    """
    with torch.no_grad():
        centroids = initial_centroids(features, height, width, config)
        for _ in range(config.iterations):
            ids, similarity = assign(features, centroids)
            centroids, counts = update_centroids(features, ids, centroids)
            if config.empty_cluster == "reseed":
                centroids = reseed_empty(features, similarity, centroids, counts)
    return ids, centroids


def spherical_kmeans(embeddings: Tensor, config: KMeansConfig | None = None) -> KMeansResult:
    """Over-segment a batch of embeddings ``(B, D, H, W)`` (unit norm) into ``K`` segments.

    See the module docstring for the algorithm. Deterministic for a given device.
    ``prototypes`` are differentiable in ``embeddings``; nothing else is.
    """
    config = config or KMeansConfig()
    features = kmeans_features(embeddings, config.coord_weight)
    batch, _, height, width = embeddings.shape
    ids, centroids = run_kmeans(features, height, width, config)
    segment_ids = ids.view(batch, height, width)
    num_segments = config.num_segments
    prototypes = segment_prototypes(embeddings, segment_ids, num_segments)
    valid = segment_counts(segment_ids, num_segments) > 0
    return KMeansResult(
        segment_ids=segment_ids,
        prototypes=prototypes,
        valid=valid,
        centroids=centroids,
        num_segments=num_segments,
    )


def kmeans_objective(
    features: Tensor, segment_ids: Tensor, centroids: Tensor | None = None,
    num_segments: int | None = None,
) -> Tensor:
    """Sum over pixels of the cosine similarity to their cluster centroid, ``(B,)``.

    features (B, N, F) unit norm; segment_ids (B, N) or (B, H, W) long; centroids (B, K, F).
    Without centroids, the normalised means of the segments are used (the best centroids
    for that assignment), with ``K = num_segments`` or ``max id + 1``. Higher is better;
    the maximum is N per image.
    """
    ids = segment_ids.reshape(segment_ids.shape[0], -1)
    if ids.shape[:2] != features.shape[:2]:
        raise ValueError(
            f"segment_ids {tuple(segment_ids.shape)} do not match features {tuple(features.shape)}"
        )
    if centroids is None:
        k = num_segments if num_segments is not None else int(ids.max()) + 1
        zeros = features.new_zeros(features.shape[0], k, features.shape[-1])
        centroids, _ = update_centroids(features, ids, zeros)
    picked = torch.gather(centroids, 1, ids.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    return (features * picked).sum(dim=(1, 2))
