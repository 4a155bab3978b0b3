"""Binary masks <-> compact run-length encoding, and mask bounding boxes.

Why: a segment mask stored raw costs H*W bytes per segment; runs cost a few dozen integers
for the blob-like segments k-means produces, so the LMDB store stays small.

Encoding (the same convention as COCO's uncompressed RLE):
- the mask `(H, W)` is flattened in **column-major** (Fortran) order, i.e. pixel `(y, x)`
  is at position `x * H + y`;
- `counts` alternates run lengths of 0s and 1s, **starting with a run of 0s** (which is 0
  when the first pixel is set), so `sum(counts) == H * W` and runs at odd positions are
  foreground.
"""

from __future__ import annotations

import numpy as np


def encode_mask(mask: np.ndarray) -> list[int]:
    """Run-length encode a boolean mask `(H, W)` (column-major, first run = zeros)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    flat = mask.astype(bool).ravel(order="F")
    if flat.size == 0:
        return []
    # Positions where the value changes, plus both ends, delimit the runs.
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds)
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return [int(r) for r in runs]


def decode_mask(counts: list[int], shape: tuple[int, int]) -> np.ndarray:
    """Inverse of `encode_mask`: `counts` and `(H, W)` -> boolean mask `(H, W)`."""
    height, width = (int(shape[0]), int(shape[1]))
    runs = np.asarray(counts, dtype=np.int64)
    if runs.size and runs.min() < 0:
        raise ValueError("RLE counts must be non-negative")
    if int(runs.sum()) != height * width:
        raise ValueError(
            f"RLE counts sum to {int(runs.sum())} but the mask shape {height}x{width} "
            f"has {height * width} pixels"
        )
    values = np.zeros(runs.size, dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((height, width), order="F")


def mask_area(counts: list[int]) -> int:
    """Number of foreground pixels, read from the runs without decoding."""
    return int(sum(counts[1::2]))


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box `(x0, y0, x1, y1)` of a non-empty mask `(H, W)`; x1 and y1 are end-exclusive.

    Raises ValueError for an empty mask: a segment always has at least one pixel, so an empty
    one is a bug upstream rather than something to store.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask_box of an empty mask")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
