"""Backbones that return per-block feature maps: the HED-trained VGG16 and a tiny test CNN.

Both take `(B, 3, H, W)` float RGB in [0, 255] and normalise it themselves, so callers never
need to know which normalisation a backbone was trained with. Both return a list with one
feature map per block, strides 1, 2, 4, 8, 16 (block k has stride 2**k, k = 0..), and expose
`block_channels`. Blocks 2..5 start with a 2x2 stride-2 max pool with `ceil_mode=True`,
which reproduces Keras' "same" pooling of the HED weights on odd sizes
(block k output is `ceil(H / 2**k)`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from segsearch.spml.hed_weights import backbone_state_dict, load_hed_state_dict

CAFFE_BGR_MEAN = (104.00699, 116.66877, 122.67892)
IMAGENET_RGB_MEAN = (0.485, 0.456, 0.406)
IMAGENET_RGB_STD = (0.229, 0.224, 0.225)
VGG16_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)
VGG16_CHANNELS = (64, 128, 256, 512, 512)
SMALL_CHANNELS = (16, 32, 64, 64, 64)


def block_channels(name: str) -> tuple[int, ...]:
    """Channels of blocks 1..5 of a backbone, without building it."""
    return VGG16_CHANNELS if name == "vgg16" else SMALL_CHANNELS
BACKBONE_CHOICES = ("vgg16", "small")


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Caffe preprocessing of the HED/VGG16 weights: RGB [0,255] `(B,3,H,W)` -> BGR minus mean."""
    _check_images(images)
    mean = images.new_tensor(CAFFE_BGR_MEAN).view(1, 3, 1, 1)
    return images.flip(1) - mean


def imagenet_normalise(images: torch.Tensor) -> torch.Tensor:
    """RGB [0,255] `(B,3,H,W)` -> (x/255 - mean) / std, the usual scale for a from-scratch CNN."""
    _check_images(images)
    mean = images.new_tensor(IMAGENET_RGB_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_RGB_STD).view(1, 3, 1, 1)
    return (images / 255.0 - mean) / std


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")


def _check_num_blocks(num_blocks: int) -> None:
    if not 1 <= num_blocks <= 5:
        raise ValueError(f"num_blocks must be in 1..5, got {num_blocks}")


def _conv_block(in_ch: int, out_ch: int, num_convs: int, pool: bool) -> nn.Sequential:
    """[pool] + (conv3x3 + ReLU) * num_convs; conv names conv1..convN match the HED weight keys."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if pool:
        layers["pool"] = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
    for index in range(1, num_convs + 1):
        layers[f"conv{index}"] = nn.Conv2d(in_ch if index == 1 else out_ch, out_ch, 3, padding=1)
        layers[f"relu{index}"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    features = []
    for block in blocks:
        x = block(x)
        features.append(x)
    return features


class VGG16(nn.Module):
    """VGG16's 13 conv layers in 5 blocks; `forward` returns each block's last ReLU output.

    Output `k` (k = 0..num_blocks-1) is `(B, block_channels[k], ceil(H/2**k), ceil(W/2**k))`.
    `num_blocks < 5` drops the deep blocks (saves compute and parameters when unused).
    """

    def __init__(self, num_blocks: int = 5):
        super().__init__()
        _check_num_blocks(num_blocks)
        self.num_blocks = num_blocks
        self.block_channels = VGG16_CHANNELS[:num_blocks]
        in_channels = (3,) + VGG16_CHANNELS[:-1]
        self.blocks = nn.ModuleList(
            _conv_block(in_channels[k], VGG16_CHANNELS[k], VGG16_CONVS_PER_BLOCK[k], pool=k > 0)
            for k in range(num_blocks)
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return _run_blocks(self.blocks, preprocess(images))

    def load_hed_weights(self, cache_dir: Path | None = None) -> "VGG16":
        """Load the HED-trained VGG16 weights (strict for the blocks this model has)."""
        state = backbone_state_dict(load_hed_state_dict(cache_dir), self.num_blocks)
        self.load_state_dict(state, strict=True)
        return self


class SmallBackbone(nn.Module):
    """A tiny from-scratch CNN with VGG16's interface (per-block features, same strides), for tests.

    One conv + GroupNorm + ReLU per block (two in block 1); widths default to (16, 32, 64, 64, 64).
    GroupNorm, not BatchNorm: it works for batch 1 and 1x1 deep maps in training mode.
    """

    def __init__(self, num_blocks: int = 5, widths: tuple[int, ...] = SMALL_CHANNELS):
        super().__init__()
        _check_num_blocks(num_blocks)
        if len(widths) < num_blocks:
            raise ValueError(f"need {num_blocks} widths, got {widths}")
        self.num_blocks = num_blocks
        self.block_channels = tuple(widths[:num_blocks])
        in_channels = (3,) + self.block_channels[:-1]
        self.blocks = nn.ModuleList(
            self._block(in_channels[k], self.block_channels[k], k) for k in range(num_blocks)
        )

    @staticmethod
    def _block(in_ch: int, out_ch: int, index: int) -> nn.Sequential:
        layers: list[nn.Module] = [nn.MaxPool2d(2, 2, ceil_mode=True)] if index > 0 else []
        convs = 2 if index == 0 else 1
        for conv in range(convs):
            layers += [
                nn.Conv2d(in_ch if conv == 0 else out_ch, out_ch, 3, padding=1, bias=False),
                nn.GroupNorm(math.gcd(8, out_ch), out_ch),
                nn.ReLU(inplace=True),
            ]
        return nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return _run_blocks(self.blocks, imagenet_normalise(images))


def build_backbone(
    name: str, pretrained: bool, num_blocks: int = 5, cache_dir: Path | None = None
) -> nn.Module:
    """Backbone by name: "vgg16" (pretrained = HED/BSDS500-trained weights) or "small" (never pretrained).

    Raises ValueError for an unknown name, or for "small" with pretrained=True (it has no weights,
    and silently ignoring the request would hide a configuration mistake).
    """
    if name == "vgg16":
        model = VGG16(num_blocks=num_blocks)
        return model.load_hed_weights(cache_dir) if pretrained else model
    if name == "small":
        if pretrained:
            raise ValueError("backbone 'small' has no pretrained weights; use pretrained=False or 'vgg16'")
        return SmallBackbone(num_blocks=num_blocks)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_CHOICES)}")
