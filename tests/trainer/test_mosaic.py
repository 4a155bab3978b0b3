"""The texture mosaic: determinism, disjoint train/test sources, layout, speed."""

import time

import numpy as np
import pytest
from scipy import ndimage

from segsearch.errors import DatasetError
from segsearch.trainer.mosaic import (
    DEFAULT_TEXTURES,
    MosaicConfig,
    TextureMosaic,
    load_texture,
    source_area,
    source_areas,
)
from segsearch.trainer.sample import IGNORE_INDEX


def small_config(**changes) -> MosaicConfig:
    return MosaicConfig(**{"size": 64, "num_images": 12, **changes})


def test_bundled_textures_load_offline_as_rgb():
    for name in DEFAULT_TEXTURES:
        image = load_texture(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.std() > 5, f"{name} looks blank"


def test_same_config_gives_identical_arrays_in_any_order():
    first = TextureMosaic(small_config(seed=3))
    second = TextureMosaic(small_config(seed=3))
    for index in reversed(range(len(first))):
        a, b = first[index], second[index]
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.image_id == b.image_id
    np.testing.assert_array_equal(first[5].image, first[5].image)


def test_seed_and_split_change_the_images():
    base = TextureMosaic(small_config(seed=0))[0]
    other_seed = TextureMosaic(small_config(seed=1))[0]
    other_split = TextureMosaic(small_config(seed=0, split="test"))[0]
    assert not np.array_equal(base.image, other_seed.image)
    assert not np.array_equal(base.image, other_split.image)
    assert base.image_id != other_split.image_id


def test_samples_have_declared_shapes_and_class_range():
    dataset = TextureMosaic(small_config())
    assert dataset.num_classes == len(DEFAULT_TEXTURES) == len(dataset.class_names)
    for sample in dataset:
        assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.uint8
        assert sample.mask.shape == (64, 64) and sample.mask.dtype == np.int64
        assert sample.mask.min() >= 0 and sample.mask.max() < dataset.num_classes
        assert not (sample.mask == IGNORE_INDEX).any()


def test_each_region_has_its_own_class_and_the_region_count_is_in_range():
    config = small_config(num_images=30, min_regions=2, max_regions=4)
    dataset = TextureMosaic(config)
    counts = set()
    for index in range(len(dataset)):
        sources = dataset.region_sources(index)
        classes = [s.class_index for s in sources]
        assert len(set(classes)) == len(classes), "two regions share a class"
        assert set(np.unique(dataset[index].mask)) == set(classes)
        counts.add(len(classes))
    assert counts <= {2, 3, 4} and len(counts) >= 2


def test_regions_are_irregular_not_straight_voronoi_cells():
    """A straight-edged convex cell fills its convex hull; warped cells do not, on average."""
    from skimage.morphology import convex_hull_image

    dataset = TextureMosaic(small_config(size=96, num_images=10))
    solidity = []
    for sample in dataset:
        for class_index in np.unique(sample.mask):
            region = sample.mask == class_index
            solidity.append(region.sum() / convex_hull_image(region).sum())
    assert np.mean(solidity) < 0.93


def test_regions_are_big_enough():
    config = small_config(num_images=20)
    for sample in TextureMosaic(config):
        areas = np.bincount(sample.mask.ravel())
        assert areas[areas > 0].min() >= config.min_region_fraction * config.size**2


def test_train_and_test_bands_are_disjoint_and_cover_the_source():
    train = source_areas(MosaicConfig(split="train"))
    test = source_areas(MosaicConfig(split="test"))
    for name in DEFAULT_TEXTURES:
        height, width = load_texture(name).shape[:2]
        tx0, ty0, tx1, ty1 = train[name]
        sx0, sy0, sx1, sy1 = test[name]
        assert tx0 == 0 and tx1 == sx0 and sx1 == width, "bands must split the columns without overlap"
        assert (ty0, ty1, sy0, sy1) == (0, height, 0, height)
        assert abs((sx1 - sx0) / width - 0.4) < 0.01


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_crop_comes_from_its_split_band(split):
    config = small_config(split=split, num_images=20)
    dataset = TextureMosaic(config)
    areas = source_areas(config)
    for index in range(len(dataset)):
        for source in dataset.region_sources(index):
            x0, y0, x1, y1 = areas[dataset.class_names[source.class_index]]
            rx0, ry0, rx1, ry1 = source.rect
            assert x0 - 1e-6 <= rx0 < rx1 <= x1 + 1e-6
            assert y0 - 1e-6 <= ry0 < ry1 <= y1 + 1e-6


def test_test_images_hold_only_test_band_pixels():
    """Sources whose train band is 10 and test band 240: a test image may never show a 10."""
    config = small_config(textures=("a", "b", "c"), max_regions=3, intensity_jitter=0.0)
    sources = {}
    for name, (height, width) in zip(config.textures, [(120, 200), (90, 300), (150, 150)]):
        image = np.full((height, width), 10, dtype=np.uint8)
        cut = source_area(image.shape, "test", config.test_fraction)[0]
        image[:, cut:] = 240
        sources[name] = image
    for split, value in (("test", 240), ("train", 10)):
        dataset = TextureMosaic(MosaicConfig(**{**config.__dict__, "split": split}), sources=sources)
        for sample in dataset:
            assert (sample.image == value).all(), f"{split} image holds pixels of the other band"


def test_region_pixels_are_the_source_pixels_named_by_region_sources():
    """With zoom 1 (band side 71 = ceil(1.1 * 64)) every region is a verbatim copy of its rect."""
    config = small_config(textures=("a", "b"), min_regions=2, max_regions=2, scales=(1.0,), intensity_jitter=0.0)
    rng = np.random.default_rng(0)
    sources = {name: rng.integers(0, 256, size=(100, 178, 3), dtype=np.uint8) for name in config.textures}
    for split in ("train", "test"):
        dataset = TextureMosaic(MosaicConfig(**{**config.__dict__, "split": split}), sources=sources)
        for index in range(4):
            sample = dataset[index]
            for source in dataset.region_sources(index):
                x0, y0, x1, y1 = (int(round(v)) for v in source.rect)
                assert (x1 - x0, y1 - y0) == (64, 64)
                crop = sources[dataset.class_names[source.class_index]][y0:y1, x0:x1]
                inside = sample.mask == source.class_index
                np.testing.assert_array_equal(sample.image[inside], crop[inside])


def test_regions_show_different_textures():
    """Neighbouring regions differ in their pixel statistics (the fill is not one texture)."""
    dataset = TextureMosaic(small_config(num_images=8))
    for sample in dataset:
        grey = sample.image.astype(np.float64).mean(axis=2)
        edges = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))
        stats = []
        for class_index in np.unique(sample.mask):
            inside = sample.mask == class_index
            stats.append((sample.image[inside].mean(axis=0).tolist() + [edges[inside].mean()]))
        stats = np.array(stats)
        gaps = np.abs(stats[:, None] - stats[None]).max(axis=2)
        np.fill_diagonal(gaps, np.inf)
        assert gaps.min() > 2.0


def test_generation_is_fast():
    dataset = TextureMosaic(MosaicConfig(size=128, num_images=40))
    dataset[0]
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    assert (time.perf_counter() - start) / len(dataset) < 0.02


@pytest.mark.parametrize(
    "changes",
    [
        {"split": "val"},
        {"max_regions": 9},
        {"min_regions": 3, "max_regions": 2},
        {"textures": ("brick", "not_a_skimage_image")},
        {"test_fraction": 1.0},
    ],
)
def test_bad_configs_raise_dataset_error(changes):
    with pytest.raises(DatasetError):
        TextureMosaic(MosaicConfig(**changes))


def test_missing_custom_source_is_reported():
    with pytest.raises(DatasetError, match="no source image"):
        TextureMosaic(small_config(textures=("a", "b"), max_regions=2), sources={"a": np.zeros((200, 200), np.uint8)})


def test_index_out_of_range_raises_index_error():
    dataset = TextureMosaic(small_config(num_images=3))
    with pytest.raises(IndexError):
        dataset[3]
    np.testing.assert_array_equal(dataset[-1].image, dataset[2].image)
