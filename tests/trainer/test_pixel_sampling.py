import pytest
import torch

from segsearch.trainer.pixel_sampling import pick_loss_pixels


def _ids(mask: torch.Tensor) -> set[int]:
    return set(mask.reshape(-1).nonzero().squeeze(1).tolist())


@pytest.mark.parametrize("rule", ["keep_labelled", "uniform"])
def test_padding_is_never_picked(rule):
    valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    valid[:, :2, :3] = True  # 12 real pixels, 20 padded
    labelled = torch.zeros_like(valid)
    labelled[:, 3, 3] = True  # a label on padding (cannot happen, must not matter)
    labelled[0, 0, 0] = True
    for budget in (0, 5, 11, 100):
        pick = pick_loss_pixels(valid, budget, torch.Generator().manual_seed(3), labelled, rule)
        assert set(pick.tolist()) <= _ids(valid)
        assert len(set(pick.tolist())) == len(pick)


def test_every_labelled_pixel_is_always_in():
    """8x8 batch of 2 images, 3 labelled pixels, budget 4: the pick is the 3 labelled pixels
    plus exactly 4 of the 125 unlabelled ones, at every seed."""
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    labelled = torch.zeros_like(valid)
    labelled[0, 1, 2] = labelled[1, 7, 7] = labelled[1, 0, 0] = True
    for seed in range(20):
        pick = pick_loss_pixels(valid, 4, torch.Generator().manual_seed(seed), labelled)
        assert _ids(labelled) <= set(pick.tolist())
        assert len(pick) == 7
        assert torch.equal(pick, pick.sort().values)
    uniform_hits = sum(
        _ids(labelled) <= set(pick_loss_pixels(valid, 4, torch.Generator().manual_seed(s), labelled,
                                               "uniform").tolist())
        for s in range(20))
    assert uniform_hits == 0  # the old uniform draw of 4 of 128 pixels misses them


def test_without_padding_the_uniform_pick_is_the_historical_sample():
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    pick = pick_loss_pixels(valid, 7, torch.Generator().manual_seed(5), rule="uniform")
    assert torch.equal(pick, torch.randperm(32, generator=torch.Generator().manual_seed(5))[:7])
