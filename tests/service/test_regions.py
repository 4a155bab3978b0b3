"""Region semantics without a server: masks and boxes to grid weights and vectors, points."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segsearch.service.errors import InvalidArgument
from segsearch.service.regions import (
    Box, box_mask, check_point, coverage_at, grid_weights, point_in_model, region_vector)


def _embeddings(dim=8, size=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(dim, size, size, generator=generator), dim=0)


def test_region_vector_is_the_mean_of_the_upsampled_embedding_over_the_region():
    """Reference: upsample the (D, 6, 6) map by nearest to 24x24 (stride 4), average the mask's pixels."""
    embeddings = _embeddings()
    upsampled = embeddings.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)  # (D, 24, 24)
    rng = np.random.default_rng(1)
    mask = rng.random((24, 24)) < 0.3
    expected = F.normalize(upsampled[:, torch.from_numpy(mask)].sum(dim=1), dim=0).numpy()
    assert np.allclose(region_vector(embeddings, mask, (24, 24)), expected, atol=1e-5)


def test_masks_of_another_size_are_area_averaged_onto_the_model_input():
    mask = np.zeros((48, 96), bool)
    mask[:, :48] = True  # left half of a 96x48 image
    coverage = coverage_at(mask, (24, 24))
    assert coverage.shape == (24, 24)
    assert np.allclose(coverage[:, :12], 1) and np.allclose(coverage[:, 12:], 0)
    weights = grid_weights(coverage, (6, 6))
    assert weights.sum() == pytest.approx(coverage.sum())
    assert np.allclose(weights[:, :3], 16) and np.allclose(weights[:, 3:], 0)


def test_a_one_pixel_region_still_gets_a_vector():
    embeddings = _embeddings()
    mask = np.zeros((240, 240), bool)
    mask[101, 57] = True  # 1 pixel of a 240x240 image, at model size 24x24: 1% of a pixel
    vector = region_vector(embeddings, mask, (24, 24))
    cell = embeddings[:, 101 * 24 // 240 // 4, 57 * 24 // 240 // 4].numpy()
    assert np.allclose(vector, cell, atol=1e-5)


def test_partial_last_cell_when_the_input_is_not_a_multiple_of_the_stride():
    coverage = np.ones((10, 10), np.float32)  # grid ceil(10/4) = 3 cells: 4, 4 and 2 pixels
    assert grid_weights(coverage, (3, 3)).tolist() == [[16, 16, 8], [16, 16, 8], [8, 8, 4]]


@pytest.mark.parametrize("box, phrase", [
    (Box(5, 5, 5, 9), "is empty"), (Box(5, 9, 8, 2), "is empty"),
    (Box(-1, 0, 4, 4), "outside"), (Box(0, 0, 11, 4), "outside"), (Box(0, 0, 4, 21), "outside"),
])
def test_bad_boxes(box, phrase):
    with pytest.raises(InvalidArgument, match=phrase):
        box_mask(box, (10, 20))


def test_box_mask_is_end_exclusive():
    mask = box_mask(Box(2, 3, 5, 4), (10, 20))
    assert mask.shape == (20, 10) and mask.sum() == 3 and mask[3, 2:5].all()


def test_points_map_pixel_centres_and_reject_outside():
    assert point_in_model(0, 0, (256, 192), (96, 128)) == (0, 0)
    assert point_in_model(255, 191, (256, 192), (96, 128)) == (95, 127)
    assert point_in_model(3, 2, (256, 192), (96, 128)) == (1, 1)
    for x, y in ((-1, 0), (256, 0), (0, 192)):
        with pytest.raises(InvalidArgument, match="outside the 256x192 image"):
            check_point(x, y, (256, 192))


def test_empty_mask_is_refused():
    with pytest.raises(InvalidArgument, match="selects no pixel"):
        region_vector(_embeddings(), np.zeros((24, 24), bool), (24, 24))


def test_box_region_is_the_largest_region_mostly_inside_the_box():
    from segsearch.service.regions import box_region

    label_map = np.full((10, 10), 0)
    label_map[2:8, 2:6] = 1  # 24 px, all inside the box below
    label_map[2:8, 6:8] = 2  # 12 px, all inside
    label_map[0, 0] = -1
    box = np.zeros((10, 10), dtype=bool)
    box[1:9, 1:9] = True  # also holds 28 px of region 0, but region 0 is mostly outside
    assert box_region(label_map, box) == 1
    assert box_region(label_map, box, min_inside=0.9) == 1
    small = np.zeros_like(box)
    small[3:5, 3:5] = True  # inside region 1 only: no region lies mostly inside
    assert box_region(label_map, small) is None
    assert box_region(np.full((4, 4), -1), np.ones((4, 4), dtype=bool)) is None


def test_a_box_queries_with_the_part_of_its_region_inside_it():
    """Fine segments 0, 1 form region 0; segment 2 is region 1. The box holds all of segment 0,
    a quarter of segment 1 and a sliver of segment 2: the vector is sum0 + sum1 / 4, normalised;
    segment 2, of another region, plays no part."""
    from segsearch.service.regions import clipped_region_vector

    leaf_map = np.full((8, 8), 2)
    leaf_map[:, :2] = 0
    leaf_map[:, 2:6] = 1
    leaf_map[0, 0] = -1
    sums = np.array([[1.0, 0, 0], [0, 4.0, 0], [0, 0, 9.0]], np.float32)
    leaf_regions = np.array([0, 0, 1])
    box = np.zeros((8, 8), dtype=bool)
    box[:, :3] = True  # segment 0 (15 px) whole, 8 of segment 1's 32 px
    box[0, 6] = True  # one pixel of segment 2
    expected = np.array([1.0, 4.0 / 4, 0])
    np.testing.assert_allclose(clipped_region_vector(leaf_map, sums, leaf_regions, 0, box),
                               expected / np.linalg.norm(expected), rtol=1e-6)
    with pytest.raises(InvalidArgument, match="no pixel of the region"):
        clipped_region_vector(leaf_map, sums, leaf_regions, 0, np.zeros((8, 8), dtype=bool))


def test_a_point_queries_with_the_fine_segments_of_its_region():
    """Fine segments 0 and 2 form the point cut's region 5, segment 1 region 7: a point on
    segment 2 gets (sum0 + sum2) normalised and the mask of segments 0 and 2."""
    from segsearch.service.regions import point_region

    leaf_map = np.array([[0, 0, 1, 1], [2, 2, 1, -1]])
    sums = np.array([[3.0, 0], [0, 5.0], [1.0, 4.0]], np.float32)
    vector, mask = point_region(leaf_map, sums, np.array([5, 7, 5]), row=1, col=0)
    np.testing.assert_allclose(vector, np.array([4.0, 4.0]) / np.sqrt(32), rtol=1e-6)
    assert mask.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert point_region(leaf_map, sums, np.array([5, 7, 5]), row=1, col=3) is None  # in no segment
