"""Edges at inference: HED from the backbone's own blocks equals the HED detector; Sobel."""
import numpy as np
import torch

from segsearch.spml.edges import edge_function, resize_edges, sobel_edges
from segsearch.spml.hed import HedEdgeDetector
from segsearch.spml.vgg import SmallBackbone


def test_hed_side_outputs_on_the_embedding_backbone_equal_the_hed_detector():
    detector = HedEdgeDetector.pretrained()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 40, 48))).float()
    with torch.inference_mode():
        blocks = detector.backbone(images)
        edges = edge_function(detector.backbone, hed_weights=True)(images, blocks)
        expected = detector(images)
    torch.testing.assert_close(edges, expected, atol=1e-5, rtol=1e-4)


def test_sobel_peaks_on_a_step_and_is_scaled_to_one():
    images = torch.zeros(2, 3, 8, 8)
    images[0, :, :, 4:] = 200.0  # a vertical step between columns 3 and 4
    edges = sobel_edges(images)
    assert edges.shape == (2, 1, 8, 8) and float(edges[0].max()) == 1.0
    assert torch.equal(edges[0, 0, :, 3], torch.ones(8)) and torch.equal(edges[0, 0, :, 4], torch.ones(8))
    assert float(edges[0, 0, :, :3].max()) == 0.0 and float(edges[1].abs().max()) == 0.0  # flat: no NaN


def test_a_backbone_without_hed_weights_gets_sobel():
    images = torch.zeros(1, 3, 8, 8)
    images[..., 4:] = 255.0
    edges = edge_function(SmallBackbone(), hed_weights=True)(images, [])
    torch.testing.assert_close(edges, sobel_edges(images))


def test_shrinking_edges_keeps_a_thin_contour():
    edges = torch.zeros(1, 8, 8)
    edges[0, :, 5] = 1.0  # one pixel wide
    assert torch.equal(resize_edges(edges, (4, 4))[:, 2], torch.ones(4))
