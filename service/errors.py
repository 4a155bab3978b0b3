"""Request errors with their gRPC status code.

Why a separate type: the logic modules (validation, regions, search) stay free of gRPC
calls and are tested directly, yet every failure they raise already says which status the
client gets. The error interceptor (`interceptors.py`) turns a `ServiceError` into
`context.abort(code, message)`, so the servicer has no try/except of its own.
"""
from __future__ import annotations

import grpc


# The status message travels in a trailer, and gRPC refuses trailers over its metadata limit
# (8 KiB by default): a longer message reaches the client as RESOURCE_EXHAUSTED "Stream removed"
# instead of the real status. Client input is echoed shortened, and a whole message is capped.
MAX_MESSAGE_CHARS = 1024
MAX_ECHO_CHARS = 64


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` cut to at most `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    tail = f"... ({len(text) - limit} more characters)"
    return text[: max(0, limit - len(tail))] + tail


def echo(value) -> str:
    """A client-sent value for a message: its repr, shortened to MAX_ECHO_CHARS."""
    return shorten(repr(value), MAX_ECHO_CHARS)


class ServiceError(Exception):
    """A request that cannot be served; `code` is the gRPC status the client receives, and the
    message is capped at MAX_MESSAGE_CHARS (see `shorten`)."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        message = shorten(message)
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


def at_position(number: int, function, *args):
    """`function(*args)` for the query at `number` of a batch: a ServiceError keeps its status,
    its message prefixed with `queries[number]: ` so the caller knows which query to fix."""
    try:
        return function(*args)
    except ServiceError as error:
        prefixed = type(error)(f"queries[{number}]: {error.message}")
        prefixed.code = error.code
        raise prefixed from None
