"""Region semantics of a query, as SPML's context-aware retrieval.

Embeddings are computed over the whole query image (so a region's vector carries its
context), then:

- a mask queries with the re-normalised mean embedding of its pixels. The embedding grid is
  coarser than the image (output stride 4), so each grid cell is weighted by how many of the
  region's pixels it covers (`grid_weights`): exactly the mean over the region's pixels of the
  embedding map upsampled by nearest neighbour, and a thin or tiny region still gets a vector;
- a box means "the thing in this box", as a box prompt does in SAM: the region of the image's
  region level (`spml.hierarchy`) that the box frames (`box_region`: of the regions lying
  mostly inside the box, the one with the most pixels in it), clipped to the box, queries
  (`clipped_region_vector`: a promptable segmenter's mask never leaves its box either; the
  part of a region outside the box is where it leaked into a neighbour). The box's own pixels
  take in the neighbours around the thing, which pulls the query towards them; when no region
  lies mostly inside the box (a box inside one large region), its pixels query as a mask does;
- a point queries with the region that contains it, in a cut of the same hierarchy 1.5 times
  finer than the region level (`point_region`; `analysis.POINT_CUT_FACTOR` says why): a click
  means the thing under it, not a sliver of it.

Coordinates. Regions are given in pixels of the image as sent (after EXIF orientation),
`size = (W, H)`; the model sees it resized so that the longest side is bounded
(`indexer.decode`), `(H', W')`. Masks are carried to the model's size by area averaging,
points by scaling pixel centres.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from segsearch.service.errors import InvalidArgument
from segsearch.spml.embedding import OUTPUT_STRIDE


@dataclass(frozen=True)
class Box:
    """End-exclusive pixel box."""

    x0: int
    y0: int
    x1: int
    y1: int


def check_box_not_empty(box: Box) -> None:
    if box.x1 <= box.x0 or box.y1 <= box.y0:
        raise InvalidArgument(
            f"region.box ({box.x0},{box.y0},{box.x1},{box.y1}) is empty: need x0 < x1 and y0 < y1 "
            "(end-exclusive pixels)")


def box_mask(box: Box, size: tuple[int, int]) -> np.ndarray:
    """Validated box -> boolean mask (H, W) of an image of `size` (W, H)."""
    width, height = size
    check_box_not_empty(box)
    if box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height:
        raise InvalidArgument(
            f"region.box ({box.x0},{box.y0},{box.x1},{box.y1}) is outside the {width}x{height} image "
            f"(need 0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height})")
    mask = np.zeros((height, width), dtype=bool)
    mask[box.y0:box.y1, box.x0:box.x1] = True
    return mask


def check_point(x: int, y: int, size: tuple[int, int]) -> None:
    width, height = size
    if not (0 <= x < width and 0 <= y < height):
        raise InvalidArgument(
            f"region.point ({x},{y}) is outside the {width}x{height} image (need 0 <= x < {width}, "
            f"0 <= y < {height})")


def check_mask(mask: np.ndarray) -> None:
    if not mask.any():
        raise InvalidArgument("region.mask_png selects no pixel (all zero); mark the region non-zero")


def coverage_at(mask: np.ndarray, model_size: tuple[int, int]) -> np.ndarray:
    """Fraction of each model-resolution pixel (H', W') covered by `mask` (H, W) (area average)."""
    height, width = model_size
    if mask.shape == (height, width):
        return mask.astype(np.float32)
    image = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BOX), dtype=np.float32)


def _cell_edges(pixels: int, cells: int) -> np.ndarray:
    """Start index of each of `cells` grid cells along an axis of `pixels` pixels."""
    if cells == -(-pixels // OUTPUT_STRIDE):
        return np.arange(cells) * OUTPUT_STRIDE
    return np.round(np.arange(cells) * pixels / cells).astype(int)


def grid_weights(coverage: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Covered pixels per embedding-grid cell, (h, w) float, from coverage (H', W')."""
    rows = np.add.reduceat(coverage, _cell_edges(coverage.shape[0], grid[0]), axis=0)
    return np.add.reduceat(rows, _cell_edges(coverage.shape[1], grid[1]), axis=1)


def region_vector(embeddings: torch.Tensor, mask: np.ndarray, model_size: tuple[int, int]) -> np.ndarray:
    """Unit-norm mean embedding (D,) of the region `mask` (H, W) of the image.

    embeddings: (D, h, w) unit-norm map of the image as the model saw it, at `model_size`
    (H', W'). The weighted sum is re-normalised (normalised sum = normalised mean).
    """
    check_mask(mask)
    _, grid_h, grid_w = embeddings.shape
    weights = grid_weights(coverage_at(mask, model_size), (grid_h, grid_w))
    if weights.sum() <= 0:
        raise InvalidArgument("the region covers no pixel of the image as the model sees it")
    vector = _normalised(_weighted_sum(embeddings, weights))
    if not np.isfinite(vector).all() or np.linalg.norm(vector) < 0.5:
        raise InvalidArgument("the region's embeddings cancel out (no direction to search for)")
    return vector


def _weighted_sum(embeddings: torch.Tensor, weights: np.ndarray) -> np.ndarray:
    """Σ weights[i, j] · embeddings[:, i, j] -> (D,) float64. On the CPU in numpy: a few hundred
    thousand multiply-adds, for which torch's intra-op thread pool costs more than the work
    when the server's request threads already keep the cores busy."""
    if embeddings.device.type == "cpu":
        values = embeddings.detach().float().numpy()
        return np.tensordot(values, weights.astype(np.float32), axes=([1, 2], [0, 1])).astype(np.float64)
    summed = (embeddings.float() * torch.from_numpy(weights).to(embeddings.device)).sum(dim=(1, 2))
    return summed.double().cpu().numpy()


def _normalised(summed: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(summed))
    return (summed / norm if norm > 0 else summed).astype(np.float32)


def point_in_model(x: int, y: int, size: tuple[int, int], model_size: tuple[int, int]) -> tuple[int, int]:
    """Pixel (x, y) of the image of `size` (W, H) -> (row, col) at model size (H', W')."""
    width, height = size
    model_h, model_w = model_size
    row = min(model_h - 1, int((y + 0.5) * model_h / height))
    col = min(model_w - 1, int((x + 0.5) * model_w / width))
    return row, col


def box_region(label_map: np.ndarray, box: np.ndarray, min_inside: float = 0.5) -> int | None:
    """The region a box frames: label_map (H', W') region index (-1: none), box (H', W') bool.

    Candidates are regions with at least `min_inside` of their pixels inside the box; the one
    with the most pixels inside wins. None when no region qualifies.
    """
    labels = label_map[label_map >= 0]
    if labels.size == 0:
        return None
    areas = np.bincount(labels)
    inside = np.bincount(label_map[box & (label_map >= 0)], minlength=areas.size)
    candidates = np.flatnonzero((areas > 0) & (inside >= min_inside * areas))
    if candidates.size == 0:
        return None
    return int(candidates[np.argmax(inside[candidates])])


def clipped_region_vector(leaf_map: np.ndarray, leaf_sums: np.ndarray, leaf_regions: np.ndarray,
                          region: int, box: np.ndarray) -> np.ndarray:
    """Unit-norm `(D,)` vector of region `region`'s part inside `box`, from its fine segments.

    leaf_map: `(H', W')` fine segment index (-1: none); leaf_sums: `(n, D)` each fine segment's
    embedding sum; leaf_regions: `(n,)` the region of each fine segment; box: `(H', W')` bool.
    Each fine segment of the region counts with the share of its pixels inside the box: no
    embedding map is needed, so a box on a cached image costs no forward pass. (Measured on
    the retrieval benchmark's boxes: the same precision as pooling the embeddings under region
    ∩ box exactly, 0.660 vs 0.661.)
    """
    valid = leaf_map >= 0
    total = np.bincount(leaf_map[valid], minlength=leaf_regions.size)
    inside = np.bincount(leaf_map[valid & box], minlength=leaf_regions.size)
    weights = np.where(leaf_regions == region, inside / np.maximum(total, 1), 0.0)
    if not weights.any():
        raise InvalidArgument("the box holds no pixel of the region it frames")
    return _normalised(weights @ leaf_sums.astype(np.float64))


def point_region(leaf_map: np.ndarray, leaf_sums: np.ndarray, leaf_point_regions: np.ndarray,
                 row: int, col: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The region under pixel (row, col): its unit-norm `(D,)` vector (the normalised sum of its
    fine segments' sums, i.e. its prototype) and its `(H', W')` bool mask; None when the pixel
    lies in no segment (the caller names the point as the client sent it).

    leaf_map: `(H', W')` fine segment index (-1: none); leaf_sums: `(n, D)`;
    leaf_point_regions: `(n,)` the region of each fine segment in the cut points use.
    """
    leaf = int(leaf_map[row, col])
    if leaf < 0:
        return None
    members = np.flatnonzero(leaf_point_regions == leaf_point_regions[leaf])
    vector = _normalised(leaf_sums[members].astype(np.float64).sum(axis=0))
    return vector, np.isin(leaf_map, members)


def upscale_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Boolean mask (H', W') -> (H, W) of `size` (W, H), nearest neighbour."""
    if mask.shape == (size[1], size[0]):
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    return np.asarray(image.resize(size, Image.Resampling.NEAREST)) > 127
