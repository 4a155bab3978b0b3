"""Server interceptors: metrics, bearer-token auth, the concurrency limit, error mapping.

Installed outermost first, as `build_interceptors` returns them:

1. `MetricsInterceptor` counts every SegmentSearch RPC by method and final status code
   (rejections by the interceptors below included), times it, tracks the in-flight gauge,
   and opens the `RequestScope` in which the logic records stage times and reads the
   client's deadline. Handlers never touch Prometheus.
2. `AuthInterceptor` (only with a token) rejects calls without `authorization: Bearer
   <token>` with UNAUTHENTICATED; the token is compared in constant time; the standard
   health service stays open so that probes work without the secret.
3. `ConcurrencyLimitInterceptor` answers RESOURCE_EXHAUSTED at once when `limit` SegmentSearch
   calls are already running, instead of queueing work that would miss its deadline.
4. `ErrorInterceptor` turns a `ServiceError` raised by the logic into its status code and
   message, and any other exception into INTERNAL (logged with its traceback), so the
   servicer has no error handling of its own and the server survives every failure. It also
   answers bytes that do not parse as the request message with INVALID_ARGUMENT (gRPC's own
   answer would be INTERNAL, which would blame the server for a client's bad input), and
   turns a request stream that broke off (client cancel, deadline, a message over the size
   limit) into CANCELLED, raised inside the handler's loop so that nothing more is committed.

Interceptors 1, 3 and 4 apply to the SegmentSearch service only; health and reflection
pass through them untouched.
"""
from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable

import grpc

from segsearch.service.errors import InvalidArgument, ResourceExhausted, ServiceError, Unauthenticated
from segsearch.service.prometheus import ServiceMetrics
from segsearch.service.request_scope import RequestScope, request_scope

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/segsearch.v1.SegmentSearch/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# How long the end of a request stream waits for gRPC to cancel the call (see `_checked_stream`).
STREAM_END_GRACE_S = 0.01

Behavior = Callable[[object, grpc.ServicerContext], object]


def method_name(full_method: str) -> str:
    """"/segsearch.v1.SegmentSearch/SearchSimilar" -> "SearchSimilar"."""
    return full_method.rsplit("/", 1)[-1]


def _wrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior], Behavior],
                  request_deserializer=None) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour passed through `wrap` (any of the four kinds), and
    its request deserializer replaced when one is given."""
    if handler.unary_unary:
        factory, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream:
        factory, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif handler.stream_unary:
        factory, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    return factory(wrap(behavior), request_deserializer=request_deserializer or handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def abort_with(context: grpc.ServicerContext, error: ServiceError):
    context.abort(error.code, error.message)


def status_code_name(context: grpc.ServicerContext, raised: bool) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if raised else "OK"
    return code.name


class MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None or not full.startswith(SERVICE_PREFIX):
            return handler
        method = method_name(full)

        def wrap(behavior: Behavior) -> Behavior:
            def measured(request, context):
                remaining = context.time_remaining()
                deadline = None if remaining is None else time.monotonic() + remaining
                scope = RequestScope(method=method, deadline=deadline)
                started, raised = time.perf_counter(), False
                self.metrics.inflight.inc()
                try:
                    with request_scope(scope):
                        return behavior(request, context)
                except BaseException:
                    raised = True
                    raise
                finally:
                    self.metrics.inflight.dec()
                    self.metrics.observe_request(method, status_code_name(context, raised),
                                                 time.perf_counter() - started, scope.stage_seconds)
            return measured

        return _wrap_handler(handler, wrap)


class AuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata on every call but health checks.

    The scheme is case-insensitive (RFC 7235: `bearer` and `BEARER` are the same scheme); the
    token is compared in constant time. Failures are logged with the method and the peer, never
    with what was sent, and the answer never echoes it either."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = token.encode()

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                scheme, _, credentials = given.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(credentials, self._expected)
        return False

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler

        def wrap(_behavior: Behavior) -> Behavior:
            def reject(_request, context):
                log.warning("authentication failed: %s from %s (missing or wrong bearer token)",
                            method_name(handler_call_details.method), context.peer())
                abort_with(context, Unauthenticated(
                    "missing or invalid bearer token: send the metadata 'authorization: Bearer <token>' "
                    "(the segsearch commands read it from --token-file or $SEGSEARCH_TOKEN)"))
            return reject

        return _wrap_handler(handler, wrap)


WRITE_METHODS = frozenset({"IndexImages", "DeleteImages"})


class ConcurrencyLimitInterceptor(grpc.ServerInterceptor):
    """At most `limit` SegmentSearch reads and, apart, `write_limit` writes (IndexImages,
    DeleteImages) run at once; the next one fails at once with RESOURCE_EXHAUSTED. Separate
    slots, so that writers (streams that may stall until their idle timeout) never take the
    slots of searches."""

    def __init__(self, limit: int, write_limit: int | None = None):
        write_limit = limit if write_limit is None else write_limit
        if limit < 1 or write_limit < 1:
            raise ValueError(f"the concurrency limits must be >= 1, got {limit} and {write_limit}")
        self.limits = {"read": limit, "write": write_limit}
        self._running = {"read": 0, "write": 0}
        self._lock = threading.Lock()

    def _try_enter(self, kind: str) -> bool:
        with self._lock:
            if self._running[kind] >= self.limits[kind]:
                return False
            self._running[kind] += 1
            return True

    def _leave(self, kind: str) -> None:
        with self._lock:
            self._running[kind] -= 1

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):
            return handler
        kind = "write" if method_name(handler_call_details.method) in WRITE_METHODS else "read"

        def wrap(behavior: Behavior) -> Behavior:
            def limited(request, context):
                if not self._try_enter(kind):
                    abort_with(context, ResourceExhausted(
                        f"the server is at its limit of {self.limits[kind]} concurrent {kind} requests; "
                        "retry with backoff"))
                try:
                    return behavior(request, context)
                finally:
                    self._leave(kind)
            return limited

        return _wrap_handler(handler, wrap)


class Undecodable:
    """Stands for request bytes that did not parse (returned by `tolerant_deserializer`)."""

    def __init__(self, method: str, error: Exception):
        self.error = InvalidArgument(f"the {method} request is not a valid protobuf message of its type "
                                     f"({type(error).__name__}); check the client's proto and encoding")


def tolerant_deserializer(deserialize: Callable[[bytes], object], method: str) -> Callable[[bytes], object]:
    """`deserialize`, returning an `Undecodable` instead of raising (gRPC would answer INTERNAL)."""
    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as error:  # noqa: BLE001 - protobuf's DecodeError, bad UTF-8, ...
            return Undecodable(method, error)
    return parse


class StreamBroken(ServiceError):
    """The client's request stream ended abnormally: cancelled, past its deadline, or a
    message over the size limit (gRPC has already answered the client)."""

    code = grpc.StatusCode.CANCELLED


def _checked(request, context: grpc.ServicerContext, streaming: bool):
    """The request, or for a stream an iterator over it; an `Undecodable` raises its error."""
    if not streaming:
        if isinstance(request, Undecodable):
            raise request.error
        return request
    return _checked_stream(request, context)


def _checked_stream(messages, context: grpc.ServicerContext):
    """The stream's messages; a broken stream raises `StreamBroken` (instead of gRPC's bare
    RpcError, or of a normal end), so that the handler commits nothing more and the call is
    counted as CANCELLED rather than logged as an internal error."""
    broken = StreamBroken("the request stream broke off (client cancelled, deadline passed, or a message "
                          "over the size limit); its last images were not committed")
    try:
        for message in messages:
            yield _checked(message, context, False)
    except grpc.RpcError:
        raise broken from None
    # gRPC ends the iteration normally when it refused a message over the size limit, and
    # cancels the call a moment later (measured: < 0.2 ms): wait that long for the verdict.
    terminated = threading.Event()
    if not context.add_callback(terminated.set) or terminated.wait(STREAM_END_GRACE_S) or not context.is_active():
        raise broken


class ErrorInterceptor(grpc.ServerInterceptor):
    """ServiceError -> its status; undecodable request bytes -> INVALID_ARGUMENT; anything
    unexpected -> INTERNAL (logged)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None or not full.startswith(SERVICE_PREFIX):
            return handler
        streaming = handler.request_streaming

        def wrap(behavior: Behavior) -> Behavior:
            def mapped(request, context):
                try:
                    return behavior(_checked(request, context, streaming), context)
                except ServiceError as error:
                    abort_with(context, error)
                except Exception as error:  # noqa: BLE001 - the server must survive anything
                    if context.code() is not None:  # already aborted by the handler
                        raise
                    log.exception("unexpected error in %s", full)
                    context.abort(grpc.StatusCode.INTERNAL,
                                  f"internal error in {method_name(full)}: {type(error).__name__}")
            return mapped

        return _wrap_handler(handler, wrap, tolerant_deserializer(handler.request_deserializer, method_name(full)))


def build_interceptors(metrics: ServiceMetrics, max_concurrent: int, token: str | None = None,
                       max_concurrent_writes: int | None = None) -> list[grpc.ServerInterceptor]:
    """Outermost first: metrics, auth (when a token is set), limits, error mapping."""
    chain: list[grpc.ServerInterceptor] = [MetricsInterceptor(metrics)]
    if token:
        chain.append(AuthInterceptor(token))
    chain += [ConcurrencyLimitInterceptor(max_concurrent, max_concurrent_writes), ErrorInterceptor()]
    return chain
