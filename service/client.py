"""A typed Python client for `segsearch.v1.SegmentSearch`.

    with SegsearchClient("127.0.0.1:50051") as client:
        hits = client.search_box(open("q.jpg", "rb").read(), (10, 20, 90, 120), top_k=5)
        for hit in hits.hits:
            print(hit.segment_id, hit.score, hit.label)

Every call returns the response message of the proto (typed by the generated `.pyi`), and
raises `grpc.RpcError` with the server's status code and message on failure. Options: a
bearer token, TLS (root certificate), a default per-call timeout (deadline).
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service.config import DEFAULT_PORT, MiB
from segsearch.service._generated import segment_search_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 30.0


class SegsearchClient:
    def __init__(self, address: str = f"127.0.0.1:{DEFAULT_PORT}", *, token: str | None = None,
                 root_cert: str | Path | bytes | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 max_message_bytes: int = 16 * MiB):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if root_cert is not None:
            pem = root_cert if isinstance(root_cert, bytes) else Path(root_cert).read_bytes()
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(pem), options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.SegmentSearchStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    # ---- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SegsearchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout: float | None):
        return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)

    # ---- search ----------------------------------------------------------------------

    def search(self, request: pb.SearchRequest, timeout: float | None = None) -> pb.SearchResponse:
        return self._call(self.stub.SearchSimilar, request, timeout)

    def search_segment(self, segment_id: int, **options) -> pb.SearchResponse:
        """Segments like a stored one (it comes back first, with score ~1)."""
        timeout = options.pop("timeout", None)
        return self.search(search_request(segment_id=segment_id, **options), timeout)

    def search_box(self, image: bytes, box: tuple[int, int, int, int], **options) -> pb.SearchResponse:
        """Box (x0, y0, x1, y1), end-exclusive pixels of `image`."""
        x0, y0, x1, y1 = box
        return self._region(image, pb.Region(box=pb.Box(x0=x0, y0=y0, x1=x1, y1=y1)), options)

    def search_point(self, image: bytes, point: tuple[int, int], **options) -> pb.SearchResponse:
        """Point (x, y): the over-segment containing it is the query."""
        return self._region(image, pb.Region(point=pb.Point(x=point[0], y=point[1])), options)

    def search_mask(self, image: bytes, mask_png: bytes, **options) -> pb.SearchResponse:
        """Mask PNG of the image's size, non-zero inside."""
        return self._region(image, pb.Region(mask_png=mask_png), options)

    def search_embedding(self, vector: Iterable[float], **options) -> pb.SearchResponse:
        """Segments near a raw query vector of the index's embedding_dim (see `info()`): finite,
        not all zero; the server normalises it to unit length (INVALID_ARGUMENT otherwise)."""
        timeout = options.pop("timeout", None)
        return self.search(search_request(embedding=vector, **options), timeout)

    def search_batch(self, requests: Iterable[pb.SearchRequest], timeout: float | None = None) -> list[pb.SearchResponse]:
        """Several SearchRequests (see `search_request`) in one SearchSimilarBatch call; one
        response per request, in order. At most `info().max_batch_queries` per call."""
        batch = pb.SearchBatchRequest(queries=list(requests))
        return list(self._call(self.stub.SearchSimilarBatch, batch, timeout).results)

    def _region(self, image: bytes, region: pb.Region, options: dict) -> pb.SearchResponse:
        timeout = options.pop("timeout", None)
        query = pb.RegionQuery(image=pb.Image(data=image), region=region)
        return self.search(search_request(region=query, **options), timeout)

    # ---- the other RPCs ----------------------------------------------------------------

    def segment(self, image: bytes, num_segments: int = 0, timeout: float | None = None) -> pb.SegmentResponse:
        return self._call(self.stub.Segment, pb.SegmentRequest(image=pb.Image(data=image), num_segments=num_segments),
                          timeout)

    def get_segment(self, segment_id: int, timeout: float | None = None, *,
                    include_prototype: bool = False) -> pb.SegmentRecord:
        """One stored segment with its mask (and its unit-norm prototype when asked)."""
        request = pb.GetSegmentRequest(segment_id=segment_id, include_prototype=include_prototype)
        return self._call(self.stub.GetSegment, request, timeout)

    def index_images(self, images: Iterable[tuple[str, bytes] | pb.IndexImageRequest],
                     timeout: float | None = None) -> pb.IndexImagesResponse:
        """Stream `(image_id, bytes)` pairs (or requests) into the index."""
        requests = (item if isinstance(item, pb.IndexImageRequest)
                    else pb.IndexImageRequest(image=pb.Image(data=item[1], image_id=item[0]))
                    for item in images)
        return self._call(self.stub.IndexImages, requests, timeout)

    def delete_images(self, image_ids: Iterable[str], timeout: float | None = None) -> pb.DeleteImagesResponse:
        return self._call(self.stub.DeleteImages, pb.DeleteImagesRequest(image_ids=list(image_ids)), timeout)

    def delete_segments(self, segment_ids: Iterable[int], timeout: float | None = None) -> pb.DeleteImagesResponse:
        """Delete single segments (their images stay, without them); NOT_FOUND if one is unknown."""
        return self._call(self.stub.DeleteImages, pb.DeleteImagesRequest(segment_ids=list(segment_ids)), timeout)

    def info(self, timeout: float | None = None) -> pb.InfoResponse:
        return self._call(self.stub.GetInfo, pb.GetInfoRequest(), timeout)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... of the standard health service (no token needed)."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=self.timeout if timeout is None else timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Block until health says SERVING (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=2.0) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not report SERVING within {timeout} s")
            time.sleep(0.1)


LEVELS = {"default": pb.LEVEL_DEFAULT, "fine": pb.LEVEL_FINE, "region": pb.LEVEL_REGION, "any": pb.LEVEL_ANY}


def level_number(level: str | int) -> int:
    """A level by name (LEVELS) or as a pb.Level number -> pb.Level."""
    if isinstance(level, str):
        if level not in LEVELS:
            raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
        return LEVELS[level]
    return int(level)


def search_request(*, segment_id: int | None = None, region: pb.RegionQuery | None = None,
                   embedding: Iterable[float] | None = None, top_k: int = 0,
                   labels: Iterable[str] = (), exclude_image_ids: Iterable[str] = (),
                   min_area_fraction: float = 0.0, include_masks: bool = False, min_score: float = 0.0,
                   model_version: str = "", search_effort: int = 0,
                   level: str | int = "default") -> pb.SearchRequest:
    """A SearchRequest from keyword options (exactly one of segment_id, region, embedding).
    search_effort: HNSW efSearch / IVF nprobe of this request (0: the server's default).
    level: "default" (regions where indexed), "fine", "region", "any", or a pb.Level."""
    if sum(query is not None for query in (segment_id, region, embedding)) != 1:
        raise ValueError("give exactly one of segment_id, region or embedding")
    request = pb.SearchRequest(
        top_k=top_k, include_masks=include_masks, min_score=min_score, model_version=model_version,
        search_effort=search_effort, level=level_number(level),
        filter=pb.Filter(labels=list(labels), exclude_image_ids=list(exclude_image_ids),
                         min_area_fraction=min_area_fraction))
    if segment_id is not None:
        request.segment_id = segment_id
    elif region is not None:
        request.region.CopyFrom(region)
    else:
        request.embedding.values.extend(float(v) for v in embedding)
    return request
