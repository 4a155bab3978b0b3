"""Logic of batch search, per-request search effort and segment deletion on real stores with
synthetic segments (no model): a batch answers as its queries one by one, effort reaches FAISS
per call, and deleting a segment leaves both stores and the image record consistent."""
from __future__ import annotations


import numpy as np
import pytest

from segsearch.errors import IndexStoreError
from segsearch.indexer.index_store import IndexStore
from segsearch.indexer.records import ImageRecord, SegmentRecord
from segsearch.indexer.rle import encode_mask
from segsearch.indexer.vector_index import VectorIndex
from segsearch.service.errors import InvalidArgument, at_position
from segsearch.service.search import (
    SearchFilter,
    SearchOptions,
    default_effort,
    search,
    search_many,
    validate_batch_size,
    validate_effort,
)

DIM = 16
VERSION = "v1"


def build(root, spec: str, images: int = 30, per_image: int = 10, seed: int = 0) -> IndexStore:
    rng = np.random.default_rng(seed)
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    store = IndexStore.create(root, VERSION, DIM, spec)
    batch = []
    for image in range(images):
        vectors = rng.normal(size=(per_image, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        segments = [SegmentRecord(0, f"img{image}", (0, 0, 2, 2), 0.5 if part == 0 else 0.01, encode_mask(mask),
                                  (4, 4), "big" if part == 0 else "small", 0.9, VERSION, vectors[part])
                    for part in range(per_image)]
        batch.append((ImageRecord(f"img{image}", f"/data/img{image}.png", 4, 4, f"{rng.integers(1 << 62):064x}"),
                      segments))
    store.add_images(batch)
    return store


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    store = build(tmp_path_factory.mktemp("flat") / "index", "flat")
    yield store
    store.close()


def queries(count: int, seed: int = 1) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def key(hits) -> list[tuple]:
    return [(h.segment_id, round(h.score, 6), h.segment.image_id, h.image.image_id) for h in hits]


def test_a_batch_answers_as_its_queries_one_by_one(flat):
    vectors = queries(6)
    options = [SearchOptions(top_k=5), SearchOptions(top_k=5), SearchOptions(top_k=12),
               SearchOptions(top_k=3, filter=SearchFilter(labels=frozenset({"big"}))),
               SearchOptions(top_k=4, min_score=0.3),
               SearchOptions(top_k=5, filter=SearchFilter(exclude_image_ids=frozenset({"img1", "img2"})))]
    batched = search_many(flat, list(vectors), options)
    assert len(batched) == 6
    for vector, option, hits in zip(vectors, options, batched):
        assert hits and key(hits) == key(search(flat, vector, option))
    assert all(h.segment.label == "big" for h in batched[3]) and len(batched[3]) == 3


def test_one_faiss_call_per_group_of_alike_queries(flat, monkeypatch):
    calls = []
    original = IndexStore.search

    def counting(self, vectors, k, effort=None, levels=frozenset()):
        calls.append((np.atleast_2d(vectors).shape[0], k, effort))
        return original(self, vectors, k, effort, levels)

    monkeypatch.setattr(IndexStore, "search", counting)
    search_many(flat, list(queries(8)), [SearchOptions(top_k=7)] * 8)
    assert calls == [(8, 7, None)]


def test_effort_validation_and_defaults():
    assert validate_effort(0, 0, 100) is None  # the index's own setting
    assert validate_effort(0, 64, 100) == 64 and validate_effort(7, 64, 100) == 7
    for bad in (-1, 101):
        with pytest.raises(InvalidArgument, match="max_search_effort 100"):
            validate_effort(bad, 0, 100)
    assert default_effort(192, 0) == 192 and default_effort(192, 50) == 50 and default_effort(0, 50) == 0
    validate_batch_size(3, 3)
    for count, words in ((0, "no queries"), (4, "at most 3")):
        with pytest.raises(InvalidArgument, match=words):
            validate_batch_size(count, 3)
    with pytest.raises(InvalidArgument, match=r"^queries\[2\]: search_effort"):
        at_position(2, validate_effort, 500, 0, 100)


def test_full_effort_on_hnsw_equals_exact_search(flat, tmp_path):
    """With efSearch = index size, HNSW visits every node: the exact answer."""
    hnsw = build(tmp_path / "hnsw", "hnsw")
    try:
        assert hnsw.stats().ef_search > 0 and hnsw.stats().nprobe == 0 and flat.stats().ef_search == 0
        total = hnsw.meta.num_segments
        for vector in queries(10, seed=3):
            exact = search(flat, vector, SearchOptions(top_k=20))
            full = search(hnsw, vector, SearchOptions(top_k=20, effort=total))
            assert [h.segment_id for h in full] == [h.segment_id for h in exact]
    finally:
        hnsw.close()


def test_effort_is_per_call_on_hnsw_and_ivf():
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(2000, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(2000, dtype=np.int64)
    probe = queries(50, seed=9)
    exact = VectorIndex(DIM, "flat")
    exact.add(ids, vectors)
    want = exact.search(probe, 10)[1]
    for spec, full in (("HNSW8,Flat", 2000), ("IVF32,Flat", 32)):
        index = VectorIndex(DIM, spec, ef_search=16, nprobe=1)
        index.add(ids, vectors)
        index.drain_buffer()  # buffered vectors are searched exactly, whatever the effort
        low = index.search(probe, 10, effort=1)[1]
        high = index.search(probe, 10, effort=full)[1]
        assert np.array_equal(high, want), spec
        assert not np.array_equal(low, want), spec  # effort 1 misses some neighbours
        if spec.startswith("IVF"):  # no effort: the index's own nprobe (1)
            assert np.array_equal(index.search(probe, 10)[1], low)
        kind, default = index.search_effort
        assert (kind, default) == (("efSearch", 16) if spec.startswith("HNSW") else ("nprobe", 1))


def test_deleting_segments_updates_both_stores_and_the_image_record(tmp_path):
    root = tmp_path / "index"
    store = build(root, "flat", images=4, per_image=5)
    try:
        image = store.get_image("img1")
        gone = image.segment_ids[1:3]
        before = store.meta
        with pytest.raises(IndexStoreError, match="unknown segment id"):
            store.delete_segments([gone[0], 10_000])
        assert store.meta.num_segments == before.num_segments  # nothing deleted
        assert sorted(store.delete_segments(gone + [gone[0]])) == sorted(gone)
        assert store.get_image("img1").segment_ids == [s for s in image.segment_ids if s not in gone]
        for segment_id in gone:
            with pytest.raises(IndexStoreError):
                store.get_segment(segment_id)
        hits = store.search(queries(5), 20)
        assert not {h.segment_id for row in hits for h in row} & set(gone)
        assert store.meta.num_segments == before.num_segments - 2 and store.meta.num_images == before.num_images
        assert store.verify() == []
        rest = store.get_image("img1").segment_ids
        store.delete_segments(rest)  # an image may lose all its segments and stay
        assert store.get_image("img1").segment_ids == [] and store.verify() == []
    finally:
        store.close()
    with IndexStore.open(root) as reopened:  # durable: what the commit wrote is what opens
        assert reopened.get_image("img1").segment_ids == [] and reopened.verify() == []
        assert reopened.meta.num_segments == 15
