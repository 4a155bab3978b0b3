"""Which pixels enter SPML's loss at a step.

The loss compares every chosen pixel with every prototype (batch + memory bank), so on CPU
the trainer scores a sample of the batch's pixels (`TrainConfig.loss_pixels`) rather than
all of them. The choice is made over the *global* batch from data alone (no forward pass),
so that every data-parallel rank computes the same pick and keeps its own share
(`distributed.rank_pixels`).

Padding (`valid` False) is never picked: it is no image content and reaches no loss.
"""
from __future__ import annotations

import torch


def pick_loss_pixels(valid: torch.Tensor, budget: int, generator: torch.Generator) -> torch.Tensor:
    """Flat pixel ids (K,) long into the (B*h*w) grid of `valid` (B, h, w) bool.

    budget: pixels to draw uniformly among the valid ones; 0, or a budget at least the
    number of valid pixels, keeps them all (in grid order). With no padding the draw is
    `randperm(B*h*w)[:budget]`, the trainer's historical sample.
    """
    candidates = valid.reshape(-1).nonzero().squeeze(1).cpu()
    if budget <= 0 or budget >= candidates.numel():
        return candidates
    return candidates[torch.randperm(candidates.numel(), generator=generator)[:budget]]
