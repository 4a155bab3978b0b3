"""A small LRU cache of query images' embedding maps, bounded by bytes.

Why: an interactive client asks about several regions of one image (a box, then another box,
then a point). Each region query embeds the whole image first (~70 CPU ms, ~1 s on a loaded
2-core machine) and then only pools and searches (~1 ms). Keyed by the image's content hash
(sha256 of the bytes sent) and the embedding size, the second region of an image costs the
search, not a forward pass. Entries are the unit-norm maps `(D, E/4, E/4)` float32 on the
model's device; they are never modified after insertion (callers only read them).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch


class EmbeddingCache:
    """LRU over `max_bytes` of tensors; `hits`, `misses` and `bytes` for the metrics.
    `max_bytes` 0 turns it off."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.hits = self.misses = self.bytes = 0
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.element_size() * value.nelement()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.element_size() * evicted.nelement()

    def __len__(self) -> int:
        return len(self._entries)
