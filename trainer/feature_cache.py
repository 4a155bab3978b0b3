"""An on-disk cache of what training computes once per image set: frozen-backbone features
and edge maps. Why: preparing them took 35 s to 3 min at every `segsearch train` and every
benchmark run, although they depend only on the images and the backbone's weights.

The key is a hash of everything the result depends on: the kind, the images' bytes and shape,
the backbone's parameters (for features) or the edge source (for edges). A changed image,
weight or setting is a new key, never a stale hit. Entries are written with
`segsearch.durable.atomic_write` (a crash leaves no half file); a damaged entry is recomputed.
The folder is `$SEGSEARCH_CACHE_DIR`, else `~/.cache/segsearch/features`; `SEGSEARCH_CACHE_DIR=off`
turns the cache off.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from segsearch.durable import atomic_write

log = logging.getLogger(__name__)

ENV = "SEGSEARCH_CACHE_DIR"


def cache_dir() -> Path | None:
    """Where entries live, or None when the cache is off."""
    configured = os.environ.get(ENV)
    if configured == "off":
        return None
    return Path(configured) if configured else Path.home() / ".cache" / "segsearch" / "features"


def tensor_digest(digest, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes into `digest`."""
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())


def key_for(kind: str, images: torch.Tensor, *parts) -> str:
    """A hex key from the kind, the images `(N, 3, H, W)` and further tensors, modules or strings."""
    digest = hashlib.sha256(kind.encode())
    tensor_digest(digest, images)
    for part in parts:
        if isinstance(part, torch.nn.Module):
            for name, value in sorted(part.state_dict().items()):
                digest.update(name.encode())
                tensor_digest(digest, value)
        elif isinstance(part, torch.Tensor):
            tensor_digest(digest, part)
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()[:32]


def cached(key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The tensor stored under `key`, or `compute()`'s, stored for next time."""
    folder = cache_dir()
    if folder is None:
        return compute()
    path = folder / f"{key}.pt"
    if path.is_file():
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
            log.info("reusing %s from the feature cache", path.name)
            return value
        except Exception as error:  # noqa: BLE001 - a damaged entry is recomputed, not fatal
            log.warning("feature cache entry %s is unreadable (%s); recomputing it", path, type(error).__name__)
    value = compute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        atomic_write(path, buffer.getbuffer())
    except OSError as error:  # a read-only or full cache folder costs speed, not the run
        log.warning("cannot write the feature cache at %s (%s); continuing without it", folder, error)
    return value
