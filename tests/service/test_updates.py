"""IndexImages and DeleteImages go through the indexer's path and show in the next search."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from segsearch.indexer.index_store import IndexStore
from segsearch.service._generated import segment_search_pb2 as pb
from service_helpers import copy_index, metric_value, mosaic_images, png_bytes, start_server


@pytest.fixture
def writable(index_template, checkpoint_path, tmp_path_factory):
    index_dir = copy_index(index_template, tmp_path_factory)
    running = start_server(index_dir, checkpoint_path)
    yield running, index_dir
    running.stop()


def test_indexed_images_are_searchable_at_once_and_deleted_ones_are_gone(writable, corpus_dir):
    running, index_dir = writable
    client = running.client
    before = client.info()
    new = [png_bytes(pixels) for pixels in mosaic_images(2, seed=7)]
    response = client.index_images([
        ("new-a", new[0]),
        pb.IndexImageRequest(image=pb.Image(data=new[1]), uri="file:///elsewhere/b.png"),  # id from sha256
        ("broken", b"not an image"),
        ("copy-of-a", new[0]),  # same content as new-a
        ("mosaic0.png", (corpus_dir / "mosaic0.png").read_bytes()),  # already indexed
    ])
    indexed = {item.image_id: list(item.segment_ids) for item in response.indexed}
    derived = [image_id for image_id in indexed if image_id.startswith("sha256:")]
    assert set(indexed) == {"new-a", *derived} and len(derived) == 1
    skipped = {item.image_id: item.reason for item in response.skipped}
    assert set(skipped) == {"broken", "copy-of-a", "mosaic0.png"}
    assert skipped["broken"].startswith("not_an_image") and "new-a" in skipped["copy-of-a"]
    assert response.num_segments == sum(len(ids) for ids in indexed.values()) > 0

    info = client.info()
    assert info.num_images == before.num_images + 2 == 8
    assert info.num_segments == before.num_segments + response.num_segments
    first_new = indexed["new-a"][0]
    hits = client.search_segment(first_new, top_k=3, level="fine").hits
    assert hits[0].segment_id == first_new and hits[0].image_id == "new-a"
    assert client.get_segment(indexed[derived[0]][0]).image_uri == "file:///elsewhere/b.png"
    assert metric_value(running.metrics_text(), "segsearch_index_images") == 8

    deleted = client.delete_images(["new-a", "mosaic0.png"])
    assert deleted.num_images == 2 and first_new in deleted.deleted_segment_ids
    with pytest.raises(grpc.RpcError) as caught:
        client.get_segment(first_new)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    remaining = [hit for level in ("fine", "region")
                 for hit in client.search_segment(indexed[derived[0]][0], top_k=100, level=level).hits]
    assert {"new-a", "mosaic0.png"}.isdisjoint(hit.image_id for hit in remaining)
    assert len(remaining) == client.info().num_segments

    running.server.stop(grace=1)  # closes the index: both stores must agree on disk
    with IndexStore.open(index_dir) as store:
        assert store.verify() == []
        assert store.meta.num_images == 6


def test_read_only_server_refuses_writes(index_template, checkpoint_path, tmp_path_factory):
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path, read_only=True,
                           metrics_port=None)
    try:
        for call, argument in ((running.client.index_images, [("x", png_bytes(np.zeros((8, 8, 3), np.uint8)))]),
                               (running.client.delete_images, ["mosaic0.png"])):
            with pytest.raises(grpc.RpcError) as caught:
                call(argument)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "read-only" in caught.value.details()
        assert running.client.info().read_only and running.client.info().num_images == 6
    finally:
        running.stop()


@pytest.mark.parametrize("image_id", ["nul\x00inside", "new\nline", "a/../b", " padded", "x" * 501])
def test_unusable_image_ids_are_invalid_argument_and_nothing_is_written(writable, image_id):
    running, _ = writable
    before = running.client.info().num_images
    with pytest.raises(grpc.RpcError) as caught:
        running.client.index_images([(image_id, png_bytes(mosaic_images(1, seed=11)[0]))])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image #0: image_id" in caught.value.details() and "cannot be used" in caught.value.details()
    assert running.client.info().num_images == before


def test_other_content_under_a_taken_id_is_refused_with_its_reason(writable):
    running, _ = writable
    response = running.client.index_images([("mosaic0.png", png_bytes(mosaic_images(1, seed=12)[0]))])
    assert not response.indexed
    [skipped] = response.skipped
    assert skipped.image_id == "mosaic0.png" and skipped.reason.startswith("image_id_taken:")


def test_huge_client_values_come_back_shortened_with_the_real_status(writable):
    """A 1 MiB model_version or 100k unknown ids used to overflow gRPC's metadata limit, so the
    client saw RESOURCE_EXHAUSTED "Stream removed" instead of the real status."""
    running, _ = writable
    client = running.client
    with pytest.raises(grpc.RpcError) as caught:
        client.search_segment(1, top_k=3, model_version="v" * (1 << 20))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(caught.value.details()) <= 1024 and "more characters" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        client.delete_images([f"unknown-{n:06d}" for n in range(100_000)])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and len(caught.value.details()) <= 1024


# ---- write streams that stall ----------------------------------------------------------------

@pytest.fixture
def impatient(index_template, checkpoint_path, tmp_path_factory):
    """A writable server that closes a write stream after 1 s without a message."""
    from segsearch.service.config import ServiceLimits

    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path,
                           limits=ServiceLimits(stream_idle_seconds=1.0))
    yield running
    running.stop()


def _stalling_requests(release, first: bytes | None = None):
    """An IndexImages request stream that sends `first` (if any), then nothing until `release`."""
    if first is not None:
        yield pb.IndexImageRequest(image=pb.Image(data=first, image_id="stall-first"))
    release.wait(30)


def test_idle_write_streams_starve_no_read_and_are_closed(impatient):
    import threading
    import time

    release = threading.Event()
    calls = [impatient.client.stub.IndexImages.future(_stalling_requests(release), timeout=30) for _ in range(8)]
    try:
        time.sleep(0.3)
        refused = [c for c in calls if c.done() and c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(refused) == 6 and "concurrent write requests" in refused[0].details()  # 2 write slots
        for _ in range(10):  # reads have slots of their own
            assert impatient.client.info(timeout=5).num_images == 6
            assert impatient.client.search_segment(1, top_k=3, timeout=5).hits
        assert impatient.client.health(timeout=5) == "SERVING"
        held = [c for c in calls if c not in refused]
        for call in held:  # closed by the server after 1 s of silence
            assert call.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no IndexImages message for 1 s" in call.details()
    finally:
        release.set()


def test_a_stalled_stream_does_not_hold_up_another_writer(impatient):
    import threading
    import time

    release = threading.Event()
    stalled = impatient.client.stub.IndexImages.future(
        _stalling_requests(release, png_bytes(mosaic_images(1, seed=13)[0])), timeout=30)
    try:
        time.sleep(0.3)  # the stalled stream has sent its first image and waits
        started = time.perf_counter()
        deleted = impatient.client.delete_images(["mosaic1.png"], timeout=5)
        assert deleted.num_images == 1 and time.perf_counter() - started < 2.0
        assert stalled.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()
