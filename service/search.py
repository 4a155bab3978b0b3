"""Nearest-segment search over an `IndexStore` with filters, score threshold and top_k.

Filters are applied after the vector search (FAISS knows only vectors), so a filtered search
over-fetches (an unfiltered one asks for exactly top_k): it asks for `OVERFETCH * top_k` candidates, and while fewer than `top_k` pass
the filters it doubles the request, until the index has nothing more to give or the
candidates' scores fall below `min_score` (hits come best first, so nothing further could
pass). That way `top_k` hits are returned whenever that many exist, at the cost of extra
rounds only for selective filters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from segsearch.errors import IndexStoreError
from segsearch.indexer.store_api import ReadableStore
from segsearch.indexer.records import ImageRecord, SegmentRecord
from segsearch.service.errors import FailedPrecondition, InvalidArgument, NotFound
from segsearch.service.request_scope import stage

DEFAULT_TOP_K = 10
OVERFETCH = 4
MIN_FETCH = 32


@dataclass(frozen=True)
class SearchFilter:
    """labels: keep only these labels (empty: all); exclude_image_ids; min_area_fraction."""

    labels: frozenset[str] = frozenset()
    exclude_image_ids: frozenset[str] = frozenset()
    min_area_fraction: float = 0.0

    @property
    def empty(self) -> bool:
        return not self.labels and not self.exclude_image_ids and self.min_area_fraction <= 0.0

    def accepts(self, record: SegmentRecord) -> bool:
        return ((not self.labels or record.label in self.labels)
                and record.image_id not in self.exclude_image_ids
                and record.area_fraction >= self.min_area_fraction)


@dataclass(frozen=True)
class SearchOptions:
    top_k: int = DEFAULT_TOP_K
    min_score: float = -math.inf
    filter: SearchFilter = field(default_factory=SearchFilter)


@dataclass
class Hit:
    """One result: the stored segment, its score, and its image's record."""

    segment_id: int
    score: float
    segment: SegmentRecord
    image: ImageRecord | None


def validate_top_k(top_k: int, max_top_k: int) -> int:
    """0 -> the default (10, or max_top_k if smaller); 1..max_top_k as is; else INVALID_ARGUMENT."""
    if top_k == 0:
        return min(DEFAULT_TOP_K, max_top_k)
    if not 1 <= top_k <= max_top_k:
        raise InvalidArgument(f"top_k must be between 1 and {max_top_k} (0 means {DEFAULT_TOP_K}), got {top_k}")
    return top_k


def validate_options(top_k: int, max_top_k: int, min_score: float, labels, exclude_image_ids,
                     min_area_fraction: float) -> SearchOptions:
    """Raw request fields -> SearchOptions, with INVALID_ARGUMENT for values out of range."""
    if math.isnan(min_score):
        raise InvalidArgument("min_score is NaN")
    if math.isnan(min_area_fraction) or not 0.0 <= min_area_fraction <= 1.0:
        raise InvalidArgument(f"filter.min_area_fraction must lie in [0, 1], got {min_area_fraction}")
    return SearchOptions(
        top_k=validate_top_k(top_k, max_top_k),
        min_score=float(min_score) if min_score != 0.0 else -math.inf,
        filter=SearchFilter(frozenset(labels), frozenset(exclude_image_ids), float(min_area_fraction)),
    )


def stored_prototype(store: ReadableStore, segment_id: int, model_version: str) -> np.ndarray:
    """The prototype of a stored segment (a segment-id query); NOT_FOUND if unknown."""
    record = get_segment(store, segment_id, model_version)
    return record.prototype


def get_segment(store: ReadableStore, segment_id: int, model_version: str) -> SegmentRecord:
    try:
        record = store.get_segment(int(segment_id))
    except IndexStoreError:
        raise NotFound(f"segment id {segment_id} is not in the index "
                       f"({store.meta.num_segments} segments); ids come from search results") from None
    if record.model_version != model_version:
        raise FailedPrecondition(
            f"segment {segment_id} was embedded by model {record.model_version!r} but the server "
            f"runs model {model_version!r}; re-index with the served model")
    return record


def search(store: ReadableStore, vector: np.ndarray, options: SearchOptions) -> list[Hit]:
    """Up to top_k hits for the unit-norm query `vector` (D,), best first, filters applied."""
    total = store.meta.num_segments
    if total == 0:
        return []
    # Hits come best first, so without filters the first top_k candidates are the answer (a
    # min_score only cuts that list short): no over-fetching, no extra records decoded.
    first = options.top_k if options.filter.empty else max(MIN_FETCH, OVERFETCH * options.top_k)
    fetch = min(total, first)
    with stage("search"):
        while True:
            candidates = store.search(vector, fetch)[0]
            hits = [c for c in candidates if c.score >= options.min_score and options.filter.accepts(c.segment)]
            exhausted = fetch >= total or len(candidates) < fetch
            below_threshold = bool(candidates) and candidates[-1].score < options.min_score
            if len(hits) >= options.top_k or exhausted or below_threshold:
                break
            fetch = min(total, fetch * 2)
    hits = hits[: options.top_k]
    images = _images(store, {hit.segment.image_id for hit in hits})
    return [Hit(h.segment_id, h.score, h.segment, images.get(h.segment.image_id)) for h in hits]


def _images(store: ReadableStore, image_ids: set[str]) -> dict[str, ImageRecord]:
    found = {}
    for image_id in image_ids:
        try:
            found[image_id] = store.get_image(image_id)
        except IndexStoreError:
            pass  # deleted between the search and now: the hit keeps its segment record
    return found
