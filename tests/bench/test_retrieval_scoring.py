"""Retrieval scoring (bench/retrieval_scoring.py) on hand-made cases with known answers."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from retrieval_scoring import (  # noqa: E402
    chance_scores, colour_histogram, latency_percentiles, majority_class, rank_by_cosine, score_hits,
    summarise,
)

# Two index images of 4x4 pixels, classes 0..2.
TRUTH_A = np.array([[0, 0, 1, 1],
                    [0, 0, 1, 1],
                    [0, 0, 1, 1],
                    [2, 2, 2, 2]])
TRUTH_B = np.array([[1, 1, 1, 1],
                    [1, 1, 1, 1],
                    [0, 0, 2, 2],
                    [0, 0, 2, 2]])


def counts(truth, mask):
    return np.bincount(truth[mask], minlength=3)


def box(y0, y1, x0, x1):
    mask = np.zeros((4, 4), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_precision_pixel_precision_and_area_ratio_of_a_hand_made_ranking():
    hits = [
        counts(TRUTH_A, box(0, 3, 0, 2)),  # 6 px, all class 0: hit
        counts(TRUTH_A, box(0, 4, 0, 2)),  # 8 px, 6 of class 0: majority 0, hit
        counts(TRUTH_B, box(0, 2, 0, 4)),  # 8 px, class 1: miss
        counts(TRUTH_B, box(1, 4, 0, 2)),  # 6 px, 2 of class 1 + 4 of class 0: majority 0, hit
    ]
    score = score_hits(query_class=0, query_area=4.0, hits_class_pixels=hits, k=4)
    assert score.precision_at_k == pytest.approx(3 / 4)
    assert score.pixel_precision == pytest.approx((6 + 6 + 0 + 4) / (6 + 8 + 8 + 6))
    assert score.area_ratio == pytest.approx(np.median([6 / 4, 8 / 4, 8 / 4, 6 / 4]))


def test_precision_at_10_counts_missing_hits_as_misses_and_uses_only_the_first_k():
    class_0 = np.array([5, 0, 0])
    class_2 = np.array([0, 0, 5])
    assert score_hits(0, 5.0, [class_0] * 4, k=10).precision_at_k == pytest.approx(0.4)
    ranked = [class_0] * 7 + [class_2] * 3 + [class_0] * 5  # hits 11..15 must not count
    score = score_hits(0, 5.0, ranked, k=10)
    assert score.precision_at_k == pytest.approx(0.7)
    assert score.pixel_precision == pytest.approx(0.7)
    assert score.area_ratio == pytest.approx(1.0)


def test_majority_ties_go_to_the_lower_class():
    assert majority_class(np.array([2, 2, 1])) == 0
    assert majority_class(np.array([0, 3, 3])) == 1


def test_chance_is_the_share_of_candidates_of_the_query_class():
    candidates = np.array([[4, 0, 0], [3, 1, 0], [0, 4, 0], [0, 0, 8]])
    chance = chance_scores(query_class=0, query_area=4.0, candidates_class_pixels=candidates)
    assert chance.precision_at_k == pytest.approx(2 / 4)
    assert chance.pixel_precision == pytest.approx(7 / 20)
    assert chance.area_ratio == pytest.approx(1.0)  # median candidate area 4 / query area 4


def test_rank_by_cosine_orders_by_angle_not_length_and_breaks_ties_stably():
    candidates = np.array([[0.0, 1.0], [10.0, 0.1], [1.0, 0.0], [2.0, 0.0]])
    assert rank_by_cosine(np.array([1.0, 0.0]), candidates, k=3).tolist() == [2, 3, 1]


def test_colour_histogram_is_l1_normalised_over_8x8x8_bins():
    pixels = np.array([[0, 0, 0], [255, 255, 255], [255, 255, 255], [31, 32, 0]], dtype=np.uint8)
    histogram = colour_histogram(pixels)
    assert histogram.shape == (512,)
    assert histogram.sum() == pytest.approx(1.0)
    assert histogram[0] == pytest.approx(0.25)  # black
    assert histogram[511] == pytest.approx(0.5)  # white
    assert histogram[(0 * 8 + 1) * 8 + 0] == pytest.approx(0.25)  # r=31 -> bin 0, g=32 -> bin 1


def test_summary_and_latency():
    summary = summarise([score_hits(0, 5.0, [np.array([5, 0])] * 10, 10),
                         score_hits(1, 5.0, [np.array([5, 0])] * 10, 10)])
    assert (summary.num_queries, summary.precision_at_k, summary.pixel_precision) == (2, 0.5, 0.5)
    latency = latency_percentiles([0.010] * 99 + [1.0])
    assert latency["p50_ms"] == pytest.approx(10.0)
    assert latency["p99_ms"] > 10.0


def test_an_empty_query_region_is_refused():
    with pytest.raises(ValueError):
        score_hits(0, 0.0, [np.array([1, 0])], 10)
