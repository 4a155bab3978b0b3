"""Per-pixel descriptors whose segment means are compared by cosine k-NN.

The learned embedding is one descriptor; the others are the trivial baselines a sceptical
user tries first (docs/architecture.md, "Measuring quality honestly"), evaluated on the *same* segments:
a colour histogram, and the untrained (frozen, HED-pretrained) backbone's hypercolumn.
All return (B, F, h, w) at the embedding resolution (stride 4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segsearch.spml.embedding import OUTPUT_STRIDE, EmbeddingNet

DESCRIPTORS = ("model", "colour_histogram", "backbone")
COLOUR_BINS = 4  # per channel: 64 bins


def colour_histogram_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 64, h, w): each cell's 4x4x4 RGB histogram (sums to 1)."""
    bins = (images.long() * COLOUR_BINS // 256).clamp(max=COLOUR_BINS - 1)
    index = (bins[:, 0] * COLOUR_BINS + bins[:, 1]) * COLOUR_BINS + bins[:, 2]
    one_hot = F.one_hot(index, COLOUR_BINS**3).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(one_hot, OUTPUT_STRIDE, OUTPUT_STRIDE, ceil_mode=True)


@torch.no_grad()
def pixel_descriptors(
    name: str, model: EmbeddingNet, images: torch.Tensor, features: torch.Tensor | None
) -> torch.Tensor:
    """images (B, 3, H, W) uint8; features: cached backbone hypercolumn or None."""
    if name == "colour_histogram":
        return colour_histogram_pixels(images)
    if features is None:
        features = model.features(images.float())
    if name == "backbone":
        return features.float()
    if name == "model":
        return model.embed_features(features.float())
    raise ValueError(f"unknown descriptor {name!r}; choose from {DESCRIPTORS}")
