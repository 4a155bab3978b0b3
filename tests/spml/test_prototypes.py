"""Segment prototypes: values against a naive reference, empty segments, gradients, helpers."""

import pytest
import torch
import torch.nn.functional as F

from segsearch.spml.prototypes import (
    flatten_segments,
    relabel_contiguous,
    segment_counts,
    segment_prototypes,
)


def _random_case(batch=2, dim=5, height=4, width=6, num_segments=7, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, height, width, generator=generator, dtype=dtype)
    ids = torch.randint(0, num_segments - 1, (batch, height, width), generator=generator)
    return embeddings, ids  # the last segment id is never used: always one empty segment


def _naive_prototypes(embeddings, ids, num_segments):
    batch, dim = embeddings.shape[:2]
    out = torch.zeros(batch, num_segments, dim, dtype=embeddings.dtype)
    for b in range(batch):
        for k in range(num_segments):
            mask = ids[b] == k
            if mask.any():
                mean = embeddings[b][:, mask].mean(dim=1)
                out[b, k] = mean / mean.norm()
    return out


def test_prototypes_match_naive_normalised_means():
    embeddings, ids = _random_case()
    got = segment_prototypes(embeddings, ids, 7)
    assert got.shape == (2, 7, 5)
    torch.testing.assert_close(got, _naive_prototypes(embeddings, ids, 7), atol=1e-5, rtol=1e-5)


def test_prototypes_unit_norm_and_empty_segments_zero():
    embeddings, ids = _random_case()
    prototypes = segment_prototypes(embeddings, ids, 7)
    valid = segment_counts(ids, 7) > 0
    assert not valid[:, 6].any()
    norms = prototypes.norm(dim=-1)
    torch.testing.assert_close(norms[valid], torch.ones_like(norms[valid]))
    assert torch.equal(prototypes[~valid], torch.zeros_like(prototypes[~valid]))


def test_gradcheck_through_prototypes_float64():
    embeddings, ids = _random_case(
        batch=2, dim=3, height=2, width=3, num_segments=4, dtype=torch.float64
    )
    embeddings.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: segment_prototypes(e, ids, 4), (embeddings,))


def test_gradient_finite_with_empty_segment_and_zero_for_unused_pixels():
    embeddings, ids = _random_case()
    embeddings.requires_grad_(True)
    prototypes = segment_prototypes(embeddings, ids, 7)
    # Only segment 0 of image 0 enters the loss: pixels elsewhere must get no gradient.
    prototypes[0, 0].sum().backward()
    grad = embeddings.grad
    assert torch.isfinite(grad).all()
    in_segment = (ids == 0) & (torch.arange(2).view(2, 1, 1) == 0)
    per_pixel = grad.permute(0, 2, 3, 1)  # (B, H, W, D)
    assert per_pixel[in_segment].abs().sum() > 0
    assert torch.equal(per_pixel[~in_segment], torch.zeros_like(per_pixel[~in_segment]))


def test_flatten_segments_offsets_by_image():
    ids = torch.tensor([[[0, 2], [1, 1]], [[2, 0], [0, 1]]])
    flat = flatten_segments(ids, 3)
    assert flat.tolist() == [0, 2, 1, 1, 5, 3, 3, 4]


def test_segment_counts_match_bincount_per_image():
    _, ids = _random_case(num_segments=7)
    counts = segment_counts(ids, 7)
    for b in range(ids.shape[0]):
        assert counts[b].tolist() == torch.bincount(ids[b].reshape(-1), minlength=7).tolist()
    assert counts.sum(dim=1).tolist() == [ids[0].numel()] * ids.shape[0]


def test_relabel_contiguous_per_image_keeps_order():
    ids = torch.tensor([[[0, 5], [5, 2]], [[7, 7], [3, 7]]])
    relabelled, used = relabel_contiguous(ids)
    assert relabelled.tolist() == [[[0, 2], [2, 1]], [[1, 1], [0, 1]]]
    assert used.tolist() == [3, 2]


@pytest.mark.parametrize(
    "bad_ids",
    [
        torch.tensor([[[0, 3]]]),  # id >= K
        torch.tensor([[[-1, 0]]]),  # negative id
        torch.tensor([[[0.0, 1.0]]]),  # not long
    ],
)
def test_invalid_segment_ids_raise(bad_ids):
    with pytest.raises(ValueError):
        segment_prototypes(torch.randn(1, 2, 1, 2), bad_ids, 3)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        segment_prototypes(torch.randn(1, 2, 3, 3), torch.zeros(1, 3, 2, dtype=torch.long), 2)


def test_prototypes_follow_input_scale_invariance():
    """Normalised sum = normalised mean: scaling all embeddings leaves prototypes unchanged."""
    embeddings, ids = _random_case()
    unit = F.normalize(embeddings, dim=1)
    torch.testing.assert_close(
        segment_prototypes(unit, ids, 7), segment_prototypes(3.0 * unit, ids, 7)
    )
