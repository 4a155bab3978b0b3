"""Open-set k-NN labels: a segment the bank does not cover gets no label and score 0."""
import torch
import torch.nn.functional as F

from segsearch.spml.checkpoint import LabelBank
from segsearch.spml.label_vote import NO_LABEL, knn_vote, open_set_vote, vote_details

D = 4


def _two_clusters(**thresholds) -> LabelBank:
    """Five prototypes tightly around axis 0 (class 0), five around axis 1 (class 1)."""
    noise = 0.01 * torch.randn(10, D, generator=torch.Generator().manual_seed(0))
    centres = torch.cat([torch.eye(D)[0].expand(5, D), torch.eye(D)[1].expand(5, D)])
    return LabelBank(F.normalize(centres + noise, dim=1), torch.tensor([0] * 5 + [1] * 5), **thresholds)


def _query(*weights: float) -> torch.Tensor:
    return F.normalize(torch.tensor([weights], dtype=torch.float32), dim=1)


def test_a_query_far_from_both_clusters_gets_no_label_and_score_zero():
    bank = _two_clusters(min_similarity=0.9, min_share=0.6)
    labels, scores = open_set_vote(_query(0, 0, 1, 0), bank, num_classes=2, k=5)
    assert labels.tolist() == [NO_LABEL] and scores.tolist() == [0.0]


def test_a_query_inside_a_cluster_keeps_its_label_and_vote_share():
    bank = _two_clusters(min_similarity=0.9, min_share=0.6)
    labels, scores = open_set_vote(torch.cat([_query(1, 0.02, 0, 0), _query(0.02, 1, 0, 0)]), bank, 2, k=5)
    assert labels.tolist() == [0, 1] and scores.tolist() == [1.0, 1.0]


def test_a_split_vote_below_min_share_gets_no_label():
    between = _query(1, 1, 0, 0)  # cosine ~0.71 to both clusters: near enough at 0.5
    split = _two_clusters(min_similarity=0.5, min_share=0.6)
    details = vote_details(between, split, 2, k=10)
    assert details.shares.item() == 0.5 and details.nearest_similarity.item() > 0.5
    assert open_set_vote(between, split, 2, k=10)[0].tolist() == [NO_LABEL]
    labels, scores = open_set_vote(between, _two_clusters(min_similarity=0.5, min_share=0.5), 2, k=10)
    assert labels.item() != NO_LABEL and scores.tolist() == [0.5]


def test_a_bank_without_thresholds_labels_everything_as_the_closed_set_vote():
    bank = _two_clusters()
    queries = F.normalize(torch.randn(20, D, generator=torch.Generator().manual_seed(1)), dim=1)
    closed, shares = knn_vote(queries, bank, 2, k=5)
    labels, scores = open_set_vote(queries, bank, 2, k=5)
    assert torch.equal(labels, closed) and torch.equal(scores, shares)
    assert (scores > 0).all()


def test_knn_vote_ignores_the_thresholds():
    """Evaluation's vote stays closed-set: mIoU has no 'unknown' class."""
    labels, shares = knn_vote(_query(0, 0, 1, 0), _two_clusters(min_similarity=0.9, min_share=0.6), 2, k=5)
    assert labels.item() in (0, 1) and shares.item() > 0
