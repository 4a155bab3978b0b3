"""Hostile input against a real `segsearch serve` child: every request gets a proper status,
the server survives and its memory comes back (see `fuzz_strategies.py` for the inputs).

The named cases come first (each hostile file, masks, scalar extremes, ids, undecodable
bytes: each with the status and message it must get); then the generated run: 1,000
requests by default, 10,000 with --runslow (also `bench/fuzz_service.py`).
"""
from __future__ import annotations

import io
import math

import grpc
import numpy as np
import pytest
from segsearch.testing.fuzz_strategies import (
    INT32_MAX,
    INT32_MIN,
    UINT64_MAX,
    Call,
    FuzzClient,
    Outcome,
    Target,
    encode,
    exif_rotated_jpeg,
    fuzz,
    hostile_image,
    hostile_images,
    png_claiming,
    render,
    violations,
    warm_up,
)
from PIL import Image
from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service.client import SegsearchClient
from segsearch.testing.serve_process import ServeProcess
from service_helpers import PHOTO, copy_index, photo, png_bytes

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MiB = 1 << 20
# RSS growth allowed between the end of the warm-up and the end of a run. A leak of 10 KB per
# request would be 10 MB per 1,000 requests and 100 MB per 10,000; the bound leaves room for
# allocator noise (glibc arenas of 4 worker threads) but not for a per-request leak of that size.
RSS_GROWTH_BOUND = 96 * MiB


@pytest.fixture(scope="module")
def fuzz_server(index_template, checkpoint_path, tmp_path_factory):
    server = ServeProcess(copy_index(index_template, tmp_path_factory), checkpoint_path,
                          tmp_path_factory.mktemp("fuzz-server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(fuzz_server):
    with SegsearchClient(fuzz_server.address, timeout=30) as client:
        yield client


def _status(call, *args, **kwargs) -> tuple[grpc.StatusCode, str, object]:
    try:
        return grpc.StatusCode.OK, "", call(*args, **kwargs)
    except grpc.RpcError as error:
        return error.code(), error.details(), None


def _expect(code: grpc.StatusCode, phrase: str, call, *args, **kwargs):
    got, details, response = _status(call, *args, **kwargs)
    assert got == code, f"{got}: {details}"
    assert phrase in details, details
    return response


# ---- named hostile images ------------------------------------------------------------------

@pytest.mark.parametrize("image", hostile_images(), ids=lambda image: image.name)
def test_each_hostile_image_gets_its_answer(client, image):
    """Decodable ones are segmented at their size as sent (after EXIF) and searchable by a box
    over all of it (which picks a region of the image: its mask comes back at the image's size);
    the others are INVALID_ARGUMENT with the reason (bombs refused on their header)."""
    if image.expect != "ok":
        _expect(INVALID, image.expect, client.segment, image.data)
        _expect(INVALID, image.expect, client.search_box, image.data, (0, 0, 1, 1))
        return
    width, height = image.size
    segmented = client.segment(image.data)
    assert (segmented.width, segmented.height) == image.size
    assert segmented.segments
    response = client.search_box(image.data, (0, 0, width, height), top_k=3, include_masks=True)
    assert response.hits
    with Image.open(io.BytesIO(response.query_mask_png)) as mask:
        assert mask.size == image.size
        assert np.asarray(mask).any()


def test_exif_rotated_jpeg_regions_are_in_the_image_as_shown(client):
    """Boxes, masks and maps refer to the image as shown (EXIF applied), and a region of the
    rotated file queries what the same region of an upright file of that picture queries."""
    shown = np.ascontiguousarray(photo()[32:160, 64:160])  # (128, 96, 3): portrait as shown
    stored = np.ascontiguousarray(np.rot90(shown, k=1))  # (96, 128): what orientation 6 turns upright
    rotated = exif_rotated_jpeg(stored, orientation=6)
    upright = encode(Image.fromarray(shown), "JPEG", quality=100)
    width, height = 96, 128
    segmented = client.segment(rotated)
    assert (segmented.width, segmented.height) == (width, height)
    _expect(INVALID, "outside the 96x128 image", client.search_box, rotated, (0, 0, 128, 96))
    _expect(INVALID, "the mask must have the image's size", client.search_mask, rotated,
            png_bytes(np.full((96, 128), 255, np.uint8)))
    mask = np.zeros((height, width), np.uint8)
    mask[10:60, 20:90] = 255
    by_mask = client.search_mask(rotated, png_bytes(mask), top_k=5, include_masks=True)
    with Image.open(io.BytesIO(by_mask.query_mask_png)) as used:
        assert np.array_equal(np.asarray(used) > 0, mask > 0)
    by_upright_mask = client.search_mask(upright, png_bytes(mask), top_k=5)
    assert by_mask.hits[0].segment_id == by_upright_mask.hits[0].segment_id
    assert abs(by_mask.hits[0].score - by_upright_mask.hits[0].score) < 0.05
    # a box picks the region it frames, in the image as shown: mostly inside the box, for both files
    box = (20, 10, 90, 60)
    for data in (rotated, upright):
        answer = client.search_box(data, box, top_k=5, include_masks=True)
        with Image.open(io.BytesIO(answer.query_mask_png)) as used:
            region = np.asarray(used) > 0
        assert region.shape == (height, width) and region.any()
        assert region[10:60, 20:90].sum() >= 0.5 * region.sum()


# ---- masks ----------------------------------------------------------------------------------

def _mask(mode: str, size=(64, 48), fill=True) -> bytes:
    values = np.zeros(size[::-1], np.uint8)
    values[5:30, 10:40] = 255 if fill else 0
    image = Image.fromarray(values)
    if mode == "I;16":
        image = Image.fromarray(values.astype(np.uint16) * 257)
    elif mode != "L":
        image = image.convert(mode)
    return encode(image)


@pytest.mark.parametrize("mode", ["L", "1", "P", "I;16", "RGB", "RGBA", "LA"])
def test_masks_in_every_png_mode_are_accepted(client, mode):
    assert client.search_mask(hostile_image("webp").data, _mask(mode), top_k=2).hits


@pytest.mark.parametrize("mask, phrase", [
    pytest.param(_mask("L", size=(65, 48)), "the mask must have the image's size", id="wider"),
    pytest.param(_mask("L", size=(48, 64)), "the mask must have the image's size", id="transposed"),
    pytest.param(_mask("L", fill=False), "selects no pixel", id="all-empty"),
    pytest.param(png_claiming(100_000, 100_000), "(DecompressionBombError", id="bomb"),
    pytest.param(png_claiming(64, 48), "not a readable image", id="right-size-no-data"),
    pytest.param(_mask("L")[:50], "not a readable image", id="truncated"),
    pytest.param(encode(Image.new("L", (64, 48), 255), "GIF"), "not a PNG", id="gif"),
    pytest.param(encode(Image.new("L", (64, 48), 255), "JPEG"), "not a PNG", id="jpeg"),
    pytest.param(encode(Image.new("L", (64, 48), 255), "TIFF"), "not a PNG", id="tiff"),
    pytest.param(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\nshowpage\n", "not a PNG",
                 id="eps-never-reaches-ghostscript"),
    pytest.param(b"", "region.mask_png is empty", id="empty"),
])
def test_bad_masks_are_invalid_argument(client, mask, phrase):
    request = pb.SearchRequest(region=pb.RegionQuery(image=pb.Image(data=hostile_image("webp").data),
                                                     region=pb.Region(mask_png=mask)))
    _expect(INVALID, phrase, client.search, request)


# ---- scalars and ids ------------------------------------------------------------------------

def test_min_score_nan_and_infinities(client):
    _expect(INVALID, "min_score is NaN", client.search_segment, 1, min_score=math.nan)
    assert not client.search_segment(1, min_score=math.inf).hits
    assert len(client.search_segment(1, min_score=-math.inf, top_k=4).hits) == 4
    _expect(INVALID, "min_area_fraction must lie in [0, 1]", client.search_segment, 1, min_area_fraction=math.nan)
    _expect(INVALID, "min_area_fraction must lie in [0, 1]", client.search_segment, 1, min_area_fraction=-math.inf)


@pytest.mark.parametrize("top_k", [INT32_MIN, -1, 101, INT32_MAX])
def test_top_k_extremes(client, top_k):
    _expect(INVALID, "top_k must be between 1 and 100", client.search_segment, 1, top_k=top_k)


@pytest.mark.parametrize("segment_id", [2 ** 31, 2 ** 63 - 1, 2 ** 63, UINT64_MAX])
def test_huge_segment_ids_are_not_found(client, segment_id):
    _expect(grpc.StatusCode.NOT_FOUND, f"segment id {segment_id} is not in the index", client.get_segment, segment_id)
    _expect(grpc.StatusCode.NOT_FOUND, f"segment id {segment_id} is not in the index",
            client.search_segment, segment_id)


@pytest.mark.parametrize("count", [INT32_MIN, -1, 1025, INT32_MAX])
def test_num_segments_extremes(client, count):
    _expect(INVALID, "num_segments must be between 1 and", client.segment, hostile_image("png_1x1").data, count)


@pytest.mark.parametrize("box", [(INT32_MIN, INT32_MIN, INT32_MAX, INT32_MAX), (0, 0, INT32_MAX, 1),
                                 (INT32_MAX - 1, 0, INT32_MAX, 1)])
def test_int32_extreme_boxes_are_outside(client, box):
    _expect(INVALID, "outside the 64x48 image", client.search_box, hostile_image("webp").data, box)


def test_unicode_and_long_image_ids(client):
    """Ids of exactly 500 UTF-8 bytes work end to end; longer ones are refused with the limit
    (IndexImages and DeleteImages answer INVALID_ARGUMENT, not a skip or NOT_FOUND)."""
    first, second, third = (render(30, 20, seed, "PNG", "RGB") for seed in (5001, 5002, 5003))
    accented, emoji, too_long = "é" * 250, "\U0001F600" * 125, "é" * 251
    added = client.index_images([(accented, first), (emoji, second)])
    assert [i.image_id for i in added.indexed] == [accented, emoji] and not added.skipped
    _expect(INVALID, "at most 500 are allowed", client.index_images, [(too_long, third)])
    record = client.get_segment(added.indexed[1].segment_ids[0])
    assert record.image_id == emoji
    assert client.delete_images([accented, emoji]).num_images == 2
    _expect(INVALID, "image ids are 1..500 bytes", client.delete_images, [too_long])
    _expect(INVALID, "image ids are 1..500 bytes", client.delete_images, [""])
    _expect(grpc.StatusCode.NOT_FOUND, "'/etc/passwd'", client.delete_images, ["/etc/passwd"])


# ---- bytes that are not a message ----------------------------------------------------------

def _undecodable_calls() -> list[Call]:
    bad_utf8 = b"\x0a\x04\x12\x02\xc3\x28"  # Image{image_id: b"\xc3\x28"}: not UTF-8
    nested = b"\x0a" + bytes([len(bad_utf8)]) + bad_utf8  # SearchRequest{region{image{...}}}
    return [Call("GetInfo", (b"\xff\xff\xff",)), Call("GetSegment", (b"\x08",)),
            Call("Segment", (b"\x0a\x05\x0a\x03",)), Call("SearchSimilar", (nested,)),
            Call("DeleteImages", (b"\x0a\x02\xff\xfe",)), Call("IndexImages", (b"\x0a\x04\x12\x02\xc3\x28",)),
            Call("IndexImages", (pb.IndexImageRequest().SerializeToString(), b"\xff"))]


@pytest.mark.parametrize("call", _undecodable_calls(), ids=lambda call: call.method)
def test_undecodable_request_bytes_are_invalid_argument(fuzz_server, call):
    """Regression: gRPC answered INTERNAL ("Exception deserializing request!") for these."""
    fuzz_client = FuzzClient(fuzz_server.address)
    try:
        outcome = fuzz_client.send(call, timeout=20)
    finally:
        fuzz_client.close()
    assert outcome.code == "INVALID_ARGUMENT", outcome
    assert f"the {call.method} request is not a valid protobuf message" in outcome.details


# ---- generated requests ---------------------------------------------------------------------

def test_the_judge_flags_what_breaks_the_contract():
    """`violations` (no server): bad statuses, hangs, and answers that contradict the request."""
    search = Call.of("SearchSimilar", pb.SearchRequest(segment_id=1, top_k=2, min_score=0.5,
                                                       filter=pb.Filter(labels=["grass"])))
    for code in ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "UNAVAILABLE"):
        assert violations(Call.of("GetInfo", pb.GetInfoRequest()), Outcome(code, "boom", None, 0.0))
    assert violations(Call.of("Segment", pb.SegmentRequest()), Outcome("NOT_FOUND", "", None, 0.0))
    assert not violations(search, Outcome("NOT_FOUND", "", None, 0.0))
    hit = pb.Hit(segment_id=1, score=0.9, label="grass")
    good = pb.SearchResponse(hits=[hit, pb.Hit(segment_id=2, score=0.8, label="grass")])
    assert not violations(search, Outcome("OK", "", good, 0.0))
    for bad_hits in ([hit] * 3, [pb.Hit(score=0.6, label="grass"), hit], [pb.Hit(score=0.4, label="grass")],
                     [pb.Hit(score=0.9, label="page")], [pb.Hit(score=0.9, label="grass", mask_png=b"x")]):
        assert violations(search, Outcome("OK", "", pb.SearchResponse(hits=bad_hits), 0.0)), bad_hits
    nan_score = Call.of("SearchSimilar", pb.SearchRequest(segment_id=1, min_score=math.nan))
    assert violations(nan_score, Outcome("NOT_FOUND", "", None, 0.0))  # NaN must be INVALID_ARGUMENT first
    assert violations(Call.of("SearchSimilar", pb.SearchRequest(top_k=-5)), Outcome("OK", "", good, 0.0))


def _normal_query_works(client: SegsearchClient, corpus_dir) -> None:
    assert client.health() == "SERVING"
    hits = client.search_box((corpus_dir / PHOTO).read_bytes(), (0, 0, 64, 64), top_k=3).hits
    assert len(hits) == 3 and hits[0].score > 0.5
    assert client.info().num_images >= 6


def run_generated(fuzz_server, client, corpus_dir, count: int) -> None:
    info = client.info()
    warm_up(client)
    rss_warm = fuzz_server.rss_bytes()
    fuzz_client = FuzzClient(fuzz_server.address)
    try:
        report = fuzz(fuzz_client, Target(tuple(info.label_names), info.model_version), count, timeout=20,
                      fail_fast=True, max_top_k=info.max_top_k)
    finally:
        fuzz_client.close()
    assert report.requests >= count and not report.problems
    assert fuzz_server.alive()
    _normal_query_works(client, corpus_dir)
    growth = fuzz_server.rss_bytes() - rss_warm
    assert growth <= RSS_GROWTH_BOUND, f"RSS grew by {growth / MiB:.0f} MiB over {count} requests"
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= set(report.codes), report.codes


def test_generated_requests_get_proper_statuses(fuzz_server, client, corpus_dir):
    run_generated(fuzz_server, client, corpus_dir, count=1000)


@pytest.mark.slow
def test_ten_thousand_generated_requests(fuzz_server, client, corpus_dir):
    run_generated(fuzz_server, client, corpus_dir, count=10_000)
