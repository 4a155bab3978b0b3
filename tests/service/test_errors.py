"""Every error status the contract names, each with a message that says what was wrong, and
the server still serving afterwards."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from segsearch.service._generated import segment_search_pb2 as pb
from service_helpers import PHOTO, png_bytes

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _photo(corpus_dir) -> bytes:
    return (corpus_dir / PHOTO).read_bytes()  # 256 x 192


def _expect(code, phrase, call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    assert caught.value.code() == code, caught.value.details()
    assert phrase in caught.value.details(), caught.value.details()


@pytest.mark.parametrize("region, phrase", [
    (pb.Region(box=pb.Box(x0=10, y0=10, x1=10, y1=50)), "is empty"),
    (pb.Region(box=pb.Box(x0=-1, y0=0, x1=20, y1=20)), "outside the 256x192 image"),
    (pb.Region(box=pb.Box(x0=200, y0=100, x1=257, y1=150)), "outside the 256x192 image"),
    (pb.Region(point=pb.Point(x=256, y=5)), "outside the 256x192 image"),
    (pb.Region(mask_png=png_bytes(np.full((96, 128), 255, np.uint8))), "the mask must have the image's size"),
    (pb.Region(mask_png=png_bytes(np.zeros((192, 256), np.uint8))), "selects no pixel"),
    (pb.Region(mask_png=b"not a png"), "not a readable image"),
    (pb.Region(), "set mask_png, box or point"),
])
def test_bad_regions_are_invalid_argument(served, corpus_dir, region, phrase):
    request = pb.SearchRequest(region=pb.RegionQuery(image=pb.Image(data=_photo(corpus_dir)), region=region))
    _expect(INVALID, phrase, served.client.search, request)


@pytest.mark.parametrize("data, phrase", [
    (b"", "is empty"),
    (b"this is text, not an image", "not_an_image"),
    (png_bytes(np.zeros((32, 32, 3), np.uint8))[:60], "corrupt"),
])
def test_undecodable_images_are_invalid_argument(served, data, phrase):
    _expect(INVALID, phrase, served.client.search_box, data, (0, 0, 4, 4))
    _expect(INVALID, phrase, served.client.segment, data)


@pytest.mark.parametrize("top_k", [-1, 101, 10_000])
def test_top_k_out_of_range_is_invalid_argument(served, top_k):
    _expect(INVALID, "top_k must be between 1 and 100", served.client.search_segment, 1, top_k=top_k)


def test_other_invalid_requests(served, corpus_dir):
    _expect(INVALID, "has no query", served.client.search, pb.SearchRequest(top_k=3))
    _expect(INVALID, "min_area_fraction must lie in [0, 1]", served.client.search_segment, 1, min_area_fraction=2.0)
    _expect(INVALID, "num_segments must be between 1 and", served.client.segment, _photo(corpus_dir), num_segments=-3)
    _expect(INVALID, "image_ids and segment_ids are empty", served.client.delete_images, [])


def test_unknown_ids_are_not_found(served):
    _expect(grpc.StatusCode.NOT_FOUND, "segment id 999999 is not in the index", served.client.search_segment, 999999)
    _expect(grpc.StatusCode.NOT_FOUND, "segment id 999999 is not in the index", served.client.get_segment, 999999)
    _expect(grpc.StatusCode.NOT_FOUND, "'no-such-image'", served.client.delete_images, ["no-such-image"])


def test_model_version_mismatch_is_failed_precondition(served):
    version = served.client.info().model_version
    _expect(grpc.StatusCode.FAILED_PRECONDITION, f"runs model {version!r}",
            served.client.search_segment, 1, model_version="0123456789abcdef")
    assert served.client.search_segment(1, top_k=1, model_version=version).hits


def test_server_keeps_serving_after_errors(served, corpus_dir):
    with pytest.raises(grpc.RpcError):
        served.client.segment(b"garbage")
    assert served.client.health() == "SERVING"
    assert served.client.search_box(_photo(corpus_dir), (0, 0, 64, 64), top_k=2).hits


def test_oversized_images_are_refused_before_decoding(index_template, checkpoint_path, tmp_path_factory):
    from service_helpers import copy_index, start_server

    from segsearch.service.config import ServiceLimits

    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path,
                           limits=ServiceLimits(max_image_pixels=100 * 100), metrics_port=None)
    try:
        _expect(INVALID, "too_many_pixels", running.client.segment, png_bytes(np.zeros((101, 100, 3), np.uint8)))
        assert running.client.segment(png_bytes(np.zeros((100, 100, 3), np.uint8))).segments
        assert running.client.info().max_image_pixels == 10_000
    finally:
        running.stop()


def test_a_checkpoint_of_another_model_version_is_refused_at_start(index_template, checkpoint_path, tmp_path,
                                                                    tmp_path_factory):
    """The server never serves an index with a model that did not build it (FAILED_PRECONDITION's
    counterpart at load time: the server does not come up, and says which versions differ)."""
    from segsearch.errors import IndexStoreError
    from segsearch.service.server import SegsearchServer
    from segsearch.service.config import ServerConfig
    from segsearch.spml.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    name = next(iter(checkpoint.state_dict))
    checkpoint.state_dict[name] = checkpoint.state_dict[name] + 0.01
    other = tmp_path / "other.ckpt"
    other_version = save_checkpoint(checkpoint, other)
    from service_helpers import copy_index

    index_dir = copy_index(index_template, tmp_path_factory)
    server = SegsearchServer(ServerConfig(index_dir=str(index_dir), checkpoint=str(other), port=0,
                                          metrics_port=None))
    server.start()
    try:
        with pytest.raises(IndexStoreError, match=f"the model is version '{other_version}'"):
            server.load()
    finally:
        server.stop(grace=0)


def test_the_configured_pixel_limit_is_the_one_quoted(index_template, checkpoint_path, tmp_path_factory):
    """Not PIL's 89478485 / 178956970: the server's --max-pixels, whatever PIL's default."""
    from segsearch.service.config import ServiceLimits
    from segsearch.testing.images import png_claiming
    from service_helpers import copy_index, start_server

    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path,
                           limits=ServiceLimits(max_image_pixels=1_000_000))
    try:
        for width, height in ((1500, 1000), (20_000, 10_000)):  # over our limit; far over PIL's too
            with pytest.raises(grpc.RpcError) as caught:
                running.client.segment(png_claiming(width, height, colour=2))
            details = caught.value.details()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "the limit of 1000000" in details and "89478485" not in details and "--max-pixels" in details
    finally:
        running.stop()


def test_a_query_image_counts_in_the_budget_until_its_request_ends(served):
    """Decoding reserves its pixels; a query then keeps them reserved while it works on
    full-size arrays, and gives them back when the request ends (request_scope's on_exit)."""
    from segsearch.service.request_scope import RequestScope, request_scope
    from service_helpers import png_bytes, mosaic_images

    analyzer = served.server.servicer.app.analyzer
    budget = analyzer.decode_budget
    assert budget is not None and budget.in_use == 0
    with request_scope(RequestScope("SearchSimilar")):
        decoded = analyzer.decode(png_bytes(mosaic_images(1, seed=3)[0]))
        assert budget.in_use == decoded.original_size[0] * decoded.original_size[1] == 96 * 96
    assert budget.in_use == 0
