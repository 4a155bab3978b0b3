"""One way to pick a torch device from a user's word (`auto`, `cpu`, `cuda`, `cuda:1`), shared
by training, indexing and serving, so that a bad word fails the same clear way everywhere."""
from __future__ import annotations

import torch

from segsearch.errors import SegsearchError


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; anything else must name a usable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SegsearchError(f"unknown device {name!r} ({exc}); use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegsearchError(f"device {name!r} asked for, but CUDA is not available here; use auto or cpu")
    return device
