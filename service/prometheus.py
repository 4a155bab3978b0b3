"""Prometheus metrics of the service, in a registry of their own, served on their own port.

Names (the contract with dashboards and alert rules in deploy/):

    segsearch_requests_total{method,code}            counter
    segsearch_request_duration_seconds{method}       histogram
    segsearch_inflight_requests                      gauge
    segsearch_serving                                gauge; 1 while health says SERVING, else 0
    segsearch_index_segments / segsearch_index_images  gauges, read from the index at scrape
    segsearch_stage_duration_seconds{method,stage}   histogram; stage in decode, embed,
                                                     segment, label, search, store

Only the interceptor writes request metrics (see `interceptors.py`); the index gauges are
callbacks, so they are right even after another process changed the index.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from segsearch.errors import SegsearchError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Latency buckets from 1 ms (search by id) to 30 s (a large IndexImages stream).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """The service's collectors; `registry` defaults to a fresh one (no process globals)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "segsearch_requests", "RPCs finished, by method and gRPC status code",
            ["method", "code"], registry=self.registry,
        )
        self.duration = Histogram(
            "segsearch_request_duration_seconds", "RPC wall time, by method",
            ["method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.inflight = Gauge(
            "segsearch_inflight_requests", "RPCs being served now", registry=self.registry,
        )
        self.stages = Histogram(
            "segsearch_stage_duration_seconds", "Time per request stage (decode, embed, segment, "
            "label, search, store)", ["method", "stage"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.serving = Gauge(
            "segsearch_serving", "1 while grpc.health.v1 reports SERVING (loaded), 0 while loading "
            "or draining", registry=self.registry,
        )
        self.index_segments = Gauge(
            "segsearch_index_segments", "Segments in the served index", registry=self.registry,
        )
        self.index_images = Gauge(
            "segsearch_index_images", "Images in the served index", registry=self.registry,
        )
        self.cache_hits = Gauge(
            "segsearch_embedding_cache_hits", "Region queries whose image embedding came from the cache "
            "(since start)", registry=self.registry,
        )
        self.cache_misses = Gauge(
            "segsearch_embedding_cache_misses", "Region queries that embedded their image (since start)",
            registry=self.registry,
        )
        self.cache_bytes = Gauge(
            "segsearch_embedding_cache_bytes", "Bytes of embedding maps held by the cache", registry=self.registry,
        )
        self._http = None

    def track_cache(self, cache) -> None:
        """Read the embedding cache's counters at each scrape."""
        self.cache_hits.set_function(lambda: cache.hits)
        self.cache_misses.set_function(lambda: cache.misses)
        self.cache_bytes.set_function(lambda: cache.bytes)

    def track_index(self, count_segments: Callable[[], float], count_images: Callable[[], float]) -> None:
        """Read the index sizes at each scrape from these callables."""
        self.index_segments.set_function(count_segments)
        self.index_images.set_function(count_images)

    def observe_request(self, method: str, code: str, seconds: float, stage_seconds: dict[str, float]) -> None:
        self.requests.labels(method=method, code=code).inc()
        self.duration.labels(method=method).observe(seconds)
        for name, value in stage_seconds.items():
            self.stages.labels(method=method, stage=name).observe(value)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the /metrics HTTP endpoint (port 0 = any free port); returns the port."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise SegsearchError(f"cannot serve metrics on {host}:{port} ({error.strerror}); is the port in use? "
                                 "choose another with --metrics-port (0 = any free port) or --no-metrics") from None
        self._http = (server, thread)
        bound = server.server_address[1]
        log.info("metrics at http://%s:%d/metrics", host, bound)
        return bound

    def stop_http(self) -> None:
        if self._http is None:
            return
        server, thread = self._http
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        self._http = None

