"""SearchSimilar, GetSegment, Segment and GetInfo against a real server on loopback."""
from __future__ import annotations

import functools
import io

import grpc
import numpy as np
import pytest
from PIL import Image

from segsearch.indexer.records import LEVEL_FINE, LEVEL_NAMES
from segsearch.indexer.rle import decode_mask
from segsearch.indexer.index_store import IndexStore
from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service.pngs import decode_png_array
from segsearch.service.segment_rpc import NO_LABEL
from service_helpers import PHOTO, metric_value, png_bytes


@pytest.fixture(scope="module")
def stored(index_template):
    """({image id: image record}, {image id: its segment records}) of the template index."""
    with IndexStore.open(index_template, read_only=True) as store:
        segments = {}
        for segment_id in store.segment_ids()[0].tolist():
            seg = store.get_segment(segment_id)
            segments.setdefault(seg.image_id, []).append(seg)
        images = {image_id: store.get_image(image_id) for image_id in segments}
    return images, segments


def _mask_at(png: bytes) -> np.ndarray:
    return decode_png_array(png) > 0


def test_info_reports_the_index(served, stored):
    info = served.client.info()
    images, segments = stored
    assert info.num_images == len(images) == 6
    assert info.num_segments == sum(len(s) for s in segments.values())
    assert info.embedding_dim == 64 and info.max_top_k == 100
    assert "brick" in info.label_names and info.model_version


def test_search_by_segment_id_returns_itself_first(served, stored):
    _, segments = stored
    for seg in (segments["mosaic0.png"][0], segments[PHOTO][-1]):  # a fine segment, a region
        response = served.client.search_segment(seg.segment_id, top_k=5, level=LEVEL_NAMES[seg.level])
        assert response.hits[0].segment_id == seg.segment_id
        assert response.hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert len(response.hits) == 5
        scores = [hit.score for hit in response.hits]
        assert scores == sorted(scores, reverse=True)


def test_box_query_on_an_indexed_image_finds_its_own_overlapping_segment(served, stored, corpus_dir):
    images, segments = stored
    data = (corpus_dir / PHOTO).read_bytes()  # 256x192 sent, indexed at 128x96
    seg = max(segments[PHOTO], key=lambda s: s.area_fraction)
    scale = images[PHOTO].width / seg.mask_shape[1]
    x0, y0, x1, y1 = (int(round(v * scale)) for v in seg.box)
    response = served.client.search_box(data, (x0, y0, x1, y1), top_k=3, include_masks=True)
    top = response.hits[0]
    assert top.image_id == PHOTO
    mask = decode_mask(seg.mask_rle, seg.mask_shape)
    top_mask = _mask_at(top.mask_png)
    assert top_mask.shape == mask.shape
    box_region = np.zeros_like(mask)
    box_region[seg.box[1]:seg.box[3], seg.box[0]:seg.box[2]] = True
    assert (top_mask & box_region).any()
    query_mask = _mask_at(response.query_mask_png)  # the region the box frames, clipped to the box
    assert query_mask.shape == (192, 256) and query_mask.any()
    outside = np.ones_like(query_mask)
    outside[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = False  # 2 px: the resize of its border
    assert not (query_mask & outside).any()


def test_mask_query_with_a_stored_segment_mask_returns_that_segment(served, stored, corpus_dir):
    images, segments = stored
    seg = segments["mosaic1.png"][2]
    mask = decode_mask(seg.mask_rle, seg.mask_shape)
    response = served.client.search_mask((corpus_dir / "mosaic1.png").read_bytes(),
                                         png_bytes((mask * 255).astype(np.uint8)), top_k=3, level="fine")
    assert seg.level == LEVEL_FINE and response.hits[0].segment_id == seg.segment_id
    assert response.hits[0].score > 0.99


def test_point_query_uses_the_region_containing_the_point(served, stored, corpus_dir):
    images, segments = stored
    seg = segments[PHOTO][5]
    mask = decode_mask(seg.mask_rle, seg.mask_shape)
    ys, xs = np.nonzero(mask)
    row, col = ys[len(ys) // 2], xs[len(xs) // 2]
    scale = images[PHOTO].width / seg.mask_shape[1]  # the point is given in the 256x192 photo
    point = (int(col * scale + scale / 2), int(row * scale + scale / 2))
    response = served.client.search_point((corpus_dir / PHOTO).read_bytes(), point, top_k=2, include_masks=True)
    query_mask = _mask_at(response.query_mask_png)  # the region under the point, a union of segments
    assert query_mask.shape == (192, 256) and query_mask[point[1], point[0]]
    top = response.hits[0]  # the best hit is that region (or the one holding it) in the indexed photo
    assert top.image_id == PHOTO and top.score > 0.8
    top_mask = np.asarray(Image.fromarray(_mask_at(top.mask_png)).resize((256, 192), Image.Resampling.NEAREST))
    assert (top_mask & query_mask).sum() >= 0.5 * min(top_mask.sum(), query_mask.sum())


def test_filters_and_thresholds_hold_and_top_k_is_filled(served, stored):
    images, segments = stored
    segments = {image_id: [s for s in segs if s.level == LEVEL_FINE] for image_id, segs in segments.items()}
    query = segments["mosaic2.png"][0]
    search = functools.partial(served.client.search_segment, level="fine")
    everything = search(query.segment_id, top_k=100).hits
    assert len(everything) == sum(len(s) for s in segments.values())
    label = everything[-1].label  # a label whose segments rank low: needs over-fetching
    wanted = [hit.segment_id for hit in everything if hit.label == label]
    filtered = search(query.segment_id, top_k=3, labels=[label]).hits
    assert [hit.segment_id for hit in filtered] == wanted[:3]

    excluded = search(query.segment_id, top_k=100, exclude_image_ids=["mosaic2.png", PHOTO]).hits
    assert excluded and all(hit.image_id not in ("mosaic2.png", PHOTO) for hit in excluded)
    assert len(excluded) == sum(len(s) for i, s in segments.items() if i not in ("mosaic2.png", PHOTO))

    big = search(query.segment_id, top_k=100, min_area_fraction=0.08).hits
    assert big and all(hit.area_fraction >= 0.08 for hit in big)
    assert len(big) == sum(1 for s in segments.values() for seg in s if seg.area_fraction >= 0.08)

    threshold = everything[7].score
    strong = search(query.segment_id, top_k=100, min_score=threshold).hits
    assert [hit.segment_id for hit in strong] == [hit.segment_id for hit in everything if hit.score >= threshold]

    default = search(query.segment_id).hits
    assert len(default) == 10


def test_get_segment_returns_the_record_with_its_mask(served, stored):
    images, segments = stored
    seg = segments[PHOTO][3]
    record = served.client.get_segment(seg.segment_id)
    assert (record.image_id, record.label, record.model_version) == (PHOTO, seg.label, seg.model_version)
    assert (record.box.x0, record.box.y0, record.box.x1, record.box.y1) == seg.box
    mask = _mask_at(record.mask_png)
    assert mask.shape == (96, 128) == (record.image_height, record.image_width)
    assert mask.mean() == pytest.approx(seg.area_fraction, abs=1e-6)
    assert record.image_uri == PHOTO  # the path under the corpus root, not the server's absolute path


def test_segment_returns_16_bit_segment_map_and_labels(served, corpus_dir):
    data = (corpus_dir / PHOTO).read_bytes()
    response = served.client.segment(data)
    with Image.open(io.BytesIO(response.segment_map_png)) as image:
        assert image.mode == "I;16" and image.size == (256, 192)
    segment_map = decode_png_array(response.segment_map_png)
    label_map = decode_png_array(response.label_map_png)
    assert segment_map.dtype == np.uint16 and label_map.dtype == np.uint8
    assert label_map.shape == segment_map.shape == (192, 256)
    indices = sorted(int(v) for v in np.unique(segment_map))
    assert indices == [info.index for info in response.segments] == list(range(len(response.segments)))
    for info in response.segments:
        where = segment_map == info.index
        ys, xs = np.nonzero(where)
        assert (info.box.x0, info.box.y0, info.box.x1, info.box.y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert where.mean() == pytest.approx(info.area_fraction, abs=0.01)
        # a segment the checkpoint's label bank does not cover: empty label, score 0, 255 in the map
        expected = list(response.labels).index(info.label) if info.label else NO_LABEL
        assert set(np.unique(label_map[where]).tolist()) == {expected}
        assert 0 < info.label_score <= 1 if info.label else info.label_score == 0
    # num_segments cuts the region hierarchy: two regions, or every fine segment (the default
    # level merges some of them)
    assert len(served.client.segment(data, num_segments=2).segments) == 2
    finest = served.client.segment(data, num_segments=36)
    assert len(finest.segments) >= len(response.segments)
    with pytest.raises(grpc.RpcError) as error:
        served.client.segment(data, num_segments=5000)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_shared_server_reports_every_call_in_its_metrics(served):
    """Counters rise with calls, by method and status code; stages and index gauges are there."""
    before = served.metrics_text()
    ok_before = metric_value(before, "segsearch_requests_total", method="GetInfo", code="OK")
    bad_before = metric_value(before, "segsearch_requests_total", method="GetSegment", code="NOT_FOUND")
    info = served.client.info()
    served.client.info()
    with pytest.raises(grpc.RpcError):
        served.client.get_segment(10**12)
    served.client.segment(png_bytes(np.full((40, 40, 3), 120, np.uint8)))
    after = served.metrics_text()
    assert metric_value(after, "segsearch_requests_total", method="GetInfo", code="OK") == ok_before + 2
    assert metric_value(after, "segsearch_requests_total", method="GetSegment", code="NOT_FOUND") == bad_before + 1
    assert metric_value(after, "segsearch_request_duration_seconds_count", method="GetInfo") >= 2
    for stage in ("decode", "embed", "segment"):
        assert metric_value(after, "segsearch_stage_duration_seconds_count", method="Segment", stage=stage) >= 1
    assert metric_value(after, "segsearch_index_segments") == info.num_segments
    assert metric_value(after, "segsearch_index_images") == info.num_images
    assert metric_value(after, "segsearch_inflight_requests") == 0


def test_reflection_lists_the_services(served):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(served.client.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {service.name for response in responses for service in response.list_services_response.service}
    assert {"segsearch.v1.SegmentSearch", "grpc.health.v1.Health"} <= names
    assert pb.DESCRIPTOR.services_by_name["SegmentSearch"].full_name == "segsearch.v1.SegmentSearch"
