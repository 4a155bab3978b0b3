"""Finer-than-stride assignment, worked out by hand on a 4x4 embedding map."""
import numpy as np
import torch

from segsearch.spml.refine import assign_finer, continued_coordinates, finer_size
from segsearch.spml.segmenter import upsample_nearest


def test_continued_coordinates_meet_the_kmeans_grid_on_the_embedding_pixels():
    np.testing.assert_allclose(continued_coordinates(4, 4), torch.linspace(-0.5, 0.5, 4), atol=1e-6)
    # 2x finer: pixel centres at low-res positions -0.25, 0.25, 0.75, ... (half-pixel convention)
    np.testing.assert_allclose(continued_coordinates(4, 8)[:3], [-0.5 - 0.25 / 3, -0.5 + 0.25 / 3, -0.5 + 0.75 / 3],
                               atol=1e-6)


def test_the_border_falls_where_the_interpolated_embedding_crosses_over():
    # columns of a 4x4 map: (1, 0), (1, 0), (0.6, 0.8), (0, 1); centroids (1, 0) and (0, 1), no coordinates.
    columns = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    embeddings = columns.T[:, None, :].expand(2, 4, 4).contiguous()  # (D=2, h=4, w=4)
    centroids = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    ids = assign_finer(embeddings, centroids, torch.tensor([True, True]), (10, 10), coord_weight=0.0)
    # between columns 1 and 2 the mix (1 - 0.4 t, 0.8 t) is equidistant at t = 1/1.2, i.e. low-res
    # x = 1.833, fine x = (1.833 + 0.5) * 2.5 - 0.5 = 5.33: fine columns 0..5 -> 0, 6..9 -> 1.
    np.testing.assert_array_equal(ids.numpy(), np.repeat([[0] * 6 + [1] * 4], 10, axis=0))
    # nearest upsampling of the same map puts the border on the grid, between 4 and 5
    nearest = upsample_nearest(np.repeat([[0, 0, 1, 1]], 4, axis=0), 10, 10)
    assert nearest[0].tolist() == [0] * 5 + [1] * 5


def test_an_empty_cluster_is_never_chosen():
    embeddings = torch.tensor([1.0, 0.0]).view(2, 1, 1).expand(2, 3, 3).contiguous()
    centroids = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    ids = assign_finer(embeddings, centroids, torch.tensor([False, True]), (6, 6), coord_weight=1.0)
    assert (ids == 1).all()


def test_the_finer_grid_is_bounded_by_the_image_and_refine_size():
    assert finer_size((128, 96), 320, (80, 80)) == (128, 96)
    assert finer_size((1000, 700), 320, (80, 80)) == (320, 320)
    assert finer_size((40, 30), 320, (80, 80)) == (80, 80)  # never coarser than the embedding map
    assert finer_size((1000, 700), 0, (80, 80)) == (80, 80)
