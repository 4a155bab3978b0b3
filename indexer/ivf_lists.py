"""Adding vectors to an IVF index: the nearest list of each by one blocked GEMM, then `add_core`.

Why: `IndexIVF.add` finds each vector's list through its flat quantizer's search (k=1). Over the
4,096 64-d centroids of a 1M-segment index that measured ~24 µs per vector on one thread of this
CPU, while the same argmax over numpy's GEMM, in blocks of `BLOCK_ROWS` vectors that keep the
`(rows, nlist)` scores in cache, took ~5–7 µs (bench/RESULTS.md, "Writes at 1M measured interleaved"). The
assignment was most of what made a bulk write at 1M slower than at 10k, where the index is exact.

The lists chosen are the quantizer's own choice (the argmax of the same inner products; the
metric of every segsearch index is inner product), up to float rounding between near-equal
centroids, which only decides which of two equally near lists holds a vector. An IVF whose
quantizer is not a flat inner-product index (a factory string such as `IVF4096_HNSW32,Flat`)
keeps FAISS's own `add`.

The GEMM runs on as many BLAS threads as FAISS has OpenMP threads on the calling thread (1 in
`segsearch serve`'s writes): numpy's OpenBLAS would otherwise take every core, and its threads,
spinning beside a live commit on this 2-core machine, raised the p99 of 120 live commits at 1M
from ~5 ms to ~33 ms in the first measurement of this module.
"""
from __future__ import annotations

import functools

import faiss
import numpy as np
from threadpoolctl import ThreadpoolController

BLOCK_ROWS = 256
LIST_HEADROOM = 0.125  # spare capacity each list gets at load, as a fraction of its size
LIST_HEADROOM_MIN = 8  # ... and at least this many entries


def flat_centroids(index: faiss.IndexIVF) -> np.ndarray | None:
    """`(nlist, D)` float32: the centroids of a flat inner-product quantizer, else None."""
    quantizer = faiss.downcast_index(index.quantizer)
    if not isinstance(quantizer, faiss.IndexFlat) or quantizer.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    return quantizer.reconstruct_n(0, quantizer.ntotal)


def nearest_lists(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """`(N,)` int64: for each of `vectors (N, D)`, the row of `centroids (nlist, D)` with the
    largest inner product."""
    lists = np.empty(len(vectors), dtype=np.int64)
    scores = np.empty((min(BLOCK_ROWS, len(vectors)), len(centroids)), dtype=np.float32)
    with _blas().limit(limits=faiss.omp_get_max_threads(), user_api="blas"):
        for start in range(0, len(vectors), BLOCK_ROWS):
            block = vectors[start:start + BLOCK_ROWS]
            block_scores = scores[:len(block)]
            np.matmul(block, centroids.T, out=block_scores)
            lists[start:start + len(block)] = block_scores.argmax(axis=1)
    return lists


@functools.lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    """The BLAS libraries loaded in this process (found once: a lookup takes ~1 ms)."""
    return ThreadpoolController()


def assign(index: faiss.IndexIVF, vectors: np.ndarray) -> np.ndarray:
    """`(N,)` int64: the list each of `vectors (N, D)` goes to (reads the quantizer only, so it
    may run on another thread while the index is searched)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    centroids = flat_centroids(index)
    if centroids is None:
        _, nearest = index.quantizer.search(vectors, 1)
        return nearest.reshape(-1).astype(np.int64)
    return nearest_lists(centroids, vectors)


def add_preassigned(index: faiss.IndexIVF, ids: np.ndarray, vectors: np.ndarray, lists: np.ndarray) -> None:
    """Add `vectors (N, D)` under `ids (N,)` to the lists `lists (N,)` already chosen for them."""
    if len(ids) == 0:
        return
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    index.add_core(len(ids), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists))


def add(index: faiss.IndexIVF, ids: np.ndarray, vectors: np.ndarray) -> None:
    """`index.add_with_ids(vectors, ids)`, with the lists found by `assign`."""
    add_preassigned(index, ids, vectors, assign(index, vectors))


def reserve_headroom(index: faiss.IndexIVF, fraction: float = LIST_HEADROOM, minimum: int = LIST_HEADROOM_MIN) -> None:
    """Give every inverted list of a just-loaded `index` spare capacity for `fraction` of its
    size (at least `minimum` entries), the same contents.

    Why: FAISS reads each list at its exact size, so the first append to a list after a load
    reallocates and copies it. The first drain of the write buffer after an open touches ~87%
    of the 4,096 lists at 1M and paid ~100 ms for it inside a live commit (bench/RESULTS.md).
    Copying the lists once here, into vectors with room, costs ~0.26 s of the open at 1M and
    `fraction` more list memory (and, while it copies, both copies); a list that outgrows its
    room later reallocates alone.
    """
    old = faiss.downcast_InvertedLists(index.invlists)
    if not isinstance(old, faiss.ArrayInvertedLists):
        return  # on-disk or other list layouts: left as they are
    code_size = old.code_size
    roomy = faiss.ArrayInvertedLists(index.nlist, code_size)
    for list_no in range(index.nlist):
        size = old.list_size(list_no)
        room = size + int(size * fraction) + minimum
        ids = np.zeros(room, dtype=np.int64)
        codes = np.zeros(room * code_size, dtype=np.uint8)
        if size:
            ids[:size] = faiss.rev_swig_ptr(old.get_ids(list_no), size)
            codes[:size * code_size] = faiss.rev_swig_ptr(old.get_codes(list_no), size * code_size)
        roomy.add_entries(list_no, room, faiss.swig_ptr(ids), faiss.swig_ptr(codes))  # capacity = room
        roomy.resize(list_no, size)  # shrinking keeps the capacity
    index.replace_invlists(roomy, True)
    roomy.this.disown()  # the index owns (and frees) the lists now
