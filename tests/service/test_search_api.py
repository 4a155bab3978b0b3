"""SearchSimilarBatch, search_effort, search by raw vector, delete by segment id and the
GetInfo fields behind them, on real servers over real ports (the tiny model and index)."""
from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from segsearch.indexer.index_store import IndexStore
from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service.client import search_request
from segsearch.service.config import ServiceLimits
from service_helpers import PHOTO, copy_index, start_server


def hits(response: pb.SearchResponse) -> list[tuple]:
    return [(h.segment_id, h.image_id, round(h.score, 5), h.label) for h in response.hits]


def test_one_batch_call_answers_as_its_single_calls(served, corpus_dir):
    client = served.client
    image = (corpus_dir / PHOTO).read_bytes()
    prototype = list(client.get_segment(3, include_prototype=True).prototype)
    region = pb.RegionQuery(image=pb.Image(data=image), region=pb.Region(box=pb.Box(x0=10, y0=10, x1=90, y1=70)))
    requests = [search_request(segment_id=1, top_k=5), search_request(segment_id=2, top_k=5),
                search_request(segment_id=7, top_k=5, labels=[client.get_segment(7).label]),
                search_request(embedding=[2 * v for v in prototype], top_k=8, level="fine"),
                search_request(region=region, top_k=6, include_masks=True),
                search_request(segment_id=4, top_k=3, min_score=0.5, search_effort=50)]
    batched = client.search_batch(requests)
    assert len(batched) == len(requests)
    for request, answer in zip(requests, batched):
        single = client.search(request)
        assert answer.hits and hits(answer) == hits(single)
        assert [h.mask_png for h in answer.hits] == [h.mask_png for h in single.hits]
        assert answer.query_mask_png == single.query_mask_png and answer.model_version == single.model_version
    assert batched[3].hits[0].segment_id == 3  # the raw vector query finds its own segment


def test_batch_bounds_and_errors_name_the_query(served):
    client = served.client
    bound = client.info().max_batch_queries
    assert bound == ServiceLimits().max_batch_queries
    for count, code, words in ((bound + 1, grpc.StatusCode.INVALID_ARGUMENT, f"at most {bound}"),
                               (0, grpc.StatusCode.INVALID_ARGUMENT, "no queries")):
        with pytest.raises(grpc.RpcError) as caught:
            client.search_batch([search_request(segment_id=1)] * count)
        assert caught.value.code() == code and words in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        client.search_batch([search_request(segment_id=1), search_request(segment_id=10**9)])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details().startswith("queries[1]: segment id 1000000000")


def test_search_by_raw_vector_is_validated(served):
    client = served.client
    dim = client.info().embedding_dim
    record = client.get_segment(5, include_prototype=True)
    assert hits(client.search_embedding(np.asarray(record.prototype) * 0.25, top_k=4)) == \
        hits(client.search_segment(5, top_k=4))
    for values, words in (([1.0] * (dim - 1), "embedding_dim"), ([float("inf")] * dim, "non-finite"),
                          ([0.0] * dim, "all zeros")):
        with pytest.raises(grpc.RpcError) as caught:
            client.search_embedding(values)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()


def test_effort_above_the_bound_is_refused_and_info_reports_the_settings(served):
    client = served.client
    info = client.info()
    limits = ServiceLimits()
    assert info.max_search_effort == limits.max_search_effort
    assert (info.ef_search, info.nprobe) == (0, 0)  # the tiny index is exact ("auto" below 50k)
    with pytest.raises(grpc.RpcError) as caught:
        client.search_segment(1, search_effort=limits.max_search_effort + 1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"max_search_effort {limits.max_search_effort}" in caught.value.details()
    assert hits(client.search_segment(1, search_effort=1, top_k=5)) == hits(client.search_segment(1, top_k=5))


@pytest.fixture(scope="module")
def hnsw_server(corpus_dir, checkpoint_path, tmp_path_factory):
    """The tiny corpus indexed as "hnsw", served with a low default effort and bound."""
    from segsearch.indexer.pipeline import index_corpus
    from segsearch.testing.tiny_index import INDEX_CONFIG

    out = tmp_path_factory.mktemp("hnsw") / "index"
    index_corpus(corpus_dir, checkpoint_path, out, dataclasses.replace(INDEX_CONFIG, index_type="hnsw"))
    running = start_server(out, checkpoint_path, metrics_port=None,
                           limits=ServiceLimits(search_effort=12, max_search_effort=500))
    yield running
    running.stop()


def test_full_effort_on_hnsw_equals_exact_search(hnsw_server, served):
    client = hnsw_server.client
    info = client.info()
    assert "HNSW" in info.faiss_index and (info.ef_search, info.nprobe, info.max_search_effort) == (12, 0, 500)
    total = info.num_segments
    assert total <= 500 and total == served.client.info().num_segments
    for segment_id in range(1, total, max(1, total // 12)):
        exact = served.client.search_segment(segment_id, top_k=20)
        full = client.search_segment(segment_id, top_k=20, search_effort=total)
        assert [h.segment_id for h in full.hits] == [h.segment_id for h in exact.hits]
    with pytest.raises(grpc.RpcError) as caught:
        client.search_segment(1, search_effort=501)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deleting_segments_by_id(index_template, checkpoint_path, tmp_path_factory):
    index_dir = copy_index(index_template, tmp_path_factory)
    running = start_server(index_dir, checkpoint_path, metrics_port=None)
    try:
        client = running.client
        record = client.get_segment(9)
        before = client.info()
        assert record.level == pb.LEVEL_FINE and before.num_segments <= 200
        with pytest.raises(grpc.RpcError) as caught:
            client.delete_segments([9, 10**9])
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "1000000000" in caught.value.details()
        assert client.info().num_segments == before.num_segments  # nothing deleted
        deleted = client.delete_segments([9, 9])
        assert list(deleted.deleted_segment_ids) == [9] and deleted.num_images == 0
        with pytest.raises(grpc.RpcError) as caught:
            client.get_segment(9)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        remaining = [hit for level in ("fine", "region")  # the whole index: 9 is never a hit
                     for hit in client.search_segment(2, top_k=100, level=level).hits]
        assert 9 not in {h.segment_id for h in remaining} and len(remaining) == before.num_segments - 1
        assert client.info().num_segments == before.num_segments - 1 and client.info().num_images == before.num_images
        assert client.stub.GetInfo(pb.GetInfoRequest()).num_segments == len(remaining)
        both = client.stub.DeleteImages(pb.DeleteImagesRequest(image_ids=[record.image_id], segment_ids=[1]))
        assert 1 in both.deleted_segment_ids and both.num_images == 1
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.DeleteImages(pb.DeleteImagesRequest())
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        running.stop()
    with IndexStore.open(index_dir) as store:
        assert store.verify() == []
        assert not store.has_image(record.image_id)
