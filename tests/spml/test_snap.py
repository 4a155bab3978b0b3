"""Borders snapped onto contours (spml/snap.py), on hand-made maps."""
import numpy as np

from segsearch.spml.snap import snap_band, snap_grid, snap_to_edges


def _two_halves(border_col: int, size: int = 20) -> np.ndarray:
    labels = np.zeros((size, size), np.int64)
    labels[:, border_col:] = 1
    return labels


def test_a_border_two_pixels_off_moves_onto_the_contour():
    edges = np.zeros((20, 20), np.float32)
    edges[:, 10] = 1.0  # the true contour: a vertical line at column 10
    snapped = snap_to_edges(_two_halves(12), edges, band=3)
    assert (snapped[:, :10] == 0).all() and (snapped[:, 11:] == 1).all()
    assert set(np.unique(snapped[:, 10])) <= {0, 1}


def test_beyond_the_band_the_border_stays():
    edges = np.zeros((20, 20), np.float32)
    edges[:, 4] = 1.0  # 8 px away, outside a band of 2: the contour is not this border's
    snapped = snap_to_edges(_two_halves(12), edges, band=2)
    assert (snapped[:, :10] == 0).all() and (snapped[:, 14:] == 1).all()


def test_thin_segments_survive_and_unlabelled_pixels_stay_unlabelled():
    labels = _two_halves(10)
    labels[:, 5] = 2  # one pixel wide: no core at band 2
    labels[0:3, 15:18] = -1
    snapped = snap_to_edges(labels, np.random.default_rng(0).random((20, 20)).astype(np.float32), band=2)
    assert set(np.unique(snapped)) == {-1, 0, 1, 2}
    assert (snapped[0:3, 15:18] == -1).all() and (snapped[labels >= 0] >= 0).all()


def test_grid_and_band():
    assert snap_grid((1000, 200), 320) == (320, 200)
    assert snap_band((256, 256), (80, 80)) == 2  # 0.6 of a 3.2 px cell
    assert snap_band((128, 128), (80, 80)) == 1  # never below 1
