"""Draining a full write buffer into an HNSW or IVF index on a worker thread.

Why: the write buffer (`indexer/vector_index.py`) makes a live commit's FAISS work constant,
but its drain is the work it saved up: 8,192 vectors compared with every IVF centroid (~0.2–0.4 s
at 1M through FAISS's quantizer, ~50 ms by `ivf_lists`' GEMM) or inserted into an HNSW graph
(~2 s at 200k). Done inside the commit that filled the
buffer, that commit (and every search waiting on the store's lock) stalled for it. Here the
full buffer is set aside (the vector index keeps searching it exactly) and the work runs on a
worker; FAISS and numpy's GEMM release the GIL, so it runs beside the commits and searches that go on. The next
write that finds it done *lands* it, a short step under the caller's lock.

- IVF (`IvfDrain`): the worker only assigns the vectors to lists, which reads the quantizer
  (never changed after training). Landing is `add_core` with the lists known: a copy, a few ms
  (more on an index just loaded, whose lists are each reallocated at their first append).
- HNSW (`HnswDrain`): a graph cannot be searched while it is inserted into, so the worker
  inserts into a *copy* of the index (`faiss.clone_index`), and landing swaps the copy in.
  The price is memory: a second copy of the graph while a drain runs.

The same worker also finds the lists of a bulk chunk early (`EarlyAssignment`): the index store
starts it before the chunk's LMDB commit and the IVF add after the commit takes the lists
from it, so the assignment (~6 µs per vector at 1M) runs while the commit encodes and syncs.

A drain belongs to the index object it started from. While it runs, the owner must not change
that object except through tombstones (its ids removed meanwhile are passed to `land`): the
vector index lands a pending drain before any direct add, rebuild or save.
"""
from __future__ import annotations

import threading

import faiss
import numpy as np

from segsearch.indexer import ivf_lists


class _Drain:
    """`ids (N,)` and `vectors (N, D)` of a set-aside buffer, worked on by `_work` on a thread."""

    def __init__(self, index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index = index  # the index it started from (kept alive while the worker reads it)
        self.ids, self.vectors = ids, vectors
        self._result = None
        self._error: BaseException | None = None
        self._threads = faiss.omp_get_max_threads()  # the caller's setting (OpenMP's is per thread)
        self._thread = threading.Thread(target=self._run, name="faiss-drain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            faiss.omp_set_num_threads(self._threads)
            self._result = self._work()
        except BaseException as exc:  # re-raised in the caller's thread by `_wait`
            self._error = exc

    def _work(self):
        raise NotImplementedError

    def done(self) -> bool:
        return not self._thread.is_alive()

    def _wait(self):
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"draining the write buffer failed: {self._error}") from self._error
        return self._result

    def land(self, index: faiss.Index, kept: np.ndarray) -> tuple[faiss.Index, np.ndarray]:
        """Move the drained vectors into `index` (the one it started from), waiting for the
        worker if needed. `kept (N,)` bool: which rows are still wanted (the others were
        removed meanwhile). Returns `(the index to use from now on, ids to tombstone)`."""
        raise NotImplementedError


class _Assigning(_Drain):
    """Finds the IVF list of each vector on the worker (`ivf_lists.assign`)."""

    def _work(self) -> np.ndarray:
        return ivf_lists.assign(self.index, self.vectors)


class IvfDrain(_Assigning):
    """The nearest list of each vector, computed on the worker; landed with `add_core`."""

    def land(self, index: faiss.Index, kept: np.ndarray) -> tuple[faiss.Index, np.ndarray]:
        lists = self._wait()
        ivf_lists.add_preassigned(index, self.ids[kept], self.vectors[kept], lists[kept])
        return index, np.empty(0, np.int64)


class EarlyAssignment(_Assigning):
    """The lists of `vectors (N, D)` in an IVF index, found on the worker ahead of their add."""

    def __init__(self, index: faiss.IndexIVF, vectors: np.ndarray) -> None:
        super().__init__(index, np.empty(0, np.int64), vectors)

    def lists_for(self, index: faiss.Index, vectors: np.ndarray) -> np.ndarray | None:
        """`(N,)` lists for an add of `vectors` to `index`, or None when this was found for
        other vectors (images skipped by the commit) or another index (it was rebuilt)."""
        if index is not self.index or vectors.shape != self.vectors.shape or not np.array_equal(vectors, self.vectors):
            return None
        return self._wait()


class HnswDrain(_Drain):
    """A copy of the (IDMap2-wrapped) HNSW index with the vectors inserted, built on the
    worker; landed by using the copy. Rows removed meanwhile are in the copy: tombstone them."""

    def _work(self) -> faiss.Index:
        copy = faiss.clone_index(self.index)
        copy.add_with_ids(self.vectors, self.ids)
        return copy

    def land(self, index: faiss.Index, kept: np.ndarray) -> tuple[faiss.Index, np.ndarray]:
        return self._wait(), self.ids[~kept]

