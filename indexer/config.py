"""Settings of the indexing job, with no torch import: `segsearch index --help` reads its
defaults from here, and each default is written once.

- `IndexConfig`: one run (batching, commits, device, the segmentation settings);
- `IndexSettings`: what an index is built with and keeps for life, stored as `indexing.json`
  beside it; one reader and writer of that file (`load` / `save`, `to_json` / `from_json`);
- `DaskConfig`: where distributed indexing runs.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from segsearch.durable import atomic_write_json
from segsearch.errors import IndexStoreError, SegsearchError
from segsearch.indexer.decode import DecodeConfig
from segsearch.spml.config import SegmenterConfig

SETTINGS_FILE = "indexing.json"
SETTINGS_VERSION = 1
DEFAULT_LOCAL_WORKERS = 2




@dataclass
class IndexConfig:
    """Settings of one indexing run.

    batch_size: images per forward pass; chunk_size: images per store commit (one LMDB
    transaction; a crash loses at most one chunk of work). save_every: chunks between FAISS
    file writes (LMDB is always committed; a crash re-adds at most that many chunks' vectors
    from LMDB on the next open). decode_workers: decoding threads (0 = min(4, CPUs)).
    must_exist: refuse to create a new index (`--resume`, `index add`).
    first_segment_id: the id counter of a NEW index (a shard's id range, see shards.py).
    """

    batch_size: int = 8
    chunk_size: int = 64
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    index_type: str = "auto"
    decode_workers: int = 0
    device: str = "auto"
    progress: bool = True
    must_exist: bool = False
    save_every: int | None = None  # None: SnapshotPolicy's size and time rule
    map_size: int | None = None
    first_segment_id: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_size < 1 or (self.save_every is not None and self.save_every < 1):
            raise ValueError("batch_size, chunk_size and save_every must be >= 1")
        if self.decode_workers < 0:
            raise ValueError(f"decode_workers must be >= 0, got {self.decode_workers}")


@dataclass(frozen=True)
class SnapshotPolicy:
    """When a writer rewrites the FAISS file (`vectors.faiss`), a snapshot of what LMDB holds.

    LMDB is the log and is committed (and synced) before every acknowledgement; the FAISS file
    only saves the next open the work of re-adding vectors. Rewriting it after every commit made
    each write cost a full-index write (118 MB at 210k segments, so GBs at 10M); instead it is
    rewritten when enough changed since the last save: `min_vectors` vectors and at least
    `fraction` of the index, or `every_chunks` commits, or after `max_seconds` (checked at the
    next commit), and always at close and flush. The open after a crash then re-adds at most
    that many vectors from LMDB (`IndexStore.last_replay` says how many and how long).
    """

    min_vectors: int = 50_000
    fraction: float = 0.05
    every_chunks: int | None = None
    max_seconds: float = 300.0

    def due(self, unsaved_vectors: int, unsaved_chunks: int, total_vectors: int, seconds: float) -> bool:
        if unsaved_chunks == 0:
            return False
        if self.every_chunks is not None and unsaved_chunks >= self.every_chunks:
            return True
        enough = unsaved_vectors >= max(self.min_vectors, self.fraction * total_vectors)
        return enough or seconds >= self.max_seconds

    @classmethod
    def every(cls, chunks: int) -> SnapshotPolicy:
        """Save after every `chunks` commits (and by size or time as the defaults say)."""
        return cls(every_chunks=max(1, int(chunks)))


@dataclass(frozen=True)
class IndexSettings:
    """The settings an index is built with (`indexing.json`): a later run or a server must use
    the same ones, or it would mix segments of different kinds in one index."""

    decode: DecodeConfig = field(default_factory=DecodeConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    index_type: str = "auto"

    @classmethod
    def of(cls, config: IndexConfig) -> IndexSettings:
        return cls(config.decode, config.segmenter, config.index_type)

    def to_json(self) -> dict:
        return {"version": SETTINGS_VERSION, "index_type": self.index_type,
                "decode": dataclasses.asdict(self.decode), "segmenter": dataclasses.asdict(self.segmenter)}

    @classmethod
    def from_json(cls, document: dict) -> IndexSettings:
        """Unknown keys are ignored (a newer writer's extras); missing ones take the defaults.
        JSON has no tuples, so list values become tuples (e.g. the k-means grid)."""
        return cls(_dataclass_from(DecodeConfig, document.get("decode", {})),
                   _dataclass_from(SegmenterConfig, document.get("segmenter", {})),
                   document.get("index_type", "auto"))

    def differences(self, stored: IndexSettings) -> list[str]:
        """'group.key=wanted (index: stored)' for each decode or segmenter setting that differs
        from `stored` (the index type is checked against the store itself, which knows it)."""
        wanted, have = self.to_json(), stored.to_json()
        found = [f"{group}.{key}={wanted[group][key]!r} (index: {value!r})"
                 for group in ("decode", "segmenter") for key, value in have[group].items()
                 if wanted[group][key] != value]
        return found

    @classmethod
    def load(cls, index_dir: str | Path) -> IndexSettings | None:
        """The settings stored beside the index at `index_dir`, or None if it has none."""
        path = Path(index_dir) / SETTINGS_FILE
        if not path.exists():
            return None
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise IndexStoreError(f"cannot read {path} ({exc}); delete it to accept the current settings") from exc

    def save(self, index_dir: str | Path) -> None:
        atomic_write_json(Path(index_dir) / SETTINGS_FILE, self.to_json())


def _dataclass_from(cls, values: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})


@dataclass
class DaskConfig:
    """cluster: "local", "local:N" or a scheduler address "tcp://HOST:PORT". num_shards:
    None = the layout's count, or for a new layout one shard per worker. retries: re-runs of
    a shard task that raised. merge: build the merged index at OUT afterwards."""

    cluster: str = f"local:{DEFAULT_LOCAL_WORKERS}"
    num_shards: int | None = None
    retries: int = 3
    merge: bool = True
    force_merge: bool = False

    def __post_init__(self) -> None:
        parse_cluster(self.cluster)
        if self.num_shards is not None and self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")


def parse_cluster(spec: str) -> tuple[str, int | str]:
    """`("local", workers)` or `("address", "tcp://...")`; SegsearchError for anything else."""
    if spec == "local" or spec.startswith("local:"):
        text = spec.partition(":")[2] or str(DEFAULT_LOCAL_WORKERS)
        if not text.isdigit() or int(text) < 1:
            raise SegsearchError(f"--dask {spec!r}: expected local:N with N >= 1 workers, e.g. local:2")
        return "local", int(text)
    if "://" in spec:
        return "address", spec
    raise SegsearchError(f"--dask {spec!r}: use local, local:N (a local cluster of N worker processes) "
                         "or a scheduler address such as tcp://HOST:8786")
