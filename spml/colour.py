"""A soft CIELAB colour code per pixel: the colour statistics the edge-tuned backbone lacks.

Why: HED-VGG16's blocks 3-5 are tuned to edges and carry little absolute colour, and a head
trained to separate a few classes keeps even less of it. On classes the model never saw, a
plain colour histogram then beats the learned embedding (bench/RESULTS.md, "Retrieval on
unseen data"). A segment prototype is the *mean* of its pixel embeddings, so a pixel code
whose mean is a histogram turns the prototype into one: each pixel is softly assigned to a
`bins^3` grid of Lab centres (a Gaussian of one bin width), and mean-pooling those codes over
a segment gives its soft Lab histogram. Soft bins make near colours share mass (a hard 8x8x8
RGB histogram splits them), and Lab spaces colours as people see them.

Shapes: images (B, 3, H, W) RGB in [0, 255] -> codes (B, bins^3, H, W), unit L2 norm per pixel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# sRGB (D65) -> XYZ, and the D65 white point (IEC 61966-2-1, CIE 15)
_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])
_WHITE = torch.tensor([0.950456, 1.0, 1.088754])
# the Lab range the bins span: L in [0, 100]; a, b in [-60, 60] covers nearly all photographs
_LAB_LOW = (0.0, -60.0, -60.0)
_LAB_HIGH = (100.0, 60.0, 60.0)


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 255] -> (B, 3, H, W) CIELAB (L in [0, 100])."""
    rgb = images.float() / 255.0
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", _RGB_TO_XYZ.to(images.device), linear)
    xyz = xyz / _WHITE.to(images.device).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    lightness = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    b = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([lightness, a, b], dim=1)


def lab_code(images: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 255] -> (B, bins^3, H, W) soft Lab bin code, unit norm per pixel."""
    if bins < 2:
        raise ValueError(f"colour bins must be at least 2, got {bins}")
    lab = rgb_to_lab(images)
    low = torch.tensor(_LAB_LOW, device=images.device).view(1, 3, 1, 1)
    high = torch.tensor(_LAB_HIGH, device=images.device).view(1, 3, 1, 1)
    position = ((lab - low) / (high - low)).clamp(0, 1) * (bins - 1)  # (B, 3, H, W) in bin units
    centres = torch.arange(bins, device=images.device, dtype=position.dtype)
    weights = torch.exp(-0.5 * (position.unsqueeze(2) - centres.view(1, 1, bins, 1, 1)) ** 2)  # (B, 3, bins, H, W)
    code = (weights[:, 0, :, None, None] * weights[:, 1, None, :, None] * weights[:, 2, None, None, :])
    code = code.flatten(1, 3)  # (B, bins^3, H, W), L-major
    return F.normalize(code, dim=1)


def pooled_lab_code(images: torch.Tensor, bins: int, stride: int) -> torch.Tensor:
    """The code averaged over each stride x stride cell and re-normalised:
    (B, 3, H, W) -> (B, bins^3, ceil(H/stride), ceil(W/stride))."""
    pooled = F.avg_pool2d(lab_code(images, bins), stride, stride, ceil_mode=True)
    return F.normalize(pooled, dim=1)
