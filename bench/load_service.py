"""Load and overload of a real `segsearch serve`: sustained rate, 4x overload, recovery, soak.

The server is `segsearch serve` in a child process (its own GIL) on 127.0.0.1, with its
defaults (max_concurrent 8, no batching on CPU) unless flags say otherwise; the load
generator (`segsearch.service.loadgen`, open loop) runs in this process.

Index: made by the indexer (`index_corpus`, default settings) from ``--images`` mosaic
images of 128 px, with a tiny real checkpoint (`service_latency.ensure_checkpoint`);
cached under `bench/out/load_service/`.

Phases (open loop, Poisson arrivals, at most ``--clients`` calls in flight):

1. **ramp**: offered rates ``--start-rate`` x ``--step``^i for ``--step-seconds`` each; a
   step *holds* when p99 <= ``--p99-target-ms`` (default 50 ms, search by id), every call
   sent is answered OK and the client sent >= 98% of the offered requests on time. A step
   that does not hold is tried once more; the ramp stops when it fails again, and the
   sustained rate is the highest that held.
2. **sustained**: that rate for ``--phase-seconds``.
3. **overload**: 4x that rate (``--overload``): the server should shed with
   RESOURCE_EXHAUSTED (its concurrency limit) and keep answering health checks.
4. **cool-down**: the sustained rate again, reported in two halves (the first starts right
   after the overload); recovered when the second half holds the target again.

A health prober (10 checks/s, 1 s deadline, its own connection) runs through phases 2-4.

Soak (``--soak-minutes M``, instead of phases 2-4; after the ramp unless ``--soak-rate`` is
given): M minutes at the sustained (or given) rate in windows of ``--window-seconds``,
the server's RSS (psutil) sampled every ``--rss-every`` s. Growth = max RSS after the
warm-up (the first min(60 s, M/5)) minus RSS at the end of the warm-up; bound
``--rss-bound-mib`` (default 50 MiB).

Usage: python bench/load_service.py [--images 500] [--region-fraction 0] [--soak-minutes 0]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from segsearch.indexer.index_store import IndexStore
from segsearch.indexer.pipeline import IndexConfig, index_corpus
from segsearch.service.loadgen import HealthProbe, LoadConfig, LoadResult, ProbeResult, RequestMix, run_load
from segsearch.testing.serve_process import ServeProcess
from segsearch.testing.soak import SoakResult, soak
from segsearch.trainer.mosaic import MosaicConfig, TextureMosaic

log = logging.getLogger("bench.load_service")

OUT = Path(__file__).resolve().parent / "out" / "load_service"
MiB = 1 << 20
IMAGE_SIZE = 128
QUERY_IMAGES = 8
MIN_SENT = 0.98  # share of the offered requests the client must send on time for a step to hold


# ---- the server as a child process ---------------------------------------------------------


def start_server(index_dir: Path, checkpoint: Path, log_dir: Path, max_concurrent: int = 8) -> ServeProcess:
    """`segsearch serve` with the bench's limit and a short drain, in its own process."""
    return ServeProcess(index_dir, checkpoint, log_dir,
                        extra=["--max-concurrent", str(max_concurrent), "--grace", "5"], start_timeout=180.0)


# ---- index and requests --------------------------------------------------------------------


def mosaic_pixels(count: int, seed: int, split: str = "train") -> list[np.ndarray]:
    """`count` RGB mosaic images `(128, 128, 3)` uint8."""
    mosaic = TextureMosaic(MosaicConfig(size=IMAGE_SIZE, num_images=count, seed=seed, split=split))
    return [mosaic[i].image for i in range(count)]


def ensure_mosaic_index(out: Path, checkpoint: Path, images: int) -> Path:
    """An index of `images` mosaic images built by the indexer (cached; rebuilt if incomplete)."""
    index_dir = out / f"index-mosaic-{images}"
    marker = index_dir / "load_bench.json"
    if marker.exists() and json.loads(marker.read_text()).get("checkpoint") == str(checkpoint):
        return index_dir
    corpus = out / f"corpus-{images}"
    corpus.mkdir(parents=True, exist_ok=True)
    for number, pixels in enumerate(mosaic_pixels(images, seed=3)):
        path = corpus / f"mosaic{number:05d}.png"
        if not path.exists():
            Image.fromarray(pixels).save(path)
    started = time.perf_counter()
    summary = index_corpus(corpus, checkpoint, index_dir, IndexConfig(progress=False))
    log.info("indexed %d images in %.0f s", summary.images_indexed, time.perf_counter() - started)
    marker.write_text(json.dumps({"checkpoint": str(checkpoint), "images": images}) + "\n")
    return index_dir


def stored_segment_ids(index_dir: Path) -> np.ndarray:
    """The ids in the index `(N,)` (read-only open: no writer lock)."""
    store = IndexStore.open(index_dir, read_only=True)
    try:
        return store.segment_ids()[0]
    finally:
        store.close()


def request_mix(index_dir: Path, region_fraction: float, top_k: int) -> RequestMix:
    """Search by the index's segment ids, and by boxes on mosaic test images (not indexed)."""
    pixels = mosaic_pixels(QUERY_IMAGES, seed=7, split="test") if region_fraction > 0 else []
    return RequestMix.with_images(stored_segment_ids(index_dir), pixels, region_fraction, top_k)


# ---- the phases --------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    images: int = 500
    region_fraction: float = 0.0
    top_k: int = 10
    p99_target_ms: float = 50.0
    start_rate: float = 50.0
    step: float = 1.3
    max_steps: int = 14
    step_seconds: float = 6.0
    phase_seconds: float = 15.0
    overload: float = 4.0
    clients: int = 64  # open-loop slots: most calls in flight at once
    channels: int = 8
    timeout: float = 2.0
    max_concurrent: int = 8
    soak_minutes: float = 0.0
    soak_rate: float = -1.0  # < 0: the sustained rate found by the ramp
    window_seconds: float = 10.0
    rss_every: float = 5.0
    rss_bound_mib: float = 50.0
    out: Path = OUT
    seed: int = 0

    def load(self, rate: float, seconds: float, seed: int) -> LoadConfig:
        return LoadConfig(mode="open", clients=self.clients, rate=rate, requests=1 << 30, seconds=seconds,
                          timeout=self.timeout, channels=self.channels, seed=self.seed + seed)


@dataclass
class Phase:
    name: str
    result: LoadResult
    probe: ProbeResult | None = None
    holds: bool = False


def holds(result: LoadResult, target_ms: float) -> bool:
    """p99 within target, every call sent answered OK, and the client sent >= 98% of the offered
    requests on time (on a busy machine its dispatcher can be descheduled past its slack)."""
    offered = len(result.calls) + sum(result.missed.values())
    return (result.percentile(99) <= target_ms and result.codes["OK"] == len(result.calls) > 0
            and len(result.calls) >= MIN_SENT * offered)


def ramp(server: ServeProcess, mix: RequestMix, config: BenchConfig) -> tuple[list[Phase], float]:
    """Rising offered rates until one does not hold twice in a row (a step that fails is tried
    once more: noise from other jobs); the highest rate that held (0: none)."""
    phases, sustained, rate, retried = [], 0.0, config.start_rate, False
    for step in range(config.max_steps):
        result = run_load(server.address, mix, config.load(rate, config.step_seconds, seed=step))
        ok = holds(result, config.p99_target_ms)
        phases.append(Phase(f"ramp {step + 1}{' (again)' if retried else ''}", result, holds=ok))
        log.info("ramp %.0f q/s: %s -> %s", rate, result.summary(), "holds" if ok else "does not hold")
        if ok:
            sustained, rate, retried = rate, rate * config.step, False
        elif retried:
            break
        else:
            retried = True
    return phases, sustained


def probed(name: str, server: ServeProcess, mix: RequestMix, load: LoadConfig, target_ms: float) -> Phase:
    with HealthProbe(server.address) as probe:
        result = run_load(server.address, mix, load)
    phase = Phase(name, result, probe.result, holds(result, target_ms))
    log.info("%s: %s; health %s", name, result.summary(), probe.result.text())
    return phase


def overload_phases(server: ServeProcess, mix: RequestMix, config: BenchConfig, sustained: float) -> list[Phase]:
    """Sustained, then `overload` x sustained, then sustained again in two halves (the first
    starts right after the overload, the second shows where latency settles), all probed."""
    seconds, target, half = config.phase_seconds, config.p99_target_ms, config.phase_seconds / 2
    return [probed("sustained", server, mix, config.load(sustained, seconds, 100), target),
            probed(f"overload {config.overload:g}x", server, mix,
                   config.load(config.overload * sustained, seconds, 101), target),
            probed(f"cool-down 0-{half:g} s", server, mix, config.load(sustained, half, 102), target),
            probed(f"cool-down {half:g}-{seconds:g} s", server, mix, config.load(sustained, half, 103), target)]


# ---- report ------------------------------------------------------------------------------------


def table(phases: list[Phase]) -> str:
    lines = [("| phase | offered q/s | sent | missed by client | achieved q/s | p50 ms | p99 ms | OK | "
             "RESOURCE_EXHAUSTED | other | health SERVING (p99) | holds |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for phase in phases:
        result, codes = phase.result, phase.result.codes
        other = {k: v for k, v in codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
        lines.append(
            f"| {phase.name} | {result.offered_qps:,.0f} | {len(result.calls):,} | {sum(result.missed.values()):,} | "
            f"{result.achieved_qps:,.0f} | {result.percentile(50):.1f} | {result.percentile(99):.1f} | "
            f"{codes['OK']:,} | {codes['RESOURCE_EXHAUSTED']:,} | "
            f"{', '.join(f'{k} {v}' for k, v in other.items()) or '0'} | "
            f"{phase.probe.text() if phase.probe else '—'} | {'yes' if phase.holds else 'no'} |")
    return "\n".join(lines)


def verdict(phases: list[Phase], config: BenchConfig, sustained: float) -> str:
    by_name = {phase.name: phase for phase in phases}
    over = by_name.get(f"overload {config.overload:g}x")
    cools = [phase for phase in phases if phase.name.startswith("cool-down")]
    if over is None or len(cools) != 2:
        return ""
    codes = over.result.codes
    other = sum(v for k, v in codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED"))
    probes = [p.probe for p in phases if p.probe]
    health_ok = all(p.serving == p.count for p in probes)
    return "\n".join([
        (f"sustained: {sustained:,.0f} q/s offered with p99 <= {config.p99_target_ms:g} ms "
        f"(ramp x{config.step:g} from {config.start_rate:g} q/s, {config.step_seconds:g} s a step)."),
        (f"overload {config.overload:g}x: {codes['RESOURCE_EXHAUSTED']:,} RESOURCE_EXHAUSTED "
        f"({over.result.pool_rejections:,} of them gRPC's own pool refusals), {codes['OK']:,} OK, {other} other; "
        f"shed: {'YES' if codes['RESOURCE_EXHAUSTED'] else 'NO'}."),
        (f"health during sustained/overload/cool-down: {'all SERVING' if health_ok else 'NOT all SERVING'} "
        f"({', '.join(p.text() for p in probes)})."),
        (f"cool-down at {sustained:,.0f} q/s: p99 {cools[0].result.percentile(99):.1f} ms in the first half, "
         f"{cools[1].result.percentile(99):.1f} ms in the second -> "
         f"{'RECOVERED' if cools[1].holds else 'NOT recovered'} (target {config.p99_target_ms:g} ms)."),
        (f"machine: {os.cpu_count()} cores for client and server; load average {os.getloadavg()[0]:.1f} at the "
         "end (other jobs running at once add noise).")])


# ---- driver ------------------------------------------------------------------------------------


def run(config: BenchConfig) -> int:
    from service_latency import ensure_checkpoint  # bench/ is the script directory

    started = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    log.info("load average at the start: %.1f", os.getloadavg()[0])
    checkpoint = ensure_checkpoint(config.out)
    index_dir = ensure_mosaic_index(config.out, checkpoint, config.images)
    mix = request_mix(index_dir, config.region_fraction, config.top_k)
    server = start_server(index_dir, checkpoint, config.out / "serve-logs", config.max_concurrent)
    status = 0
    try:
        run_load(server.address, mix, LoadConfig(mode="closed", clients=4, requests=200, seconds=3))  # warm-up
        if config.soak_minutes > 0 and config.soak_rate > 0:
            phases, sustained = [], config.soak_rate  # soak at a given rate: no ramp
        else:
            phases, sustained = ramp(server, mix, config)
        if sustained <= 0:
            raise RuntimeError(f"no offered rate from {config.start_rate} q/s held p99 <= {config.p99_target_ms} ms")
        soak_result = None
        if config.soak_minutes > 0:
            soak_result = run_soak(server, mix, config, sustained)
        else:
            phases += overload_phases(server, mix, config, sustained)
    finally:
        exit_status = server.stop()
    print(f"\n### Load and overload: `segsearch serve` (max_concurrent {config.max_concurrent}), "
          f"{len(mix.segment_ids):,} segments from {config.images} mosaic images, "
          f"{'search by id' if config.region_fraction == 0 else f'{config.region_fraction:.0%} by region'}, "
          f"top_k {config.top_k}, open loop (Poisson), <= {config.clients} calls in flight, "
          f"deadline {config.timeout:g} s, {os.cpu_count()} CPU cores shared by client and server\n")
    if phases:
        print(table(phases))
        print("\n" + verdict(phases, config, sustained))
    if soak_result is not None:
        print("\n" + soak_result.text())
        status = 0 if soak_result.within_bound else 1
    print(f"\nserver exit status after SIGTERM: {exit_status}; total {time.perf_counter() - started:.0f} s; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    return status or (exit_status != 0)


def run_soak(server: ServeProcess, mix: RequestMix, config: BenchConfig, sustained: float) -> SoakResult:
    rate = config.soak_rate if config.soak_rate > 0 else sustained
    log.info("soak: %.1f min at %.0f q/s", config.soak_minutes, rate)
    return soak(server, mix, config.load(rate, config.window_seconds, 200), 60 * config.soak_minutes,
                config.window_seconds, config.rss_every, config.rss_bound_mib)


def parse_args() -> BenchConfig:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in defaults.__dict__.items():
        if name == "out":
            parser.add_argument("--out", type=Path, default=value)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return BenchConfig(**vars(parser.parse_args()))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return run(parse_args())


if __name__ == "__main__":
    sys.exit(main())
