"""Through a router over one writable server per shard (real servers and router on loopback
ports, shards from the distributed indexer): SearchSimilarBatch answers as the single calls,
and segments deleted by id are gone from their shard (NOT_FOUND, never a hit, verify clean)."""
from __future__ import annotations

import shutil

import grpc
import pytest

from segsearch.indexer.sharded_store import ShardedStore
from segsearch.indexer.shards import ID_STRIDE, SHARDS_DIR
from segsearch.service.client import SegsearchClient, search_request
from segsearch.service.config import RouterConfig
from segsearch.service.router_server import RouterServer
from service_helpers import start_server

pytest.importorskip("distributed")


@pytest.fixture
def writable_cluster(sharded_out, checkpoint_path, tmp_path):
    """(router client, the copied layout, backends, router): backends write their shard copies."""
    layout = tmp_path / "index"
    shutil.copytree(sharded_out, layout, ignore=shutil.ignore_patterns("writer.lock"))
    shard_dirs = sorted((layout / SHARDS_DIR).glob("shard-*"))
    backends = [start_server(d, checkpoint_path, metrics_port=None) for d in shard_dirs]
    router = RouterServer(RouterConfig(backends=[b.address for b in backends], port=0, connect_timeout=10,
                                       health_interval=0.2))
    router.start_connected()
    client = SegsearchClient(router.address, timeout=20)
    yield client, layout, backends, router
    client.close()
    router.stop(grace=0)
    for server in backends:
        server.stop()


def test_a_routed_batch_answers_as_its_single_calls(writable_cluster):
    client, _, backends, _ = writable_cluster
    prototype = list(backends[1].client.get_segment(ID_STRIDE + 2, include_prototype=True).prototype)
    requests = [search_request(segment_id=1, top_k=6), search_request(segment_id=ID_STRIDE + 1, top_k=6),
                search_request(embedding=prototype, top_k=4), search_request(segment_id=3, top_k=2, search_effort=8)]
    batched = client.search_batch(requests)
    for request, answer in zip(requests, batched):
        single = client.search(request)
        assert answer.hits and [(h.segment_id, h.score) for h in answer.hits] == \
            [(h.segment_id, h.score) for h in single.hits]
    assert {h.segment_id >= ID_STRIDE for h in batched[0].hits} == {True, False}  # merged over both shards
    info = client.info()
    assert info.max_batch_queries == backends[0].client.info().max_batch_queries
    with pytest.raises(grpc.RpcError) as caught:
        client.search_batch([search_request(segment_id=1)] * (info.max_batch_queries + 1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as caught:
        client.search_batch([search_request(segment_id=1), search_request(segment_id=5 * ID_STRIDE)])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and caught.value.details().startswith("queries[1]: ")


def test_segments_deleted_through_the_router_are_gone_everywhere(writable_cluster):
    client, layout, backends, router = writable_cluster
    before = client.info()
    gone = [2, 5, ID_STRIDE + 3]
    owner_images = {s: client.get_segment(s).image_id for s in gone}
    with pytest.raises(grpc.RpcError) as caught:
        client.delete_segments([2, 7 * ID_STRIDE])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and str(7 * ID_STRIDE) in caught.value.details()
    assert client.info().num_segments == before.num_segments  # nothing deleted
    with pytest.raises(grpc.RpcError) as caught:
        client.delete_images(["mosaic0.png"])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "segment_ids" in caught.value.details()

    deleted = client.delete_segments(gone)
    assert sorted(deleted.deleted_segment_ids) == sorted(gone)
    for segment_id in gone:
        with pytest.raises(grpc.RpcError) as caught:
            client.get_segment(segment_id)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    after = client.info()
    assert (after.num_segments, after.num_images) == (before.num_segments - 3, before.num_images)
    everything = [h.segment_id for level in ("fine", "region") for h in client.search_segment(1, top_k=100, level=level).hits]
    assert len(everything) == after.num_segments and not set(gone) & set(everything)
    for request in (search_request(segment_id=ID_STRIDE + 1, top_k=100), search_request(segment_id=1, top_k=100)):
        assert not set(gone) & {h.segment_id for r in client.search_batch([request]) for h in r.hits}

    router.stop(grace=0)
    for server in backends:
        server.stop()  # close the shards: both stores of each must agree on disk
    with ShardedStore.open(layout / SHARDS_DIR) as store:  # also checks the shards' id ranges
        assert store.verify() == []
        for segment_id, image_id in owner_images.items():
            assert segment_id not in store.get_image(image_id).segment_ids
