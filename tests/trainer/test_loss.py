import math

import torch
import torch.nn.functional as F

from segsearch.trainer.loss import segsort_loss, segsort_plus_positives


def test_loss_equals_hand_computed_value():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    positive = torch.tensor([[True, False, False], [False, True, True]])
    negative = torch.tensor([[False, True, True], [True, False, False]])
    kappa = 2.0
    # pixel 0: pos {p0: 1.0}, neg {p1: 0.0, p2: 0.6}
    loss0 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(1.2)))
    # pixel 1: pos {p1: 1.0, p2: 0.8}, neg {p0: 0.0}
    numerator1 = math.exp(2.0) + math.exp(1.6)
    loss1 = -math.log(numerator1 / (numerator1 + math.exp(0.0)))
    value = segsort_loss(embeddings, prototypes, positive, negative, kappa)
    assert abs(value.item() - (loss0 + loss1) / 2) < 1e-6


def test_prototypes_outside_both_sets_are_ignored_and_rows_without_positive_skipped():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positive = torch.tensor([[True, False], [False, False]])
    negative = torch.tensor([[False, False], [True, True]])
    # pixel 0 has no negative and p1 is in neither set: loss 0; pixel 1 has no positive: skipped
    value = segsort_loss(embeddings, prototypes, positive, negative, 5.0)
    assert abs(value.item()) < 1e-7


def test_no_positive_anywhere_gives_zero_with_graph():
    embeddings = torch.randn(3, 4, requires_grad=True)
    prototypes = torch.randn(2, 4)
    none = torch.zeros(3, 2, dtype=torch.bool)
    value = segsort_loss(embeddings, prototypes, none, ~none, 1.0)
    value.backward()
    assert value.item() == 0.0 and embeddings.grad is not None


def test_large_concentration_is_finite():
    embeddings = F.normalize(torch.randn(5, 8), dim=1)
    prototypes = F.normalize(torch.randn(4, 8), dim=1)
    positive = torch.eye(5, 4, dtype=torch.bool)
    value = segsort_loss(embeddings, prototypes, positive, ~positive, 500.0)
    assert torch.isfinite(value)


def test_gradcheck_float64_through_embeddings_and_prototypes():
    torch.manual_seed(0)
    raw_embeddings = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    raw_prototypes = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    positive = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]],
        dtype=torch.bool,
    )
    negative = ~positive

    def loss(e, p):
        return segsort_loss(F.normalize(e, dim=1), F.normalize(p, dim=1), positive, negative, 3.0)

    assert torch.autograd.gradcheck(loss, (raw_embeddings, raw_prototypes))


def test_segsort_plus_moves_positives_to_other_segments_of_the_group():
    same_group = torch.tensor([[True, True, False], [True, False, False]])
    own = torch.tensor([[True, False, False], [True, False, False]])
    positive, excluded = segsort_plus_positives(same_group, own)
    # pixel 0: another same-group segment exists -> it is the positive, own is excluded
    assert positive[0].tolist() == [False, True, False] and excluded[0].tolist() == [True, False, False]
    # pixel 1: alone in its group -> falls back to its own segment
    assert positive[1].tolist() == [True, False, False] and not excluded[1].any()
