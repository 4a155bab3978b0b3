"""Request errors with their gRPC status code.

Why a separate type: the logic modules (validation, regions, search) stay free of gRPC
calls and are tested directly, yet every failure they raise already says which status the
client gets. The error interceptor (`interceptors.py`) turns a `ServiceError` into
`context.abort(code, message)`, so the servicer has no try/except of its own.
"""
from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request that cannot be served; `code` is the gRPC status the client receives."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
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
