"""Milvus Lite beside `IndexStore` in bench/write_scaling.py: the same vectors inserted and deleted.

`run(folder, workload)` writes the workload's vectors to a file and starts this script as a
worker process, which
- creates a collection (INT64 primary key, 64-d FLOAT_VECTOR, FLAT index, IP metric; the
  vectors are unit norm, so IP is cosine) in a fresh Milvus Lite database,
- inserts the pre-existing index (`base`) in large calls, flushes and loads it (not timed),
- times each `live` insert call, the `bulk` insert calls together, and the deletes by primary
  key of the first `delete` bulk vectors, `delete_per_call` per call,
- writes its timings and then SIGKILLs itself: Milvus Lite runs in the client's process (a gRPC
  server on a thread), so this is the database dying without a close, like kill -9.
Then a second worker times the reopen: `MilvusClient(path)` and `load_collection` (which
recovers the collection, replaying its WAL), and checks the row count after the kill.

Durability (milvus-lite 3.2.2, pure Python): an insert or delete returns after its WAL batch is
written and flushed to the OS page cache, without an fsync (the WAL's sync_mode "batch", an
fsync per write, exists but the collection never asks for it). Acknowledged writes survive the
process dying, not an OS crash or power loss. segsearch's IndexStore acknowledges after a
synced LMDB commit (sync=True, metasync=True).

    pip install 'pymilvus[milvus_lite]'      (or: pip install -e '.[milvus]')
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INSTALL = "pip install 'pymilvus[milvus_lite]'   (or, in a checkout: pip install -e '.[milvus]')"
COLLECTION = "segments"
INDEX = "FLAT"
METRIC = "IP"
BASE_CHUNK = 10_000  # vectors per untimed insert call while building the pre-existing index


def versions() -> tuple[str, str]:
    """(pymilvus, milvus-lite) versions; exits with how to install them when either is missing."""
    try:
        from importlib.metadata import version

        import milvus_lite  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError as error:
        sys.exit(f"--milvus needs Milvus Lite, which is not importable here ({error}).\n"
                 f"Install it with: {INSTALL}")
    return version("pymilvus"), version("milvus-lite")


@dataclass
class Workload:
    """Vectors in insert order; primary keys are their positions in base + live + bulk."""

    base: np.ndarray  # (N, D): the pre-existing index
    live: list[np.ndarray]  # one timed insert call each
    bulk: list[np.ndarray]  # timed together
    delete: int  # the first `delete` bulk vectors are deleted ...
    delete_per_call: int  # ... this many keys per call


@dataclass
class Result:
    live_ms: list[float]
    bulk_per_s: float
    delete_per_s: float
    reopen_s: float
    rows_after_reopen: int


def run(folder: Path, workload: Workload) -> Result:
    """The workload against a fresh Milvus Lite database under `folder` (made here)."""
    folder.mkdir(parents=True)
    vectors = folder / "workload.npz"
    np.savez(vectors, base=workload.base, live=np.concatenate(workload.live),
             live_sizes=[len(v) for v in workload.live], bulk=np.concatenate(workload.bulk),
             bulk_sizes=[len(v) for v in workload.bulk], delete=workload.delete,
             delete_per_call=workload.delete_per_call)
    db, report = folder / "milvus.db", folder / "writes.json"
    writer = _worker("write", db, vectors, report)
    if writer.returncode != -signal.SIGKILL or not report.exists():
        raise RuntimeError(f"Milvus Lite writer ended with {writer.returncode}:\n{writer.stderr[-4000:]}")
    writes = json.loads(report.read_text())
    reopen = _worker("reopen", db, vectors, report)
    if reopen.returncode != 0:
        raise RuntimeError(f"Milvus Lite reopen failed ({reopen.returncode}):\n{reopen.stderr[-4000:]}")
    reopened = json.loads(report.read_text())
    expected = (len(workload.base) + sum(map(len, workload.live)) + sum(map(len, workload.bulk))
                - workload.delete)
    if reopened["rows"] != expected:
        raise RuntimeError(f"Milvus Lite lost writes in the kill: {reopened['rows']:,} rows, {expected:,} acknowledged")
    return Result(writes["live_ms"], writes["bulk_per_s"], writes["delete_per_s"], reopened["seconds"],
                  reopened["rows"])


def _worker(mode: str, db: Path, vectors: Path, report: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, mode, str(db), str(vectors), str(report)],
                          capture_output=True, text=True)


def _rows(first_id: int, vectors: np.ndarray) -> list[dict]:
    return [{"id": first_id + i, "vector": vector} for i, vector in enumerate(vectors)]


def _calls(first_id: int, vectors: np.ndarray, sizes: np.ndarray) -> list[list[dict]]:
    """The rows of each insert call: `vectors` cut into `sizes`, keys counted from `first_id`."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [_rows(first_id + int(start), vectors[start:start + size]) for start, size in zip(starts, sizes)]


def _write(db: Path, vectors: Path, report: Path) -> None:
    from pymilvus import DataType, MilvusClient

    data = np.load(vectors)
    client = MilvusClient(str(db))
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=data["base"].shape[1])
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type=INDEX, metric_type=METRIC)
    client.create_collection(COLLECTION, schema=schema, index_params=index)
    base = data["base"]
    for start in range(0, len(base), BASE_CHUNK):
        client.insert(COLLECTION, _rows(start, base[start:start + BASE_CHUNK]))
    client.flush(COLLECTION)  # the pre-existing index lies in segments, not in the WAL
    client.load_collection(COLLECTION)
    live = _calls(len(base), data["live"], data["live_sizes"])
    bulk_first = len(base) + len(data["live"])
    bulk = _calls(bulk_first, data["bulk"], data["bulk_sizes"])
    live_ms = []
    for rows in live:
        started = time.perf_counter()
        client.insert(COLLECTION, rows)
        live_ms.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    for rows in bulk:
        client.insert(COLLECTION, rows)
    bulk_per_s = len(data["bulk"]) / (time.perf_counter() - started)
    doomed, per_call = list(range(bulk_first, bulk_first + int(data["delete"]))), int(data["delete_per_call"])
    started = time.perf_counter()
    for start in range(0, len(doomed), per_call):
        client.delete(COLLECTION, ids=doomed[start:start + per_call])
    delete_per_s = len(doomed) / (time.perf_counter() - started)
    report.write_text(json.dumps({"live_ms": live_ms, "bulk_per_s": bulk_per_s, "delete_per_s": delete_per_s}))
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush: what kill -9 leaves


def _reopen(db: Path, report: Path) -> None:
    from pymilvus import MilvusClient  # imported before the clock, as IndexStore is in write_scaling

    started = time.perf_counter()
    client = MilvusClient(str(db))
    client.load_collection(COLLECTION)
    seconds = time.perf_counter() - started
    rows = client.query(COLLECTION, filter="", output_fields=["count(*)"])[0]["count(*)"]
    client.close()
    report.write_text(json.dumps({"seconds": seconds, "rows": int(rows)}))


if __name__ == "__main__":
    mode, db_path, vectors_path, report_path = sys.argv[1:5]
    if mode == "write":
        _write(Path(db_path), Path(vectors_path), Path(report_path))
    else:
        _reopen(Path(db_path), Path(report_path))
