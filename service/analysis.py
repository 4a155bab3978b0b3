"""The model side of the service: decode a client's image, embed it, segment it.

Everything goes through the indexer's own code (`indexer.decode` for safe decoding with the
pixel guard, `spml.segmenter` for resize -> embed -> k-means -> labels), so a query image
is processed exactly as an indexed one and its vectors are comparable with the index.

A box/mask query needs embeddings only: `_embed_batch` calls `Segmenter.embed` on the same
resized input the segmenter builds (`resize_for_embedding`), so it costs one forward pass and
no k-means.

With a `BatchConfig`, concurrent requests' forward passes (embed) and segmentations go through
dynamic batchers: one batched model call for many requests. A request for a number of
segments no longer changes the k-means grid: it cuts the region hierarchy every segmentation
builds (`regions`), so every request shares the batched path.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from segsearch.indexer.decode import DecodeConfig, DecodedImage, ImageSkipped, decode_bytes
from segsearch.indexer.decode_budget import DecodeBudget, DecodeBudgetExhausted
from segsearch.spml.hierarchy import cut_by_count
from segsearch.spml.segmenter import (ImageSegments, RegionLevel, Segmenter, StageTimes, resize_for_embedding,
                                      upsample_nearest)
from segsearch.service.batcher import DynamicBatcher
from segsearch.service.config import BatchConfig
from segsearch.service.embedding_cache import CachedEmbedding, EmbeddingCache
from segsearch.service.errors import InvalidArgument, ResourceExhausted
from segsearch.service.request_scope import add_stage_seconds, check_deadline, current_scope, stage

MAX_SEGMENTS = 1024
BUDGET_WAIT_S = 30.0  # longest wait for room in the decode budget (within the call's deadline)


class ImageAnalyzer:
    """Decoding limits + one `Segmenter` (model, label bank, class names, config)."""

    def __init__(self, segmenter: Segmenter, decode_config: DecodeConfig, batching: BatchConfig | None = None,
                 decode_budget: DecodeBudget | None = None, embedding_cache: EmbeddingCache | None = None):
        self.segmenter = segmenter
        self.decode_config = decode_config
        self.decode_budget = decode_budget
        self.embedding_cache = embedding_cache if embedding_cache is not None else EmbeddingCache(0)
        self._single_flight = SingleFlight()
        self._embed_batcher = self._segment_batcher = None
        if batching is not None and batching.max_batch > 1:
            wait = batching.max_wait_ms / 1000
            self._embed_batcher = DynamicBatcher(self._embed_batch, batching.max_batch, wait, "embed-batcher")
            self._segment_batcher = DynamicBatcher(self._segment_batch, batching.max_batch, wait, "segment-batcher")

    def close(self) -> None:
        for batcher in (self._embed_batcher, self._segment_batcher):
            if batcher is not None:
                batcher.close()

    @property
    def embed_size(self) -> int:
        return self.segmenter.config.embed_size

    @property
    def class_names(self) -> list[str]:
        return self.segmenter.class_names

    def decode(self, data: bytes, field: str = "image.data") -> DecodedImage:
        """Client bytes -> bounded RGB image; INVALID_ARGUMENT says why it cannot be used,
        RESOURCE_EXHAUSTED that the decode budget stayed full until the call's deadline."""
        if not data:
            raise InvalidArgument(f"{field} is empty; send PNG, JPEG or WebP bytes")
        with stage("decode"):
            try:
                decoded = self.decode_bounded(data)
            except ImageSkipped as skipped:
                raise InvalidArgument(
                    f"{field} cannot be used ({skipped.skipped.reason.value}): {skipped.skipped.detail}") from None
            self._hold_until_the_request_ends(decoded.original_size[0] * decoded.original_size[1])
        return decoded

    def _hold_until_the_request_ends(self, pixels: int) -> None:
        """A query keeps full-size arrays of its image after decoding (the region mask, the
        Segment maps at the size sent): its pixels stay counted in the budget until it ends."""
        scope = current_scope()
        if self.decode_budget is None or scope is None:
            return
        try:
            self.decode_budget.acquire(pixels, self._budget_wait())
        except DecodeBudgetExhausted as busy:
            raise ResourceExhausted(f"the server is working on other large images ({busy}); retry shortly") from None
        scope.on_exit.append(lambda: self.decode_budget.release(pixels))

    @staticmethod
    def _budget_wait() -> float:
        deadline = _deadline()
        return BUDGET_WAIT_S if deadline is None else max(0.0, min(BUDGET_WAIT_S, deadline - time.monotonic()))

    def decode_bounded(self, data: bytes) -> DecodedImage:
        """`decode_bytes` within the server's decode budget (waiting up to the call's deadline,
        at most BUDGET_WAIT_S); raises ImageSkipped as it does."""
        try:
            return decode_bytes(data, self.decode_config, self.decode_budget, self._budget_wait())
        except DecodeBudgetExhausted as busy:
            raise ResourceExhausted(f"the server is decoding other large images ({busy}); retry shortly") from None

    def cached_embedding(self, data: bytes) -> CachedEmbedding | None:
        """The embedding map and size of these exact image bytes, if embedded lately."""
        return self.embedding_cache.get(self._key(EMBEDDING_KEY, hashlib.sha256(data).hexdigest()))

    def cached_regions(self, data: bytes) -> CachedRegions | None:
        """The region level of these exact image bytes, if a box or point query segmented them lately."""
        return self.embedding_cache.get(self._key(REGIONS_KEY, hashlib.sha256(data).hexdigest()))

    @contextmanager
    def embedding_turn(self, data: bytes) -> Iterator[CachedEmbedding | None]:
        """Mask queries on the same image bytes take turns (as `regions_of` does for boxes),
        so the first one's embedding map is in the cache when the next one looks; yields
        that cached map (`cached_embedding`), or None, under the one hash of the bytes."""
        key = self._key(EMBEDDING_KEY, hashlib.sha256(data).hexdigest())
        with self._single_flight.turn(key, _deadline()):
            yield self.embedding_cache.get(key)

    def regions_of(self, data: bytes) -> tuple[CachedRegions, DecodedImage | None]:
        """The region level of these image bytes and, when it had to be computed, the decoded
        image. Requests for the same bytes at the same time segment them once: the others wait
        (up to their deadline) for the first and then read its result from the cache, so
        several clients asking about one new image do not each pay its forward pass."""
        key = self._key(REGIONS_KEY, hashlib.sha256(data).hexdigest())
        with self._single_flight.turn(key, _deadline()):
            cached = self.embedding_cache.get(key)
            if cached is not None:
                return cached, None
            image = self.decode(data)
            return self.region_level(image), image

    def region_level(self, image: DecodedImage) -> CachedRegions:
        """Segment the image and keep its region level in the cache (`cached_regions`), so that
        the next box or point on the same image costs a lookup, not a segmentation."""
        segments = self.segment(image)
        level = segments.regions
        value = CachedRegions(level.label_map, image.original_size, segments.label_map,
                              segments.leaf_sums.astype(np.float32), level.leaf_regions,
                              point_regions(segments, len(level.segments)))
        self.embedding_cache.put(self._key(REGIONS_KEY, image.sha256), value)
        return value

    def _key(self, kind: str, sha256: str) -> tuple[str, str, int]:
        """Cache key of one kind of entry for an image's bytes (their sha256) at this embed size."""
        return kind, sha256, self.embed_size

    def embed(self, image: DecodedImage) -> torch.Tensor:
        """Unit-norm embeddings (D, E/4, E/4) of the whole image, resized to E x E like the
        indexer; kept in the cache for the image's next region (`cached_embedding`)."""
        key = self._key(EMBEDDING_KEY, image.sha256)
        with stage("embed"):
            resized = resize_for_embedding(image.pixels, self.embed_size)
            if self._embed_batcher is not None:
                embeddings = self._embed_batcher.submit(resized, _deadline())
            else:
                embeddings = self._embed_batch([resized])[0]
        self.embedding_cache.put(key, CachedEmbedding(embeddings, image.original_size))
        return embeddings

    def _embed_batch(self, resized: list[np.ndarray]) -> list[torch.Tensor]:
        return list(self.segmenter.embed(resized))

    def segment(self, image: DecodedImage) -> ImageSegments:
        """Over-segment, build the region hierarchy and label one image (at its decoded size)."""
        check_deadline("segmenting")
        if self._segment_batcher is not None:
            segments, seconds = self._segment_batcher.submit(image.pixels, _deadline())
        else:
            segments, seconds = _segment_with(self.segmenter, [image.pixels])[0]
        add_stage_seconds(seconds)  # the segmenter times embed / segment / label itself
        return segments

    def regions(self, segments: ImageSegments, num_regions: int) -> RegionLevel:
        """The cut of `segments`' hierarchy with `num_regions` regions (all fine segments when
        the image has fewer), labelled like the default level."""
        check_num_regions(num_regions)
        with stage("segment"):
            return self.segmenter.regions_at(segments, num_regions)

    def _segment_batch(self, images: list[np.ndarray]) -> list[tuple[ImageSegments, dict[str, float]]]:
        return _segment_with(self.segmenter, images)


def _segment_with(segmenter: Segmenter, images: list[np.ndarray]) -> list[tuple[ImageSegments, dict[str, float]]]:
    """Segment a batch; each image is charged the batch's stage times (it waited for them)."""
    timings = StageTimes()
    results = segmenter(images, timings=timings)
    seconds = timings.as_dict()
    return [(result, seconds) for result in results]


EMBEDDING_KEY, REGIONS_KEY = "embedding", "regions"  # the two kinds of entry in the image cache


@dataclass(frozen=True)
class CachedRegions:
    """An image's region level as box and point queries need it: `label_map` (H', W') int32
    region index at the decoded size (-1: none), `original_size` (W, H) of the image as sent;
    and its fine level, from which a box takes
    the part of a region inside it (`regions.clipped_region_vector`) and a point its region
    (`regions.point_region`): `leaf_map` (H', W') int32 fine segment index, `leaf_sums` (n, D)
    float32 embedding sums, `leaf_regions` (n,) the region of each fine segment,
    `leaf_point_regions` (n,) its region in the finer cut that points use."""

    label_map: np.ndarray
    original_size: tuple[int, int]
    leaf_map: np.ndarray
    leaf_sums: np.ndarray
    leaf_regions: np.ndarray
    leaf_point_regions: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in (self.label_map, self.leaf_map, self.leaf_sums,
                                              self.leaf_regions, self.leaf_point_regions))


# A point queries with its region in a cut of the hierarchy this many times finer than the
# region level. Why: a click is the most ambiguous prompt (SAM answers a point with three
# nested masks for that reason); the region level is the right answer for "this box", but for
# a point it merges the texture under the click with a neighbour more often. Measured on the
# retrieval benchmark (bench/RESULTS.md, "Points query a finer cut"): P@10 0.656 at 1x, 0.673
# at 1.25x, 0.679 at 1.5x, 0.676 at 2x.
POINT_CUT_FACTOR = 1.5


def point_regions(segments: ImageSegments, num_regions: int) -> np.ndarray:
    """`(n,)` the region of each fine segment in the cut points use (POINT_CUT_FACTOR times
    finer than the `num_regions` of the region level)."""
    if segments.tree is None or not segments.segments:
        return segments.regions.leaf_regions
    return cut_by_count(segments.tree, max(1, round(POINT_CUT_FACTOR * num_regions)))


class SingleFlight:
    """One lock per key while someone holds or waits for it (the table does not grow)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict = {}  # key -> [lock, holders and waiters]

    @contextmanager
    def turn(self, key, deadline: float | None) -> Iterator[None]:
        """Hold `key`'s lock; past `deadline` (monotonic seconds) go ahead without it."""
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        timeout = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        acquired = entry[0].acquire(timeout=timeout)
        try:
            yield
        finally:
            if acquired:
                entry[0].release()
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]


def _deadline() -> float | None:
    scope = current_scope()
    return None if scope is None else scope.deadline


def check_num_regions(num_regions: int) -> None:
    """INVALID_ARGUMENT unless 1 <= num_regions <= MAX_SEGMENTS."""
    if not 1 <= num_regions <= MAX_SEGMENTS:
        raise InvalidArgument(f"num_segments must be between 1 and {MAX_SEGMENTS} (0 = the server's default "
                              f"region level), got {num_regions}")


def to_original_size(label_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Decoded-size map (H', W') -> the image as sent (H, W) of `size` (W, H), nearest."""
    width, height = size
    if label_map.shape == (height, width):
        return label_map
    return upsample_nearest(label_map, height, width)
