"""FAISS vector index over unit-norm segment prototypes (inner product = cosine similarity).

Ids are the 64-bit segment ids of the LMDB store. The index type follows a *spec*:

| spec            | index built                                                               |
| --------------- | ------------------------------------------------------------------------- |
| `"auto"`        | exact `IDMap2(IndexFlatIP)` below `AUTO_EXACT_MAX` (50k) vectors, then     |
|                 | `"HNSW32,Flat"` (efSearch 192), rebuilt from the exact index's vectors,    |
|                 | then from `AUTO_IVF_MIN` (1M) `"IVF{nlist},Flat"`, rebuilt from the HNSW's |
| `"flat"`        | always exact                                                              |
| `"hnsw"`        | `"HNSW32,Flat"` from the start                                            |
| `"ivf"`         | exact below 50k, then `"IVF{nlist},Flat"` with nlist ≈ 4·√N (power of 2)    |
| factory string  | any `faiss.index_factory` string of a Flat/PQ/SQ, IVF or HNSW index,       |
|                 | with METRIC_INNER_PRODUCT; types that need training stay exact until they  |
|                 | have `39·nlist` (IVF) or 10k (others) vectors to train on                   |

The exact stage is never worse than the target, and switching happens inside `add`: once
from exact to the target, and for `auto` once more, from HNSW to IVF at 1M vectors, where
`bench/search_speed.py` measured IVF faster at higher recall (bench/RESULTS.md, "Search recall
and speed": 1M, one query at a time, IVF 129x exact at recall 0.991, HNSW 32x at 0.956).
Below 1M `auto` keeps HNSW, which needs no training on a sample that later vectors may not
resemble. The type is otherwise fixed; `IndexStore.rebuild` re-chooses it for the current size.

Deletions, for every type offered:
- Flat/PQ/SQ (in an `IndexIDMap2`) and IVF (ids stored natively) use FAISS `remove_ids`.
- HNSW cannot remove. Removed ids become *tombstones*: searches pass an `IDSelector` that
  excludes them, `ids()` omits them, and they are saved in the index file with the index.
  When tombstones exceed `HNSW_COMPACT_FRACTION` of the stored vectors the graph is rebuilt
  from the live vectors (reconstructed from the HNSW storage), so deleted nodes do not
  accumulate forever. Ids are never reused by the store, so a tombstoned id never returns.

Writes that do not grow with the index. Adding to an HNSW graph searches it, and adding to an
IVF compares every vector with every centroid (4,096 at 1M vectors), so a live commit's FAISS
add grew with the index: at 1M it was the one part of a commit that grew. New vectors of an HNSW
or IVF index therefore go to a *write buffer*, an exact `IDMap2(IndexFlatIP)` beside it, as
Milvus keeps new rows in a brute-force-searched segment (an add of `DIRECT_ADD_MIN` vectors or
more, a bulk chunk, is batched already and goes straight in): a search asks both and merges their
top k (the buffer's part is exact), a removal removes from both, and the buffer is moved into
the main index in one batched add when it holds `WRITE_BUFFER_MAX` vectors and before every
`save`, so the file format does not change. Flat/PQ/SQ indexes add in constant time and take no
buffer. The drain costs what the small adds it replaces cost, and it runs in the background
(`indexer/background_drain.py`): a full buffer is set aside (still searched, exactly, and still
removable), a new one takes the next writes, and a worker thread assigns the set-aside vectors
to IVF lists (reading the quantizer only) or inserts them into a copy of the HNSW graph. The
next write (or `save`, which waits) that finds the worker done lands it under the caller's
lock: an IVF `add_core` of a few ms (a writable load gives the lists room to grow, so the
first one after an open does not reallocate them: `ivf_lists.reserve_headroom`), or swapping
in the HNSW copy. So no commit waits for
a drain (~50 ms of list assignment into IVF at 1M, ~2 s of inserts into HNSW at 200k), at the
price of a second copy of the HNSW graph in memory while it runs.

File format (`save`/`load`): `MAGIC`, a little-endian uint32 header length, a JSON header
(generation, spec, sizes, CRC32s), the `faiss.serialize_index` bytes, then the tombstones as
little-endian int64. Written atomically: temp file in the same directory, fsync, `os.replace`,
fsync of the directory. A truncated or corrupt file fails the length/CRC checks on load.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import zlib
from pathlib import Path

import faiss
import numpy as np

from segsearch.durable import atomic_write
from segsearch.errors import IndexStoreError
from segsearch.indexer import ivf_lists
from segsearch.indexer.background_drain import EarlyAssignment, HnswDrain, IvfDrain

log = logging.getLogger(__name__)

AUTO_EXACT_MAX = 50_000
AUTO_IVF_MIN = 1_000_000  # "auto": from here IVF (measured crossover, see the module docstring)
HNSW_FACTORY = "HNSW32,Flat"
DEFAULT_EF_SEARCH = 192  # the recall@10 >= 0.95 setting of bench/search_speed.py (bench/RESULTS.md)
HNSW_COMPACT_FRACTION = 0.25
MIN_TRAIN_OTHER = 10_000
# Vectors held exactly beside an HNSW/IVF index before one batched move into it. A full buffer
# of 64-d vectors adds 0.35 ms to a single query (0.18 ms for IVF4096 at nprobe 16 on 1M alone),
# half that on average; its drain into that IVF takes ~0.2 s on one thread (bench/RESULTS.md,
# "Writes at 1M with a write buffer").
WRITE_BUFFER_MAX = 8192
# An add at least this large (a bulk indexing chunk) goes straight into the main index: it is
# batched already, and buffering it would only move its cost into a drain.
DIRECT_ADD_MIN = 1024
MAGIC = b"SGSFAIS1"
FILE_FORMAT = 1
_NORM_TOLERANCE = 1e-3


class VectorIndex:
    """A FAISS index plus the ids it must ignore (HNSW tombstones) and the generation it reflects.

    `generation` is the LMDB generation whose segment set this index holds; the index store
    sets it and compares it on open to detect a file saved before the last LMDB commit.
    `model_version` is saved too, so a file copied in from another index is recognised.
    """

    def __init__(self, dim: int, spec: str = "auto", *, ef_search: int = DEFAULT_EF_SEARCH,
                 nprobe: int | None = None) -> None:
        self.dim = int(dim)
        self.spec = spec.strip()
        self.ef_search = int(ef_search)
        self.nprobe = nprobe
        self.generation = 0
        self.model_version = ""
        self._selector: tuple | None = None  # cached IDSelector excluding the tombstones
        self._last_combined = None  # the caller's selector AND not-tombstones, alive for its search
        _validate_spec(self.dim, self.spec)
        self._train_min = _train_min(self.dim, self.spec)
        # Types that need training start exact (see the module docstring); others start as asked.
        self._rebuild(self._target_factory(0), np.empty(0, np.int64), np.empty((0, self.dim), np.float32))

    # ---- queries ---------------------------------------------------------------------

    @property
    def factory(self) -> str:
        """The faiss factory string of the index currently built (e.g. "Flat", "HNSW32,Flat")."""
        return self._factory

    @property
    def num_tombstones(self) -> int:
        return int(self._tombstones.size)

    def __len__(self) -> int:
        return int(self._index.ntotal) - int(self._tombstones.size) + self.num_buffered

    @property
    def num_buffered(self) -> int:
        """Vectors in the write buffer (and in one draining in the background), not yet in the
        HNSW/IVF index (see the module docstring)."""
        return sum(int(part.ntotal) for part in self._extras())

    def describe(self) -> str:
        if self._kind == "ivf":
            return f"{self._factory} (nprobe={self._index.nprobe})"
        if self._kind == "hnsw":
            return f"{self._factory} (efSearch={self.ef_search}, tombstones={self.num_tombstones})"
        return self._factory

    def ids(self) -> np.ndarray:
        """The live ids held, sorted, `(N,)` int64 (tombstones excluded)."""
        raw = np.sort(self._stored_ids())
        if self._tombstones.size:
            raw = raw[~np.isin(raw, self._tombstones)]
        return raw

    def search(self, queries: np.ndarray, k: int, effort: int | None = None,
               selector: faiss.IDSelector | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: queries `(Q, D)` -> `(scores (Q, k) float32, ids (Q, k) int64)`.

        `selector`: search only the ids it selects (the caller keeps it alive); tombstones stay
        excluded.

        `effort`: this call's HNSW efSearch / IVF nprobe (None: the index's own; ignored by
        exact indexes). It is passed to FAISS as per-call `SearchParameters`, so concurrent
        searches with different efforts do not interfere. Slots with no result (fewer than k
        live vectors) have id -1 and score -inf.
        """
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if effort is not None and effort < 1:
            raise ValueError(f"effort must be >= 1, got {effort}")
        queries = self._as_matrix(queries, "queries")
        if len(self) == 0:
            return (np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64))
        scores, ids = _found(*self._index.search(queries, k, params=self._search_params(k, effort, selector)))
        params = None
        if selector is not None:
            params = faiss.SearchParameters()
            params.sel = selector
        for part in self._extras():
            if part.ntotal:  # an empty buffer (always, beside a Flat index) adds nothing to merge
                scores, ids = _best_of(scores, ids, *_found(*part.search(queries, k, params=params)), k)
        return scores, ids

    @property
    def search_effort(self) -> tuple[str, int]:
        """`("efSearch", n)`, `("nprobe", n)` or `("", 0)` (exact): what `effort` sets, and its default."""
        if self._kind == "hnsw":
            return "efSearch", self.ef_search
        if self._kind == "ivf":
            return "nprobe", int(self._index.nprobe)
        return "", 0

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change HNSW efSearch / IVF nprobe (saved with the index)."""
        if ef_search is not None:
            self.ef_search = int(ef_search)
        if nprobe is not None:
            self.nprobe = int(nprobe)
        self._set_index(self._index)

    # ---- updates ---------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add `vectors (N, D)` (unit-norm float32) under new, unique int64 `ids (N,)`."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        vectors = self._as_matrix(vectors, "vectors")
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids) == 0:
            return
        self._check_new_ids(ids)
        _check_unit_norm(vectors)
        self._settle_drain(wait=False)
        target = self._target_factory(len(self) + len(ids))
        if self._switches_to(target):
            self._settle_drain(wait=True)
            old_ids, old_vecs = self._live_vectors()
            log.info("switching the vector index from %s to %s at %d vectors", self._factory, target,
                     len(old_ids) + len(ids))
            self._rebuild(target, np.concatenate([old_ids, ids]), np.concatenate([old_vecs, vectors]))
            return
        self._id_bound = max(self._stored_id_bound(), int(ids.max()))
        if self._kind == "flat" or len(ids) >= DIRECT_ADD_MIN:
            self._settle_drain(wait=True)  # a drain's worker reads (IVF) or copies (HNSW) the index
            _add_to(self._index, ids, vectors, self._early_lists(vectors))
            return
        self._buffer.add_with_ids(vectors, ids)
        if self._buffer.ntotal >= WRITE_BUFFER_MAX:
            self._drain_in_background()

    def prepare_add(self, vectors: np.ndarray) -> None:
        """Start finding the IVF lists of `vectors (N, D)` on a worker, for an `add` of them that
        follows (the index store calls this before a bulk chunk's LMDB commit). Does nothing
        for other index types or for adds small enough for the write buffer."""
        self._early = None
        if self._kind == "ivf" and len(vectors) >= DIRECT_ADD_MIN:
            self._early = EarlyAssignment(self._index, np.ascontiguousarray(vectors, dtype=np.float32))

    def _early_lists(self, vectors: np.ndarray) -> np.ndarray | None:
        early, self._early = self._early, None
        if early is None:
            return None
        try:
            return early.lists_for(self._index, vectors)
        except RuntimeError:  # the worker failed: the add finds the lists itself
            log.warning("finding IVF lists ahead of an add failed; finding them now", exc_info=True)
            return None

    def drain_buffer(self) -> None:
        """Move every buffered vector into the HNSW/IVF index now: a background drain's (waiting
        for its assignment) and the write buffer's (one batched add)."""
        self._settle_drain(wait=True)
        if not self._buffer.ntotal:
            return
        ids, vectors = _contents(self._buffer)
        _add_to(self._index, ids, vectors)
        self._buffer.reset()

    def _drain_in_background(self) -> None:
        """Set the full buffer aside (still searched) and drain it on a worker; a drain still
        running from the last time is landed first."""
        self._settle_drain(wait=True)
        ids, vectors = _contents(self._buffer)
        self._draining, self._buffer = self._buffer, _new_buffer(self.dim)
        self._drain = (IvfDrain if self._kind == "ivf" else HnswDrain)(self._index, ids, vectors)

    def _settle_drain(self, wait: bool) -> None:
        """Land a background drain once its worker is done (at once with `wait`), without the
        ids removed from the set-aside buffer meanwhile (tombstoned in an HNSW copy)."""
        drain = self._drain
        if drain is None or (not wait and not drain.done()):
            return
        self._drain = None  # settled, whatever happens below
        kept = np.isin(drain.ids, faiss.vector_to_array(self._draining.id_map))
        try:
            index, gone = drain.land(self._index, kept)
        except RuntimeError:  # the worker failed (out of memory for an HNSW copy, say): do it here
            log.warning("draining the write buffer in the background failed; draining it now", exc_info=True)
            _add_to(self._index, drain.ids[kept], drain.vectors[kept])
            index, gone = self._index, np.empty(0, np.int64)
        if index is not self._index:
            id_bound = self._id_bound
            self._set_index(index)
            self._id_bound = id_bound  # the same ids: no O(N) rescan
        if gone.size:
            self._tombstones = np.union1d(self._tombstones, gone)
            self._selector = None
        self._draining = None

    def _extras(self) -> list[faiss.Index]:
        """The exact indexes searched beside the main one: the write buffer, and the buffer
        draining in the background if any."""
        return [self._buffer] if self._draining is None else [self._buffer, self._draining]

    def remove(self, ids: np.ndarray) -> int:
        """Remove `ids` (absent ones are ignored); returns how many live vectors were removed."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        if ids.size == 0:
            return 0
        self._settle_drain(wait=False)
        buffered = sum(int(part.remove_ids(ids)) for part in self._extras() if part.ntotal)
        if self._kind != "hnsw":
            return buffered + int(self._index.remove_ids(ids))
        live = ids[np.isin(ids, self._main_ids()) & ~np.isin(ids, self._tombstones)]
        self._tombstones = np.union1d(self._tombstones, live)
        self._selector = None
        if self._tombstones.size > HNSW_COMPACT_FRACTION * self._index.ntotal:
            self.compact()
        return buffered + int(live.size)

    def compact(self) -> None:
        """Rebuild without tombstones, choosing the type for the live count again."""
        self._settle_drain(wait=True)
        live_ids, vectors = self._live_vectors()
        log.info("compacting the vector index: %d live, %d tombstones", len(live_ids), self._tombstones.size)
        self._rebuild(self._target_factory(len(live_ids)), live_ids, vectors)

    # ---- persistence -----------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the index atomically to `path` (temp file + fsync + rename + dir fsync); the
        write buffer is drained first, so the file holds every vector."""
        self.drain_buffer()
        payload = faiss.serialize_index(self._index)
        tombstones = self._tombstones.astype("<i8").tobytes()
        header = json.dumps({
            "format": FILE_FORMAT, "generation": int(self.generation), "spec": self.spec,
            "model_version": self.model_version,
            "factory": self._factory, "dim": self.dim, "ef_search": self.ef_search,
            "nprobe": self.nprobe, "faiss_bytes": int(payload.nbytes),
            "faiss_crc32": zlib.crc32(payload), "tombstones": int(self._tombstones.size),
            "tombstones_crc32": zlib.crc32(tombstones),
            # saves the reopened index the O(N) scan of its ids at its first add (~50 ms at 1M)
            "id_bound": self._stored_id_bound(),
        }).encode("utf-8")
        atomic_write(Path(path), [MAGIC, struct.pack("<I", len(header)), header, payload, tombstones])

    @classmethod
    def load(cls, path: str | Path, writable: bool = True) -> VectorIndex:
        """Read a file written by `save`; IndexStoreError naming the file if missing or damaged.
        `writable`: an IVF's lists get room to grow (`ivf_lists.reserve_headroom`); a reader
        that will not add to them can skip that copy and memory."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise IndexStoreError(f"FAISS index file {path} does not exist") from exc
        except OSError as exc:
            raise IndexStoreError(f"cannot read FAISS index file {path}: {exc}") from exc
        header, payload, tombstones = _split_file(path, data)
        self = cls.__new__(cls)
        self.dim, self.spec = int(header["dim"]), header["spec"]
        self.ef_search, self.nprobe = int(header["ef_search"]), header["nprobe"]
        self.generation, self._factory = int(header["generation"]), header["factory"]
        self.model_version, self._selector = header["model_version"], None
        self._train_min = _train_min(self.dim, self.spec)
        try:
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        except RuntimeError as exc:
            raise IndexStoreError(f"FAISS index file {path} is corrupt: {str(exc).splitlines()[0]}") from exc
        self._tombstones = np.frombuffer(tombstones, dtype="<i8").astype(np.int64)
        self._reset_pending()
        self._set_index(index)
        if writable and self._kind == "ivf":
            ivf_lists.reserve_headroom(self._index)
        self._id_bound = header.get("id_bound")  # absent in files written before it: found by a scan
        if self._index.d != self.dim:
            raise IndexStoreError(f"FAISS index file {path} holds {self._index.d}-d vectors, header says {self.dim}")
        return self

    # ---- internals -------------------------------------------------------------------

    def _switches_to(self, target: str) -> bool:
        """Exact switches to any target; an "auto" HNSW switches to IVF (at AUTO_IVF_MIN)."""
        if self._factory == "Flat":
            return target != "Flat"
        return self.spec.lower() == "auto" and self._kind == "hnsw" and target.startswith("IVF")

    def _target_factory(self, count: int) -> str:
        """The factory string this spec asks for once `count` vectors are held."""
        spec = self.spec.lower()
        if spec == "flat":
            return "Flat"
        if spec == "hnsw":
            return HNSW_FACTORY
        if spec in ("auto", "ivf"):
            if count < AUTO_EXACT_MAX:
                return "Flat"
            if spec == "auto" and count < AUTO_IVF_MIN:
                return HNSW_FACTORY
            return f"IVF{ivf_nlist_for(count)},Flat"
        if count < self._train_min:
            return "Flat"
        return self.spec

    def _rebuild(self, factory: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the index by a fresh `factory` index holding exactly `ids`/`vectors`."""
        inner = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not inner.is_trained:
            inner.train(vectors)
        index = inner if isinstance(inner, faiss.IndexIVF) else faiss.IndexIDMap2(inner)
        if len(ids):
            _add_to(index, ids, vectors)
        self._factory = factory
        self._tombstones = np.empty(0, dtype=np.int64)
        self._selector = None
        self._reset_pending()
        self._set_index(index)

    def _reset_pending(self) -> None:
        """An empty write buffer, no drain and no lists found ahead: the state of an index
        just built or loaded."""
        self._buffer, self._draining, self._drain = _new_buffer(self.dim), None, None
        self._early: EarlyAssignment | None = None  # see prepare_add

    def _set_index(self, index: faiss.Index) -> None:
        """Adopt `index`, classify its removal strategy and apply the search parameters."""
        self._index = index
        self._id_bound: int | None = None  # see _stored_id_bound
        inner = index if isinstance(index, faiss.IndexIVF) else faiss.downcast_index(index.index)
        self._kind = _classify(inner)
        if self._kind == "ivf":
            index.nprobe = self.nprobe or default_nprobe(index.nlist)
        elif self._kind == "hnsw":
            inner.hnsw.efSearch = self.ef_search

    def _search_params(self, k: int, effort: int | None = None,
                       selector: faiss.IDSelector | None = None) -> faiss.SearchParameters | None:
        if self._kind == "ivf":
            if effort is None and selector is None:
                return None
            params = faiss.SearchParametersIVF()
            params.nprobe = min(int(effort if effort is not None else self._index.nprobe), int(self._index.nlist))
            params.sel = selector
            return params
        if self._kind != "hnsw":
            if selector is None:
                return None
            params = faiss.SearchParameters()
            params.sel = selector
            return params
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search if effort is None else int(effort), k)
        if self._tombstones.size:
            if self._selector is None:  # built once per tombstone set, not per search
                batch = faiss.IDSelectorBatch(self._tombstones)
                self._selector = (batch, faiss.IDSelectorNot(batch))  # keep both alive
            params.sel = self._selector[1]
            if selector is not None:
                both = faiss.IDSelectorAnd(selector, self._selector[1])
                self._last_combined = both  # alive until the next search with a selector
                params.sel = both
        elif selector is not None:
            params.sel = selector
        return params

    def _stored_ids(self) -> np.ndarray:
        """All ids physically stored (main index and buffers), tombstones included, unsorted."""
        buffered = [faiss.vector_to_array(part.id_map).astype(np.int64) for part in self._extras()]
        return np.concatenate([self._main_ids(), *buffered])

    def _main_ids(self) -> np.ndarray:
        """The ids physically stored in the main index (not the buffer), unsorted."""
        if self._kind != "ivf":
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)
        lists = self._index.invlists
        parts = []
        for list_no in range(self._index.nlist):
            size = lists.list_size(list_no)
            if size:
                ptr = lists.get_ids(list_no)
                parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                lists.release_ids(list_no, ptr)
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    def _live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """`(ids (N,), vectors (N, D))` of the live entries of an IDMap2-wrapped index and of
        the buffers (read, not drained: the callers rebuild from them)."""
        parts = [_contents(part) for part in self._extras()]
        ids, vectors = _contents(self._index)
        keep = ~np.isin(ids, self._tombstones)
        return (np.concatenate([ids[keep], *(i for i, _ in parts)]),
                np.concatenate([vectors[keep], *(v for _, v in parts)]))

    def _check_new_ids(self, ids: np.ndarray) -> None:
        """Refuse negative, repeated or already stored ids. The index store assigns ids in
        increasing order, so a new chunk's ids normally all lie above every stored one: then
        the bound answers, and the O(N) scan of the stored ids (tens of ms at 1M vectors, most
        of a live commit's time) is skipped."""
        if ids.min() < 0:
            raise ValueError("segment ids must be non-negative")
        if np.unique(ids).size != ids.size:
            raise ValueError("duplicate ids in one add")
        if ids.min() > self._stored_id_bound():
            return
        clash = ids[np.isin(ids, self._stored_ids())]
        if clash.size:
            raise ValueError(f"ids already in the vector index: {clash[:10].tolist()}")

    def _stored_id_bound(self) -> int:
        """An upper bound of the ids physically stored (tombstones included), -1 when none;
        computed once per index object, then raised by every add."""
        if self._id_bound is None:
            stored = self._stored_ids()
            self._id_bound = int(stored.max()) if stored.size else -1
        return self._id_bound

    def _as_matrix(self, array: np.ndarray, name: str) -> np.ndarray:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (N, {self.dim}), got {array.shape}")
        return array


def _new_buffer(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _contents(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """`(ids (N,), vectors (N, D))` held by an `IndexIDMap2` (tombstones included)."""
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    if not len(ids):
        return ids, np.empty((0, index.d), np.float32)
    return ids, faiss.downcast_index(index.index).reconstruct_n(0, len(ids))


def _found(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAISS results as returned by `search`: float32 scores with -inf in empty slots, int64 ids."""
    scores = scores.astype(np.float32, copy=True)
    scores[ids < 0] = -np.inf
    return scores, ids.astype(np.int64, copy=False)


def _best_of(scores: np.ndarray, ids: np.ndarray, more_scores: np.ndarray, more_ids: np.ndarray,
             k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k of two result sets `(Q, k)` each, best first (ties: the first set first)."""
    all_scores = np.concatenate([scores, more_scores], axis=1)
    all_ids = np.concatenate([ids, more_ids], axis=1)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_ids, order, axis=1)


def ivf_nlist_for(count: int) -> int:
    """nlist ≈ 4·√N rounded to a power of two, within [16, 65536]."""
    return int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(max(count, 1)))))))


def default_nprobe(nlist: int) -> int:
    """Lists probed by default: nlist/256, at least 8 (and at most nlist).

    Chosen from bench/search_speed.py on clustered prototypes (figures in bench/RESULTS.md):
    a few lists reach the recall goal, while nlist/16 was no faster than exact search."""
    return int(min(nlist, max(8, nlist // 256)))


def _split_file(path: Path, data: bytes) -> tuple[dict, memoryview, memoryview]:
    """Check magic, header, sizes and CRCs; return `(header, faiss bytes, tombstone bytes)`."""
    def corrupt(reason: str) -> IndexStoreError:
        return IndexStoreError(f"FAISS index file {path} is corrupt or truncated: {reason}")

    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise corrupt("not a segsearch FAISS file (bad magic)")
    (header_len,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start:start + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(f"unreadable header ({exc})") from exc
    if header.get("format") != FILE_FORMAT:
        raise corrupt(f"unknown file format {header.get('format')!r}")
    view = memoryview(data)[start + header_len:]
    n_faiss, n_tomb = header["faiss_bytes"], 8 * header["tombstones"]
    if len(view) != n_faiss + n_tomb:
        raise corrupt(f"expected {n_faiss + n_tomb} bytes after the header, found {len(view)}")
    payload, tombstones = view[:n_faiss], view[n_faiss:]
    if zlib.crc32(payload) != header["faiss_crc32"] or zlib.crc32(tombstones) != header["tombstones_crc32"]:
        raise corrupt("checksum mismatch")
    return header, payload, tombstones


def _add_to(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, lists: np.ndarray | None = None) -> None:
    """`index.add_with_ids`; an IVF's lists are `lists (N,)` when found ahead, else found by
    `ivf_lists` (~4x faster on one thread than FAISS's own add)."""
    if not isinstance(index, faiss.IndexIVF):
        index.add_with_ids(vectors, ids)
    elif lists is not None:
        ivf_lists.add_preassigned(index, ids, vectors, lists)
    else:
        ivf_lists.add(index, ids, vectors)


def _classify(inner: faiss.Index) -> str:
    if isinstance(inner, faiss.IndexIVF):
        return "ivf"
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexFlatCodes):
        return "flat"
    raise IndexStoreError(
        f"FAISS index type {type(inner).__name__} is not supported (deletions must work): use "
        "'auto', 'flat', 'hnsw', 'ivf', or a factory string of a Flat/PQ/SQ, IVF or HNSW index"
    )


def _validate_spec(dim: int, spec: str) -> None:
    if spec.lower() in ("auto", "flat", "hnsw", "ivf"):
        return
    if spec.upper().startswith("IDMAP"):
        raise IndexStoreError(f"index spec {spec!r}: leave out the IDMap prefix, segsearch adds ids itself")
    try:
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise IndexStoreError(f"invalid faiss index factory string {spec!r}: {str(exc).splitlines()[0]}") from exc
    _classify(index)


def _train_min(dim: int, spec: str) -> int:
    """Vectors a factory-string index needs before it is built (0: no training needed)."""
    if spec.lower() in ("auto", "flat", "hnsw", "ivf"):
        return 0
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return 0
    if isinstance(index, faiss.IndexIVFFlat):
        return 39 * index.nlist
    # Other codecs (PQ, SQ, ...) train their own codebooks too: ask for more points.
    return max(39 * index.nlist, MIN_TRAIN_OTHER) if isinstance(index, faiss.IndexIVF) else MIN_TRAIN_OTHER


def _check_unit_norm(vectors: np.ndarray) -> None:
    norms = np.linalg.norm(vectors, axis=1)
    if not np.all(np.isfinite(norms)) or np.abs(norms - 1.0).max() > _NORM_TOLERANCE:
        raise ValueError("prototypes must be finite and unit-norm (inner product = cosine)")
