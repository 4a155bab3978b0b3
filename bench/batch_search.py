"""Batch search throughput: one `SearchSimilarBatch` of B queries vs B `SearchSimilar` calls.

Both through a real server (a child process on 127.0.0.1) over the synthetic index of
`bench/service_latency.py` (same builder and cache, `--size` segments of its real tiny
checkpoint). The queries are raw vectors (`embedding`): the prototypes of random stored
segments, so both paths do the same work per query (no LMDB lookup of a query's own
segment), at a `--level` of "fine" (the synthetic index has no regions, so every level
returns the same hits). For each round, the same B queries are sent as B sequential single
calls from one client, and as one batch call; every batch answer must equal its single call's
hits (ids and scores), or the bench fails. Reported: queries per second of each path and
their ratio, and the p50 time of one round.

Why a batch is faster: one request and one response instead of B (gRPC and protobuf per
call), and `search_many` runs the FAISS searches of the B vectors in one call.

Usage: python bench/batch_search.py [--size 100000] [--batch 64] [--rounds 30] [--threads 0]
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from service_latency import OUT, LatencyConfig, ServerProcess, ensure_checkpoint, ensure_index  # bench/ on sys.path

from segsearch.service.client import SegsearchClient, search_request

log = logging.getLogger("batch_search")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=100_000, help="segments in the synthetic index")
    parser.add_argument("--spec", default="auto", help="index type of the synthetic index")
    parser.add_argument("--batch", type=int, default=64, help="queries per batch (the server allows 64)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch/faiss threads in the server (0: defaults)")
    parser.add_argument("--out", default=str(OUT))
    return parser.parse_args()


def query_vectors(client: SegsearchClient, first_id: int, last_id: int, count: int, seed: int) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(first_id, last_id + 1, size=count)
    return [list(client.get_segment(int(segment_id), include_prototype=True).prototype) for segment_id in ids]


def hits(response) -> list[tuple[int, float]]:
    return [(hit.segment_id, round(hit.score, 5)) for hit in response.hits]


def run_rounds(client: SegsearchClient, vectors: list[list[float]], batch: int, rounds: int, top_k: int):
    """(single-call seconds per round, batch-call seconds per round)."""
    single_times, batch_times = [], []
    for number in range(rounds):
        chunk = vectors[number * batch:(number + 1) * batch]
        requests = [search_request(embedding=vector, top_k=top_k, level="fine") for vector in chunk]
        started = time.perf_counter()
        singles = [client.search(request) for request in requests]
        single_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        batched = client.search_batch(requests)
        batch_times.append(time.perf_counter() - started)
        for position, (one, many) in enumerate(zip(singles, batched, strict=True)):
            if hits(one) != hits(many):
                raise SystemExit(f"round {number}, query {position}: the batch answer differs from its single call")
    return np.asarray(single_times), np.asarray(batch_times)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args()
    config = LatencyConfig(sizes=(args.size,), spec=args.spec, threads=args.threads, out=Path(args.out))
    checkpoint = ensure_checkpoint(config.out)
    index = ensure_index(config, args.size, checkpoint)
    server = ServerProcess(index.path, checkpoint, max_concurrent=8, threads=args.threads)
    try:
        with SegsearchClient(server.address, timeout=60) as client:
            vectors = query_vectors(client, index.first_id, index.last_id, args.batch * (args.rounds + 1), seed=0)
            run_rounds(client, vectors[-args.batch:], args.batch, 1, args.top_k)  # warm-up
            singles, batches = run_rounds(client, vectors, args.batch, args.rounds, args.top_k)
    finally:
        server.stop()
    queries = args.batch * args.rounds
    single_qps, batch_qps = queries / singles.sum(), queries / batches.sum()
    print(f"\n{args.size:,} segments ({index.factory}), {args.rounds} rounds of {args.batch} queries, top_k "
          f"{args.top_k}, one client; every batch answer equal to its single call's\n")
    print("| path | queries/s | p50 ms per round of %d | × single calls |" % args.batch)
    print("|---|---:|---:|---:|")
    print(f"| {args.batch} SearchSimilar calls, one after another | {single_qps:,.0f} | "
          f"{np.median(singles) * 1000:.1f} | 1.0× |")
    print(f"| one SearchSimilarBatch of {args.batch} | {batch_qps:,.0f} | {np.median(batches) * 1000:.1f} | "
          f"{batch_qps / single_qps:.1f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
