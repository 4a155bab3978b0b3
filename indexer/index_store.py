"""One index directory: the LMDB metadata store + the FAISS vector index, kept consistent.

Layout of `INDEX_DIR`:

    metadata.lmdb/     LMDB environment (records, prototypes, meta) — the source of truth
    vectors.faiss      FAISS index + tombstones + the LMDB generation it reflects
    writer.lock        flock held by the one process allowed to write

Crash safety. LMDB is the write-ahead log. Every chunk is committed in this order:

1. ONE LMDB write transaction stores the chunk's records (prototypes included), allocates
   their segment ids and bumps `IndexMeta.generation`;
2. then the in-memory FAISS index is updated and its `generation` set to LMDB's;
3. then, when the snapshot policy says so (`SnapshotPolicy`: enough vectors changed, or
   enough time passed, or every `save_every` chunks when asked), the FAISS file is written
   atomically (temp + fsync + rename + directory fsync) *with that generation inside it*.

A crash before (1) commits leaves nothing; a crash after (1) leaves a FAISS file whose
generation is older than LMDB's (or a missing/corrupt file, which is also possible through
disk damage). `open` detects both and repairs: it adds the LMDB segments FAISS lacks (from
the stored prototypes), removes the ids FAISS holds that LMDB lacks (deleted images), records
LMDB's generation and saves. So after any crash the two agree after the next open.

Saving the FAISS file rarely trades repair work for speed: writing the whole index after
every chunk made each commit cost a full-index write; with the policy a crash costs re-adding at
most the unsaved vectors from LMDB on the next open (no model work is redone; `last_replay`
reports it). `close` and `flush` always save.

Searches only return segments that LMDB holds too, so a segment exists for search only when
both stores hold it, even in the instant between steps (1) and (2) of a delete.

Storage faults. A write is acknowledged (returns) only after its LMDB commit, which LMDB
syncs to disk (`sync=True`). A full disk or LMDB map raises IndexFullError and nothing of
the write is committed (the free space is checked before the LMDB commit, so the FAISS file
can still be saved after it). A failed fsync (or any other LMDB write failure) raises
StorageFailedError and the store refuses all later writes until reopened: after a failed
fsync the kernel may have dropped the dirty pages, so carrying on could lose data silently.

Only one process may write an index (the `writer.lock` flock, released by the kernel when a
process dies); readers open with `read_only=True` and repair in memory only. Do not open the
same index twice in one process (LMDB's rule).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from segsearch.errors import IndexStoreError, IndexFullError, StorageFailedError
from segsearch.indexer.metadata_store import DEFAULT_MAP_SIZE, MetadataStore
from segsearch.indexer.records import LEVEL_FINE, LEVEL_REGION, ImageRecord, IndexMeta, SegmentRecord
from segsearch.durable import fsync_dir, remove_stale_temp_files, space_report
from segsearch.indexer.config import SnapshotPolicy
from segsearch.indexer.store_api import StoreStats
from segsearch.indexer.vector_index import DEFAULT_EF_SEARCH, DIRECT_ADD_MIN, VectorIndex

log = logging.getLogger(__name__)

LMDB_DIR = "metadata.lmdb"
VECTORS_FILE = "vectors.faiss"
LOCK_FILE = "writer.lock"
_REBUILD_BATCH = 65536
_LMDB_PAGES_PER_TXN = 16  # copy-on-write branch pages, meta and free-list pages of one commit


@dataclass
class SearchHit:
    """One search result: the segment's id, its inner-product score and its record."""

    segment_id: int
    score: float
    segment: SegmentRecord


@dataclass
class AddResult:
    """What `add_images` did: new segment ids, images stored, images skipped and why."""

    segment_ids: list[int] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


class IndexStore:
    """Read/write access to one index directory (see the module docstring)."""

    def __init__(self, root: Path, metadata: MetadataStore, vectors: VectorIndex,
                 lock_fd: int | None, snapshot: SnapshotPolicy) -> None:
        self.root = root
        self._metadata = metadata
        self._vectors = vectors
        self._lock_fd = lock_fd
        self._snapshot = snapshot
        self._unsaved_chunks = 0
        self._unsaved_vectors = 0
        self._saved_at = time.monotonic()
        self.last_replay = Replay()  # what the open re-added from LMDB
        self._stale = False  # the in-memory FAISS index may disagree with LMDB
        self._mutex = threading.RLock()
        self._closed = False
        self._failed: str | None = None  # why writes are refused after a storage failure
        self._regions: tuple | None = None  # (generation, region selector, fine selector)

    @property
    def read_only(self) -> bool:
        """Opened without the writer lock: writes are refused, `refresh` follows the writer."""
        return self._lock_fd is None

    # ---- lifecycle -------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path, model_version: str, embedding_dim: int, index_spec: str = "auto",
               map_size: int = DEFAULT_MAP_SIZE, *, save_every: int | None = None,
               ef_search: int = DEFAULT_EF_SEARCH, nprobe: int | None = None,
               first_segment_id: int = 1) -> IndexStore:
        """Create an empty index in `root` (which must not exist or be empty).

        `first_segment_id` starts the id counter elsewhere than 1: the shards of a distributed
        job each get a disjoint id range (indexer/shards.py), so their ids survive a merge.
        """
        if first_segment_id < 1:
            raise ValueError(f"first_segment_id must be >= 1, got {first_segment_id}")
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            raise IndexStoreError(
                f"{root} is not empty; choose a new --out directory, or add to an existing "
                "index with `segsearch index add`"
            )
        vectors = VectorIndex(embedding_dim, index_spec, ef_search=ef_search, nprobe=nprobe)  # validates spec
        vectors.model_version = model_version
        meta = IndexMeta(model_version=model_version, embedding_dim=int(embedding_dim), index_type=index_spec,
                         next_segment_id=int(first_segment_id), region_table=True)
        # Built in a staging directory and renamed into place, so that a crash during create
        # leaves either no index or a complete empty one (never a half-made directory).
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = root.parent / f".{root.name}.creating-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        lock_fd = _acquire_writer_lock(staging)
        metadata = None
        try:
            metadata = MetadataStore.create(staging / LMDB_DIR, meta, map_size)
            vectors.save(staging / VECTORS_FILE)
            if root.exists():
                root.rmdir()  # checked empty above
            os.rename(staging, root)
            fsync_dir(root.parent)
        except BaseException:
            if metadata is not None:
                metadata.close()
            os.close(lock_fd)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        metadata.path = root / LMDB_DIR
        log.info("created index %s (model %s, %d-d, %s)", root, model_version, embedding_dim, index_spec)
        return cls(root, metadata, vectors, lock_fd, _policy(save_every))

    @classmethod
    def open(cls, root: str | Path, model_version: str | None = None, *, map_size: int | None = None,
             read_only: bool = False, repair: bool = True, save_every: int | None = None,
             ef_search: int | None = None, nprobe: int | None = None) -> IndexStore:
        """Open an existing index, refusing another model version, repairing FAISS if needed.

        `repair=False` loads the FAISS file as it is (an error if it is unreadable) so that
        `verify` reports the on-disk state; read-only stores repair in memory only.
        """
        root = Path(root)
        if not (root / LMDB_DIR / "data.mdb").exists():
            raise IndexStoreError(f"no segsearch index at {root} (missing {LMDB_DIR}); create one with `segsearch index`")
        lock_fd = None if read_only else _acquire_writer_lock(root)
        try:
            metadata = MetadataStore.open(root / LMDB_DIR, map_size=map_size, read_only=read_only)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        try:
            _check_model_version(root, metadata.meta(), model_version)
            if not read_only:
                remove_stale_temp_files(root, VECTORS_FILE)
            vectors = _load_vectors(root, metadata, repair, writable=not read_only)
        except BaseException:
            metadata.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        store = cls(root, metadata, vectors, lock_fd, _policy(save_every))
        try:
            if ef_search is not None or nprobe is not None:
                vectors.set_search_params(ef_search=ef_search, nprobe=nprobe)
            if repair and vectors.generation != metadata.meta().generation:
                started = time.perf_counter()
                added, removed = store._repair(logging.WARNING)
                store.last_replay = Replay(added, removed, time.perf_counter() - started)
                log.info("replayed %d additions and %d removals from LMDB in %.2f s", added, removed,
                         store.last_replay.seconds)
            if not read_only and store._unsaved_chunks:
                store.flush()
        except BaseException:
            store._unsaved_chunks = 0
            store.close()
            raise
        return store

    def close(self) -> None:
        """Save unsaved FAISS changes (writers), then release LMDB and the writer lock."""
        if self._closed:
            return
        try:
            if self._lock_fd is not None and self._unsaved_chunks and not self._failed:
                self.flush()  # a failed store writes nothing more: the next open repairs from LMDB
        finally:
            self._closed = True
            self._metadata.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- writes ----------------------------------------------------------------------

    def add_images(self, batch: Sequence[tuple[ImageRecord, Sequence[SegmentRecord]]]) -> AddResult:
        """Add a chunk of images with their segments (ids assigned here); one LMDB transaction.

        An image whose sha256 is already indexed (or whose id is taken) is skipped, so
        re-indexing adds nothing. Segments must carry this index's model version.
        """
        with self._writing():
            self._ensure_consistent()
            self._check_room(batch)
            self._prepare_vectors(batch)
            put = self._metadata.put_images(batch)  # (1) LMDB commit: the source of truth
            result = AddResult(put.segment_ids, [img.image_id for img, _ in put.added], put.skipped)
            if not put.added:
                return result
            segments = [seg for _, segs in put.added for seg in segs]
            self._apply(put.generation, lambda: self._add_vectors(segments), len(segments))
            return result

    def delete_images(self, image_ids: Sequence[str]) -> list[int]:
        """Delete images and their segments from both stores; returns the removed segment ids.

        Unknown image ids raise IndexStoreError listing them, and nothing is deleted.
        """
        if not image_ids:
            return []
        with self._writing():
            self._ensure_consistent()
            self._check_room([])
            removed, generation = self._metadata.delete_images(image_ids)  # (1) LMDB commit
            self._apply(generation, lambda: self._vectors.remove(np.asarray(removed, dtype=np.int64)), len(removed))
            return removed

    def delete_segments(self, segment_ids: Sequence[int]) -> list[int]:
        """Delete single segments from both stores (and from their images' `segment_ids`);
        returns the removed ids. Same durability as `delete_images`: one LMDB commit, then
        FAISS. Unknown ids raise IndexStoreError listing them, and nothing is deleted."""
        if not segment_ids:
            return []
        with self._writing():
            self._ensure_consistent()
            self._check_room([])
            removed, generation = self._metadata.delete_segments(segment_ids)  # (1) LMDB commit
            self._apply(generation, lambda: self._vectors.remove(np.asarray(removed, dtype=np.int64)), len(removed))
            return removed

    def flush(self) -> None:
        """Write the FAISS file now (atomically), with the generation it reflects."""
        with self._writing():
            self._ensure_consistent()
            self._vectors.save(self.root / VECTORS_FILE)
            self._unsaved_chunks = self._unsaved_vectors = 0
            self._saved_at = time.monotonic()

    def rebuild_vectors(self) -> None:
        """Rebuild the FAISS index from LMDB, choosing its type for the current size, and save."""
        with self._writing():
            old = self._vectors
            self._vectors = _vectors_from_lmdb(self._metadata, ef_search=old.ef_search, nprobe=old.nprobe)
            self._stale = False
            self._unsaved_chunks += 1
            self.flush()

    def refresh(self) -> bool:
        """Catch up with LMDB commits made by another process (readers); True if changed."""
        with self._mutex:
            if self._vectors.generation == self._metadata.meta().generation and not self._stale:
                return False
            self._repair(logging.INFO)  # routine for a reader following a writer
            return True

    # ---- reads -----------------------------------------------------------------------

    @property
    def meta(self) -> IndexMeta:
        return self._metadata.meta()

    def search(self, vectors: np.ndarray, k: int, effort: int | None = None,
               levels: frozenset[int] = frozenset()) -> list[list[SearchHit]]:
        """Nearest segments of each query `(Q, D)` (or one `(D,)`), best first, at most k each;
        `effort`: HNSW efSearch / IVF nprobe of this call only (None: the index's own);
        `levels`: only segments of these levels (`records.LEVEL_*`; empty: all), selected inside
        FAISS, so k hits of a level come back in one search however rare the level is."""
        queries = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        with self._mutex:
            self._ensure_consistent()
            scores, ids = self._vectors.search(queries, k, effort, self._level_selector(levels))
        records = self._metadata.get_segments(ids.reshape(-1).tolist())
        hits: list[list[SearchHit]] = []
        for row in range(len(queries)):
            row_hits = []
            for col in range(ids.shape[1]):
                record = records[row * ids.shape[1] + col]
                if record is not None:  # a segment exists for search only if LMDB holds it too
                    row_hits.append(SearchHit(int(ids[row, col]), float(scores[row, col]), record))
            hits.append(row_hits)
        return hits

    def _level_selector(self, levels: frozenset[int]):
        """A FAISS IDSelector of the segments of `levels` (None: no restriction), from the
        region ids in LMDB, cached until the next commit changes the generation."""
        if not levels or levels >= {LEVEL_FINE, LEVEL_REGION}:
            return None
        generation = self._vectors.generation
        if self._regions is None or self._regions[0] != generation:
            region_ids = self._metadata.region_ids()
            if region_ids is None:  # no complete table (an index written before it, read-only):
                self._regions = (generation, None, None)  # the caller's filter on the records decides
            else:
                batch = faiss.IDSelectorBatch(region_ids)
                self._regions = (generation, batch, faiss.IDSelectorNot(batch))  # keep both alive
        return self._regions[1] if LEVEL_REGION in levels else self._regions[2]

    def get_segment(self, segment_id: int) -> SegmentRecord:
        record = self._metadata.get_segment(segment_id)
        if record is None:
            raise IndexStoreError(f"segment id {segment_id} is not in the index at {self.root}")
        return record

    def get_image(self, image_id: str) -> ImageRecord:
        record = self._metadata.get_image(image_id)
        if record is None:
            raise IndexStoreError(f"image id {image_id!r} is not in the index at {self.root}")
        return record

    def has_image(self, image_id: str) -> bool:
        return self._metadata.get_image(image_id) is not None

    def iter_images(self) -> Iterator[ImageRecord]:
        """Every image record, in image-id order (LMDB key order)."""
        return self._metadata.iter_images()

    def image_id_for_sha256(self, sha256: str) -> str | None:
        """The id under which content with this digest is indexed (lets a resumed job skip it)."""
        return self._metadata.image_id_for_sha256(sha256)

    def segment_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """`(LMDB ids, FAISS ids)`, each sorted `(N,)` int64; equal when consistent."""
        with self._mutex:
            return self._metadata.segment_ids(), self._vectors.ids()

    def stats(self) -> StoreStats:
        meta = self._metadata.meta()
        path = self.root / VECTORS_FILE
        with self._mutex:
            return StoreStats(
                path=str(self.root), model_version=meta.model_version, embedding_dim=meta.embedding_dim,
                num_images=meta.num_images, num_segments=meta.num_segments, index_spec=meta.index_type,
                faiss_index=self._vectors.describe(), faiss_vectors=len(self._vectors),
                faiss_tombstones=self._vectors.num_tombstones, generation=meta.generation,
                format_version=meta.format_version, faiss_file_bytes=path.stat().st_size if path.exists() else 0,
                lmdb=self._metadata.usage(), **_effort_stats(self._vectors))

    def verify(self) -> list[str]:
        """Problems found (empty = consistent): FAISS vs LMDB ids, versions, counts, links."""
        meta = self._metadata.meta()
        with self._mutex:
            faiss_ids, faiss_gen, faiss_dim = self._vectors.ids(), self._vectors.generation, self._vectors.dim
            faiss_spec, faiss_model = self._vectors.spec, self._vectors.model_version
        lmdb_ids = self._metadata.segment_ids()
        problems = _id_problems(faiss_ids, lmdb_ids)
        if faiss_gen != meta.generation:
            problems.append(f"FAISS index reflects generation {faiss_gen}, LMDB is at {meta.generation}")
        if faiss_dim != meta.embedding_dim:
            problems.append(f"FAISS index holds {faiss_dim}-d vectors, meta says {meta.embedding_dim}")
        if faiss_model != meta.model_version:
            problems.append(f"FAISS index was built for model {faiss_model!r}, LMDB holds {meta.model_version!r}")
        if faiss_spec != meta.index_type:
            problems.append(f"FAISS index spec {faiss_spec!r} differs from meta {meta.index_type!r}")
        problems += _record_problems(self._metadata, meta, lmdb_ids)
        return problems

    # ---- internals -------------------------------------------------------------------

    def _apply(self, generation: int, update, changed: int) -> None:
        """Steps (2) and (3) of a chunk: update FAISS in memory (`changed` vectors added or
        removed), then save when the snapshot policy says so."""
        try:
            update()
        except BaseException:
            self._stale = True  # LMDB committed; the next operation repairs FAISS from it
            raise
        self._vectors.generation = generation
        self._unsaved_chunks += 1
        self._unsaved_vectors += changed
        if self._snapshot.due(self._unsaved_vectors, self._unsaved_chunks, len(self._vectors),
                              time.monotonic() - self._saved_at):
            try:
                self.flush()
            except IndexFullError as exc:  # after the LMDB commit: say that the write did happen
                raise IndexFullError(f"{exc}. This write itself IS committed (LMDB) and searchable; "
                                     f"{VECTORS_FILE} is saved by the next write or rebuilt by the next "
                                     "open") from exc

    def _prepare_vectors(self, batch: Sequence[tuple[ImageRecord, Sequence[SegmentRecord]]]) -> None:
        """Let the vector index find where a bulk chunk's vectors go (IVF lists) on a worker
        while the LMDB commit runs; the add after the commit uses it (`VectorIndex.prepare_add`)."""
        segments = [seg for _, segs in batch for seg in segs]
        if len(segments) >= DIRECT_ADD_MIN:
            self._vectors.prepare_add(np.stack([seg.prototype for seg in segments]))

    def _add_vectors(self, segments: list[SegmentRecord]) -> None:
        if segments:  # images without segments are stored in LMDB only
            ids = np.asarray([seg.segment_id for seg in segments], dtype=np.int64)
            self._vectors.add(ids, np.stack([seg.prototype for seg in segments]))

    def _ensure_consistent(self) -> None:
        if self._stale:
            self._repair(logging.WARNING)

    def _repair(self, level: int) -> tuple[int, int]:
        """Make the in-memory FAISS index hold exactly LMDB's ids (from stored prototypes)."""
        generation, lmdb_ids = self._metadata.segment_ids_with_generation()
        faiss_ids = self._vectors.ids()
        extra = np.setdiff1d(faiss_ids, lmdb_ids, assume_unique=True)
        missing = np.setdiff1d(lmdb_ids, faiss_ids, assume_unique=True)
        log.log(
            level, "repairing %s from LMDB: FAISS was at generation %d, LMDB at %d; removing %d, adding %d",
            self.root / VECTORS_FILE, self._vectors.generation, generation, extra.size, missing.size,
        )
        self._vectors.remove(extra)
        for ids, vectors in self._metadata.prototypes(missing, skip_missing=self._lock_fd is None):
            self._vectors.add(ids, vectors)
        self._vectors.generation = generation
        self._stale = False
        self._unsaved_chunks += 1
        self._unsaved_vectors += int(extra.size + missing.size)
        return int(missing.size), int(extra.size)

    @contextmanager
    def _writing(self):
        """The mutex, writability, and fail-stop: a StorageFailedError (a failed fsync or LMDB
        write) makes this store refuse every later write instead of carrying on over data the
        kernel may have dropped; reads go on, and reopening repairs FAISS from LMDB."""
        with self._mutex:
            self._check_writable()
            try:
                yield
            except StorageFailedError as exc:
                self._failed = str(exc)
                log.error("index %s refuses further writes: %s", self.root, exc)
                raise

    def _check_room(self, batch: Sequence[tuple[ImageRecord, Sequence[SegmentRecord]]]) -> None:
        """Refuse a write up front when the disk cannot hold its LMDB pages and the next FAISS
        file, so that a full disk fails the write before LMDB commits (nothing written) rather
        than after (a committed batch whose FAISS file cannot be saved)."""
        try:
            stats = os.statvfs(self.root)
            faiss_bytes = (self.root / VECTORS_FILE).stat().st_size
        except OSError:
            return
        if not stats.f_blocks:  # a filesystem that reports no sizes
            return
        dim = self._metadata.meta().embedding_dim
        segments = sum(len(segs) for _, segs in batch)
        stored = len(self._vectors) + self._vectors.num_tombstones
        per_vector = max(4 * dim + 8, faiss_bytes // max(1, stored))
        lmdb_bytes = 2 * segments * (4 * dim + 1024) + _LMDB_PAGES_PER_TXN * 4096
        needed = faiss_bytes + segments * per_vector + lmdb_bytes
        free = stats.f_bavail * stats.f_frsize
        if free < needed:
            raise IndexFullError(
                f"cannot write the index at {self.root}: {space_report(self.root)}, this write needs "
                f"about {needed} (LMDB pages and a new {VECTORS_FILE}); nothing was written. Free "
                "space there (or delete images with `segsearch index delete`) and retry")

    def _check_writable(self) -> None:
        if self._failed:
            raise StorageFailedError(
                f"the index at {self.root} refuses writes since a storage failure ({self._failed}). "
                "Data committed before it is safe in LMDB. Check the disk, then reopen the index "
                "(restart `segsearch serve`): the open rebuilds what FAISS lacks from LMDB")
        if self._closed:
            raise IndexStoreError(f"index at {self.root} is closed")
        if self._lock_fd is None:
            raise IndexStoreError(f"index at {self.root} was opened read-only")


def _effort_stats(vectors: VectorIndex) -> dict[str, int]:
    kind, value = vectors.search_effort
    return {"ef_search": value if kind == "efSearch" else 0, "nprobe": value if kind == "nprobe" else 0}


@dataclass(frozen=True)
class Replay:
    """What an open re-added (and removed) from LMDB because the FAISS snapshot lagged."""

    added: int = 0
    removed: int = 0
    seconds: float = 0.0


def _policy(save_every: int | None) -> SnapshotPolicy:
    """`save_every` chunks when given (the indexer's --save-every, tests), else by size and time."""
    return SnapshotPolicy() if save_every is None else SnapshotPolicy.every(save_every)


def _load_vectors(root: Path, metadata: MetadataStore, repair: bool, writable: bool) -> VectorIndex:
    """The FAISS file, or (when `repair`) a rebuild from LMDB if it is missing or damaged."""
    path = root / VECTORS_FILE
    meta = metadata.meta()
    try:
        vectors = VectorIndex.load(path, writable=writable)
        if vectors.dim != meta.embedding_dim or vectors.model_version != meta.model_version:
            raise IndexStoreError(
                f"FAISS index file {path} belongs to another index ({vectors.dim}-d, model "
                f"{vectors.model_version!r}; this one is {meta.embedding_dim}-d, {meta.model_version!r})"
            )
        return vectors
    except IndexStoreError as exc:
        if not repair:
            raise
        log.warning("%s; rebuilding it from the LMDB store (%d segments)", exc, meta.num_segments)
    vectors = _vectors_from_lmdb(metadata)
    vectors.generation = -1  # forces the open to save the rebuilt file
    return vectors


def _vectors_from_lmdb(metadata: MetadataStore, ef_search: int = DEFAULT_EF_SEARCH,
                       nprobe: int | None = None) -> VectorIndex:
    generation, _ = metadata.segment_ids_with_generation()
    meta = metadata.meta()
    vectors = VectorIndex(meta.embedding_dim, meta.index_type, ef_search=ef_search, nprobe=nprobe)
    vectors.model_version = meta.model_version
    for ids, protos in metadata.prototypes(batch_size=_REBUILD_BATCH, skip_missing=True):
        vectors.add(ids, protos)
    vectors.generation = generation
    return vectors


def _check_model_version(root: Path, meta: IndexMeta, model_version: str | None) -> None:
    if model_version is not None and model_version != meta.model_version:
        raise IndexStoreError(
            f"the index at {root} holds segments of model version {meta.model_version!r}, but "
            f"the model is version {model_version!r}; one index never mixes versions: use the "
            "checkpoint it was built with, or index into a new --out directory"
        )


def _acquire_writer_lock(root: Path) -> int:
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise IndexStoreError(
            f"the index at {root} is open for writing by another process (or another IndexStore "
            "in this one); wait for it to finish, or open it read-only"
        ) from exc
    return fd


def _id_problems(faiss_ids: np.ndarray, lmdb_ids: np.ndarray) -> list[str]:
    problems = []
    for name, only in (("FAISS but not LMDB", np.setdiff1d(faiss_ids, lmdb_ids)),
                       ("LMDB but not FAISS", np.setdiff1d(lmdb_ids, faiss_ids))):
        if only.size:
            problems.append(f"{only.size} segment id(s) in {name}: {only[:10].tolist()}")
    return problems


def _parent_problems(parents: dict, owner: dict, levels: dict, meta: IndexMeta) -> list[str]:
    """A parent that exists is a coarser segment of the same image. A parent that does not
    exist is not flagged: deleting a region by id clears its children's parent, but an index
    written before that may still name one (its children are then parentless in effect)."""
    problems = []
    for segment_id, (parent_id, level, image_id) in parents.items():
        if parent_id in owner and (owner[parent_id] != image_id or levels[parent_id] <= level):
            problems.append(f"segment {segment_id} names segment {parent_id} as parent, which is not a "
                            "coarser segment of its image")
    if not meta.has_regions and any(levels.values()):
        problems.append("region-level segments are stored but the meta record says there are none")
    return problems


def _record_problems(metadata: MetadataStore, meta: IndexMeta, lmdb_ids: np.ndarray) -> list[str]:
    """Counts, model versions, dimensions, and the image <-> segment <-> sha256 links."""
    problems = []
    if meta.num_segments != lmdb_ids.size:
        problems.append(f"meta counts {meta.num_segments} segments, LMDB holds {lmdb_ids.size}")
    if lmdb_ids.size and lmdb_ids.max() >= meta.next_segment_id:
        problems.append(f"segment id {lmdb_ids.max()} >= next id counter {meta.next_segment_id}")
    owner: dict[int, str] = {}
    parents: dict[int, tuple[int, int, str]] = {}  # segment id -> (parent id, own level, image)
    levels: dict[int, int] = {}
    for seg in metadata.iter_segments():
        owner[seg.segment_id] = seg.image_id
        levels[seg.segment_id] = seg.level
        if seg.parent_id:
            parents[seg.segment_id] = (seg.parent_id, seg.level, seg.image_id)
        if seg.model_version != meta.model_version:
            problems.append(f"segment {seg.segment_id} has model version {seg.model_version!r}, "
                            f"the index {meta.model_version!r}")
        if seg.prototype.shape != (meta.embedding_dim,):
            problems.append(f"segment {seg.segment_id} prototype has shape {seg.prototype.shape}")
    problems += _parent_problems(parents, owner, levels, meta)
    region_table = metadata.region_ids()
    if region_table is not None and set(region_table.tolist()) != {s for s, level in levels.items() if level}:
        problems.append("the table of region ids does not match the region-level segment records")
    images = list(metadata.iter_images())
    if meta.num_images != len(images):
        problems.append(f"meta counts {meta.num_images} images, LMDB holds {len(images)}")
    listed = [(sid, image.image_id) for image in images for sid in image.segment_ids]
    if sorted(listed) != sorted(owner.items()):
        problems.append("image records and segment records disagree on which segments each image has")
    sha_table = dict(metadata.iter_sha256())
    if sha_table != {image.sha256: image.image_id for image in images}:
        problems.append("the sha256 table does not match the image records")
    return problems[:50]
