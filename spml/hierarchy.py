"""A region hierarchy per image: fine segments merged agglomeratively, every cut available.

Why: k-means over-segments on purpose (64 compact segments per image), so a hit is a sliver of
an object. SPML's segments should follow both the semantics (the embedding) and the image
(contours). Here the fine segments are merged greedily, always the adjacent pair with the
lowest merge cost

    cost(a, b) = [(1 - cos(p_a, p_b)) + contour_weight * contour(a, b)] * size(a, b) ** size_exponent
    size(a, b) = 2 * area_a * area_b / (area_a + area_b)      (areas as fractions of the image)

where `p` is a segment's prototype (the normalised sum of its pixels' embeddings; a merged
segment's sum is the sum of its parts' sums, so its prototype is exact, not an average of
averages) and `contour(a, b)` is the mean edge strength over the 4-connected pixel pairs of
their shared border (each pair counts the stronger of its two pixels). A strong contour
between two look-alike segments keeps them apart; a faint border between unlike ones does
not merge them either. Pairs that share no border never merge while any adjacent pair is
left (they would only join disconnected pieces at the very top of the tree).

The size factor (the harmonic mean of the two areas, as in Ward's linkage) lets small
fragments merge into their surroundings before large regions merge with each other. Without
it a textured region stays in pieces until late: in a brick wall the embedding tells brick
from mortar and HED draws every brick's outline, so brick-mortar pairs look as unlike as two
different textures (measured in bench/RESULTS.md, "Segments: region hierarchy").

As in an ultrametric contour map, each merge gets a height, `max(cost, heights of its
children)`, so heights never decrease along the merge sequence and any threshold gives a
partition: cutting at height `t` keeps exactly the merges of height `<= t`; cutting at a
count `r` keeps the first `n - r` merges.

Nodes: the `n` leaves are the fine segments `0..n-1`; merge `i` makes node `n + i`. The
tree of `n >= 1` leaves has one root (parent -1) and `2n - 1` nodes. Pure numpy; `n` is a
few dozen, so each merge recomputes the (n, n) cost matrix of the live nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NORM_EPS = 1e-12
NO_PARENT = -1


@dataclass(frozen=True)
class RegionTree:
    """The merge sequence of one image's fine segments.

    parents: `(2n - 1,)` int64, the node each node merges into (-1 for the root).
    heights: `(2n - 1,)` float64, the height of each node's merge (0 for leaves), non-decreasing
        over nodes `n..2n-2` (the merge order).
    num_leaves: n.
    """

    parents: np.ndarray
    heights: np.ndarray
    num_leaves: int

    @property
    def merge_heights(self) -> np.ndarray:
        """`(n - 1,)` the heights of the merges, in merge order (non-decreasing)."""
        return self.heights[self.num_leaves:]


def border_statistics(label_map: np.ndarray, edges: np.ndarray, num: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared borders of segments `0..num-1` in `label_map` `(h, w)` (-1 = no segment).

    Returns `(length, strength)`, both `(num, num)` symmetric float64: the number of
    4-connected pixel pairs between two segments, and the sum over those pairs of the larger
    of the two pixels' values in `edges` `(h, w)` (in [0, 1]).
    """
    if label_map.shape != edges.shape:
        raise ValueError(f"label map {label_map.shape} and edge map {edges.shape} differ in shape")
    keys, values = [], []
    for first, second, edge_a, edge_b in (
        (label_map[:, :-1], label_map[:, 1:], edges[:, :-1], edges[:, 1:]),
        (label_map[:-1, :], label_map[1:, :], edges[:-1, :], edges[1:, :]),
    ):
        border = (first != second) & (first >= 0) & (second >= 0)
        keys.append(first[border].astype(np.int64) * num + second[border])
        values.append(np.maximum(edge_a[border], edge_b[border]))
    keys_all, values_all = np.concatenate(keys), np.concatenate(values).astype(np.float64)
    length = np.bincount(keys_all, minlength=num * num).reshape(num, num).astype(np.float64)
    strength = np.bincount(keys_all, weights=values_all, minlength=num * num).reshape(num, num)
    return length + length.T, strength + strength.T


def build_hierarchy(label_map: np.ndarray, sums: np.ndarray, edges: np.ndarray, contour_weight: float,
                    areas: np.ndarray | None = None, size_exponent: float = 0.0) -> RegionTree:
    """Merge the fine segments of one image into a tree.

    label_map: `(h, w)` int, segment `0..n-1` of each pixel (-1: none).
    sums: `(n, D)` the embedding sum of each segment (any positive scale of it: only
        directions matter, and sums add when segments merge).
    edges: `(h, w)` contour strength in [0, 1] at the label map's resolution.
    contour_weight: weight of the mean border contour against the prototype dissimilarity.
    areas: `(n,)` each segment's share of the image (needed when `size_exponent` > 0).
    size_exponent: power of the size factor (0: sizes play no part).
    """
    num = int(sums.shape[0])
    if num == 0:
        return RegionTree(np.zeros(0, np.int64), np.zeros(0), 0)
    length, strength = border_statistics(np.asarray(label_map), np.asarray(edges, np.float64), num)
    total = 2 * num - 1
    node_length = np.zeros((total, total))
    node_strength = np.zeros((total, total))
    node_length[:num, :num], node_strength[:num, :num] = length, strength
    node_sums = np.zeros((total, sums.shape[1]))
    node_sums[:num] = sums
    node_areas = np.ones(total)
    if size_exponent:
        node_areas[:num] = areas
    live = np.zeros(total, dtype=bool)
    live[:num] = True
    parents = np.full(total, NO_PARENT, dtype=np.int64)
    heights = np.zeros(total)
    for new in range(num, total):
        first, second, cost = _cheapest_pair(node_sums, node_areas, node_length, node_strength, live,
                                             contour_weight, size_exponent)
        parents[[first, second]] = new
        heights[new] = max(cost, heights[first], heights[second])
        node_sums[new] = node_sums[first] + node_sums[second]
        node_areas[new] = node_areas[first] + node_areas[second]
        for matrix in (node_length, node_strength):
            matrix[new] = matrix[first] + matrix[second]
            matrix[:, new] = matrix[new]
            matrix[new, new] = 0.0
        live[[first, second]] = False
        live[new] = True
    return RegionTree(parents, heights, num)


def merge_costs(sums: np.ndarray, length: np.ndarray, strength: np.ndarray, contour_weight: float,
                areas: np.ndarray | None = None, size_exponent: float = 0.0) -> np.ndarray:
    """`(m, m)` merge cost of every pair of `m` nodes (inf where they share no border and on the
    diagonal), from their sums `(m, D)`, border lengths and strengths `(m, m)` and, when
    `size_exponent` > 0, their areas `(m,)` (see the module docstring)."""
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    directions = sums / np.maximum(norms, NORM_EPS)
    dissimilarity = 1.0 - directions @ directions.T
    adjacent = length > 0
    contour = np.where(adjacent, strength / np.where(adjacent, length, 1.0), 1.0)
    cost = dissimilarity + contour_weight * contour
    if size_exponent:
        harmonic = 2.0 * np.outer(areas, areas) / np.maximum(areas[:, None] + areas[None, :], NORM_EPS)
        cost = cost * harmonic ** size_exponent
    cost[~adjacent] = np.inf
    np.fill_diagonal(cost, np.inf)
    return cost


def _cheapest_pair(sums, areas, length, strength, live, contour_weight, size_exponent) -> tuple[int, int, float]:
    """The live pair to merge next: lowest cost among adjacent pairs; when no live pair is
    adjacent (disconnected pieces), the cheapest pair as if it shared a full-strength contour."""
    nodes = np.flatnonzero(live)
    sub = np.ix_(nodes, nodes)
    cost = merge_costs(sums[nodes], length[sub], strength[sub], contour_weight, areas[nodes], size_exponent)
    if not np.isfinite(cost).any():
        apart = np.ones_like(length[sub])  # full length, full contour: every pair "adjacent"
        cost = merge_costs(sums[nodes], apart, apart, contour_weight, areas[nodes], size_exponent)
    flat = int(np.argmin(cost))  # row-major: ties go to the lowest pair of node ids
    first, second = divmod(flat, nodes.size)
    return int(nodes[first]), int(nodes[second]), float(cost[first, second])


def cut_by_count(tree: RegionTree, count: int) -> np.ndarray:
    """`(n,)` int64 region `0..r-1` of each leaf when the tree is cut into `r = clip(count, 1, n)`
    regions (the first `n - r` merges applied). Regions are numbered by their root node id."""
    count = min(max(int(count), 1), max(tree.num_leaves, 1))
    return _regions_after(tree, tree.num_leaves - count)


def cut_by_height(tree: RegionTree, threshold: float) -> np.ndarray:
    """`(n,)` int64 region of each leaf keeping the merges of height `<= threshold`."""
    applied = int(np.searchsorted(tree.merge_heights, threshold, side="right"))
    return _regions_after(tree, applied)


def count_at_height(tree: RegionTree, threshold: float) -> int:
    """Number of regions of the cut at `threshold`."""
    return tree.num_leaves - int(np.searchsorted(tree.merge_heights, threshold, side="right"))


def _regions_after(tree: RegionTree, applied: int) -> np.ndarray:
    """Each leaf's top node among the first `applied` merges, numbered 0..r-1 by node id."""
    if tree.num_leaves == 0:
        return np.zeros(0, np.int64)
    limit = tree.num_leaves + applied  # nodes below this id exist in the cut
    top = np.arange(tree.num_leaves)
    while True:
        parent = tree.parents[top]
        climb = (parent >= 0) & (parent < limit)
        if not climb.any():
            break
        top = np.where(climb, parent, top)
    _, regions = np.unique(top, return_inverse=True)
    return regions.astype(np.int64)


def region_sums(leaf_sums: np.ndarray, regions: np.ndarray, num_regions: int) -> np.ndarray:
    """`(r, D)` sum of the leaves' sums `(n, D)` per region (`regions` `(n,)` from a cut)."""
    out = np.zeros((num_regions, leaf_sums.shape[1]), dtype=np.float64)
    np.add.at(out, regions, leaf_sums)
    return out
