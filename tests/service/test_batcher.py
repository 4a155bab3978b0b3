"""The dynamic batcher: batches concurrent calls, returns each caller its own result,
drops expired work, passes errors on; and batched server answers equal unbatched ones."""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, PngImagePlugin

from segsearch.service.batcher import DynamicBatcher
from segsearch.service.errors import DeadlineExceeded
from service_helpers import PHOTO


def test_concurrent_calls_share_batches_and_get_their_own_results():
    seen = []

    def square_all(items):
        seen.append(list(items))
        time.sleep(0.02)  # a model call: later arrivals queue up meanwhile
        return [item * item for item in items]

    batcher = DynamicBatcher(square_all, max_batch=4, max_wait_s=0.01)
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(batcher.submit, range(12)))
    finally:
        batcher.close()
    assert results == [n * n for n in range(12)]
    assert max(len(batch) for batch in seen) > 1 and all(len(batch) <= 4 for batch in seen)
    assert sorted(n for batch in seen for n in batch) == list(range(12))


def test_expired_items_are_dropped_and_errors_reach_every_caller():
    ran = []
    gate = threading.Event()

    def slow(items):
        ran.extend(items)
        gate.wait(5)
        if "boom" in items:
            raise RuntimeError("model failed")
        return list(items)

    batcher = DynamicBatcher(slow, max_batch=1, max_wait_s=0)
    try:
        with ThreadPoolExecutor(2) as pool:
            blocker = pool.submit(batcher.submit, "first")
            time.sleep(0.05)
            with pytest.raises(DeadlineExceeded):
                batcher.submit("late", deadline=time.monotonic() + 0.05)
            gate.set()
            assert blocker.result(5) == "first"
        with pytest.raises(RuntimeError, match="model failed"):
            batcher.submit("boom")
    finally:
        batcher.close()
    assert "late" not in ran  # its deadline passed before its batch formed


def _same_pixels_other_bytes(data: bytes, count: int) -> list[bytes]:
    """`count` PNG encodings of one image, each with its own text chunk: identical pixels,
    different bytes (requests for the same bytes take turns in the server, see
    `analysis.SingleFlight`, and would never share a batch)."""
    pixels = Image.open(io.BytesIO(data)).convert("RGB")
    encoded = []
    for number in range(count):
        info = PngImagePlugin.PngInfo()
        info.add_text("copy", str(number))
        buffer = io.BytesIO()
        pixels.save(buffer, format="PNG", pnginfo=info)
        encoded.append(buffer.getvalue())
    return encoded


def test_batched_server_answers_equal_sequential_ones(served, corpus_dir):
    """With the embedding cache off, so that every query embeds its image again."""
    from segsearch.service.embedding_cache import EmbeddingCache

    boxes = [(x, y, x + 60, y + 50) for x in (0, 60, 120, 180) for y in (0, 70, 140)]
    images = _same_pixels_other_bytes((corpus_dir / PHOTO).read_bytes(), len(boxes))
    analyzer = served.server.servicer.app.analyzer
    cache, analyzer.embedding_cache = analyzer.embedding_cache, EmbeddingCache(0)
    try:
        sequential = [served.client.search_box(data, box, top_k=3).hits for data, box in zip(images, boxes)]
        with ThreadPoolExecutor(6) as pool:
            concurrent = list(pool.map(lambda pair: served.client.search_box(pair[0], pair[1], top_k=3).hits,
                                       zip(images, boxes)))
    finally:
        analyzer.embedding_cache = cache
    for alone, together in zip(sequential, concurrent):
        assert [h.segment_id for h in alone] == [h.segment_id for h in together]
        assert [h.score for h in alone] == pytest.approx([h.score for h in together], abs=1e-4)
    batcher = served.server.servicer.app.analyzer._embed_batcher
    assert batcher is not None and max(batcher.batch_sizes) > 1
