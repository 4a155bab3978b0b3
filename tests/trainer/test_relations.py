import torch
import torch.nn.functional as F

from segsearch.trainer.relations import (
    LossConfig, MemoryBank, Relation, default_loss_config, relation_losses,
)
from segsearch.trainer.training_segments import IGNORE, build_training_segments, location_features


def _tiny_batch():
    """2 images of 2x4 pixels; image 0 has two labelled halves, image 1 is unlabelled."""
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(2, 3, 2, 4), dim=1)
    clusters = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1]], [[0, 1, 1, 1], [0, 1, 1, 1]]])
    contours = torch.tensor([[[0, 0, 0, 1], [0, 0, 0, 1]], [[0, 0, 1, 1], [0, 0, 1, 1]]])
    labels = torch.tensor([[[2, 2, 3, 3], [2, 2, 3, 3]], [[IGNORE] * 4, [IGNORE] * 4]])
    tags = torch.tensor([[False, False, True, True], [False, True, False, False]])  # no shared tag
    return embeddings, clusters, contours, labels, tags


def test_segments_are_pure_in_cluster_contour_and_label():
    embeddings, clusters, contours, labels, _ = _tiny_batch()
    segments = build_training_segments(embeddings, clusters, contours, labels)
    # image 0: (c0,r0,l2), (c1,r0,l3), (c1,r1,l3); image 1: (c0,r0), (c1,r0), (c1,r1)
    assert segments.num_segments == 6
    for pixel, segment in enumerate(segments.pixel_segment.tolist()):
        assert segments.segment_image[segment] == segments.pixel_image[pixel]
        assert segments.segment_label[segment] == segments.pixel_label[pixel]
        assert segments.segment_contour[segment] == segments.pixel_contour[pixel]
    norms = segments.prototypes.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


def test_prototypes_carry_gradients_to_embeddings():
    embeddings, clusters, contours, labels, tags = _tiny_batch()
    embeddings.requires_grad_(True)
    segments = build_training_segments(embeddings, clusters, contours, labels)
    segments.prototypes.sum().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def _losses(config: LossConfig, embeddings, clusters, contours, labels, tags):
    segments = build_training_segments(embeddings, clusters, contours, labels)
    pixels = embeddings.permute(0, 2, 3, 1).reshape(-1, 3)
    bank = MemoryBank(0).concat(3, tags.shape[1], "cpu")
    return relation_losses(pixels, segments, tags, bank, config)


def test_unlabelled_image_still_gets_lowlevel_and_cooccurrence_gradients():
    embeddings, clusters, contours, labels, tags = _tiny_batch()
    embeddings.requires_grad_(True)
    only = lambda **on: LossConfig(  # noqa: E731
        annotation=Relation(on.get("C", 0.0), 6), cooccurrence=Relation(on.get("O", 0.0), 8),
        lowlevel=Relation(on.get("V", 0.0), 16))
    for relation in ("V", "O"):
        embeddings.grad = None
        losses = _losses(only(**{relation: 1.0}), embeddings, clusters, contours, labels, tags)
        losses[relation].backward()
        assert embeddings.grad[1].abs().sum() > 0, relation  # image 1 has no weak label
    embeddings.grad = None
    losses = _losses(only(C=1.0), embeddings, clusters, contours, labels, tags)
    losses["C"].backward()
    assert embeddings.grad[1].abs().sum() == 0  # C needs a label: image 1 takes no part


def test_annotation_loss_is_low_when_embeddings_match_labels():
    _, clusters, contours, labels, tags = _tiny_batch()
    axis = torch.eye(3)
    good = torch.stack([axis[0], axis[0], axis[1], axis[1]]).t().reshape(3, 1, 4).expand(3, 2, 4)
    good = torch.stack([good, good])
    bad = axis[0].view(1, 3, 1, 1).expand(2, 3, 2, 4)  # every pixel alike: labels inseparable
    config = LossConfig(annotation=Relation(1.0, 6), cooccurrence=Relation(0, 8), lowlevel=Relation(0, 16))
    low = _losses(config, good, clusters, contours, labels, tags)["C"]
    high = _losses(config, bad.contiguous(), clusters, contours, labels, tags)["C"]
    assert low < high


def test_memory_bank_keeps_last_batches_detached():
    embeddings, clusters, contours, labels, tags = _tiny_batch()
    embeddings.requires_grad_(True)
    bank = MemoryBank(2)
    for _ in range(3):
        bank.push(build_training_segments(embeddings, clusters, contours, labels), tags)
    entry = bank.concat(3, 4, "cpu")
    assert entry.prototypes.shape == (12, 3) and not entry.prototypes.requires_grad
    assert entry.tags.shape == (12, 4)


def test_reference_values_per_supervision():
    scribbles = default_loss_config("scribbles")
    assert (scribbles.annotation.weight, scribbles.annotation.concentration) == (1.0, 6)
    assert (scribbles.cooccurrence.weight, scribbles.cooccurrence.concentration) == (0.5, 12)
    points = default_loss_config("points")
    assert points.annotation.weight == 0.1 and points.lowlevel.concentration == 16
    assert default_loss_config("tags").affinity.weight == 0.0  # A off, as in SPML's configs


def test_cooccurrence_is_not_zero_when_every_image_has_background():
    """VOC regression: tags made by the weak-label code from masks that all contain
    background (0). Image 0 holds class 15, image 1 class 5: they share no object class, so
    O has negatives and must give a non-zero loss and gradient (it was exactly 0 while the
    background counted as a tag)."""
    from segsearch.trainer.weak_labels import WeakLabelConfig, make_weak_labels

    masks = [torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long)]
    masks[0][:, 2:] = 15
    masks[1][:, 2:] = 5
    config = WeakLabelConfig(kind="tags", background_class=0)
    weak = [make_weak_labels(m.numpy(), 21, config) for m in masks]
    tags = torch.stack([torch.from_numpy(w.tags) for w in weak])
    labels = torch.stack([torch.from_numpy(w.pixel_labels) for w in weak])
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(2, 3, 4, 4), dim=1).requires_grad_(True)
    clusters = torch.tensor([0, 0, 1, 1]).repeat(2, 4, 1)  # left / right halves
    contours = torch.zeros(2, 4, 4, dtype=torch.long)
    config = LossConfig(annotation=Relation(0, 6), cooccurrence=Relation(1.0, 8), lowlevel=Relation(0, 16))
    loss = _losses(config, embeddings, clusters, contours, labels, tags)["O"]
    loss.backward()
    assert loss.item() > 0.01
    assert embeddings.grad.abs().sum() > 0


def _affinity_batch(cos_close: float, cos_far: float):
    """One image of 1x4 pixels, each its own segment: L2 (label 2) = e0, L3 (label 3) = e2,
    U1 (unlabelled) at cosine `cos_close` from e0, U2 (unlabelled) at `cos_far` from e0
    (both in the e0-e1 plane, so orthogonal to L3)."""
    def at(cos):
        return torch.tensor([cos, (1 - cos**2) ** 0.5, 0.0])

    columns = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0]), at(cos_close), at(cos_far)])
    embeddings = columns.t().reshape(1, 3, 1, 4).contiguous()
    clusters = torch.arange(4).view(1, 1, 4)
    contours = torch.zeros(1, 1, 4, dtype=torch.long)
    labels = torch.tensor([[[2, 3, IGNORE, IGNORE]]])
    return embeddings, clusters, contours, labels


def test_affinity_borrows_labels_only_at_cosine_095_or_more():
    from segsearch.trainer.relations import borrowed_label_sets

    embeddings, clusters, contours, labels = _affinity_batch(0.96, 0.94)
    segments = build_training_segments(embeddings, clusters, contours, labels)
    sets = borrowed_label_sets(segments, top_k=3, threshold=0.95)
    by_pixel = sets[segments.pixel_segment]
    assert by_pixel[2].nonzero().squeeze(1).tolist() == [2]  # U1: cos .96 to L2 -> {2}
    assert not by_pixel[3].any()  # U2: cos .94 < .95 -> no labels
    assert not by_pixel[0].any() and not by_pixel[1].any()  # labelled segments borrow nothing
    assert not borrowed_label_sets(segments, top_k=3, threshold=0.97)[segments.pixel_segment].any()


def test_affinity_trains_only_the_pixels_that_borrowed_a_label():
    embeddings, clusters, contours, labels = _affinity_batch(0.96, 0.94)
    embeddings.requires_grad_(True)
    tags = torch.zeros(1, 4, dtype=torch.bool)
    config = LossConfig(annotation=Relation(0, 6), cooccurrence=Relation(0, 8), lowlevel=Relation(0, 16),
                        affinity=Relation(1.0, 8))
    loss = _losses(config, embeddings, clusters, contours, labels, tags)["A"]
    # U1 alone: positive L2 (cos .96), negative L3 (cos 0): -log(e^{8*.96} / (e^{8*.96} + e^0))
    expected = -torch.log(torch.sigmoid(torch.tensor(8 * 0.96)))
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert embeddings.grad[0, :, 0, 2].abs().sum() > 0  # U1
    assert embeddings.grad[0, :, 0, 3].abs().sum() == 0  # U2: below the threshold, no part


def _two_region_toy(location: bool):
    """1 image, 1x2 pixels, both embedded at (1, 0), one cluster, each pixel its own contour
    region: two one-pixel segments with equal embeddings."""
    embeddings = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    clusters = torch.zeros(1, 1, 2, dtype=torch.long)
    contours = torch.tensor([[[0, 1]]])
    labels = torch.full((1, 1, 2), IGNORE)
    segments = build_training_segments(embeddings, clusters, contours, labels, location=location)
    pixels = embeddings.permute(0, 2, 3, 1).reshape(-1, 2)
    config = LossConfig(annotation=Relation(0.0, 6.0), cooccurrence=Relation(0.0, 12.0),
                        lowlevel=Relation(1.0, 3.0))
    bank = MemoryBank(0).concat(2, 1, "cpu")
    return relation_losses(pixels, segments, torch.ones(1, 1, dtype=torch.bool), bank, config)["V"]


def test_location_features_separate_look_alike_regions_in_v():
    """Worked by hand, kappa = 3. Without location both prototypes equal the pixels' (1, 0):
    each pixel's own segment (positive) and the other (negative) score alike, V = log 2.
    With location (SPML: (y, x) in [-0.5, 0.5], concatenated, L2-normalised) the 1x2 map puts
    pixel 0 at (-0.5, -0.5) and pixel 1 at (-0.5, 0.5): e_0 = (1, 0, -.5, -.5) / sqrt(1.5),
    e_1 = (1, 0, -.5, .5) / sqrt(1.5), each its own one-pixel prototype, so own . e = 1 and
    other . e = (1 + .25 - .25) / 1.5 = 2/3: V = -log(e^3 / (e^3 + e^2)) = log(1 + e^-1)."""
    without = _two_region_toy(location=False)
    with_location = _two_region_toy(location=True)
    assert torch.isclose(without, torch.tensor(2.0).log(), atol=1e-6)
    assert torch.isclose(with_location, torch.tensor(1.0 + torch.e ** -1).log(), atol=1e-6)


def test_location_prototypes_average_the_located_pixels():
    """location_features on a 2x3 map: y in {-.5, .5}, x in {-.5, 0, .5}; a segment's location
    prototype is the normalised sum of its pixels' normalised (embedding, y, x)."""
    locations = location_features(2, 3)
    torch.testing.assert_close(locations, torch.tensor(
        [[-0.5, -0.5], [-0.5, 0.0], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.0], [0.5, 0.5]]))
    embeddings = torch.zeros(1, 1, 2, 3)
    embeddings[0, 0] = 1.0  # D = 1, every pixel at (1,)
    clusters = torch.zeros(1, 2, 3, dtype=torch.long)
    contours = torch.tensor([[[0, 0, 1], [0, 0, 1]]])  # segment 0: columns 0-1, segment 1: column 2
    labels = torch.full((1, 2, 3), IGNORE)
    segments = build_training_segments(embeddings, clusters, contours, labels, location=True)
    # column 2: (1, -.5, .5) and (1, .5, .5), each / sqrt(1.5); sum (2, 0, 1) / sqrt(1.5) -> (2, 0, 1) / sqrt(5)
    torch.testing.assert_close(segments.location_prototypes[1],
                               torch.tensor([2.0, 0.0, 1.0]) / torch.tensor(5.0).sqrt())
    assert segments.prototypes.shape == (2, 1)  # C, O and A keep the plain prototypes
    seen = segments.select_pixels(torch.tensor([5, 0]))
    torch.testing.assert_close(seen.pixel_location, torch.tensor([[0.5, 0.5], [-0.5, -0.5]]))
