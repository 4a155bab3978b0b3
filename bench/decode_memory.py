"""Memory of concurrent large decodes: a real `segsearch serve` child gets N Segment calls at
once, each a small PNG that decodes to a ~39 Mpx image; its RSS is sampled before, during and
after, with the decode budget at its default and with the budget off (the behaviour before it).

    python bench/decode_memory.py [--clients 8] [--megapixels 39]

Prints one row per setting: peak and after-burst RSS, their growth over the idle server, the
status codes, and the ratio to the unbudgeted server in the same run.
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from PIL import Image

from segsearch.service.client import SegsearchClient
from segsearch.service.config import MiB
from segsearch.testing.serve_process import ServeProcess
from segsearch.testing.soak import RssSampler
from segsearch.testing.tiny_index import build_tiny_index, train_tiny_checkpoint, write_tiny_corpus

UNBUDGETED = str(10**12)  # --decode-budget-pixels high enough never to wait: the old server


@dataclass
class Burst:
    setting: str
    idle_mib: float
    peak_mib: float
    after_mib: float
    codes: Counter
    seconds: float

    def row(self, reference: "Burst | None") -> str:
        growth = self.peak_mib - self.idle_mib
        ratio = f"{growth / (reference.peak_mib - reference.idle_mib):.2f}x" if reference else "1.00x"
        return (f"| {self.setting} | {self.idle_mib:.0f} | {self.peak_mib:.0f} | {growth:+.0f} | {ratio} | "
                f"{self.after_mib:.0f} | {self.after_mib - self.idle_mib:+.0f} | {dict(self.codes)} | "
                f"{self.seconds:.1f} |")


def big_png(megapixels: float) -> bytes:
    """A grey gradient of `megapixels` (4:3) as a PNG: small to send, large to decode."""
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(megapixels * 1e6 / width)
    image = Image.linear_gradient("L").resize((width, height), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def burst(server: ServeProcess, data: bytes, clients: int, setting: str) -> Burst:
    with SegsearchClient(server.address, timeout=120) as client:
        client.info()
        time.sleep(1.0)
        idle = server.rss_bytes()

        def one(_):
            try:
                client.segment(data, timeout=120)
                return "OK"
            except grpc.RpcError as error:
                return error.code().name

        started = time.monotonic()
        with RssSampler(server.pid, every=0.05) as sampler, ThreadPoolExecutor(clients) as pool:
            codes = Counter(pool.map(one, range(clients)))
        seconds = time.monotonic() - started
        time.sleep(2.0)
        after = server.rss_bytes()
    peak = max(rss for _, rss in sampler.samples)
    return Burst(setting, idle / MiB, peak / MiB, after / MiB, codes, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent Segment calls (default: %(default)s)")
    parser.add_argument("--megapixels", type=float, default=39.0, help="decoded size of each image (default: %(default)s)")
    args = parser.parse_args(argv)
    data = big_png(args.megapixels)
    print(f"one image: {len(data) / 1024:.0f} KiB of PNG, {args.megapixels:g} Mpx; {args.clients} at once")
    rows: list[Burst] = []
    with tempfile.TemporaryDirectory(prefix="decode-memory-") as folder:
        root = Path(folder)
        checkpoint = train_tiny_checkpoint(root / "model")
        build_tiny_index(write_tiny_corpus(root / "corpus"), checkpoint, root / "template")
        for setting, extra in (("budget off (before)", ["--decode-budget-pixels", UNBUDGETED]),
                               ("default budget", [])):
            index_dir = root / f"index-{len(rows)}"
            shutil.copytree(root / "template", index_dir, ignore=shutil.ignore_patterns("writer.lock"))
            server = ServeProcess(index_dir, checkpoint, root / f"logs-{len(rows)}",
                                  extra=["--max-concurrent", str(args.clients), *extra])
            try:
                rows.append(burst(server, data, args.clients, setting))
            finally:
                server.stop()
    print("| server | idle RSS MiB | peak MiB | peak growth | growth vs before | 2 s after MiB | "
          "after growth | codes | burst s |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for row in rows:
        print(row.row(rows[0] if row is not rows[0] else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
