"""The read side every index store offers, written down once.

Two implementations serve the same reads: `IndexStore` (one LMDB + FAISS directory) and
`ShardedStore` (the shards of a distributed index, searched as one). The service and the CLI
take a `ReadableStore` and do not care which; `tests/indexer/test_store_congruence.py` runs
one suite of reads against both on the same records, so the two cannot drift apart.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from segsearch.indexer.records import ImageRecord, IndexMeta, SegmentRecord


@dataclass(frozen=True)
class StoreStats:
    """What an index holds (GetInfo, `segsearch index stats`).

    index_spec: the type asked for at creation ("auto", "hnsw", ...); faiss_index: what FAISS
    built (for a sharded store, the shards' kinds). lmdb: `map_size` / `used_bytes` of a single
    store. shards: each shard's own stats (empty for a single store).
    """

    path: str
    model_version: str
    embedding_dim: int
    num_images: int
    num_segments: int
    index_spec: str
    faiss_index: str
    faiss_vectors: int
    faiss_tombstones: int
    generation: int
    format_version: int
    faiss_file_bytes: int = 0
    ef_search: int = 0  # the default HNSW efSearch of searches (0: no HNSW index)
    nprobe: int = 0  # the default IVF nprobe of searches (0: no IVF index)
    lmdb: dict[str, int] = field(default_factory=dict)
    shards: tuple[StoreStats, ...] = ()

    def to_json(self) -> dict:
        document = asdict(self)
        document["shards"] = [shard.to_json() for shard in self.shards]
        if not self.shards:
            del document["shards"]
        else:
            document["num_shards"] = len(self.shards)
        return document

    @classmethod
    def combine(cls, path: str, meta: IndexMeta, shards: Iterable[StoreStats]) -> StoreStats:
        """The stats of several shards served as one index with meta `meta`."""
        shards = tuple(shards)
        kinds = sorted({shard.faiss_index for shard in shards})
        return cls(path=path, model_version=meta.model_version, embedding_dim=meta.embedding_dim,
                   num_images=meta.num_images, num_segments=meta.num_segments, index_spec=meta.index_type,
                   faiss_index=f"{len(shards)} shards: {', '.join(kinds)}",
                   faiss_vectors=sum(s.faiss_vectors for s in shards),
                   faiss_tombstones=sum(s.faiss_tombstones for s in shards),
                   generation=meta.generation, format_version=meta.format_version,
                   faiss_file_bytes=sum(s.faiss_file_bytes for s in shards),
                   ef_search=max((s.ef_search for s in shards), default=0),
                   nprobe=max((s.nprobe for s in shards), default=0), shards=shards)


@runtime_checkable
class ReadableStore(Protocol):
    """Reads of a segment index. Unknown ids raise `IndexStoreError` naming the id."""

    read_only: bool

    @property
    def meta(self) -> IndexMeta: ...

    def search(self, vectors: np.ndarray, k: int, effort: int | None = None,
               levels: frozenset[int] = frozenset()) -> list:
        """`(Q, D)` or `(D,)` unit-norm queries -> per query at most k `SearchHit`s, best first
        (equal scores by segment id). `effort`: HNSW efSearch / IVF nprobe of this call only
        (None: the index's own); `levels`: only segments of these levels (empty: all)."""

    def get_segment(self, segment_id: int) -> SegmentRecord: ...

    def get_image(self, image_id: str) -> ImageRecord: ...

    def has_image(self, image_id: str) -> bool: ...

    def iter_images(self) -> Iterator[ImageRecord]: ...

    def image_id_for_sha256(self, sha256: str) -> str | None: ...

    def refresh(self) -> bool:
        """Catch up with another writer's commits; True if anything changed."""

    def stats(self) -> StoreStats: ...

    def verify(self) -> list[str]:
        """Problems found; empty when FAISS and LMDB agree."""

    def close(self) -> None: ...
