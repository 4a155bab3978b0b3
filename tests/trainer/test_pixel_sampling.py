import torch

from segsearch.trainer.pixel_sampling import pick_loss_pixels


def test_padding_is_never_picked():
    valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    valid[:, :2, :3] = True  # 12 real pixels, 20 padded
    real = set(valid.reshape(-1).nonzero().squeeze(1).tolist())
    for budget in (0, 5, 12, 100):
        pick = pick_loss_pixels(valid, budget, torch.Generator().manual_seed(3))
        assert set(pick.tolist()) <= real
        assert len(pick) == (12 if budget in (0, 12, 100) else budget)
        assert len(set(pick.tolist())) == len(pick)


def test_without_padding_the_pick_is_the_historical_sample():
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    pick = pick_loss_pixels(valid, 7, torch.Generator().manual_seed(5))
    assert torch.equal(pick, torch.randperm(32, generator=torch.Generator().manual_seed(5))[:7])
