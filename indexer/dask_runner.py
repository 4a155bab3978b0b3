"""Distributed indexing on Dask: one shard per task, each shard a full `index_corpus` run.

    driver (segsearch index ... --dask local:2 | tcp://HOST:8786)
      1. list the corpus; create or load OUT/shards/shards.json (shards.py)
      2. split the items not yet in any shard into contiguous runs, one per shard
      3. submit one task per shard: `index_shard` = `pipeline.index_corpus(run, ckpt, shard_dir)`
         with the shard's first segment id (disjoint id ranges)       ──► Dask workers
      4. drop images whose content is indexed in an earlier shard too (dedup across shards)
      5. merge the shards into OUT (merge.py), unless --no-merge

Each worker indexes its shard exactly as `segsearch index` does (same decoding, segmenter,
records, one LMDB transaction per chunk, FAISS repaired from LMDB on open), so a shard is
crash-safe and resumable on its own. **Failures**: a task that raises is retried `retries`
times; a task whose worker dies (killed, out of memory) is rescheduled by Dask on another
worker (up to `distributed.scheduler.allowed-failures` deaths). Either way the retry runs
`index_corpus` on the same shard directory, which resumes it: committed chunks stay, the
rest is indexed. If a shard still fails, the driver stops with the shard named, and running
the same command again resumes every shard (the split only covers images not yet indexed).

**Same result as one process.** Splitting keeps the corpus order (shard k holds the k-th
contiguous run), each shard keeps the first of duplicate contents within itself, and step 4
keeps the first occurrence in corpus order across shards, so the merged index holds the same
images and segments as `index_corpus` over the whole corpus; only segment ids differ (each
shard numbers from its own range).

**Cluster**: `local[:N]` starts a `LocalCluster` on 127.0.0.1 with N worker processes of one
thread each (default 2); `tcp://HOST:PORT` connects to a running scheduler. Workers need the
checkpoint, the images and OUT at the same paths as the driver (a shared filesystem) and
segsearch installed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from segsearch.errors import IndexStoreError, SegsearchError
from segsearch.indexer.config import DaskConfig, parse_cluster
from segsearch.indexer.corpus import CorpusItem, read_corpus
from segsearch.indexer.decode import SkipReason
from segsearch.indexer.index_store import LMDB_DIR, IndexStore
from segsearch.indexer.merge import MergeSummary, merge_shards
from segsearch.indexer.metadata_store import MetadataStore
from segsearch.indexer.pipeline import SKIPPED_FILE, IndexConfig, IndexSummary, SkipReport, index_corpus
from segsearch.indexer.shards import MANIFEST, SHARDS_DIR, ShardLayout, is_index_dir

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 120  # for a running cluster to show at least one worker


@dataclass
class ShardRun:
    """One shard task's outcome: the shard's `IndexSummary` and the worker that ran it."""

    shard: int
    worker: str
    summary: IndexSummary


@dataclass
class DistributedSummary:
    out_dir: str
    num_shards: int
    num_workers: int
    shards: list[ShardRun] = field(default_factory=list)
    cross_shard_duplicates: int = 0
    index_seconds: float = 0.0
    merge: MergeSummary | None = None
    seconds: float = 0.0
    index_images: int = 0
    index_segments: int = 0

    @property
    def images_indexed(self) -> int:
        return sum(run.summary.images_indexed for run in self.shards) - self.cross_shard_duplicates

    @property
    def skipped(self) -> int:
        return sum(run.summary.skipped for run in self.shards) + self.cross_shard_duplicates

    @property
    def images_per_second(self) -> float:
        return self.images_indexed / self.index_seconds if self.index_seconds > 0 else 0.0

    def format(self) -> str:
        lines = [(f"indexed {self.images_indexed} images on {self.num_workers} Dask worker(s) into "
                  f"{self.num_shards} shard(s) in {self.index_seconds:.1f} s ({self.images_per_second:.2f} "
                  f"images/s); skipped {self.skipped} (each shard's skipped.jsonl), of which "
                  f"{self.cross_shard_duplicates} duplicate(s) across shards")]
        for run in self.shards:
            s = run.summary
            lines.append(f"  shard {run.shard:04d} on {run.worker}: {s.images_indexed} images, "
                         f"{s.segments_indexed} segments, {s.already_indexed} already indexed, "
                         f"{s.seconds:.1f} s")
        if self.merge is not None:
            lines.append(self.merge.format())
        lines.append(f"index {self.out_dir}: {self.index_images} images, {self.index_segments} segments; "
                     f"total {self.seconds:.1f} s")
        return "\n".join(lines)


@contextmanager
def connect(spec: str) -> Iterator[object]:
    """A `distributed.Client` for `spec`: a new loopback LocalCluster, or a running scheduler."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise SegsearchError("distributed indexing needs Dask: pip install 'segsearch[dask]'") from None
    kind, value = parse_cluster(spec)
    if kind == "address":
        with Client(value, timeout=CONNECT_TIMEOUT_S) as client:
            try:
                client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
            except TimeoutError:
                raise SegsearchError(f"no Dask worker joined the scheduler {value} within "
                                     f"{CONNECT_TIMEOUT_S} s; start workers with `dask worker {value}`") from None
            yield client
        return
    # Every listening socket on loopback: scheduler, nannies, workers and their HTTP endpoints
    # (dashboard_address=None would still open the scheduler's /health server, on port 8787).
    with LocalCluster(n_workers=value, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", silence_logs=logging.WARNING) as cluster, \
            Client(cluster) as client:
        yield client


def index_distributed(corpus: str | Path | Sequence[CorpusItem], checkpoint_path: str | Path, out: str | Path,
                      config: IndexConfig | None = None, dask: DaskConfig | None = None,
                      client=None) -> DistributedSummary:
    """Index `corpus` into the sharded layout `OUT/shards` on Dask and merge it into OUT.

    `client`: an existing `distributed.Client` (else one is made from `dask.cluster`).
    """
    config, dask = config or IndexConfig(), dask or DaskConfig()
    if client is None:
        with connect(dask.cluster) as new_client:
            return index_distributed(corpus, checkpoint_path, out, config, dask, new_client)
    started = time.perf_counter()
    out, checkpoint_path = Path(out).absolute(), Path(checkpoint_path).absolute()
    items = list(corpus) if isinstance(corpus, (list, tuple)) else read_corpus(corpus)
    workers = len(client.nthreads())
    layout = _open_layout(out, config.must_exist, dask.num_shards, default_shards=max(1, workers))
    summary = DistributedSummary(str(out), layout.num_shards, workers)
    todo = _not_yet_indexed(layout, items)
    log.info("indexing %d of %d images into %d shards on %d Dask workers", len(todo), len(items),
             layout.num_shards, workers)
    summary.shards = _run_shards(client, layout, split(todo, layout.num_shards), checkpoint_path, config, dask)
    summary.cross_shard_duplicates = drop_cross_shard_duplicates(layout, items)
    summary.index_seconds = time.perf_counter() - started
    if dask.merge:
        summary.merge = merge_shards(layout.root, out, force=dask.force_merge)
    with _any_store(out, layout) as store:
        summary.index_images, summary.index_segments = store.meta.num_images, store.meta.num_segments
    summary.seconds = time.perf_counter() - started
    return summary


def index_shard(items: list[CorpusItem], checkpoint_path: str, shard_dir: str, config: IndexConfig) -> IndexSummary:
    """The Dask task: index (or resume) one shard with the single-process pipeline."""
    import torch

    torch.set_num_threads(_worker_threads())
    log.info("indexing %d images into %s", len(items), shard_dir)
    return index_corpus(items, checkpoint_path, shard_dir, config)


def split(items: Sequence[CorpusItem], parts: int) -> list[list[CorpusItem]]:
    """`parts` contiguous runs of `items` (corpus order kept), sizes differing by at most one."""
    bounds = [len(items) * k // parts for k in range(parts + 1)]
    return [list(items[bounds[k]:bounds[k + 1]]) for k in range(parts)]


def drop_cross_shard_duplicates(layout: ShardLayout, items: Sequence[CorpusItem]) -> int:
    """Delete images whose content an earlier image (in corpus order) holds in another shard,
    reporting each in its shard's skipped.jsonl as a duplicate; returns how many."""
    position = {item.image_id: n for n, item in enumerate(items)}
    owner: dict[str, tuple[tuple[float, int], str]] = {}  # sha256 -> ((position, shard), image id)
    losers: dict[int, list[tuple[str, str, str]]] = {}  # shard -> [(image id, uri, kept image id)]
    for shard, shard_dir in enumerate(layout.shard_dirs):
        metadata = MetadataStore.open(shard_dir / LMDB_DIR, read_only=True)
        try:
            images = list(metadata.iter_images())
        finally:
            metadata.close()
        for image in images:
            rank = (position.get(image.image_id, float("inf")), shard)
            kept = owner.get(image.sha256)
            if kept is None or rank < kept[0]:
                if kept is not None:
                    losers.setdefault(kept[0][1], []).append((kept[1], "", image.image_id))
                owner[image.sha256] = (rank, image.image_id)
            else:
                losers.setdefault(shard, []).append((image.image_id, image.uri, kept[1]))
    for shard, doomed in losers.items():
        _delete_duplicates(layout.shard_dirs[shard], doomed)
    return sum(len(doomed) for doomed in losers.values())


def _delete_duplicates(shard_dir: Path, doomed: list[tuple[str, str, str]]) -> None:
    report = SkipReport(shard_dir / SKIPPED_FILE)
    with IndexStore.open(shard_dir) as store:
        for image_id, uri, kept in doomed:  # reported first: a crash before the delete re-finds it
            uri = uri or store.get_image(image_id).uri
            report.add(CorpusItem(image_id, uri), SkipReason.DUPLICATE, f"same content (sha256) as image {kept!r}")
        store.delete_images([image_id for image_id, _, _ in doomed])


def _open_layout(out: Path, must_exist: bool, wanted: int | None, default_shards: int) -> ShardLayout:
    """The layout at OUT/shards (its shard count checked), or a new one; refuses an OUT that
    holds something else."""
    root = out / SHARDS_DIR
    if (root / MANIFEST).exists():
        layout = ShardLayout.load(root)
        if wanted not in (None, layout.num_shards):
            raise IndexStoreError(f"the sharded index at {root} has {layout.num_shards} shards; omit --shards "
                              f"or pass --shards {layout.num_shards} (or index into a new --out directory)")
        return layout
    if is_index_dir(out):
        raise IndexStoreError(f"{out} holds an index built by one process; distributed indexing builds a sharded "
                          "index into a new --out directory (or add to this one without --dask)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IndexStoreError(f"{out} exists and is not a segsearch index; choose a new --out directory")
    if must_exist:
        raise IndexStoreError(f"no sharded index at {out} to resume; drop --resume to create one")
    return ShardLayout.create(root, wanted or default_shards)


def _not_yet_indexed(layout: ShardLayout, items: Sequence[CorpusItem]) -> list[CorpusItem]:
    """Items no shard holds yet (a re-run's split must not send an image to a second shard),
    less known duplicates whose content is still indexed under another id (re-indexing one
    in another shard only to drop it again would change that shard and force a new merge)."""
    todo = list(items)
    stores = [MetadataStore.open(d / LMDB_DIR, read_only=True) for d in layout.shard_dirs if is_index_dir(d)]
    try:
        todo = [item for item in todo if all(m.get_image(item.image_id) is None for m in stores)]
        duplicates = {entry["image_id"] for d in layout.shard_dirs for entry in SkipReport(d / SKIPPED_FILE).entries()
                      if entry.get("reason") == SkipReason.DUPLICATE.value}
        return [item for item in todo if item.image_id not in duplicates or not _still_duplicate(item, stores)]
    finally:
        for metadata in stores:
            metadata.close()


def _still_duplicate(item: CorpusItem, stores: Sequence[MetadataStore]) -> bool:
    """True if the file's content (sha256) is indexed under another image id."""
    try:
        digest = hashlib.sha256(Path(item.uri).read_bytes()).hexdigest()
    except OSError:
        return False  # let the shard report it as unreadable
    return any(m.image_id_for_sha256(digest) not in (None, item.image_id) for m in stores)


def _run_shards(client, layout: ShardLayout, runs: list[list[CorpusItem]], checkpoint_path: Path,
                config: IndexConfig, dask: DaskConfig) -> list[ShardRun]:
    """Submit one task per shard, wait for all; a shard that failed after its retries stops
    the job (after the others finished) with its error."""
    from distributed import as_completed

    job = uuid.uuid4().hex[:8]
    futures = {}
    for shard, run in enumerate(runs):
        shard_config = dataclasses.replace(config, first_segment_id=layout.first_ids[shard], progress=False,
                                           must_exist=False)
        future = client.submit(_task, run, str(checkpoint_path), str(layout.shard_dirs[shard]), shard_config,
                               key=f"segsearch-shard-{shard:04d}-{job}", pure=False, retries=dask.retries)
        futures[future] = shard
    results, failures = [], []
    # LMDB allows one open of an environment per process: no polling reader beside in-process workers
    in_process = os.getpid() in client.run(os.getpid).values() if config.progress else True
    with ShardProgress(layout, sum(len(run) for run in runs), enabled=config.progress and not in_process):
        for future in as_completed(list(futures)):
            _collect_shard(future, futures[future], results, failures)
    if failures:
        raise IndexStoreError("distributed indexing failed (after retries) in " + "; ".join(failures)
                          + ". Committed work is kept: re-run the same command to resume every shard")
    return sorted(results, key=lambda run: run.shard)


def _collect_shard(future, shard: int, results: list[ShardRun], failures: list[str]) -> None:
    try:
        worker, summary = future.result()
    except Exception as exc:  # noqa: BLE001 - reported with the shard by the caller
        log.error("shard %04d failed: %s: %s", shard, type(exc).__name__, exc)
        failures.append(f"shard {shard:04d}: {type(exc).__name__}: {exc}")
        return
    log.info("shard %04d done on %s: %d images, %d segments", shard, worker, summary.images_indexed,
             summary.segments_indexed)
    results.append(ShardRun(shard, worker, summary))


class ShardProgress:
    """A progress bar (images/s, ETA) over all shards while their tasks run elsewhere: a thread
    reads each shard's committed image count from its LMDB (a read-only reader, as any
    process may open) every `every` seconds. It moves by committed chunks."""

    def __init__(self, layout: ShardLayout, total: int, enabled: bool = True, every: float = 1.0):
        self.layout, self.total, self.enabled, self.every = layout, total, enabled and total > 0, every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_counts = self._counts() if self.enabled else 0
        self.done = 0  # images committed by the shards since the start

    def _counts(self) -> int:
        total = 0
        for shard_dir in self.layout.shard_dirs:
            if not is_index_dir(shard_dir):
                continue
            metadata = MetadataStore.open(shard_dir / LMDB_DIR, read_only=True)
            try:
                total += metadata.meta().num_images
            finally:
                metadata.close()
        return total

    def _run(self) -> None:
        with tqdm(total=self.total, unit="img", desc="indexing (all shards)", dynamic_ncols=True) as bar:
            while not self._stop.wait(self.every):
                self._update(bar)
            self._update(bar)

    def _update(self, bar) -> None:
        try:
            done = self._counts() - self._start_counts
        except Exception:  # noqa: BLE001 - a shard being created; the next poll will see it
            return
        self.done = max(0, min(done, self.total))
        bar.update(self.done - bar.n)

    def __enter__(self) -> ShardProgress:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="shard-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _task(items: list[CorpusItem], checkpoint_path: str, shard_dir: str, config: IndexConfig):
    """`index_shard` plus the worker's address (for the summary)."""
    return _worker_address(), index_shard(items, checkpoint_path, shard_dir, config)


def _worker_threads() -> int:
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return 1


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "local"


@contextmanager
def _any_store(out: Path, layout: ShardLayout):
    """The merged index at `out` if there is one, else the sharded layout (read-only)."""
    from segsearch.indexer.sharded_store import ShardedStore

    store = IndexStore.open(out, read_only=True) if is_index_dir(out) else ShardedStore.open(layout.root)
    try:
        yield store
    finally:
        store.close()
