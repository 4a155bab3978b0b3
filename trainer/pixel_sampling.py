"""Which pixels enter SPML's loss at a step.

The loss compares every chosen pixel with every prototype (batch + memory bank), so on CPU
the trainer scores a sample of the batch's pixels rather than all of them. The choice is made
over the *global* batch from data alone (no forward pass), so that every data-parallel rank
computes the same pick and keeps its own share (`distributed.rank_pixels`).

Rules:
- padding (`valid` False) is never picked: it is no image content and reaches no loss;
- "keep_labelled" (default): every weakly labelled pixel is always in, and `budget`
  pixels are drawn among the *unlabelled* ones. Why: relation C only sees labelled pixels.
  A uniform draw of 2048 of 8192 pixels leaves C about a quarter of an already tiny set
  (with points: ~7 labelled pixels per step); the reference scores every pixel, so C sees
  every label. Unlabelled pixels still feed V, O and A through the draw.
- "uniform": `budget` pixels drawn uniformly among the valid ones (the old behaviour,
  kept for ablations).
"""
from __future__ import annotations

import torch

SAMPLING_RULES = ("keep_labelled", "uniform")


def pick_loss_pixels(
    valid: torch.Tensor,
    budget: int,
    generator: torch.Generator,
    labelled: torch.Tensor | None = None,
    rule: str = "keep_labelled",
) -> torch.Tensor:
    """Flat pixel ids (K,) long into the (B*h*w) grid of `valid` (B, h, w) bool.

    labelled: (B, h, w) bool, pixels with a weak label (None: none are).
    budget: pixels drawn among the candidates (the unlabelled valid pixels for
    "keep_labelled", all valid pixels for "uniform"); 0, or a budget at least the number of
    candidates, takes them all. "uniform" returns its draw in draw order (with no padding:
    `randperm(B*h*w)[:budget]`, the trainer's historical sample); "keep_labelled" returns the
    labelled pixels and the draw together, in grid order.
    """
    if rule not in SAMPLING_RULES:
        raise ValueError(f"loss pixel sampling must be one of {SAMPLING_RULES}, got {rule!r}")
    valid = valid.reshape(-1).cpu()
    labelled = torch.zeros_like(valid) if labelled is None else labelled.reshape(-1).cpu() & valid
    if rule == "uniform":
        return _draw(valid.nonzero().squeeze(1), budget, generator)
    drawn = _draw((valid & ~labelled).nonzero().squeeze(1), budget, generator)
    return torch.cat([labelled.nonzero().squeeze(1), drawn]).sort().values


def _draw(candidates: torch.Tensor, budget: int, generator: torch.Generator) -> torch.Tensor:
    if budget <= 0 or budget >= candidates.numel():
        return candidates
    return candidates[torch.randperm(candidates.numel(), generator=generator)[:budget]]
