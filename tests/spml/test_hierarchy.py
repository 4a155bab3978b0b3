"""The region hierarchy on hand-made maps: known regions come back, contours block merges,
every cut is a partition and coarser cuts are unions of finer ones."""
import numpy as np
import pytest

from segsearch.spml.hierarchy import (
    border_statistics,
    build_hierarchy,
    count_at_height,
    cut_by_count,
    cut_by_height,
    region_sums,
)


def _blocks(rows: int, cols: int, size: int) -> np.ndarray:
    """A `(rows*size, cols*size)` map of `rows x cols` square fine segments, row-major ids."""
    ids = np.arange(rows * cols).reshape(rows, cols)
    return np.kron(ids, np.ones((size, size), dtype=np.int64))


def test_border_statistics_count_pairs_and_take_the_stronger_pixel():
    label_map = np.array([[0, 0, 1],
                          [2, 2, 1]])
    edges = np.array([[0.0, 0.5, 0.1],
                      [0.2, 0.0, 0.3]])
    length, strength = border_statistics(label_map, edges, 3)
    # 0|1: (0,1)-(0,2) -> max(0.5, 0.1); 2|1: (1,1)-(1,2) -> 0.3; 0|2: two vertical pairs -> 0.2 + 0.5
    np.testing.assert_array_equal(length, [[0, 1, 2], [1, 0, 1], [2, 1, 0]])
    np.testing.assert_allclose(strength, [[0, 0.5, 0.7], [0.5, 0, 0.3], [0.7, 0.3, 0]])


def test_the_cut_at_the_true_count_recovers_the_regions_of_an_embedding_map():
    # 4x4 fine segments of 3 px; three true regions: the left half, the top right, the bottom right.
    label_map = _blocks(4, 4, 3)
    truth = np.array([0, 0, 1, 1,
                      0, 0, 1, 1,
                      0, 0, 2, 2,
                      0, 0, 2, 2])
    directions = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    rng = np.random.default_rng(0)
    sums = 9 * (directions[truth] + 0.1 * rng.standard_normal((16, 3)))  # 9 px per segment
    tree = build_hierarchy(label_map, sums, np.zeros(label_map.shape), contour_weight=1.0)
    regions = cut_by_count(tree, 3)
    # the same partition as the truth, whatever the numbering
    assert len(set(zip(regions.tolist(), truth.tolist()))) == 3 == regions.max() + 1
    # the two merges left above the cut join unlike regions: far higher than the within-region ones
    assert tree.merge_heights[-2] > 0.5 > tree.merge_heights[-3]
    assert count_at_height(tree, 0.5) == 3
    np.testing.assert_array_equal(cut_by_height(tree, 0.5), regions)


def test_a_strong_contour_prevents_a_merge_that_similarity_alone_would_make():
    # A | B | C, two columns each; A and B are identical, C is close (cosine 0.9) to both.
    label_map = np.repeat(np.array([[0, 0, 1, 1, 2, 2]]), 4, axis=0)
    sums = np.array([[1.0, 0.0], [1.0, 0.0], [0.9, np.sqrt(0.19)]])
    edges = np.zeros(label_map.shape)
    edges[:, 1] = 1.0  # a contour on A's side of the A|B border; B|C has none

    similarity_only = build_hierarchy(label_map, sums, edges, contour_weight=0.0)
    assert similarity_only.parents[0] == similarity_only.parents[1] == 3  # A and B first, at 0

    tree = build_hierarchy(label_map, sums, edges, contour_weight=1.0)
    np.testing.assert_array_equal(tree.parents, [4, 3, 3, 4, -1])  # B+C first, then A
    # B+C: 1 - 0.9 = 0.1. A vs B+C: prototype (1.9, 0.436)/1.949 -> cosine 1.9/sqrt(3.8),
    # plus the full contour of the A|B border (mean strength 1).
    np.testing.assert_allclose(tree.heights, [0, 0, 0, 0.1, 1 - 1.9 / np.sqrt(3.8) + 1.0])
    np.testing.assert_array_equal(cut_by_count(tree, 2), [0, 1, 1])


def test_a_merged_prototype_is_the_normalised_sum_of_its_parts():
    # three segments in a row; 0 and 1 merge first. 0 has 9 times the pixels of 1, so the merged
    # prototype is nearly 0's direction: then 2 (equal to 0) is cheap to join, not far as with 1.
    label_map = np.array([[0, 1, 2]])
    sums = np.array([[9.0, 0.0], [0.0, 0.5], [1.0, 0.0]])
    edges = np.zeros(label_map.shape)
    edges[0, 1] = 0.0
    tree = build_hierarchy(label_map, sums, edges, contour_weight=0.0)
    merged = sums[0] + sums[1]
    cosine = merged[0] / np.linalg.norm(merged)  # with 2's direction (1, 0)
    # first merge: 0-1 costs 1, 1-2 costs 1: a tie, the lower pair (0, 1) goes first
    np.testing.assert_allclose(tree.heights[3:], [1.0, max(1.0, 1 - cosine)])
    np.testing.assert_allclose(region_sums(sums, np.array([0, 0, 1]), 2), [merged, sums[2]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_cut_is_a_partition_and_coarser_cuts_are_unions_of_finer_ones(seed):
    rng = np.random.default_rng(seed)
    label_map = _blocks(5, 6, 2)
    num = 30
    tree = build_hierarchy(label_map, rng.standard_normal((num, 8)), rng.random(label_map.shape), 0.5)
    parents = tree.parents
    assert parents.shape == (2 * num - 1,) and (parents == -1).sum() == 1 and parents[-1] == -1
    assert (parents[:-1] > np.arange(2 * num - 2)).all()  # a parent is made after its children
    np.testing.assert_array_equal(np.bincount(parents[:-1]), [0] * num + [2] * (num - 1))
    assert (np.diff(tree.merge_heights) >= 0).all()
    previous = None
    for count in range(num, 0, -1):
        regions = cut_by_count(tree, count)
        assert regions.shape == (num,) and sorted(set(regions.tolist())) == list(range(count))
        if previous is not None:  # each finer region lies inside exactly one coarser region
            assert all(len(set(regions[previous == r].tolist())) == 1 for r in range(count + 1))
        previous = regions
    for height in tree.merge_heights:
        assert cut_by_height(tree, height).max() + 1 == count_at_height(tree, height)


def test_pieces_that_share_no_border_still_end_in_one_root():
    label_map = np.array([[0, -1, 1, -1, 2]])
    tree = build_hierarchy(label_map, np.eye(3), np.zeros(label_map.shape), 1.0)
    assert (tree.parents == -1).sum() == 1
    np.testing.assert_array_equal(cut_by_count(tree, 1), [0, 0, 0])
    np.testing.assert_array_equal(cut_by_count(tree, 99), [0, 1, 2])


def test_empty_and_single_leaf_trees():
    empty = build_hierarchy(np.full((2, 2), -1), np.zeros((0, 4)), np.zeros((2, 2)), 1.0)
    assert empty.num_leaves == 0 and cut_by_count(empty, 3).size == 0
    single = build_hierarchy(np.zeros((2, 2), np.int64), np.ones((1, 4)), np.zeros((2, 2)), 1.0)
    np.testing.assert_array_equal(single.parents, [-1])
    np.testing.assert_array_equal(cut_by_count(single, 5), [0])


def test_the_size_factor_lets_small_fragments_merge_before_large_regions():
    # 0 | 1 | 2 | 3 in a row: 0-1 large and close (cosine 0.8), 2-3 small and less close (0.7),
    # 1-2 unlike (cosine 0).
    label_map = np.array([[0, 1, 2, 3]])
    sums = np.array([[1.0, 0, 0], [0.8, 0.6, 0], [0, 0, 1.0], [0, np.sqrt(0.51), 0.7]])
    areas = np.array([0.4, 0.4, 0.1, 0.1])
    edges = np.zeros(label_map.shape)
    plain = build_hierarchy(label_map, sums, edges, 0.0)
    assert plain.parents[0] == plain.parents[1] == 4  # 0-1 first, at 0.2
    np.testing.assert_allclose(plain.heights[4], 0.2)
    sized = build_hierarchy(label_map, sums, edges, 0.0, areas, size_exponent=1.0)
    # 2-3: 0.3 x (2 * 0.1 * 0.1 / 0.2) = 0.03 beats 0-1: 0.2 x (2 * 0.4 * 0.4 / 0.8) = 0.08
    assert sized.parents[2] == sized.parents[3] == 4 and sized.parents[0] == sized.parents[1] == 5
    np.testing.assert_allclose(sized.heights[4:6], [0.03, 0.08])
