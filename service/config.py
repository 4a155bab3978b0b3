"""Settings of the service's two front ends, `segsearch serve` and `segsearch route`, with no
grpc or torch import: their CLIs read every default from here, each written once."""
from __future__ import annotations

from dataclasses import dataclass, field

from segsearch.indexer.decode import DEFAULT_MAX_PIXELS

MiB = 1 << 20
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464


DEFAULT_MAX_TOP_K = 100
DEFAULT_MAX_BATCH_QUERIES = 64
# efSearch / nprobe a request may ask for: 8x the HNSW default (192) and far above the IVF
# default; a search costs about linearly in it, so the bound caps one request's CPU time.
DEFAULT_MAX_SEARCH_EFFORT = 2048


@dataclass(frozen=True)
class ServiceLimits:
    """max_image_pixels: larger images are refused from their header, before decoding (the
    indexer's limit, one value for both); decode_budget_pixels: pixels being decoded at once,
    across requests (indexer/decode_budget.py: it bounds the memory of concurrent decodes);
    stream_idle_seconds: the longest wait for the next message of a write stream
    (service/streams.py)."""

    max_top_k: int = DEFAULT_MAX_TOP_K
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    decode_budget_pixels: int = 2 * DEFAULT_MAX_PIXELS
    stream_idle_seconds: float = 10.0  # an IndexImages stream silent this long is closed
    embedding_cache_bytes: int = 64 * MiB  # query images' embedding maps kept for their next region
    max_batch_queries: int = DEFAULT_MAX_BATCH_QUERIES  # queries in one SearchSimilarBatch
    search_effort: int = 0  # efSearch / nprobe of a request that sets none; 0: the index's own
    max_search_effort: int = DEFAULT_MAX_SEARCH_EFFORT  # the largest SearchRequest.search_effort

    def __post_init__(self):
        if self.max_top_k < 1 or self.max_image_pixels < 1 or self.decode_budget_pixels < 1:
            raise ValueError("max_top_k, max_image_pixels and decode_budget_pixels must be >= 1")
        if self.stream_idle_seconds <= 0:
            raise ValueError("stream_idle_seconds must be > 0")
        if self.embedding_cache_bytes < 0:
            raise ValueError("embedding_cache_bytes must be >= 0")
        if self.max_batch_queries < 1 or self.max_search_effort < 1:
            raise ValueError("max_batch_queries and max_search_effort must be >= 1")
        if not 0 <= self.search_effort <= self.max_search_effort:
            raise ValueError(f"search_effort must lie in [0, max_search_effort={self.max_search_effort}] "
                             f"(0: the index's own), got {self.search_effort}")


@dataclass(frozen=True)
class BatchConfig:
    """Dynamic batching of model calls (see `batcher.py`); max_batch <= 1 turns it off."""

    max_batch: int = 8
    max_wait_ms: float = 2.0

    @classmethod
    def auto(cls, device: str) -> "BatchConfig":
        """Batch on accelerators; on CPU one image already keeps every core busy, and
        bench/service_batching.py measured no gain there (bench/RESULTS.md), so it is off."""
        return cls(max_batch=8 if not device.startswith("cpu") else 1)


@dataclass(kw_only=True)
class FrontendConfig:
    """What any gRPC front end of ours needs: where to bind, how much to take, when to stop."""

    host: str = "127.0.0.1"  # 0.0.0.0 exposes the service to the network
    port: int = DEFAULT_PORT  # 0 = any free port
    metrics_port: int | None = None  # None = no metrics endpoint; 0 = any free port
    metrics_host: str = "127.0.0.1"  # /metrics stays on loopback unless asked (it names the index)
    max_message_bytes: int = 16 * MiB
    max_concurrent: int = 8  # read calls in flight before RESOURCE_EXHAUSTED
    max_concurrent_writes: int = 2  # write calls (IndexImages, DeleteImages), on slots of their own
    token: str | None = None  # bearer token required from clients
    grace_seconds: float = 10.0  # in-flight calls get this long on SIGTERM


@dataclass(kw_only=True)
class ServerConfig(FrontendConfig):
    """`segsearch serve`: one index and the model it was built with."""

    index_dir: str
    checkpoint: str
    metrics_port: int | None = DEFAULT_METRICS_PORT
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    tls_cert: str | None = None
    tls_key: str | None = None
    read_only: bool = False
    device: str = "cpu"
    image_uris: str = "relative"  # relative | absolute | none: what clients see of image paths
    save_every: int | None = None  # FAISS snapshot every N write commits; None: by size and time
    faiss_threads: int = 1  # OpenMP threads per FAISS search; requests already run in parallel
    batching: BatchConfig | None = None  # None: auto (batch on CUDA, not on CPU); max_batch <= 1: off

    def __post_init__(self) -> None:
        if self.faiss_threads < 1:
            raise ValueError(f"faiss_threads must be >= 1, got {self.faiss_threads}")
        if self.image_uris not in ("relative", "absolute", "none"):
            raise ValueError(f"image_uris must be relative, absolute or none, got {self.image_uris!r}")


@dataclass(kw_only=True)
class RouterConfig(FrontendConfig):
    """`segsearch route`: backends to fan out to. Its token is also sent to the backends."""

    backends: list[str] = field(default_factory=list)
    max_concurrent: int = 32
    connect_timeout: float = 30.0  # seconds to wait for every backend at start
    health_interval: float = 2.0  # seconds between checks of the backends' health
