"""`segsearch route`: a gRPC server with the SegmentSearch API in front of several backends.

The same service, health and reflection as `segsearch serve` (and the same interceptors:
metrics, optional bearer token, concurrency limit, error mapping), answering from the
backends through `router.Router`. IndexImages and DeleteImages by image id answer
FAILED_PRECONDITION; DeleteImages by segment id is forwarded to the backend holding each. Health says SERVING once every backend answered GetInfo with one model.
"""
from __future__ import annotations

import logging
import threading

import grpc
from grpc_health.v1 import health_pb2

from segsearch.service._generated import segment_search_pb2_grpc as pb_grpc
from segsearch.service.config import RouterConfig
from segsearch.service.errors import Unavailable
from segsearch.service.prometheus import ServiceMetrics
from segsearch.service.router import DEFAULT_BACKEND_TIMEOUT, Router, refuse_write
from segsearch.service.server import GrpcFrontend, run_until_signalled

log = logging.getLogger(__name__)


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

    def SearchSimilarBatch(self, request, context):
        return self._router().search_batch(request, call_timeout(context))

    def GetSegment(self, request, context):
        return self._router().get_segment(request, call_timeout(context))

    def GetInfo(self, request, context):
        return self._router().info(call_timeout(context))

    def Segment(self, request, context):
        return self._router().segment(request, call_timeout(context))

    def IndexImages(self, request_iterator, context):
        raise refuse_write("IndexImages")

    def DeleteImages(self, request, context):
        return self._router().delete_segments(request, call_timeout(context))


class RouterServer(GrpcFrontend):
    """Bind, connect to the backends (checking they agree), report SERVING; `stop()` drains.

    Health follows the backends: the router answers only with every backend's results, so it is
    SERVING only while every backend's own health says SERVING (checked every
    `health_interval` seconds), and NOT_SERVING, with the backends named in the log, while any
    is down or not serving. An orchestrator then takes the router out of rotation instead of
    sending it calls that would all fail with UNAVAILABLE."""

    thread_name_prefix = "route"

    def __init__(self, config: RouterConfig, metrics: ServiceMetrics | None = None):
        super().__init__(config, RouterServicer(), metrics)
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None

    # the word the router's callers use for GrpcFrontend's start_open
    start_connected = GrpcFrontend.start_open

    def open(self) -> None:
        super().open()
        self._stop_watching.clear()
        self._watcher = threading.Thread(target=self._watch_backends, name="route-health", daemon=True)
        self._watcher.start()

    def _open(self) -> None:
        self.servicer.router = Router.connect(self.config.backends, self.config.connect_timeout,
                                              token=self.config.token,
                                              max_message_bytes=self.config.max_message_bytes)

    def _close(self) -> None:
        self._stop_watching.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2 * self.config.health_interval + 5)
            self._watcher = None
        router, self.servicer.router = self.servicer.router, None
        if router is not None:
            router.close()

    def _watch_backends(self) -> None:
        """Every `health_interval` s: SERVING iff every backend's health says SERVING."""
        down_before: list[str] = []
        while not self._stop_watching.wait(self.config.health_interval):
            router = self.servicer.router
            if router is None:
                return
            down = router.unhealthy_backends(timeout=self.config.health_interval)
            if down != down_before:
                if down:
                    log.warning("NOT_SERVING: backend(s) %s down or not serving", ", ".join(down))
                else:
                    log.info("SERVING again: every backend answers")
                down_before = down
            if not self._stop_watching.is_set():
                self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING if down
                                 else health_pb2.HealthCheckResponse.SERVING)


def route(config: RouterConfig, on_ready=print) -> int:
    """Run until SIGTERM/SIGINT; returns 0 after a clean drain."""
    return run_until_signalled(RouterServer(config), f"segsearch routing over {', '.join(config.backends)}",
                               on_ready)
