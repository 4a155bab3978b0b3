"""Faults around a live server: kill -9, a full LMDB map, a full disk, failed fsyncs, damaged files.

The contract (issue 7): an acknowledged IndexImages/DeleteImages survives any crash, a cut one
is all-or-nothing, `segsearch index verify` passes after the restart, and a storage fault is a
clear gRPC status with the store intact, never a silently wrong index.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import grpc
import pytest

from segsearch.cli import main
from segsearch.indexer import metadata_store
from segsearch.indexer.index_store import VECTORS_FILE, IndexStore
from segsearch.testing.faults import KILL_MODES, Check, format_table, run_kill_rounds, run_verify
from service_helpers import copy_index, mosaic_images, png_bytes, start_server


def _assert_nothing_lost(results, final: Check, ledger) -> None:
    checks = [r.check for r in results] + [final]
    problems = [p for c in checks for p in c.problems] + ledger.unexpected
    assert problems == [], "\n".join(problems[:20])
    assert all(c.lost == c.reappeared == c.half == c.verify_failed == 0 for c in checks)
    assert sum(r.acked_adds for r in results) > 0  # there was something to lose


def test_kill_9_of_the_server_during_concurrent_updates_loses_nothing(index_template, checkpoint_path,
                                                                      tmp_path_factory):
    index_dir = copy_index(index_template, tmp_path_factory)
    results, final, ledger = run_kill_rounds(index_dir, checkpoint_path, ["after_lmdb_commit", "random"], seed=1)
    _assert_nothing_lost(results, final, ledger)


@pytest.mark.slow
def test_kill_9_of_the_server_many_rounds(index_template, checkpoint_path, tmp_path_factory):
    index_dir = copy_index(index_template, tmp_path_factory)
    modes = [KILL_MODES[n % len(KILL_MODES)] for n in range(9)]
    results, final, ledger = run_kill_rounds(index_dir, checkpoint_path, modes, seed=7, writers=3)
    print(format_table(results, final))
    _assert_nothing_lost(results, final, ledger)
    assert sum(r.check.unacked_present + r.check.unacked_absent for r in results) > 0  # kills cut calls


# ---- damaged files on start -----------------------------------------------------------------

def _serve_in_process(index_dir: Path, checkpoint: Path, capsys) -> tuple[int, str]:
    code = main(["serve", str(index_dir), "--model", str(checkpoint), "--port", "0", "--no-metrics"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "meta_pages"])
def test_server_refuses_a_damaged_metadata_store_naming_the_file(index_template, checkpoint_path,
                                                                 tmp_path_factory, capsys, damage):
    index_dir = copy_index(index_template, tmp_path_factory)
    data = index_dir / "metadata.lmdb" / "data.mdb"
    raw = data.read_bytes()
    damaged = raw[: len(raw) // 2] if damage == "truncate" else os.urandom(8192) + raw[8192:]
    data.write_bytes(damaged)
    code, err = _serve_in_process(index_dir, checkpoint_path, capsys)
    assert code == 2 and "Traceback" not in err
    assert (str(data) if damage == "truncate" else str(data.parent)) in err
    assert ("is truncated" if damage == "truncate" else "not an LMDB file") in err
    assert data.read_bytes() == damaged  # the refusal did not "fix" the evidence
    assert run_verify(index_dir)[0] == 1


def _results(client, segment_ids, image: bytes) -> list:
    by_id = [[(h.segment_id, round(h.score, 5)) for h in client.search_segment(s, top_k=10).hits]
             for s in segment_ids]
    by_box = [(h.segment_id, round(h.score, 5)) for h in client.search_box(image, (10, 10, 80, 80), top_k=10).hits]
    return by_id + [by_box]


def test_server_rebuilds_a_damaged_faiss_file_and_serves_the_same_results(index_template, checkpoint_path,
                                                                          tmp_path_factory, corpus_dir):
    index_dir = copy_index(index_template, tmp_path_factory)
    image = (corpus_dir / "mosaic2.png").read_bytes()
    with IndexStore.open(index_dir, read_only=True) as store:
        segment_ids = store.segment_ids()[0][::15].tolist()
    running = start_server(index_dir, checkpoint_path)
    before = _results(running.client, segment_ids, image)
    running.stop()
    path = index_dir / VECTORS_FILE
    for damaged in (path.read_bytes()[:-300], os.urandom(path.stat().st_size)):
        path.write_bytes(damaged)
        running = start_server(index_dir, checkpoint_path)
        try:
            assert _results(running.client, segment_ids, image) == before
        finally:
            running.stop()
        assert run_verify(index_dir)[0] == 0


def test_deleted_images_stay_deleted_when_an_older_faiss_file_comes_back(index_template, checkpoint_path,
                                                                         tmp_path_factory, corpus_dir):
    """The FAISS file predates a delete (a lost save, a restored backup): the open must drop the
    deleted vectors from FAISS itself, not only hide them behind LMDB lookups."""
    index_dir = copy_index(index_template, tmp_path_factory)
    old = (index_dir / VECTORS_FILE).read_bytes()
    with IndexStore.open(index_dir) as store:
        deleted = store.delete_images(["mosaic1.png"])
    (index_dir / VECTORS_FILE).write_bytes(old)
    with IndexStore.open(index_dir, read_only=True, repair=False) as raw:
        assert set(deleted) <= set(raw.segment_ids()[1].tolist())  # the file really holds them
    running = start_server(index_dir, checkpoint_path)
    try:
        hits = running.client.search_box((corpus_dir / "mosaic1.png").read_bytes(), (0, 0, 96, 96), top_k=20).hits
        assert hits and "mosaic1.png" not in {hit.image_id for hit in hits}
        with pytest.raises(grpc.RpcError) as caught:
            running.client.get_segment(deleted[0])
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        running.stop()
    assert run_verify(index_dir)[0] == 0
    with IndexStore.open(index_dir, read_only=True, repair=False) as store:  # after another restart
        assert not set(deleted) & set(store.segment_ids()[1].tolist())


# ---- full map, full disk, failed fsync -----------------------------------------------------------

def _add_until_refused(client, prefix: str, per_call: int, calls: int) -> tuple[dict, list[str], grpc.RpcError]:
    """IndexImages of new images until a call fails; ({acknowledged id: segment ids}, refused ids, error)."""
    acked = {}
    for call in range(calls):
        items = [(f"{prefix}{call}-{n}", png_bytes(pixels))
                 for n, pixels in enumerate(mosaic_images(per_call, seed=1000 + call))]
        try:
            response = client.index_images(items)
        except grpc.RpcError as error:
            return acked, [image_id for image_id, _ in items], error
        assert not response.skipped
        acked.update((item.image_id, list(item.segment_ids)) for item in response.indexed)
    raise AssertionError(f"{calls} calls of {per_call} images never filled the store")


def _assert_served(client, acked: dict, before: int) -> None:
    """The server still answers, with every acknowledged image and nothing of the refused call."""
    assert client.info().num_images == before + len(acked)
    for segment_ids in acked.values():
        hits = client.search_segment(segment_ids[0], top_k=3, level="fine").hits  # [0]: a fine segment
        assert hits[0].segment_id == segment_ids[0]


def _assert_stored(index_dir: Path, acked: dict, refused: list[str]) -> None:
    """On disk after the server stopped (an index is not opened twice in one process)."""
    assert run_verify(index_dir)[0] == 0
    with IndexStore.open(index_dir, read_only=True, repair=False) as store:
        assert not any(store.has_image(image_id) for image_id in refused)
        assert all(store.get_image(image_id).segment_ids == ids for image_id, ids in acked.items())


def test_a_full_metadata_map_is_resource_exhausted_and_restart_grows_it(index_template, checkpoint_path,
                                                                        tmp_path_factory, monkeypatch):
    # The server maps max(DEFAULT_MAP_SIZE, 2 x data file): lowering the constant gives it a
    # 256 KiB map, which a few images fill.
    monkeypatch.setattr(metadata_store, "DEFAULT_MAP_SIZE", 256 << 10)
    index_dir = copy_index(index_template, tmp_path_factory)
    running = start_server(index_dir, checkpoint_path)
    try:
        before = running.client.info().num_images
        acked, refused, error = _add_until_refused(running.client, "map", 2, 40)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "metadata map (LMDB)" in error.details() and "is full" in error.details()
        assert "nothing from this batch was written" in error.details()
        assert "restart `segsearch serve`" in error.details()
        _assert_served(running.client, acked, before)
    finally:
        running.stop()
    _assert_stored(index_dir, acked, refused)
    monkeypatch.undo()  # the restart maps the default again, as the message says
    running = start_server(index_dir, checkpoint_path)
    try:
        items = [(f"again-{n}", png_bytes(pixels)) for n, pixels in enumerate(mosaic_images(2, seed=1000 + 99))]
        assert len(running.client.index_images(items).indexed) == 2
    finally:
        running.stop()


def test_a_full_disk_is_resource_exhausted_and_writes_resume_after_freeing_space(
        index_template, checkpoint_path, small_disk):
    index_dir = small_disk / "index"
    shutil.copytree(index_template, index_dir, ignore=shutil.ignore_patterns("writer.lock"))
    stats = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - (400 << 10)))  # leave 400 KiB
    running = start_server(index_dir, checkpoint_path)
    try:
        before = running.client.info().num_images
        acked, refused, error = _add_until_refused(running.client, "disk", 3, 60)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"no space left on the filesystem mounted at {small_disk}" in error.details()
        assert "nothing was written" in error.details() or "nothing from this batch was written" in error.details()
        _assert_served(running.client, acked, before)
        filler.unlink()
        items = [(f"after-{n}", png_bytes(pixels)) for n, pixels in enumerate(mosaic_images(3, seed=1000 + 98))]
        count = len(acked)
        acked.update((item.image_id, list(item.segment_ids)) for item in running.client.index_images(items).indexed)
        assert len(acked) == count + len(items)
    finally:
        running.stop()
    _assert_stored(index_dir, acked, refused)


def test_a_failed_fsync_refuses_writes_until_restart_and_loses_nothing(index_template, checkpoint_path,
                                                                      tmp_path_factory, monkeypatch):
    index_dir = copy_index(index_template, tmp_path_factory)
    running = start_server(index_dir, checkpoint_path, save_every=1)  # every write saves FAISS
    pngs = [png_bytes(pixels) for pixels in mosaic_images(3, seed=77)]
    try:
        client = running.client
        assert client.index_images([("ok", pngs[0])]).indexed
        real_fsync = os.fsync

        def failing_fsync(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fsync", failing_fsync)  # the FAISS save's fsync; LMDB syncs in C
        with pytest.raises(grpc.RpcError) as caught:
            client.index_images([("during", pngs[1])])
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "fsync of" in caught.value.details() and "Input/output error" in caught.value.details()
        monkeypatch.setattr(os, "fsync", real_fsync)
        for call in (lambda: client.index_images([("after", pngs[2])]), lambda: client.delete_images(["ok"])):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "refuses writes since a storage failure" in caught.value.details()
        segment_id = client.search_box(pngs[0], (0, 0, 96, 96), top_k=1).hits[0].segment_id  # reads go on
        assert client.get_segment(segment_id).image_id == "ok"
    finally:
        running.stop()
    with IndexStore.open(index_dir) as store:  # the restart: LMDB committed "during" before the save failed
        assert store.verify() == []
        assert store.has_image("ok") and store.has_image("during") and not store.has_image("after")
