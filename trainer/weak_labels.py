"""Weak labels (tags, boxes, scribbles, points) derived from a dense mask.

One code path serves PASCAL VOC and the texture mosaic, so the supervision levels mean the
same thing on both. A *region* is a connected component (8-connected) of one class in the
mask; ignore pixels (255) belong to no region, and components smaller than `min_region_area`
pixels are skipped (annotators do not click on slivers).

- tags: the set of *object* classes present (the background class is never a tag, see
  `image_tags`); every pixel stays unlabelled.
- points: `points_per_region` pixels per region, drawn from its interior (pixels whose distance
  to the region border is at least half the region's largest), like a click in the middle.
- scribbles: per region, the longest path through the region's skeleton is the "full scribble";
  a contiguous random piece of it, `scribble_length` of its length, is drawn
  `2 * scribble_radius + 1` pixels thick (clipped to the region). SPML's scribble-length study
  shortens the ScribbleSup strokes the same way.
- boxes: a tight box per region (background regions get none when `background_class` is set);
  a pixel takes the class of the smallest box that contains it, pixels outside every box take
  `background_class` (or stay unlabelled when it is None, or when the mask says ignore).
- full: the mask itself.

Annotations are fixed per image in reality, so derive them once per image (e.g. with
`rng_for_image(seed, image_id)`) rather than re-drawing them every epoch.
"""

import logging
import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components
from skimage.morphology import disk, skeletonize

from segsearch.errors import DatasetError
from segsearch.trainer.sample import IGNORE_INDEX

logger = logging.getLogger(__name__)

KINDS = ("tags", "boxes", "scribbles", "points", "full")
Box = tuple[int, int, int, int, int]
"""(class, x0, y0, x1, y1), end-exclusive pixel coordinates."""

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class WeakLabelConfig:
    """Which supervision to simulate and how much of it.

    scribble_length: fraction (0, 1] of each region's full scribble that is kept.
    scribble_radius: half-thickness of a scribble in pixels (0 = one pixel wide).
    points_per_region: clicks per region; point_radius > 0 grows each click into a disk.
    background_class: the class that fills everything outside objects (VOC: 0; mosaic: None).
        It gets no boxes and labels the pixels outside all boxes.
    min_region_area: connected components smaller than this many pixels are skipped.
    """

    kind: str = "scribbles"
    scribble_length: float = 1.0
    scribble_radius: int = 1
    points_per_region: int = 1
    point_radius: int = 0
    background_class: int | None = None
    min_region_area: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DatasetError(f"weak label kind must be one of {KINDS}, got {self.kind!r}")
        if not 0.0 < self.scribble_length <= 1.0:
            raise DatasetError(f"scribble_length must lie in (0, 1], got {self.scribble_length}")
        if self.points_per_region < 1:
            raise DatasetError(f"points_per_region must be >= 1, got {self.points_per_region}")
        if self.scribble_radius < 0 or self.point_radius < 0 or self.min_region_area < 1:
            raise DatasetError("scribble_radius and point_radius must be >= 0, min_region_area >= 1")


@dataclass
class WeakLabels:
    """What an annotator would have given for one image.

    tags: `(C,)` bool, object classes present in the image; the background class is always
        False (see `image_tags`).
    pixel_labels: `(H, W)` int64 class per labelled pixel, IGNORE_INDEX (255) elsewhere.
    boxes: `(class, x0, y0, x1, y1)` per box, end-exclusive; empty unless kind is "boxes".
    """

    tags: np.ndarray
    pixel_labels: np.ndarray
    boxes: list[Box] = field(default_factory=list)


@dataclass(frozen=True)
class Region:
    """One connected component of one class.

    window: `(rows, cols)` slices of its bounding box in the image; local: `(h, w)` bool, the
    component inside that box. Work happens in the box, so small regions cost little.
    """

    class_index: int
    window: tuple[slice, slice]
    local: np.ndarray
    image_shape: tuple[int, int]

    @property
    def pixels(self) -> np.ndarray:
        """`(H, W)` bool: the component in image coordinates."""
        full = np.zeros(self.image_shape, dtype=bool)
        full[self.window] = self.local
        return full


def rng_for_image(seed: int, image_id: str) -> np.random.Generator:
    """A generator that depends only on `(seed, image_id)`: stable across runs and workers."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode("utf-8"))])


def make_weak_labels(
    mask: np.ndarray, num_classes: int, config: WeakLabelConfig, rng: np.random.Generator | None = None
) -> WeakLabels:
    """Weak labels of `config.kind` for a `(H, W)` class mask (255 = ignore).

    `rng` defaults to one seeded with `config.seed`; the same mask, config and generator
    state always give the same labels.
    """
    mask = _check_mask(mask, num_classes)
    rng = np.random.default_rng(config.seed) if rng is None else rng
    present = np.unique(mask[mask != IGNORE_INDEX])
    tags = image_tags(present, num_classes, config.background_class)
    labels = np.full(mask.shape, IGNORE_INDEX, dtype=np.int64)
    if config.kind == "full":
        return WeakLabels(tags, mask.copy())
    if config.kind == "tags":
        return WeakLabels(tags, labels)
    regions = find_regions(mask, present, config.min_region_area)
    if config.kind in ("points", "scribbles"):
        draw = _point_pixels if config.kind == "points" else _scribble_pixels
        for region in regions:
            # Strokes are drawn in a box one radius larger than the region so thickening fits.
            window, local = _grow_window(region, max(config.point_radius, config.scribble_radius))
            labels[window][draw(local, config, rng)] = region.class_index
        return WeakLabels(tags, labels)
    boxes = [_tight_box(r) for r in regions if r.class_index != config.background_class]
    return WeakLabels(tags, _paint_boxes(boxes, mask, config.background_class), boxes)


def image_tags(present: np.ndarray, num_classes: int, background_class: int | None) -> np.ndarray:
    """`(C,)` bool image tags from the classes present, without the background class.

    Why: relation O takes segments of images sharing a tag as positives and the rest as
    negatives. Every VOC image has background, so a background tag would make every pair of
    images share one: O would have no negatives and contribute exactly zero loss and gradient.
    SPML drops it the same way (`semantic_tag[:, 1:num_classes]` in its loss), and VOC's
    image-level labels name the 20 object classes only.
    """
    tags = np.zeros(num_classes, dtype=bool)
    tags[present] = True
    if background_class is not None:
        tags[background_class] = False
    return tags


def _check_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise DatasetError(f"a mask must be a 2-D integer array, got {mask.shape} {mask.dtype}")
    mask = mask.astype(np.int64, copy=False)
    bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= num_classes))
    if bad.any():
        raise DatasetError(
            f"mask holds values {np.unique(mask[bad])[:5].tolist()} outside [0, {num_classes}) and "
            f"the ignore value {IGNORE_INDEX}: check num_classes and the mask files"
        )
    return mask


def find_regions(mask: np.ndarray, classes: np.ndarray, min_area: int) -> list[Region]:
    """8-connected components of each class in `classes`, at least `min_area` pixels each."""
    regions = []
    for class_index in classes:
        components, count = ndimage.label(mask == class_index, structure=_EIGHT_CONNECTED)
        areas = np.bincount(components.ravel(), minlength=count + 1)
        for component, window in enumerate(ndimage.find_objects(components), start=1):
            if window is not None and areas[component] >= min_area:
                local = components[window] == component
                regions.append(Region(int(class_index), window, local, mask.shape))
    return regions


def _grow_window(region: Region, margin: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """The region's box grown by `margin` pixels (clipped to the image), and the region in it."""
    rows, cols = region.window
    height, width = region.image_shape
    grown = (
        slice(max(0, rows.start - margin), min(height, rows.stop + margin)),
        slice(max(0, cols.start - margin), min(width, cols.stop + margin)),
    )
    local = np.zeros((grown[0].stop - grown[0].start, grown[1].stop - grown[1].start), dtype=bool)
    top, left = rows.start - grown[0].start, cols.start - grown[1].start
    local[top : top + region.local.shape[0], left : left + region.local.shape[1]] = region.local
    return grown, local


def _point_pixels(region: np.ndarray, config: WeakLabelConfig, rng: np.random.Generator) -> np.ndarray:
    """`(H, W)` bool: `points_per_region` interior clicks, grown by `point_radius`."""
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(depth >= 0.5 * depth.max())
    chosen = rng.choice(len(ys), size=min(config.points_per_region, len(ys)), replace=False)
    clicks = np.zeros_like(region)
    clicks[ys[chosen], xs[chosen]] = True
    return _thicken(clicks, config.point_radius) & region


def _scribble_pixels(region: np.ndarray, config: WeakLabelConfig, rng: np.random.Generator) -> np.ndarray:
    """`(H, W)` bool: a random contiguous piece of the region's longest skeleton path."""
    path = longest_skeleton_path(region)
    keep = max(1, int(round(config.scribble_length * len(path))))
    start = int(rng.integers(len(path) - keep + 1))
    stroke = np.zeros_like(region)
    piece = path[start : start + keep]
    stroke[piece[:, 0], piece[:, 1]] = True
    return _thicken(stroke, config.scribble_radius) & region


def longest_skeleton_path(region: np.ndarray) -> np.ndarray:
    """`(L, 2)` (y, x) pixels of the longest path through the region's skeleton, in order.

    The skeleton is treated as an 8-connected graph; two breadth-first searches (from any
    node to the farthest node `a`, then from `a` to the farthest `b`) give the path a..b,
    exact on trees, which skeletons nearly are. Image borders count as region borders, so
    the path stays away from them.
    """
    skeleton = skeletonize(np.pad(region, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(skeleton)
    if len(ys) == 0:  # degenerate (e.g. a 1-pixel region): use the deepest pixel
        depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        return np.array([np.unravel_index(np.argmax(depth), region.shape)])
    graph = _pixel_graph(skeleton, ys, xs)
    order = breadth_first_order(graph, _largest_component_node(graph), directed=False, return_predecessors=False)
    far_a = order[-1]
    order, predecessors = breadth_first_order(graph, far_a, directed=False, return_predecessors=True)
    node, path = order[-1], []
    while node >= 0:
        path.append(node)
        node = predecessors[node]
    return np.stack([ys[path], xs[path]], axis=1)


def _pixel_graph(skeleton: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> coo_matrix:
    """Sparse adjacency of the skeleton pixels under 8-connectivity."""
    node_of = np.full(skeleton.shape, -1, dtype=np.int64)
    node_of[ys, xs] = np.arange(len(ys))
    height, width = skeleton.shape
    rows, cols = [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        neighbour = np.full(len(ys), -1, dtype=np.int64)
        neighbour[inside] = node_of[ny[inside], nx[inside]]
        linked = neighbour >= 0
        rows.append(np.nonzero(linked)[0])
        cols.append(neighbour[linked])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    return coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ys), len(ys))).tocsr()


def _largest_component_node(graph) -> int:
    """A node of the biggest connected piece of the skeleton (usually the only one)."""
    _, labels = connected_components(graph, directed=False)
    return int(np.argmax(labels == np.argmax(np.bincount(labels))))


def _thicken(pixels: np.ndarray, radius: int) -> np.ndarray:
    return ndimage.binary_dilation(pixels, structure=disk(radius).astype(bool)) if radius > 0 else pixels


def _tight_box(region: Region) -> Box:
    rows, cols = region.window  # find_objects boxes are already tight
    return (region.class_index, cols.start, rows.start, cols.stop, rows.stop)


def _paint_boxes(boxes: list[Box], mask: np.ndarray, background_class: int | None) -> np.ndarray:
    """`(H, W)` labels: each pixel gets the class of the smallest box holding it."""
    outside = IGNORE_INDEX if background_class is None else background_class
    labels = np.full(mask.shape, outside, dtype=np.int64)
    labels[mask == IGNORE_INDEX] = IGNORE_INDEX  # ignore pixels outside boxes stay unknown
    by_area_desc = sorted(boxes, key=lambda b: (-(b[3] - b[1]) * (b[4] - b[2]), b))
    for class_index, x0, y0, x1, y1 in by_area_desc:
        labels[y0:y1, x0:x1] = class_index
    return labels
