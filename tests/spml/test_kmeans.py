"""Batched spherical k-means: partition, empty clusters, batching, planted regions, faiss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segsearch.spml.config import INFERENCE_GRID
from segsearch.spml.kmeans import (
    KMeansConfig,
    _cluster_sums,
    coordinate_grid,
    grid_labels,
    initial_centroids,
    kmeans_features,
    kmeans_objective,
    reseed_empty,
    spherical_kmeans,
    update_centroids,
)


def _planted_regions(height=32, width=32, dim=16, noise=0.05, seed=0):
    """Three regions (left band, a disk, the rest), each a distinct unit vector plus noise.

    Returns embeddings (1, D, H, W) unit norm and the region map (H, W) long.
    """
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    regions = torch.full((height, width), 2)
    regions[(ys - 20) ** 2 + (xs - 22) ** 2 <= 49] = 1
    regions[xs < 12] = 0
    directions = torch.linalg.qr(torch.randn(dim, 3, generator=generator))[0].T  # orthonormal
    embeddings = directions[regions].permute(2, 0, 1)
    embeddings = embeddings + noise * torch.randn(dim, height, width, generator=generator)
    return F.normalize(embeddings, dim=0).unsqueeze(0), regions


def _voronoi_regions(height, width, dim, num_regions, noise, seed):
    """A random piecewise-constant embedding map: Voronoi cells of random seeds, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    seeds = torch.rand(num_regions, 2, generator=generator) * torch.tensor([height, width])
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    points = torch.stack([ys, xs], dim=-1).float()
    regions = torch.cdist(points.view(-1, 2), seeds).argmin(dim=1).view(height, width)
    directions = F.normalize(torch.randn(num_regions, dim, generator=generator), dim=1)
    embeddings = directions[regions].permute(2, 0, 1)
    embeddings = embeddings + noise * torch.randn(dim, height, width, generator=generator)
    return F.normalize(embeddings, dim=0)


def _smooth_random(batch, dim, height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, dim, 4, 5, generator=generator)
    fine = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    fine = fine + 0.1 * torch.randn(batch, dim, height, width, generator=generator)
    return F.normalize(fine, dim=1)


def _within_segment_coord_std(segment_ids):
    """Mean (over non-empty segments) spatial std of a segment's pixels, coords in [-0.5, 0.5]."""
    height, width = segment_ids.shape[-2:]
    coords = coordinate_grid(height, width)
    ids = segment_ids.reshape(-1)
    stds = [coords[ids == k].std(dim=0).norm() for k in ids.unique() if (ids == k).sum() > 1]
    return torch.stack(stds).mean().item()


def test_segments_partition_every_image_and_prototypes_unit_norm():
    embeddings = _smooth_random(3, 8, 20, 24, seed=1)
    result = spherical_kmeans(embeddings, KMeansConfig(grid=(4, 5)))
    ids = result.segment_ids
    assert ids.shape == (3, 20, 24) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 20 == result.num_segments
    counts = torch.stack([torch.bincount(ids[b].reshape(-1), minlength=20) for b in range(3)])
    assert torch.equal(result.valid, counts > 0)
    assert counts.sum(dim=1).tolist() == [20 * 24] * 3
    norms = result.prototypes.norm(dim=-1)
    torch.testing.assert_close(norms[result.valid], torch.ones_like(norms[result.valid]))
    assert torch.equal(norms[~result.valid], torch.zeros_like(norms[~result.valid]))
    assert result.prototypes.shape == (3, 20, 8) and result.centroids.shape == (3, 20, 10)


@pytest.mark.parametrize("empty_cluster", ["keep", "reseed"])
@pytest.mark.parametrize("init", ["cell_mean", "cell_centre"])
def test_constant_embeddings_never_nan(empty_cluster, init):
    embeddings = F.normalize(torch.ones(2, 4, 12, 12), dim=1)
    config = KMeansConfig(coord_weight=0.0, empty_cluster=empty_cluster, init=init)
    result = spherical_kmeans(embeddings, config)
    assert torch.isfinite(result.prototypes).all() and torch.isfinite(result.centroids).all()
    # All pixels are identical, so they all tie and go to one single cluster.
    assert result.valid.sum(dim=1).tolist() == [1, 1]
    torch.testing.assert_close(result.prototypes[result.valid], embeddings[:, :, 0, 0])


def test_image_smaller_than_grid_has_no_nan():
    embeddings = _smooth_random(2, 6, 3, 4, seed=2)
    result = spherical_kmeans(embeddings, KMeansConfig(grid=(6, 6)))
    assert torch.isfinite(result.prototypes).all() and torch.isfinite(result.centroids).all()
    assert result.valid.sum(dim=1).le(12).all() and int(result.segment_ids.max()) < 36


def test_batched_equals_per_image():
    embeddings = _smooth_random(3, 8, 18, 22, seed=3)
    config = KMeansConfig(grid=(3, 4))
    together = spherical_kmeans(embeddings, config)
    for b in range(3):
        alone = spherical_kmeans(embeddings[b : b + 1], config)
        assert torch.equal(together.segment_ids[b], alone.segment_ids[0])
        torch.testing.assert_close(
            together.prototypes[b], alone.prototypes[0], atol=1e-6, rtol=1e-5
        )
    again = spherical_kmeans(embeddings, config)
    assert torch.equal(together.segment_ids, again.segment_ids)  # deterministic


@pytest.mark.parametrize("coord_weight", [0.0, 1.0])
def test_planted_regions_give_pure_segments(coord_weight):
    embeddings, regions = _planted_regions()
    result = spherical_kmeans(embeddings, KMeansConfig(grid=(6, 6), coord_weight=coord_weight))
    ids = result.segment_ids[0].reshape(-1)
    flat_regions = regions.reshape(-1)
    majorities = set()
    for k in ids.unique():
        members = torch.bincount(flat_regions[ids == k], minlength=3)
        purity = members.max().item() / members.sum().item()
        assert purity > 0.99, f"segment {int(k)} is only {purity:.3f} pure"
        majorities.add(int(members.argmax()))
    assert majorities == {0, 1, 2}  # every region has segments of its own


def test_coordinate_weight_makes_segments_compact():
    noise = torch.randn(1, 8, 24, 24, generator=torch.Generator().manual_seed(4))
    noisy_constant = F.normalize(torch.ones(1, 8, 24, 24) + 0.3 * noise, dim=1)
    scattered = spherical_kmeans(noisy_constant, KMeansConfig(grid=(4, 4), coord_weight=0.0))
    compact = spherical_kmeans(noisy_constant, KMeansConfig(grid=(4, 4), coord_weight=2.0))
    assert _within_segment_coord_std(compact.segment_ids[0]) < 0.5 * _within_segment_coord_std(
        scattered.segment_ids[0]
    )
    # When the coordinates outweigh the noise, the segmentation stays close to the initial grid.
    # (Much larger weights do not help: coordinates centred on the image and re-normalised
    # lose their radial part, and segments turn into wedges around the centre.)
    agreement = (compact.segment_ids[0] == grid_labels(24, 24, (4, 4))).float().mean()
    assert agreement > 0.85
    # ... which the noise-driven clustering is not.
    assert (scattered.segment_ids[0] == grid_labels(24, 24, (4, 4))).float().mean() < 0.5


def test_objective_never_decreases_with_more_iterations():
    embeddings = _voronoi_regions(24, 24, 8, 10, noise=0.3, seed=5).unsqueeze(0).double()
    features = kmeans_features(embeddings, 1.0)
    objectives = []
    for iterations in range(1, 8):
        result = spherical_kmeans(embeddings, KMeansConfig(grid=(4, 4), iterations=iterations))
        objectives.append(kmeans_objective(features, result.segment_ids, result.centroids).item())
    assert all(b >= a - 1e-9 for a, b in zip(objectives, objectives[1:])), objectives
    assert objectives[-1] > objectives[0]


def test_objective_matches_hand_computation():
    features = F.normalize(torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(6)), dim=-1)
    ids = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 1]])
    generator = torch.Generator().manual_seed(7)
    centroids = F.normalize(torch.randn(2, 2, 3, generator=generator), dim=-1)
    expected = torch.stack(
        [sum(features[b, i] @ centroids[b, ids[b, i]] for i in range(5)) for b in range(2)]
    )
    torch.testing.assert_close(kmeans_objective(features, ids, centroids), expected)
    # Without centroids, the segments' normalised means are used: never worse than given ones.
    assert (kmeans_objective(features, ids) >= expected - 1e-6).all()


def test_cluster_sums_cpu_and_matmul_paths_agree():
    """The CUDA path (one-hot matmul) must sum the same features as the CPU path (index_add)."""
    generator = torch.Generator().manual_seed(12)
    features = torch.randn(3, 50, 4, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, 6, (3, 50), generator=generator)
    via_index_add = _cluster_sums(features, ids, 7, matmul=False)
    via_matmul = _cluster_sums(features, ids, 7, matmul=True)
    torch.testing.assert_close(via_index_add, via_matmul)
    expected = torch.stack([features[1][ids[1] == k].sum(0) for k in range(7)])
    torch.testing.assert_close(via_index_add[1], expected)


def test_update_keeps_previous_centroid_of_empty_and_cancelling_clusters():
    features = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    ids = torch.tensor([[0, 0, 1, 1]])  # cluster 0 cancels to zero, cluster 2 is empty
    previous = F.normalize(torch.tensor([[[1.0, 1.0], [1.0, -1.0], [-1.0, 0.5]]]), dim=-1)
    centroids, counts = update_centroids(features, ids, previous)
    assert counts.tolist() == [[2, 2, 0]]
    assert torch.equal(centroids[0, 0], previous[0, 0])
    assert torch.equal(centroids[0, 2], previous[0, 2])
    torch.testing.assert_close(centroids[0, 1], torch.tensor([0.0, 1.0]))


def test_reseed_moves_empty_clusters_to_distinct_worst_pixels():
    features = torch.eye(4).unsqueeze(0)  # four pixels, one per axis
    centroids = torch.eye(4)[[0, 1, 1, 1]].unsqueeze(0).clone()
    counts = torch.tensor([[2, 2, 0, 0]])
    similarity = torch.tensor([[1.0, 0.2, 0.1, 0.5]])  # worst: pixel 2, then pixel 1
    reseeded = reseed_empty(features, similarity, centroids, counts)
    assert torch.equal(reseeded[0, :2], centroids[0, :2])
    assert torch.equal(reseeded[0, 2], features[0, 2])
    assert torch.equal(reseeded[0, 3], features[0, 1])


def test_prototypes_carry_gradients_but_segment_ids_do_not():
    embeddings = _smooth_random(2, 6, 10, 10, seed=8).requires_grad_(True)
    result = spherical_kmeans(embeddings, KMeansConfig(grid=(3, 3)))
    assert result.prototypes.requires_grad and not result.segment_ids.requires_grad
    assert not result.centroids.requires_grad
    (result.prototypes * torch.randn_like(result.prototypes)).sum().backward()
    assert torch.isfinite(embeddings.grad).all() and embeddings.grad.abs().sum() > 0


def test_config_validation_and_inference_grid():
    assert KMeansConfig().grid == (6, 6) and KMeansConfig().num_segments == 36
    assert KMeansConfig(grid=INFERENCE_GRID).num_segments == 64
    bad_settings = [
        dict(grid=(0, 3)),
        dict(iterations=0),
        dict(coord_weight=-1.0),
        dict(init="x"),
        dict(empty_cluster="x"),
    ]
    for bad in bad_settings:
        with pytest.raises(ValueError):
            KMeansConfig(**bad)


def test_objective_close_to_faiss_spherical_kmeans():
    faiss = pytest.importorskip("faiss")
    embeddings = _voronoi_regions(40, 40, 16, 12, noise=0.4, seed=9).unsqueeze(0)
    config = KMeansConfig(grid=(4, 4), iterations=10)
    features = kmeans_features(embeddings, config.coord_weight)
    ours = spherical_kmeans(embeddings, config)
    ours_objective = kmeans_objective(features, ours.segment_ids, num_segments=16).item()

    points = np.ascontiguousarray(features[0].numpy(), dtype=np.float32)
    kmeans = faiss.Kmeans(points.shape[1], 16, niter=10, spherical=True, seed=123, verbose=False)
    kmeans.train(points)
    _, faiss_ids = kmeans.index.search(points, 1)
    faiss_ids = torch.from_numpy(faiss_ids.reshape(1, -1)).long()
    faiss_objective = kmeans_objective(features, faiss_ids, num_segments=16).item()
    assert ours_objective >= 0.97 * faiss_objective, (ours_objective, faiss_objective)


def test_same_assignment_as_faiss_from_the_same_grid_init():
    """faiss.Kmeans(niter=n) then search = n+1 assignment steps from the same start."""
    faiss = pytest.importorskip("faiss")
    embeddings = _voronoi_regions(30, 30, 16, 10, noise=0.4, seed=11).unsqueeze(0)
    config = KMeansConfig(grid=(3, 3), iterations=6)
    features = kmeans_features(embeddings, config.coord_weight)
    ours = spherical_kmeans(embeddings, config)

    points = np.ascontiguousarray(features[0].numpy(), dtype=np.float32)
    start = initial_centroids(features, 30, 30, config)[0].numpy()
    kmeans = faiss.Kmeans(points.shape[1], 9, niter=5, spherical=True, verbose=False)
    kmeans.train(points, init_centroids=start)
    _, faiss_ids = kmeans.index.search(points, 1)
    faiss_ids = torch.from_numpy(faiss_ids.reshape(-1))
    agreement = (faiss_ids == ours.segment_ids.reshape(-1)).float().mean()
    assert agreement > 0.999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    embeddings, _ = _planted_regions()
    embeddings = torch.cat([embeddings, _smooth_random(1, 16, 32, 32, seed=10)])
    config = KMeansConfig(grid=(6, 6))
    on_cpu = spherical_kmeans(embeddings, config)
    on_gpu = spherical_kmeans(embeddings.cuda(), config)
    assert on_gpu.segment_ids.is_cuda and on_gpu.prototypes.is_cuda
    agreement = (on_gpu.segment_ids.cpu() == on_cpu.segment_ids).float().mean().item()
    assert agreement > 0.99
    if agreement == 1.0:
        torch.testing.assert_close(on_gpu.prototypes.cpu(), on_cpu.prototypes, atol=1e-5, rtol=1e-4)
