"""Calibrating the open-set thresholds on held-out votes."""
import pytest
import torch

from segsearch.spml.checkpoint import LabelBank
from segsearch.spml.label_vote import VoteDetails
from segsearch.trainer.datasets import DataConfig
from segsearch.trainer.label_calibration import calibrate, calibrate_on_held_out, quantile_thresholds


def _details(similarities, shares) -> VoteDetails:
    similarities, shares = torch.tensor(similarities), torch.tensor(shares)
    return VoteDetails(torch.zeros(len(shares), dtype=torch.long), shares, similarities)


def _bank() -> LabelBank:
    return LabelBank(torch.eye(3), torch.tensor([0, 1, 2]))


def test_thresholds_sit_at_the_quantile_of_the_held_out_values():
    similarities = torch.linspace(0, 1, 101).tolist()  # quantile 0.05 -> 0.05
    shares = [0.25] * 10 + [1.0] * 91  # quantile 0.05 -> 0.25
    assert quantile_thresholds(_details(similarities, shares), 0.05) == pytest.approx((0.05, 0.25))


def test_calibrated_bank_keeps_about_one_minus_the_quantile_of_held_out_segments():
    generator = torch.Generator().manual_seed(0)
    similarities = torch.rand(1000, generator=generator)
    shares = torch.ones(1000)  # unanimous votes: only the similarity threshold can bite
    bank, record = calibrate(_details(similarities.tolist(), shares.tolist()), _bank(), 0.05)
    assert bank.min_similarity == pytest.approx(float(torch.quantile(similarities.double(), 0.05)))
    assert bank.min_share == 1.0 and torch.equal(bank.prototypes, torch.eye(3))
    assert record.segments == 1000 and record.kept_fraction == pytest.approx(0.95, abs=0.002)


def test_quantile_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="quantile"):
        quantile_thresholds(_details([0.5], [1.0]), 1.0)


def test_quantile_zero_leaves_the_bank_uncalibrated_without_reading_data():
    bank = _bank()
    missing = DataConfig(dataset="no/such/voc")  # would raise if it were read
    assert calibrate_on_held_out(None, bank, missing, None, 0.0, torch.device("cpu")) is bank


def test_an_unreadable_held_out_split_leaves_the_bank_uncalibrated(tmp_path):
    bank = _bank()
    got = calibrate_on_held_out(None, bank, DataConfig(dataset=str(tmp_path / "absent")), None, 0.05,
                                  torch.device("cpu"))
    assert got is bank and got.min_similarity == -1.0
