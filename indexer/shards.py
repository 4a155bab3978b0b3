"""The sharded index layout: several full index directories with disjoint segment-id ranges.

    OUT/                          the merged index (an ordinary index directory), once merged
    OUT/merge.json                what the merged index was built from (see merge.py)
    OUT/shards/shards.json        the manifest of the sharded layout
    OUT/shards/shard-0000/        shard 0: a full index directory (metadata.lmdb, vectors.faiss,
    OUT/shards/shard-0001/          indexing.json, skipped.jsonl), written by one worker
    ...

`OUT/shards` alone is a complete, servable index ("sharded layout"): `segsearch serve` and
`segsearch index verify|stats` accept it, and `segsearch serve OUT` falls back to it when OUT
holds no merged index (`--no-merge`).

**Disjoint id ranges.** Shard k's id counter starts at `k * ID_STRIDE + 1` (ID_STRIDE = 2**40:
about 10**12 segments per shard, room for 2**23 shards in FAISS's int64 ids). A segment
therefore keeps its id everywhere: in its shard, in the merged index, and in sharded serving,
so the same query names the same ids whichever view answers it. The owner of an id is found
from the id alone (`ShardLayout.shard_of`).

**Manifest** (`shards.json`, written atomically):

    {"format": 1, "id_stride": 1099511627776,
     "shards": [{"path": "shard-0000", "first_segment_id": 1},
                {"path": "shard-0001", "first_segment_id": 1099511627777}, ...]}

`path` is relative to the manifest's folder, or absolute (a shard may live on another disk).
The shard count is fixed when the layout is created (re-runs reuse it).
"""
from __future__ import annotations

import bisect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from segsearch.errors import IndexStoreError
from segsearch.indexer.index_store import LMDB_DIR
from segsearch.durable import atomic_write

log = logging.getLogger(__name__)

MANIFEST = "shards.json"
SHARDS_DIR = "shards"
ID_STRIDE = 1 << 40
MANIFEST_FORMAT = 1
MAX_SHARDS = 1 << 16  # far below 2**23 (the int64 limit); more is surely a typo


def first_segment_id(shard: int, stride: int = ID_STRIDE) -> int:
    """The first id of shard `shard`'s range `[shard*stride + 1, (shard+1)*stride]`."""
    return shard * stride + 1


def shard_name(shard: int) -> str:
    return f"shard-{shard:04d}"


def is_index_dir(path: str | Path) -> bool:
    return (Path(path) / LMDB_DIR / "data.mdb").exists()


def find_layout(path: str | Path) -> Path | None:
    """The sharded layout served for `path`: `path` itself if it holds a manifest, else
    `path/shards` when `path` holds no merged index; None for an ordinary index directory."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    if not is_index_dir(path) and (path / SHARDS_DIR / MANIFEST).exists():
        return path / SHARDS_DIR
    return None


@dataclass(frozen=True)
class ShardLayout:
    """A loaded manifest: where each shard lives and which id range it owns."""

    root: Path
    shard_dirs: tuple[Path, ...]
    first_ids: tuple[int, ...]
    id_stride: int = ID_STRIDE

    @property
    def num_shards(self) -> int:
        return len(self.shard_dirs)

    @classmethod
    def create(cls, root: str | Path, num_shards: int) -> ShardLayout:
        """Write a new manifest for `num_shards` shards in `root` (the shards come later)."""
        if not 1 <= num_shards <= MAX_SHARDS:
            raise IndexStoreError(f"the number of shards must lie in 1..{MAX_SHARDS}, got {num_shards}")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        entries = [{"path": shard_name(k), "first_segment_id": first_segment_id(k)} for k in range(num_shards)]
        manifest = {"format": MANIFEST_FORMAT, "id_stride": ID_STRIDE, "shards": entries}
        atomic_write(root / MANIFEST, [(json.dumps(manifest, indent=2) + "\n").encode("utf-8")])
        log.info("created the sharded layout %s (%d shards)", root, num_shards)
        return cls.load(root)

    @classmethod
    def load(cls, root: str | Path) -> ShardLayout:
        root = Path(root)
        path = root / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            stride = int(manifest["id_stride"])
            entries = manifest["shards"]
            dirs = tuple(root / entry["path"] for entry in entries)  # an absolute path stays as is
            firsts = tuple(int(entry["first_segment_id"]) for entry in entries)
        except FileNotFoundError:
            raise IndexStoreError(f"no shard manifest at {path}; build a sharded index with "
                              "`segsearch index CORPUS --out DIR --dask local:2`") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexStoreError(f"cannot read the shard manifest {path}: {exc!r}") from None
        if manifest.get("format") != MANIFEST_FORMAT:
            raise IndexStoreError(f"shard manifest {path} has format {manifest.get('format')!r}; this "
                              f"segsearch reads format {MANIFEST_FORMAT}")
        if not dirs or list(firsts) != sorted(set(firsts)) or firsts[0] < 1:
            raise IndexStoreError(f"shard manifest {path} must list at least one shard with increasing "
                              f"first_segment_id values, got {list(firsts)}")
        return cls(root, dirs, firsts, stride)

    def shard_of(self, segment_id: int) -> int:
        """The shard whose id range holds `segment_id` (-1 below the first range)."""
        return bisect.bisect_right(self.first_ids, int(segment_id)) - 1

    def id_limit(self, shard: int) -> int:
        """One past the last id shard `shard` may allocate (the next shard's first id)."""
        if shard + 1 < self.num_shards:
            return self.first_ids[shard + 1]
        return self.first_ids[shard] + self.id_stride
