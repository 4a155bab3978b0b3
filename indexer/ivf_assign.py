"""Coarse IVF assignment on a worker thread, so that it overlaps the caller's other work.

Why: adding to an IVF index compares every new vector with every centroid (about 25 µs per
64-d vector against 4,096 centroids on one core), the one part of an add that grows with the
index. That comparison only *reads* the quantizer, which an IVF index never changes after
training, and FAISS releases the GIL while it runs. So a full write buffer can be assigned on
another core while commits and searches go on (`VectorIndex`'s background drain). What is
left under the caller's lock is `add_core` with the assignment known: copying the vectors into
their lists, 2 ms per 8,960 64-d vectors on a fresh index, more on one just loaded (each list
touched first is reallocated: 5-40 ms per 1,280 vectors at 1M).

A `PendingAssignment` belongs to the index object whose quantizer computed it; an index that
was rebuilt since (switched type, compacted) must not take it, and `VectorIndex` checks that.
"""
from __future__ import annotations

import threading

import faiss
import numpy as np


class PendingAssignment:
    """The nearest list of each of `vectors (N, D)` in `index`, computed on a worker thread.

    `ids (N,)` travel with it so that a caller can keep the rows of ids still wanted
    (`rows_of`) when some were removed meanwhile."""

    def __init__(self, index: faiss.IndexIVF, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index = index  # also keeps the quantizer alive while the worker reads it
        self.ids, self.vectors = ids, vectors
        self._lists: np.ndarray | None = None
        self._error: BaseException | None = None
        self._threads = faiss.omp_get_max_threads()  # the caller's setting (OpenMP's is per thread)
        self._thread = threading.Thread(target=self._run, name="ivf-assign", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            faiss.omp_set_num_threads(self._threads)
            _, nearest = self.index.quantizer.search(self.vectors, 1)
            self._lists = nearest.reshape(-1).astype(np.int64)
        except BaseException as exc:  # re-raised in the caller's thread by `lists`
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def lists(self) -> np.ndarray:
        """`(N,)` int64 list numbers, waiting for the worker if it is still running."""
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"IVF assignment failed: {self._error}") from self._error
        return self._lists

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Boolean `(N,)`: which rows hold one of `ids`."""
        return np.isin(self.ids, ids)


def add_preassigned(index: faiss.IndexIVF, ids: np.ndarray, vectors: np.ndarray, lists: np.ndarray) -> None:
    """Add `vectors (N, D)` under `ids (N,)` to the lists `lists (N,)` already chosen for them."""
    if len(ids) == 0:
        return
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    index.add_core(len(ids), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
