"""Service latency: `SearchSimilar` through a real gRPC server, beside the same search in-process.

For each index size (``--sizes``, default 100k and 1M segments), in one run:

1. **The index** is synthetic but real: an `IndexStore` (LMDB + FAISS) created with the
   model version and embedding dim of a real tiny checkpoint (trained for one step by
   `trainer.train`), filled through `IndexStore.add_images` with images of 20 segments
   each (a 4x5 grid: small 32x40 masks, boxes, labels of the checkpoint) whose prototypes
   come from the clustered mixture of `bench/search_speed.py`. The index
   gets the settings file the server reads (`indexing.json`: decode and segmenter settings,
   ``--embed-size``), so a region query is embedded as the index's images would be. Built
   once and cached under `bench/out/service_latency/` (keyed by size, spec and model
   version); the build time is reported either way.
2. **In-process** (no server running; queries one at a time from one worker thread):
   - ``VectorIndex.search``: the FAISS search alone, loaded from the index's own file, with
     the k the service asks for (``max(32, 4 * top_k)``: it over-fetches for its filters);
   - ``IndexStore.search``: the same plus the LMDB records of the candidates;
   - the servicer's ``SearchSimilar`` handler called directly on a `ServiceApp` (everything
     the server does for a request except gRPC, the interceptors and the thread pool): by
     id (stored prototype lookup + search + response) and by region (decode + forward pass
     of the whole image + box vector + search + response).
3. **Through gRPC**: a `SegsearchServer` in a child process (so clients and server do not
   share one GIL) on 127.0.0.1, port 0, no metrics endpoint, ``max_concurrent`` raised to the
   largest client count (the default 8 would answer RESOURCE_EXHAUSTED to clients 9-16);
   1, 4 and 16 client threads in this process. ``--channel``: ``own-tcp`` (default) gives
   each thread its own `SegsearchClient` on its own TCP connection, as separate client
   processes would have; ``own``: a `SegsearchClient` each, which gRPC core pools onto ONE
   TCP connection (identical channel arguments share a subchannel; checked with `ss`);
   ``shared``: one `SegsearchClient` for all threads. Each level sends
   ``--requests`` queries in all (split between clients) or stops after ``--seconds``,
   whichever comes first, after a warm-up of a few queries per client. Latency is per call,
   measured in the client (request serialisation, loopback, server, response parsing).

By id: a uniformly random stored segment id, top_k 10. By region: a box (random, a third
of each side) on one of 8 mosaic images of ``--image-size`` pixels, top_k 10.

"× FAISS" is the gRPC p50 (or p99) over the in-process FAISS p50 (p99; the faster of its
rows, see `_faiss_rows`): what the service adds on top of the vector search. "× handler" divides by the in-process handler instead
(what gRPC + concurrency add). "CPU ms/call" is the CPU time (all threads, from /proc and
`time.process_time`) the server and the bench (client) process spent per successful call.
Clients and server share the same cores, so at 4 and 16 clients the client threads' own
work competes with the server's. ``--threads N`` sets torch and faiss threads in the server
and in-process (default: the libraries' defaults, as `segsearch serve` runs).

Goal (issue 5): search by id at 1M segments, 16 clients, p99 < 20 ms.

Usage: python bench/service_latency.py [--sizes 100000,1000000] [--spec auto] [--clients 1,4,16]
       [--requests 2000] [--seconds 10] [--channel own-tcp|own|shared] [--threads 0]
       [--embed-size 320] [--image-size 128] [--in-process-requests 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import grpc
import numpy as np
import torch
from search_speed import SearchBenchConfig, make_mixture, sample  # bench/ is the script directory

from segsearch.indexer.decode import DecodeConfig
from segsearch.indexer.index_store import VECTORS_FILE, IndexStore
from segsearch.indexer.config import SETTINGS_FILE, IndexSettings
from segsearch.indexer.records import ImageRecord, SegmentRecord
from segsearch.indexer.rle import encode_mask
from segsearch.spml.segmenter import SegmenterConfig
from segsearch.indexer.vector_index import VectorIndex
from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service._generated import segment_search_pb2_grpc as pb_grpc
from segsearch.service.config import BatchConfig
from segsearch.service.app import ServiceApp, index_settings
from segsearch.service.config import ServiceLimits
from segsearch.service.client import SegsearchClient, search_request
from segsearch.service.pngs import encode_image_png
from segsearch.service.search import DEFAULT_TOP_K, MIN_FETCH, OVERFETCH
from segsearch.service.server import SegsearchServer
from segsearch.service.config import ServerConfig
from segsearch.service.servicer import SegmentSearchServicer
from segsearch.spml.checkpoint import load_checkpoint
from segsearch.trainer.config import TrainConfig
from segsearch.trainer.datasets import DataConfig
from segsearch.trainer.mosaic import MosaicConfig, TextureMosaic
from segsearch.trainer.train import train

log = logging.getLogger("bench.service_latency")

OUT = Path(__file__).resolve().parent / "out" / "service_latency"
GOAL_SIZE = 1_000_000
GOAL_CLIENTS = 16
GOAL_P99_MS = 20.0
MASK_SHAPE = (32, 40)  # (H, W) of each synthetic image as indexed: small masks
GRID = (4, 5)  # segment cells per synthetic image (rows, cols) -> 20 segments
IMAGES_PER_CHUNK = 2000
WARMUP_PER_CLIENT = 3
QUERY_IMAGES = 8
CHANNEL_MODES = ("own-tcp", "own", "shared")
CLIENT_TIMEOUT = 60.0
CHANNEL_TEXT = {"own-tcp": "each with its own SegsearchClient and TCP connection",
                "own": "each with its own SegsearchClient (gRPC pools them onto one TCP connection)",
                "shared": "all sharing one SegsearchClient (one channel)"}


@dataclass
class LatencyConfig:
    sizes: tuple[int, ...] = (100_000, 1_000_000)
    spec: str = "auto"
    clients: tuple[int, ...] = (1, 4, 16)
    requests: int = 2000
    seconds: float = 10.0
    in_process_requests: int = 1000
    channel: str = "own-tcp"
    embed_size: int = 320
    image_size: int = 128
    top_k: int = DEFAULT_TOP_K
    threads: int = 0  # torch + faiss threads in the server and in-process; 0: their defaults
    out: Path = OUT
    seed: int = 0


@dataclass
class BuiltIndex:
    """An index on disk and what its build cost (read back from `build.json` when cached)."""

    path: Path
    size: int
    spec: str
    factory: str
    build_seconds: float
    first_id: int
    last_id: int
    cached: bool


@dataclass
class Row:
    """One measured path: latencies in ms of the successful calls, and the errors by code."""

    size: int
    query: str  # "id" | "region" | "vector"
    path: str
    clients: int
    seconds: float
    latencies_ms: np.ndarray
    errors: dict[str, int] = field(default_factory=dict)
    server_cpu_s: float = math.nan  # CPU seconds (all threads) the server process used meanwhile
    client_cpu_s: float = math.nan  # ... and the bench process (client threads; in-process: everything)

    def cpu_ms_per_call(self, seconds: float) -> float:
        return 1000 * seconds / len(self.latencies_ms) if len(self.latencies_ms) else math.nan

    @property
    def qps(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else math.nan


# ---- the checkpoint and the index ------------------------------------------------------


def ensure_checkpoint(out: Path) -> Path:
    """A real tiny checkpoint (small backbone, 1 step), trained once and reused."""
    folder = out / "model"
    path = folder / "checkpoint.pt"
    if path.exists():
        return path
    torch.manual_seed(0)
    result = train(TrainConfig(backbone="small", pretrained=False, edge_source="sobel", steps=1,
                               data=DataConfig(image_size=64, num_train=8, num_test=4), progress=False,
                               out_dir=str(folder)))
    return Path(result.checkpoint_path)


def settings_document(spec: str, embed_size: int) -> dict:
    """`indexing.json` as the indexer writes it: default decode, the segmenter at `embed_size`."""
    return IndexSettings(segmenter=SegmenterConfig(embed_size=embed_size), index_type=spec).to_json()


def segment_templates() -> list[tuple[tuple[int, int, int, int], list[int], float]]:
    """(box, mask RLE, area fraction) of each grid cell of a synthetic image."""
    height, width = MASK_SHAPE
    rows, cols = GRID
    cell_h, cell_w = height // rows, width // cols
    templates = []
    for row in range(rows):
        for col in range(cols):
            mask = np.zeros(MASK_SHAPE, dtype=bool)
            box = (col * cell_w, row * cell_h, (col + 1) * cell_w, (row + 1) * cell_h)
            mask[box[1]:box[3], box[0]:box[2]] = True
            templates.append((box, encode_mask(mask), float(mask.mean())))
    return templates


def image_chunk(first_image: int, prototypes: np.ndarray, version: str, labels: list[str],
                templates: list) -> list[tuple[ImageRecord, list[SegmentRecord]]]:
    """Records of consecutive synthetic images; `prototypes (n_images * S, D)` in order."""
    per_image = len(templates)
    batch = []
    for offset in range(len(prototypes) // per_image):
        number = first_image + offset
        image_id = f"synthetic-{number:08d}"
        image = ImageRecord(image_id, f"synthetic://{number}", MASK_SHAPE[1], MASK_SHAPE[0],
                            hashlib.sha256(image_id.encode()).hexdigest())
        segments = [
            SegmentRecord(0, image_id, box, area, rle, MASK_SHAPE, labels[(number + j) % len(labels)], 1.0,
                          version, prototypes[offset * per_image + j])
            for j, (box, rle, area) in enumerate(templates)
        ]
        batch.append((image, segments))
    return batch


def ensure_index(config: LatencyConfig, size: int, checkpoint_path: Path) -> BuiltIndex:
    """The cached index of `size` segments for this checkpoint, or a new one (timed)."""
    checkpoint = load_checkpoint(checkpoint_path)
    version, dim = checkpoint.model_version, checkpoint.config.output_dim
    path = config.out / f"index-{size}-{config.spec}"
    marker = path / "build.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("model_version") == version:
            _write_settings(path, config)  # cheap; follows --embed-size
            return BuiltIndex(path, size, config.spec, info["factory"], info["build_seconds"],
                              info["first_id"], info["last_id"], cached=True)
        log.info("cached index %s belongs to another checkpoint; rebuilding", path)
    shutil.rmtree(path, ignore_errors=True)
    return _build_index(config, size, path, version, dim, checkpoint.config.class_names or ["segment"])


def _build_index(config: LatencyConfig, size: int, path: Path, version: str, dim: int,
                 labels: list[str]) -> BuiltIndex:
    templates = segment_templates()
    per_image = len(templates)
    images = max(1, size // per_image)
    mixture = make_mixture(SearchBenchConfig(dim=dim, seed=config.seed))
    prototypes = sample(mixture, images * per_image, seed=config.seed + 1)
    log.info("building %s: %d images x %d segments, %d-d, spec %r", path, images, per_image, dim, config.spec)
    started = time.perf_counter()
    ids: list[int] = []
    # save_every: write the FAISS file once at close, not after every chunk (LMDB commits each).
    store = IndexStore.create(path, version, dim, index_spec=config.spec, save_every=1 << 30)
    try:
        for first in range(0, images, IMAGES_PER_CHUNK):
            count = min(IMAGES_PER_CHUNK, images - first)
            chunk = prototypes[first * per_image:(first + count) * per_image]
            result = store.add_images(image_chunk(first, chunk, version, labels, templates))
            ids += [result.segment_ids[0], result.segment_ids[-1]]
            log.info("  %d / %d images (%.0f s)", first + count, images, time.perf_counter() - started)
        factory = store.stats().faiss_index
    finally:
        store.close()  # flushes the FAISS file
    seconds = time.perf_counter() - started
    _write_settings(path, config)
    built = BuiltIndex(path, images * per_image, config.spec, str(factory), seconds, min(ids), max(ids), False)
    info = {"model_version": version, "factory": built.factory, "build_seconds": seconds,
            "first_id": built.first_id, "last_id": built.last_id, "segments": built.size}
    (path / "build.json").write_text(json.dumps(info, indent=2) + "\n")  # last: marks a complete build
    log.info("built %s in %.0f s (%s)", path, seconds, factory)
    return built


def _write_settings(path: Path, config: LatencyConfig) -> None:
    """Write `indexing.json`, then check the service reads back exactly these settings."""
    (path / SETTINGS_FILE).write_text(json.dumps(settings_document(config.spec, config.embed_size), indent=2))
    decode, segmenter = index_settings(path, ServiceLimits())
    if segmenter.embed_size != config.embed_size or decode.max_side != DecodeConfig().max_side:
        raise RuntimeError(f"the service reads {segmenter} / {decode} from {path / SETTINGS_FILE}, "
                           f"not the settings written (embed_size {config.embed_size})")


# ---- queries ---------------------------------------------------------------------------


def query_images(config: LatencyConfig) -> list[bytes]:
    """PNG bytes of a few mosaic test images, `image_size` square."""
    mosaic = TextureMosaic(MosaicConfig(size=config.image_size, num_images=QUERY_IMAGES, seed=7, split="test"))
    return [encode_image_png(mosaic[number].image) for number in range(QUERY_IMAGES)]


def request_maker(kind: str, index: BuiltIndex, images: list[bytes],
                  config: LatencyConfig) -> Callable[[np.random.Generator], pb.SearchRequest]:
    """A function drawing one random SearchRequest of `kind` ("id" or "region")."""
    if kind == "id":
        return lambda rng: search_request(segment_id=int(rng.integers(index.first_id, index.last_id + 1)),
                                          top_k=config.top_k)
    side = config.image_size

    def region(rng: np.random.Generator) -> pb.SearchRequest:
        x0, y0 = (int(v) for v in rng.integers(0, side - side // 3, 2))
        box = pb.Box(x0=x0, y0=y0, x1=x0 + side // 3, y1=y0 + side // 3)
        query = pb.RegionQuery(image=pb.Image(data=images[int(rng.integers(len(images)))]),
                               region=pb.Region(box=box))
        return search_request(region=query, top_k=config.top_k)

    return region


# ---- in-process ------------------------------------------------------------------------


def time_sequential(call: Callable[[int], object], count: int, seconds: float,
                    faiss_threads: int = 0) -> tuple[np.ndarray, float, float]:
    """Latencies (ms) of `call(i)` for i = 0.. one at a time, until `count` or `seconds`; the wall
    time and the process CPU time they took.

    Runs in a fresh worker thread, as the server's handlers do (in its thread pool). faiss's
    OpenMP thread count is a per-thread setting (`faiss.omp_set_num_threads` changes only the
    calling thread's), so `faiss_threads` > 0 is applied inside that worker.
    """
    result: list = []

    def work() -> None:
        if faiss_threads > 0:
            faiss.omp_set_num_threads(faiss_threads)
        result.append(_time_calls(call, count, seconds))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    if not result:
        raise RuntimeError("the timed calls failed (see the traceback above)")
    return result[0]


def _time_calls(call: Callable[[int], object], count: int, seconds: float) -> tuple[np.ndarray, float, float]:
    for i in range(min(3, count)):
        call(i)  # warm-up
    latencies = []
    cpu = time.process_time()
    started = time.perf_counter()
    for i in range(count):
        begin = time.perf_counter()
        call(i)
        latencies.append(time.perf_counter() - begin)
        if begin - started > seconds:
            break
    return 1000 * np.asarray(latencies), time.perf_counter() - started, time.process_time() - cpu


def in_process_rows(index: BuiltIndex, checkpoint: Path, images: list[bytes], config: LatencyConfig) -> list[Row]:
    """FAISS alone, IndexStore.search, and the servicer handler, one query at a time."""
    rng = np.random.default_rng(config.seed + 10)
    fetch = min(index.size, max(MIN_FETCH, OVERFETCH * config.top_k))  # what service.search asks FAISS for
    n, limit, threads = config.in_process_requests, config.seconds, config.threads
    app = ServiceApp.load(index.path, checkpoint, batching=BatchConfig(max_batch=1))  # as the CPU server
    try:
        ids = rng.integers(index.first_id, index.last_id + 1, n)
        vectors = np.stack([app.store.get_segment(int(i)).prototype for i in ids])
        rows = _faiss_rows(index, vectors, fetch, config)
        lat, wall, cpu = time_sequential(lambda i: app.store.search(vectors[i], fetch), n, limit, threads)
        rows.append(Row(index.size, "vector", f"in-process IndexStore.search (k={fetch})", 1, wall, lat,
                        client_cpu_s=cpu))
        servicer = SegmentSearchServicer(app)
        for kind in ("id", "region"):
            make = request_maker(kind, index, images, config)
            requests = [make(rng) for _ in range(n)]
            lat, wall, cpu = time_sequential(lambda i, todo=requests: servicer.SearchSimilar(todo[i], None),
                                             n, limit, threads)
            rows.append(Row(index.size, kind, "in-process handler (no gRPC)", 1, wall, lat, client_cpu_s=cpu))
    finally:
        app.close()
    return rows


def _faiss_rows(index: BuiltIndex, vectors: np.ndarray, fetch: int, config: LatencyConfig) -> list[Row]:
    """The FAISS search alone: the index's own file (same type and efSearch/nprobe), loaded here;
    with the run's threads and, unless that is already 1, with one OpenMP thread: on a busy
    machine a one-query search that wakes a second OpenMP thread can wait a scheduler tick for
    it. The better of the two is the baseline of every ratio (it never flatters the service)."""
    vector_index = VectorIndex.load(index.path / VECTORS_FILE)
    rows = []
    for threads in dict.fromkeys((config.threads, 1)):
        lat, wall, cpu = time_sequential(lambda i: vector_index.search(vectors[i:i + 1], fetch),
                                         config.in_process_requests, config.seconds, threads)
        label = (f"{threads} faiss thread{'s' * (threads > 1)}" if threads
                 else f"faiss default, {faiss.omp_get_max_threads()} threads")
        rows.append(Row(index.size, "vector", f"in-process VectorIndex.search (k={fetch}, {label})", 1, wall, lat,
                        client_cpu_s=cpu))
    return rows


# ---- through gRPC ----------------------------------------------------------------------


def set_threads(threads: int) -> None:
    """torch intra-op threads (process-wide) and faiss OpenMP threads of the calling thread
    (0: leave the libraries' defaults, = cores). Threads started later take faiss's setting
    from OMP_NUM_THREADS, which `ServerProcess` passes to the server for that reason."""
    if threads > 0:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def _serve_child(server_config: ServerConfig, threads: int, conn) -> None:
    """Child process: start + load a server, send (port, load seconds), stop when told."""
    logging.basicConfig(level=logging.WARNING)
    set_threads(threads)
    try:
        started = time.perf_counter()
        server = SegsearchServer(server_config)
        server.start()
        server.load()
        conn.send(("ok", server.port, time.perf_counter() - started))
    except Exception as exc:  # noqa: BLE001 - the parent reports it instead of waiting forever
        conn.send(("error", repr(exc), 0.0))
        return
    try:
        conn.recv()
    except EOFError:
        pass  # parent gone
    server.stop(grace=2)


class ServerProcess:
    """A SegsearchServer in a child process (spawned: no inherited threads or LMDB handles)."""

    def __init__(self, index: Path, checkpoint: Path, max_concurrent: int, threads: int):
        config = ServerConfig(index_dir=str(index), checkpoint=str(checkpoint), port=0, metrics_port=None,
                              max_concurrent=max_concurrent)
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_child, args=(config, threads, child), daemon=True)
        previous = os.environ.get("OMP_NUM_THREADS")
        if threads > 0:  # read by both OpenMP runtimes (torch's, faiss's) in every server thread
            os.environ["OMP_NUM_THREADS"] = str(threads)
        try:
            self._process.start()
        finally:
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = previous
        status, detail, self.load_seconds = self._conn.recv()
        if status != "ok":
            self._process.join(10)
            raise RuntimeError(f"the server did not start: {detail}")
        self.address = f"127.0.0.1:{detail}"
        self.pid = self._process.pid

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process so far (all its threads), from /proc."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def stop(self) -> None:
        try:
            self._conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        self._process.join(30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(10)


def new_client(address: str, mode: str) -> SegsearchClient:
    """A SegsearchClient; for "own-tcp" its channel gets a private subchannel pool, so that it
    opens its own TCP connection instead of sharing the one gRPC core pools for the address."""
    client = SegsearchClient(address, timeout=CLIENT_TIMEOUT)
    if mode == "own-tcp":
        client.channel.close()
        client.channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        client.stub = pb_grpc.SegmentSearchStub(client.channel)
    return client


def run_load(server: ServerProcess, make: Callable[[np.random.Generator], pb.SearchRequest], clients: int,
             config: LatencyConfig, seed: int) -> tuple[np.ndarray, float, dict[str, int], float, float]:
    """`clients` threads sending requests until `config.requests` in all or `config.seconds`.

    Returns latencies (ms), wall seconds, errors by status code, and the CPU seconds the
    server and this (client) process spent meanwhile.
    """
    address = server.address
    per_client = math.ceil(config.requests / clients)
    shared = SegsearchClient(address, timeout=CLIENT_TIMEOUT) if config.channel == "shared" else None
    barrier = threading.Barrier(clients + 1)
    stop = threading.Event()
    results: list[tuple[list[float], Counter]] = [([], Counter()) for _ in range(clients)]

    def worker(number: int) -> None:
        client = shared or new_client(address, config.channel)
        rng = np.random.default_rng(seed * 1000 + number)
        latencies, errors = results[number]
        try:
            for _ in range(WARMUP_PER_CLIENT):
                client.search(make(rng))
        finally:
            barrier.wait()
        for _ in range(per_client):
            if stop.is_set():
                break
            request = make(rng)
            begin = time.perf_counter()
            try:
                client.search(request)
            except grpc.RpcError as error:
                errors[error.code().name] += 1
                continue
            latencies.append(time.perf_counter() - begin)
        if shared is None:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
    started = time.perf_counter()
    for thread in threads:
        thread.join(max(0.0, started + config.seconds - time.perf_counter()))
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    server_cpu, client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
    if shared is not None:
        shared.close()
    latencies = 1000 * np.asarray([value for lat, _ in results for value in lat])
    errors = sum((err for _, err in results), Counter())
    return latencies, elapsed, dict(errors), server_cpu, client_cpu


def grpc_rows(index: BuiltIndex, checkpoint: Path, images: list[bytes], config: LatencyConfig) -> tuple[list[Row], float]:
    """Rows for each query kind x client count against one server; and its start+load seconds."""
    server = ServerProcess(index.path, checkpoint, max(config.clients), config.threads)
    rows = []
    try:
        with SegsearchClient(server.address, timeout=60) as probe:
            info = probe.info()
            if info.num_segments != index.size:
                raise RuntimeError(f"the server holds {info.num_segments} segments, expected {index.size}")
        for kind in ("id", "region"):
            make = request_maker(kind, index, images, config)
            for clients in config.clients:
                latencies, elapsed, errors, server_cpu, client_cpu = run_load(server, make, clients, config,
                                                                              seed=clients)
                rows.append(Row(index.size, kind, f"gRPC ({config.channel} channel)", clients, elapsed,
                                latencies, errors, server_cpu, client_cpu))
                log.info("N=%d %s x%d: %.0f q/s, p50 %.1f ms, p99 %.1f ms%s", index.size, kind, clients,
                         rows[-1].qps, rows[-1].percentile(50), rows[-1].percentile(99),
                         f", errors {errors}" if errors else "")
    finally:
        server.stop()
    return rows, server.load_seconds


# ---- report ----------------------------------------------------------------------------


def print_report(config: LatencyConfig, built: list[BuiltIndex], loads: dict[int, float], rows: list[Row]) -> None:
    print(f"\n### Service latency: SearchSimilar, top_k {config.top_k}, spec {config.spec!r}, "
          f"{os.cpu_count()} CPU cores (clients and server on the same machine)\n")
    print("| N segments | FAISS index | build s | cached | server start+load s |")
    print("|---:|---|---:|---|---:|")
    for index in built:
        print(f"| {index.size:,} | {index.factory} | {index.build_seconds:.0f} | "
              f"{'yes' if index.cached else 'no'} | {loads.get(index.size, math.nan):.1f} |")
    print("\n| N | query | path | clients | calls | errors | queries/s | p50 ms | p99 ms | "
          "p50 × FAISS | p99 × FAISS | p50 × handler | server CPU ms/call | client CPU ms/call |")
    print("|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        faiss_p50, faiss_p99 = _faiss_baseline(rows, row.size)
        handler = _find(rows, row.size, row.query, "handler")
        errors = ", ".join(f"{k} {v}" for k, v in row.errors.items()) or "0"
        ratio_handler = _ratio(row.percentile(50), handler.percentile(50)) if handler else "—"
        print(f"| {row.size:,} | {row.query} | {row.path} | {row.clients} | {len(row.latencies_ms)} | {errors} | "
              f"{row.qps:,.0f} | {row.percentile(50):.2f} | {row.percentile(99):.2f} | "
              f"{_ratio(row.percentile(50), faiss_p50)} | {_ratio(row.percentile(99), faiss_p99)} | {ratio_handler} | "
              f"{_number(row.cpu_ms_per_call(row.server_cpu_s))} | {_number(row.cpu_ms_per_call(row.client_cpu_s))} |")
    print(f"\nregion queries: a box on a {config.image_size}x{config.image_size} PNG, embedded at "
          f"{config.embed_size}x{config.embed_size} (the index's settings) with the whole-image forward pass; "
          f"torch and faiss threads, server and in-process: "
          f"{config.threads if config.threads else f'library defaults ({torch.get_num_threads()})'}. "
          f"gRPC clients: threads in the bench process, {CHANNEL_TEXT[config.channel]}.")
    print("\n" + goal_verdict(rows))


def goal_verdict(rows: list[Row]) -> str:
    candidates = [r for r in rows if r.query == "id" and r.clients == GOAL_CLIENTS and r.path.startswith("gRPC")]
    at_goal = [r for r in candidates if r.size >= GOAL_SIZE]
    if not at_goal:
        largest = max((r.size for r in candidates), default=0)
        return (f"goal (by id, {GOAL_SIZE:,} segments, {GOAL_CLIENTS} clients, p99 < {GOAL_P99_MS:.0f} ms): "
                f"NOT MEASURED in this run (largest size with {GOAL_CLIENTS} clients: {largest:,}).")
    row = at_goal[0]
    met = row.percentile(99) < GOAL_P99_MS and not row.errors
    cpu_ms = row.cpu_ms_per_call(row.server_cpu_s + row.client_cpu_s)
    return (f"goal (by id, {row.size:,} segments, {GOAL_CLIENTS} clients, p99 < {GOAL_P99_MS:.0f} ms): "
            f"p99 {row.percentile(99):.1f} ms, p50 {row.percentile(50):.1f} ms, {row.qps:,.0f} queries/s, "
            f"{sum(row.errors.values())} errors -> {'MET' if met else 'NOT met'}.\n"
            f"Closed loop: each client waits for its answer, so mean latency = {GOAL_CLIENTS} / throughput "
            f"(Little's law); p99 < {GOAL_P99_MS:.0f} ms at {GOAL_CLIENTS} clients needs more than "
            f"{GOAL_CLIENTS / (GOAL_P99_MS / 1000):,.0f} queries/s. Here one call costs {cpu_ms:.2f} CPU ms "
            f"(server + client), i.e. at most {1000 * (os.cpu_count() or 1) / cpu_ms:,.0f} queries/s on "
            f"{os.cpu_count()} idle cores.")


def _faiss_baseline(rows: list[Row], size: int) -> tuple[float, float]:
    """p50 and p99 (ms) of the faster in-process FAISS row of this size (by p50)."""
    candidates = [r for r in rows if r.size == size and "VectorIndex" in r.path]
    best = min(candidates, key=lambda r: r.percentile(50))
    return best.percentile(50), best.percentile(99)


def _find(rows: list[Row], size: int, query: str, path_part: str) -> Row | None:
    return next((r for r in rows if r.size == size and r.query == query and path_part in r.path), None)


def _number(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}"


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.1f}×" if base > 0 and not math.isnan(value) else "—"


# ---- driver ----------------------------------------------------------------------------


def run(config: LatencyConfig) -> None:
    config.out.mkdir(parents=True, exist_ok=True)
    set_threads(config.threads)
    started = time.perf_counter()
    log.info("load average at the start: %.1f", os.getloadavg()[0])
    checkpoint = ensure_checkpoint(config.out)
    images = query_images(config)
    built, loads, rows = [], {}, []
    for size in config.sizes:
        index = ensure_index(config, size, checkpoint)
        built.append(index)
        rows += in_process_rows(index, checkpoint, images, config)
        size_rows, loads[index.size] = grpc_rows(index, checkpoint, images, config)
        rows += size_rows
    rows.sort(key=lambda r: (r.size, r.query != "vector", r.query, not r.path.startswith("in-process"), r.clients))
    print_report(config, built, loads, rows)
    print(f"\n(total {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f})")


def parse_args() -> LatencyConfig:
    defaults = LatencyConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, defaults.sizes)), help="index sizes (segments)")
    parser.add_argument("--spec", default=defaults.spec, help='index spec ("auto" = HNSW from 50k, "ivf", ...)')
    parser.add_argument("--clients", default=",".join(map(str, defaults.clients)))
    parser.add_argument("--requests", type=int, default=defaults.requests, help="queries per level, all clients")
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="time bound per level")
    parser.add_argument("--in-process-requests", type=int, default=defaults.in_process_requests)
    parser.add_argument("--channel", choices=CHANNEL_MODES, default=defaults.channel,
                        help="own-tcp: a client + TCP connection per thread; own: a client per thread "
                             "(gRPC pools one connection); shared: one client")
    parser.add_argument("--embed-size", type=int, default=defaults.embed_size)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch and faiss threads, server and in-process (0: library defaults)")
    parser.add_argument("--out", type=Path, default=defaults.out)
    args = parser.parse_args()
    return LatencyConfig(
        sizes=tuple(int(s) for s in args.sizes.split(",") if s), spec=args.spec,
        clients=tuple(int(c) for c in args.clients.split(",") if c), requests=args.requests,
        seconds=args.seconds, in_process_requests=args.in_process_requests, channel=args.channel,
        embed_size=args.embed_size, image_size=args.image_size, threads=args.threads, out=args.out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(parse_args())


if __name__ == "__main__":
    main()
