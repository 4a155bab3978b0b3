"""DecodeBudget: at most so many pixels in decoding at once, across threads."""
import threading
import time

import pytest

from segsearch.indexer.decode_budget import DecodeBudget, DecodeBudgetExhausted


def test_reservations_wait_for_room_then_time_out():
    budget = DecodeBudget(10)
    with budget.reserve(6):
        with budget.reserve(4):
            assert budget.in_use == 10
        started = time.monotonic()
        with pytest.raises(DecodeBudgetExhausted, match="6 of 10 pixels are being decoded; this image needs 5"):
            with budget.reserve(5, timeout=0.2):
                pass
        assert time.monotonic() - started >= 0.2
    assert budget.in_use == 0


def test_an_image_larger_than_the_budget_decodes_alone():
    budget = DecodeBudget(10)
    with budget.reserve(50, timeout=0):
        assert budget.in_use == 50
    assert budget.in_use == 0


def test_concurrent_decodes_never_exceed_the_budget():
    budget, peak, lock = DecodeBudget(12), [0], threading.Lock()

    def decode():
        with budget.reserve(5, timeout=10):
            with lock:
                peak[0] = max(peak[0], budget.in_use)
            time.sleep(0.02)

    threads = [threading.Thread(target=decode) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] <= 10 and budget.in_use == 0  # two 5-pixel images at a time, never three
