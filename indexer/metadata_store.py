"""The LMDB metadata store: the write-ahead source of truth of an index.

One LMDB environment with named sub-databases:

| sub-db     | key                         | value                          |
| ---------- | --------------------------- | ------------------------------ |
| `segments` | segment id, 8-byte big-end. | `SegmentRecord` (with prototype) |
| `images`   | image id, UTF-8             | `ImageRecord`                  |
| `sha256`   | hex digest, ASCII           | image id, UTF-8                |
| `meta`     | `b"meta"`                   | `IndexMeta`                    |

Big-endian segment keys make LMDB's byte order the numeric order, so cursor scans list ids
sorted. Every batch of images is written in ONE write transaction, which also allocates the
new segment ids from the never-reused counter in `IndexMeta.next_segment_id` and bumps
`IndexMeta.generation`; a crash therefore leaves either the whole batch or none of it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from segsearch.errors import IndexStoreError, IndexFullError, StorageFailedError
from segsearch.indexer.records import (
    FORMAT_VERSION,
    ImageRecord,
    IndexMeta,
    LEVEL_REGION,
    SegmentRecord,
    decode_image,
    decode_meta,
    decode_segment,
    decode_segment_prototype,
    encode_image,
    encode_meta,
    encode_segment,
)
from segsearch.durable import space_report

log = logging.getLogger(__name__)

# Virtual address space reserved for the map. LMDB files are sparse, so this costs no disk;
# about 1 KiB per segment at D=64, i.e. room for ~30M segments.
DEFAULT_MAP_SIZE = 32 << 30
_META_KEY = b"meta"
NEARLY_FULL_BYTES = 1 << 20  # an LMDB write error with less free space than this is a full disk
_DB_NAMES = (b"segments", b"images", b"sha256", b"meta")
# ids of the region-level segments, so that a search restricted to a level needs no record:
# added after the others, so an index written before levels lacks it (read-only: no regions)
_REGIONS_DB = b"regions"


def segment_key(segment_id: int) -> bytes:
    return int(segment_id).to_bytes(8, "big")


def _segment_id(key: bytes) -> int:
    return int.from_bytes(key, "big")


@dataclass
class PutResult:
    """Outcome of `put_images`: what was stored (ids assigned) and what was skipped, why."""

    added: list[tuple[ImageRecord, list[SegmentRecord]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image_id, reason)
    generation: int = 0

    @property
    def segment_ids(self) -> list[int]:
        return [seg.segment_id for _, segs in self.added for seg in segs]


class MetadataStore:
    """LMDB environment holding the records of one index (see the module docstring)."""

    def __init__(self, env: lmdb.Environment, path: Path, read_only: bool) -> None:
        self._env = env
        self.path = path
        self.read_only = read_only
        self._dbs = {name.decode(): env.open_db(name, create=False) for name in _DB_NAMES}
        regions = _open_regions_db(env, read_only)
        if regions is not None:
            self._dbs["regions"] = regions

    def region_ids(self) -> np.ndarray | None:
        """`(R,)` int64, sorted: the ids of the region-level segments (None: the table is
        missing or not known complete, in an index written before it and opened read-only)."""
        if "regions" not in self._dbs or not self.meta().region_table:
            return None
        with self._env.begin(db=self._dbs["regions"]) as txn:
            keys = list(txn.cursor().iternext(keys=True, values=False))
        return np.fromiter((_segment_id(k) for k in keys), dtype=np.int64, count=len(keys))

    # ---- lifecycle -------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, meta: IndexMeta, map_size: int = DEFAULT_MAP_SIZE) -> MetadataStore:
        """Create a new, empty store at `path` (a directory) holding `meta`."""
        path = Path(path)
        if (path / "data.mdb").exists():
            raise IndexStoreError(f"a metadata store already exists at {path}")
        path.mkdir(parents=True, exist_ok=True)
        env = _open_env(path, map_size, read_only=False)
        for name in _DB_NAMES:
            env.open_db(name, create=True)
        store = cls(env, path, read_only=False)
        store._write(lambda txn: txn.put(_META_KEY, encode_meta(meta), db=store._dbs["meta"]))
        return store

    @classmethod
    def open(cls, path: Path, map_size: int | None = None, read_only: bool = False) -> MetadataStore:
        """Open an existing store. `map_size` None keeps room to grow (see `_default_map_size`)."""
        path = Path(path)
        if not (path / "data.mdb").exists():
            raise IndexStoreError(f"no metadata store at {path} (missing data.mdb)")
        size = map_size if map_size is not None else _default_map_size(path)
        env = _open_env(path, size, read_only=read_only)
        try:
            store = cls(env, path, read_only=read_only)
            meta = store._check_structure()
        except (lmdb.Error, IndexStoreError) as exc:
            env.close()
            raise IndexStoreError(f"cannot read the metadata store at {path}: {exc}") from exc
        if meta.format_version > FORMAT_VERSION:
            env.close()
            raise IndexStoreError(
                f"index at {path} has format version {meta.format_version}; this segsearch "
                f"reads up to {FORMAT_VERSION}. Upgrade segsearch."
            )
        if not read_only:
            store._fill_region_table(meta)
        return store

    def _fill_region_table(self, meta: IndexMeta) -> None:
        """A writer opening an index whose region table is not known complete (written before
        the table existed) fills it from the records and marks it complete, in one
        transaction; once, since the mark stays."""
        if meta.region_table:
            return
        region_ids = [seg.segment_id for seg in self.iter_segments() if seg.level == LEVEL_REGION]
        log.info("filling the region table of %s: %d region-level segments", self.path, len(region_ids))

        def write(txn: lmdb.Transaction) -> None:
            for segment_id in region_ids:
                txn.put(segment_key(segment_id), b"", db=self._dbs["regions"])
            current = decode_meta(txn.get(_META_KEY, db=self._dbs["meta"]))
            current.region_table = True
            txn.put(_META_KEY, encode_meta(current), db=self._dbs["meta"])

        self._write(write)

    def close(self) -> None:
        self._env.close()

    def _check_structure(self) -> IndexMeta:
        """The meta record, after a cheap check that the file is not damaged (O(tree depth)).

        LMDB has no page checksums: this touches the first and last leaf of every sub-db and,
        for a writer, compares entry counts with the meta record, so that a damaged file is
        refused on open with its name rather than written on (readers skip the count check, so
        that `index verify` can open such a file and report the details)."""
        meta = self.meta()
        with self._env.begin() as txn:
            entries = {}
            for name, db in self._dbs.items():
                cursor = txn.cursor(db=db)
                cursor.first(), cursor.last()
                entries[name] = txn.stat(db)["entries"]
        expected = {"segments": meta.num_segments, "images": meta.num_images}
        wrong = {name: (entries[name], count) for name, count in expected.items() if entries[name] != count}
        if wrong and not self.read_only:
            raise IndexStoreError(f"{self.path / 'data.mdb'} is damaged: entry counts (found, expected) {wrong}")
        return meta

    # ---- reads -----------------------------------------------------------------------

    def meta(self) -> IndexMeta:
        with self._env.begin(db=self._dbs["meta"]) as txn:
            raw = txn.get(_META_KEY)
        if raw is None:
            raise IndexStoreError(f"metadata store at {self.path} has no meta record")
        return decode_meta(raw)

    def get_segment(self, segment_id: int) -> SegmentRecord | None:
        with self._env.begin(db=self._dbs["segments"]) as txn:
            raw = txn.get(segment_key(segment_id))
        return None if raw is None else decode_segment(raw)

    def get_segments(self, segment_ids: Sequence[int]) -> list[SegmentRecord | None]:
        """Records for many ids in one read transaction (None where an id is absent)."""
        with self._env.begin(db=self._dbs["segments"]) as txn:
            raws = [txn.get(segment_key(i)) if i >= 0 else None for i in segment_ids]
        return [None if raw is None else decode_segment(raw) for raw in raws]

    def get_image(self, image_id: str) -> ImageRecord | None:
        with self._env.begin(db=self._dbs["images"]) as txn:
            raw = txn.get(_image_key(image_id))
        return None if raw is None else decode_image(raw)

    def image_id_for_sha256(self, sha256: str) -> str | None:
        with self._env.begin(db=self._dbs["sha256"]) as txn:
            raw = txn.get(sha256.encode("ascii"))
        return None if raw is None else raw.decode("utf-8")

    def segment_ids(self) -> np.ndarray:
        """All segment ids, sorted, `(N,)` int64 (a key-only scan, no decoding)."""
        return self.segment_ids_with_generation()[1]

    def segment_ids_with_generation(self) -> tuple[int, np.ndarray]:
        """`(generation, sorted segment ids)` read in one transaction, i.e. one snapshot."""
        with self._env.begin() as txn:
            meta = decode_meta(txn.get(_META_KEY, db=self._dbs["meta"]))
            keys = list(txn.cursor(db=self._dbs["segments"]).iternext(keys=True, values=False))
        ids = np.fromiter((_segment_id(k) for k in keys), dtype=np.int64, count=len(keys))
        return meta.generation, ids

    def iter_segments(self) -> Iterator[SegmentRecord]:
        with self._env.begin(db=self._dbs["segments"]) as txn:
            for _, raw in txn.cursor():
                yield decode_segment(raw)

    def iter_images(self) -> Iterator[ImageRecord]:
        with self._env.begin(db=self._dbs["images"]) as txn:
            for _, raw in txn.cursor():
                yield decode_image(raw)

    def iter_sha256(self) -> Iterator[tuple[str, str]]:
        """(sha256, image id) pairs of the dedup table."""
        with self._env.begin(db=self._dbs["sha256"]) as txn:
            for key, raw in txn.cursor():
                yield key.decode("ascii"), raw.decode("utf-8")

    def prototypes(
        self, segment_ids: np.ndarray | None = None, batch_size: int = 8192, skip_missing: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield `(ids (B,) int64, prototypes (B, D) float32)` for `segment_ids` (all if None).

        This is what rebuilds or repairs the FAISS index from LMDB. An absent id raises unless
        `skip_missing` (a reader racing a writer's delete).
        """
        with self._env.begin(db=self._dbs["segments"]) as txn:
            if segment_ids is None:
                pairs = ((_segment_id(k), raw) for k, raw in txn.cursor())
            else:
                pairs = ((int(i), txn.get(segment_key(i))) for i in segment_ids)
            ids: list[int] = []
            vecs: list[np.ndarray] = []
            for sid, raw in pairs:
                if raw is None and skip_missing:
                    continue
                if raw is None:
                    raise IndexStoreError(f"segment {sid} vanished from the metadata store")
                ids.append(sid)
                vecs.append(decode_segment_prototype(raw))
                if len(ids) == batch_size:
                    yield np.asarray(ids, dtype=np.int64), np.stack(vecs).astype(np.float32)
                    ids, vecs = [], []
            if ids:
                yield np.asarray(ids, dtype=np.int64), np.stack(vecs).astype(np.float32)

    def usage(self) -> dict[str, int]:
        """Bytes reserved (`map_size`) and used by the LMDB data file."""
        info, stat = self._env.info(), self._env.stat()
        return {"map_size": int(info["map_size"]), "used_bytes": (info["last_pgno"] + 1) * stat["psize"]}

    # ---- writes ----------------------------------------------------------------------

    def put_images(self, items: Sequence[tuple[ImageRecord, Sequence[SegmentRecord]]]) -> PutResult:
        """Store a chunk of images with their segments in ONE transaction.

        New segment ids are allocated from the counter; `segment_id` of the inputs and
        `ImageRecord.segment_ids` are ignored and filled in the returned copies. An image is
        skipped (with a reason) when its sha256 is already indexed or when its image id is
        taken; nothing is written when nothing is new.
        """
        self._check_writable()
        result = PutResult()

        def write(txn: lmdb.Transaction) -> None:
            meta = decode_meta(txn.get(_META_KEY, db=self._dbs["meta"]))
            _check_segments(items, meta)
            next_id = meta.next_segment_id
            for image, segments in items:
                reason = self._skip_reason(txn, image)
                if reason:
                    result.skipped.append((image.image_id, reason))
                    continue
                stored = [_with_ids(s, next_id + n, _parent_id(s, next_id)) for n, s in enumerate(segments)]
                meta.has_regions = meta.has_regions or any(s.level == LEVEL_REGION for s in stored)
                next_id += len(stored)
                image = dataclasses.replace(image, segment_ids=[s.segment_id for s in stored])
                for seg in stored:
                    txn.put(segment_key(seg.segment_id), encode_segment(seg), db=self._dbs["segments"])
                    if seg.level == LEVEL_REGION:
                        txn.put(segment_key(seg.segment_id), b"", db=self._dbs["regions"])
                txn.put(_image_key(image.image_id), encode_image(image), db=self._dbs["images"])
                txn.put(image.sha256.encode("ascii"), image.image_id.encode("utf-8"), db=self._dbs["sha256"])
                result.added.append((image, stored))
            if not result.added:
                result.generation = meta.generation
                return
            meta.next_segment_id = next_id
            meta.num_images += len(result.added)
            meta.num_segments += len(result.segment_ids)
            meta.generation += 1
            result.generation = meta.generation
            txn.put(_META_KEY, encode_meta(meta), db=self._dbs["meta"])

        self._write(write)
        return result

    def delete_images(self, image_ids: Sequence[str]) -> tuple[list[int], int]:
        """Delete images and their segments in ONE transaction.

        Returns `(removed segment ids, new generation)`. Unknown ids raise IndexStoreError
        listing them, and then nothing is deleted.
        """
        self._check_writable()
        removed: list[int] = []
        generation = 0

        def write(txn: lmdb.Transaction) -> None:
            nonlocal generation
            images = {i: txn.get(_image_key(i), db=self._dbs["images"]) for i in dict.fromkeys(image_ids)}
            unknown = [i for i, raw in images.items() if raw is None]
            if unknown:
                raise IndexStoreError(f"unknown image id(s), nothing deleted: {', '.join(map(repr, unknown))}")
            for image_id, raw in images.items():
                image = decode_image(raw)
                for sid in image.segment_ids:
                    self._delete_segment(txn, sid)
                    removed.append(sid)
                txn.delete(_image_key(image_id), db=self._dbs["images"])
                sha = image.sha256.encode("ascii")
                if txn.get(sha, db=self._dbs["sha256"]) == image_id.encode("utf-8"):
                    txn.delete(sha, db=self._dbs["sha256"])
            generation = self._count_removal(txn, len(images), len(removed))

        self._write(write)
        return removed, generation

    def delete_segments(self, segment_ids: Sequence[int]) -> tuple[list[int], int]:
        """Delete single segments in ONE transaction, removing each from its image's
        `segment_ids` (the image record stays, with its other segments).

        Returns `(removed segment ids, new generation)`. Unknown ids raise IndexStoreError
        listing them, and then nothing is deleted.
        """
        self._check_writable()
        removed: list[int] = []
        generation = 0

        def write(txn: lmdb.Transaction) -> None:
            nonlocal generation
            wanted = list(dict.fromkeys(int(s) for s in segment_ids))
            raws = {sid: txn.get(segment_key(sid), db=self._dbs["segments"]) for sid in wanted}
            unknown = [sid for sid, raw in raws.items() if raw is None]
            if unknown:
                raise IndexStoreError(f"unknown segment id(s), nothing deleted: {', '.join(map(str, unknown))}")
            by_image: dict[str, set[int]] = {}
            for sid, raw in raws.items():
                by_image.setdefault(decode_segment(raw).image_id, set()).add(sid)
                self._delete_segment(txn, sid)
                removed.append(sid)
            for image_id, gone in by_image.items():
                raw = txn.get(_image_key(image_id), db=self._dbs["images"])
                if raw is not None:
                    image = decode_image(raw)
                    image = dataclasses.replace(image, segment_ids=[s for s in image.segment_ids if s not in gone])
                    txn.put(_image_key(image_id), encode_image(image), db=self._dbs["images"])
                    self._orphan_children(txn, image.segment_ids, gone)
            generation = self._count_removal(txn, 0, len(removed))

        self._write(write)
        return removed, generation

    # ---- helpers ---------------------------------------------------------------------

    def _delete_segment(self, txn: lmdb.Transaction, segment_id: int) -> None:
        """A segment's record and its entry in the region table (if it is a region)."""
        txn.delete(segment_key(segment_id), db=self._dbs["segments"])
        txn.delete(segment_key(segment_id), db=self._dbs["regions"])

    def _orphan_children(self, txn: lmdb.Transaction, segment_ids: Sequence[int], gone: set[int]) -> None:
        """Clear the parent of those of `segment_ids` whose parent is in `gone`: a deleted
        region's fine segments stay, as segments without a parent (no id names a deleted one)."""
        for sid in segment_ids:
            raw = txn.get(segment_key(sid), db=self._dbs["segments"])
            segment = decode_segment(raw) if raw is not None else None
            if segment is not None and segment.parent_id in gone:
                txn.put(segment_key(sid), encode_segment(dataclasses.replace(segment, parent_id=0)),
                        db=self._dbs["segments"])

    def _count_removal(self, txn: lmdb.Transaction, images: int, segments: int) -> int:
        """Lower the meta record's counts, bump its generation; returns the new generation."""
        meta = decode_meta(txn.get(_META_KEY, db=self._dbs["meta"]))
        meta.num_images -= images
        meta.num_segments -= segments
        meta.generation += 1
        txn.put(_META_KEY, encode_meta(meta), db=self._dbs["meta"])
        return meta.generation

    def _skip_reason(self, txn: lmdb.Transaction, image: ImageRecord) -> str:
        owner = txn.get(image.sha256.encode("ascii"), db=self._dbs["sha256"])
        if owner is not None:
            return f"same content (sha256) already indexed as image {owner.decode('utf-8')!r}"
        if txn.get(_image_key(image.image_id), db=self._dbs["images"]) is not None:
            return "image id already indexed with different content; delete it first to replace it"
        return ""

    def _write(self, body) -> None:
        """Run `body(txn)` in one write transaction, durable when this returns (sync=True).

        A full map or disk becomes IndexFullError (nothing written; the store stays usable);
        any other LMDB failure (e.g. EIO from its fdatasync) becomes StorageFailedError."""
        try:
            with self._env.begin(write=True) as txn:
                body(txn)
        except lmdb.MapFullError as exc:
            size, data = self._env.info()["map_size"], (self.path / "data.mdb").stat().st_size
            raise IndexFullError(
                f"the index metadata map (LMDB) at {self.path} is full (map size {size} bytes); nothing "
                "from this batch was written. To grow it, reopen the index: restart `segsearch serve` or "
                "re-run the `segsearch index` command (an index is reopened with a map of "
                f"max(32 GiB, twice its data file) = {_grown_map_size(data)} bytes here), or pass a "
                "larger map_size to IndexStore.open"
            ) from exc
        except lmdb.Error as exc:
            # ENOSPC is DiskError, but LMDB reports a *short* page write as EIO: on a full disk
            # that is a full disk too (the commit point, the meta page, was not reached).
            if isinstance(exc, lmdb.DiskError) or _nearly_full(self.path):
                raise IndexFullError(f"cannot write the metadata store {self.path}: "
                                     f"{space_report(self.path)}; nothing from this batch was written "
                                     f"({exc}). Free space there and retry") from exc
            raise StorageFailedError(
                f"writing the metadata store {self.path} failed ({exc}); this batch is not committed "
                "(or, if the failure came after LMDB's commit point, committed: reopening shows which)"
            ) from exc

    def _check_writable(self) -> None:
        if self.read_only:
            raise IndexStoreError(f"metadata store at {self.path} was opened read-only")


def _check_segments(items: Sequence[tuple[ImageRecord, Sequence[SegmentRecord]]], meta: IndexMeta) -> None:
    """Refuse segments from another model version or of the wrong dimension."""
    for image, segments in items:
        _image_key(image.image_id)
        for seg in segments:
            if seg.model_version != meta.model_version:
                raise IndexStoreError(
                    f"segment of image {image.image_id!r} was embedded by model version "
                    f"{seg.model_version!r} but this index holds version {meta.model_version!r}; "
                    "use the matching checkpoint or build a new index"
                )
            if seg.prototype.shape != (meta.embedding_dim,):
                raise IndexStoreError(
                    f"segment of image {image.image_id!r} has a prototype of shape "
                    f"{seg.prototype.shape}; this index holds {meta.embedding_dim}-d vectors"
                )
            if seg.image_id != image.image_id:
                raise ValueError(f"segment image_id {seg.image_id!r} != image {image.image_id!r}")
        _check_parents(image, segments)


def _with_ids(segment: SegmentRecord, segment_id: int, parent_id: int) -> SegmentRecord:
    """A copy of an already validated record with its ids set. `dataclasses.replace` would run
    `__post_init__` again (converting every mask run), most of a commit's CPU."""
    stored = copy.copy(segment)
    stored.segment_id, stored.parent_id = int(segment_id), int(parent_id)
    return stored


def _parent_id(segment: SegmentRecord, first_id: int) -> int:
    return first_id + segment.parent_index if segment.parent_index >= 0 else 0


def _check_parents(image: ImageRecord, segments: Sequence[SegmentRecord]) -> None:
    """A parent is another segment of the same list, of a coarser level."""
    for position, seg in enumerate(segments):
        if seg.parent_index < 0:
            continue
        if seg.parent_index >= len(segments) or seg.parent_index == position:
            raise ValueError(f"segment {position} of image {image.image_id!r} names parent_index "
                             f"{seg.parent_index}, not another of its {len(segments)} segments")
        if segments[seg.parent_index].level <= seg.level:
            raise ValueError(f"segment {position} of image {image.image_id!r}: its parent "
                             f"{seg.parent_index} is not of a coarser level")


def _open_regions_db(env: lmdb.Environment, read_only: bool):
    """The regions sub-db; created by a writer, None for a reader of an index without one."""
    try:
        return env.open_db(_REGIONS_DB, create=not read_only)
    except lmdb.NotFoundError:
        return None


def _image_key(image_id: str) -> bytes:
    key = image_id.encode("utf-8")
    if not key or len(key) > 500:
        raise IndexStoreError(f"image id must be 1..500 bytes of UTF-8, got {len(key)} bytes: {image_id[:60]!r}")
    return key


def _nearly_full(path: Path) -> bool:
    try:
        stats = os.statvfs(path)
    except OSError:
        return False
    return bool(stats.f_blocks) and stats.f_bavail * stats.f_frsize < NEARLY_FULL_BYTES


def _default_map_size(path: Path) -> int:
    """Reopening without a size: the default, or twice the data file when it is larger."""
    return _grown_map_size((path / "data.mdb").stat().st_size)


def _grown_map_size(data_bytes: int) -> int:
    return max(DEFAULT_MAP_SIZE, 2 * data_bytes)


def _open_env(path: Path, map_size: int, read_only: bool) -> lmdb.Environment:
    if (path / "data.mdb").exists():
        _check_truncated_before_open(path)
    try:
        env = lmdb.open(
            str(path), map_size=int(map_size), max_dbs=len(_DB_NAMES) + 1, subdir=True,
            readonly=read_only, create=not read_only, sync=True, metasync=True,
        )
    except lmdb.Error as exc:
        raise IndexStoreError(f"cannot open the metadata store at {path}: {exc}") from exc
    try:
        _check_not_truncated(path, env)
    except IndexStoreError:
        env.close()
        raise
    if not read_only:
        env.reader_check()  # clear reader slots left by killed processes
    return env


def _check_truncated_before_open(path: Path) -> None:
    """An empty or sub-page data file: LMDB would silently make it a NEW empty store."""
    size = (path / "data.mdb").stat().st_size
    if size < 2 * mmap.PAGESIZE:
        raise IndexStoreError(_truncated_message(path, size, 2 * mmap.PAGESIZE))


def _check_not_truncated(path: Path, env: lmdb.Environment) -> None:
    """The data file must reach the last page its meta page names, else reading a page past
    the end of the file kills the process with SIGBUS (the file is mapped)."""
    size = (path / "data.mdb").stat().st_size
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if size < needed:
        raise IndexStoreError(_truncated_message(path, size, needed))


def _truncated_message(path: Path, size: int, needed: int) -> str:
    return (f"the metadata store file {path / 'data.mdb'} is truncated ({size} bytes; its last "
            f"committed page needs {needed}): the index cannot be read. Restore the index directory "
            "from a backup, or rebuild it with `segsearch index`")
