"""Per-request bookkeeping shared by the interceptor and the logic: deadline and stage times.

The metrics interceptor opens a `RequestScope` around each call (in the worker thread that
runs it) and publishes it in a context variable; the logic marks its stages with
`with stage("embed"):` and never touches Prometheus. When the call ends the interceptor
observes the collected stage durations into the stage histograms. Entering a stage also
checks the client's deadline, so work is abandoned between stages once nobody waits for
it (gRPC has already answered DEADLINE_EXCEEDED to the client by then).

Outside a scope (logic called directly, e.g. from tests or the CLI) `stage` only runs the
block.
"""
from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from segsearch.service.errors import DeadlineExceeded

STAGES = ("decode", "embed", "segment", "label", "search", "store")

_current: contextvars.ContextVar["RequestScope | None"] = contextvars.ContextVar(
    "segsearch_request_scope", default=None
)


@dataclass
class RequestScope:
    """method: RPC name; deadline: `time.monotonic()` value after which work is abandoned."""

    method: str
    deadline: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    on_exit: list[Callable[[], None]] = field(default_factory=list)  # run when the request ends

    def check_deadline(self, before: str) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded(f"deadline exceeded before {before}; the work was abandoned")

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.check_deadline(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + elapsed


@contextmanager
def request_scope(scope: RequestScope) -> Iterator[RequestScope]:
    """Make `scope` the current one for the duration of the block (this thread/context)."""
    token = _current.set(scope)
    try:
        yield scope
    finally:
        _current.reset(token)
        for release in reversed(scope.on_exit):
            release()


def current_scope() -> RequestScope | None:
    return _current.get()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage `name` of the current request (no-op outside a request)."""
    scope = _current.get()
    if scope is None:
        yield
        return
    with scope.stage(name):
        yield


def check_deadline(before: str) -> None:
    """Abandon the request if its deadline has passed (no-op outside a request)."""
    scope = _current.get()
    if scope is not None:
        scope.check_deadline(before)


def add_stage_seconds(seconds: dict[str, float]) -> None:
    """Add stage times measured elsewhere (e.g. the segmenter's own `StageTimes`)."""
    scope = _current.get()
    if scope is None:
        return
    for name, value in seconds.items():
        if value > 0:
            scope.stage_seconds[name] = scope.stage_seconds.get(name, 0.0) + value
