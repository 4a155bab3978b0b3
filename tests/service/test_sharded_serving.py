"""A server on a sharded layout answers exactly like a server on the merged index.

The layout is built by the distributed indexer on a real (in-process) Dask cluster from the
service test corpus (shard 0: mosaic0-2, shard 1: mosaic3-4 and the photo), with an exact
index so that the two servers' answers can be compared hit by hit: same segment ids, same
scores, same order. Writes to the sharded server are refused with FAILED_PRECONDITION.
"""
from __future__ import annotations

import shutil

import grpc
import pytest

from segsearch.indexer.shards import ID_STRIDE, SHARDS_DIR
from segsearch.service._generated import segment_search_pb2 as pb
from service_helpers import PHOTO, mosaic_images, png_bytes, start_server

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def servers(sharded_out, checkpoint_path):
    sharded = start_server(sharded_out / SHARDS_DIR, checkpoint_path)
    merged = start_server(sharded_out, checkpoint_path, read_only=True)
    yield sharded, merged
    sharded.stop()
    merged.stop()


def hits(response: pb.SearchResponse) -> list[tuple]:
    return [(h.segment_id, h.score, h.image_id, h.label, (h.box.x0, h.box.y0, h.box.x1, h.box.y1))
            for h in response.hits]


def test_segment_queries_give_identical_hits(servers):
    sharded, merged = servers
    info = merged.client.info()
    regions = merged.client.search_segment(1, top_k=100).hits  # the default level
    segment_ids = sorted({h.segment_id for h in merged.client.search_segment(1, top_k=100, level="fine").hits})
    assert len(segment_ids) == min(100, info.num_segments - len(regions))
    assert any(sid > ID_STRIDE for sid in segment_ids) and any(sid < ID_STRIDE for sid in segment_ids)
    for segment_id in segment_ids[::3]:
        want = hits(merged.client.search_segment(segment_id, top_k=10, level="fine"))
        assert hits(sharded.client.search_segment(segment_id, top_k=10, level="fine")) == want
        assert want[0][0] == segment_id
        for level in ("default", "any"):
            assert hits(sharded.client.search_segment(segment_id, top_k=10, level=level)) == \
                hits(merged.client.search_segment(segment_id, top_k=10, level=level))


def test_region_and_filtered_queries_give_identical_hits(servers, corpus_dir):
    sharded, merged = servers
    image = (corpus_dir / PHOTO).read_bytes()
    for options in ({"top_k": 20}, {"top_k": 5, "min_area_fraction": 0.05},
                    {"top_k": 7, "exclude_image_ids": ["mosaic3.png", PHOTO]}):
        want = hits(merged.client.search_box(image, (40, 30, 200, 170), **options))
        assert want and hits(sharded.client.search_box(image, (40, 30, 200, 170), **options)) == want
    label = merged.client.search_segment(1, top_k=1).hits[0].label
    want = hits(merged.client.search_point(image, (100, 80), top_k=50, labels=[label]))
    assert want and hits(sharded.client.search_point(image, (100, 80), top_k=50, labels=[label])) == want


def test_records_and_info_agree(servers):
    sharded, merged = servers
    a, b = sharded.client.info(), merged.client.info()
    assert (a.num_images, a.num_segments, a.model_version) == (b.num_images, b.num_segments, b.model_version)
    assert a.read_only and "2 shards" in a.faiss_index
    for segment_id in (1, ID_STRIDE + 1):
        assert sharded.client.get_segment(segment_id) == merged.client.get_segment(segment_id)
    with pytest.raises(grpc.RpcError) as caught:
        sharded.client.get_segment(3 * ID_STRIDE)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_writes_to_a_sharded_layout_are_refused(servers):
    sharded, _ = servers
    new = png_bytes(mosaic_images(1, seed=11)[0])
    for call in (lambda: sharded.client.index_images([("new", new)]),
                 lambda: sharded.client.delete_images(["mosaic0.png"])):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "sharded index" in caught.value.details() and "read-only" in caught.value.details()
    assert sharded.client.info().num_images == 6


def test_out_dir_without_merged_index_serves_its_shards(sharded_out, checkpoint_path, servers, tmp_path):
    unmerged = tmp_path / "index"
    shutil.copytree(sharded_out / SHARDS_DIR, unmerged / SHARDS_DIR)  # what --no-merge leaves
    running = start_server(unmerged, checkpoint_path)
    try:
        want = hits(servers[1].client.search_segment(ID_STRIDE + 2, top_k=10))
        assert hits(running.client.search_segment(ID_STRIDE + 2, top_k=10)) == want
    finally:
        running.stop()
