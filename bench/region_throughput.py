"""gRPC region-query throughput with the server's image cache off ("before") and on ("now").

The interactive case: a user asks about several regions of one image. `--images` query
images (the retrieval benchmark's query mosaics, never indexed), each asked `--regions`
times with a different box, in image order, by `--clients` client threads that take the
next query from a shared queue; through a real `segsearch serve` (a child process, the
shipped model, the retrieval benchmark's index) started twice on the same index: with
`--embedding-cache-mib 0` (every query decodes, embeds and segments its image) and with the
default cache (the first box of an image does that; the next ones read its cached region
level). Both runs must return the same hits for every query. Reported: queries per second,
p50 and p99 per call, and the ratio.

Needs `python bench/retrieval_quality.py` run once (its data folder and index).

Usage: python bench/region_throughput.py [--images 12] [--regions 6] [--clients 2]
"""
from __future__ import annotations

import argparse
import queue
import threading
import time
from pathlib import Path

import numpy as np

from segsearch.service.client import SegsearchClient
from segsearch.testing.serve_process import ServeProcess

BENCH = Path(__file__).resolve().parent
DATA = BENCH / "out" / "retrieval" / "data-256px-144i-48q-s11"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--regions", type=int, default=6, help="boxes asked per image")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--data", default=str(DATA), help="the retrieval benchmark's data folder")
    parser.add_argument("--index", default="", help="an index to serve (default: the newest of that bench's runs)")
    parser.add_argument("--out", default=str(BENCH / "out" / "region_throughput"))
    return parser.parse_args()


def workload(data: Path, images: int, regions: int, seed: int = 0) -> list[tuple[bytes, tuple[int, int, int, int]]]:
    """(image bytes, box) in image order: `regions` random boxes of a quarter to a half side."""
    rng = np.random.default_rng(seed)
    paths = sorted((data / "query").glob("*.png"))[:images]
    if not paths:
        raise SystemExit(f"no query images in {data}; run bench/retrieval_quality.py first")
    calls = []
    for path in paths:
        payload, side = path.read_bytes(), 256
        for _ in range(regions):
            width, height = rng.integers(side // 4, side // 2, size=2)
            x0, y0 = rng.integers(0, side - width), rng.integers(0, side - height)
            calls.append((payload, (int(x0), int(y0), int(x0 + width), int(y0 + height))))
    return calls


def run(address: str, calls: list, clients: int) -> tuple[float, np.ndarray, list]:
    """(wall seconds, per-call seconds, hits per call) with `clients` threads on one queue."""
    todo: queue.Queue = queue.Queue()
    for number, call in enumerate(calls):
        todo.put((number, call))
    seconds, answers = np.zeros(len(calls)), [None] * len(calls)

    def worker() -> None:
        with SegsearchClient(address, timeout=300) as client:
            while True:
                try:
                    number, (payload, box) = todo.get_nowait()
                except queue.Empty:
                    return
                started = time.perf_counter()
                response = client.search_box(payload, box, top_k=10)
                seconds[number] = time.perf_counter() - started
                answers[number] = [(hit.segment_id, round(hit.score, 4)) for hit in response.hits]

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, seconds, answers


def main() -> int:
    args = parse_args()
    data = Path(args.data)
    index = Path(args.index) if args.index else max((data.parent / "runs").glob("*/index"), key=lambda p: p.stat().st_mtime)
    calls = workload(data, args.images, args.regions)
    rows, answers = [], []
    for name, extra in (("cache off (before)", ["--embedding-cache-mib", "0"]), ("cache on (now)", [])):
        server = ServeProcess(index, None, Path(args.out) / name.split()[1], extra=extra)
        try:
            with SegsearchClient(server.address, timeout=300) as client:  # warm-up: load the model
                client.search_box(calls[-1][0], (0, 0, 64, 64), top_k=1)
            wall, seconds, hits = run(server.address, calls, args.clients)
        finally:
            server.stop()
        rows.append((name, len(calls) / wall, np.percentile(seconds, 50) * 1000, np.percentile(seconds, 99) * 1000))
        answers.append(hits)
    if answers[0] != answers[1]:
        raise SystemExit("the cached server answered some query differently from the uncached one")
    print(f"\n{args.images} images x {args.regions} boxes = {len(calls)} box queries, {args.clients} clients, "
          f"index {index}; identical hits with and without the cache\n")
    print("| server | queries/s | p50 ms | p99 ms | × before |\n|---|---:|---:|---:|---:|")
    for name, qps, p50, p99 in rows:
        print(f"| {name} | {qps:.2f} | {p50:.0f} | {p99:.0f} | {qps / rows[0][1]:.1f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
