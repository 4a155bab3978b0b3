"""The embedding network: backbone hypercolumn + small head -> unit-norm pixel embeddings.

Why a hypercolumn at stride 4: our images are small (128-320 px), and stride 8 would leave a
16x16 map for a 128 px crop, too coarse for segments. Blocks 3-5 of the backbone (strides 4, 8,
16) are resampled to stride 4 and concatenated, so the head sees texture (block 3) and context
(block 5) together. The split `features()` / `embed_features()` lets the trainer cache the
frozen backbone's features once and train only the head.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from segsearch.spml.vgg import build_backbone

OUTPUT_STRIDE = 4


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network (stored in checkpoints)."""

    backbone: str = "vgg16"  # "vgg16" (HED-pretrained) or "small" (from scratch, tests)
    pretrained: bool = True
    feature_blocks: tuple[int, ...] = (3, 4, 5)  # 1-based backbone blocks in the hypercolumn
    hidden_dim: int = 128
    embedding_dim: int = 64
    num_classes: int = 0  # > 0 adds a 1x1 classifier (the cross-entropy baselines)
    class_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        values = dict(values)
        values["feature_blocks"] = tuple(values.get("feature_blocks", (3, 4, 5)))
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**values)


class EmbeddingHead(nn.Module):
    """(B, C, h, w) hypercolumn -> (B, D, h, w) raw embeddings (not yet normalised)."""

    def __init__(self, in_channels: int, hidden_dim: int, embedding_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 1),
            nn.GroupNorm(16, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1),
            nn.GroupNorm(16, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, embedding_dim, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class EmbeddingNet(nn.Module):
    """Images (B, 3, H, W) RGB in [0, 255] -> unit-norm embeddings (B, D, H/4, W/4)."""

    def __init__(self, config: ModelConfig, cache_dir=None):
        super().__init__()
        self.config = config
        num_blocks = max(config.feature_blocks)
        self.backbone = build_backbone(
            config.backbone, config.pretrained, num_blocks=num_blocks, cache_dir=cache_dir
        )
        channels = sum(self.backbone.block_channels[b - 1] for b in config.feature_blocks)
        self.head = EmbeddingHead(channels, config.hidden_dim, config.embedding_dim)
        self.classifier = (
            nn.Conv2d(config.embedding_dim, config.num_classes, 1) if config.num_classes else None
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> hypercolumn (B, C, ceil(H/4), ceil(W/4))."""
        return self.hypercolumn(self.backbone(images), images.shape[-2:])

    def hypercolumn(self, blocks: list[torch.Tensor], image_size) -> torch.Tensor:
        """The backbone's per-block features of images of `image_size` (H, W) -> hypercolumn
        (B, C, ceil(H/4), ceil(W/4))."""
        size = (-(-image_size[0] // OUTPUT_STRIDE), -(-image_size[1] // OUTPUT_STRIDE))
        resampled = [_resample(blocks[b - 1], size) for b in self.config.feature_blocks]
        return torch.cat(resampled, dim=1)

    def embed_with_blocks(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward` that also hands back the backbone's block features (inference reuses them
        for HED's side outputs instead of running VGG16 twice)."""
        blocks = self.backbone(images)
        return self.embed_features(self.hypercolumn(blocks, images.shape[-2:])), blocks

    def raw_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """Hypercolumn (B, C, h, w) -> un-normalised embeddings (B, D, h, w)."""
        return self.head(features)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Hypercolumn (B, C, h, w) -> unit-norm embeddings (B, D, h, w)."""
        return F.normalize(self.head(features), dim=1)

    def logits(self, raw_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> class logits (B, num_classes, h, w); only for CE baselines."""
        if self.classifier is None:
            raise RuntimeError("this model has no classifier (num_classes == 0)")
        return self.classifier(raw_embeddings)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.features(images))


def _resample(block: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool down or bilinearly upsample a block's features to `size`."""
    if block.shape[-2:] == size:
        return block
    if block.shape[-2] > size[0]:
        return F.adaptive_avg_pool2d(block, size)
    return F.interpolate(block, size=size, mode="bilinear", align_corners=False)
