"""The built-in texture-mosaic segmentation set: deterministic, offline, real textures.

Each image is a partition of a `size x size` square into 2..5 irregular regions (a Voronoi
partition of random seeds, computed on coordinates warped by smooth random noise, so borders
wiggle). Every region is filled with a crop of one of scikit-image's bundled photographs;
the photograph is the region's class, and two regions of one image never share a class.

Train and test never see the same source pixels. Each source photograph is cut into two
column bands *before* anything is resized: the train band is columns `[0, ceil(0.6 W))`, the
test band columns `[ceil(0.6 W), W)` (`test_fraction` = 0.4; 0.3 would force crops to cover
so little of each photo that regions show one magnified object instead of a texture). Each
band is resized on its own (so interpolation cannot mix them), with one zoom factor per
photograph shared by both splits so a texture has the same scale in train and test.
`source_areas()` returns the bands, and `TextureMosaic.region_sources()` returns the source
rectangle of every region's crop, which the tests check against the bands.

Images are a pure function of `(config, index)`: the generator of image `i` is seeded with
`(seed, split, i)`, so random access, any iteration order and any worker give the same arrays.
"""

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from segsearch.errors import DatasetError
from segsearch.trainer.sample import Sample

logger = logging.getLogger(__name__)

DEFAULT_TEXTURES: tuple[str, ...] = (
    "brick",
    "grass",
    "gravel",
    "coffee",
    "coins",
    "page",
    "immunohistochemistry",
    "hubble_deep_field",
)
"""scikit-image images that ship with the wheel (no pooch download) and look unlike each other:
three grey natural textures (brick wall, grass, gravel), a wooden table with a cup (coffee),
a grid of coins on black, printed text (page), stained tissue (immunohistochemistry) and a star
field (hubble_deep_field). Grey images are repeated to RGB."""

SPLITS = ("train", "test")
Rect = tuple[int, int, int, int]
"""(x0, y0, x1, y1) in source pixels, end-exclusive."""


@dataclass(frozen=True)
class MosaicConfig:
    """What the mosaic set looks like; two equal configs give identical datasets.

    test_fraction: share of each photo's columns (the right-hand band) reserved for test.
    scales: zoom factors a region's texture is drawn at (one picked per region), on top of the
        per-photograph zoom that makes a crop at the smallest scale just fit its smaller band
        (with 10% room), so every texture is seen at the same coverage of its photo.
    intensity_jitter: each region's pixels are multiplied by a gain in `1 ± intensity_jitter`.
    warp_strength: amplitude of the smooth coordinate warp, as a fraction of the image side.
    min_region_fraction: a layout is redrawn (up to 20 times) while a region covers less than
        this fraction of the image.
    """

    size: int = 128
    num_images: int = 64
    min_regions: int = 2
    max_regions: int = 5
    seed: int = 0
    split: str = "train"
    textures: tuple[str, ...] = DEFAULT_TEXTURES
    test_fraction: float = 0.4
    scales: tuple[float, ...] = (0.75, 1.0, 1.25)
    intensity_jitter: float = 0.1
    warp_strength: float = 0.12
    min_region_fraction: float = 0.04

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise DatasetError(f"mosaic split must be one of {SPLITS}, got {self.split!r}")
        if self.size < 16:
            raise DatasetError(f"mosaic size must be at least 16 pixels, got {self.size}")
        if self.num_images < 0:
            raise DatasetError(f"mosaic num_images must be >= 0, got {self.num_images}")
        if len(set(self.textures)) != len(self.textures) or len(self.textures) < 2:
            raise DatasetError(f"mosaic textures must be at least 2 distinct names, got {self.textures}")
        if not 1 <= self.min_regions <= self.max_regions <= len(self.textures):
            raise DatasetError(
                f"need 1 <= min_regions <= max_regions <= number of textures ({len(self.textures)}), "
                f"got {self.min_regions}..{self.max_regions}"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise DatasetError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        if not self.scales or min(self.scales) <= 0:
            raise DatasetError(f"scales must be positive zoom factors, got {self.scales}")
        if not 0.0 <= self.intensity_jitter < 1.0:
            raise DatasetError(f"intensity_jitter must lie in [0, 1), got {self.intensity_jitter}")


@dataclass(frozen=True)
class RegionSource:
    """Where one region's pixels came from: its class, zoom, and source rectangle.

    rect: `(x0, y0, x1, y1)` in the *unresized* source photograph (floats, end-exclusive).
    """

    region: int
    class_index: int
    scale: float
    rect: tuple[float, float, float, float]


@functools.lru_cache(maxsize=32)
def load_texture(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as `(H, W, 3)` uint8 RGB (read-only, cached).

    Raises DatasetError for unknown names and for images that scikit-image would have to
    download (those need `pooch` and a network, which segsearch never uses).
    """
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if loader is None or not callable(loader):
        raise DatasetError(f"unknown texture {name!r}: use a scikit-image bundled image name, e.g. {DEFAULT_TEXTURES}")
    try:
        image = np.asarray(loader())
    except (ModuleNotFoundError, OSError, ValueError) as exc:
        raise DatasetError(
            f"texture {name!r} is not bundled with scikit-image (it needs a download); "
            f"pick one of {DEFAULT_TEXTURES}"
        ) from exc
    image = _to_rgb_uint8(image, name)
    image.setflags(write=False)
    return image


def _to_rgb_uint8(image: np.ndarray, name: str) -> np.ndarray:
    """Grey -> RGB by repetition, RGBA -> RGB, bool/float -> uint8."""
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        image = np.clip(np.asarray(image, dtype=np.float64) * (255.0 if image.max() <= 1.0 else 1.0), 0, 255)
        image = image.astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] < 3:
        raise DatasetError(f"texture {name!r} is not a 2-D image (shape {image.shape})")
    return np.ascontiguousarray(image[:, :, :3])


def split_columns(width: int, test_fraction: float) -> int:
    """First column of the test band; the train band is `[0, c)`, the test band `[c, width)`."""
    return int(math.ceil(width * (1.0 - test_fraction)))


def source_area(shape: tuple[int, ...], split: str, test_fraction: float) -> Rect:
    """The band `(x0, y0, x1, y1)` of a source of `shape` (H, W, ...) that `split` may sample."""
    height, width = shape[0], shape[1]
    cut = split_columns(width, test_fraction)
    return (0, 0, cut, height) if split == "train" else (cut, 0, width, height)


def source_areas(config: MosaicConfig, sources: Mapping[str, np.ndarray] | None = None) -> dict[str, Rect]:
    """Per texture name, the source band that `config.split` draws every crop from."""
    images = _resolve_sources(config, sources)
    return {name: source_area(images[name].shape, config.split, config.test_fraction) for name in config.textures}


def _resolve_sources(config: MosaicConfig, sources: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The photograph of every texture class: the given arrays, else scikit-image's bundled ones."""
    if sources is None:
        return {name: load_texture(name) for name in config.textures}
    missing = [name for name in config.textures if name not in sources]
    if missing:
        raise DatasetError(f"no source image given for textures {missing}: pass one array per name in config.textures")
    return {name: _to_rgb_uint8(np.asarray(sources[name]), name) for name in config.textures}


@dataclass(frozen=True)
class _ZoomedBand:
    """One texture's split band resized by one zoom; factors map back to source pixels."""

    pixels: np.ndarray  # (h, w, 3) uint8
    origin_x: int  # band's first source column
    factor_x: float  # resized width / band width
    factor_y: float


def _base_zoom(source_shape: tuple[int, ...], config: MosaicConfig) -> float:
    """Zoom under which both bands hold a crop at the smallest scale with 10% room.

    Shared by both splits so a texture looks the same size in train and test. It shrinks
    big photos and enlarges small ones, so a crop covers the same share of every photo.
    """
    bands = [source_area(source_shape, split, config.test_fraction) for split in SPLITS]
    band_side = min(min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in bands)
    return math.ceil(config.size * 1.1) / (min(config.scales) * band_side)


def _zoom_band(source: np.ndarray, area: Rect, zoom: float) -> _ZoomedBand:
    band = source[area[1] : area[3], area[0] : area[2]]
    height, width = band.shape[:2]
    new_w, new_h = max(1, round(width * zoom)), max(1, round(height * zoom))
    if (new_w, new_h) != (width, height):
        band = np.asarray(Image.fromarray(band).resize((new_w, new_h), Image.Resampling.BICUBIC))
    return _ZoomedBand(np.ascontiguousarray(band), area[0], new_w / width, new_h / height)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """`(size, size)` float32 noise, smooth at the scale `size / cells`, unit variance.

    Random values on a `(cells + 1)^2` lattice, interpolated with normalised Gaussian weights
    along each axis (two small matrix products: much faster than spline zooming).
    """
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    position = (np.arange(size, dtype=np.float32) + 0.5) * cells / size
    weights = np.exp(-0.5 * ((position[:, None] - np.arange(cells + 1, dtype=np.float32)[None]) / 0.6) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    spread = np.sqrt((weights**2).sum(axis=1))  # std of one axis' weighted sum: rescale to 1
    return (weights @ coarse @ weights.T) / np.outer(spread, spread)


def make_region_map(rng: np.random.Generator, size: int, num_regions: int, warp_strength: float) -> np.ndarray:
    """`(size, size)` int64 region index in `[0, num_regions)`: a warped Voronoi partition.

    Coordinates in [0, 1) are displaced by two octaves of smooth noise before each pixel picks
    its nearest seed, which turns straight Voronoi edges into irregular natural-looking borders.
    """
    seeds = rng.random((num_regions, 2)).astype(np.float32)
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys, xs = np.meshgrid(axis, axis, indexing="ij")
    warped = []
    for coord in (ys, xs):
        warp = _smooth_noise(rng, size, 3) + 0.35 * _smooth_noise(rng, size, 8)
        warped.append(coord + warp_strength * warp)
    dist = (warped[0][None] - seeds[:, 0, None, None]) ** 2 + (warped[1][None] - seeds[:, 1, None, None]) ** 2
    return np.argmin(dist, axis=0).astype(np.int64)


class TextureMosaic:
    """Deterministic synthetic segmentation set of real-texture mosaics; items are `Sample`s.

    mask values are texture indices into `class_names` (no ignore pixels).
    sources: optional `{texture name: (H, W[, 3]) image}` to use instead of scikit-image's
        bundled photographs (your own textures, or test patterns).
    """

    def __init__(self, config: MosaicConfig, sources: Mapping[str, np.ndarray] | None = None) -> None:
        self.config = config
        self.class_names: list[str] = list(config.textures)
        images = _resolve_sources(config, sources)
        self._bands = [self._prepare_texture(images[name]) for name in config.textures]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.config.num_images

    def __getitem__(self, index: int) -> Sample:
        return self._generate(self._check_index(index))[0]

    def region_sources(self, index: int) -> list[RegionSource]:
        """Provenance of image `index`: for each region, the source rectangle it was cut from."""
        return self._generate(self._check_index(index))[1]

    def _prepare_texture(self, source: np.ndarray) -> list[_ZoomedBand]:
        area = source_area(source.shape, self.config.split, self.config.test_fraction)
        base = _base_zoom(source.shape, self.config)
        return [_zoom_band(source, area, base * scale) for scale in self.config.scales]

    def _check_index(self, index: int) -> int:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"mosaic index {index} out of range for {len(self)} images")
        return index

    def _generate(self, index: int) -> tuple[Sample, list[RegionSource]]:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, SPLITS.index(cfg.split), index])
        regions = self._draw_layout(rng)
        num_regions = int(regions.max()) + 1
        classes = rng.choice(self.num_classes, size=num_regions, replace=False)
        image = np.empty((cfg.size, cfg.size, 3), dtype=np.uint8)
        sources = []
        for region, class_index in enumerate(classes):
            inside = regions == region
            crop, source = self._draw_crop(rng, region, int(class_index))
            image[inside] = crop[inside]
            sources.append(source)
        mask = classes[regions].astype(np.int64)
        return Sample(image=image, mask=mask, image_id=f"mosaic-{cfg.split}-{index}"), sources

    def _draw_layout(self, rng: np.random.Generator) -> np.ndarray:
        """A region map whose regions are all big enough (redrawn up to 20 times)."""
        cfg = self.config
        num_regions = int(rng.integers(cfg.min_regions, cfg.max_regions + 1))
        min_area = cfg.min_region_fraction * cfg.size * cfg.size
        for _ in range(20):
            regions = make_region_map(rng, cfg.size, num_regions, cfg.warp_strength)
            areas = np.bincount(regions.ravel(), minlength=num_regions)
            if areas.min() >= min_area:
                return regions
        # Keep the last layout but renumber so region indices are contiguous and non-empty.
        _, regions = np.unique(regions, return_inverse=True)
        return regions.reshape(cfg.size, cfg.size).astype(np.int64)

    def _draw_crop(self, rng: np.random.Generator, region: int, class_index: int) -> tuple[np.ndarray, RegionSource]:
        """A `(size, size, 3)` crop of texture `class_index` at a random zoom and place."""
        cfg = self.config
        scale_index = int(rng.integers(len(cfg.scales)))
        band = self._bands[class_index][scale_index]
        height, width = band.pixels.shape[:2]
        y = int(rng.integers(height - cfg.size + 1))
        x = int(rng.integers(width - cfg.size + 1))
        crop = band.pixels[y : y + cfg.size, x : x + cfg.size]
        if cfg.intensity_jitter > 0:
            gain = 1.0 + rng.uniform(-cfg.intensity_jitter, cfg.intensity_jitter)
            crop = np.clip(crop.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        rect = (
            band.origin_x + x / band.factor_x,
            y / band.factor_y,
            band.origin_x + (x + cfg.size) / band.factor_x,
            (y + cfg.size) / band.factor_y,
        )
        return crop, RegionSource(region, class_index, float(cfg.scales[scale_index]), rect)
