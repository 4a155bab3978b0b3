"""Contour over-segmentation (relation V): a partition whose boundaries follow strong edges."""

import numpy as np
import pytest
from skimage import data
from skimage.filters import sobel
from skimage.segmentation import find_boundaries
from skimage.transform import resize

from segsearch.trainer.lowlevel import (
    batch_contour_segments,
    contour_hierarchy_regions,
    contour_segments,
    region_map,
)


def _noisy_flat_edges(shape, seed=0):
    """A weak, noisy edge map (values < 0.05): what HED gives on flat regions."""
    return (np.random.default_rng(seed).random(shape) * 0.05).astype(np.float32)


def _assert_partition(seg, shape):
    assert seg.shape == shape and seg.dtype == np.int32
    ids = np.unique(seg)
    np.testing.assert_array_equal(ids, np.arange(len(ids)))  # contiguous 0..n-1, all used


def test_partition_with_contiguous_ids_near_requested_count():
    edges = _noisy_flat_edges((50, 70))
    seg = contour_segments(edges, num_segments=40)
    _assert_partition(seg, (50, 70))
    assert 30 <= seg.max() + 1 <= 40


def test_more_segments_than_pixels_gives_one_pixel_each():
    seg = contour_segments(_noisy_flat_edges((3, 4)), num_segments=64)
    _assert_partition(seg, (3, 4))
    assert seg.max() + 1 == 12


def _straddling_segments(seg, side, off_ridge):
    """Segments holding pixels of both sides, looking only at pixels off the edge ridge itself
    (ridge pixels are legitimately assigned to either side)."""
    count = 0
    for label in np.unique(seg):
        sides = side[(seg == label) & off_ridge]
        count += int(sides.size > 0 and 0 < sides.mean() < 1)
    return count


def _purity(seg, side):
    """Share of pixels whose segment's majority side is their own side."""
    agree = 0
    for label in np.unique(seg):
        sides = side[seg == label]
        agree += max(sides.sum(), sides.size - sides.sum())
    return agree / seg.size


@pytest.mark.parametrize("line", [37, 61])  # off the grid lines, so grid cells straddle it
def test_no_segment_straddles_a_strong_vertical_edge(line):
    height, width = 96, 96
    edges = _noisy_flat_edges((height, width), seed=line)
    edges[:, line - 1 : line + 1] = 1.0
    columns = np.broadcast_to(np.arange(width), (height, width))
    side = columns >= line  # the two flat halves of the image
    seg = contour_segments(edges, num_segments=64)
    _assert_partition(seg, (height, width))
    assert _straddling_segments(seg, side, off_ridge=(columns < line - 1) | (columns > line)) == 0
    assert _purity(seg, side) > 0.95


def test_segments_stay_inside_a_closed_contour():
    size, radius = 96, 22.5
    yy, xx = np.mgrid[:size, :size]
    distance = np.hypot(yy - 41.3, xx - 53.7)
    edges = _noisy_flat_edges((size, size), seed=3)
    ridge = np.abs(distance - radius) < 1.0
    edges[ridge] = 1.0
    seg = contour_segments(edges, num_segments=64)
    assert _straddling_segments(seg, distance < radius, off_ridge=~ridge) == 0


def test_boundaries_follow_edges_of_a_real_photo():
    """On the cameraman, segment boundaries lie on stronger edges than a plain grid's do."""
    gray = resize(data.camera(), (128, 128), anti_aliasing=True)
    edges = sobel(gray)
    edges = (edges / edges.max()).astype(np.float32)
    seg = contour_segments(edges, num_segments=64)
    yy, xx = np.mgrid[:128, :128]
    grid = (yy // 16) * 8 + xx // 16  # the same 64 cells without looking at edges
    on_seg = edges[find_boundaries(seg, mode="inner")].mean()
    on_grid = edges[find_boundaries(grid, mode="inner")].mean()
    assert on_seg > 1.5 * on_grid


def test_batch_matches_single_images_with_ids_per_image():
    edges = np.stack([_noisy_flat_edges((40, 48), seed=s) for s in range(3)])
    edges[1, :, 20:22] = 1.0
    batch = batch_contour_segments(edges, num_segments=16)
    assert batch.shape == (3, 40, 48) and batch.dtype == np.int32
    for image_edges, seg in zip(edges, batch):
        np.testing.assert_array_equal(seg, contour_segments(image_edges, num_segments=16))
        assert seg.min() == 0


def test_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        contour_segments(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        batch_contour_segments(np.zeros((8, 8), np.float32))


# --- contour hierarchy regions (the default V regions) ---------------------------------------


def _circle(size=64, centre=(30.4, 33.6), radius=19.5):
    """Noisy flat edges with a closed ring of full-strength edge: (edges, inside, ridge)."""
    yy, xx = np.mgrid[:size, :size]
    distance = np.hypot(yy - centre[0], xx - centre[1])
    edges = _noisy_flat_edges((size, size), seed=5)
    ridge = np.abs(distance - radius) < 1.0
    edges[ridge] = 1.0
    return edges, distance < radius, ridge


def test_hierarchy_regions_of_a_circle_are_its_inside_and_outside():
    """By hand: every border inside the disc or outside the ring runs through noise < 0.05,
    so all those merges happen below the 0.5 cut; the border between inside and outside runs
    along the ring (each pixel pair touches a ring pixel: strength 1.0), so it stays: exactly
    two regions, neither straddling the ring."""
    edges, inside, ridge = _circle()
    regions = contour_hierarchy_regions(edges, threshold=0.5, max_regions=16)
    _assert_partition(regions, edges.shape)
    assert regions.max() + 1 == 2
    assert _straddling_segments(regions, inside, off_ridge=~ridge) == 0
    assert len(np.unique(regions[inside & ~ridge])) == 1


def test_hierarchy_regions_follow_an_l_shaped_contour():
    """An L-shaped ridge from the top edge down and then to the right edge splits the image
    into the lower-left L region and the upper-right corner: two regions, none straddling."""
    size = 60
    edges = _noisy_flat_edges((size, size), seed=7)
    ridge = np.zeros((size, size), dtype=bool)
    ridge[:41, 22:24] = True  # vertical arm, columns 22-23, rows 0-40
    ridge[39:41, 22:] = True  # horizontal arm, rows 39-40, to the right border
    edges[ridge] = 0.9
    yy, xx = np.mgrid[:size, :size]
    corner = (yy < 39) & (xx > 23)  # the upper-right part the L cuts off
    regions = contour_hierarchy_regions(edges, threshold=0.5, max_regions=16)
    assert regions.max() + 1 == 2
    assert _straddling_segments(regions, corner, off_ridge=~ridge) == 0


def test_hierarchy_regions_of_a_flat_image_are_one_region():
    """No contour anywhere: every border's mean strength is below 0.05 < 0.5, all merge."""
    regions = contour_hierarchy_regions(_noisy_flat_edges((48, 64)), threshold=0.5)
    assert regions.shape == (48, 64) and regions.dtype == np.int32
    assert regions.max() == 0


def test_hierarchy_regions_keep_the_strongest_contours_under_the_cap():
    """Three vertical ridges of strength 0.6, 0.9 and 0.7: four strips at threshold 0.5;
    capped at 2 regions, only the strongest ridge (0.9) still separates."""
    edges = _noisy_flat_edges((40, 80), seed=11)
    for column, strength in ((19, 0.6), (39, 0.9), (59, 0.7)):
        edges[:, column:column + 2] = strength
    assert contour_hierarchy_regions(edges, threshold=0.5, max_regions=16).max() + 1 == 4
    capped = contour_hierarchy_regions(edges, threshold=0.5, max_regions=2)
    assert capped.max() + 1 == 2
    assert len(np.unique(capped[:, :38])) == 1 and len(np.unique(capped[:, 42:])) == 1
    assert capped[0, 0] != capped[0, 79]


def test_region_map_chooses_the_method():
    edges = _noisy_flat_edges((48, 48))
    np.testing.assert_array_equal(region_map(edges, "grid", 16), contour_segments(edges, 16))
    assert region_map(edges, "hierarchy", 16).max() == 0
    with pytest.raises(ValueError, match="contour method"):
        region_map(edges, "ucm", 16)
