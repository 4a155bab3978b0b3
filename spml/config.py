"""The settings of the method's two inference-time steps, k-means over-segmentation and the
image -> segments path, as plain dataclasses with no torch import: command-line tools read
their defaults from here (`segsearch index --help` must not pay for importing torch), and
each default is written once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The SPML reference clusters training images from a 6x6 grid and test images from 12x12 (on
# 512-px crops). Ours starts inference from 8x8 on 80x80 embedding maps (stride 4 of 320 px):
# 64 segments per image, the setting every quality figure of bench/RESULTS.md was measured at.
TRAIN_GRID = (6, 6)
INFERENCE_GRID = (8, 8)


@dataclass(frozen=True)
class KMeansConfig:
    """Spherical k-means settings (SPML reference: 6x6 grid at training, 12x12 at inference;
    here `TRAIN_GRID` and `INFERENCE_GRID`).

    grid: (rows, cols) of the initial grid; ``K = rows * cols`` segments per image.
    iterations: rounds of assign + update (SPML: 10).
    coord_weight: scale of the ``yx in [-0.5, 0.5]`` coordinates concatenated to the unit
        embedding before re-normalising (SPML: 1.0). 0 clusters embeddings alone; about 1-2
        keeps segments compact and grid-like. Much larger values do *not* tend to a fixed
        grid: the coordinates are centred on the image, so after re-normalisation only
        their direction from the centre survives and segments become wedges.
    init: "cell_mean" (normalised mean of each grid cell's features, as SPML) or
        "cell_centre" (the feature of each cell's centre pixel).
    empty_cluster: "keep" (an empty cluster keeps its previous centroid) or "reseed"
        (it moves to its image's worst-fitting pixel).
    """

    grid: tuple[int, int] = TRAIN_GRID
    iterations: int = 10
    coord_weight: float = 1.0
    init: Literal["cell_mean", "cell_centre"] = "cell_mean"
    empty_cluster: Literal["keep", "reseed"] = "keep"

    def __post_init__(self) -> None:
        rows, cols = self.grid
        if rows < 1 or cols < 1:
            raise ValueError(f"grid must be two positive integers, got {self.grid}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.coord_weight < 0:
            raise ValueError(f"coord_weight must be >= 0, got {self.coord_weight}")
        if self.init not in ("cell_mean", "cell_centre"):
            raise ValueError(f"init must be 'cell_mean' or 'cell_centre', got {self.init!r}")
        if self.empty_cluster not in ("keep", "reseed"):
            raise ValueError(
                f"empty_cluster must be 'keep' or 'reseed', got {self.empty_cluster!r}"
            )

    @property
    def num_segments(self) -> int:
        """K = rows * cols."""
        return self.grid[0] * self.grid[1]




@dataclass(frozen=True)
class SegmenterConfig:
    """How images become segments (see the module docstring for each step).

    embed_size: side of the square network input E (the embedding map is E/4).
    grid / iterations / coord_weight: the spherical k-means settings (``K = rows * cols``).
    min_area_fraction: segments smaller than this fraction of the image are merged away
        (measured on the embedding map; refinement and snapping then move borders by a pixel
        or two, so a final segment may be slightly smaller).
    knn_k: neighbours in the label vote.
    refine_size: fine segments are assigned on a grid of at most this many pixels per side
        (and at most the image's own size) instead of the E/4 embedding map; 0 = no refinement
        (nearest-neighbour upsampling of the embedding-map segments). 160 = twice the 80x80
        map of a 320 px input: 320 cost 0.72x of the old indexing throughput on 512 px images,
        160 costs 0.93x (bench/RESULTS.md, "Segments: region hierarchy").
    snap_size: fine segment borders are moved onto the image's contours (`spml.snap`: a
        watershed on the edge map from each segment's core) on a grid of at most this many
        pixels per side; 0 = off. 320 = the network input's side, where the edge map is native.
    contour_weight: weight of the mean border contour (in [0, 1]) against the prototype
        dissimilarity (1 - cosine) in the region hierarchy's merge cost.
    merge_size_exponent: power of the size factor (harmonic mean of the two areas) in the
        merge cost; 0 = sizes play no part.
    region_height: the default region level, the hierarchy cut at this merge height.
    regions: build the region hierarchy and its default cut (True); False gives fine
        segments only, for an index that stores no regions (`segsearch index --fine-only`,
        and the baseline of the hierarchy's cost in `bench/index_speed.py`). A server always
        builds the hierarchy for its queries, whatever the index holds.

    contour_weight, merge_size_exponent and region_height were chosen on the mosaic *train*
    split by `bench/segment_quality.py --tune` (bench/RESULTS.md, "Segments: region hierarchy").
    """

    embed_size: int = 320
    grid: tuple[int, int] = INFERENCE_GRID
    iterations: int = 10
    coord_weight: float = 1.0
    min_area_fraction: float = 0.005
    knn_k: int = 20
    refine_size: int = 160
    snap_size: int = 320
    contour_weight: float = 2.0
    merge_size_exponent: float = 0.25
    region_height: float = 0.8
    regions: bool = True

    def __post_init__(self) -> None:
        if self.embed_size < 16:
            raise ValueError(f"embed_size must be >= 16, got {self.embed_size}")
        if not 0.0 <= self.min_area_fraction < 1.0:
            raise ValueError(f"min_area_fraction must be in [0, 1), got {self.min_area_fraction}")
        if self.knn_k < 1:
            raise ValueError(f"knn_k must be >= 1, got {self.knn_k}")
        if min(self.refine_size, self.snap_size, self.contour_weight, self.merge_size_exponent) < 0:
            raise ValueError("refine_size, snap_size, contour_weight and merge_size_exponent must be >= 0, got "
                             f"{self.refine_size}, {self.snap_size}, {self.contour_weight}, "
                             f"{self.merge_size_exponent}")
        self.kmeans()  # validates grid, iterations and coord_weight

    def kmeans(self) -> KMeansConfig:
        return KMeansConfig(grid=tuple(self.grid), iterations=self.iterations, coord_weight=self.coord_weight)
