"""Nearest-segment search over an `IndexStore` with filters, score threshold and top_k.

The level is applied inside the vector search (`IndexStore.search` hands FAISS a selector of
the level's ids, kept in their own LMDB table), so a region-level search costs what an
unfiltered one does. The other filters are applied after the vector search (FAISS knows only
vectors), so a filtered search over-fetches (an unfiltered one asks for exactly top_k): it asks for `OVERFETCH * top_k`
candidates, and while fewer than `top_k` pass the filters it asks again for as many as the
pass rate so far needs (at least twice as many, `_next_fetch`), until the index has nothing
more to give or the candidates' scores fall below `min_score` (hits come best first, so
nothing further could pass). That way `top_k` hits are returned whenever that many exist, at the cost of extra
rounds only for selective filters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from segsearch.errors import IndexStoreError
from segsearch.indexer.store_api import ReadableStore
from segsearch.indexer.records import LEVEL_FINE, LEVEL_REGION, ImageRecord, SegmentRecord
from segsearch.service.errors import FailedPrecondition, InvalidArgument, NotFound
from segsearch.service.request_scope import stage

ANY_LEVEL = -1  # resolve_levels: every level (hits never hold a segment with its parent)
DEFAULT_TOP_K = 10
OVERFETCH = 4
MIN_FETCH = 32
FETCH_MARGIN = 1.5  # _next_fetch: ask for 1.5x the candidates the pass rate so far needs
MAX_GROWTH = 16


@dataclass(frozen=True)
class SearchFilter:
    """labels: keep only these labels (empty: all); exclude_image_ids; min_area_fraction;
    levels: keep only segments of these levels (`indexer.records` LEVEL_*; empty: all)."""

    labels: frozenset[str] = frozenset()
    exclude_image_ids: frozenset[str] = frozenset()
    min_area_fraction: float = 0.0
    levels: frozenset[int] = frozenset()

    @property
    def empty(self) -> bool:
        """No filter beyond the level, which the store applies inside its search."""
        return not self.labels and not self.exclude_image_ids and self.min_area_fraction <= 0.0

    def accepts(self, record: SegmentRecord) -> bool:
        return ((not self.labels or record.label in self.labels)
                and record.image_id not in self.exclude_image_ids
                and record.area_fraction >= self.min_area_fraction
                and (not self.levels or record.level in self.levels))


def resolve_levels(requested: int | None, has_regions: bool) -> frozenset[int]:
    """The levels a search keeps. `requested` None: the server's default, the region level
    where the index holds one (the level a person names things at), else everything (an
    index written before levels); LEVEL_FINE or LEVEL_REGION: that level; -1: any level."""
    if requested is None:
        return frozenset({LEVEL_REGION}) if has_regions else frozenset()
    if requested == ANY_LEVEL:
        return frozenset()
    if requested not in (LEVEL_FINE, LEVEL_REGION):
        raise InvalidArgument(f"unknown level {requested}")
    return frozenset({requested})


@dataclass(frozen=True)
class SearchOptions:
    """effort: HNSW efSearch / IVF nprobe of this search (None: the index's own setting)."""

    top_k: int = DEFAULT_TOP_K
    min_score: float = -math.inf
    filter: SearchFilter = field(default_factory=SearchFilter)
    effort: int | None = None


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


def validate_effort(effort: int, default_effort: int, max_effort: int) -> int | None:
    """A request's search_effort -> the efSearch / nprobe to search with (None: the index's
    own). 0 means the server's default (`default_effort`, itself 0 for the index's own);
    above `max_effort` is INVALID_ARGUMENT, not clamped, so a caller never gets less
    recall than asked for without knowing."""
    if effort < 0 or effort > max_effort:
        raise InvalidArgument(f"search_effort must be between 1 and the server's max_search_effort "
                              f"{max_effort} (0 means the server's default), got {effort}")
    chosen = effort or default_effort
    return chosen or None


def default_effort(index_value: int, server_default: int) -> int:
    """The efSearch (or nprobe) a request without search_effort gets from an index whose own
    setting is `index_value` (0: the index has no such parameter, e.g. exact)."""
    return (server_default or index_value) if index_value else 0


def validate_batch_size(count: int, max_batch_queries: int) -> None:
    """A SearchSimilarBatch holds 1..max_batch_queries queries, else INVALID_ARGUMENT."""
    if count == 0:
        raise InvalidArgument("the batch has no queries; put 1 to "
                              f"{max_batch_queries} SearchRequests in queries")
    if count > max_batch_queries:
        raise InvalidArgument(f"the batch has {count} queries but the server takes at most "
                              f"{max_batch_queries} per call (max_batch_queries, see GetInfo); "
                              "split it into several calls")


def validate_options(top_k: int, max_top_k: int, min_score: float, labels, exclude_image_ids,
                     min_area_fraction: float, effort: int | None = None,
                     levels: frozenset[int] = frozenset()) -> SearchOptions:
    """Raw request fields -> SearchOptions, with INVALID_ARGUMENT for values out of range;
    `effort` as returned by `validate_effort`, `levels` by `resolve_levels`."""
    if math.isnan(min_score):
        raise InvalidArgument("min_score is NaN")
    if math.isnan(min_area_fraction) or not 0.0 <= min_area_fraction <= 1.0:
        raise InvalidArgument(f"filter.min_area_fraction must lie in [0, 1], got {min_area_fraction}")
    return SearchOptions(
        top_k=validate_top_k(top_k, max_top_k),
        min_score=float(min_score) if min_score != 0.0 else -math.inf,
        filter=SearchFilter(frozenset(labels), frozenset(exclude_image_ids), float(min_area_fraction), levels),
        effort=effort,
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
    return search_many(store, [vector], [options])[0]


def search_many(store: ReadableStore, vectors, options: list[SearchOptions]) -> list[list[Hit]]:
    """`search` of several queries (unit-norm `(D,)` vectors, one SearchOptions each), with
    the first FAISS round of all queries that ask for the same number of candidates and the
    same effort in ONE call: each query's hits equal those of its own `search`, since a
    query gets exactly the candidates (k and efSearch/nprobe) it would get alone. Only a
    query whose filters leave too few hits continues alone, with doubled requests."""
    if len(vectors) != len(options):
        raise ValueError(f"{len(vectors)} vectors for {len(options)} options")
    total = store.meta.num_segments
    if total == 0:
        return [[] for _ in vectors]
    groups: dict[tuple, list[int]] = {}
    for number, option in enumerate(options):
        key = (option.effort, min(total, _first_fetch(option)), option.filter.levels)
        groups.setdefault(key, []).append(number)
    results: list[list | None] = [None] * len(vectors)
    with stage("search"):
        for (effort, fetch, levels), members in groups.items():
            rows = store.search(np.stack([vectors[n] for n in members]), fetch, effort, levels)
            for number, candidates in zip(members, rows):
                results[number] = _filtered(store, vectors[number], options[number], fetch, candidates, total)
    return [_with_images(store, hits) for hits in results]


def _first_fetch(options: SearchOptions) -> int:
    # Hits come best first, so without filters the first top_k candidates are the answer (a
    # min_score only cuts that list short): no over-fetching, no extra records decoded.
    return options.top_k if options.filter.empty else max(MIN_FETCH, OVERFETCH * options.top_k)


def _filtered(store: ReadableStore, vector: np.ndarray, options: SearchOptions, fetch: int, candidates: list,
              total: int) -> list:
    """The first top_k of `candidates` that pass, fetching twice as many while too few pass.
    Equal scores are ordered by segment id (FAISS orders them by its internal layout, which
    differs between one index and its shards): a region of one fine segment has exactly that
    segment's prototype, and which of the two a search at any level keeps must not depend on
    the layout."""
    while True:
        ranked = sorted(candidates, key=lambda c: (-c.score, c.segment_id))
        hits = without_relatives([c for c in ranked if c.score >= options.min_score and options.filter.accepts(c.segment)])
        exhausted = fetch >= total or len(candidates) < fetch
        below_threshold = bool(candidates) and candidates[-1].score < options.min_score
        if len(hits) >= options.top_k or exhausted or below_threshold:
            return hits[: options.top_k]
        fetch = _next_fetch(fetch, len(hits), options.top_k, total)
        candidates = store.search(vector, fetch, options.effort, options.filter.levels)[0]


def _next_fetch(fetch: int, passed: int, top_k: int, total: int) -> int:
    """How many candidates the next round asks for: enough for top_k at the share of
    candidates that passed so far (with a margin), at least twice and at most MAX_GROWTH
    times as many as this round. A selective filter (the region level holds a few percent of
    the segments) then costs one more round, not a doubling per round."""
    wanted = math.ceil(fetch * top_k * FETCH_MARGIN / max(passed, 1))
    return min(total, max(2 * fetch, min(wanted, MAX_GROWTH * fetch)))


def without_relatives(hits: list) -> list:
    """`hits` (best first, each with `.segment_id` and `.segment`) less any whose parent or
    child is a better hit: a search over several levels never answers with a region and a
    piece of it. Within one level nothing is dropped (segments of a level do not nest)."""
    kept, kept_ids, kept_parents = [], set(), set()
    for hit in hits:
        parent = hit.segment.parent_id
        if (parent and parent in kept_ids) or hit.segment_id in kept_parents:
            continue
        kept.append(hit)
        kept_ids.add(hit.segment_id)
        if parent:
            kept_parents.add(parent)
    return kept


def _with_images(store: ReadableStore, hits: list) -> list[Hit]:
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
