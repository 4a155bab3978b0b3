"""Levels through a real server (the tiny model and index): GetInfo reports them, a search
returns regions by default, fine segments or any level on request, never a region with a
piece of it, and a level the contract does not define is INVALID_ARGUMENT."""
from __future__ import annotations

import grpc
import pytest

from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service.client import search_request
from service_helpers import PHOTO


def test_info_reports_both_levels_and_region_as_default(served):
    info = served.client.info()
    assert list(info.levels) == [pb.LEVEL_FINE, pb.LEVEL_REGION] and info.default_level == pb.LEVEL_REGION


def segment_ids_of_level(client, level: int) -> list[int]:
    total = client.info().num_segments
    return [sid for sid in range(1, total + 1) if client.get_segment(sid).level == level]


def test_default_search_returns_regions_and_fine_on_request(served, corpus_dir):
    client = served.client
    image = (corpus_dir / PHOTO).read_bytes()
    fine_id = segment_ids_of_level(client, pb.LEVEL_FINE)[0]
    for response in (client.search_segment(fine_id, top_k=20), client.search_point(image, (40, 30), top_k=20)):
        assert response.hits and all(hit.level == pb.LEVEL_REGION and hit.parent_segment_id == 0
                                     for hit in response.hits)
    fine = client.search_segment(fine_id, top_k=20, level="fine")
    assert fine.hits[0].segment_id == fine_id and all(hit.level == pb.LEVEL_FINE for hit in fine.hits)
    for hit in fine.hits:  # each names its region, a region of the same image that covers it
        parent = client.get_segment(hit.parent_segment_id)
        assert parent.level == pb.LEVEL_REGION and parent.image_id == hit.image_id
        assert parent.area_fraction >= hit.area_fraction


def test_any_level_never_pairs_a_region_with_its_piece(served):
    client = served.client
    total = client.info().num_segments
    levels_seen = set()
    for segment_id in range(1, total + 1, 3):
        response = client.search_segment(segment_id, top_k=30, level="any")
        ids = {hit.segment_id for hit in response.hits}
        assert all(hit.parent_segment_id not in ids for hit in response.hits)
        levels_seen |= {hit.level for hit in response.hits}
    assert levels_seen == {pb.LEVEL_FINE, pb.LEVEL_REGION}


def test_a_level_outside_the_contract_is_invalid(served):
    request = search_request(segment_id=1, level=9)
    with pytest.raises(grpc.RpcError) as caught:
        served.client.search(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "level 9" in caught.value.details()


def test_a_fine_only_index_serves_fine_hits_and_stays_fine_only(corpus_dir, checkpoint_path, tmp_path):
    """An index built with `--fine-only`: GetInfo reports the fine level alone, a box query (which
    needs the hierarchy of the query image) still answers, and IndexImages adds no regions."""
    import dataclasses

    from segsearch.indexer.pipeline import index_corpus
    from segsearch.testing.tiny_index import INDEX_CONFIG, mosaic_images
    from service_helpers import png_bytes, start_server

    config = dataclasses.replace(INDEX_CONFIG, segmenter=dataclasses.replace(INDEX_CONFIG.segmenter, regions=False))
    index_corpus(corpus_dir, checkpoint_path, tmp_path / "index", config)
    running = start_server(tmp_path / "index", checkpoint_path)
    try:
        client = running.client
        info = client.info()
        assert list(info.levels) == [pb.LEVEL_FINE] and info.default_level == pb.LEVEL_FINE
        image = (corpus_dir / PHOTO).read_bytes()
        response = client.search_box(image, (20, 20, 120, 100), top_k=10)
        assert response.hits and all(hit.level == pb.LEVEL_FINE for hit in response.hits)
        before = info.num_segments
        added = client.index_images([("new", png_bytes(mosaic_images(1, seed=7)[0]))])
        assert added.num_segments > 0 and client.info().num_segments == before + added.num_segments
        new_ids = range(before + 1, before + added.num_segments + 1)
        assert all(client.get_segment(sid).level == pb.LEVEL_FINE for sid in new_ids)
    finally:
        running.stop()
