"""Distributed indexing throughput: one process vs Dask with 1 and 2 worker processes.

Indexes the same corpus (``--images`` texture mosaics of ``--size`` px, PNG) with
- ``index_corpus`` in this process, once with torch's and faiss's default threads (all
  cores: what `segsearch index` does) and once limited to one thread (one core, like one
  Dask worker); ``--threads``;
- ``index_distributed`` on a loopback ``LocalCluster`` of 1 and of 2 worker processes (one
  thread each), one shard per worker, then the merge;
and prints a markdown table: images/s of the indexing phase (shards done, cross-shard
duplicates dropped), its ratio to the single process, the merge seconds, and the total.

Worker processes are started and warmed up (torch and segsearch imported) before the clock
starts; the cluster start is printed apart. Each worker still loads the checkpoint and builds
the model inside its task (that is part of a shard's cost, as for the single process).
The merged index is checked against the single-process one (same images and segment count).

The model: without ``--checkpoint``, a checkpoint of the ``--backbone`` architecture (default
``small``; ``vgg16`` is the default model, slow on a CPU) with an untrained head and a random
label bank (bench/index_speed.py's `build_checkpoint`: speed does not depend on training).

Usage: python bench/dask_index.py [--images 96] [--size 128] [--backbone small] [--workers 1 2]
       [--repeat 2]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import torch
from index_speed import build_checkpoint  # bench/ is the script directory
from PIL import Image
from segsearch.indexer.dask_runner import DaskConfig, index_distributed
from segsearch.indexer.index_store import IndexStore
from segsearch.indexer.pipeline import IndexConfig, index_corpus
from segsearch.spml.segmenter import SegmenterConfig
from segsearch.trainer.mosaic import MosaicConfig, TextureMosaic

log = logging.getLogger("bench.dask_index")


@dataclass
class Row:
    method: str
    workers: int
    images: int
    index_seconds: float
    merge_seconds: float | None = None
    total_seconds: float | None = None
    segments: int = 0

    @property
    def per_second(self) -> float:
        return self.images / self.index_seconds


def write_corpus(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True)
    mosaic = TextureMosaic(MosaicConfig(size=size, num_images=count, seed=3, split="test"))
    for n in range(count):
        Image.fromarray(mosaic[n].image).save(folder / f"mosaic{n:05d}.png")


def single_process(corpus: Path, checkpoint: Path, out: Path, config: IndexConfig, threads: int,
                   repeat: int) -> Row:
    """The best of `repeat` runs, each into a new index directory. `threads` 0: torch's and
    faiss's defaults (all cores, what `segsearch index` uses); else both limited to it, like
    a Dask worker (whose nanny also sets OMP/MKL/OPENBLAS_NUM_THREADS=1)."""
    previous = torch.get_num_threads(), faiss.omp_get_max_threads()
    if threads:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    label = (f"single process ({torch.get_num_threads()} torch/faiss threads)" if not threads
             else f"single process, limited to {threads} thread{'s' if threads > 1 else ''}")
    rows = []
    try:
        for attempt in range(repeat):
            start = time.perf_counter()
            summary = index_corpus(corpus, checkpoint, out / f"{threads}-{attempt}", config)
            seconds = time.perf_counter() - start
            rows.append(Row(label, 1, summary.images_indexed, seconds, None, seconds, summary.index_segments))
    finally:
        torch.set_num_threads(previous[0])
        faiss.omp_set_num_threads(previous[1])
    return min(rows, key=lambda row: row.index_seconds)


def dask_run(corpus: Path, checkpoint: Path, out: Path, config: IndexConfig, workers: int, repeat: int) -> Row:
    """The best of `repeat` runs on one cluster, each into a new output directory."""
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    rows = []
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
        client.run(_warm_up)
        log.info("cluster of %d workers started and warmed up in %.1f s", workers, time.perf_counter() - start)
        for attempt in range(repeat):
            summary = index_distributed(corpus, checkpoint, out / str(attempt), config, DaskConfig(), client=client)
            merge = summary.merge.seconds if summary.merge else 0.0
            rows.append(Row(f"Dask LocalCluster, {workers} worker process{'es' if workers > 1 else ''}", workers,
                            summary.images_indexed, summary.index_seconds, merge, summary.seconds,
                            summary.index_segments))
    return min(rows, key=lambda row: row.index_seconds)


def _warm_up() -> None:
    import segsearch.indexer.dask_runner  # noqa: F401 (imports torch, faiss, the pipeline)


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    base = rows[0]
    print(f"\n### Distributed indexing: {base.images} mosaics of {args.size}x{args.size}, {args.backbone} "
          f"model, CPU, batch {args.batch}, {base.segments} segments, best of {args.repeat}\n")
    print("| method | workers | images | index s | images/s | vs single process | merge s | total s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        merge = "–" if row.merge_seconds is None else f"{row.merge_seconds:.2f}"
        print(f"| {row.method} | {row.workers} | {row.images} | {row.index_seconds:.1f} | {row.per_second:.2f} "
              f"| {row.per_second / base.per_second:.2f}× | {merge} | {row.total_seconds:.1f} |")


def check_same(single: Path, merged: Path) -> None:
    with IndexStore.open(single, read_only=True) as a, IndexStore.open(merged, read_only=True) as b:
        same = (a.meta.num_images, a.meta.num_segments) == (b.meta.num_images, b.meta.num_segments)
        problems = b.verify()
    print(f"\nmerged index {'matches' if same else 'DIFFERS FROM'} the single-process one in images and "
          f"segments; verify: {'OK' if not problems else problems[:3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=128, help="image side (also the network input side)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backbone", default="small", choices=("small", "vgg16"))
    parser.add_argument("--checkpoint", default="", help="a checkpoint (default: build one)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Dask cluster sizes to run")
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1],
                        help="single-process rows: torch+faiss threads, 0 = their defaults (all cores)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is shown")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = IndexConfig(batch_size=args.batch, segmenter=SegmenterConfig(embed_size=args.size), progress=False,
                         decode_workers=1, device="cpu")
    with tempfile.TemporaryDirectory(prefix="segsearch-dask-bench-") as tmp:
        root = Path(tmp)
        write_corpus(root / "corpus", args.images, args.size)
        checkpoint = Path(args.checkpoint) if args.checkpoint else root / "model.pt"
        if not args.checkpoint:
            build_checkpoint(checkpoint, args.backbone)
        rows = [single_process(root / "corpus", checkpoint, root / "single", config, threads, args.repeat)
                for threads in args.threads]
        for workers in args.workers:
            rows.append(dask_run(root / "corpus", checkpoint, root / f"dask{workers}", config, workers, args.repeat))
        print_table(rows, args)
        check_same(root / "single" / f"{args.threads[0]}-0", root / f"dask{args.workers[-1]}" / "0")


if __name__ == "__main__":
    main()
