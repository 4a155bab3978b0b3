"""What kill -9 leaves of an open `IndexStore`, without killing the process: LMDB committed,
no close, no last FAISS save, the writer lock released (the kernel's part of a process death)."""
from __future__ import annotations

import os

from segsearch.indexer.index_store import IndexStore


def abandon(store: IndexStore) -> None:
    """Drop `store` as a dead writer would: the next `IndexStore.open` must replay from LMDB."""
    store._closed = True
    store._metadata.close()
    if store._lock_fd is not None:
        os.close(store._lock_fd)
        store._lock_fd = None
