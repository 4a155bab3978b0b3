"""Search logic on a real IndexStore with synthetic segments (no model): over-fetching fills
top_k under selective filters, thresholds cut, ids map to NOT_FOUND / FAILED_PRECONDITION."""
from __future__ import annotations

import math

import numpy as np
import pytest

from segsearch.indexer.index_store import IndexStore
from segsearch.indexer.records import ImageRecord, SegmentRecord
from segsearch.indexer.rle import encode_mask
from segsearch.service.errors import FailedPrecondition, InvalidArgument, NotFound
from segsearch.service.search import SearchFilter, SearchOptions, get_segment, search, validate_options

DIM = 8
VERSION = "v1"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """200 segments on 20 images; score to the query e0 falls with the segment number; the
    5 segments labelled "rare" are the 5 worst."""
    rng = np.random.default_rng(0)
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    store = IndexStore.create(tmp_path_factory.mktemp("search") / "index", VERSION, DIM, "flat")
    batch = []
    for image in range(20):
        segments = []
        for part in range(10):
            number = image * 10 + part
            angle = number / 200 * math.pi / 2  # 0 .. 90 degrees from e0
            vector = np.zeros(DIM, np.float32)
            vector[0], vector[1 + number % (DIM - 1)] = math.cos(angle), math.sin(angle)
            label = "rare" if number >= 195 else ("big" if part == 0 else "common")
            area = 0.5 if part == 0 else 0.01
            segments.append(SegmentRecord(0, f"img{image}", (0, 0, 2, 2), area, encode_mask(mask), (4, 4),
                                          label, 0.9, VERSION, vector))
        batch.append((ImageRecord(f"img{image}", f"/data/img{image}.png", 4, 4, f"{rng.integers(1 << 62):064x}"),
                      segments))
    store.add_images(batch)
    yield store
    store.close()


QUERY = np.eye(DIM, dtype=np.float32)[0]


def test_a_selective_filter_still_gets_top_k_by_over_fetching(store):
    hits = search(store, QUERY, SearchOptions(top_k=3, filter=SearchFilter(labels=frozenset({"rare"}))))
    assert [hit.segment.label for hit in hits] == ["rare"] * 3
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    assert hits[0].image.uri == "/data/img19.png"


def test_the_empty_label_filter_selects_unlabelled_segments():
    labelled, unlabelled = _record("big"), _record("")
    only_unlabelled = SearchFilter(labels=frozenset({""}))
    assert only_unlabelled.accepts(unlabelled) and not only_unlabelled.accepts(labelled)
    assert SearchFilter(labels=frozenset({"big"})).accepts(labelled) and not SearchFilter(
        labels=frozenset({"big"})).accepts(unlabelled)


def _record(label: str) -> SegmentRecord:
    mask = np.ones((2, 2), bool)
    return SegmentRecord(0, "img", (0, 0, 2, 2), 1.0, encode_mask(mask), (2, 2), label,
                         0.9 if label else 0.0, VERSION, QUERY)


def test_filters_combine(store):
    options = SearchOptions(top_k=50, filter=SearchFilter(exclude_image_ids=frozenset({"img0", "img1"}),
                                                          min_area_fraction=0.1))
    hits = search(store, QUERY, options)
    assert len(hits) == 18 and {hit.segment.image_id for hit in hits} == {f"img{i}" for i in range(2, 20)}


def test_min_score_cuts_and_fewer_than_top_k_is_fine(store):
    hits = search(store, QUERY, SearchOptions(top_k=100, min_score=math.cos(math.radians(9))))
    assert 0 < len(hits) < 100 and all(hit.score >= math.cos(math.radians(9)) - 1e-6 for hit in hits)
    assert len(hits) == 20 + 1  # segments 0..20 lie within 9 degrees (0.45 degrees apart)


def test_options_validation():
    assert validate_options(0, 100, 0.0, [], [], 0.0).top_k == 10
    assert validate_options(0, 5, 0.0, [], [], 0.0).top_k == 5
    assert validate_options(3, 100, 0.0, [], [], 0.0).min_score == -math.inf  # 0 = no threshold
    for bad in ((101, 0.0, 0.0), (-1, 0.0, 0.0), (5, float("nan"), 0.0), (5, 0.0, -0.1), (5, 0.0, 1.5)):
        with pytest.raises(InvalidArgument):
            validate_options(bad[0], 100, bad[1], [], [], bad[2])


def test_segment_ids(store):
    assert get_segment(store, 1, VERSION).image_id == "img0"
    with pytest.raises(NotFound, match="segment id 4242 is not in the index"):
        get_segment(store, 4242, VERSION)
    with pytest.raises(FailedPrecondition, match="re-index"):
        get_segment(store, 1, "another-model")


@pytest.mark.parametrize("value", [5e37, 3e38, 1e-40, 1e-45])
def test_extreme_embeddings_normalise_in_float64_without_overflow(value):
    import warnings

    from segsearch.service.queries import embedding_query

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in float32 used to warn and give zeros
        vector = embedding_query([value] * 64, 64).vector
    assert vector.dtype == np.float32 and np.allclose(vector, 0.125)
