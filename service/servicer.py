"""The SegmentSearch servicer: request messages -> logic calls -> response messages.

Thin by design: validation, region semantics, search, segmentation and updates live in
plain modules; error statuses come from `ServiceError`s mapped by `ErrorInterceptor`; metrics,
auth and the concurrency limit are interceptors. Until `app` is set (model and index
loaded) every call answers UNAVAILABLE, as health answers NOT_SERVING.
"""
from __future__ import annotations

import faiss

from segsearch.errors import IndexStoreError
from segsearch.service import convert
from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service._generated import segment_search_pb2_grpc as pb_grpc
from segsearch.service.app import ServiceApp
from segsearch.service.errors import at_position, echo
from segsearch.service.errors import FailedPrecondition, InvalidArgument, Unavailable
from segsearch.service.queries import (
    QueryVector,
    RegionSpec,
    embedding_query,
    region_query,
    segment_id_query,
)
from segsearch.service.search import (
    SearchOptions,
    default_effort,
    get_segment,
    search,
    resolve_levels,
    search_many,
    validate_batch_size,
    validate_effort,
    validate_options,
)
from segsearch.service.streams import idle_limited
from segsearch.service.segment_rpc import segment_request
from segsearch.service.updates import NewImage


class SegmentSearchServicer(pb_grpc.SegmentSearchServicer):
    def __init__(self, app: ServiceApp | None = None):
        self.app = app

    def _loaded(self) -> ServiceApp:
        if self.app is None:
            raise Unavailable("the server is still loading its model and index; retry shortly")
        if self.app.read_only:
            self.app.store.refresh()  # follow commits of the index's writer
        return self.app

    def SearchSimilar(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        app = self._loaded()
        query, options = _prepare(app, request)
        hits = search(app.store, query.vector, options)
        return convert.search_response(hits, request.include_masks, query.mask, app.model_version, app.image_uris)

    def SearchSimilarBatch(self, request: pb.SearchBatchRequest, context) -> pb.SearchBatchResponse:
        app = self._loaded()
        validate_batch_size(len(request.queries), app.limits.max_batch_queries)
        prepared = [at_position(number, _prepare, app, query) for number, query in enumerate(request.queries)]
        found = search_many(app.store, [q.vector for q, _ in prepared], [o for _, o in prepared])
        return pb.SearchBatchResponse(results=[
            convert.search_response(hits, query.include_masks, q.mask, app.model_version, app.image_uris)
            for query, (q, _), hits in zip(request.queries, prepared, found)])

    def Segment(self, request: pb.SegmentRequest, context) -> pb.SegmentResponse:
        app = self._loaded()
        result = segment_request(app.analyzer, request.image.data, request.num_segments)
        return convert.segment_response(result, app.model_version)

    def GetSegment(self, request: pb.GetSegmentRequest, context) -> pb.SegmentRecord:
        app = self._loaded()
        record = get_segment(app.store, request.segment_id, app.model_version)
        message = convert.segment_record_message(record, _image_or_none(app, record.image_id), app.image_uris)
        if request.include_prototype:
            message.prototype.extend(record.prototype.tolist())
        return message

    def IndexImages(self, request_iterator, context) -> pb.IndexImagesResponse:
        app = self._loaded()
        messages = idle_limited(request_iterator, app.limits.stream_idle_seconds, "IndexImages")
        images = (NewImage(r.image.data, r.image.image_id, r.uri) for r in messages)
        outcome = app.updater.add(images)
        return pb.IndexImagesResponse(
            indexed=[pb.IndexedImage(image_id=i, segment_ids=ids) for i, ids in outcome.indexed],
            skipped=[pb.SkippedImage(image_id=i, reason=r) for i, r in outcome.skipped],
            num_segments=outcome.num_segments,
        )

    def DeleteImages(self, request: pb.DeleteImagesRequest, context) -> pb.DeleteImagesResponse:
        app = self._loaded()
        removed = app.updater.delete(list(request.image_ids), list(request.segment_ids))
        return pb.DeleteImagesResponse(deleted_segment_ids=removed, num_images=len(set(request.image_ids)))

    def GetInfo(self, request: pb.GetInfoRequest, context) -> pb.InfoResponse:
        app = self._loaded()
        stats = app.store.stats()
        return pb.InfoResponse(
            model_version=app.model_version, num_segments=stats.num_segments, num_images=stats.num_images,
            embedding_dim=stats.embedding_dim, label_names=app.analyzer.class_names,
            index_type=stats.index_spec, faiss_index=stats.faiss_index, max_top_k=app.limits.max_top_k,
            max_image_pixels=app.limits.max_image_pixels, read_only=app.read_only,
            ef_search=default_effort(stats.ef_search, app.limits.search_effort),
            nprobe=default_effort(stats.nprobe, app.limits.search_effort),
            max_search_effort=app.limits.max_search_effort, max_batch_queries=app.limits.max_batch_queries,
            levels=convert.index_levels(app.store.meta.has_regions),
            default_level=convert.default_level(app.store.meta.has_regions),
            faiss_threads=faiss.omp_get_max_threads(),
        )


def _prepare(app: ServiceApp, request: pb.SearchRequest) -> tuple[QueryVector, SearchOptions]:
    """A SearchRequest -> its query vector (embedding a region) and validated options."""
    if request.model_version and request.model_version != app.model_version:
        raise FailedPrecondition(f"the request expects model {echo(request.model_version)} but the server "
                                 f"runs model {app.model_version!r}")
    f, limits = request.filter, app.limits
    effort = validate_effort(request.search_effort, limits.search_effort, limits.max_search_effort)
    levels = resolve_levels(convert.requested_level(request.level), app.store.meta.has_regions)
    options = validate_options(request.top_k, limits.max_top_k, request.min_score, f.labels,
                               f.exclude_image_ids, f.min_area_fraction, effort, levels)
    kind = request.WhichOneof("query")
    if kind == "segment_id":
        query = segment_id_query(app.store, request.segment_id, app.model_version)
    elif kind == "region":
        query = region_query(app.analyzer, request.region.image.data, _region_spec(request.region.region))
    elif kind == "embedding":
        query = embedding_query(request.embedding.values, app.store.meta.embedding_dim)
    else:
        raise InvalidArgument("the request has no query: set region (image + region), segment_id or embedding")
    return query, options


def _region_spec(region: pb.Region) -> RegionSpec:
    shape = region.WhichOneof("shape")
    if shape == "mask_png":
        return RegionSpec(mask_png=region.mask_png)
    if shape == "box":
        return RegionSpec(box=convert.box_from_message(region.box))
    if shape == "point":
        return RegionSpec(point=(region.point.x, region.point.y))
    raise InvalidArgument("region has no shape: set mask_png, box or point")


def _image_or_none(app: ServiceApp, image_id: str):
    try:
        return app.store.get_image(image_id)
    except IndexStoreError:
        return None
