"""A bounded load generator for `SearchSimilar`, closed or open loop, with a health prober.

Closed loop: `clients` threads, each on its own channel and TCP connection, send a request,
wait for its answer, send the next: the rate follows the server (clients / latency), so it
can never overload it by more than `clients` calls at once.

Open loop: requests arrive on a schedule at `rate` queries/s (Poisson or a fixed interval),
whatever the answers, as independent users would send them; one dispatcher thread sends them
as futures over `channels` connections. At most `clients` calls are in flight (the client's
slots); a request whose time comes while every slot is taken, or that the dispatcher reaches
more than `start_slack_ms` late, is not sent and is counted as *missed* (never sent later in
a burst). So "4x offered load" is 4x the arrivals, and what the server did with them is in
the status codes.

Both stop by themselves: after `requests` requests (sent or missed) or after `seconds`,
whichever comes first; calls still in flight then get their deadline (`timeout`) to finish
and are cancelled after that. The request mix is search by stored segment id (cheap: no
model) with a `region_fraction` of searches by a box on a query image (a forward pass).

    mix = RequestMix(segment_ids)
    result = run_load("127.0.0.1:50051", mix, LoadConfig(mode="open", rate=200, seconds=10))
    print(result.summary())
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Self

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service._generated import segment_search_pb2_grpc as pb_grpc
from segsearch.service.client import search_request
from segsearch.service.pngs import encode_image_png

log = logging.getLogger(__name__)

MODES = ("closed", "open")
ARRIVALS = ("poisson", "fixed")
POOL_REJECTION = "Concurrent RPC limit exceeded"  # gRPC's own refusal (thread pool full), not ours
DRAIN_EXTRA_S = 2.0


@dataclass
class LoadConfig:
    """Bounds and shape of one load run (see the module docstring)."""

    mode: str = "closed"
    clients: int = 8  # closed: concurrent callers; open: most calls in flight at once
    rate: float = 100.0  # open loop: offered queries/s
    arrivals: str = "poisson"
    requests: int = 1000  # count bound: requests sent or missed
    seconds: float = 10.0  # time bound of the sending window
    timeout: float = 5.0  # deadline of each call
    start_slack_ms: float = 10.0  # open loop: later than this behind schedule = missed
    channels: int = 8  # open loop: connections the calls are spread over
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES or self.arrivals not in ARRIVALS:
            raise ValueError(f"mode must be one of {MODES} and arrivals one of {ARRIVALS}")
        if self.clients < 1 or self.requests < 1 or self.seconds <= 0 or self.channels < 1:
            raise ValueError("clients, requests, channels and seconds must be positive")
        if self.mode == "open" and self.rate <= 0:
            raise ValueError("an open-loop run needs a positive rate (queries/s)")


@dataclass
class RequestMix:
    """What to ask: stored segment ids `(N,)`, and encoded query images for region searches."""

    segment_ids: np.ndarray
    images: list[tuple[bytes, int, int]] = field(default_factory=list)  # (PNG bytes, width, height)
    region_fraction: float = 0.0
    top_k: int = 10

    def __post_init__(self) -> None:
        self.segment_ids = np.asarray(self.segment_ids, dtype=np.int64)
        if not len(self.segment_ids) and self.region_fraction < 1:
            raise ValueError("the request mix needs segment ids (or region_fraction 1)")
        if self.region_fraction > 0 and not self.images:
            raise ValueError("region queries need query images")

    @classmethod
    def with_images(cls, segment_ids: np.ndarray, pixels: list[np.ndarray], region_fraction: float,
                    top_k: int = 10) -> RequestMix:
        """Encode RGB arrays `(H, W, 3)` uint8 as PNG query images."""
        encoded = [(encode_image_png(array), array.shape[1], array.shape[0]) for array in pixels]
        return cls(segment_ids, encoded, region_fraction, top_k)

    def draw(self, rng: np.random.Generator) -> tuple[str, pb.SearchRequest]:
        """("id" | "region", a request): a random stored id, or a box a third of a random image."""
        if self.region_fraction <= 0 or rng.random() >= self.region_fraction:
            segment_id = int(self.segment_ids[rng.integers(len(self.segment_ids))])
            return "id", search_request(segment_id=segment_id, top_k=self.top_k)
        data, width, height = self.images[int(rng.integers(len(self.images)))]
        box_w, box_h = max(1, width // 3), max(1, height // 3)
        x0, y0 = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
        region = pb.RegionQuery(image=pb.Image(data=data),
                                region=pb.Region(box=pb.Box(x0=x0, y0=y0, x1=x0 + box_w, y1=y0 + box_h)))
        return "region", search_request(region=region, top_k=self.top_k)


@dataclass
class Call:
    kind: str  # "id" | "region"
    sent_s: float  # since the start of the run
    latency_s: float
    code: str  # status code name; "RESOURCE_EXHAUSTED" also for gRPC's own pool refusals
    pool_rejected: bool = False  # refused by gRPC's thread-pool limit, not our interceptor


@dataclass
class LoadResult:
    """Every call of one run, and the requests the client could not send in time."""

    config: LoadConfig
    elapsed_s: float
    calls: list[Call]
    missed: Counter

    @property
    def codes(self) -> Counter:
        return Counter(call.code for call in self.calls)

    @property
    def pool_rejections(self) -> int:
        return sum(call.pool_rejected for call in self.calls)

    @property
    def offered_qps(self) -> float:
        """Open loop: the configured rate; closed loop: what was sent per second."""
        if self.config.mode == "open":
            return self.config.rate
        return len(self.calls) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def achieved_qps(self) -> float:
        """Answered OK per second."""
        return self.codes["OK"] / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latencies_ms(self, code: str = "OK", kind: str | None = None) -> np.ndarray:
        return 1000 * np.asarray([c.latency_s for c in self.calls
                                  if c.code == code and (kind is None or c.kind == kind)])

    def percentile(self, q: float, code: str = "OK", kind: str | None = None) -> float:
        values = self.latencies_ms(code, kind)
        return float(np.percentile(values, q)) if len(values) else math.nan

    def summary(self) -> dict:
        """Plain numbers for printing or JSON."""
        return {"mode": self.config.mode, "offered_qps": round(self.offered_qps, 1),
                "achieved_qps": round(self.achieved_qps, 1), "seconds": round(self.elapsed_s, 2),
                "sent": len(self.calls), "missed": dict(self.missed), "codes": dict(self.codes),
                "pool_rejections": self.pool_rejections,
                **{f"p{q}_ms": round(self.percentile(q), 2) for q in (50, 95, 99)},
                "rejected_p99_ms": round(self.percentile(99, "RESOURCE_EXHAUSTED"), 2)}


def open_channel(address: str) -> grpc.Channel:
    """A channel with its own TCP connection: gRPC core would otherwise pool every channel to one
    address onto one connection (a private subchannel pool stops that), unlike real clients."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def _call_record(kind: str, sent_s: float, latency_s: float, error: grpc.RpcError | None) -> Call:
    if error is None:
        return Call(kind, sent_s, latency_s, "OK")
    code = error.code()
    details = error.details() or ""
    return Call(kind, sent_s, latency_s, code.name if code else "UNKNOWN", POOL_REJECTION in details)


def run_load(address: str, mix: RequestMix, config: LoadConfig) -> LoadResult:
    """One bounded run against the server at `address` (see the module docstring)."""
    runner = _run_closed if config.mode == "closed" else _run_open
    result = runner(address, mix, config)
    log.debug("load %s: %s", config.mode, result.summary())
    return result


# ---- closed loop ---------------------------------------------------------------------------


def _run_closed(address: str, mix: RequestMix, config: LoadConfig) -> LoadResult:
    tickets = iter(range(config.requests))  # next() on a range iterator is atomic under the GIL
    calls: list[Call] = []
    start = time.perf_counter()
    stop_at = start + config.seconds

    def client(number: int) -> None:
        rng = np.random.default_rng(config.seed * 1000 + number)
        channel = open_channel(address)
        stub = pb_grpc.SegmentSearchStub(channel)
        try:
            while time.perf_counter() < stop_at and next(tickets, None) is not None:
                kind, request = mix.draw(rng)
                begin = time.perf_counter()
                error = None
                try:
                    stub.SearchSimilar(request, timeout=config.timeout)
                except grpc.RpcError as raised:
                    error = raised
                calls.append(_call_record(kind, begin - start, time.perf_counter() - begin, error))
        finally:
            channel.close()

    threads = [threading.Thread(target=client, args=(n,), daemon=True, name=f"load-{n}")
               for n in range(config.clients)]
    for thread in threads:
        thread.start()
    give_up = stop_at + config.timeout + DRAIN_EXTRA_S  # the last calls get their deadline
    for thread in threads:
        thread.join(max(0.0, give_up - time.perf_counter()))
    return LoadResult(config, time.perf_counter() - start, list(calls), Counter())


# ---- open loop -----------------------------------------------------------------------------


def arrival_offsets(config: LoadConfig, rng: np.random.Generator) -> np.ndarray:
    """Send times (s from the start), `(n,)`: at most `requests`, all within `seconds`."""
    count = min(config.requests, math.ceil(config.rate * config.seconds * 1.5) + 10)
    if config.arrivals == "fixed":
        offsets = np.arange(count) / config.rate
    else:
        offsets = np.cumsum(rng.exponential(1.0 / config.rate, count))
    return offsets[offsets < config.seconds]


class _OpenLoop:
    """The dispatcher's state: free slots, calls in flight, and what came back."""

    def __init__(self, address: str, config: LoadConfig):
        self.config = config
        self.channels = [open_channel(address) for _ in range(config.channels)]
        self.stubs = [pb_grpc.SegmentSearchStub(channel) for channel in self.channels]
        self.slots = threading.Semaphore(config.clients)
        self.inflight: set = set()
        self.calls: list[Call] = []
        self.missed: Counter = Counter()
        self.lock = threading.Lock()
        self.start = 0.0

    def send(self, number: int, kind: str, request: pb.SearchRequest) -> None:
        begin = time.perf_counter()
        future = self.stubs[number % len(self.stubs)].SearchSimilar.future(request, timeout=self.config.timeout)
        with self.lock:
            self.inflight.add(future)
        future.add_done_callback(lambda done: self._done(done, kind, begin))

    def _done(self, future: grpc.Future, kind: str, begin: float) -> None:
        latency = time.perf_counter() - begin
        error = None if future.code() == grpc.StatusCode.OK else future  # a finished call future is an RpcError
        self.calls.append(_call_record(kind, begin - self.start, latency, error))
        with self.lock:
            self.inflight.discard(future)
        self.slots.release()

    def drain(self) -> None:
        """Wait up to the deadline for the calls in flight, cancel the rest, close the channels."""
        give_up = time.perf_counter() + self.config.timeout + DRAIN_EXTRA_S
        while time.perf_counter() < give_up:
            with self.lock:
                if not self.inflight:
                    break
            time.sleep(0.005)
        with self.lock:
            left = list(self.inflight)
        for future in left:
            future.cancel()
        self.missed["unfinished"] += len(left)
        for channel in self.channels:
            channel.close()


def _run_open(address: str, mix: RequestMix, config: LoadConfig) -> LoadResult:
    rng = np.random.default_rng(config.seed)
    offsets = arrival_offsets(config, rng)
    loop = _OpenLoop(address, config)
    slack = config.start_slack_ms / 1000
    loop.start = time.perf_counter()
    for number, offset in enumerate(offsets):
        due = loop.start + offset
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        if time.perf_counter() - due > slack:
            loop.missed["late"] += 1  # the dispatcher fell behind: the request could not start in time
            continue
        if not loop.slots.acquire(blocking=False):
            loop.missed["no_slot"] += 1  # all `clients` calls still in flight
            continue
        kind, request = mix.draw(rng)
        loop.send(number, kind, request)
    loop.drain()
    count_bound = len(offsets) >= config.requests
    window = float(offsets[-1]) if count_bound and len(offsets) else config.seconds
    last_answer = max((call.sent_s + call.latency_s for call in loop.calls), default=0.0)
    return LoadResult(config, max(window, last_answer), list(loop.calls), loop.missed)


# ---- health probes -------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Health checks made during a run: latencies (ms) of each, and their outcomes."""

    latencies_ms: list[float] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)  # "SERVING", "NOT_SERVING", or a status code name

    @property
    def count(self) -> int:
        return sum(self.outcomes.values())

    @property
    def serving(self) -> int:
        return self.outcomes["SERVING"]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else math.nan

    def text(self) -> str:
        """"48/48 (p99 3.1 ms)"."""
        return f"{self.serving}/{self.count} (p99 {self.percentile(99):.1f} ms)"


class HealthProbe:
    """Asks grpc.health.v1 every `interval` s on its own connection, as an orchestrator would,
    until stopped; each check has a deadline of `timeout` s. Use as a context manager."""

    def __init__(self, address: str, interval: float = 0.1, timeout: float = 1.0, service: str = ""):
        self.address, self.interval, self.timeout, self.service = address, interval, timeout, service
        self.result = ProbeResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="health-probe")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(self.timeout + self.interval + DRAIN_EXTRA_S)

    def _run(self) -> None:
        channel = open_channel(self.address)
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=self.service)
        try:
            while not self._stop.is_set():
                begin = time.perf_counter()
                try:
                    status = stub.Check(request, timeout=self.timeout).status
                    outcome = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as error:
                    outcome = error.code().name
                self.result.latencies_ms.append(1000 * (time.perf_counter() - begin))
                self.result.outcomes[outcome] += 1
                self._stop.wait(max(0.0, self.interval - (time.perf_counter() - begin)))
        finally:
            channel.close()
