"""Crash safety: kill -9 at random points, injected faults between the two stores, a full map.

The contract: a segment id exists for search only if both LMDB and FAISS hold it, and a crash
at any point leaves them consistent after the next open.
"""

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from segsearch.errors import IndexStoreError
from segsearch.indexer.index_store import VECTORS_FILE, IndexStore
from segsearch.indexer.records import LEVEL_FINE, LEVEL_REGION
from segsearch.indexer.rle import decode_mask
from segsearch.indexer.vector_index import VectorIndex

from indexer_helpers import DIM, MODEL, fill, make_batch, make_image

CHUNKS, PER_CHUNK = 24, 5

# Adds CHUNKS chunks of PER_CHUNK images, deleting the first image of each chunk right after,
# printing the chunk number when both are committed. Re-running it resumes: images already
# indexed (same sha256) are skipped, a deleted one is re-added and deleted again.
CHILD = textwrap.dedent(f"""
    import sys
    from pathlib import Path
    sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]  # the helpers
    from indexer_helpers import DIM, MODEL, IndexStore, make_batch
    root, spec = Path(sys.argv[1]), sys.argv[2]
    save_every = None if sys.argv[3] == "policy" else int(sys.argv[3])  # policy: the default snapshot rule
    if len(sys.argv) > 4:  # die by SIGKILL at the N-th pass through a chosen point
        import os, signal
        from segsearch.indexer.metadata_store import MetadataStore
        point, at, calls = sys.argv[4], int(sys.argv[5]), [0]
        def die_here():
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
        if point == "after_lmdb_commit":
            write = MetadataStore._write
            def _write(self, body):
                write(self, body)
                die_here()
            MetadataStore._write = _write
        else:  # "mid_faiss_save": temp file written and fsynced, not yet renamed
            replace = os.replace
            def _replace(src, dst):
                die_here()
                replace(src, dst)
            os.replace = _replace
    if root.exists():
        store = IndexStore.open(root, MODEL, save_every=save_every)
    else:
        store = IndexStore.create(root, MODEL, DIM, spec, save_every=save_every)
    for c in range({CHUNKS}):
        names = [f"c{{c:03d}}-{{j}}" for j in range({PER_CHUNK})]
        store.add_images(make_batch(names))
        store.delete_images([names[0]])
        print(c, flush=True)
    store.close()
    print("done", flush=True)
""")


def _run_child(root: Path, spec: str, save_every: int | str, kill_after_lines: int | None, pause: float,
               *suicide: str) -> bool:
    """Run the indexing child; SIGKILL it after it printed `kill_after_lines` lines. True if done."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), spec, str(save_every), *suicide],
                            stdout=subprocess.PIPE, text=True)
    try:
        lines = 0
        while kill_after_lines is None or lines < kill_after_lines:
            line = proc.stdout.readline()
            if not line or line.strip() == "done":
                proc.wait(timeout=60)
                if proc.returncode == -signal.SIGKILL and suicide:
                    return False
                assert proc.returncode == 0, "the indexing child failed"
                return True
            lines += 1
        time.sleep(pause)  # land somewhere inside a later chunk: LMDB txn, FAISS add or save
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return False
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _assert_consistent(store: IndexStore) -> None:
    assert store.verify() == []
    lmdb_ids, faiss_ids = store.segment_ids()
    assert np.array_equal(lmdb_ids, faiss_ids)


def _assert_final_state(root: Path) -> None:
    """What a single uninterrupted run leaves, and FAISS and LMDB in agreement."""
    with IndexStore.open(root, MODEL) as store:
        _assert_consistent(store)
        expected = {f"c{c:03d}-{j}" for c in range(CHUNKS) for j in range(1, PER_CHUNK)}
        indexed = {image.image_id for image in store._metadata.iter_images()}
        assert indexed == expected  # every image exactly once (a dict key), deleted ones gone
        stats = store.stats()
        assert stats.num_segments == 4 * len(expected) == store.segment_ids()[0].size
        query = make_image("c017-3")[1][1].prototype
        assert store.search(query, 1)[0][0].segment.image_id == "c017-3"
    assert VectorIndex.load(root / VECTORS_FILE).generation == stats.generation


@pytest.mark.parametrize("point,at,spec", [
    ("after_lmdb_commit", 8, "flat"),  # 1 = create, then add / delete alternate: 8 is an add
    ("after_lmdb_commit", 9, "hnsw"),  # a delete
    ("mid_faiss_save", 8, "hnsw"),
])
def test_kill_9_inside_the_commit_window(tmp_path, point, at, spec):
    """SIGKILL exactly between the LMDB commit and the FAISS file replace."""
    root = tmp_path / "index"
    assert not _run_child(root, spec, 1, None, 0.0, point, str(at))
    with IndexStore.open(root, MODEL, read_only=True, repair=False) as raw:
        assert raw.verify() != []  # the crash really left the two stores apart...
    if point == "mid_faiss_save":
        assert list(root.glob(f".{VECTORS_FILE}.tmp-*"))
    with IndexStore.open(root, MODEL) as store:  # ...and the next open puts them together
        _assert_consistent(store)
    assert not list(root.glob(f".{VECTORS_FILE}.tmp-*"))
    assert _run_child(root, spec, 1, None, 0.0)
    _assert_final_state(root)


@pytest.mark.parametrize("save_every", [2, "policy"])
def test_kill_9_at_random_points_then_resume(tmp_path, save_every):
    """With a snapshot every 2 chunks, and with the default policy (which here, on a small
    index, writes the FAISS file only at close: every kill leaves it behind LMDB)."""
    spec = "hnsw"
    root = tmp_path / "index"
    rng = random.Random(1234)
    kills = 0
    for _ in range(4):
        if _run_child(root, spec, save_every, rng.randint(1, CHUNKS // 2), rng.uniform(0, 0.02)):
            break
        kills += 1
        with IndexStore.open(root, MODEL) as store:  # the next open repairs whatever was cut
            _assert_consistent(store)
    assert kills >= 3
    assert _run_child(root, spec, save_every, None, 0.0)
    _assert_final_state(root)


def _fail(*args, **kwargs):
    raise OSError("injected fault")


@pytest.mark.parametrize("spec", ["flat", "hnsw", "IVF8,Flat"])
def test_lmdb_committed_but_faiss_not_saved_is_repaired_on_open(tmp_path, monkeypatch, caplog, spec):
    root = tmp_path / "index"
    store = IndexStore.create(root, MODEL, DIM, spec, save_every=1)  # a FAISS save after every commit
    fill(store, 100, 50)
    monkeypatch.setattr(VectorIndex, "save", _fail)
    with pytest.raises(OSError):
        store.add_images(make_batch(["late1", "late2"]))  # LMDB commit happened
    with pytest.raises(OSError):
        store.delete_images(["img0001", "img0002"])
    with pytest.raises(OSError):
        store.close()  # the flush fails too; LMDB and the lock are released anyway
    monkeypatch.undo()
    assert VectorIndex.load(root / VECTORS_FILE).generation == 2  # the file lags LMDB
    with caplog.at_level(logging.WARNING), IndexStore.open(root, MODEL) as store:
        _assert_consistent(store)
        assert store.meta.generation == 4
        late = store.get_image("late2").segment_ids
        hits = store.search(np.stack([store.get_segment(i).prototype for i in late]), 1)
        assert [row[0].segment_id for row in hits] == late
        assert not store.image_id_for_sha256(make_image("img0001")[0].sha256)
    assert str(root / VECTORS_FILE) in caplog.text and "generation 2" in caplog.text
    assert VectorIndex.load(root / VECTORS_FILE).generation == 4  # the repair was saved


@pytest.mark.parametrize("spec", ["flat", "hnsw"])
def test_failed_in_memory_update_is_repaired_before_the_next_operation(tmp_path, monkeypatch, spec):
    with IndexStore.create(tmp_path / "index", MODEL, DIM, spec) as store:
        fill(store, 40, 20)
        monkeypatch.setattr(VectorIndex, "add", _fail)
        with pytest.raises(OSError):
            store.add_images(make_batch(["x"]))
        monkeypatch.undo()
        hits = store.search(make_image("x")[1][2].prototype, 1)  # repairs first
        assert hits[0][0].segment.image_id == "x"
        _assert_consistent(store)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_faiss_file_is_rebuilt_from_lmdb(tmp_path, caplog, damage):
    root = tmp_path / "index"
    with IndexStore.create(root, MODEL, DIM, "hnsw") as store:
        fill(store, 60, 30)
        store.delete_images(["img0005"])
        queries = np.stack([store.get_segment(i).prototype for i in (3, 77, 150)])
        before = [[h.segment_id for h in row] for row in store.search(queries, 5)]
    path = root / VECTORS_FILE
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-500])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    else:
        path.unlink()
    with pytest.raises(IndexStoreError, match="vectors.faiss"):
        IndexStore.open(root, MODEL, repair=False)
    with caplog.at_level(logging.WARNING), IndexStore.open(root, MODEL) as store:
        _assert_consistent(store)
        assert [[h.segment_id for h in row] for row in store.search(queries, 5)] == before
    assert str(path) in caplog.text and "rebuilding it from the LMDB store" in caplog.text
    assert len(VectorIndex.load(path)) == 236


def test_faiss_file_of_another_index_is_not_trusted(tmp_path, caplog):
    """Two indexes of the same corpus share ids and generations; the model version tells them apart."""
    for name, model in (("a", MODEL), ("b", "spml-other")):
        with IndexStore.create(tmp_path / name, model, DIM) as store:
            batch = make_batch(["img1", "img2"])
            for _, segments in batch:
                for seg in segments:
                    seg.model_version = model
            store.add_images(batch)
    (tmp_path / "a" / VECTORS_FILE).write_bytes((tmp_path / "b" / VECTORS_FILE).read_bytes())
    with pytest.raises(IndexStoreError, match="belongs to another index"):
        IndexStore.open(tmp_path / "a", repair=False)
    with caplog.at_level(logging.WARNING), IndexStore.open(tmp_path / "a") as store:
        _assert_consistent(store)
        query = store.get_segment(3).prototype
        assert store.search(query, 1)[0][0].segment_id == 3
    assert "belongs to another index" in caplog.text


def test_verify_without_repair_reports_the_disagreement(tmp_path, monkeypatch):
    root = tmp_path / "index"
    store = IndexStore.create(root, MODEL, DIM, save_every=1)
    fill(store, 20, 20)
    monkeypatch.setattr(VectorIndex, "save", _fail)
    with pytest.raises(OSError):
        store.add_images(make_batch(["late"]))
    with pytest.raises(OSError):
        store.close()
    monkeypatch.undo()
    with IndexStore.open(root, MODEL, read_only=True, repair=False) as raw:
        problems = "\n".join(raw.verify())
        assert "4 segment id(s) in LMDB but not FAISS: [81, 82, 83, 84]" in problems
        assert "generation 1, LMDB is at 2" in problems
    with IndexStore.open(root, MODEL, read_only=True) as repaired:  # repaired in memory only
        assert repaired.verify() == []
    assert VectorIndex.load(root / VECTORS_FILE).generation == 1


def test_leftover_temp_file_of_an_interrupted_save_is_removed(tmp_path):
    root = tmp_path / "index"
    IndexStore.create(root, MODEL, DIM).close()
    stale = root / f".{VECTORS_FILE}.tmp-99999"
    stale.write_bytes(b"half a file")
    with IndexStore.open(root, MODEL) as store:
        assert store.verify() == []
    assert not stale.exists()


def test_full_map_is_a_clear_error_and_the_store_stays_consistent(tmp_path):
    root = tmp_path / "index"
    store = IndexStore.create(root, MODEL, DIM, map_size=1 << 20)
    with pytest.raises(IndexStoreError, match=r"metadata map .* is full .*reopen the index") as info:
        for c in range(200):
            store.add_images(make_batch(f"c{c}-{j}" for j in range(20)))
    assert "nothing from this batch was written" in str(info.value)
    failed = f"c{c}-0"
    with pytest.raises(IndexStoreError):
        store.get_image(failed)
    _assert_consistent(store)
    assert store.search(make_image("c0-3")[1][0].prototype, 1)[0][0].segment.image_id == "c0-3"
    store.close()
    with IndexStore.open(root, MODEL, map_size=1 << 24) as bigger:
        assert bigger.add_images(make_batch(f"c{c}-{j}" for j in range(20))).image_ids
        _assert_consistent(bigger)


# Adds chunks of images stored at two levels (4 fine segments, 2 regions), printing each chunk.
LEVELS_CHILD = textwrap.dedent(f"""
    import sys
    from pathlib import Path
    sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
    from indexer_helpers import DIM, MODEL, IndexStore, make_image, with_regions
    root = Path(sys.argv[1])
    store = IndexStore.open(root, MODEL) if root.exists() else IndexStore.create(root, MODEL, DIM, "flat")
    for c in range(20):
        store.add_images([with_regions(*make_image(f"l{{c:02d}}-{{j}}")) for j in range(3)])
        print(c, flush=True)
    store.close()
    print("done", flush=True)
""")


def _assert_families_whole(store: IndexStore) -> None:
    """Every image has its 4 fine segments and 2 regions, each fine segment's parent a region
    of its own image covering it, each region the parent of exactly 2."""
    for image in store._metadata.iter_images():
        segments = [store.get_segment(sid) for sid in image.segment_ids]
        regions = {s.segment_id for s in segments if s.level == LEVEL_REGION}
        fine = [s for s in segments if s.level == LEVEL_FINE]
        assert len(regions) == 2 and len(fine) == 4
        assert sorted(s.parent_id for s in fine) == sorted(list(regions) * 2)
        for s in fine:
            parent = store.get_segment(s.parent_id)
            assert parent.image_id == image.image_id
            assert not (decode_mask(s.mask_rle, s.mask_shape) & ~decode_mask(parent.mask_rle, parent.mask_shape)).any()


def test_kill_9_never_leaves_a_region_without_its_pieces(tmp_path):
    """A region and its fine segments are written in one LMDB transaction: whatever a kill
    cuts, an image is stored whole, with both levels and every parent, or not at all."""
    root = tmp_path / "index"
    rng = random.Random(7)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", LEVELS_CHILD, str(root)], stdout=subprocess.PIPE, text=True)
        for _ in range(rng.randint(1, 8)):
            proc.stdout.readline()
        time.sleep(rng.uniform(0, 0.02))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        with IndexStore.open(root, MODEL) as store:
            _assert_consistent(store)
            _assert_families_whole(store)
            assert store.meta.has_regions
    subprocess.run([sys.executable, "-c", LEVELS_CHILD, str(root)], check=True, capture_output=True)
    with IndexStore.open(root, MODEL) as store:
        _assert_consistent(store)
        _assert_families_whole(store)
        assert store.meta.num_images == 60 and store.meta.num_segments == 360
