"""A router over one server per shard answers exactly like a server on the merged index.

The 2-shard layout comes from the distributed indexer (`sharded_out` of
test_sharded_serving.py: exact "flat" indexes, shard 0: mosaic0-2, shard 1: mosaic3-4 and the
photo). Two real servers each serve one shard directory, a real router fans out over them,
and a real server on the merged index is the reference: same ids, scores (1e-6), images, in
the same order. Then one backend is stopped: the router answers UNAVAILABLE naming it.
"""
from __future__ import annotations

import socket
import time

import grpc
import numpy as np
import pytest

from segsearch.indexer.shards import ID_STRIDE, SHARDS_DIR
from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service.client import SegsearchClient, search_request
from segsearch.service.errors import DeadlineExceeded
from segsearch.service.router import Router, RouterError
from segsearch.service.router_server import RouterServer
from segsearch.service.config import RouterConfig
from service_helpers import PHOTO, mosaic_images, png_bytes, start_server

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster(sharded_out, checkpoint_path):  # noqa: F811
    """(router client, merged-index client, backends, router server)."""
    shard_dirs = sorted((sharded_out / SHARDS_DIR).glob("shard-*"))
    assert len(shard_dirs) == 2
    backends = [start_server(d, checkpoint_path, read_only=True, metrics_port=None) for d in shard_dirs]
    merged = start_server(sharded_out, checkpoint_path, read_only=True, metrics_port=None)
    router = RouterServer(RouterConfig(backends=[b.address for b in backends], port=0, connect_timeout=10,
                                       health_interval=0.2))
    router.start_connected()
    client = SegsearchClient(router.address, timeout=20)
    yield client, merged.client, backends, router
    client.close()
    router.stop(grace=0)
    for server in (*backends, merged):
        server.stop()


def hits(response: pb.SearchResponse) -> list[tuple]:
    return [(h.segment_id, h.image_id, h.label, (h.box.x0, h.box.y0, h.box.x1, h.box.y1)) for h in response.hits]


def assert_same(routed: pb.SearchResponse, want: pb.SearchResponse) -> None:
    assert want.hits and hits(routed) == hits(want)
    np.testing.assert_allclose([h.score for h in routed.hits], [h.score for h in want.hits], atol=1e-6, rtol=0)


def test_segment_id_queries_match_the_merged_index(cluster):
    routed, merged, _, _ = cluster
    segment_ids = sorted({h.segment_id for h in merged.search_segment(1, top_k=100).hits})
    assert any(s > ID_STRIDE for s in segment_ids) and any(s < ID_STRIDE for s in segment_ids)
    chosen = [s for s in segment_ids if s < ID_STRIDE][:3] + [s for s in segment_ids if s > ID_STRIDE][:3]
    shards_hit = set()
    for segment_id in chosen:
        want = merged.search_segment(segment_id, top_k=10)
        got = routed.search_segment(segment_id, top_k=10)
        assert_same(got, want)
        assert got.hits[0].segment_id == segment_id  # the query segment is not excluded, as on one server
        shards_hit |= {h.segment_id // ID_STRIDE for h in got.hits}
    assert shards_hit == {0, 1}  # the merge really drew on both backends


def test_region_and_filtered_queries_match_the_merged_index(cluster, corpus_dir):
    routed, merged, _, _ = cluster
    image = (corpus_dir / PHOTO).read_bytes()
    box = (40, 30, 200, 170)
    for options in ({"top_k": 20}, {"top_k": 5, "min_area_fraction": 0.05},
                    {"top_k": 7, "exclude_image_ids": ["mosaic3.png", PHOTO]}):
        assert_same(routed.search_box(image, box, **options), merged.search_box(image, box, **options))
    label = merged.search_segment(1, top_k=1).hits[0].label
    want = merged.search_box(image, box, top_k=30, labels=[label])
    assert all(h.label == label for h in want.hits)
    assert_same(routed.search_box(image, box, top_k=30, labels=[label]), want)
    assert_same(routed.search_segment(ID_STRIDE + 1, top_k=8, labels=[label]),
                merged.search_segment(ID_STRIDE + 1, top_k=8, labels=[label]))


def test_records_info_segment_and_refusals(cluster, corpus_dir):
    routed, merged, _, _ = cluster
    a, b = routed.info(), merged.info()
    assert (a.num_images, a.num_segments, a.model_version, a.embedding_dim) == \
        (b.num_images, b.num_segments, b.model_version, b.embedding_dim)
    assert a.read_only and "2 backends" in a.faiss_index
    for segment_id in (1, ID_STRIDE + 1):
        assert routed.get_segment(segment_id) == merged.get_segment(segment_id)
    with pytest.raises(grpc.RpcError) as caught:
        routed.get_segment(3 * ID_STRIDE)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "none of the 2 backends" in caught.value.details()
    image = (corpus_dir / PHOTO).read_bytes()
    assert routed.segment(image).segments and routed.segment(image).segments  # round robin: both backends
    new = png_bytes(mosaic_images(1, seed=11)[0])
    for call in (lambda: routed.index_images([("new", new)]), lambda: routed.delete_images(["mosaic0.png"])):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "read-only" in caught.value.details()
    assert routed.health() == "SERVING"


def test_the_call_timeout_bounds_the_backend_calls(cluster):
    """A backend that never answers (a socket that accepts connections and says nothing)
    costs a call its deadline, not more, and the error names it. A tiny deadline on a fast
    backend would be no test: gRPC lets calls that beat its timer finish (measured: 9 in 10
    loopback calls with a 0.1 ms deadline succeeded)."""
    _, _, backends, router_server = cluster
    connected = router_server.servicer.router
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        router = Router([backends[0].address, address])
        router.model_version, router.max_top_k = connected.model_version, connected.max_top_k
        calls = (lambda: router.info(timeout=0.5),
                 lambda: router.get_segment(pb.GetSegmentRequest(segment_id=1), timeout=0.5),
                 lambda: router.search(search_request(segment_id=1), timeout=0.5))
        try:
            for call in calls:
                started = time.monotonic()
                with pytest.raises(DeadlineExceeded) as caught:
                    call()
                assert time.monotonic() - started < 5
                assert f"backend {address} did not answer within" in caught.value.message
        finally:
            router.close()
    assert connected.search(search_request(segment_id=ID_STRIDE + 1), timeout=10).hits


def test_embedding_queries_are_validated(cluster):
    _, merged, _, _ = cluster
    dim = merged.info().embedding_dim
    record = merged.stub.GetSegment(pb.GetSegmentRequest(segment_id=1, include_prototype=True), timeout=10)
    assert len(record.prototype) == dim and abs(np.linalg.norm(record.prototype) - 1) < 1e-5
    scaled = pb.SearchRequest(top_k=5, embedding=pb.Embedding(values=[3 * v for v in record.prototype]))
    assert_same(merged.search(scaled), merged.search_segment(1, top_k=5))  # normalised by the server
    for values, message in (([1.0] * (dim + 1), "embedding_dim"), ([0.0] * dim, "all zeros"),
                            ([float("nan")] + [1.0] * (dim - 1), "non-finite")):
        with pytest.raises(grpc.RpcError) as caught:
            merged.search(pb.SearchRequest(embedding=pb.Embedding(values=values)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()


def test_a_router_refuses_unreachable_backends_and_other_models(cluster, checkpoint_path, tmp_path):
    _, _, backends, _ = cluster
    with pytest.raises(RouterError, match="cannot reach backend 127.0.0.1:1"):
        Router.connect([backends[0].address, "127.0.0.1:1"], timeout=1)
    other = start_server(other_model_index(checkpoint_path, tmp_path), tmp_path / "other.pt", read_only=True,
                         metrics_port=None)
    try:
        with pytest.raises(RouterError, match="disagree on the model version") as caught:
            Router.connect([backends[0].address, other.address], timeout=5)
        assert other.address in str(caught.value) and backends[0].address in str(caught.value)
    finally:
        other.stop()


def other_model_index(checkpoint_path, tmp_path):
    """A one-image index built with a checkpoint whose weights differ by one nudge."""
    from segsearch.indexer.decode import DecodeConfig
    from segsearch.indexer.pipeline import IndexConfig, index_corpus
    from segsearch.spml.segmenter import SegmenterConfig
    from segsearch.spml.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    name = sorted(k for k, v in checkpoint.state_dict.items() if v.is_floating_point())[0]
    checkpoint.state_dict[name] = checkpoint.state_dict[name] + 1e-3
    save_checkpoint(checkpoint, tmp_path / "other.pt")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "one.png").write_bytes(png_bytes(mosaic_images(1, seed=5)[0]))
    config = IndexConfig(progress=False, decode_workers=1, decode=DecodeConfig(max_side=128),
                         segmenter=SegmenterConfig(embed_size=96, grid=(4, 4)))
    index_corpus(corpus, tmp_path / "other.pt", tmp_path / "index", config)
    return tmp_path / "index"


def test_a_stopped_backend_fails_calls_with_unavailable_naming_it(cluster, corpus_dir):
    """Last in this module: it stops a backend."""
    routed, _, backends, _ = cluster
    down = backends[1]
    down.stop()
    image = (corpus_dir / PHOTO).read_bytes()
    for call in (lambda: routed.search_segment(1, top_k=5), lambda: routed.search_box(image, (0, 0, 50, 50)),
                 lambda: routed.info(), lambda: routed.get_segment(1)):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert down.address in caught.value.details()
    deadline = time.monotonic() + 10  # health follows the backends (a few 0.2 s checks)
    while routed.health(timeout=2) != "NOT_SERVING" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert routed.health(timeout=2) == "NOT_SERVING"
