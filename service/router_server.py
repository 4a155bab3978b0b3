"""`segsearch route`: a gRPC server with the SegmentSearch API in front of several backends.

The same service, health and reflection as `segsearch serve` (and the same interceptors:
metrics, optional bearer token, concurrency limit, error mapping), answering from the
backends through `router.Router`. It is read-only: IndexImages and DeleteImages answer
FAILED_PRECONDITION. Health says SERVING once every backend answered GetInfo with one model.
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2

from segsearch.service import segment_search_pb2_grpc as pb_grpc
from segsearch.service.errors import Unavailable
from segsearch.service.metrics import ServiceMetrics
from segsearch.service.router import CONNECT_TIMEOUT, DEFAULT_BACKEND_TIMEOUT, Router, refuse_write
from segsearch.service.server import DEFAULT_PORT, SERVICE_NAME, MiB, ServerError, build_grpc_server

log = logging.getLogger(__name__)


@dataclass
class RouterConfig:
    backends: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 = any free port
    metrics_port: int | None = None  # None = no metrics endpoint; 0 = any
    max_message_bytes: int = 16 * MiB
    max_concurrent: int = 32
    token: str | None = None  # required from the router's clients (and sent to the backends)
    connect_timeout: float = CONNECT_TIMEOUT
    grace_seconds: float = 10.0


def call_timeout(context: grpc.ServicerContext) -> float:
    """The incoming call's remaining time (its deadline passes on to the backends)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > DEFAULT_BACKEND_TIMEOUT:
        return DEFAULT_BACKEND_TIMEOUT
    return max(remaining, 0.001)


class RouterServicer(pb_grpc.SegmentSearchServicer):
    def __init__(self, router: Router | None = None):
        self.router = router

    def _router(self) -> Router:
        if self.router is None:
            raise Unavailable("the router is still connecting to its backends; retry shortly")
        return self.router

    def SearchSimilar(self, request, context):
        return self._router().search(request, call_timeout(context))

    def GetSegment(self, request, context):
        return self._router().get_segment(request, call_timeout(context))

    def GetInfo(self, request, context):
        return self._router().info(call_timeout(context))

    def Segment(self, request, context):
        return self._router().segment(request, call_timeout(context))

    def IndexImages(self, request_iterator, context):
        raise refuse_write("IndexImages")

    def DeleteImages(self, request, context):
        raise refuse_write("DeleteImages")


class RouterServer:
    """Bind, connect to the backends (checking they agree), report SERVING; `stop()` drains."""

    def __init__(self, config: RouterConfig, metrics: ServiceMetrics | None = None):
        self.config = config
        self.metrics = metrics or ServiceMetrics()
        self.servicer = RouterServicer()
        self.health = health.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> int:
        config = self.config
        server = build_grpc_server(self.servicer, self.health, self.metrics, config.max_concurrent,
                                   config.max_message_bytes, config.token, thread_name_prefix="route")
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{config.host}:{config.port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as error:
            raise ServerError(f"cannot listen on {address} ({error}); is the port in use?") from None
        if not port:
            raise ServerError(f"cannot listen on {address}; is the port in use?")
        self.port = port
        server.start()
        self._server = server
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(config.metrics_port, config.host)
        log.info("router listening on %s", self.address)
        return port

    def start_connected(self) -> int:
        """`start()`, then connect to the backends; a failure releases the port first."""
        port = self.start()
        try:
            self.servicer.router = Router.connect(self.config.backends, self.config.connect_timeout,
                                                  token=self.config.token,
                                                  max_message_bytes=self.config.max_message_bytes)
        except BaseException:
            self.stop(grace=0)
            raise
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return port

    def stop(self, grace: float | None = None) -> None:
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.metrics.serving.set(0)
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        router, self.servicer.router = self.servicer.router, None
        if router is not None:
            router.close()
        self.metrics.stop_http()

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)
        self.metrics.serving.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)


def route(config: RouterConfig, on_ready=print) -> int:
    """Run until SIGTERM/SIGINT; returns 0 after a clean drain."""
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = RouterServer(config)
    try:
        server.start_connected()
        metrics = f", metrics at http://{config.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
        on_ready(f"segsearch routing over {', '.join(config.backends)} on {server.address}{metrics}")
        stopping.wait()
        server.stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

