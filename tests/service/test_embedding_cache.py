"""The embedding cache: bounded by bytes, LRU, and invisible in the answers."""
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from segsearch.service.embedding_cache import CachedEmbedding, EmbeddingCache
from service_helpers import metric_value, mosaic_images, png_bytes


def _map(fill: float) -> CachedEmbedding:
    return CachedEmbedding(torch.full((4, 8, 8), fill), (32, 32))  # 1 KiB of float32


def test_lru_eviction_by_bytes():
    cache = EmbeddingCache(max_bytes=3 * 1024)
    for key in "abc":
        cache.put(key, _map(1.0))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", _map(2.0))  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") is not None and cache.get("d") is not None
    assert len(cache) == 3 and cache.bytes == 3 * 1024
    assert (cache.hits, cache.misses) == (3, 1)


def test_off_and_oversized_entries_are_not_kept():
    assert EmbeddingCache(0).get("x") is None
    small = EmbeddingCache(512)
    small.put("big", _map(1.0))
    assert len(small) == 0 and small.bytes == 0


def _square_mask_png(side: int, x0: int, y0: int, x1: int, y1: int) -> bytes:
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_second_region_of_an_image_reuses_its_embedding_with_the_same_hits(served):
    cache = served.server.servicer.app.analyzer.embedding_cache
    pixels = mosaic_images(1, seed=21)[0]
    image, side = png_bytes(pixels), pixels.shape[0]
    hits_before, misses_before = cache.hits, cache.misses
    first = served.client.search_mask(image, _square_mask_png(side, 0, 0, 48, 48), top_k=5)
    second = served.client.search_mask(image, _square_mask_png(side, 48, 48, 96, 96), top_k=5)
    again = served.client.search_mask(image, _square_mask_png(side, 0, 0, 48, 48), top_k=5)
    assert (cache.misses - misses_before, cache.hits - hits_before) == (1, 2)
    assert [(h.segment_id, round(h.score, 5)) for h in again.hits] == \
           [(h.segment_id, round(h.score, 5)) for h in first.hits]
    assert second.hits
    assert metric_value(served.metrics_text(), "segsearch_embedding_cache_hits") == cache.hits


def test_a_second_box_or_point_of_an_image_reuses_its_region_level_with_the_same_hits(served):
    """Boxes and points pick a region of the image's segmentation: the region level is cached,
    so the next box or point on the same image segments nothing."""
    analyzer = served.server.servicer.app.analyzer
    image = png_bytes(mosaic_images(1, seed=22)[0])
    first = served.client.search_point(image, (20, 20), top_k=5)
    assert analyzer.cached_regions(image) is not None
    hits_before = analyzer.embedding_cache.hits
    again = served.client.search_point(image, (20, 20), top_k=5)
    served.client.search_box(image, (0, 0, 60, 60), top_k=5)
    assert analyzer.embedding_cache.hits - hits_before >= 2
    assert [(h.segment_id, round(h.score, 5)) for h in again.hits] == \
           [(h.segment_id, round(h.score, 5)) for h in first.hits]


def test_requests_for_one_new_image_at_once_segment_it_once(served, monkeypatch):
    """Two clients asking about the same new image at the same time: one segmentation, the
    other request waits for it and reads the cache; both get the same hits."""
    analyzer = served.server.servicer.app.analyzer
    image = png_bytes(mosaic_images(1, seed=23)[0])
    computed, real = [], analyzer.region_level

    def slow_region_level(decoded):
        computed.append(decoded.sha256)
        time.sleep(0.3)  # long enough for the second request to arrive while this one works
        return real(decoded)

    monkeypatch.setattr(analyzer, "region_level", slow_region_level)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda point: served.client.search_point(image, point, top_k=5), [(20, 20)] * 2))
    assert len(computed) == 1
    assert [(h.segment_id, round(h.score, 5)) for h in answers[0].hits] == \
           [(h.segment_id, round(h.score, 5)) for h in answers[1].hits]


def test_mask_queries_on_one_new_image_at_once_embed_it_once(served, monkeypatch):
    analyzer = served.server.servicer.app.analyzer
    pixels = mosaic_images(1, seed=24)[0]
    image, side = png_bytes(pixels), pixels.shape[0]
    embedded, real = [], analyzer.embed

    def slow_embed(decoded):
        embedded.append(decoded.sha256)
        time.sleep(0.3)
        return real(decoded)

    monkeypatch.setattr(analyzer, "embed", slow_embed)
    masks = [_square_mask_png(side, 0, 0, 48, 48), _square_mask_png(side, 48, 48, 96, 96)]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda mask: served.client.search_mask(image, mask, top_k=5), masks))
    assert len(embedded) == 1 and all(answer.hits for answer in answers)
