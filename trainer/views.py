"""Training views: a step draws one of several cached views of each image, not always the same.

Why: with a frozen backbone the trainer caches each image's features once (trainer/prepared.py),
so without views the head sees identical inputs every epoch, while the reference
(twke18/SPML) draws a new random flip, scale and 512 crop at every step. The cheapest new view
that keeps the cache is the horizontal mirror: the backbone is not mirror-equivariant, so its
features of the mirrored image are a genuinely different input. They are computed once on the
mirrored image and cached like the originals (trainer/feature_cache).

Layout (`views="flip"`): a PreparedSet of N images becomes one of 2N rows, view-major: row
`v * N + i` is view v of image i (v = 0 the original, v = 1 its mirror), `views = 2`. So
images (2N, 3, H, W) uint8, masks (2N, H, W), weak_labels / dense_labels / contours (2N, h, w)
long and valid (2N, h, w) bool at stride 4, tags (2N, K), features (2N, C, h, w) float16.
The mirror flips the width axis (the last) of every map; tags do not change. A stride-4 map
is a per-cell label (majority of the cell for weak and dense labels, the cell's centre for
contours and valid) of 4 x 4 cells; with W a multiple of 4 the mirror maps each cell onto a
cell, so flipping the stored map equals the map of the flipped image (exactly for the
majority labels, to one pixel of the centre sample for contours and valid). W must
therefore be a multiple of 4.

Each step draws one view per image of its global batch from (seed, step) alone, so a resumed
run and every torchrun rank see the same views. Label banks and the residual head's
projection use the originals (`originals`), as without views.
"""
from __future__ import annotations

import dataclasses

import torch

from segsearch.spml.embedding import OUTPUT_STRIDE, EmbeddingNet
from segsearch.trainer.feature_cache import cached
from segsearch.trainer.prepared import PreparedSet, compute_features, features_key

VIEWS = ("none", "flip")
ROW_FIELDS = ("images", "masks", "weak_labels", "dense_labels", "contours", "tags", "features", "valid")
_VIEW_SEED = 0x5EED_F11B  # keeps the view draw apart from the batch and pixel draws


def with_views(prepared: PreparedSet, views: str, model: EmbeddingNet | None, batch_size: int = 16,
               progress: bool = True) -> PreparedSet:
    """`prepared` with the views `views` names ("none": `prepared` itself). `model` computes
    the mirrored images' features when `prepared` has features."""
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
    if views == "none" or prepared.views > 1:
        return prepared
    return stack_views([prepared, mirrored(prepared, model, batch_size, progress)])


def flip(maps: torch.Tensor | None) -> torch.Tensor | None:
    """Mirror on the width (last) axis."""
    return None if maps is None else maps.flip(-1)


def mirrored(prepared: PreparedSet, model: EmbeddingNet | None, batch_size: int = 16,
             progress: bool = True) -> PreparedSet:
    """Every image of `prepared` mirrored left-right: its maps flipped, tags as they are, and
    features (if `prepared` has them) computed by `model` on the mirrored images."""
    if prepared.images.shape[-1] % OUTPUT_STRIDE:
        raise ValueError(f"flip views need an image width divisible by {OUTPUT_STRIDE}, "
                         f"got {prepared.images.shape[-1]}")
    images = flip(prepared.images).contiguous()
    return dataclasses.replace(
        prepared, images=images, masks=flip(prepared.masks), weak_labels=flip(prepared.weak_labels),
        dense_labels=flip(prepared.dense_labels), contours=flip(prepared.contours),
        valid=flip(prepared.valid), features=mirrored_features(prepared, images, model, batch_size, progress),
        image_ids=[f"{image_id}:flip" for image_id in prepared.image_ids],
    )


def mirrored_features(prepared: PreparedSet, images: torch.Tensor, model: EmbeddingNet | None,
                      batch_size: int, progress: bool) -> torch.Tensor | None:
    """The backbone's features of the mirrored `images`, through the feature cache (same key
    rule as prepare_set); None when `prepared` has no features."""
    if prepared.features is None:
        return None
    if model is None:
        raise ValueError("mirrored views of cached features need the model's backbone")
    return cached(features_key(images, model), lambda: compute_features(model, images, batch_size, progress))


def stack_views(views: list[PreparedSet]) -> PreparedSet:
    """Single-view sets of the same images in the same order -> one view-major set."""
    fields = {name: None if getattr(views[0], name) is None
              else torch.cat([getattr(v, name) for v in views]) for name in ROW_FIELDS}
    return dataclasses.replace(views[0], **fields, image_ids=[i for v in views for i in v.image_ids],
                               views=len(views))


def originals(prepared: PreparedSet) -> PreparedSet:
    """The first view (the unaltered images) of a view-major set, without copying."""
    if prepared.views == 1:
        return prepared
    n = prepared.num_images
    fields = {name: None if getattr(prepared, name) is None else getattr(prepared, name)[:n]
              for name in ROW_FIELDS}
    return dataclasses.replace(prepared, **fields, image_ids=prepared.image_ids[:n], views=1)


def view_rows(images: torch.Tensor, num_images: int, views: int, seed: int, step: int) -> torch.Tensor:
    """Image indices (B,) of a step's global batch -> rows (B,): one view per entry, drawn from
    (seed, step) alone. One view: the indices themselves (no draw)."""
    if views == 1:
        return images
    generator = torch.Generator().manual_seed(_VIEW_SEED + seed * 1_000_003 + step)
    return images + num_images * torch.randint(views, images.shape, generator=generator)
