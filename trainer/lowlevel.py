"""Contour regions for SPML's low-level image similarity relation (V).

Two region kinds (`REGION_METHODS`, chosen by `TrainConfig.contour_method`):

- "hierarchy" (`contour_hierarchy_regions`): an ultrametric-contour-map-like cut of
  the image's own contours. A fine compact watershed (below, `fine_segments` cells) is merged
  by `spml.hierarchy.build_hierarchy` -- the same merge machinery the segmenter uses at
  inference -- with the prototype term switched off (all leaves share one direction), so a
  merge costs exactly the mean edge strength along the shared border, as a UCM's boundary
  height. Cutting where that height exceeds `threshold` (then at most `max_regions`) gives
  regions that follow contours and whose number follows the image: one region for a flat
  image, more where strong contours close.
- "grid" (the default, as it measured better on the mosaic: bench/RESULTS.md, "Relation V
  from the image's contours"): the compact watershed from `num_segments` grid markers itself: a fixed number of cells whatever the image, so a large uniform texture is cut
  into cells that V pushes apart.

The fine watershed (both kinds):

SPML treats pixels of the same contour region (HED edges -> UCM regions in the paper) as
positives. Both kinds start from a *compact watershed* (Neubert & Protzel, 2014) on the HED
edge map, flooded from a regular grid of markers (the "grid" kind stops there):

- watershed on an edge map puts region boundaries on edge ridges, so segments follow strong
  edges (the property V needs: one segment should not straddle an object contour);
- grid markers give a predictable number of segments (~`num_segments`) whatever the image,
  unlike UCM thresholds or regional minima, whose counts swing with texture and noise;
- the compactness term keeps regions roughly cell-sized in flat areas, where the edge map
  carries no information, instead of letting one marker flood the whole flat region;
- each marker is moved to the lowest edge value near its grid point (as SLIC does), so a
  marker never sits on a contour, which would make its region straddle it;
- it is one pass of scikit-image, O(HW log HW), with no extra dependency (gPb-owt-ucm is not
  available offline and costs seconds per image).

Compactness scale: skimage's compact watershed floods by `edge value + compactness * distance
to the marker (pixels)`. Edges are in [0, 1], so a compactness of c lets a region grow
1/c pixels further to avoid crossing a full-strength edge: the default 1e-3 makes strong
edges (>~0.3) practically impassable at grid spacings below ~100 px while keeping flat
regions compact.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from skimage.segmentation import watershed

from segsearch.spml.hierarchy import build_hierarchy, cut_by_count, cut_by_height

logger = logging.getLogger(__name__)

DEFAULT_COMPACTNESS = 1e-3
REGION_METHODS = ("hierarchy", "grid")
DEFAULT_FINE_SEGMENTS = 144  # leaves of the hierarchy: a 12 x 12 grid of watershed cells
DEFAULT_THRESHOLD = 0.5  # UCM height (mean border edge strength) above which regions stay apart


def contour_segments(
    edges: np.ndarray, num_segments: int = 64, compactness: float = DEFAULT_COMPACTNESS
) -> np.ndarray:
    """Over-segment an image along its edges: `(H, W)` float edge map in [0, 1] -> `(H, W)` int32.

    Every pixel gets exactly one id; ids are contiguous `0..n-1` with `n <= num_segments`
    (close to it; smaller only for images with fewer pixels than segments).
    """
    edges = np.asarray(edges, dtype=np.float32)
    if edges.ndim != 2:
        raise ValueError(f"expected an (H, W) edge map, got shape {edges.shape}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    markers = grid_markers(edges, num_segments)
    labels = watershed(edges, markers=markers, compactness=compactness)
    _, contiguous = np.unique(labels, return_inverse=True)
    return contiguous.reshape(edges.shape).astype(np.int32)


def batch_contour_segments(
    edges: np.ndarray, num_segments: int = 64, compactness: float = DEFAULT_COMPACTNESS
) -> np.ndarray:
    """`(B, H, W)` edge maps -> `(B, H, W)` int32; ids are per image, each contiguous from 0."""
    edges = np.asarray(edges)
    if edges.ndim != 3:
        raise ValueError(f"expected (B, H, W) edge maps, got shape {edges.shape}")
    out = np.empty(edges.shape, dtype=np.int32)
    for index, edge_map in enumerate(edges):
        out[index] = contour_segments(edge_map, num_segments, compactness)
    return out


def grid_shape(height: int, width: int, num_segments: int) -> tuple[int, int]:
    """Rows x cols of a grid with ~num_segments cells of near-square shape, at most one per pixel."""
    rows = max(1, min(height, round(math.sqrt(num_segments * height / width))))
    cols = max(1, min(width, round(num_segments / rows)))
    return rows, cols


def grid_markers(edges: np.ndarray, num_segments: int) -> np.ndarray:
    """`(H, W)` int32 marker image: labels 1..K at grid points, each moved to the lowest edge
    value within a quarter cell of its grid point; 0 elsewhere."""
    height, width = edges.shape
    rows, cols = grid_shape(height, width, num_segments)
    centres_y = ((np.arange(rows) + 0.5) * height / rows).astype(int)
    centres_x = ((np.arange(cols) + 0.5) * width / cols).astype(int)
    radius_y = max(0, height // (4 * rows))
    radius_x = max(0, width // (4 * cols))
    markers = np.zeros(edges.shape, dtype=np.int32)
    label = 0
    for cy in centres_y:
        for cx in centres_x:
            y, x = _lowest_near(edges, cy, cx, radius_y, radius_x)
            if markers[y, x] == 0:  # two grid points may snap to the same pixel
                label += 1
                markers[y, x] = label
    return markers


def _lowest_near(edges: np.ndarray, cy: int, cx: int, ry: int, rx: int) -> tuple[int, int]:
    y0, x0 = max(0, cy - ry), max(0, cx - rx)
    window = edges[y0 : cy + ry + 1, x0 : cx + rx + 1]
    # A tiny pull towards the grid point breaks ties in flat areas (else argmin drifts top-left).
    yy, xx = np.ogrid[y0 : y0 + window.shape[0], x0 : x0 + window.shape[1]]
    cost = window + 1e-6 * ((yy - cy) ** 2 + (xx - cx) ** 2)
    dy, dx = np.unravel_index(int(np.argmin(cost)), window.shape)
    return y0 + int(dy), x0 + int(dx)


def contour_hierarchy_regions(
    edges: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    max_regions: int = 16,
    fine_segments: int = DEFAULT_FINE_SEGMENTS,
    compactness: float = DEFAULT_COMPACTNESS,
) -> np.ndarray:
    """Image-adaptive contour regions: `(H, W)` float edge map in [0, 1] -> `(H, W)` int32 ids
    `0..r-1`, `1 <= r <= max_regions`.

    Why a hierarchy over a fine watershed: the watershed puts every leaf boundary on an edge
    ridge (or, in flat areas, anywhere), and merging the pair with the weakest mean border
    first (`spml.hierarchy` with a zero prototype term, i.e. a UCM height) removes the
    arbitrary flat-area boundaries long before any real contour. Regions stay apart where the
    border's mean edge strength exceeds `threshold`; `max_regions` bounds the count (the
    strongest contours are kept), so a cluttered image does not turn V into a per-cell task.
    """
    edges = np.asarray(edges, dtype=np.float32)
    leaves = contour_segments(edges, fine_segments, compactness)
    num = int(leaves.max()) + 1
    tree = build_hierarchy(leaves, np.ones((num, 1)), edges, contour_weight=1.0)
    regions = cut_by_height(tree, threshold)
    if int(regions.max()) + 1 > max_regions:
        regions = cut_by_count(tree, max_regions)
    return regions[leaves].astype(np.int32)


def region_map(edges: np.ndarray, method: str, num_regions: int,
               threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """`(H, W)` edges -> `(H, W)` int32 V regions by `method` ("hierarchy": at most
    `num_regions` contour regions cut at `threshold`; "grid": ~`num_regions` watershed cells)."""
    if method == "hierarchy":
        return contour_hierarchy_regions(edges, threshold, max_regions=num_regions)
    if method == "grid":
        return contour_segments(edges, num_regions)
    raise ValueError(f"unknown contour method {method!r}; choose from {REGION_METHODS}")
