"""Hostile input at volume: N generated requests against a real `segsearch serve` child.

The requests come from `segsearch/testing/fuzz_strategies.py` (hypothesis strategies over every
field the server decodes: hostile image files, masks, regions, filters, top_k, min_score,
ids, IndexImages streams, DeleteImages lists, undecodable bytes), sent one after the other
on 127.0.0.1, each with a deadline (`--timeout`), so a hang shows as DEADLINE_EXCEEDED.

Printed: requests sent, the status code histogram, every unexpected answer (a status the
method may not give, or a SearchSimilar answer that contradicts its request), the slowest
call, the server's RSS at start, after the warm-up (one pass over the expensive inputs),
at the end, and the growth against `--rss-bound-mib`, whether the server still serves
(health SERVING and a normal box query with hits), and the wall time. Exit status 1 if
anything unexpected happened.

Without --index/--model it builds the tests' tiny model and index in a temporary folder
(a few seconds): a checkpoint trained for 3 steps, 6 images at max side 128, embed size 96.

    .venv/bin/python bench/fuzz_service.py --requests 10000
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from segsearch.testing.fuzz_strategies import FuzzClient, Target, fuzz, warm_up
from segsearch.service.client import SegsearchClient
from segsearch.testing import tiny_index
from segsearch.testing.serve_process import ServeProcess
from segsearch.testing.tiny_index import train_tiny_checkpoint, write_tiny_corpus

MiB = 1 << 20


def build_tiny_index(root: Path) -> tuple[Path, Path, Path]:
    """(checkpoint, index_dir, query image): the service tests' tiny model and index."""
    checkpoint = train_tiny_checkpoint(root / "model")
    corpus = write_tiny_corpus(root / "corpus")
    tiny_index.build_tiny_index(corpus, checkpoint, root / "index")
    return checkpoint, root / "index", corpus / tiny_index.PHOTO


def still_serving(client: SegsearchClient, query_image: Path | None) -> bool:
    if client.health() != "SERVING":
        return False
    if query_image is None:
        return client.info().num_segments > 0
    return bool(client.search_box(query_image.read_bytes(), (0, 0, 64, 64), top_k=3).hits)


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="fuzz-service-") as folder:
        root = Path(folder)
        if args.index and args.model:
            checkpoint, template, query_image = Path(args.model), Path(args.index), None
        else:
            checkpoint, template, query_image = build_tiny_index(root)
        index_dir = root / "served-index"
        shutil.copytree(template, index_dir, ignore=shutil.ignore_patterns("writer.lock"))
        started = time.monotonic()
        server = ServeProcess(index_dir, checkpoint, root / "logs")
        try:
            return _fuzz_server(args, server, query_image, started)
        finally:
            server.stop()


def _fuzz_server(args, server: ServeProcess, query_image: Path | None, started: float) -> dict:
    rss_start = server.rss_bytes()
    with SegsearchClient(server.address, timeout=args.timeout) as client:
        info = client.info()
        warm_up(client)
        rss_warm = server.rss_bytes()
        fuzz_client = FuzzClient(server.address)
        fuzz_started = time.monotonic()
        try:
            report = fuzz(fuzz_client, Target(tuple(info.label_names), info.model_version), args.requests,
                          timeout=args.timeout, seed=args.seed, max_top_k=info.max_top_k)
        finally:
            fuzz_client.close()
        fuzz_seconds = time.monotonic() - fuzz_started
        rss_end = server.rss_bytes()
        serving = server.alive() and still_serving(client, query_image)
    growth = rss_end - rss_warm
    return {
        "requests": report.requests, "codes": dict(sorted(report.codes.items())),
        "unexpected": report.problems, "slowest_call_s": round(report.slowest, 3),
        "rss_start_mib": round(rss_start / MiB, 1), "rss_after_warmup_mib": round(rss_warm / MiB, 1),
        "rss_end_mib": round(rss_end / MiB, 1), "rss_growth_mib": round(growth / MiB, 1),
        "rss_bound_mib": args.rss_bound_mib, "rss_within_bound": growth <= args.rss_bound_mib * MiB,
        "still_serving": serving, "fuzz_seconds": round(fuzz_seconds, 1),
        "wall_seconds": round(time.monotonic() - started, 1), "seed": args.seed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="generated requests (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=20.0, help="deadline per call, s (default: %(default)s)")
    parser.add_argument("--rss-bound-mib", type=float, default=96.0,
                        help="allowed RSS growth after the warm-up (default: %(default)s)")
    parser.add_argument("--index", help="an index to serve (a copy is used); with --model")
    parser.add_argument("--model", help="the checkpoint the index was built with")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    result = run(args)
    for key, value in result.items():
        if key != "unexpected":
            print(f"{key:>22}: {value}")
    print(f"{'unexpected':>22}: {len(result['unexpected'])}")
    for problem in result["unexpected"][:50]:
        print(f"    {problem}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = not result["unexpected"] and result["still_serving"] and result["rss_within_bound"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
