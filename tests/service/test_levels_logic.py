"""Levels in the store and in search, on a real IndexStore with hand-made segments (no model):
parents resolved to ids at write time, the default level, a level filter, and no region
returned together with a piece of it."""
from __future__ import annotations

import numpy as np
import pytest

from segsearch.indexer.index_store import LMDB_DIR, IndexStore
from segsearch.indexer.records import LEVEL_FINE, LEVEL_REGION, ImageRecord, SegmentRecord
from segsearch.indexer.rle import encode_mask
from segsearch.service.errors import InvalidArgument
from segsearch.service.search import (
    ANY_LEVEL, SearchFilter, SearchOptions, resolve_levels, search, without_relatives,
)

DIM = 4
VERSION = "v1"


def unit(values) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def image_segments(image_id: str, left, right) -> list[SegmentRecord]:
    """Two fine segments (left and right half, prototypes `left`, `right`) and the region
    that is both (the normalised sum), written as the indexer writes them: fine first."""
    masks = [np.zeros((2, 4), bool) for _ in range(2)]
    masks[0][:, :2] = True
    masks[1][:, 2:] = True
    def record(mask, prototype, level, parent):
        return SegmentRecord(0, image_id, (0, 0, 4, 2), mask.mean(), encode_mask(mask), (2, 4), "", 0.0,
                             VERSION, prototype, level, parent)
    region = unit(unit(left) + unit(right))
    return [record(masks[0], unit(left), LEVEL_FINE, 2), record(masks[1], unit(right), LEVEL_FINE, 2),
            record(masks[0] | masks[1], region, LEVEL_REGION, -1)]


@pytest.fixture()
def store(tmp_path):
    """Image a: fine (1, 0, 0, 0) and (1, 1, 0, 0), region between; image b: fine
    (1, 0.2, 0, 0) and (0, 0, 1, 0), region between."""
    with IndexStore.create(tmp_path / "index", VERSION, DIM, "flat") as created:
        created.add_images([
            (ImageRecord("a", "a.png", 4, 2, "1" * 64), image_segments("a", [1, 0, 0, 0], [1, 1, 0, 0])),
            (ImageRecord("b", "b.png", 4, 2, "2" * 64), image_segments("b", [1, 0.2, 0, 0], [0, 0, 1, 0])),
        ])
        yield created


def test_the_store_turns_parent_positions_into_ids(store):
    assert store.meta.has_regions and store.verify() == []
    for image_id in ("a", "b"):
        fine_left, fine_right, region = (store.get_segment(s) for s in store.get_image(image_id).segment_ids)
        assert (fine_left.level, fine_right.level, region.level) == (LEVEL_FINE, LEVEL_FINE, LEVEL_REGION)
        assert fine_left.parent_id == fine_right.parent_id == region.segment_id
        assert region.parent_id == 0


def test_a_parent_must_be_a_coarser_segment_of_the_same_list(tmp_path):
    segments = image_segments("a", [1, 0, 0, 0], [0, 1, 0, 0])
    with IndexStore.create(tmp_path / "index", VERSION, DIM, "flat") as store:
        for parent in (3, 1):  # out of the list; a fine segment (not coarser)
            segments[0].parent_index = parent
            with pytest.raises(ValueError, match="parent"):
                store.add_images([(ImageRecord("a", "a.png", 4, 2, "1" * 64), segments)])
        assert store.meta.num_segments == 0 and not store.meta.has_regions


def levels_of(hits) -> list[int]:
    return [hit.segment.level for hit in hits]


def test_a_level_filter_keeps_that_level_only(store):
    query = unit([1, 0.1, 0, 0])
    regions = search(store, query, SearchOptions(top_k=10, filter=SearchFilter(levels=frozenset({LEVEL_REGION}))))
    fine = search(store, query, SearchOptions(top_k=10, filter=SearchFilter(levels=frozenset({LEVEL_FINE}))))
    assert levels_of(regions) == [LEVEL_REGION] * 2 and levels_of(fine) == [LEVEL_FINE] * 4


def test_any_level_never_returns_a_region_with_a_piece_of_it(store):
    query = unit([1, 0.1, 0, 0])
    candidates = store.search(query[None], 10)[0]  # FAISS's ranking, relatives and all
    assert len(candidates) == 6 and candidates[0].segment.level == LEVEL_FINE
    assert candidates[2].segment.level == LEVEL_REGION  # both left halves, then region a
    hits = search(store, query, SearchOptions(top_k=10))  # any level: no filter
    assert [h.segment_id for h in hits] == [h.segment_id for h in without_relatives(candidates)]
    kept = {hit.segment_id for hit in hits}
    assert all(hit.segment.parent_id not in kept for hit in hits)
    # the left halves come first, so both regions (their parents) go, the right halves stay
    assert [hit.segment_id for hit in hits] == [c.segment_id for c in candidates if c.segment.level == LEVEL_FINE]


def test_relatives_are_dropped_whichever_comes_first(store):
    # query the region of image a: it comes first, then its own pieces are not returned
    region_a = store.get_segment(store.get_image("a").segment_ids[2])
    hits = without_relatives(search(store, region_a.prototype, SearchOptions(top_k=10)))
    assert hits[0].segment_id == region_a.segment_id
    assert all(hit.segment.parent_id != region_a.segment_id for hit in hits)
    assert {hit.segment.image_id for hit in hits} == {"a", "b"}


def test_deleting_a_region_by_id_leaves_its_fine_segments_without_a_parent(store):
    """No record may name a deleted segment as its parent (a client following
    `parent_segment_id` would get NOT_FOUND); the other image's links stay."""
    fine_left, fine_right, region = store.get_image("a").segment_ids
    other_fine, _, other_region = store.get_image("b").segment_ids
    store.delete_segments([region])
    assert store.get_image("a").segment_ids == [fine_left, fine_right]
    assert store.get_segment(fine_left).parent_id == store.get_segment(fine_right).parent_id == 0
    assert store.get_segment(other_fine).parent_id == other_region
    assert store.verify() == []


def test_the_default_level_is_region_where_the_index_has_regions():
    assert resolve_levels(None, has_regions=True) == frozenset({LEVEL_REGION})
    assert resolve_levels(None, has_regions=False) == frozenset()  # an index written before levels
    assert resolve_levels(LEVEL_FINE, True) == frozenset({LEVEL_FINE})
    assert resolve_levels(ANY_LEVEL, True) == frozenset()
    with pytest.raises(InvalidArgument):
        resolve_levels(7, True)


def test_the_store_searches_a_level_inside_faiss(store):
    query = unit([1, 0.1, 0, 0])
    regions = store.search(query, 5, levels=frozenset({LEVEL_REGION}))[0]  # 2 exist: both, one call
    fine = store.search(query, 5, levels=frozenset({LEVEL_FINE}))[0]
    assert [hit.segment.level for hit in regions] == [LEVEL_REGION] * 2
    assert [hit.segment.level for hit in fine] == [LEVEL_FINE] * 4
    assert len(store.search(query, 10)[0]) == 6
    store.delete_segments([regions[0].segment_id])  # the table follows deletes...
    assert [hit.segment_id for hit in store.search(query, 5, levels=frozenset({LEVEL_REGION}))[0]] == \
        [regions[1].segment_id]
    store.delete_images(["a", "b"])  # ...of whole images too
    assert store.search(query, 5, levels=frozenset({LEVEL_REGION}))[0] == [] and store.verify() == []


def test_a_writer_fills_a_missing_region_table_from_the_records(tmp_path):
    """An index written before the region table existed (here: the table emptied and its
    mark cleared by hand) gets it back from its records when a writer opens it."""
    import lmdb

    from segsearch.indexer.records import decode_meta, encode_meta

    root = tmp_path / "index"
    with IndexStore.create(root, VERSION, DIM, "flat") as created:
        created.add_images([(ImageRecord("a", "a.png", 4, 2, "1" * 64), image_segments("a", [1, 0, 0, 0], [0, 1, 0, 0]))])
        region_id = created.get_image("a").segment_ids[2]
    env = lmdb.open(str(root / LMDB_DIR), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"regions", txn=txn), delete=False)
        meta_db = env.open_db(b"meta", txn=txn)
        meta = decode_meta(txn.get(b"meta", db=meta_db))
        assert meta.region_table  # a new index starts with a complete (empty) table
        meta.region_table = False
        txn.put(b"meta", encode_meta(meta), db=meta_db)
    env.close()
    regions_only = SearchOptions(top_k=3, filter=SearchFilter(levels=frozenset({LEVEL_REGION})))
    with IndexStore.open(root, read_only=True) as reader:  # cannot fill it: filters the records instead
        assert reader._metadata.region_ids() is None
        assert [hit.segment_id for hit in search(reader, unit([1, 1, 0, 0]), regions_only)] == [region_id]
    with IndexStore.open(root) as writer:
        assert writer._metadata.region_ids().tolist() == [region_id] and writer.verify() == []
        assert writer.meta.region_table
        hits = writer.search(unit([1, 1, 0, 0]), 3, levels=frozenset({LEVEL_REGION}))[0]
        assert [hit.segment_id for hit in hits] == [region_id]
