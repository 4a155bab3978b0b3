"""IndexStore: LMDB + FAISS together, with real LMDB and FAISS in temporary directories."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from segsearch.errors import IndexStoreError
from segsearch.indexer.index_store import VECTORS_FILE, IndexStore
from segsearch.indexer.records import ImageRecord, encode_segment
from segsearch.indexer.rle import decode_mask
from segsearch.indexer.vector_index import VectorIndex
from segsearch.testing.crash import abandon
from indexer_helpers import DIM, MODEL, fill, make_batch, make_image

SPECS = ["flat", "hnsw", "IVF8,Flat"]  # IVF8 needs 312 vectors; tests use >= 400 segments


def neighbours(store: IndexStore, queries: np.ndarray, k: int = 5) -> list:
    """Search results as (image id, box) so that they survive new segment ids."""
    return [[(h.segment.image_id, h.segment.box) for h in row] for row in store.search(queries, k)]


@pytest.fixture(params=SPECS)
def store(request, tmp_path):
    store = IndexStore.create(tmp_path / "index", MODEL, DIM, request.param)
    yield store
    store.close()


def test_records_round_trip_with_assigned_ids(tmp_path):
    with IndexStore.create(tmp_path / "index", MODEL, DIM) as store:
        image, segments = make_image("a")
        result = store.add_images([(image, segments)])
        assert result.segment_ids == [1, 2, 3, 4] and result.image_ids == ["a"] and not result.skipped
        stored_image = store.get_image("a")
        assert stored_image.segment_ids == [1, 2, 3, 4] and stored_image.sha256 == image.sha256
        for sid, original in zip(result.segment_ids, segments):
            got = store.get_segment(sid)
            assert got.segment_id == sid
            assert got.box == original.box and got.label == original.label
            assert np.array_equal(got.prototype, original.prototype)
            assert got.mask_rle == original.mask_rle and got.mask_shape == (12, 20)
            assert decode_mask(got.mask_rle, got.mask_shape)[:, got.box[0]:got.box[2]].all()
        stats = store.stats()
        assert (stats.num_images, stats.num_segments, stats.faiss_vectors) == (1, 4, 4)
        assert stats.model_version == MODEL and stats.generation == 1


def test_each_segment_finds_itself(store):
    fill(store)
    lmdb_ids, faiss_ids = store.segment_ids()
    assert lmdb_ids.size == 480 and np.array_equal(lmdb_ids, faiss_ids)
    assert store.stats().faiss_index.split(" ")[0] != "Flat" or store.meta.index_type == "flat"
    protos = np.stack([store.get_segment(int(i)).prototype for i in lmdb_ids])
    hits = store.search(protos, 3)
    assert [row[0].segment_id for row in hits] == lmdb_ids.tolist()
    assert all(abs(row[0].score - 1.0) < 1e-5 for row in hits)
    assert store.verify() == []


def test_reindexing_the_same_content_adds_nothing(store):
    fill(store, 40, 20)
    before = store.stats()
    again = store.add_images(make_batch(["img0003", "img0010"]))
    assert again.segment_ids == [] and again.image_ids == []
    assert {image_id for image_id, _ in again.skipped} == {"img0003", "img0010"}
    assert store.stats().generation == before.generation  # nothing was written
    renamed = ImageRecord("other-name", "file:///x", 20, 12, store.get_image("img0005").sha256)
    result = store.add_images([(renamed, [])])
    assert result.image_ids == [] and "already indexed as image 'img0005'" in result.skipped[0][1]
    changed = store.add_images([make_image("img0007", content="edited")])
    assert changed.image_ids == [] and "different content" in changed.skipped[0][1]
    mixed = store.add_images(make_batch(["img0001", "brand-new"]))
    assert mixed.image_ids == ["brand-new"] and len(mixed.segment_ids) == 4
    assert store.stats().num_images == before.num_images + 1
    assert store.verify() == []


def test_duplicate_within_one_batch_is_stored_once(tmp_path):
    with IndexStore.create(tmp_path / "index", MODEL, DIM) as store:
        result = store.add_images([make_image("a"), make_image("a")])
        assert result.image_ids == ["a"] and len(result.skipped) == 1
        assert store.stats().num_segments == 4


def test_delete_removes_from_search_and_lmdb(store):
    fill(store)
    gone_ids = store.get_image("img0007").segment_ids + store.get_image("img0100").segment_ids
    gone_protos = np.stack([store.get_segment(i).prototype for i in gone_ids])
    removed = store.delete_images(["img0007", "img0100"])
    assert sorted(removed) == sorted(gone_ids)
    for sid in gone_ids:
        with pytest.raises(IndexStoreError, match=f"segment id {sid}"):
            store.get_segment(sid)
    with pytest.raises(IndexStoreError, match="img0007"):
        store.get_image("img0007")
    assert not store.has_image("img0007") and store.has_image("img0008")
    found = {h.segment_id for row in store.search(gone_protos, 10) for h in row}
    assert not found & set(gone_ids)
    lmdb_ids, faiss_ids = store.segment_ids()
    assert np.array_equal(lmdb_ids, faiss_ids) and not np.isin(gone_ids, faiss_ids).any()
    assert store.stats().num_images == 118 and store.verify() == []


def test_delete_unknown_image_lists_it_and_deletes_nothing(store):
    fill(store, 20, 20)
    with pytest.raises(IndexStoreError, match="'nope'") as info:
        store.delete_images(["img0001", "nope"])
    assert "img0001" not in str(info.value)
    assert store.get_image("img0001").segment_ids and store.stats().num_images == 20


def test_delete_then_readd_gives_the_same_results(store):
    """Nothing is lost: the same neighbours (by image and box), new ids allowed."""
    fill(store)
    queries = np.random.default_rng(3).standard_normal((40, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    before = neighbours(store, queries)
    victims = ["img0002", "img0050", "img0051", "img0119"]
    old_ids = [i for name in victims for i in store.get_image(name).segment_ids]
    store.delete_images(victims)
    assert neighbours(store, queries) != before  # the deletion is visible...
    store.add_images(make_batch(victims))
    assert neighbours(store, queries) == before  # ...and undone by re-adding
    new_ids = [i for name in victims for i in store.get_image(name).segment_ids]
    assert min(new_ids) > max(old_ids)  # ids are never reused
    assert store.verify() == []


def test_reopen_keeps_everything_and_refuses_another_model(tmp_path):
    with IndexStore.create(tmp_path / "index", MODEL, DIM, "hnsw") as store:
        fill(store, 60, 30)
        store.delete_images(["img0004"])
        queries = np.stack([store.get_segment(i).prototype for i in (1, 50, 200)])
        before = neighbours(store, queries)
    with pytest.raises(IndexStoreError, match="'spml-test-1'.*'spml-other'") as info:
        IndexStore.open(tmp_path / "index", "spml-other")
    assert "new --out" in str(info.value)
    with IndexStore.open(tmp_path / "index", MODEL) as store:
        assert neighbours(store, queries) == before
        assert store.stats().num_images == 59 and store.verify() == []
    with IndexStore.open(tmp_path / "index") as store:  # no version given: anything goes
        assert store.meta.model_version == MODEL


def test_segments_of_another_model_version_are_refused(tmp_path):
    with IndexStore.create(tmp_path / "index", MODEL, DIM) as store:
        with pytest.raises(IndexStoreError, match="model version 'spml-v9'"):
            store.add_images([make_image("a", model="spml-v9")])
        assert store.stats().num_segments == 0 and store.verify() == []


def test_create_and_open_refuse_wrong_directories(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(IndexStoreError, match="not empty"):
        IndexStore.create(tmp_path / "full", MODEL, DIM)
    with pytest.raises(IndexStoreError, match="no segsearch index"):
        IndexStore.open(tmp_path / "missing")
    with pytest.raises(IndexStoreError, match="factory"):
        IndexStore.create(tmp_path / "bad", MODEL, DIM, "nonsense42")
    assert not (tmp_path / "bad").exists()  # nothing half-made


def test_one_writer_at_a_time(tmp_path):
    store = IndexStore.create(tmp_path / "index", MODEL, DIM)
    try:
        with pytest.raises(IndexStoreError, match="open for writing"):
            IndexStore.open(tmp_path / "index")
    finally:
        store.close()
    IndexStore.open(tmp_path / "index").close()  # released on close


def test_save_every_defers_the_faiss_file_and_close_flushes(tmp_path):
    store = IndexStore.create(tmp_path / "index", MODEL, DIM, save_every=3)
    fill(store, 40, 20)  # 2 chunks < 3
    assert VectorIndex.load(tmp_path / "index" / VECTORS_FILE).generation == 0
    store.add_images(make_batch(["late"]))  # third chunk -> saved
    assert VectorIndex.load(tmp_path / "index" / VECTORS_FILE).generation == 3
    store.delete_images(["late"])
    store.close()
    on_disk = VectorIndex.load(tmp_path / "index" / VECTORS_FILE)
    assert on_disk.generation == 4 and len(on_disk) == 160


def test_rebuild_vectors_rechooses_the_type_for_the_size(tmp_path, monkeypatch):
    from segsearch.indexer import vector_index

    with IndexStore.create(tmp_path / "index", MODEL, DIM, "auto") as store:
        fill(store, 100, 50)
        assert store.stats().faiss_index == "Flat"
        monkeypatch.setattr(vector_index, "AUTO_EXACT_MAX", 300)
        store.rebuild_vectors()
        assert store.stats().faiss_index.startswith("HNSW32,Flat")
        protos = np.stack([store.get_segment(i).prototype for i in (1, 99, 400)])
        assert [row[0].segment_id for row in store.search(protos, 1)] == [1, 99, 400]
        assert store.verify() == []
    assert VectorIndex.load(tmp_path / "index" / VECTORS_FILE).factory == "HNSW32,Flat"


def test_verify_reports_records_that_break_the_contracts(tmp_path):
    with IndexStore.create(tmp_path / "index", MODEL, DIM) as store:
        fill(store, 20, 20)
        rogue = make_image("img0001")[1][0]
        rogue.segment_id, rogue.model_version = 1, "spml-intruder"
        metadata = store._metadata
        with metadata._env.begin(write=True) as txn:  # bypass the store's checks on purpose
            txn.put((1).to_bytes(8, "big"), encode_segment(rogue), db=metadata._dbs["segments"])
            txn.put((9999).to_bytes(8, "big"), encode_segment(rogue), db=metadata._dbs["segments"])
        problems = "\n".join(store.verify())
        assert "model version 'spml-intruder'" in problems
        assert "LMDB but not FAISS: [9999]" in problems
        assert "meta counts 80 segments, LMDB holds 81" in problems
        assert "disagree" in problems


def test_reader_refresh_sees_a_writer_process(tmp_path):
    root = tmp_path / "index"
    with IndexStore.create(root, MODEL, DIM) as store:
        fill(store, 20, 20)
    reader = IndexStore.open(root, MODEL, read_only=True)
    try:
        with pytest.raises(IndexStoreError, match="read-only"):
            reader.add_images(make_batch(["x"]))
        writer = textwrap.dedent(f"""
            import sys; sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
            from indexer_helpers import IndexStore, make_batch
            with IndexStore.open({str(root)!r}) as s:
                s.add_images(make_batch(["new1", "new2"]))
                s.delete_images(["img0003"])
        """)
        subprocess.run([sys.executable, "-c", writer], check=True, timeout=60)
        query = make_image("new1")[1][2].prototype
        assert reader.refresh() is True
        assert reader.search(query, 1)[0][0].segment.image_id == "new1"
        lmdb_ids, faiss_ids = reader.segment_ids()
        assert np.array_equal(lmdb_ids, faiss_ids) and reader.verify() == []
        assert reader.refresh() is False
    finally:
        reader.close()


# ---- the FAISS snapshot policy ----------------------------------------------------------------

def test_snapshot_policy_saves_by_size_time_or_chunks():
    from segsearch.indexer.config import SnapshotPolicy

    policy = SnapshotPolicy(min_vectors=100, fraction=0.05, max_seconds=60)
    assert not policy.due(0, 0, 10_000, 999)  # nothing unsaved
    assert not policy.due(99, 3, 1_000, 1)  # under both the floor and 5%
    assert not policy.due(400, 3, 10_000, 1)  # over the floor, under 5% of 10k
    assert policy.due(500, 3, 10_000, 1) and policy.due(100, 1, 1_000, 1)
    assert policy.due(1, 1, 10_000, 60)  # too long since the last save
    assert SnapshotPolicy.every(2).due(1, 2, 10_000, 0) and not SnapshotPolicy.every(2).due(1, 1, 10_000, 0)


def test_default_policy_defers_the_faiss_write_and_the_open_replays_from_lmdb(tmp_path):
    """Commits stay durable (LMDB) without rewriting FAISS; a writer killed before its close
    (simulated: the file is left as it was) loses nothing, and the open says what it replayed."""
    root = tmp_path / "index"
    store = IndexStore.create(root, MODEL, DIM)
    fill(store, 40, 10)
    store.flush()
    saved = (root / VECTORS_FILE).read_bytes()
    store.add_images(make_batch(["after1", "after2"]))  # 8 vectors: far under the policy's bound
    assert (root / VECTORS_FILE).read_bytes() == saved  # not rewritten by the commit
    store.delete_images(["img0003"])
    abandon(store)  # "kill -9": no close, no flush (LMDB and the lock go with the process)
    with IndexStore.open(root, MODEL) as reopened:
        assert reopened.last_replay.added == 8 and reopened.last_replay.removed == 4
        assert reopened.last_replay.seconds < 5
        assert reopened.verify() == [] and reopened.has_image("after2") and not reopened.has_image("img0003")
