"""The FAISS wrapper: self-retrieval, deletions and persistence for every index type offered."""

import os

import numpy as np
import faiss
import pytest

from segsearch.errors import IndexStoreError
from segsearch.indexer import vector_index
from segsearch.indexer.vector_index import VectorIndex, ivf_nlist_for

DIM = 16
BUFFERS = {"buffered": vector_index.WRITE_BUFFER_MAX, "unbuffered": 1}


@pytest.fixture(autouse=True, params=BUFFERS.values(), ids=BUFFERS.keys())
def write_buffer(request, monkeypatch):
    """Every test runs with the write buffer (these small indexes then stay in it) and without
    it (a buffer of 1 drains at every add: the main index alone)."""
    monkeypatch.setattr(vector_index, "WRITE_BUFFER_MAX", request.param)
    return request.param
# spec -> the faiss type it must have become at N=2000 vectors
SPECS = {"flat": "Flat", "hnsw": "HNSW32,Flat", "IVF16,Flat": "IVF16,Flat", "auto": "Flat"}


def _unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _filled(spec: str, n: int = 2000, chunk: int = 500) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    index = VectorIndex(DIM, spec)
    ids = np.arange(1000, 1000 + n, dtype=np.int64) * 7  # sparse, large ids
    x = _unit(n)
    for start in range(0, n, chunk):
        index.add(ids[start:start + chunk], x[start:start + chunk])
    return index, ids, x


@pytest.mark.parametrize("spec", SPECS)
def test_each_vector_is_its_own_nearest_neighbour(spec):
    index, ids, x = _filled(spec)
    assert index.factory == SPECS[spec]
    scores, found = index.search(x, 3)
    assert np.array_equal(found[:, 0], ids)
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert np.all(scores[:, 0] >= scores[:, 1])
    assert np.array_equal(index.ids(), ids)


@pytest.mark.parametrize("spec", SPECS)
def test_removed_ids_are_never_returned(spec):
    index, ids, x = _filled(spec)
    gone = ids[::10]  # 10%: below the HNSW compaction threshold, so tombstones are used
    assert index.remove(np.concatenate([gone, [123456789]])) == gone.size  # absent id ignored
    assert index.remove(gone) == 0  # removing twice removes nothing
    assert len(index) == ids.size - gone.size
    assert np.array_equal(index.ids(), np.setdiff1d(ids, gone))
    _, found = index.search(x, 10)
    assert not np.isin(found, gone).any()
    keep = ~np.isin(ids, gone)
    assert np.array_equal(found[keep, 0], ids[keep])
    if spec == "hnsw":  # tombstones in the graph (also one drained since); a buffered vector is removed
        index.drain_buffer()
        assert index.num_tombstones == (0 if vector_index.WRITE_BUFFER_MAX > ids.size else gone.size)


def test_hnsw_tombstones_survive_save_and_load(tmp_path):
    index, ids, x = _filled("hnsw")
    index.drain_buffer()
    gone = ids[:50]
    index.remove(gone)
    index.generation = 42
    index.save(tmp_path / "v.faiss")
    loaded = VectorIndex.load(tmp_path / "v.faiss")
    assert loaded.generation == 42 and loaded.num_tombstones == 50
    _, found = loaded.search(x[:50], 5)
    assert not np.isin(found, gone).any()
    assert np.array_equal(loaded.ids(), ids[50:])


def test_hnsw_compacts_when_tombstones_pile_up():
    index, ids, x = _filled("hnsw", n=1000)
    index.drain_buffer()
    index.remove(ids[:400])  # 40% > HNSW_COMPACT_FRACTION
    assert index.num_tombstones == 0 and index.factory == "HNSW32,Flat"
    assert index._index.ntotal == 600  # physically gone, not just hidden
    _, found = index.search(x[400:], 1)
    assert np.array_equal(found[:, 0], ids[400:])


def test_auto_switches_from_exact_to_hnsw_at_the_threshold(monkeypatch):
    monkeypatch.setattr(vector_index, "AUTO_EXACT_MAX", 700)
    index, ids, x = _filled("auto", n=1000, chunk=300)
    assert index.factory == "HNSW32,Flat"  # switched while adding the third chunk
    _, found = index.search(x, 1)
    assert np.array_equal(found[:, 0], ids)
    assert np.array_equal(index.ids(), ids)


def test_auto_moves_from_hnsw_to_ivf_at_the_second_threshold(monkeypatch):
    monkeypatch.setattr(vector_index, "AUTO_EXACT_MAX", 400)
    monkeypatch.setattr(vector_index, "AUTO_IVF_MIN", 1000)
    index, ids, x = _filled("auto", n=900, chunk=300)
    assert index.factory == "HNSW32,Flat"
    assert index.remove(ids[:5]) == 5  # tombstones must not come back in the IVF
    more = np.arange(900, 1500)
    extra = _unit(600, seed=1)
    index.add(more, extra)  # crosses 1000 live vectors
    assert index.factory == f"IVF{ivf_nlist_for(1495)},Flat"
    live = np.concatenate([ids[5:], more])
    assert np.array_equal(np.sort(index.ids()), np.sort(live))
    _, found = index.search(np.concatenate([x[5:], extra]), 1, effort=ivf_nlist_for(1495))  # every list
    assert np.array_equal(found[:, 0], live)
    index.add(np.arange(1500, 1600), _unit(100))  # an IVF stays IVF as it grows
    assert index.factory == f"IVF{ivf_nlist_for(1495)},Flat"


def test_ivf_spec_trains_with_nlist_from_size(monkeypatch):
    monkeypatch.setattr(vector_index, "AUTO_EXACT_MAX", 1000)
    index, ids, x = _filled("ivf", n=1500)
    assert index.factory == f"IVF{ivf_nlist_for(1500)},Flat"
    _, found = index.search(x, 1)
    assert np.array_equal(found[:, 0], ids)
    assert index.remove(ids[:10]) == 10 and len(index) == 1490


def test_ivf_factory_string_stays_exact_until_it_can_train():
    index = VectorIndex(DIM, "IVF16,Flat")
    index.add(np.arange(100), _unit(100))
    assert index.factory == "Flat"  # 100 < 39 * 16 training points
    index.add(np.arange(100, 700), _unit(600, seed=1))
    assert index.factory == "IVF16,Flat"
    assert np.array_equal(index.ids(), np.arange(700))


def test_search_fills_missing_slots_with_minus_one():
    index = VectorIndex(DIM, "flat")
    scores, found = index.search(_unit(2), 3)
    assert (found == -1).all() and np.isneginf(scores).all()
    index.add(np.array([5]), _unit(1))
    scores, found = index.search(_unit(2), 3)
    assert (found[:, 0] == 5).all() and (found[:, 1:] == -1).all() and np.isneginf(scores[:, 1:]).all()


def test_add_rejects_bad_input():
    index = VectorIndex(DIM, "hnsw")
    index.add(np.arange(1, 11), _unit(10))
    index.drain_buffer()  # into the graph, where removal leaves a tombstone
    with pytest.raises(ValueError, match="already in the vector index"):
        index.add(np.array([2, 30]), _unit(2))
    index.remove(np.array([1]))
    assert index.num_tombstones == 1
    with pytest.raises(ValueError, match="already in the vector index"):  # tombstoned ids too
        index.add(np.array([1]), _unit(1))
    with pytest.raises(ValueError, match="duplicate"):
        index.add(np.array([70, 70]), _unit(2))
    with pytest.raises(ValueError, match="unit-norm"):
        index.add(np.array([80]), 2 * _unit(1))
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        index.add(np.array([90]), np.ones((1, 8), np.float32))


@pytest.mark.parametrize("spec", ["flat", "hnsw", "IVF16,Flat"])
def test_increasing_ids_skip_the_stored_id_scan_and_clashes_are_still_refused(spec, tmp_path, monkeypatch):
    """The index store's ids only grow: the clash check must not scan every stored id per add
    (O(N) at 1M vectors), nor after a load (the file keeps the bound), and must still refuse a
    reused id."""
    index = VectorIndex(DIM, spec)
    index.add(np.arange(0, 700), _unit(700))
    assert index.factory == SPECS[spec]
    index.save(tmp_path / "v.faiss")
    loaded = VectorIndex.load(tmp_path / "v.faiss")
    for current in (index, loaded):
        scans = []
        original = current._stored_ids
        monkeypatch.setattr(current, "_stored_ids", lambda original=original: scans.append(1) or original())
        current.add(np.arange(700, 710), _unit(10, seed=2))
        current.add(np.arange(710, 720), _unit(10, seed=3))
        assert not scans
        with pytest.raises(ValueError, match="already in the vector index"):
            current.add(np.array([705, 9000]), _unit(2, seed=4))
        current.add(np.array([699 + 10_000]), _unit(1, seed=5))
        assert 10_699 in current.ids()


@pytest.mark.parametrize("spec", ["IDMap2,Flat", "nonsense42", "PCA8,Flat"])
def test_bad_or_unsupported_specs_are_refused(spec):
    with pytest.raises(IndexStoreError):
        VectorIndex(DIM, spec)


@pytest.mark.parametrize("spec", SPECS)
def test_save_load_round_trip(tmp_path, spec):
    index, ids, x = _filled(spec)
    index.generation = 9
    index.save(tmp_path / "v.faiss")
    loaded = VectorIndex.load(tmp_path / "v.faiss")
    assert loaded.generation == 9 and loaded.factory == index.factory and loaded.spec == spec
    assert np.array_equal(loaded.ids(), ids)
    assert np.array_equal(loaded.search(x[:100], 5)[1], index.search(x[:100], 5)[1])
    assert [p.name for p in tmp_path.iterdir()] == ["v.faiss"]  # no temp file left


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "v.faiss"
    index, ids, x = _filled("flat", n=100)
    index.save(path)
    before = path.read_bytes()
    index.add(np.array([1]), _unit(1, seed=5))

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        index.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.faiss"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "empty"])
def test_damaged_files_raise_naming_the_file(tmp_path, damage):
    path = tmp_path / "v.faiss"
    _filled("hnsw", n=200)[0].save(path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0xFF
    elif damage == "magic":
        data[:4] = b"XXXX"
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(IndexStoreError, match="corrupt or truncated") as info:
        VectorIndex.load(path)
    assert str(path) in str(info.value)


def test_missing_file_raises_naming_it(tmp_path):
    with pytest.raises(IndexStoreError, match="does not exist") as info:
        VectorIndex.load(tmp_path / "nope.faiss")
    assert os.fspath(tmp_path / "nope.faiss") in str(info.value)


@pytest.mark.parametrize("spec", ["flat", "hnsw", "ivf"])
def test_a_selector_restricts_the_search_and_tombstones_stay_out(spec, monkeypatch):
    monkeypatch.setattr(vector_index, "AUTO_EXACT_MAX", 500)  # "ivf" trains at 500 vectors
    index, ids, x = _filled(spec, n=1000)
    index.remove(ids[:20])  # tombstones in an HNSW, gone in the others
    chosen = ids[::3]  # every third id, the first tombstones among them
    keep = faiss.IDSelectorBatch(chosen)
    _, found = index.search(x[:50], 5, effort=1 << 12, selector=keep)
    assert np.isin(found, chosen).all() and not np.isin(found, ids[:20]).any()
    live = chosen[~np.isin(chosen, ids[:20])]
    _, exact = index.search(x[21:51:3], 1, effort=1 << 12, selector=keep)  # chosen live ids find themselves
    assert np.array_equal(exact[:, 0], ids[21:51:3]) and np.isin(ids[21:51:3], live).all()


# ---- the write buffer beside HNSW/IVF ------------------------------------------------------

@pytest.mark.parametrize("spec", ["hnsw", "IVF16,Flat"])
def test_a_buffered_index_answers_as_the_drained_one(spec):
    """Half the vectors in the main index, half in the buffer: the same hits (IVF searched
    exhaustively, so both are exact) as after draining, level selectors included."""
    index, ids, x = _filled(spec, n=2000)
    index.drain_buffer()
    more_ids, more = np.arange(100_000, 102_000, dtype=np.int64), _unit(2000, seed=3)
    for start in range(0, 2000, 500):  # live-sized adds (below DIRECT_ADD_MIN) are buffered
        index.add(more_ids[start:start + 500], more[start:start + 500])
    queries = np.concatenate([x[:100], more[:100], _unit(50, seed=4)])
    every = {"effort": 16} if spec.startswith("IVF") else {"effort": 4000}
    chosen = faiss.IDSelectorBatch(np.concatenate([ids[::3], more_ids[::3]]))
    buffered = [index.search(queries, 10, **every), index.search(queries, 10, selector=chosen, **every)]
    if vector_index.WRITE_BUFFER_MAX > 2000:
        assert index.num_buffered == 2000
    else:  # drained in the background: the last add may still be set aside, searched exactly
        assert index.num_buffered <= 500
    index.drain_buffer()
    assert index.num_buffered == 0 and len(index) == 4000
    drained = [index.search(queries, 10, **every), index.search(queries, 10, selector=chosen, **every)]
    for (scores, found), (want_scores, want) in zip(buffered, drained):
        assert np.array_equal(found, want)
        np.testing.assert_allclose(scores, want_scores, atol=1e-6)
    assert np.isin(buffered[1][1], np.concatenate([ids[::3], more_ids[::3]])).all()


def test_the_buffer_drains_when_full_and_before_a_save(tmp_path, write_buffer, monkeypatch):
    monkeypatch.setattr(vector_index, "WRITE_BUFFER_MAX", 300)
    index, ids, x = _filled("IVF16,Flat", n=2000, chunk=250)  # exact until 624 vectors, then IVF
    assert index.factory == "IVF16,Flat" and 0 < index._buffer.ntotal < 300  # full ones went out
    assert index.num_buffered < 300 + (300 + 250)  # the buffer, and at most one full one draining
    more_ids = np.arange(50_000, 50_000 + vector_index.DIRECT_ADD_MIN)
    before = index._buffer.ntotal
    index.add(more_ids, _unit(more_ids.size, seed=5))  # a bulk-sized add skips the buffer
    assert index._buffer.ntotal == before and index.remove(more_ids) == more_ids.size
    assert index.remove(ids[-5:]) == 5 and len(index) == 1995  # removed from the buffer
    index.save(tmp_path / "v.faiss")
    assert index.num_buffered == 0
    loaded = VectorIndex.load(tmp_path / "v.faiss")
    assert np.array_equal(loaded.ids(), ids[:-5]) and loaded.num_buffered == 0
    _, found = loaded.search(x[:-5], 1, effort=16)
    assert np.array_equal(found[:, 0], ids[:-5])


def test_ids_in_the_buffer_are_refused_again():
    index, ids, x = _filled("hnsw", n=500)
    assert index.num_buffered == 500 or vector_index.WRITE_BUFFER_MAX < 500  # (else set aside or drained)
    with pytest.raises(ValueError, match="already in the vector index"):
        index.add(ids[:2], x[:2])


def test_compaction_keeps_the_buffered_vectors():
    index, ids, x = _filled("hnsw", n=1000)
    index.drain_buffer()
    more_ids, more = np.arange(90_000, 90_100), _unit(100, seed=6)
    index.add(more_ids, more)  # buffered (or drained at once without a buffer)
    index.remove(ids[:400])  # 40% tombstones: the graph is rebuilt from the live vectors
    assert index.num_tombstones == 0 and index.num_buffered == 0 and len(index) == 700
    _, found = index.search(np.concatenate([x[400:], more]), 1)
    assert np.array_equal(found[:, 0], np.concatenate([ids[400:], more_ids]))


# ---- draining the write buffer in the background ------------------------------------------

def _with_a_draining_buffer(spec, monkeypatch, release):
    """An index of 2,000 vectors whose full buffer (300) is draining in the background; the
    worker waits for the event `release`, so the drain is certainly pending."""
    from segsearch.indexer import background_drain

    monkeypatch.setattr(vector_index, "WRITE_BUFFER_MAX", 300)
    index, ids, x = _filled(spec, n=2000, chunk=700)  # direct adds: nothing buffered
    run = background_drain._Drain._run
    monkeypatch.setattr(background_drain._Drain, "_run", lambda self: (release.wait(10), run(self)))
    more_ids, more = np.arange(90_000, 90_300, dtype=np.int64), _unit(300, seed=7)
    for start in range(0, 300, 100):
        index.add(more_ids[start:start + 100], more[start:start + 100])
    return index, np.concatenate([ids, more_ids]), np.concatenate([x, more])


EVERY = {"IVF16,Flat": 16, "hnsw": 2300}  # effort that makes each search exhaustive
SAMPLE = np.r_[2:2000:20, 2000:2297]  # queries: a tenth of the main index, the drained ones but the last 3


@pytest.mark.parametrize("spec", EVERY)
def test_a_full_buffer_drains_in_the_background_and_stays_searchable(spec, monkeypatch):
    import threading

    release = threading.Event()
    index, ids, x = _with_a_draining_buffer(spec, monkeypatch, release)
    assert index.num_buffered == 300 and len(index) == 2300  # set aside, the worker held back
    _, found = index.search(x[SAMPLE], 1, effort=EVERY[spec])
    assert np.array_equal(found[:, 0], ids[SAMPLE])  # the draining vectors are found, exactly
    assert index.remove(ids[-3:]) == 3 and index.remove(ids[:2]) == 2  # from the drain and the main index
    newest = np.arange(95_000, 95_010, dtype=np.int64)
    index.add(newest, _unit(10, seed=8))  # the worker is not done: this add does not wait
    assert index.num_buffered == 307
    release.set()
    index.drain_buffer()
    assert index.num_buffered == 0 and len(index) == 2305
    live = ids[2:-3]
    assert np.array_equal(index.ids(), np.sort(np.concatenate([live, newest])))
    _, found = index.search(x[SAMPLE], 1, effort=EVERY[spec])
    assert np.array_equal(found[:, 0], ids[SAMPLE])
    _, found = index.search(np.concatenate([x[:2], x[-3:]]), 3, effort=EVERY[spec])
    assert not np.isin(found, np.concatenate([ids[:2], ids[-3:]])).any()  # removed stay removed


@pytest.mark.parametrize("spec", EVERY)
def test_a_pending_drain_lands_with_the_next_write_or_waits_for_a_save(spec, tmp_path, monkeypatch):
    import threading

    release = threading.Event()
    index, ids, x = _with_a_draining_buffer(spec, monkeypatch, release)
    release.set()
    index._drain._thread.join()
    index.remove(np.array([5], dtype=np.int64))  # any write lands a finished drain first
    assert index.num_buffered == 0 and index._index.ntotal == 2300
    release = threading.Event()
    index, ids, x = _with_a_draining_buffer(spec, monkeypatch, release)
    threading.Timer(0.2, release.set).start()
    index.save(tmp_path / "v.faiss")  # waits for the worker: the file holds every vector
    loaded = VectorIndex.load(tmp_path / "v.faiss")
    assert loaded.num_buffered == 0 and np.array_equal(loaded.ids(), np.sort(ids))
    _, found = loaded.search(x[SAMPLE], 1, effort=EVERY[spec])
    assert np.array_equal(found[:, 0], ids[SAMPLE])


def test_a_bulk_add_lands_a_pending_drain_first(monkeypatch):
    import threading

    release = threading.Event()
    index, ids, x = _with_a_draining_buffer("hnsw", monkeypatch, release)
    threading.Timer(0.2, release.set).start()
    bulk_ids = np.arange(200_000, 200_000 + vector_index.DIRECT_ADD_MIN)
    bulk = _unit(bulk_ids.size, seed=12)
    index.add(bulk_ids, bulk)  # into the graph the drain copied: it waits, lands, then adds
    assert index.num_buffered == 0
    _, found = index.search(np.concatenate([x[SAMPLE], bulk[::10]]), 1, effort=4000)
    assert np.array_equal(found[:, 0], np.concatenate([ids[SAMPLE], bulk_ids[::10]]))


def test_a_failed_drain_is_raised_in_the_callers_thread():
    from segsearch.indexer.background_drain import IvfDrain

    index, _, _ = _filled("IVF16,Flat", n=2000, chunk=1000)
    wrong = IvfDrain(index._index, np.arange(4), np.zeros((4, DIM + 1), np.float32))
    with pytest.raises(RuntimeError, match="draining the write buffer failed"):
        wrong.land(index._index, np.ones(4, bool))


@pytest.mark.parametrize("spec", EVERY)
def test_a_drain_whose_worker_fails_is_done_by_the_next_write(spec, monkeypatch, caplog):
    import threading

    from segsearch.indexer import background_drain

    def out_of_memory(self):
        raise MemoryError("no room for a second graph")

    monkeypatch.setattr(background_drain.IvfDrain, "_work", out_of_memory)
    monkeypatch.setattr(background_drain.HnswDrain, "_work", out_of_memory)
    release = threading.Event()
    release.set()
    index, ids, x = _with_a_draining_buffer(spec, monkeypatch, release)
    index._drain._thread.join()
    assert index.remove(ids[-1:]) == 1  # lands the failed drain inline, then removes
    assert "draining it now" in caplog.text and index.num_buffered == 0
    assert np.array_equal(index.ids(), np.sort(ids[:-1]))
    _, found = index.search(x[SAMPLE], 1, effort=EVERY[spec])
    assert np.array_equal(found[:, 0], ids[SAMPLE])


def _ivf_lists_of(index: VectorIndex) -> list[list[int]]:
    ivf = index._index
    return [sorted(faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).tolist())
            for i in range(ivf.nlist)]


@pytest.mark.parametrize("case", ["same vectors", "images skipped", "worker failed"])
def test_lists_found_ahead_of_a_bulk_add_are_used_only_for_those_vectors(case, monkeypatch, caplog):
    """`prepare_add` finds a bulk chunk's IVF lists on a worker (during the LMDB commit); the
    add uses them only when it adds exactly those vectors, and otherwise finds them itself."""
    from segsearch.indexer import background_drain, ivf_lists

    monkeypatch.setattr(vector_index, "DIRECT_ADD_MIN", 100)
    ahead, direct = _filled("IVF16,Flat", n=2000, chunk=1000)[0], _filled("IVF16,Flat", n=2000, chunk=1000)[0]
    ahead.drain_buffer()
    direct.drain_buffer()
    ids, bulk = np.arange(50_000, 50_300), _unit(300, seed=21)
    assigned = []
    assign = ivf_lists.assign
    monkeypatch.setattr(ivf_lists, "assign", lambda index, vectors: assigned.append(len(vectors)) or assign(index, vectors))
    if case == "worker failed":
        monkeypatch.setattr(background_drain.EarlyAssignment, "_work", lambda self: 1 / 0)
    ahead.prepare_add(bulk)
    ahead._early._thread.join()
    if case == "images skipped":
        ids, bulk = ids[::2], bulk[::2]
    ahead.add(ids, bulk)
    direct.add(ids, bulk)
    assert _ivf_lists_of(ahead) == _ivf_lists_of(direct)
    if case == "same vectors":
        assert assigned == [300, len(bulk)]  # once ahead (this test's index), once for `direct`
    else:
        assert assigned[-2:] == [len(bulk), len(bulk)]  # found again by the add itself
    assert ("finding them now" in caplog.text) == (case == "worker failed")
