"""Read access to a sharded layout (shards.py) as if it were one index.

`ShardedStore` offers the read side of `IndexStore` that the service uses (search, records,
counts, stats, refresh, verify) over the shards' own `IndexStore`s, opened read-only:

- **search**: every shard answers the top k of each query; the answers are merged by score,
  best first, equal scores ordered by segment id, and cut to k. The global top k is the top
  k of the union of the shards' top k, so for exact indexes ("flat", or "auto" below its
  switch) the hits, scores and ids equal those of the merged index (same ids: see the id
  ranges in shards.py; same scores: FAISS scores a query against each vector on its own).
  For approximate types (HNSW, IVF) each shard's graph/lists differ from the merged
  index's, so the two agree up to the approximation (recall), not bit for bit.
- **records**: a segment id names its shard (`ShardLayout.shard_of`); image ids and sha256
  digests are looked up shard by shard (they are unique across shards: the distributed
  job drops cross-shard duplicates, and `verify` checks it).
- **writes** are refused: a sharded layout is served read-only (to change it, re-run the
  distributed job and serve the result; adding through one server would bypass the id
  ranges' owner, the job).

Shards are opened read-only, so the indexer may extend a shard while it is served;
`refresh()` follows its commits, as for a read-only `IndexStore`.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from segsearch.errors import IndexStoreError
from segsearch.indexer.index_store import IndexStore, SearchHit
from segsearch.indexer.config import IndexSettings
from segsearch.indexer.records import ImageRecord, IndexMeta, SegmentRecord
from segsearch.indexer.shards import ShardLayout, find_layout, is_index_dir
from segsearch.indexer.store_api import StoreStats

log = logging.getLogger(__name__)


class ShardedStore:
    """Several read-only shard `IndexStore`s searched and read as one (module docstring)."""

    read_only = True

    def __init__(self, layout: ShardLayout, shards: Sequence[IndexStore]) -> None:
        self.layout = layout
        self.root = layout.root
        self.shards = list(shards)

    @classmethod
    def open(cls, root: str | Path, model_version: str | None = None, *, repair: bool = True,
             ef_search: int | None = None, nprobe: int | None = None) -> ShardedStore:
        """Open every shard of the layout at `root` read-only; they must agree on the model,
        the dimension, the index type and the segmentation settings."""
        layout = ShardLayout.load(root)
        missing = [str(d) for d in layout.shard_dirs if not is_index_dir(d)]
        if missing:
            raise IndexStoreError(f"the sharded layout {root} is incomplete: no index at {', '.join(missing)}; "
                              "finish it by re-running the distributed indexing command")
        shards: list[IndexStore] = []
        try:
            for shard_dir in layout.shard_dirs:
                shards.append(IndexStore.open(shard_dir, model_version, read_only=True, repair=repair,
                                              ef_search=ef_search, nprobe=nprobe))
            _check_agreement(layout, shards)
        except BaseException:
            for store in shards:
                store.close()
            raise
        return cls(layout, shards)

    def close(self) -> None:
        for store in self.shards:
            store.close()

    def __enter__(self) -> ShardedStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- reads -----------------------------------------------------------------------

    @property
    def meta(self) -> IndexMeta:
        """One meta record for the whole layout: counts summed, generation summed (it grows
        with every commit to any shard), next id = the largest shard counter."""
        metas = [store.meta for store in self.shards]
        first = metas[0]
        return IndexMeta(model_version=first.model_version, embedding_dim=first.embedding_dim,
                         num_images=sum(m.num_images for m in metas),
                         num_segments=sum(m.num_segments for m in metas), index_type=first.index_type,
                         generation=sum(m.generation for m in metas), format_version=first.format_version,
                         next_segment_id=max(m.next_segment_id for m in metas),
                         has_regions=any(m.has_regions for m in metas),
                         region_table=all(m.region_table for m in metas))

    def search(self, vectors: np.ndarray, k: int, effort: int | None = None,
               levels: frozenset[int] = frozenset()) -> list[list[SearchHit]]:
        """Nearest segments of each query `(Q, D)` (or one `(D,)`) over all shards, best first
        (equal scores by segment id), at most k each; `effort` and `levels` as in
        `IndexStore.search`."""
        queries = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        per_shard = [store.search(queries, k, effort, levels) for store in self.shards]
        return [merge_hits([rows[q] for rows in per_shard], k) for q in range(len(queries))]

    def get_segment(self, segment_id: int) -> SegmentRecord:
        shard = self.layout.shard_of(segment_id)
        if shard < 0:
            raise IndexStoreError(f"segment id {segment_id} is not in the sharded index at {self.root}")
        return self.shards[shard].get_segment(segment_id)

    def get_image(self, image_id: str) -> ImageRecord:
        for store in self.shards:
            if store.has_image(image_id):
                return store.get_image(image_id)
        raise IndexStoreError(f"image id {image_id!r} is not in the sharded index at {self.root}")

    def has_image(self, image_id: str) -> bool:
        return any(store.has_image(image_id) for store in self.shards)

    def iter_images(self) -> Iterator[ImageRecord]:
        """Every image record, shard by shard (ids are unique across shards)."""
        for store in self.shards:
            yield from store.iter_images()

    def image_id_for_sha256(self, sha256: str) -> str | None:
        for store in self.shards:
            owner = store.image_id_for_sha256(sha256)
            if owner is not None:
                return owner
        return None

    def refresh(self) -> bool:
        """Catch up with commits made to any shard by its writer; True if anything changed."""
        changed = [store.refresh() for store in self.shards]
        return any(changed)

    def stats(self) -> StoreStats:
        return StoreStats.combine(str(self.root), self.meta, (store.stats() for store in self.shards))

    def verify(self) -> list[str]:
        """Each shard's own problems (prefixed with its name), ids outside a shard's range,
        and image ids or contents held by more than one shard."""
        problems: list[str] = []
        owners: dict[str, str] = {}
        for number, (store, shard_dir) in enumerate(zip(self.shards, self.layout.shard_dirs)):
            name = shard_dir.name
            problems += [f"{name}: {problem}" for problem in store.verify()]
            problems += _range_problems(self.layout, number, store, name)
            for image in store._metadata.iter_images():
                for key in (f"image id {image.image_id!r}", f"content sha256 {image.sha256[:16]}…"):
                    if key in owners:
                        problems.append(f"{key} is in both {owners[key]} and {name}")
                    owners[key] = name
        return problems[:50]

    # ---- writes (refused) ------------------------------------------------------------

    def add_images(self, batch) -> None:
        raise IndexStoreError(read_only_message(self.root))

    def delete_images(self, image_ids) -> None:
        raise IndexStoreError(read_only_message(self.root))

    def delete_segments(self, segment_ids) -> None:
        raise IndexStoreError(read_only_message(self.root))


def merge_hits(rows: Sequence[Sequence[SearchHit]], k: int) -> list[SearchHit]:
    """The best k of several shards' hit lists for one query: by score, then segment id."""
    hits = [hit for row in rows for hit in row]
    hits.sort(key=lambda hit: (-hit.score, hit.segment_id))
    return hits[:k]


def read_only_message(root: Path) -> str:
    return (f"{root} is a sharded index, which is served read-only; to add or delete images, "
            "re-run the distributed indexing job (`segsearch index CORPUS --out DIR --dask ...`) or "
            "change the merged index and serve that")


def open_index(path: str | Path, model_version: str | None = None, *, read_only: bool = False,
               **options) -> IndexStore | ShardedStore:
    """The store to serve for `path`: a `ShardedStore` for a sharded layout (see
    `shards.find_layout`; always read-only), else the `IndexStore` there."""
    layout = find_layout(path)
    if layout is not None:
        options.pop("save_every", None)  # a sharded layout is served read-only: nothing to save
        return ShardedStore.open(layout, model_version, **options)
    return IndexStore.open(path, model_version, read_only=read_only, **options)


def shard_dirs_or_self(path: str | Path) -> list[Path]:
    """The index directories behind `path`: a sharded layout's shards, else `[path]`."""
    layout = find_layout(path)
    return [Path(path)] if layout is None else list(ShardLayout.load(layout).shard_dirs)


def settings_dir(path: str | Path) -> Path:
    """Where the segmentation settings (`indexing.json`) of the index at `path` live: the
    first shard of a sharded layout, else `path` itself."""
    return shard_dirs_or_self(path)[0]


def _check_agreement(layout: ShardLayout, shards: Sequence[IndexStore]) -> None:
    """Shards of one layout must be interchangeable except for their segments."""
    metas = [store.meta for store in shards]
    settings = [_settings_text(d) for d in layout.shard_dirs]
    for name, values in (("model version", [m.model_version for m in metas]),
                         ("embedding dimension", [m.embedding_dim for m in metas]),
                         ("index type", [m.index_type for m in metas]),
                         ("segmentation settings (indexing.json)", settings)):
        if len(set(values)) > 1:
            listing = ", ".join(f"{d.name}: {v}" for d, v in zip(layout.shard_dirs, values))
            raise IndexStoreError(f"the shards of {layout.root} disagree on the {name} ({listing}); "
                              "a sharded index must be built by one job with one checkpoint")


def _settings_text(shard_dir: Path) -> str:
    settings = IndexSettings.load(shard_dir)
    return "none" if settings is None else json.dumps(settings.to_json(), sort_keys=True)


def _range_problems(layout: ShardLayout, number: int, store: IndexStore, name: str) -> list[str]:
    lmdb_ids, _ = store.segment_ids()
    low, limit = layout.first_ids[number], layout.id_limit(number)
    problems = []
    if lmdb_ids.size and (lmdb_ids.min() < low or lmdb_ids.max() >= limit):
        problems.append(f"{name}: segment ids {lmdb_ids.min()}..{lmdb_ids.max()} leave its range "
                        f"[{low}, {limit})")
    if store.meta.next_segment_id > limit:
        problems.append(f"{name}: id counter {store.meta.next_segment_id} is past its range end {limit}")
    return problems
