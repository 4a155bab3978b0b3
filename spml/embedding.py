"""The embedding network: backbone hypercolumn + small head -> unit-norm pixel embeddings.

Why a hypercolumn at stride 4: our images are small (128-320 px), and stride 8 would leave a
16x16 map for a 128 px crop, too coarse for segments. Blocks 3-5 of the backbone (strides 4, 8,
16) are resampled to stride 4 and concatenated, so the head sees texture (block 3) and context
(block 5) together. The split `features()` / `embed_features()` lets the trainer cache the
frozen backbone's features once and train only the head.

Two options make an embedding that generalises to classes the head never saw (measured in
bench/RESULTS.md, "An embedding that generalises"): `block_norm` L2-normalises each block per
pixel before the concatenation (raw HED block 5 activations are an order of magnitude larger
than block 3's and otherwise drown texture), and `colour_bins` appends a fixed soft Lab colour
code (`spml/colour.py`) to the learned part, holding `colour_weight` of each pixel
embedding's squared norm. The pixel embedding is then
`[sqrt(1 - w) * normalize(head(hypercolumn)), sqrt(w) * lab_code]`, unit norm, so a segment
prototype (their mean) carries the segment's soft colour histogram beside the learned part,
and cosine similarity of prototypes weighs the two by `w`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from segsearch.spml.colour import pooled_lab_code
from segsearch.spml.vgg import block_channels, build_backbone

OUTPUT_STRIDE = 4
HEAD_TYPES = ("mlp", "residual")


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
    block_norm: bool = False  # L2-normalise each block per pixel before concatenating
    colour_bins: int = 0  # > 0 appends a soft Lab code of colour_bins^3 bins (spml/colour.py)
    colour_weight: float = 0.0  # share of a pixel embedding's squared norm held by the colour code
    texture_blocks: tuple[int, ...] = ()  # untrained backbone blocks appended as a fixed part
    texture_weight: float = 0.0  # share of the squared norm held by that fixed texture part
    head_type: str = "mlp"  # "mlp", or "residual": a fixed PCA projection plus a learned correction

    def __post_init__(self) -> None:
        self.texture_blocks = tuple(self.texture_blocks)
        if self.colour_bins and not 0.0 < self.colour_weight < 1.0:
            raise ValueError(f"colour_weight must lie in (0, 1) with a colour code, got {self.colour_weight}")
        if self.texture_blocks and not 0.0 < self.texture_weight < 1.0:
            raise ValueError(f"texture_weight must lie in (0, 1) with texture blocks, got {self.texture_weight}")
        if self.head_weight <= 0.0:
            raise ValueError(f"colour_weight + texture_weight must stay below 1, got "
                             f"{self.colour_weight} + {self.texture_weight}")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {self.head_type!r}")
        if self.colour_bins and self.num_classes:
            raise ValueError("the cross-entropy baselines (num_classes > 0) take no colour code")

    @property
    def colour_dim(self) -> int:
        return self.colour_bins ** 3 if self.colour_bins else 0

    @property
    def head_weight(self) -> float:
        """Share of a pixel embedding's squared norm held by the learned head's part."""
        return 1.0 - (self.colour_weight if self.colour_bins else 0.0) - (
            self.texture_weight if self.texture_blocks else 0.0)

    @property
    def texture_dim(self) -> int:
        channels = block_channels(self.backbone)
        return sum(channels[b - 1] for b in self.texture_blocks)

    @property
    def output_dim(self) -> int:
        """Length of a pixel embedding and of a prototype: the head's D, the fixed texture
        part and the colour code, in that order."""
        return self.embedding_dim + self.texture_dim + self.colour_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        values = dict(values)
        values["feature_blocks"] = tuple(values.get("feature_blocks", (3, 4, 5)))
        values["texture_blocks"] = tuple(values.get("texture_blocks", ()))
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


class ResidualHead(nn.Module):
    """(B, C, h, w) hypercolumn -> (B, D, h, w): a fixed projection onto the hypercolumn's D
    principal directions plus a learned correction that starts at zero.

    Why: an MLP head trained on a few hundred classes keeps only what separates them, and on
    pictures it never saw retrieves worse than the untrained features it was given
    (bench/RESULTS.md). Starting from the PCA projection (`projection` (D, C), the top
    eigenvectors of the uncentred second moment of training pixels' hypercolumns, set by the
    trainer with `set_projection`) the head begins as a generic descriptor, and SPML's loss
    moves it only as far as the relations ask; the correction's last layer is zero at
    initialisation, so step 0 is exactly the projection."""

    def __init__(self, in_channels: int, hidden_dim: int, embedding_dim: int):
        super().__init__()
        self.register_buffer("projection", torch.zeros(embedding_dim, in_channels))
        self.correction = EmbeddingHead(in_channels, hidden_dim, embedding_dim)
        nn.init.zeros_(self.correction.layers[-1].weight)
        nn.init.zeros_(self.correction.layers[-1].bias)

    def set_projection(self, pixels: torch.Tensor) -> None:
        """`pixels` (N, C) hypercolumn samples -> `projection` := their top-D principal
        directions (uncentred: cosine similarity of the projected vectors then approximates
        that of the hypercolumns). Signs are fixed (largest entry positive) so the result is
        deterministic."""
        moment = pixels.double().T @ pixels.double() / max(1, pixels.shape[0])
        _, vectors = torch.linalg.eigh(moment)  # ascending eigenvalues
        top = vectors[:, -self.projection.shape[0]:].flip(1).T  # (D, C)
        signs = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
        self.projection.copy_((top * signs).to(self.projection.dtype))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = torch.einsum("dc,bchw->bdhw", self.projection, features)
        return projected + self.correction(features)


class EmbeddingNet(nn.Module):
    """Images (B, 3, H, W) RGB in [0, 255] -> unit-norm embeddings (B, output_dim, H/4, W/4)."""

    def __init__(self, config: ModelConfig, cache_dir=None):
        super().__init__()
        self.config = config
        num_blocks = max(config.feature_blocks + config.texture_blocks)
        if config.backbone == "vgg16" and config.pretrained:
            num_blocks = 5  # all of HED's blocks: inference reads its contours from them (spml/edges.py)
        self.backbone = build_backbone(
            config.backbone, config.pretrained, num_blocks=num_blocks, cache_dir=cache_dir
        )
        channels = sum(self.backbone.block_channels[b - 1] for b in config.feature_blocks)
        self.head_channels = channels  # the hypercolumn; a colour code follows it in `features`
        head_class = ResidualHead if config.head_type == "residual" else EmbeddingHead
        self.head = head_class(channels, config.hidden_dim, config.embedding_dim)
        self.classifier = (
            nn.Conv2d(config.embedding_dim, config.num_classes, 1) if config.num_classes else None
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> features (B, C + T + K, ceil(H/4), ceil(W/4)): the hypercolumn (C
        channels), then the fixed texture part (T: `texture_blocks`, each block unit per pixel, then the part unit) and the
        colour code (K = colour_bins^3), when configured. This is what the trainer caches."""
        return self.hypercolumn(self.backbone(images), images)

    def hypercolumn(self, blocks: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """The backbone's per-block features of `images` (B, 3, H, W) -> features
        (B, C + T + K, ceil(H/4), ceil(W/4)) as `features` returns them."""
        size = (-(-images.shape[-2] // OUTPUT_STRIDE), -(-images.shape[-1] // OUTPUT_STRIDE))
        resampled = [_resample(blocks[b - 1], size) for b in self.config.feature_blocks]
        if self.config.block_norm:
            resampled = [F.normalize(block, dim=1) for block in resampled]
        if self.config.texture_blocks:
            texture = torch.cat([F.normalize(_resample(blocks[b - 1], size), dim=1)
                                 for b in self.config.texture_blocks], dim=1)
            resampled.append(F.normalize(texture, dim=1))
        if self.config.colour_bins:
            resampled.append(pooled_lab_code(images, self.config.colour_bins, OUTPUT_STRIDE))
        return torch.cat(resampled, dim=1)

    def embed_with_blocks(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward` that also hands back the backbone's block features (inference reuses them
        for HED's side outputs instead of running VGG16 twice)."""
        blocks = self.backbone(images)
        return self.embed_features(self.hypercolumn(blocks, images)), blocks

    def raw_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, C + T + K, h, w) -> un-normalised embeddings (B, output_dim, h, w).

        With fixed parts (texture T, colour K) the head's part is normalised here, so that each
        part holds exactly its weight of the (then unit) squared norm."""
        config = self.config
        head = self.head(features[:, : self.head_channels])
        if not (config.colour_bins or config.texture_blocks):
            return head
        parts = [config.head_weight ** 0.5 * F.normalize(head, dim=1)]
        fixed = features[:, self.head_channels:]  # (texture_dim + colour_dim) channels, each part unit
        if config.texture_blocks:
            parts.append(config.texture_weight ** 0.5 * fixed[:, : config.texture_dim])
        if config.colour_bins:
            parts.append(config.colour_weight ** 0.5 * fixed[:, config.texture_dim:])
        return torch.cat(parts, dim=1)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, C + T + K, h, w) -> unit-norm embeddings (B, output_dim, h, w)."""
        return F.normalize(self.raw_embeddings(features), dim=1)

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
