"""Server lifecycle: bind, report NOT_SERVING, load, report SERVING, drain, stop.

The port is bound before the model and index load, so an orchestrator sees the process
come up and asks `grpc.health.v1.Health` (answering NOT_SERVING) until loading is done;
then both the overall status ("") and "segsearch.v1.SegmentSearch" say SERVING. On SIGTERM
(or SIGINT) health turns NOT_SERVING, the server stops accepting calls, in-flight calls get
`grace_seconds` to finish, the index is closed (flushing FAISS) and `serve` returns 0.

Limits: `max_message_bytes` both ways (default 16 MiB); `max_concurrent` SegmentSearch calls,
beyond which RESOURCE_EXHAUSTED comes at once (the interceptor; the thread pool has a few
spare workers for those answers, health and reflection, and up to `QUEUED_CALLS` calls may
wait for a worker before gRPC itself refuses calls: its refusal would hit health checks
too, so it is only the last resort behind the interceptor, which exempts them); the pixel
limit of decoded images (`ServiceLimits.max_image_pixels`); client deadlines (work abandoned between stages).
Binding is to 127.0.0.1 unless `host` says otherwise; optional TLS and bearer token.
"""
from __future__ import annotations

import gc
import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import faiss
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from segsearch.errors import SegsearchError
from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service._generated import segment_search_pb2_grpc as pb_grpc
from segsearch.service.app import ServiceApp
from segsearch.service.config import BatchConfig, ServerConfig
from segsearch.service.interceptors import build_interceptors
from segsearch.service.prometheus import ServiceMetrics
from segsearch.service.servicer import SegmentSearchServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SegmentSearch"].full_name
SPARE_WORKERS = 8
# Calls that may wait for a free worker before gRPC's own limit (`maximum_concurrent_rpcs`)
# answers RESOURCE_EXHAUSTED. That limit applies to every method, health checks included, so
# with it at the pool size an overloaded server refused health probes (bench/RESULTS.md,
# Reliability: load and overload); queued rejections and probes take well under a ms of work.
QUEUED_CALLS = 64


class ServerError(SegsearchError):
    """The server cannot start (port in use, bad TLS files, ...)."""


def build_grpc_server(servicer, health_servicer: health.HealthServicer, metrics: ServiceMetrics,
                      max_concurrent: int, max_message_bytes: int, token: str | None,
                      thread_name_prefix: str, max_concurrent_writes: int = 1,
                      worker_setup: Callable[[], None] | None = None) -> grpc.Server:
    """A gRPC server with SegmentSearch (`servicer`), health and reflection behind our
    interceptors, sized as the module docstring explains; not yet bound or started. Shared
    by `segsearch serve` and `segsearch route`, so both shed load and guard auth alike.
    `worker_setup` runs once in each worker thread before its first call (per-thread state
    such as FAISS's OpenMP thread count, which a setting in another thread does not reach)."""
    workers = max_concurrent + max_concurrent_writes + SPARE_WORKERS
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_name_prefix,
                                          initializer=worker_setup)
    server = grpc.server(executor,
                         interceptors=build_interceptors(metrics, max_concurrent, token, max_concurrent_writes),
                         options=options, maximum_concurrent_rpcs=workers + QUEUED_CALLS)
    pb_grpc.add_SegmentSearchServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    return server


class GrpcFrontend:
    """The lifecycle `segsearch serve` and `segsearch route` share: bind (health NOT_SERVING,
    calls UNAVAILABLE), open what answers the calls (`_open`), report SERVING, and on `stop`
    turn NOT_SERVING, drain in-flight calls within the grace time and close (`_close`).

    `config` needs host, port, metrics_port, metrics_host, max_concurrent,
    max_message_bytes, token and grace_seconds (ServerConfig, RouterConfig)."""

    thread_name_prefix = "rpc"

    def __init__(self, config, servicer, metrics: ServiceMetrics | None = None):
        self.config = config
        self.metrics = metrics or ServiceMetrics()
        self.servicer = servicer
        self.health = health.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> int:
        """Bind and start answering (health NOT_SERVING, calls UNAVAILABLE); returns the port."""
        config = self.config
        server = build_grpc_server(self.servicer, self.health, self.metrics, config.max_concurrent,
                                   config.max_message_bytes, config.token, self.thread_name_prefix,
                                   config.max_concurrent_writes, self._worker_setup)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        credentials = self._credentials()
        self.port = _bind(server, f"{config.host}:{config.port}", credentials)
        server.start()
        self._server = server
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(config.metrics_port, config.metrics_host)
        log.info("listening on %s (%s)", self.address, "TLS" if credentials else "plaintext")
        return self.port

    def open(self) -> None:
        """Open what answers the calls (`_open`), then report SERVING."""
        self._open()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def start_open(self) -> int:
        """`start()` then `open()`; a failed open releases the port before the error goes on."""
        port = self.start()
        try:
            self.open()
        except BaseException:
            self.stop(grace=0)
            raise
        return port

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish within `grace`, close."""
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.metrics.serving.set(0)
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        self._close()
        self.metrics.stop_http()
        log.info("server stopped")

    def _credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials, or None for plaintext."""
        return None

    def _worker_setup(self) -> None:
        """Runs in each gRPC worker thread before its first call; nothing by default."""

    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)
        self.metrics.serving.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        port = (server.add_secure_port(address, credentials) if credentials
                else server.add_insecure_port(address))
    except RuntimeError as error:
        raise ServerError(f"cannot listen on {address} ({error}); is the port in use?") from None
    if not port:
        raise ServerError(f"cannot listen on {address}; is the port in use?")
    return port


class SegsearchServer(GrpcFrontend):
    """One gRPC server (SegmentSearch + health + reflection) over one index, and its metrics
    endpoint; `load()` opens the model and index."""

    def __init__(self, config: ServerConfig, metrics: ServiceMetrics | None = None):
        super().__init__(config, SegmentSearchServicer(), metrics)

    # the words the server's callers use for GrpcFrontend's open / start_open
    load = GrpcFrontend.open
    start_loaded = GrpcFrontend.start_open

    def _credentials(self) -> grpc.ServerCredentials | None:
        config = self.config
        if not (config.tls_cert or config.tls_key):
            return None
        if not (config.tls_cert and config.tls_key):
            raise ServerError("TLS needs both --tls-cert and --tls-key")
        try:
            key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
        except OSError as error:
            raise ServerError(f"cannot read the TLS files: {error}") from None
        return grpc.ssl_server_credentials([(key, cert)])

    def _worker_setup(self) -> None:
        """Pin FAISS's OpenMP threads in each gRPC worker thread: every worker may search at
        once, and each search fanning out over all cores as well would oversubscribe them
        (more threads than cores, each waiting for the others). OpenMP's thread count is
        per thread, so pinning it in the thread that starts the server does not reach the
        workers (before this, the workers searched with every core)."""
        faiss.omp_set_num_threads(self.config.faiss_threads)

    def _open(self) -> None:
        """Load the model and index (and pin FAISS's threads in this thread too, for the
        work done while loading)."""
        config = self.config
        faiss.omp_set_num_threads(config.faiss_threads)
        app = ServiceApp.load(config.index_dir, config.checkpoint, config.limits,
                              read_only=config.read_only, device=config.device,
                              batching=config.batching or BatchConfig.auto(config.device),
                              image_uris=config.image_uris, save_every=config.save_every)
        self.metrics.track_index(lambda: app.store.meta.num_segments, lambda: app.store.meta.num_images)
        self.metrics.track_cache(app.analyzer.embedding_cache)
        self.servicer.app = app
        # The imports, the model and the index are long-lived from here: take them out of the
        # cyclic GC's full collections, which otherwise scan every one of them and stall
        # whichever call triggers one (the 150-180 ms bulk writes at 10k segments that
        # bench/write_scaling.py measured before it froze its objects the same way).
        gc.freeze()

    def _close(self) -> None:
        app, self.servicer.app = self.servicer.app, None
        if app is not None:
            app.close()


def run_until_signalled(frontend: GrpcFrontend, describe: str, on_ready=print) -> int:
    """Start and open `frontend`, announce it (`describe` names what it serves), run until
    SIGTERM/SIGINT, drain; returns 0 after a clean drain."""
    config = frontend.config
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        frontend.start_open()
        metrics = f", metrics at http://{config.metrics_host}:{frontend.metrics_port}/metrics" \
            if frontend.metrics_port else ""
        on_ready(f"{describe} on {frontend.address}{metrics}")
        stopping.wait()
        log.info("stopping: draining in-flight calls (grace %.1f s)", config.grace_seconds)
        frontend.stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(config: ServerConfig, on_ready=print) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status (0 after a clean drain)."""
    return run_until_signalled(SegsearchServer(config), f"segsearch serving {config.index_dir}", on_ready)
