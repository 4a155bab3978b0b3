"""Padding reaches no k-means segment, no prototype and no relation."""
import torch
import torch.nn.functional as F

from segsearch.spml.kmeans import KMeansConfig, spherical_kmeans
from segsearch.trainer.relations import LossConfig, MemoryBank, Relation, relation_losses
from segsearch.trainer.training_segments import IGNORE, build_training_segments, masked_kmeans

AXES = torch.eye(3)


def _padded_batch():
    """2 images of 2x4 pixels whose last column is padding. Image content: image 0 is axis 0
    on the left half, axis 1 on the right (labelled 2 | unlabelled); image 1 is axis 1 | axis 0,
    unlabelled. Padding holds axis 2, a direction no real pixel has."""
    embeddings = torch.zeros(2, 3, 2, 4)
    embeddings[0, :, :, :2] = AXES[0].view(3, 1, 1)
    embeddings[0, :, :, 2:] = AXES[1].view(3, 1, 1)
    embeddings[1, :, :, :2] = AXES[1].view(3, 1, 1)
    embeddings[1, :, :, 2:] = AXES[0].view(3, 1, 1)
    embeddings[:, :, :, 3] = AXES[2].view(1, 3, 1)
    valid = torch.ones(2, 2, 4, dtype=torch.bool)
    valid[:, :, 3] = False
    labels = torch.full((2, 2, 4), IGNORE)
    labels[0, :, :2] = 2
    clusters = torch.tensor([0, 0, 1, 1]).repeat(2, 2, 1)
    contours = torch.tensor([0, 0, 1, 1]).repeat(2, 2, 1)
    tags = torch.tensor([[False, False, True, False], [False, False, False, True]])
    return embeddings, clusters, contours, labels, valid, tags


def test_padding_gets_no_segment_and_no_share_of_a_prototype():
    embeddings, clusters, contours, labels, valid, _ = _padded_batch()
    segments = build_training_segments(embeddings, clusters, contours, labels, valid)
    pixel_segment = segments.pixel_segment.view(2, 2, 4)
    assert (pixel_segment[~valid] == -1).all()
    assert (pixel_segment[valid] >= 0).all()
    # per image: (cluster 0, region 0) and (cluster 1, region 1), the latter only at column 2
    assert segments.num_segments == 4
    # the padded column (axis 2) shares cluster 1 with column 2 (axis 1 / axis 0) but adds
    # nothing: every prototype is exactly its real pixels' direction
    expected = torch.stack([AXES[0], AXES[1], AXES[1], AXES[0]])
    assert torch.allclose(segments.prototypes, expected, atol=1e-6)


def test_padding_reaches_no_relation():
    embeddings, clusters, contours, labels, valid, tags = _padded_batch()
    embeddings = (embeddings + 0.1 * torch.randn(2, 3, 2, 4, generator=torch.Generator().manual_seed(0)))
    embeddings = F.normalize(embeddings, dim=1).requires_grad_(True)
    segments = build_training_segments(embeddings, clusters, contours, labels, valid)
    pixels = embeddings.permute(0, 2, 3, 1).reshape(-1, 3)
    bank = MemoryBank(0).concat(3, tags.shape[1], "cpu")
    config = LossConfig(annotation=Relation(1.0, 6), cooccurrence=Relation(1.0, 8),
                        lowlevel=Relation(1.0, 16), affinity=Relation(1.0, 8))
    losses = relation_losses(pixels, segments, tags, bank, config)
    assert set(losses) == {"V", "C", "O", "A"}
    sum(losses.values()).backward()
    grad = embeddings.grad.permute(0, 2, 3, 1)  # (B, h, w, D)
    assert grad[valid].abs().sum() > 0
    assert (grad[~valid] == 0).all(), "a padded pixel got a gradient"


def test_masked_kmeans_ignores_what_padding_holds():
    torch.manual_seed(1)
    embeddings = F.normalize(torch.randn(2, 4, 8, 8), dim=1)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    config = KMeansConfig(grid=(2, 2), iterations=5)
    assert torch.equal(masked_kmeans(embeddings, valid, config), spherical_kmeans(embeddings, config).segment_ids)
    valid[:, 5:, :] = False  # bottom rows padded
    other = embeddings.clone()
    other[:, :, 5:, :] = F.normalize(torch.randn(2, 4, 3, 8), dim=1)  # different padding content
    first = masked_kmeans(embeddings, valid, config)
    second = masked_kmeans(other, valid, config)
    assert torch.equal(first[valid], second[valid])
