"""Merge the shards of a sharded layout (shards.py) into one ordinary index directory.

What the merged index holds: every shard's LMDB records, copied byte for byte (segment ids
kept: the shards' id ranges are disjoint), and a FAISS index built once from all stored
prototypes, of the index type the shards were built with. Building FAISS from the union (rather
than stitching the shards' FAISS files together) means an IVF index is trained on the union
and an HNSW graph links all segments, i.e. the merged index is the index a single process
would have built from the same prototypes; only the ids differ from a single-process run
(each shard numbers its segments from its own range). The segmentation settings
(`indexing.json`) and the shards' skip reports (`skipped.jsonl`) are carried over.

**Crash safety.** The merge is built in `OUT/.merge-staging` (a complete index directory,
checked with `verify`), then moved into OUT by renames: settings, skip report, FAISS file,
and then the LMDB directory, which is what makes OUT an index; `OUT/merge.json` (the shard
generations merged) is written last and marks the merge complete. A crash at any point
leaves either no merged index, the previous one, or the new one (FAISS and LMDB generations
are compared on open, as after any crash), and the next merge starts over from the shards,
which are the source of truth. A merged index changed after the merge (`segsearch index
add/delete` on OUT) is not overwritten unless `force` is given.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from segsearch.errors import IndexStoreError
from segsearch.durable import atomic_write, fsync_dir
from segsearch.indexer.index_store import LMDB_DIR, VECTORS_FILE, IndexStore
from segsearch.indexer.index_store import _acquire_writer_lock as acquire_writer_lock
from segsearch.indexer.metadata_store import MetadataStore
from segsearch.indexer.pipeline import SETTINGS_FILE, SKIPPED_FILE, SkipReport
from segsearch.indexer.records import decode_meta, encode_meta
from segsearch.indexer.sharded_store import ShardedStore
from segsearch.indexer.shards import ShardLayout, is_index_dir
from segsearch.indexer.vector_index import VectorIndex

log = logging.getLogger(__name__)

MERGE_RECORD = "merge.json"
STAGING = ".merge-staging"
_COPY_BATCH = 20_000  # records per LMDB write transaction while copying
_META_KEY = b"meta"


@dataclass
class MergeSummary:
    out_dir: str
    num_shards: int
    images: int = 0
    segments: int = 0
    seconds: float = 0.0
    up_to_date: bool = False

    def format(self) -> str:
        if self.up_to_date:
            return f"merged index {self.out_dir} is up to date with its {self.num_shards} shards"
        return (f"merged {self.num_shards} shards into {self.out_dir}: {self.images} images, "
                f"{self.segments} segments in {self.seconds:.1f} s")


def merge_shards(layout_root: str | Path, out: str | Path, *, force: bool = False) -> MergeSummary:
    """Merge the layout at `layout_root` into the index directory `out` (module docstring)."""
    started = time.perf_counter()
    layout, out = ShardLayout.load(layout_root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock_fd = acquire_writer_lock(out)  # no writer may use the merged index while it is replaced
    try:
        return _merge(layout, out, force, started)
    finally:
        os.close(lock_fd)


def _merge(layout: ShardLayout, out: Path, force: bool, started: float) -> MergeSummary:
    generations = _shard_generations(layout)  # read first: a shard changed later is merged next time
    if _up_to_date(out, generations, force):
        with IndexStore.open(out, read_only=True, repair=False) as merged:
            meta = merged.meta
        return MergeSummary(str(out), layout.num_shards, meta.num_images, meta.num_segments, up_to_date=True)
    with ShardedStore.open(layout.root) as sharded:
        problems = sharded.verify()
        if problems:
            raise IndexStoreError(f"the shards of {layout.root} are inconsistent, not merging: " + "; ".join(problems[:5]))
        meta = sharded.meta
    summary = MergeSummary(str(out), layout.num_shards, meta.num_images, meta.num_segments)
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    _build(layout, staging, meta.model_version, meta.embedding_dim, meta.index_type)
    _install(staging, out, {"shards": str(layout.root), "shard_generations": generations})
    summary.seconds = time.perf_counter() - started
    log.info("%s", summary.format())
    return summary


def _shard_generations(layout: ShardLayout) -> list[int]:
    """Each shard's LMDB generation (cheap: no FAISS load); IndexStoreError for a missing shard."""
    generations = []
    for shard_dir in layout.shard_dirs:
        if not is_index_dir(shard_dir):
            raise IndexStoreError(f"the sharded layout {layout.root} is incomplete: no index at {shard_dir}; "
                              "finish it by re-running the distributed indexing command")
        metadata = MetadataStore.open(shard_dir / LMDB_DIR, read_only=True)
        try:
            generations.append(metadata.meta().generation)
        finally:
            metadata.close()
    return generations


def merge_record(out: str | Path) -> dict | None:
    """`OUT/merge.json`: the shard generations the merged index reflects (None: not merged)."""
    path = Path(out) / MERGE_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise IndexStoreError(f"cannot read {path} ({exc}); delete it to merge again") from exc


def _up_to_date(out: Path, generations: list[int], force: bool) -> bool:
    """True when OUT already holds the merge of these shard generations; refuses to replace
    a merged index that was changed after its merge (unless `force`)."""
    record = merge_record(out)
    if record is None or not is_index_dir(out):
        return False
    with IndexStore.open(out, read_only=True, repair=False) as merged:
        changed = merged.meta.generation != record.get("merged_generation")
    if changed and not force:
        raise IndexStoreError(f"the merged index at {out} was changed after it was merged (e.g. by `segsearch "
                          "index add`); merging again would drop those changes. Pass --force to replace "
                          "it with the merge of the shards anyway")
    return not changed and record.get("shard_generations") == generations


def _build(layout: ShardLayout, staging: Path, model_version: str, dim: int, index_type: str) -> None:
    """A complete, verified index in `staging`: records, FAISS, settings, skip report."""
    IndexStore.create(staging, model_version, dim, index_type).close()
    target = _RecordCopier.open(staging / LMDB_DIR)
    try:
        for shard_dir in layout.shard_dirs:
            source = _RecordCopier.open(shard_dir / LMDB_DIR, read_only=True)
            try:
                target.copy_from(source)
            finally:
                source.close()
        vectors = _vectors(target, index_type)
    finally:
        target.close()
    vectors.save(staging / VECTORS_FILE)
    shutil.copyfile(layout.shard_dirs[0] / SETTINGS_FILE, staging / SETTINGS_FILE)
    entries = [entry for d in layout.shard_dirs for entry in SkipReport(d / SKIPPED_FILE).entries()]
    atomic_write(staging / SKIPPED_FILE, ["".join(json.dumps(e) + "\n" for e in entries).encode("utf-8")])
    with IndexStore.open(staging, model_version, read_only=True, repair=False) as merged:
        problems = merged.verify()
    if problems:
        raise IndexStoreError(f"the merged index in {staging} failed verification: {'; '.join(problems[:5])}")


def _vectors(store: MetadataStore, index_type: str) -> VectorIndex:
    """FAISS over every stored prototype, added at once (so IVF trains on the union)."""
    meta = store.meta()
    vectors = VectorIndex(meta.embedding_dim, index_type)
    vectors.model_version = meta.model_version
    batches = list(store.prototypes(batch_size=65536))
    if batches:
        vectors.add(np.concatenate([ids for ids, _ in batches]), np.concatenate([p for _, p in batches]))
    vectors.generation = meta.generation
    return vectors


def _install(staging: Path, out: Path, record: dict) -> None:
    """Move the staged index into OUT; the LMDB rename is the commit point (module doc)."""
    (out / MERGE_RECORD).unlink(missing_ok=True)
    trash = out / f".{LMDB_DIR}.replaced"
    shutil.rmtree(trash, ignore_errors=True)
    for name in (SETTINGS_FILE, SKIPPED_FILE, VECTORS_FILE):
        os.replace(staging / name, out / name)
    if (out / LMDB_DIR).exists():
        os.rename(out / LMDB_DIR, trash)
    os.rename(staging / LMDB_DIR, out / LMDB_DIR)
    fsync_dir(out)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    with IndexStore.open(out, read_only=True, repair=False) as merged:
        record["merged_generation"] = merged.meta.generation
    atomic_write(out / MERGE_RECORD, [(json.dumps(record, indent=2) + "\n").encode("utf-8")])


class _RecordCopier(MetadataStore):
    """A metadata store that can take another store's records verbatim, ids included.

    `put_images` allocates new ids, which would break the id equality between shards and
    the merged index; this copies the encoded bytes of the `segments`, `images`, `sha256`
    and `regions` sub-databases, refusing any key already present (shards must be disjoint).
    """

    def copy_from(self, source: MetadataStore) -> None:
        theirs = source.meta()
        for name in ("segments", "images", "sha256", "regions"):
            if name in source._dbs:  # a shard written before levels has no regions
                self._copy_db(source, name)

        def update_meta(txn: lmdb.Transaction) -> None:
            meta = decode_meta(txn.get(_META_KEY, db=self._dbs["meta"]))
            meta.num_images += theirs.num_images
            meta.num_segments += theirs.num_segments
            meta.next_segment_id = max(meta.next_segment_id, theirs.next_segment_id)
            meta.has_regions = meta.has_regions or theirs.has_regions
            meta.region_table = meta.region_table and theirs.region_table
            meta.generation += 1
            txn.put(_META_KEY, encode_meta(meta), db=self._dbs["meta"])

        self._write(update_meta)

    def _copy_db(self, source: MetadataStore, name: str) -> None:
        with source._env.begin(db=source._dbs[name]) as read_txn:
            cursor = read_txn.cursor()
            more = cursor.first()
            while more:
                batch = []
                while more and len(batch) < _COPY_BATCH:
                    batch.append((cursor.key(), cursor.value()))
                    more = cursor.next()
                self._write(lambda txn, batch=batch: self._put_new(txn, name, batch, source))

    def _put_new(self, txn: lmdb.Transaction, name: str, batch: list, source: MetadataStore) -> None:
        for key, value in batch:
            if not txn.put(key, value, db=self._dbs[name], overwrite=False):
                raise IndexStoreError(f"{name} key {key[:40]!r} of {source.path} is already in another shard; "
                                  "shards must hold disjoint images (re-run the distributed job, which "
                                  "removes cross-shard duplicates)")
