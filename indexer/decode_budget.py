"""A memory budget for decoding: at most so many pixels are being decoded at once.

Why: a small compressed file can claim a large image (a 126 KB PNG of 39 Mpx). Decoding one
costs about 7 bytes per pixel at its peak (the decoder's buffers, then RGB), so eight such
requests at once took 2.8 GiB, and glibc kept most of it. The pixel guard bounds one image;
this bounds them together. A decode first reserves its header's pixel count; when the budget
is spent it waits for others to finish, up to a deadline, then gives up with
`DecodeBudgetExhausted` (the service answers RESOURCE_EXHAUSTED, the client retries). An image
larger than the whole budget may still decode alone, so the budget never refuses what the
pixel limit allows. After a large decode, free memory goes back to the system (`malloc_trim`),
so the resident size returns near its baseline.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

TRIM_ABOVE_PIXELS = 4_000_000  # decodes at least this large hand their memory back afterwards


class DecodeBudgetExhausted(Exception):
    """No room to decode within the deadline: other large images are being decoded."""


class DecodeBudget:
    """At most `max_pixels` pixels in decoding (or, for a server's queries, in use by requests)
    at once, across threads."""

    def __init__(self, max_pixels: int):
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.max_pixels = max_pixels
        self.in_use = 0
        self._changed = threading.Condition()

    def acquire(self, pixels: int, timeout: float | None = None) -> None:
        """Take `pixels` of the budget, waiting up to `timeout` s for room; `release` gives them back."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self.in_use and self.in_use + pixels > self.max_pixels:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DecodeBudgetExhausted(
                        f"{self.in_use} of {self.max_pixels} pixels are being decoded; this image needs {pixels}")
                self._changed.wait(left)
            self.in_use += pixels

    def release(self, pixels: int) -> None:
        with self._changed:
            self.in_use -= pixels
            self._changed.notify_all()
        if pixels >= TRIM_ABOVE_PIXELS:
            release_free_memory()

    @contextmanager
    def reserve(self, pixels: int, timeout: float | None = None) -> Iterator[None]:
        """Hold `pixels` of the budget for the block; wait up to `timeout` s for room."""
        self.acquire(pixels, timeout)
        try:
            yield
        finally:
            self.release(pixels)


def release_free_memory() -> None:
    """Return the allocator's free memory to the system (glibc `malloc_trim`; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_TRIM = []


def _malloc_trim():
    if not _TRIM:
        name = ctypes.util.find_library("c")
        library = ctypes.CDLL(name) if name else None
        _TRIM.append(getattr(library, "malloc_trim", None))
    return _TRIM[0]
