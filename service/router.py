"""Fan-out over several `segsearch serve` replicas, each serving some shards of one layout.

Why: a sharded index may be larger than one machine's memory; then each replica serves a
subset of the shards and this router makes them look like one read-only server.

- **SearchSimilar by region**: the same request goes to every backend in parallel (each
  embeds the query with the same model: `Router.connect` refuses backends whose model
  versions or embedding dimensions differ); each answers its own top k after filters and
  min_score, and the union's best k by `merge_hits` (score, then segment id: the rule of
  `ShardedStore`) is the global answer, as for shards in one process.
- **SearchSimilar by segment id**: the owner is asked for the segment's prototype
  (`GetSegment` with include_prototype, sent to all: exactly one holds the id), then every
  backend searches with that vector (`SearchRequest.embedding`), which a backend uses as
  sent when it is unit norm, so scores equal a segment-id query's bit for bit. The query
  segment itself is not excluded, as on a single server (it comes back first).
- **SearchSimilarBatch**: segment-id queries become vector queries as above, then the whole
  batch goes to every backend as one SearchSimilarBatch and is merged query by query; the
  batch bound is the smallest of the backends' max_batch_queries.
- **DeleteImages by segment_ids**: each id goes to the backend that holds it (found with
  GetSegment); an id no backend holds is NOT_FOUND before anything is deleted. Backends
  must be writable (not --read-only). Each backend commits its share on its own, so a
  backend failing mid-way can leave the other backends' shares deleted (the error names
  it; retrying with the remaining ids is safe). Image ids and IndexImages stay refused.
- **GetSegment**: the backend that has it; NOT_FOUND when none does. **GetInfo**: counts
  summed, the shared model version, the smallest limits. **Segment**: one backend, round
  robin (the next one when it is unavailable).
- **Failures**: a backend that is down fails the call with UNAVAILABLE naming it (never
  partial results); backend errors keep their status code, their message prefixed with the
  backend. Each backend call gets the remaining time of the incoming call as its deadline.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from segsearch.errors import SegsearchError
from segsearch.service.config import MiB, RouterConfig
from segsearch.indexer.sharded_store import merge_hits
from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service._generated import segment_search_pb2_grpc as pb_grpc
from segsearch.service.errors import at_position, echo
from segsearch.service.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from segsearch.service.search import validate_batch_size, validate_top_k

log = logging.getLogger(__name__)

DEFAULT_BACKEND_TIMEOUT = 60.0  # when the incoming call has no deadline
CONNECT_TIMEOUT = RouterConfig.connect_timeout  # seconds for every backend to answer at start


class RouterError(SegsearchError):
    """The router cannot start: a backend unreachable, or backends that disagree."""


@dataclass
class Backend:
    address: str
    channel: grpc.Channel
    stub: pb_grpc.SegmentSearchStub


def backend_error(address: str, error: grpc.RpcError) -> ServiceError:
    """A backend's failure as the router's answer: the same code, the backend named."""
    code, details = error.code(), error.details()
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"backend {address} is unavailable ({details}); the router answers only "
                           "with every backend's results, retry when it is back")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"backend {address} did not answer within the call's deadline")
    failure = ServiceError(f"backend {address}: {details}")
    failure.code = code
    return failure


class Router:
    """Channels to the backends and the fan-out logic (module docstring); thread safe."""

    def __init__(self, addresses: Sequence[str], *, token: str | None = None,
                 max_message_bytes: int = 16 * MiB):
        if not addresses:
            raise RouterError("give at least one backend (--backend HOST:PORT)")
        if len(set(addresses)) != len(addresses):
            raise RouterError(f"a backend is listed twice: {', '.join(addresses)}")
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        self.backends = []
        for address in addresses:
            channel = grpc.insecure_channel(address, options=options)
            self.backends.append(Backend(address, channel, pb_grpc.SegmentSearchStub(channel)))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._turn = itertools.count()
        self._turn_lock = threading.Lock()
        self.model_version = ""
        self.max_top_k = 0
        self.max_batch_queries = 0

    @classmethod
    def connect(cls, addresses: Sequence[str], timeout: float = CONNECT_TIMEOUT, **options) -> Router:
        """Open channels and check, via GetInfo, that all backends serve one model and dimension."""
        router = cls(addresses, **options)
        try:
            router.check_backends(timeout)
        except BaseException:
            router.close()
            raise
        return router

    def check_backends(self, timeout: float) -> None:
        infos = []
        for backend in self.backends:
            try:
                infos.append(backend.stub.GetInfo(pb.GetInfoRequest(), timeout=timeout, metadata=self._metadata,
                                                  wait_for_ready=True))
            except grpc.RpcError as error:
                raise RouterError(f"cannot reach backend {backend.address}: {error.code().name}: "
                                  f"{error.details()}") from None
        for name in ("model_version", "embedding_dim"):
            values = [getattr(info, name) for info in infos]
            if len(set(values)) > 1:
                listing = ", ".join(f"{b.address}: {v}" for b, v in zip(self.backends, values))
                raise RouterError(f"the backends disagree on the {name.replace('_', ' ')} ({listing}); "
                                  "all must serve shards of one index built with one checkpoint")
        self.model_version = infos[0].model_version
        self.max_top_k = min(info.max_top_k for info in infos)
        self.max_batch_queries = min(info.max_batch_queries for info in infos)
        log.info("routing over %d backends (model %s)", len(self.backends), self.model_version)

    def unhealthy_backends(self, timeout: float) -> list[str]:
        """Addresses of the backends whose grpc.health.v1 does not answer SERVING in `timeout`."""
        down = []
        for backend in self.backends:
            try:
                answer = health_pb2_grpc.HealthStub(backend.channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout)
                serving = answer.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                serving = False
            if not serving:
                down.append(backend.address)
        return down

    def close(self) -> None:
        for backend in self.backends:
            backend.channel.close()

    # ---- fan-out -----------------------------------------------------------------------

    def _all(self, method: Callable[[Backend], object], request, timeout: float,
             accept: Callable[[grpc.RpcError], bool] = lambda error: False) -> list:
        """`request` to every backend at once; their answers in backend order (None where
        `accept` forgave the error). The first unforgiven error fails the call."""
        calls = [(b, method(b).future(request, timeout=timeout, metadata=self._metadata)) for b in self.backends]
        answers, failure = [], None
        for backend, call in calls:
            try:
                answers.append(call.result())
            except grpc.RpcError as error:
                answers.append(None)
                if not accept(error) and failure is None:
                    failure = backend_error(backend.address, error)
        if failure is not None:
            for _, call in calls:
                call.cancel()
            raise failure
        return answers

    def search(self, request: pb.SearchRequest, timeout: float) -> pb.SearchResponse:
        """Every backend's answer to the same (region or vector) query, merged to top_k."""
        top_k = self._check(request)
        request = self._as_vector_query(request, timeout)
        responses = self._all(lambda b: b.stub.SearchSimilar, request, timeout)
        return self._merge(responses, top_k)

    def search_batch(self, request: pb.SearchBatchRequest, timeout: float) -> pb.SearchBatchResponse:
        """The whole batch to every backend at once (one SearchSimilarBatch each, so each
        searches its vectors in one FAISS call), merged query by query as `search` merges."""
        validate_batch_size(len(request.queries), self.max_batch_queries)
        top_ks = [at_position(n, self._check, query) for n, query in enumerate(request.queries)]
        forwarded = pb.SearchBatchRequest(queries=[at_position(n, self._as_vector_query, query, timeout)
                                                   for n, query in enumerate(request.queries)])
        answers = self._all(lambda b: b.stub.SearchSimilarBatch, forwarded, timeout)
        return pb.SearchBatchResponse(results=[
            self._merge([answer.results[n] for answer in answers], top_k) for n, top_k in enumerate(top_ks)])

    def _check(self, request: pb.SearchRequest) -> int:
        """The request's top_k, after the checks the router can make without a backend."""
        if request.model_version and request.model_version != self.model_version:
            raise FailedPrecondition(f"the request expects model {echo(request.model_version)} but the "
                                     f"backends run model {self.model_version!r}")
        top_k = validate_top_k(request.top_k, self.max_top_k)
        if request.WhichOneof("query") is None:
            raise InvalidArgument("the request has no query: set region (image + region), segment_id or embedding")
        return top_k

    def _as_vector_query(self, request: pb.SearchRequest, timeout: float) -> pb.SearchRequest:
        """A segment-id query becomes a query by the segment's prototype (module docstring)."""
        if request.WhichOneof("query") != "segment_id":
            return request
        record = self.get_segment(pb.GetSegmentRequest(segment_id=request.segment_id, include_prototype=True),
                                  timeout)
        vector_request = pb.SearchRequest()
        vector_request.CopyFrom(request)
        vector_request.embedding.values.extend(record.prototype)  # replaces segment_id (oneof)
        return vector_request

    def _merge(self, responses: Sequence[pb.SearchResponse], top_k: int) -> pb.SearchResponse:
        hits = merge_hits([list(response.hits) for response in responses], top_k)
        return pb.SearchResponse(hits=hits, model_version=self.model_version,
                                 query_mask_png=responses[0].query_mask_png)

    def delete_segments(self, request: pb.DeleteImagesRequest, timeout: float) -> pb.DeleteImagesResponse:
        """Each segment id to the backend that holds it (found by GetSegment, as `get_segment`);
        NOT_FOUND before anything is deleted when a backend holds none of them. Image ids are
        refused: the router cannot tell which backend holds an image."""
        if request.image_ids:
            raise refuse_write("DeleteImages by image_ids")
        if not request.segment_ids:
            raise InvalidArgument("segment_ids is empty; name the segments to delete")
        owned: dict[int, list[int]] = {}
        for segment_id in dict.fromkeys(request.segment_ids):
            owner = self._owner(segment_id, timeout)
            owned.setdefault(owner, []).append(segment_id)
        removed: list[int] = []
        for number, segment_ids in owned.items():  # one commit per backend, in backend order
            backend = self.backends[number]
            try:
                answer = backend.stub.DeleteImages(pb.DeleteImagesRequest(segment_ids=segment_ids), timeout=timeout,
                                                   metadata=self._metadata)
            except grpc.RpcError as error:
                raise backend_error(backend.address, error) from None
            removed.extend(answer.deleted_segment_ids)
        return pb.DeleteImagesResponse(deleted_segment_ids=removed, num_images=0)

    def _owner(self, segment_id: int, timeout: float) -> int:
        """The number of the backend holding `segment_id`; NOT_FOUND when none does."""
        def not_found(error: grpc.RpcError) -> bool:
            return error.code() == grpc.StatusCode.NOT_FOUND

        answers = self._all(lambda b: b.stub.GetSegment, pb.GetSegmentRequest(segment_id=segment_id), timeout,
                            accept=not_found)
        for number, answer in enumerate(answers):
            if answer is not None:
                return number
        raise NotFound(f"segment id {segment_id} is in none of the {len(self.backends)} backends, nothing "
                       "deleted; ids come from search results")

    def get_segment(self, request: pb.GetSegmentRequest, timeout: float) -> pb.SegmentRecord:
        """The record from the backend that holds the id (each id lives in one shard)."""
        def not_found(error: grpc.RpcError) -> bool:
            return error.code() == grpc.StatusCode.NOT_FOUND

        answers = self._all(lambda b: b.stub.GetSegment, request, timeout, accept=not_found)
        for answer in answers:
            if answer is not None:
                return answer
        raise NotFound(f"segment id {request.segment_id} is in none of the {len(self.backends)} backends; "
                       "ids come from search results")

    def info(self, timeout: float) -> pb.InfoResponse:
        infos = self._all(lambda b: b.stub.GetInfo, pb.GetInfoRequest(), timeout)
        first = infos[0]
        faiss = sorted({info.faiss_index for info in infos})
        return pb.InfoResponse(
            model_version=self.model_version, num_segments=sum(i.num_segments for i in infos),
            num_images=sum(i.num_images for i in infos), embedding_dim=first.embedding_dim,
            label_names=first.label_names, index_type=first.index_type,
            faiss_index=f"{len(infos)} backends: {'; '.join(faiss)}",
            max_top_k=min(i.max_top_k for i in infos), max_image_pixels=min(i.max_image_pixels for i in infos),
            read_only=True, ef_search=max(i.ef_search for i in infos), nprobe=max(i.nprobe for i in infos),
            max_search_effort=min(i.max_search_effort for i in infos),
            max_batch_queries=min(i.max_batch_queries for i in infos),
            levels=sorted({level for i in infos for level in i.levels}),
            default_level=max(i.default_level for i in infos))

    def segment(self, request: pb.SegmentRequest, timeout: float) -> pb.SegmentResponse:
        """One backend, round robin; an unavailable one passes the call to the next."""
        with self._turn_lock:
            start = next(self._turn)
        failure: ServiceError | None = None
        for step in range(len(self.backends)):
            backend = self.backends[(start + step) % len(self.backends)]
            try:
                return backend.stub.Segment(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                failure = backend_error(backend.address, error)
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    break
        raise failure


def refuse_write(method: str) -> FailedPrecondition:
    return FailedPrecondition(f"{method}: the router serves its backends read-only (a sharded index); to add or "
                              "delete images, re-run the distributed indexing job (`segsearch index CORPUS --out "
                              "DIR --dask ...`) and restart the backends on its shards (single segments can be "
                              "deleted through the router: DeleteImages with segment_ids)")
