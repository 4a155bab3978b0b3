"""Writes that do not grow with the index: live commit latency and bulk insert/delete throughput
of `IndexStore` at a small and a large index, with the FAISS snapshot policy (today) beside a
FAISS save after every commit (before), and the time to reopen after a kill -9 (the replay).

    python bench/write_scaling.py [--sizes 10000,200000] [--spec auto] [--rounds 5] [--milvus]

Each size gets a fresh index of synthetic segments (clustered 64-d prototypes, 20 segments per
image: service_latency's 4x5 grid, built with one FAISS save at the end). Then, per policy, on a
copy of it, the sizes interleaved step by step (commit i of every size before commit i+1 of any,
so that a drift in this shared machine's speed falls on all sizes alike):
- live: 40 commits of one IndexImages-sized chunk (4 images, 80 segments), latency p50/p99;
- bulk: ~10k segments (7 chunks of 64 images: 8,960) added, then 1k segments (50 images) deleted
  4 images (80 segments) per call, as throughput;
- reopen: a writer "killed" after those writes (no close), then `IndexStore.open` timed,
  with what it replayed from LMDB.
With --milvus, the same vectors in the same calls against Milvus Lite (bench/milvus_writes.py,
an optional dependency: pip install 'pymilvus[milvus_lite]'): its pre-existing collection is the
same index, its live, bulk and delete calls carry the same vectors and keys, and its reopen is
after the process holding it was SIGKILLed (Milvus Lite runs inside its client's process).
Prints a table per round, and with --rounds N > 1 the medians over the rounds; the live p50
ratio (small/large) and the bulk throughput ratio (large/small) are the numbers the issue asks
about (1 = writes no slower at the larger index).
The measured writes run with FAISS on `--faiss-threads` (1, as `segsearch serve` runs live
writes): a small add fanned out over busy cores waits on OpenMP's barrier (an 80-vector IVF
add measured 17 ms with 2 threads on the loaded machine, ~1-2 ms with one).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import sys
import tempfile
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from segsearch.indexer.index_store import IndexStore
from segsearch.testing.crash import abandon
import milvus_writes  # bench/ is the script directory; imports Milvus Lite only in its workers
from search_speed import SearchBenchConfig, make_mixture, sample  # bench/ is the script directory
from service_latency import image_chunk, segment_templates  # bench/ is the script directory

VERSION = "write-scaling"
DIM = 64
LIVE_COMMITS = 40
LIVE_IMAGES = 4
BUILD_IMAGES_PER_CHUNK = 256
BULK_SEGMENTS = 10_000
BULK_IMAGES_PER_CHUNK = 64
DELETE_SEGMENTS = 1_000
DELETE_IMAGES_PER_CALL = 4
# --policies name -> (row label, save_every of IndexStore.open)
POLICIES = {"now": ("snapshot policy (now)", None), "before": ("save every commit (before)", 1)}


@dataclass
class Row:
    size: int
    policy: str
    live_p50_ms: float
    live_p99_ms: float
    live_max_ms: float
    bulk_segments_per_s: float
    delete_segments_per_s: float
    reopen_s: float
    replayed: int | None  # None: not reported (Milvus Lite)

    def line(self, ratios: list[tuple[float, float]]) -> str:
        """`ratios`: (live, bulk) ratios to the small size, one per round (none for the small size)."""
        live, bulk = (_spread([r[k] for r in ratios]) for k in (0, 1))
        return (f"| {self.size:,} | {self.policy} | {self.live_p50_ms:.1f} | {self.live_p99_ms:.1f} | {self.live_max_ms:.1f} | {live} | "
                f"{self.bulk_segments_per_s:,.0f} | {bulk} | {self.delete_segments_per_s:,.0f} | {self.reopen_s:.2f} | "
                f"{'—' if self.replayed is None else f'{self.replayed:,.0f}'} |")


class Records:
    """Synthetic images in order: `take(n_images)` -> records for the next n images."""

    def __init__(self, seed: int):
        self.templates = segment_templates()
        self.mixture = make_mixture(SearchBenchConfig(dim=DIM, seed=seed))
        self.next_image, self.seed = 0, seed

    def take(self, images: int):
        first = self.next_image
        return image_chunk(first, self.vectors(images), VERSION, ["segment"], self.templates)

    def vectors(self, images: int) -> np.ndarray:
        """The next `images` images' segment vectors `(images * S, D)`, without their records."""
        prototypes = sample(self.mixture, images * len(self.templates), seed=self.seed + self.next_image)
        self.next_image += images
        return prototypes


def build_chunks(size: int, per_image: int) -> int:
    """How many chunks of BUILD_IMAGES_PER_CHUNK images make an index of about `size` segments."""
    return len(range(0, max(1, size // per_image), BUILD_IMAGES_PER_CHUNK))


def bulk_chunks(per_image: int) -> int:
    return BULK_SEGMENTS // (BULK_IMAGES_PER_CHUNK * per_image)


def build(path: Path, size: int, spec: str, records: Records) -> None:
    per_image = len(records.templates)
    with IndexStore.create(path, VERSION, DIM, index_spec=spec, save_every=1 << 30) as store:
        for _ in range(build_chunks(size, per_image)):
            store.add_images(records.take(BUILD_IMAGES_PER_CHUNK))


class Run:
    """One size's writes on a fresh copy of its base, step by step, so that the sizes of one
    round can be interleaved: commit i of every size runs before commit i+1 of any, and a drift
    of this shared machine's speed (±30% between runs) falls on every size alike."""

    def __init__(self, base: Path, work: Path, size: int, policy: str, save_every: int | None, records: Records):
        shutil.copytree(base, work)
        # The copy leaves the whole index as dirty pages in the page cache, and LMDB's fdatasync at
        # each commit would write them out: at 1M that is ~1 GB spread over the first commits,
        # which a long-running index never pays. Flush it before timing.
        os.sync()
        self.work, self.size, self.policy, self.records = work, size, policy, records
        self.store = IndexStore.open(work, VERSION, save_every=save_every)
        self.latencies: list[float] = []
        self.bulk_seconds = self.delete_seconds = 0.0
        self.added_ids: list[str] = []
        self.doomed: list[str] = []

    def live_commit(self) -> None:
        chunk = self.records.take(LIVE_IMAGES)
        started = time.perf_counter()
        self.store.add_images(chunk)
        self.latencies.append((time.perf_counter() - started) * 1000)

    def bulk_chunk(self) -> None:
        chunk = self.records.take(BULK_IMAGES_PER_CHUNK)
        started = time.perf_counter()
        self.store.add_images(chunk)
        self.bulk_seconds += time.perf_counter() - started
        self.added_ids += [image.image_id for image, _ in chunk]

    def delete_call(self, call: int) -> None:
        if call == 0:
            self.doomed = self.added_ids[: DELETE_SEGMENTS // len(self.records.templates)]
        started = time.perf_counter()
        self.store.delete_images(self.doomed[call * DELETE_IMAGES_PER_CALL:(call + 1) * DELETE_IMAGES_PER_CALL])
        self.delete_seconds += time.perf_counter() - started

    def reopen_after_kill(self) -> Row:
        abandon(self.store)  # what kill -9 leaves: LMDB committed, no close, no last FAISS save
        started = time.perf_counter()
        with IndexStore.open(self.work, VERSION) as reopened:
            reopen = time.perf_counter() - started
            replayed = reopened.last_replay.added + reopened.last_replay.removed
        shutil.rmtree(self.work)
        per_image = len(self.records.templates)
        return Row(self.size, self.policy, float(np.percentile(self.latencies, 50)),
                   float(np.percentile(self.latencies, 99)), float(np.max(self.latencies)),
                   len(self.added_ids) * per_image / self.bulk_seconds,
                   len(self.doomed) * per_image / self.delete_seconds, reopen, replayed)


def measure(runs: list[Run], live_commits: int = LIVE_COMMITS) -> list[Row]:
    """The live commits, then ~10k segments of bulk adds, then 1k segments of deletes (4 images
    per call), interleaved across `runs`; then each is "killed" and its reopen timed."""
    for _ in range(live_commits):
        for run in runs:
            run.live_commit()
    for _ in range(bulk_chunks(len(runs[0].records.templates))):
        for run in runs:
            run.bulk_chunk()
    doomed_images = DELETE_SEGMENTS // len(runs[0].records.templates)
    for call in range(math.ceil(doomed_images / DELETE_IMAGES_PER_CALL)):
        for run in runs:
            run.delete_call(call)
    return [run.reopen_after_kill() for run in runs]


def measure_milvus(folder: Path, size: int, seed: int, label: str, live_commits: int = LIVE_COMMITS) -> Row:
    """Milvus Lite on the vectors that `build` and the first round's first policy draw, call for call."""
    records = Records(seed)
    per_image = len(records.templates)
    base = np.concatenate([records.vectors(BUILD_IMAGES_PER_CHUNK) for _ in range(build_chunks(size, per_image))])
    live = [records.vectors(LIVE_IMAGES) for _ in range(live_commits)]
    bulk = [records.vectors(BULK_IMAGES_PER_CHUNK) for _ in range(bulk_chunks(per_image))]
    workload = milvus_writes.Workload(base, live, bulk, delete=DELETE_SEGMENTS // per_image * per_image,
                                      delete_per_call=DELETE_IMAGES_PER_CALL * per_image)
    result = milvus_writes.run(folder, workload)
    shutil.rmtree(folder)
    return Row(size, label, float(np.percentile(result.live_ms, 50)), float(np.percentile(result.live_ms, 99)),
               float(np.max(result.live_ms)), result.bulk_per_s, result.delete_per_s, result.reopen_s, None)


def prepare_base(base: Path, size: int, spec: str, records: Records) -> None:
    """Build the base index of `size` segments at `base`, or reuse it (the build is
    deterministic); either way `records` then continues after the base's images."""
    if (base / "vectors.faiss").is_file():
        records.next_image = build_chunks(size, len(records.templates)) * BUILD_IMAGES_PER_CHUNK
        print(f"reusing {base}", flush=True)
        return
    started = time.perf_counter()
    shutil.rmtree(base, ignore_errors=True)
    build(base, size, spec, records)
    print(f"built {size:,} segments in {time.perf_counter() - started:.0f} s", flush=True)


def median_rows(rounds: list[list[Row]]) -> list[Row]:
    """Per (size, policy), the median of every column over the rounds."""
    columns = [f.name for f in dataclasses.fields(Row)][2:]
    medians = []
    for position, first in enumerate(rounds[0]):
        same = [rows[position] for rows in rounds]
        values = {name: None if any(getattr(r, name) is None for r in same)
                  else float(np.median([getattr(r, name) for r in same])) for name in columns}
        medians.append(Row(first.size, first.policy, **values))
    return medians


def print_table(rows: list[Row], sizes: list[int], rounds: list[list[Row]] | None = None) -> None:
    """Rows with each one's live-p50 and bulk ratios to the smallest size's row of its policy;
    with `rounds`, the ratios of the rows measured in every round (the first ones) are the
    medians (and ranges) of the per-round ratios."""
    print("\n| segments | FAISS saves | live commit p50 ms | p99 ms | max ms | small/large p50 | bulk add seg/s | "
          "large/small bulk | delete seg/s | reopen after kill s | replayed |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for position, row in enumerate(rows):
        small = next((r for r in rows if r.policy == row.policy and r.size == sizes[0]), None)
        if small is None or row.size == sizes[0]:
            print(row.line([]))
        else:
            small_at = rows.index(small)
            per_round = rounds if rounds and position < len(rounds[0]) else [rows]  # Milvus: one run
            print(row.line([_ratio(r[small_at], r[position]) for r in per_round]))
    print(flush=True)


def _spread(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def _ratio(small: Row, large: Row) -> tuple[float, float]:
    """(small/large live p50, large/small bulk throughput): 1 = no slower at the larger size."""
    return small.live_p50_ms / large.live_p50_ms, large.bulk_segments_per_s / small.bulk_segments_per_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,200000", help="index sizes in segments (default: %(default)s)")
    parser.add_argument("--live-commits", type=int, default=LIVE_COMMITS,
                        help="live commits timed (80 segments each; 103 fill the 8,192-vector write buffer "
                             "of an HNSW/IVF index once, and its drain is the max) (default: %(default)s)")
    parser.add_argument("--spec", default="auto", help="FAISS index type (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the measurement on fresh copies of the bases and also print the medians: "
                             "on this shared machine one run's ratios vary by ±30%% (default: %(default)s)")
    parser.add_argument("--faiss-threads", type=int, default=1,
                        help="OpenMP threads for FAISS in the writing thread; 1 = as `segsearch serve` runs its "
                             "live writes (--faiss-threads; 0 = FAISS's default, all cores) (default: %(default)s)")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="which FAISS save policies to measure: now (the snapshot policy), before (a save "
                             "per commit: slow at 1M) (default: %(default)s)")
    parser.add_argument("--base-dir", default="",
                        help="keep the built indexes here and reuse them in later runs (the build is "
                             "deterministic per size, spec and seed; a 1M build takes ~8 min) (default: a temp dir)")
    parser.add_argument("--milvus", action="store_true",
                        help="also run the same writes against Milvus Lite (pip install 'pymilvus[milvus_lite]')")
    args = parser.parse_args(argv)
    build_threads = faiss.omp_get_max_threads()
    write_threads = args.faiss_threads or build_threads  # per thread: this one does every write
    if args.milvus:
        pymilvus_version, lite_version = milvus_writes.versions()  # exits with how to install if missing
        milvus_label = f"Milvus Lite {lite_version} ({milvus_writes.INDEX}, {milvus_writes.METRIC}, no fsync)"
        print(f"pymilvus {pymilvus_version}, milvus-lite {lite_version}", flush=True)
    sizes = [int(v) for v in args.sizes.split(",")]
    policies = dict(POLICIES[name] for name in args.policies.split(","))
    rounds: list[list[Row]] = []
    with tempfile.TemporaryDirectory(prefix="write-scaling-") as folder:
        bases, records = {}, {}
        faiss.omp_set_num_threads(build_threads)  # the untimed builds may use every core
        for size in sizes:
            records[size] = Records(args.seed)
            bases[size] = Path(args.base_dir or folder) / f"base-{args.spec}-{size}-seed{args.seed}"
            prepare_base(bases[size], size, args.spec, records[size])
        faiss.omp_set_num_threads(write_threads)
        for round_no in range(args.rounds):
            rows: list[Row] = []
            for policy, save_every in policies.items():
                runs = [Run(bases[size], Path(folder) / f"work-{size}", size, policy, save_every, records[size])
                        for size in sizes]
                gc.freeze()  # as `segsearch serve` does once its index is open (service/server.py)
                rows += measure(runs, args.live_commits)
            print(f"round {round_no + 1} of {args.rounds}:", flush=True)
            print_table(rows, sizes)
            rounds.append(rows)
        if not args.base_dir:
            for base in bases.values():
                shutil.rmtree(base)
        milvus_rows = [measure_milvus(Path(folder) / f"milvus-{size}", size, args.seed, milvus_label,
                                      args.live_commits) for size in sizes] if args.milvus else []
    if args.rounds > 1:
        print(f"\nmedian of {args.rounds} rounds (each column separately; the ratios are the medians of each "
              "round's ratio, with their range):")
        print_table(median_rows(rounds) + milvus_rows, sizes, rounds)
    elif milvus_rows:
        print("\nbeside Milvus Lite, the same vectors in the same calls:")
        print_table(rounds[0] + milvus_rows, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
