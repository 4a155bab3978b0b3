"""Search speed: recall@10 and queries/s of segsearch's vector index vs exact search.

The data are synthetic *clustered* unit-norm prototypes shaped like segment prototypes: a
two-level mixture (``--classes`` semantic classes on the sphere, ``--clusters`` modes around
them, e.g. one texture or object part each), cluster sizes drawn from a flat Dirichlet
(so some clusters are large, many small), each cluster with its own spread, plus a small
share of uniform background points. Queries are held out: drawn from the same mixture with
another seed, never stored in the index.

For each size, in one run and on the same data:
- exact search, ``faiss.IndexFlatIP`` (the baseline: its top-10 is the ground truth);
- every ``--specs`` of ``VectorIndex`` ("auto" builds ``HNSW32,Flat`` from 50k vectors on,
  "ivf" builds ``IVF{~4*sqrt(N)},Flat``), first with the index's default search setting,
  then with efSearch / nprobe tuned: the smallest value on the grid whose recall@10 reaches
  ``--target-recall`` on a separate set of *tuning* queries (so the reported recall, on the
  main queries, is not fitted to them).

recall@10 = |approximate top-10 ∩ exact top-10| / 10, averaged over queries. Queries/s are
the best of ``--repeats`` timed passes (after a warm-up pass) in each of two regimes, both
measured on the same indexes in the same run:
- *all at once*: the ``--queries`` queries in one call. Exact search's best case: one BLAS
  matrix product, compute-bound, reusing each database vector for every query; the
  approximate indexes gain little from batching (their work is per query, memory-bound);
- *1 at a time*: the first ``--small-batch-queries`` queries, one call each, as the
  service sees them (``--query-batches`` sets the list; 0 means all at once). faiss uses
  one thread per query here, for every index type alike.
Exact search is timed before and after the others and the better run is the baseline
every ratio uses (load drifts on a shared machine; this never flatters the other rows).
"speed ratio" (× exact) is queries/s over exact search's queries/s in the same regime.

Usage: python bench/search_speed.py [--sizes 100000,1000000] [--queries 2000]
       [--specs auto ivf] [--threads 2] [--target-recall 0.95]
       [--query-batches 0,1] [--small-batch-queries 200]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
from kmeans_speed import timed  # bench/ is the script directory
from segsearch.indexer.vector_index import VectorIndex

log = logging.getLogger("bench.search_speed")

GOAL_RECALL = 0.95
GOAL_SPEEDUP = 10.0
GOAL_SIZE = 1_000_000
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NPROBE_GRID = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass
class SearchBenchConfig:
    """What to measure; defaults are the issue's setting (D=64, 100k and 1M, 2000 queries)."""

    sizes: tuple[int, ...] = (100_000, 1_000_000)
    dim: int = 64
    classes: int = 50
    clusters: int = 1000
    background: float = 0.02
    queries: int = 2000
    tune_queries: int = 1000
    k: int = 10
    specs: tuple[str, ...] = ("auto", "ivf")
    target_recall: float = GOAL_RECALL
    repeats: int = 3
    query_batches: tuple[int, ...] = (0, 1)
    small_batch_queries: int = 200
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0


@dataclass
class Mixture:
    """Cluster centres `(C, D)` unit-norm, their weights `(C,)` and per-dimension spreads `(C,)`."""

    centers: np.ndarray
    weights: np.ndarray
    spreads: np.ndarray
    background: float


@dataclass
class Row:
    """One index at one search setting; `qps` and `exact_qps` are keyed by query batch (0: all)."""

    size: int
    method: str
    setting: str
    build_s: float
    recall: float
    qps: dict[int, float]
    exact_qps: dict[int, float] = field(default_factory=dict)

    @property
    def is_exact(self) -> bool:
        return self.setting.startswith("exact")

    def ratio(self, batch: int) -> float:
        return self.qps[batch] / self.exact_qps[batch]

    def meets_goal(self, batch: int) -> bool:
        return self.recall >= GOAL_RECALL and self.ratio(batch) >= GOAL_SPEEDUP


@dataclass
class SweepPoint:
    size: int
    method: str
    setting: str
    recall: float
    qps: float


def make_mixture(config: SearchBenchConfig) -> Mixture:
    """Two-level mixture: classes uniform on the sphere, clusters around them (cos ≈ 0.65).

    Per-dimension spreads in [0.05, 0.12] put points at cosine ≈ 0.7–0.93 from their
    cluster centre, so clusters overlap their neighbours inside a class, as segments of one
    class do; the flat Dirichlet weights make cluster sizes very uneven.
    """
    rng = np.random.default_rng(config.seed)
    classes = _unit(rng.standard_normal((config.classes, config.dim), dtype=np.float32))
    parent = rng.integers(0, config.classes, config.clusters)
    offsets = 0.15 * rng.standard_normal((config.clusters, config.dim), dtype=np.float32)
    centers = _unit(classes[parent] + offsets)
    weights = rng.dirichlet(np.ones(config.clusters))
    spreads = rng.uniform(0.05, 0.12, config.clusters).astype(np.float32)
    return Mixture(centers, weights, spreads, config.background)


def sample(mixture: Mixture, count: int, seed: int, chunk: int = 250_000) -> np.ndarray:
    """`count` unit-norm points `(count, D)` float32 from `mixture` (chunked to bound memory)."""
    rng = np.random.default_rng(seed)
    dim = mixture.centers.shape[1]
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        labels = rng.choice(len(mixture.weights), size=n, p=mixture.weights)
        noise = rng.standard_normal((n, dim), dtype=np.float32)
        points = mixture.centers[labels] + mixture.spreads[labels, None] * noise
        is_background = rng.random(n) < mixture.background
        points[is_background] = noise[is_background]  # uniform direction on the sphere
        out[start:start + n] = _unit(points)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k, for id matrices `(Q, k)`."""
    k = truth.shape[1]
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / k)


def batched_search(search, queries: np.ndarray, k: int, batch: int) -> np.ndarray:
    """Ids `(Q, k)` of `search(queries_chunk, k) -> (scores, ids)`, in chunks of `batch` (0: one)."""
    if batch <= 0:
        return search(queries, k)[1]
    return np.concatenate([search(queries[i:i + batch], k)[1] for i in range(0, len(queries), batch)])


def build_index(spec: str, base: np.ndarray) -> tuple[VectorIndex, float]:
    """A `VectorIndex(spec)` holding `base` under ids 0..N-1, and the seconds the add took."""
    index = VectorIndex(base.shape[1], spec)
    start = time.perf_counter()
    index.add(np.arange(len(base), dtype=np.int64), base)
    return index, time.perf_counter() - start


def _setting(index: VectorIndex) -> str:
    inner = index._index  # read-only peek, to report what the index really searches with
    if isinstance(inner, faiss.IndexIVF):
        return f"nprobe={inner.nprobe}/{inner.nlist}"
    if "HNSW" in index.factory:
        return f"efSearch={index.ef_search}"
    return "exact"


def _apply(index: VectorIndex, value: int) -> None:
    if isinstance(index._index, faiss.IndexIVF):
        index.set_search_params(nprobe=value)
    else:
        index.set_search_params(ef_search=value)


def _grid(index: VectorIndex) -> tuple[int, ...]:
    if isinstance(index._index, faiss.IndexIVF):
        return tuple(n for n in NPROBE_GRID if n <= index._index.nlist)
    if "HNSW" in index.factory:
        return EF_GRID
    return ()


def tune(index: VectorIndex, queries: np.ndarray, truth: np.ndarray, config: SearchBenchConfig,
         size: int, method: str) -> tuple[int | None, list[SweepPoint]]:
    """Smallest grid value whose recall@k on the tuning queries reaches the target.

    Walks the grid upwards and stops at the first hit (recall grows with efSearch / nprobe),
    so the sweep costs little; its queries/s are one pass, all queries at once. Returns
    (value or None when the grid never reaches the target, sweep).
    """
    points = []
    for value in _grid(index):
        _apply(index, value)
        start = time.perf_counter()
        ids = index.search(queries, config.k)[1]
        qps = len(queries) / (time.perf_counter() - start)
        points.append(SweepPoint(size, method, _setting(index), recall_at_k(ids, truth), qps))
        if points[-1].recall >= config.target_recall:
            return value, points
    return None, points


def throughput(search, queries: np.ndarray, batch: int, config: SearchBenchConfig) -> float:
    """Queries/s, best of `config.repeats` passes: all queries at once (batch 0), or the first
    `small_batch_queries` in calls of `batch`."""
    if batch > 0:
        queries = queries[:config.small_batch_queries]
    seconds, _ = timed(lambda: batched_search(search, queries, config.k, batch), config.repeats, lambda: None)
    return len(queries) / seconds


def measure(search, queries: np.ndarray, truth: np.ndarray | None,
            config: SearchBenchConfig) -> tuple[float, dict[int, float], np.ndarray]:
    """(recall@k vs `truth` (1.0 when None), {batch: queries/s}, ids `(Q, k)` of all queries)."""
    ids = search(queries, config.k)[1]
    recall = 1.0 if truth is None else recall_at_k(ids, truth)
    return recall, {batch: throughput(search, queries, batch, config) for batch in config.query_batches}, ids


def run_size(size: int, mixture: Mixture, queries: np.ndarray, tune_queries: np.ndarray,
             config: SearchBenchConfig) -> tuple[list[Row], list[SweepPoint]]:
    """All rows for one database size: exact, then each spec at its default and tuned setting."""
    base = sample(mixture, size, seed=config.seed + 1)
    start = time.perf_counter()
    exact = faiss.IndexFlatIP(config.dim)
    exact.add(base)
    exact_build = time.perf_counter() - start
    _, exact_qps, truth = measure(exact.search, queries, None, config)
    tune_truth = exact.search(tune_queries, config.k)[1]
    log.info("N=%d: exact %s queries/s", size, _format_qps(exact_qps))
    rows = [Row(size, "exact IndexFlatIP", "exact", exact_build, 1.0, exact_qps)]
    sweep: list[SweepPoint] = []
    for spec in config.specs:
        index, build_s = build_index(spec, base)
        method = f'"{spec}": {index.factory}'
        log.info("N=%d: built %s in %.1f s", size, method, build_s)
        recall, qps, _ = measure(index.search, queries, truth, config)
        rows.append(Row(size, method, _setting(index) + " (default)", build_s, recall, qps))
        chosen, points = tune(index, tune_queries, tune_truth, config, size, method)
        sweep.extend(points)
        if not points:
            continue  # exact at this size: nothing to tune
        if chosen is None:
            log.warning("N=%d %s: recall@%d %.3f < target at the largest grid value",
                        size, method, config.k, points[-1].recall)
        recall, qps, _ = measure(index.search, queries, truth, config)
        label = " (tuned)" if chosen is not None else " (grid max, target not reached)"
        rows.append(Row(size, method, _setting(index) + label, build_s, recall, qps))
        log.info("N=%d: %s %s: recall@%d %.4f, %s queries/s", size, method, _setting(index), config.k,
                 recall, _format_qps(qps))
    # Exact search again, after the others: on a shared machine load drifts, and the better
    # of both runs is the baseline every ratio uses (never flattering the approximate indexes).
    again = measure(exact.search, queries, None, config)[1]
    best = {batch: max(exact_qps[batch], again[batch]) for batch in config.query_batches}
    rows[0].qps = best
    for row in rows:
        row.exact_qps = best
    return rows, sweep


def run(config: SearchBenchConfig) -> tuple[list[Row], list[SweepPoint]]:
    faiss.omp_set_num_threads(config.threads)
    mixture = make_mixture(config)
    queries = sample(mixture, config.queries, seed=config.seed + 2)
    tune_queries = sample(mixture, config.tune_queries, seed=config.seed + 3)
    rows: list[Row] = []
    sweep: list[SweepPoint] = []
    for size in config.sizes:
        size_rows, size_sweep = run_size(size, mixture, queries, tune_queries, config)
        rows += size_rows
        sweep += size_sweep
    return rows, sweep


def regime(batch: int, config: SearchBenchConfig) -> str:
    if batch == 0:
        return f"all {config.queries} at once"
    return "1 at a time" if batch == 1 else f"batches of {batch}"


def print_tables(rows: list[Row], sweep: list[SweepPoint], config: SearchBenchConfig) -> None:
    batches = config.query_batches
    print(f"\n### Search: {config.queries} held-out queries, k={config.k}, D={config.dim}, "
          f"{config.clusters} clusters in {config.classes} classes, {config.threads} faiss threads\n")
    header = "| N | method | search setting | build s | recall@10 |"
    align = "|---:|---|---|---:|---:|"
    for batch in batches:
        header += f" queries/s ({regime(batch, config)}) | × exact |"
        align += "---:|---:|"
    header += " goal met (" + " / ".join(regime(b, config) for b in batches) + ") |"
    print(header)
    print(align + "---|")
    for row in rows:
        line = f"| {row.size:,} | {row.method} | {row.setting} | {row.build_s:.1f} | {row.recall:.4f} |"
        for batch in batches:
            line += f" {row.qps[batch]:,.0f} | {row.ratio(batch):.1f}× |"
        goal = "—" if row.is_exact else " / ".join("yes" if row.meets_goal(b) else "no" for b in batches)
        print(line + f" {goal} |")
    print(f"\ngoal: recall@10 ≥ {GOAL_RECALL} at ≥ {GOAL_SPEEDUP:.0f}× exact queries/s at "
          f"{GOAL_SIZE:,} vectors. "
          f"'1 at a time' times the first {config.small_batch_queries} queries.")
    print(f"\n#### Tuning sweep ({config.tune_queries} separate tuning queries, all at once, one pass; stops "
          f"at the first setting with recall@10 ≥ {config.target_recall})\n")
    print("| N | method | setting | recall@10 | queries/s |")
    print("|---:|---|---|---:|---:|")
    for point in sweep:
        print(f"| {point.size:,} | {point.method} | {point.setting} | {point.recall:.4f} "
              f"| {point.qps:,.0f} |")
    print()
    print(verdict(rows, config))


def verdict(rows: list[Row], config: SearchBenchConfig) -> str:
    """One honest line per index row at the largest size run (the goal is stated at 1M)."""
    largest = max(row.size for row in rows)
    lines = []
    if largest < GOAL_SIZE:
        lines.append(f"(largest size run is {largest:,}, below the goal's {GOAL_SIZE:,})")
    for row in rows:
        if row.size != largest or row.is_exact:
            continue
        parts = [f"{regime(b, config)}: {row.ratio(b):.1f}× exact -> goal "
                 f"{'MET' if row.meets_goal(b) else 'NOT met'}" for b in config.query_batches]
        lines.append(f"- N={largest:,} {row.method}, {row.setting}: recall@10 {row.recall:.3f}; "
                     + "; ".join(parts))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The search options; `prefix` lets a driver (bench/index_speed.py) namespace them."""
    defaults = SearchBenchConfig()
    parser.add_argument(f"--{prefix}sizes", default=",".join(str(s) for s in defaults.sizes),
                        help="comma-separated database sizes")
    parser.add_argument(f"--{prefix}queries", type=int, default=defaults.queries)
    parser.add_argument(f"--{prefix}tune-queries", type=int, default=defaults.tune_queries)
    parser.add_argument(f"--{prefix}specs", nargs="+", default=list(defaults.specs),
                        help='VectorIndex specs to compare with exact search (e.g. auto ivf "IVF1024,Flat")')
    parser.add_argument(f"--{prefix}clusters", type=int, default=defaults.clusters)
    parser.add_argument(f"--{prefix}classes", type=int, default=defaults.classes)
    parser.add_argument(f"--{prefix}target-recall", type=float, default=defaults.target_recall)
    parser.add_argument(f"--{prefix}repeats", type=int, default=defaults.repeats)
    parser.add_argument(f"--{prefix}query-batches", default=",".join(str(b) for b in defaults.query_batches),
                        help="comma-separated queries per search call to time (0: all at once)")
    parser.add_argument(f"--{prefix}small-batch-queries", type=int, default=defaults.small_batch_queries,
                        help="queries timed in the regimes with a batch > 0")


def config_from_args(args: argparse.Namespace, threads: int, prefix: str = "") -> SearchBenchConfig:
    def get(name: str):
        return getattr(args, (prefix + name).replace("-", "_"))

    return SearchBenchConfig(
        sizes=tuple(int(s) for s in get("sizes").split(",") if s),
        queries=get("queries"), tune_queries=get("tune-queries"), specs=tuple(get("specs")),
        clusters=get("clusters"), classes=get("classes"), target_recall=get("target-recall"),
        repeats=get("repeats"), query_batches=tuple(int(b) for b in get("query-batches").split(",") if b),
        small_batch_queries=get("small-batch-queries"), threads=threads,
    )


def _format_qps(qps: dict[int, float]) -> str:
    return ", ".join(f"{value:,.0f} (batch {batch or 'all'})" for batch, value in qps.items())


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="faiss OpenMP threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_args(args, args.threads)
    start = time.perf_counter()
    rows, sweep = run(config)
    print_tables(rows, sweep, config)
    print(f"\n(total {time.perf_counter() - start:.0f} s; load average at the end {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
