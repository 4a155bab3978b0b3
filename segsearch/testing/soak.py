"""A soak under steady load: the server's RSS sampled while open-loop traffic runs in windows.

Shared by `bench/load_service.py` and the slow soak test; needs the test extra (psutil)."""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Self

import numpy as np
import psutil

from segsearch.service.config import MiB
from segsearch.service.loadgen import LoadConfig, LoadResult, RequestMix, run_load
from segsearch.testing.serve_process import ServeProcess




class RssSampler:
    """Samples a process's resident set size every `every` s in a thread: `samples` = [(s, bytes)]."""

    def __init__(self, pid: int, every: float):
        self.process, self.every = psutil.Process(pid), every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._start = time.perf_counter()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(self.every + 5)
        self._sample()

    def _sample(self) -> None:
        try:
            self.samples.append((time.perf_counter() - self._start, self.process.memory_info().rss))
        except psutil.Error:
            pass  # the process is gone: the caller sees it in its exit status

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)


@dataclass
class SoakResult:
    """Windows of steady load and the server's RSS over them (see `growth_mib`)."""

    seconds: float
    warmup_s: float
    windows: list[LoadResult]
    samples: list[tuple[float, int]]
    bound_mib: float

    def _mib(self, value: int) -> float:
        return value / MiB

    @property
    def baseline(self) -> int:
        """RSS at the end of the warm-up (the last sample within it)."""
        within = [rss for t, rss in self.samples if t <= self.warmup_s]
        return within[-1] if within else self.samples[0][1]

    @property
    def growth_mib(self) -> float:
        """Largest RSS after the warm-up minus the baseline."""
        after = [rss for t, rss in self.samples if t > self.warmup_s] or [self.baseline]
        return self._mib(max(after) - self.baseline)

    @property
    def within_bound(self) -> bool:
        return self.growth_mib < self.bound_mib

    def text(self) -> str:
        rss = [rss for _, rss in self.samples]
        codes = sum((w.codes for w in self.windows), start=Counter())
        p99s = [w.percentile(99) for w in self.windows]
        return (f"soak {self.seconds / 60:.1f} min, {len(self.windows)} windows, {len(self.samples)} RSS samples: "
                f"RSS start {self._mib(rss[0]):.1f} MiB, after warm-up ({self.warmup_s:.0f} s) "
                f"{self._mib(self.baseline):.1f}, end {self._mib(rss[-1]):.1f}, max {self._mib(max(rss)):.1f} MiB; "
                f"growth after warm-up {self.growth_mib:+.1f} MiB (bound {self.bound_mib:.0f} MiB: "
                f"{'WITHIN' if self.within_bound else 'EXCEEDED'}); codes {dict(codes)} "
                f"({codes['OK'] / self.seconds:,.0f} OK/s); "
                f"window p99 first {p99s[0]:.1f} ms, last {p99s[-1]:.1f} ms, max {np.nanmax(p99s):.1f} ms")


def soak(server: ServeProcess, mix: RequestMix, load: LoadConfig, seconds: float, window_s: float = 10.0,
         rss_every: float = 5.0, bound_mib: float = 50.0) -> SoakResult:
    """Steady open-loop `load` for `seconds` in windows of `window_s`, sampling the server's RSS."""
    warmup = min(60.0, seconds / 5)
    windows: list[LoadResult] = []
    started = time.perf_counter()
    with RssSampler(server.pid, rss_every) as sampler:
        while (left := seconds - (time.perf_counter() - started)) > 0.5:
            window = LoadConfig(**{**load.__dict__, "seconds": min(window_s, left), "requests": 1 << 30,
                                   "seed": load.seed + len(windows)})
            windows.append(run_load(server.address, mix, window))
            if server.process.poll() is not None:
                raise RuntimeError(f"the server exited during the soak:\n{server.log_tail()}")
    return SoakResult(time.perf_counter() - started, warmup, windows, sampler.samples, bound_mib)
