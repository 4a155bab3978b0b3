"""A small LRU cache of query images' embedding maps (and region levels), bounded by bytes.

Why: an interactive client asks about several regions of one image (a box, then another box,
then a point). Each region query embeds the whole image first (~70 CPU ms, ~1 s on a loaded
2-core machine) and then only pools and searches (~1 ms). Keyed by the image's content hash
(sha256 of the bytes sent) and the embedding size, the second region of an image costs the
search, not a forward pass (and not even a decode: the key is the hash of the bytes sent, and
the entry keeps the image's size, all a box or mask query needs besides the map). Entries are
the unit-norm maps `(D, E/4, E/4)` float32 on the model's device with the original `(W, H)`;
they are never modified after insertion (callers only read them). Box and point queries keep
the image's region level here too (`service.analysis.CachedRegions`, any value with `nbytes`).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CachedEmbedding:
    embeddings: torch.Tensor  # (D, E/4, E/4) unit norm
    original_size: tuple[int, int]  # (W, H) of the image as sent, after EXIF orientation

    @property
    def nbytes(self) -> int:
        return self.embeddings.element_size() * self.embeddings.nelement()


class EmbeddingCache:
    """LRU over `max_bytes` of tensors; `hits`, `misses` and `bytes` for the metrics.
    `max_bytes` 0 turns it off."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.hits = self.misses = self.bytes = 0
        self._entries: OrderedDict[Hashable, CachedEmbedding] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> CachedEmbedding | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: CachedEmbedding) -> None:
        size = value.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._entries)
