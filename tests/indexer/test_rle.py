"""Mask run-length encoding: exact round trips, the documented layout, and boxes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segsearch.indexer.rle import decode_mask, encode_mask, mask_area, mask_box

masks = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
    lambda shape: arrays(np.bool_, shape)
)


@settings(max_examples=200, deadline=None)
@given(masks)
def test_round_trip_is_exact_and_runs_cover_the_image(mask):
    counts = encode_mask(mask)
    assert sum(counts) == mask.size
    assert mask_area(counts) == int(mask.sum())
    decoded = decode_mask(counts, mask.shape)
    assert decoded.dtype == bool and decoded.shape == mask.shape
    assert np.array_equal(decoded, mask)


def test_layout_is_column_major_starting_with_zeros():
    # Column-major order of [[0, 1], [1, 1]] is 0, 1, 1, 1.
    assert encode_mask(np.array([[0, 1], [1, 1]], bool)) == [1, 3]
    # First pixel set: the leading run of zeros has length 0.
    assert encode_mask(np.array([[1, 0], [1, 0]], bool)) == [0, 2, 2]
    # Row-major would read row 0 first; column-major reads column 0 first.
    assert encode_mask(np.array([[1, 1], [0, 0]], bool)) == [0, 1, 1, 1, 1]


@pytest.mark.parametrize("fill", [False, True])
def test_uniform_masks(fill):
    mask = np.full((5, 7), fill)
    counts = encode_mask(mask)
    assert counts == ([35] if not fill else [0, 35])
    assert np.array_equal(decode_mask(counts, (5, 7)), mask)


def test_decode_rejects_counts_that_do_not_fit_the_shape():
    with pytest.raises(ValueError, match="35 pixels"):
        decode_mask([10, 3], (5, 7))
    with pytest.raises(ValueError, match="non-negative"):
        decode_mask([40, -5], (5, 7))


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        encode_mask(np.zeros((2, 2, 2), bool))


@settings(max_examples=100, deadline=None)
@given(masks)
def test_box_is_tight_and_end_exclusive(mask):
    if not mask.any():
        with pytest.raises(ValueError, match="empty"):
            mask_box(mask)
        return
    x0, y0, x1, y1 = mask_box(mask)
    ys, xs = np.nonzero(mask)
    assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert mask[y0:y1, x0:x1].sum() == mask.sum()


def test_box_of_a_known_mask():
    mask = np.zeros((10, 20), bool)
    mask[2:5, 7:9] = True
    assert mask_box(mask) == (7, 2, 9, 5)
