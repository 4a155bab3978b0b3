"""idle_limited: a request stream whose messages must keep coming."""
import threading
import time

import pytest

from segsearch.service.errors import DeadlineExceeded
from segsearch.service.streams import idle_limited


def _slow(values, pause: float, release: threading.Event | None = None):
    for value in values:
        time.sleep(pause)
        yield value
    if release is not None:
        release.wait(10)


def test_messages_pass_through_in_order():
    assert list(idle_limited(iter(range(5)), 1.0)) == [0, 1, 2, 3, 4]


def test_a_silent_stream_ends_with_deadline_exceeded_naming_the_last_message():
    release = threading.Event()
    stream = idle_limited(_slow([1, 2], 0.01, release), 0.3, "IndexImages")
    assert [next(stream), next(stream)] == [1, 2]
    with pytest.raises(DeadlineExceeded, match="no IndexImages message for 0.3 s after message #2"):
        next(stream)
    release.set()


def test_the_source_error_reaches_the_consumer():
    def broken():
        yield 1
        raise ValueError("stream broke off")

    stream = idle_limited(broken(), 1.0)
    assert next(stream) == 1
    with pytest.raises(ValueError, match="broke off"):
        next(stream)


def test_an_abandoned_stream_lets_its_reader_thread_end():
    before = threading.active_count()
    release = threading.Event()
    stream = idle_limited(_slow(range(100), 0.01, release), 1.0)
    next(stream)
    stream.close()  # the handler gave up (an error elsewhere)
    release.set()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before
