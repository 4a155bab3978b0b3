"""A small dynamic batcher: concurrent model calls of many requests become one batched call.

Why: the model runs a batch of B images in one forward pass for much less than B single
passes (bigger matrix products, one Python/dispatch overhead, no threads oversubscribing
the cores), and requests arrive one image at a time from many clients. One worker thread
takes the first waiting item, waits at most `max_wait_s` for more (up to `max_batch`), runs
`run_batch` on all of them, and hands each caller its own result. Under light load a
request waits at most `max_wait_s` extra; under heavy load batches fill at once.

Deadlines: an item whose deadline has passed by the time its batch forms is dropped (its
caller gets DeadlineExceeded), and a caller stops waiting at its deadline, so a batch never
spends model time on answers nobody waits for.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Generic, TypeVar

from segsearch.service.errors import DeadlineExceeded

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item]):
    item: Item
    deadline: float | None
    future: Future


class DynamicBatcher(Generic[Item, Result]):
    """`submit(item)` from any thread; `run_batch(items) -> results` runs in one worker thread."""

    def __init__(self, run_batch: Callable[[Sequence[Item]], Sequence[Result]], max_batch: int = 8,
                 max_wait_s: float = 0.002, name: str = "batcher"):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, max_batch, max_wait_s
        self.batch_sizes: list[int] = []  # for measurements and tests (bounded below)
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    def submit(self, item: Item, deadline: float | None = None) -> Result:
        """Run `item` in the next batch and return its result (blocks; `deadline` is monotonic)."""
        future: Future = Future()
        self._queue.put(_Pending(item, deadline, future))
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            raise DeadlineExceeded("deadline exceeded while waiting for the model; the work was abandoned") from None

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._collect(first)
            live = [p for p in batch if self._still_wanted(p)]
            if live:
                self._run(live)

    def _collect(self, first: _Pending) -> list[_Pending]:
        batch = [first]
        until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = until - time.monotonic()
            try:
                pending = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is None:  # closing: finish this batch, then stop
                self._queue.put(None)
                break
            batch.append(pending)
        return batch

    @staticmethod
    def _still_wanted(pending: _Pending) -> bool:
        if not pending.future.set_running_or_notify_cancel():
            return False  # the caller gave up (deadline)
        if pending.deadline is not None and time.monotonic() >= pending.deadline:
            pending.future.set_exception(DeadlineExceeded("deadline exceeded before the model ran"))
            return False
        return True

    def _run(self, batch: list[_Pending]) -> None:
        self.batch_sizes.append(len(batch))
        del self.batch_sizes[:-1000]
        try:
            results = self.run_batch([p.item for p in batch])
        except BaseException as error:  # noqa: BLE001 - every caller must hear about it
            for pending in batch:
                pending.future.set_exception(error)
            return
        for pending, result in zip(batch, results):
            pending.future.set_result(result)
