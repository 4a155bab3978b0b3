"""IVF adds by GEMM: the same lists as FAISS's own add, for every block boundary."""

import faiss
import numpy as np
import pytest

from segsearch.indexer import ivf_lists

DIM = 16


def _unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _trained(factory: str = "IVF32,Flat") -> faiss.IndexIVF:
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(_unit(2000, seed=1))
    return index


def _lists(index: faiss.IndexIVF) -> list[list[int]]:
    """The ids of each inverted list, sorted (add order within a list is not compared)."""
    invlists = index.invlists
    return [sorted(faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).tolist())
            for i in range(index.nlist)]


@pytest.mark.parametrize("count", [0, 1, ivf_lists.BLOCK_ROWS - 1, ivf_lists.BLOCK_ROWS, 3 * ivf_lists.BLOCK_ROWS + 7])
def test_nearest_lists_are_the_quantizers_choice(count):
    index = _trained()
    vectors = _unit(count, seed=2)
    expected = index.quantizer.search(vectors, 1)[1].reshape(-1) if count else np.empty(0, np.int64)
    np.testing.assert_array_equal(ivf_lists.assign(index, vectors), expected)


def test_add_fills_the_lists_faiss_add_fills():
    ours, theirs = _trained(), _trained()
    vectors, ids = _unit(1000, seed=3), np.arange(1000, dtype=np.int64) * 11 + 5
    ivf_lists.add(ours, ids, vectors)
    theirs.add_with_ids(vectors, ids)
    assert ours.ntotal == theirs.ntotal == 1000
    assert _lists(ours) == _lists(theirs)
    ours.nprobe = theirs.nprobe = 4
    np.testing.assert_array_equal(ours.search(vectors[:50], 5)[1], theirs.search(vectors[:50], 5)[1])


def test_a_quantizer_that_is_not_flat_keeps_its_own_search():
    index = _trained("IVF32_HNSW8,Flat")
    assert ivf_lists.flat_centroids(index) is None
    vectors = _unit(300, seed=4)
    np.testing.assert_array_equal(ivf_lists.assign(index, vectors), index.quantizer.search(vectors, 1)[1].reshape(-1))


def _codes_address(index: faiss.IndexIVF, list_no: int) -> int:
    return int(index.invlists.get_codes(int(list_no)))


def test_headroom_keeps_the_lists_and_takes_appends_in_place():
    """A loaded index's lists have no spare capacity, so the first append to each moves it;
    after `reserve_headroom` the same lists take appends where they are."""
    built = _trained()
    ivf_lists.add(built, np.arange(1000, dtype=np.int64), _unit(1000, seed=5))
    loaded = faiss.deserialize_index(faiss.serialize_index(built))
    plain = faiss.deserialize_index(faiss.serialize_index(built))
    ivf_lists.reserve_headroom(loaded)
    assert _lists(loaded) == _lists(built)
    for list_no in range(built.nlist):
        size = built.invlists.list_size(list_no)
        assert np.array_equal(faiss.rev_swig_ptr(loaded.invlists.get_codes(list_no), size * built.code_size),
                              faiss.rev_swig_ptr(built.invlists.get_codes(list_no), size * built.code_size))
    extra = _unit(64, seed=6)
    lists = ivf_lists.assign(loaded, extra)
    touched = np.unique(lists)
    before = {index_name: [_codes_address(index, n) for n in touched]
              for index_name, index in (("reserved", loaded), ("plain", plain))}
    for index in (loaded, plain):
        ivf_lists.add_preassigned(index, np.arange(5000, 5064), extra, lists)
    assert [_codes_address(loaded, n) for n in touched] == before["reserved"]
    assert [_codes_address(plain, n) for n in touched] != before["plain"]  # what the headroom avoids
    loaded.nprobe = plain.nprobe = 4
    np.testing.assert_array_equal(loaded.search(extra, 3)[1], plain.search(extra, 3)[1])
