"""Batched segmentation for indexing: images -> segments with masks, prototypes and labels.

One batch of `B` images of any sizes goes through:

1. **resize** each image to one fixed square `embed_size x embed_size` (bilinear, PIL). The
   aspect ratio is *not* preserved: a batch must be one `(B, 3, E, E)` tensor, and padding
   would spend the forward pass on pixels that are not there. The stretch is undone in step
   4, because the segment maps are resized back to each image's own size.
2. **embed** the batch in one forward pass: unit-norm embeddings `(B, D, E/4, E/4)`.
3. **over-segment** with batched spherical k-means (`spml.kmeans`, grid initialisation,
   `config.grid`, default 8x8 = up to 64 segments per image), then per image:
   **tiny segments** (fewer than `min_area_fraction` of the image's pixels at embedding
   resolution) are merged, smallest first, into the neighbouring segment with which they
   share the longest border (4-connected pixel pairs; ties go to the lower segment index);
   a merged segment that is still tiny is considered again. A tiny segment with no
   neighbour at all (it would have to be alone in the image, so in practice never) is
   dropped, and its pixels belong to no segment (-1 in `label_map`).
   **prototypes**: the re-normalised mean embedding of each final segment (over its
   embedding-map pixels), `(D,)`.
4. **borders below the stride** (`spml.refine`): the k-means centroids are re-assigned on a
   finer grid (each side at most `refine_size` and the image's own), from bilinearly
   upsampled embeddings in the k-means space; the tiny-segment rule's outcome is applied to
   those ids. That grid is resized (nearest, pixel-centre aligned) to the image's `(H, W)`;
   masks, boxes and area fractions are measured there. A segment absent from the finer grid
   is left out. (`refine_size=0`: the embedding map itself, nearest-upsampled, as before.)
   **Borders on the contours** (`spml.snap`): on a grid of at most `snap_size` per side, each
   segment keeps its core and the band between cores is flooded by a watershed on the edge
   map, so borders settle on the image's contours (`snap_size=0`: off).
5. **region hierarchy** (`spml.hierarchy`): the final (fine) segments are merged
   agglomeratively by prototype dissimilarity plus the mean contour (`spml.edges`: HED side
   outputs of the model's own backbone, or Sobel) along their shared border, measured on
   the embedding map (so a merge height means the same at every image size); the default cut at `region_height` is the **region level**, and
   `Segmenter.regions_at` gives the cut at any count (`regions=False`: no hierarchy, fine
   segments only).
6. **label** every fine segment and region by k-NN vote among the checkpoint's labelled
   training prototypes (`spml.label_vote.open_set_vote`): `label_score` is the winning class's
   share of the k votes, in (0, 1]; a segment the bank does not cover (nearest labelled
   prototype below the bank's calibrated `min_similarity`, or a share below its `min_share`)
   gets the empty label and `label_score` 0.

Steps 1-2 (with the edge map), the k-means and the finer assignment of steps 3-4 run on the
model's device (CUDA when the model is there; the same code on CPU) in `Segmenter.cluster`,
which hands back only the k-means ids, the embedding sum of each k-means segment and, per
image, the finer ids and edges; the rest (`Segmenter.finish`) is bookkeeping over a few dozen
segments per image in numpy (a merged segment's prototype is the normalised sum of its parts'
sums, exactly the normalised mean), plus the label vote on the model's device. The split lets
the pipeline run `finish` of batch i in a thread while batch i+1 is embedded. `StageTimes`
accumulates the seconds spent per stage (embed, segment, label here; decode and store are
added by the pipeline).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from segsearch.spml.checkpoint import LabelBank
from segsearch.spml.config import SegmenterConfig
from segsearch.spml.edges import edge_function, resize_edges
from segsearch.spml.embedding import EmbeddingNet
from segsearch.spml.hierarchy import RegionTree, build_hierarchy, cut_by_count, cut_by_height, region_sums
from segsearch.spml.kmeans import spherical_kmeans
from segsearch.spml.label_vote import NO_LABEL, open_set_vote
from segsearch.spml.prototypes import NORM_EPS, segment_sums
from segsearch.spml.refine import assign_finer, finer_size
from segsearch.spml.snap import edges_on_grid, snap_band, snap_grid, snap_to_edges

DROPPED = -1  # label_map value of pixels that belong to no segment


@dataclass
class StageTimes:
    """Seconds spent per indexing stage, accumulated over batches."""

    decode: float = 0.0
    embed: float = 0.0
    segment: float = 0.0
    label: float = 0.0
    store: float = 0.0

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    @contextmanager
    def measure(self, stage: str, device: torch.device | None = None) -> Iterator[None]:
        """Add the wall time of the block to `stage`; on CUDA, wait for queued kernels first."""
        _synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(device)
            with self._lock:  # the pipeline measures from two threads
                setattr(self, stage, getattr(self, stage) + time.perf_counter() - start)


@dataclass(eq=False)
class Segment:
    """One segment of one image, in that image's pixels.

    box: `(x0, y0, x1, y1)` end-exclusive; area_fraction: its pixels / all pixels;
    prototype: unit-norm `(D,)` float32; label / label_score: k-NN vote and its share, or
    "" and 0 where the label bank does not cover the segment (`spml.label_vote.open_set_vote`).
    `index` is its value in the image's `label_map`; `mask` is computed from it on demand.
    """

    index: int
    box: tuple[int, int, int, int]
    area_fraction: float
    prototype: np.ndarray
    label: str
    label_score: float
    label_map: np.ndarray = field(repr=False)

    @property
    def mask(self) -> np.ndarray:
        """`(H, W)` bool."""
        return self.label_map == self.index


@dataclass(eq=False)
class RegionLevel:
    """One cut of an image's region hierarchy: `label_map` `(H, W)` int32 region index (0..r-1,
    -1 where the fine level has -1), `segments` the regions (prototype = normalised sum of
    their fine segments' embedding sums, label by the same k-NN vote), `leaf_regions` `(n,)`
    int64 the region of each fine segment."""

    label_map: np.ndarray
    segments: list[Segment]
    leaf_regions: np.ndarray


@dataclass(eq=False)
class ImageSegments:
    """The segments of one image; `label_map` `(H, W)` int32 holds each pixel's segment index
    (0..n-1, in the order of `segments`) or -1 for pixels of a dropped segment.

    These fine segments are the leaves `0..n-1` of `tree` (`spml.hierarchy.RegionTree`:
    parents and merge heights); `leaf_sums` `(n, D)` float64 are their embedding sums (any
    cut's prototypes follow exactly); `regions` is the default cut (`SegmenterConfig.region_height`).
    """

    label_map: np.ndarray
    segments: list[Segment]
    tree: RegionTree | None = None
    leaf_sums: np.ndarray | None = None
    regions: RegionLevel | None = None

    @property
    def parents(self) -> np.ndarray:
        """`(2n - 1,)` the hierarchy's parent of each node (leaves first; -1: the root)."""
        return self.tree.parents

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.label_map.shape[0]), int(self.label_map.shape[1])

    def masks_rle(self) -> list[list[int]]:
        """Each segment's mask in `indexer.rle` format, from one pass over the label map."""
        return label_map_rles(self.label_map, len(self.segments))


@dataclass
class ClusteredBatch:
    """What `Segmenter.cluster` hands to `Segmenter.finish`, all on the CPU.

    segment_ids: `(B, h, w)` int64 k-means ids; sums: `(B, K, D)` float32 embedding sum per
    k-means segment; shapes: each image's `(H, W)`; finer_ids: per image `(H', W')` int64
    k-means ids on the refined grid (`spml.refine`); edges: per image `(h, w)` float32
    contour strength in [0, 1] on the embedding map (max-pooled, so thin contours survive);
    snap_edges: per image `(H'', W'')` float32 contour strength on the grid the fine borders
    are snapped on (`spml.snap`), or None when snapping is off.
    """

    segment_ids: np.ndarray
    sums: np.ndarray
    shapes: list[tuple[int, int]]
    finer_ids: list[np.ndarray]
    edges: list[np.ndarray]
    snap_edges: list[np.ndarray | None]


class Segmenter:
    """A model, its label bank and class names, ready to segment batches on the model's device."""

    def __init__(self, model: EmbeddingNet, label_bank: LabelBank | None, config: SegmenterConfig,
                 class_names: Sequence[str] | None = None) -> None:
        self.model = model.eval()
        self.config = config
        self.device = next(model.parameters()).device
        self.class_names = list(class_names if class_names is not None else model.config.class_names)
        self.bank = None
        self.num_classes = len(self.class_names)
        if label_bank is not None and label_bank.prototypes.shape[0] > 0:
            self.bank = replace(label_bank, prototypes=label_bank.prototypes.to(self.device).float(),
                                labels=label_bank.labels.to(self.device))
            self.num_classes = max(self.num_classes, int(label_bank.labels.max()) + 1)
        hed = model.config.backbone == "vgg16" and model.config.pretrained
        self._edges = edge_function(model.backbone, hed_weights=hed)

    def __call__(self, images: Sequence[np.ndarray], resized: Sequence[np.ndarray] | None = None,
                 timings: StageTimes | None = None) -> list[ImageSegments]:
        """Segment `images` (each `(H, W, 3)` uint8). `resized`: the same images already passed
        through `resize_for_embedding` (lets the pipeline do it in its decode threads)."""
        if not images:
            return []
        return self.finish(self.cluster(images, resized, timings), timings)

    def cluster(self, images: Sequence[np.ndarray], resized: Sequence[np.ndarray] | None = None,
                timings: StageTimes | None = None) -> ClusteredBatch:
        """The device half: embed and k-means the batch; only small arrays come back to the CPU."""
        timings = timings if timings is not None else StageTimes()
        size = self.config.embed_size
        shapes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
        with timings.measure("embed", self.device):
            inputs = resized if resized is not None else [resize_for_embedding(im, size) for im in images]
            embeddings, edges = self.embed_with_edges(inputs)
        with timings.measure("segment", self.device):
            ids, sums, finer, finer_edges = self._kmeans(embeddings, edges, shapes)
            snap_edges = [edges_on_grid(edges[index], snap_grid(shape, self.config.snap_size))
                          if self.config.snap_size else None for index, shape in enumerate(shapes)]
        return ClusteredBatch(ids, sums, shapes, finer, finer_edges, snap_edges)

    def finish(self, clustered: ClusteredBatch, timings: StageTimes | None = None) -> list[ImageSegments]:
        """The host half: tiny-segment rule, prototypes, full-size maps, the region hierarchy
        and its default cut, then the label vote (fine segments and regions in one call).

        Safe to run in another thread while `cluster` works on the next batch (the pipeline
        overlaps them that way)."""
        timings = timings if timings is not None else StageTimes()
        with timings.measure("segment"):
            drafts = [self._draft(*parts) for parts in zip(clustered.segment_ids, clustered.sums,
                                                           clustered.finer_ids, clustered.edges,
                                                           clustered.snap_edges, clustered.shapes)]
        with timings.measure("label", self.device):
            levels = [level for draft in drafts for level in (draft.fine, draft.regions) if level is not None]
            labelled = iter(self._label_levels(levels))
        return [_image_segments(draft, next(labelled), next(labelled) if draft.regions is not None else None)
                for draft in drafts]

    def regions_at(self, result: ImageSegments, count: int) -> RegionLevel:
        """The cut of `result`'s hierarchy into `count` regions (fewer when the image has fewer
        fine segments), labelled by the same vote."""
        if result.tree is None:
            raise ValueError("these segments have no region hierarchy (segmented with SegmenterConfig.regions off)")
        leaf_regions = cut_by_count(result.tree, count)
        level = _region_draft(result.label_map, leaf_regions, result.leaf_sums, result.shape)
        (segments,) = self._label_levels([level])
        return RegionLevel(level.layout.label_map, segments, leaf_regions)

    @torch.inference_mode()
    def embed(self, inputs: Sequence[np.ndarray]) -> torch.Tensor:
        """`(B, E, E, 3)` uint8, already passed through `resize_for_embedding` -> unit-norm
        embeddings `(B, D, E/4, E/4)` float32 on the model's device (a region query needs
        them, not the k-means)."""
        batch = torch.from_numpy(np.stack(inputs)).to(self.device, non_blocking=True)
        return self.model(batch.permute(0, 3, 1, 2).float())

    @torch.inference_mode()
    def embed_with_edges(self, inputs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """As `embed`, plus contour strength `(B, 1, E, E)` in [0, 1] (`spml.edges`: HED side
        outputs on the backbone's own blocks, or Sobel)."""
        batch = torch.from_numpy(np.stack(inputs)).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        embeddings, blocks = self.model.embed_with_blocks(batch)
        return embeddings, self._edges(batch, blocks)

    @torch.inference_mode()
    def _kmeans(self, embeddings: torch.Tensor, edges: torch.Tensor, shapes: list[tuple[int, int]]):
        """Embeddings `(B, D, h, w)` and edges `(B, 1, E, E)` -> on the CPU: k-means ids
        `(B, h, w)` int64, embedding sums per segment `(B, K, D)` float32 (the host builds
        the prototype of any merge of segments from them exactly), and per image the k-means
        ids on the refined grid (`spml.refine.finer_size`) and edges on the embedding map."""
        kmeans = self.config.kmeans()
        result = spherical_kmeans(embeddings, kmeans)
        ids = result.segment_ids
        sums = segment_sums(embeddings.float(), ids, kmeans.num_segments)
        finer, finer_edges = [], []
        for index, shape in enumerate(shapes):
            size = finer_size(shape, self.config.refine_size, tuple(ids.shape[-2:]))
            if size == tuple(ids.shape[-2:]):
                finer.append(ids[index].cpu().numpy())
            else:
                finer.append(assign_finer(embeddings[index], result.centroids[index], result.valid[index],
                                          size, kmeans.coord_weight).cpu().numpy())
            finer_edges.append(resize_edges(edges[index].float(), tuple(ids.shape[-2:])).cpu().numpy()
                               .astype(np.float32))
        return ids.cpu().numpy(), sums.cpu().numpy(), finer, finer_edges

    def _draft(self, ids, sums, finer_ids, edges, snap_edges, shape) -> "_Draft":
        """One image's host work: tiny-segment rule on the embedding map, fine level on the
        refined grid with its borders snapped to the contours (`spml.snap`), hierarchy over
        the fine segments, default cut.

        The hierarchy's borders and contours are measured on the embedding map (`edges` is
        at its resolution), whatever the image size, so one merge height means the same on
        every image: measured on the finer grid, a contour's mean along a border depends on
        the grid's size (thin HED lines vs max-pooled ones) and the tuned height would not
        carry over (bench/RESULTS.md, "Segments: region hierarchy")."""
        target = merge_targets(ids, sums.shape[0], self.config.min_area_fraction)
        fine_ids = target[finer_ids]
        if snap_edges is not None:
            grid = snap_edges.shape
            fine_ids = snap_to_edges(upsample_nearest(fine_ids, *grid), snap_edges, snap_band(grid, ids.shape))
        fine_layout = _layout(fine_ids, shape)
        leaf_sums = _merged_sums(sums, target)[fine_layout.ids]
        fine = _LevelDraft(fine_layout, _normalised(leaf_sums))
        leaf_of_id = np.full(sums.shape[0] + 1, DROPPED, dtype=np.int64)  # the last slot takes id -1
        leaf_of_id[fine_layout.ids] = np.arange(fine_layout.ids.size)
        if not self.config.regions:
            return _Draft(fine, None, None, leaf_sums, None)
        tree = build_hierarchy(leaf_of_id[target[ids]], leaf_sums, edges, self.config.contour_weight,
                               fine_layout.areas, self.config.merge_size_exponent)
        leaf_regions = cut_by_height(tree, self.config.region_height)
        regions = _region_draft(fine_layout.low_labels, leaf_regions, leaf_sums, shape)
        return _Draft(fine, regions, tree, leaf_sums, leaf_regions)

    def _label_levels(self, levels: list["_LevelDraft"]) -> list[list[Segment]]:
        """Label every segment of several levels in one k-NN vote; one Segment list per level."""
        prototypes = [level.prototypes for level in levels]
        stacked = np.concatenate(prototypes) if prototypes else np.zeros((0, 1), np.float32)
        labels, scores = self._label(stacked)
        out, offset = [], 0
        for level in levels:
            out.append(_segments(level, labels[offset:], scores[offset:]))
            offset += level.prototypes.shape[0]
        return out

    def _label(self, prototypes: np.ndarray) -> tuple[list[str], list[float]]:
        if prototypes.shape[0] == 0 or self.bank is None:
            return [""] * prototypes.shape[0], [0.0] * prototypes.shape[0]
        queries = torch.from_numpy(prototypes).to(self.device)
        labels, shares = open_set_vote(queries, self.bank, self.num_classes, k=self.config.knn_k)
        names = [self._class_name(i) for i in labels.tolist()]
        return names, shares.float().cpu().tolist()

    def _class_name(self, class_id: int) -> str:
        """The empty string for `NO_LABEL` (the bank does not cover the segment), else the name."""
        if class_id == NO_LABEL:
            return ""
        return self.class_names[class_id] if class_id < len(self.class_names) else str(class_id)


def segment_images(model: EmbeddingNet, label_bank: LabelBank | None, images: Sequence[np.ndarray],
                   config: SegmenterConfig | None = None, timings: StageTimes | None = None
                   ) -> list[ImageSegments]:
    """Segment a batch of `(H, W, 3)` uint8 RGB images (any sizes) in one forward pass.

    Class names come from `model.config.class_names` (the checkpoint's). See the module
    docstring for the steps; `timings` (if given) accumulates embed/segment/label seconds.
    """
    return Segmenter(model, label_bank, config or SegmenterConfig())(images, timings=timings)


def resize_for_embedding(image: np.ndarray, size: int) -> np.ndarray:
    """`(H, W, 3)` uint8 -> `(size, size, 3)` uint8, bilinear (antialiased when shrinking)."""
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.Resampling.BILINEAR)
    return np.array(resized)  # writable, so torch.from_numpy accepts it without a warning


def merge_small_segments(segment_ids: np.ndarray, num_segments: int, min_area_fraction: float) -> np.ndarray:
    """Apply the tiny-segment rule to one map `(h, w)` of ids in [0, K); returns int64 `(h, w)`.

    Segments with fewer than `min_area_fraction * h * w` pixels are merged, smallest first
    (ties: lower index), into the neighbour sharing the longest 4-connected border (ties:
    lower index), repeatedly until none is tiny; one with no neighbour becomes -1 (dropped).
    Surviving segments keep their original index.
    """
    ids = np.asarray(segment_ids, dtype=np.int64)
    return merge_targets(ids, num_segments, min_area_fraction)[ids]


def merge_targets(segment_ids: np.ndarray, num_segments: int, min_area_fraction: float) -> np.ndarray:
    """`(K,)` int64: the segment each of the K ids ends up in under the tiny-segment rule
    (itself if it survives, -1 if dropped); see `merge_small_segments`."""
    ids = np.asarray(segment_ids, dtype=np.int64)
    area = np.bincount(ids.ravel(), minlength=num_segments).astype(np.int64)
    target = np.arange(num_segments)
    threshold = min_area_fraction * ids.size
    if not np.any((area > 0) & (area < threshold)):
        return target
    border = _border_lengths(ids, num_segments)
    while True:
        tiny = np.flatnonzero((area > 0) & (area < threshold))
        if tiny.size == 0:
            return target
        small = int(tiny[np.argmin(area[tiny])])
        if border[small].max() == 0:
            target[target == small], area[small] = DROPPED, 0
            continue
        into = int(np.argmax(border[small]))
        area[into] += area[small]
        area[small] = 0
        border[into] += border[small]
        border[:, into] += border[:, small]
        border[small], border[:, small] = 0, 0
        border[into, into] = 0
        target[target == small] = into


def _merged_sums(sums: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-segment embedding sums `(K, D)` and merge targets `(K,)` -> sums `(K, D)` float64 of
    the merged segments, indexed by target id (zero rows for merged-away ids)."""
    merged = np.zeros_like(sums, dtype=np.float64)
    keep = target >= 0
    np.add.at(merged, target[keep], sums[keep])
    return merged


def _normalised(sums: np.ndarray) -> np.ndarray:
    """`(n, D)` sums -> unit-norm float32 prototypes (exactly the normalised means)."""
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.maximum(norms, NORM_EPS)).astype(np.float32)


def _border_lengths(ids: np.ndarray, num: int) -> np.ndarray:
    """`(K, K)` symmetric counts of 4-connected pixel pairs between different segments."""
    pairs = []
    for a, b in ((ids[:, :-1], ids[:, 1:]), (ids[:-1, :], ids[1:, :])):
        differ = a != b
        pairs.append(a[differ] * num + b[differ])
    counts = np.bincount(np.concatenate(pairs), minlength=num * num).reshape(num, num)
    return counts + counts.T


def upsample_nearest(low_res: np.ndarray, height: int, width: int) -> np.ndarray:
    """`(h, w)` -> `(height, width)`, nearest neighbour with pixel centres aligned (also to a
    smaller size)."""
    rows = _source_index(height, low_res.shape[0])
    cols = _source_index(width, low_res.shape[1])
    return low_res[rows[:, None], cols[None, :]]


def _source_index(size: int, low_size: int) -> np.ndarray:
    """For each of `size` output pixels, the low-res pixel whose centre is nearest `(size,)`."""
    return np.minimum((2 * np.arange(size) + 1) * low_size // (2 * size), low_size - 1)


class _Layout(NamedTuple):
    """A level's map at image size and its facts: label_map `(H, W)` int32 relabelled 0..n-1
    (-1 kept), ids `(n,)` the source ids of those n segments, boxes `(n, 4)`, areas `(n,)`
    (fractions), low_labels the source map relabelled the same way (its own resolution)."""

    label_map: np.ndarray
    ids: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    low_labels: np.ndarray


def _layout(low_res: np.ndarray, shape: tuple[int, int]) -> _Layout:
    """A map of ids (-1: none) at any resolution up to the image's -> its `_Layout` at `shape`.

    Areas and boxes are computed on the low-res map, each low-res pixel weighted by the
    number of full-res pixels it becomes (nearest upsampling repeats whole rows and columns),
    so the only full-size pass is the one that builds the label map.
    """
    height, width = int(shape[0]), int(shape[1])
    rows, cols = _source_index(height, low_res.shape[0]), _source_index(width, low_res.shape[1])
    weight = np.outer(np.bincount(rows, minlength=low_res.shape[0]), np.bincount(cols, minlength=low_res.shape[1]))
    valid = low_res >= 0
    counts = np.bincount(low_res[valid], weights=weight[valid], minlength=int(low_res.max(initial=-1)) + 1)
    ids = np.flatnonzero(counts > 0)
    relabel = np.full(counts.size + 1, DROPPED, dtype=np.int32)  # the last slot takes index -1
    relabel[ids] = np.arange(ids.size, dtype=np.int32)
    low_labels = relabel[low_res]
    label_map = low_labels[rows[:, None], cols[None, :]]
    boxes = _boxes(low_labels, weight > 0, rows, cols, ids.size)
    return _Layout(label_map, ids, boxes, counts[ids] / float(height * width), low_labels)


def _boxes(low_labels: np.ndarray, hit: np.ndarray, rows: np.ndarray, cols: np.ndarray, num: int) -> np.ndarray:
    """Tight end-exclusive boxes `(n, 4)` = (x0, y0, x1, y1) of segments 0..n-1 at full size,
    from the low-res labels, the low-res pixels that appear at full size (`hit`) and the
    full-size rows/cols -> low-res rows/cols maps."""
    keep = hit & (low_labels >= 0)
    low_y, low_x = np.nonzero(keep)
    labels = low_labels[keep]
    in_row = np.zeros((num, low_labels.shape[0]), dtype=bool)
    in_col = np.zeros((num, low_labels.shape[1]), dtype=bool)
    in_row[labels, low_y] = True
    in_col[labels, low_x] = True
    full_rows, full_cols = in_row[:, rows], in_col[:, cols]  # (n, H), (n, W)
    x0 = full_cols.argmax(axis=1)
    x1 = full_cols.shape[1] - full_cols[:, ::-1].argmax(axis=1)
    y0 = full_rows.argmax(axis=1)
    y1 = full_rows.shape[1] - full_rows[:, ::-1].argmax(axis=1)
    return np.stack([x0, y0, x1, y1], axis=1)


@dataclass
class _LevelDraft:
    """A level before labelling: its layout and unit prototypes `(n, D)` float32."""

    layout: _Layout
    prototypes: np.ndarray


@dataclass
class _Draft:
    """One image before labelling: fine level, default region level, tree, leaf sums `(n, D)`
    (regions, tree and leaf_regions are None when `SegmenterConfig.regions` is off)."""

    fine: _LevelDraft
    regions: _LevelDraft | None
    tree: RegionTree | None
    leaf_sums: np.ndarray
    leaf_regions: np.ndarray | None


def _region_draft(leaf_map: np.ndarray, leaf_regions: np.ndarray, leaf_sums: np.ndarray,
                  shape: tuple[int, int]) -> _LevelDraft:
    """A cut of the hierarchy as a level: `leaf_map` (fine segment 0..n-1 per pixel, -1 none,
    any resolution up to `shape`), `leaf_regions` `(n,)` region 0..r-1 of each fine segment."""
    lookup = np.append(leaf_regions, DROPPED)  # index -1 -> the last slot
    layout = _layout(lookup[leaf_map], shape)
    num = int(leaf_regions.max(initial=-1)) + 1
    return _LevelDraft(layout, _normalised(region_sums(leaf_sums, leaf_regions, num))[layout.ids])


def _segments(level: _LevelDraft, labels: Sequence[str], scores: Sequence[float]) -> list[Segment]:
    layout = level.layout
    return [Segment(index=n, box=tuple(int(v) for v in layout.boxes[n]), area_fraction=float(layout.areas[n]),
                    prototype=level.prototypes[n], label=labels[n], label_score=float(scores[n]),
                    label_map=layout.label_map)
            for n in range(layout.ids.size)]


def _image_segments(draft: _Draft, fine: list[Segment], regions: list[Segment] | None) -> ImageSegments:
    level = None if regions is None else RegionLevel(draft.regions.layout.label_map, regions, draft.leaf_regions)
    return ImageSegments(draft.fine.layout.label_map, fine, draft.tree, draft.leaf_sums, level)


def label_map_rles(label_map: np.ndarray, num: int) -> list[list[int]]:
    """RLE (`indexer.rle` format: column-major, first run = zeros) of `label_map == n` for
    each n in 0..num-1, from one pass over the map instead of one per segment."""
    flat = np.asarray(label_map).ravel(order="F")
    total = flat.size
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [total]))
    values = flat[starts]
    order = np.argsort(values, kind="stable")  # runs grouped by value, in position order
    sorted_values = values[order]
    bounds = np.searchsorted(sorted_values, np.arange(num + 1))
    rles = []
    for n in range(num):
        runs = order[bounds[n]:bounds[n + 1]]
        if runs.size == 0:
            rles.append([total])
            continue
        run_starts, run_ends = starts[runs], ends[runs]
        gaps = run_starts - np.concatenate(([0], run_ends[:-1]))
        counts = np.stack([gaps, run_ends - run_starts], axis=1).ravel()
        tail = total - int(run_ends[-1])
        rles.append(counts.tolist() + ([tail] if tail else []))
    return rles


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
