"""Request streams that cannot hold a server hostage.

A client that opens IndexImages and then sends nothing (or stalls between images) would keep a
worker thread, a write slot and, before, the index's write lock, for as long as its deadline
allows, possibly forever. `idle_limited` ends such a stream: each message must arrive within
`seconds` of the previous one (of the start, for the first), or the call fails with
DEADLINE_EXCEEDED. Images committed before stay committed; the rest was never acknowledged.

gRPC's synchronous request iterator has no timeout of its own, so a reader thread pulls the
messages into a one-slot queue and the handler waits on the queue. When the handler gives up,
gRPC cancels the call, the reader's `next()` raises, and the thread ends.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

from segsearch.service.errors import DeadlineExceeded

_END, _ERROR = object(), object()


def idle_limited(messages: Iterable, seconds: float, what: str = "stream") -> Iterator:
    """`messages`, failing with DeadlineExceeded when one takes longer than `seconds` to come."""
    slot: queue.Queue = queue.Queue(maxsize=1)  # one message ahead at most: back pressure
    abandoned = threading.Event()
    threading.Thread(target=_read, args=(iter(messages), slot, abandoned), name="stream-reader", daemon=True).start()
    number = 0
    try:
        while True:
            try:
                kind, value = slot.get(timeout=seconds)
            except queue.Empty:
                raise DeadlineExceeded(
                    f"no {what} message for {seconds:g} s after message #{number} (idle stream): it was "
                    "closed; what it committed before stays, send the rest again") from None
            if kind is _END:
                return
            if kind is _ERROR:
                raise value
            number += 1
            yield value
    finally:
        abandoned.set()


def _read(messages: Iterator, slot: queue.Queue, abandoned: threading.Event) -> None:
    """Reader thread: each message (then the end, or the error) into `slot`, until abandoned."""
    try:
        for message in messages:
            if not _put(slot, (None, message), abandoned):
                return
        _put(slot, (_END, None), abandoned)
    except BaseException as error:  # noqa: BLE001 - handed to the handler, which raises it
        _put(slot, (_ERROR, error), abandoned)


def _put(slot: queue.Queue, item, abandoned: threading.Event) -> bool:
    while not abandoned.is_set():
        try:
            slot.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False
