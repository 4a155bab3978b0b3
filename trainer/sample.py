"""One training or evaluation example, as every dataset of the trainer returns it.

Both the PASCAL VOC reader and the built-in texture mosaic yield `Sample`s, so that weak
labels, augmentation and evaluation have a single code path.
"""

from dataclasses import dataclass

import numpy as np

# Mask value of pixels that carry no class (VOC object borders, 'difficult' objects); defined
# in spml so that labels and pictures share one value.
from segsearch.spml.palette import IGNORE_INDEX  # noqa: F401


@dataclass
class Sample:
    """An RGB image with its dense class mask.

    image: `(H, W, 3)` uint8 RGB.
    mask: `(H, W)` int64 class indices in `[0, num_classes)`, `IGNORE_INDEX` where unknown.
    image_id: a stable name (VOC file stem, or `mosaic-<split>-<index>`), used to seed
        per-image weak labels and to name stored segments.
    valid: `(H, W)` bool, False on padding added to fit the image to a fixed size; None means
        every pixel is image content. Padding is *not* the same as an unlabelled (255) pixel:
        an unlabelled pixel is part of the picture and takes part in SPML's unsupervised
        relations, a padded one is nothing and must reach no segment and no loss.
    """

    image: np.ndarray
    mask: np.ndarray
    image_id: str
    valid: np.ndarray | None = None

    def valid_mask(self) -> np.ndarray:
        """`(H, W)` bool: True on image content (all True when no padding was recorded)."""
        return np.ones(self.mask.shape, dtype=bool) if self.valid is None else self.valid

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {self.image.shape} {self.image.dtype}")
        if self.mask.shape != self.image.shape[:2]:
            raise ValueError(f"mask shape {self.mask.shape} does not match image {self.image.shape[:2]}")
        if self.mask.dtype != np.int64:
            raise ValueError(f"mask must be int64, got {self.mask.dtype}")
        if self.valid is not None and (self.valid.shape != self.mask.shape or self.valid.dtype != bool):
            raise ValueError(f"valid must be a bool mask of shape {self.mask.shape}, got "
                             f"{self.valid.shape} {self.valid.dtype}")
