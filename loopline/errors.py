"""Error kinds, the one table that maps them to gRPC status codes, and the interceptor that uses it.

Domain code raises a `LooplineError` (or a subclass) and never touches grpc: the exception carries
the kind, a message that tells a person what to do, and structured details. `ErrorInterceptor`
sits in every server and turns those into gRPC statuses at the edge; any other exception is logged
with its traceback and answered with a generic INTERNAL that carries only a short error id.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from types import MappingProxyType
from typing import Any, NoReturn

import grpc

from loopline.logging import get_logger
from loopline.metrics import RequestMetrics, request_metrics

__all__ = [
    "KIND_BY_STATUS",
    "STATUS_BY_KIND",
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "ErrorInterceptor",
    "ErrorKind",
    "FailedPrecondition",
    "InternalError",
    "InvalidInput",
    "LooplineError",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PermissionDenied",
    "Unauthenticated",
]

log = get_logger(__name__)

# Trailing metadata keys that let a Loopline client rebuild the error (the router forwards them).
KIND_METADATA_KEY = "loopline-error-kind"
DETAILS_METADATA_KEY = "loopline-error-details"


class ErrorKind(enum.StrEnum):
    """What went wrong, independent of transport; the value doubles as the metrics label."""

    INVALID_INPUT = "invalid_input"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    OVERLOADED = "overloaded"
    DEADLINE = "deadline"
    NOT_READY = "not_ready"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


STATUS_BY_KIND: Mapping[ErrorKind, grpc.StatusCode] = MappingProxyType(
    {
        ErrorKind.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
        ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
        ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
        ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
        ErrorKind.NOT_READY: grpc.StatusCode.UNAVAILABLE,
        ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
        ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
        ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
        ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    }
)

# The table is one-to-one, so a client (or a handler that aborts by itself) can map back.
KIND_BY_STATUS: Mapping[grpc.StatusCode, ErrorKind] = MappingProxyType(
    {code: kind for kind, code in STATUS_BY_KIND.items()}
)


class LooplineError(Exception):
    """An error a caller can act on: a kind, a message saying what to do, and structured details."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind
        self.details: dict[str, Any] = dict(details or {})

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take data, not a message, so the default (cls, args) pickling would break.
        return (_rebuild, (type(self), self.message, self.kind, self.details))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, kind={self.kind.value}, {self.details!r})"


def _rebuild(
    cls: type[LooplineError], message: str, kind: ErrorKind, details: dict[str, Any]
) -> LooplineError:
    err = cls.__new__(cls)
    LooplineError.__init__(err, message, kind=kind, details=details)
    return err


# The subclasses are named for the condition, like gRPC's codes (`raise NotFound(...)` reads as
# the answer the caller gets), hence no `Error` suffix.
class InvalidInput(LooplineError):  # noqa: N818
    """The request itself is wrong; the message says which field and how to fix it."""

    kind = ErrorKind.INVALID_INPUT

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, details=details)


class NotFound(LooplineError):  # noqa: N818
    """A named thing (model, experiment, job) does not exist."""

    kind = ErrorKind.NOT_FOUND

    def __init__(self, resource: str, name: str, hint: str = "") -> None:
        message = f"{resource} {name!r} not found" + (f"; {hint}" if hint else "")
        super().__init__(message, details={"resource": resource, "name": name})
        self.resource = resource
        self.name = name


class AlreadyExists(LooplineError):  # noqa: N818
    """A named thing the request would create is already there."""

    kind = ErrorKind.ALREADY_EXISTS

    def __init__(self, resource: str, name: str, hint: str = "") -> None:
        message = f"{resource} {name!r} already exists" + (f"; {hint}" if hint else "")
        super().__init__(message, details={"resource": resource, "name": name})
        self.resource = resource
        self.name = name


class FailedPrecondition(LooplineError):  # noqa: N818
    """The system is not in a state that allows the request (stop a stopped experiment, ...)."""

    kind = ErrorKind.FAILED_PRECONDITION

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, details=details)


class Overloaded(LooplineError):  # noqa: N818
    """Admission refused: the queue is full. Clients should back off and retry."""

    kind = ErrorKind.OVERLOADED

    def __init__(self, num_queued: int, max_queued: int) -> None:
        message = (
            f"server overloaded: {num_queued} requests queued, limit {max_queued}; "
            "retry with backoff or add workers"
        )
        super().__init__(message, details={"num_queued": num_queued, "max_queued": max_queued})
        self.num_queued = num_queued
        self.max_queued = max_queued


class DeadlineExceeded(LooplineError):  # noqa: N818
    """The caller's deadline passed (or would pass) before the work could finish."""

    kind = ErrorKind.DEADLINE

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, details=details)


class NotReady(LooplineError):  # noqa: N818
    """A dependency or the service itself is not ready yet (model loading, Redis down)."""

    kind = ErrorKind.NOT_READY

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, details=details)


class Unauthenticated(LooplineError):  # noqa: N818
    """The request carries no valid credentials."""

    kind = ErrorKind.UNAUTHENTICATED

    def __init__(
        self, message: str = "missing or invalid admin token; send 'authorization: Bearer <token>'"
    ) -> None:
        super().__init__(message)


class PermissionDenied(LooplineError):  # noqa: N818
    """The credentials are valid but do not allow this request."""

    kind = ErrorKind.PERMISSION_DENIED

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, details=details)


class Cancelled(LooplineError):  # noqa: N818
    """The work was cancelled (by the caller, or by a shutdown)."""

    kind = ErrorKind.CANCELLED

    def __init__(self, message: str = "cancelled", **details: Any) -> None:
        super().__init__(message, details=details)


class InternalError(LooplineError):
    """A failure inside Loopline (an engine crash); the message is safe to show the caller."""

    kind = ErrorKind.INTERNAL

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, details=details)


def _error_metadata(err: LooplineError) -> tuple[tuple[str, str], ...]:
    details = json.dumps(err.details, default=str, separators=(",", ":"))
    return ((KIND_METADATA_KEY, err.kind.value), (DETAILS_METADATA_KEY, details))


Behavior = Callable[..., Any]


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Translates exceptions into gRPC statuses and records request duration and failures.

    Wraps every handler shape (unary/stream in, unary/stream out). Handlers must be async
    (coroutines or async generators); a sync handler is passed through untouched.
    """

    def __init__(self, service: str, metrics: RequestMetrics | None = None) -> None:
        self._service = service
        self._metrics = metrics if metrics is not None else request_metrics()
        # grpc.aio calls intercept_service for every RPC: wrap each method's handler once.
        self._wrapped: dict[str, tuple[Any, Any]] = {}  # method -> (handler, wrapped handler)

    async def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED, no metrics label minted
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        field = _behavior_field(handler)
        wrapped = self._wrap(getattr(handler, field), method, handler.request_streaming)
        if wrapped is None:
            result = handler
        elif handler.request_deserializer is None:
            result = handler._replace(**{field: wrapped})
        else:
            # Only a wrapped behavior knows to refuse what the tolerant deserializer returns.
            tolerant = _tolerant(handler.request_deserializer, method)
            result = handler._replace(**{field: wrapped, "request_deserializer": tolerant})
        self._wrapped[method] = (handler, result)
        return result

    def _wrap(self, behavior: Behavior, method: str, streaming: bool) -> Behavior | None:
        if inspect.isasyncgenfunction(behavior):
            return self._wrap_stream(behavior, method, streaming)
        if inspect.iscoroutinefunction(behavior):
            return self._wrap_unary(behavior, method, streaming)
        return None

    def _wrap_unary(self, behavior: Behavior, method: str, streaming: bool) -> Behavior:
        # Inline rather than an async context manager: this runs on every call.
        observe = self._metrics.observer(self._service, method)

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                response = await behavior(_decoded(request, streaming), context)
            except BaseException as err:
                # Counted before the status goes out (`context.abort` sends it), so that a
                # scrape made once the caller has its error already counts it.
                observe(time.perf_counter() - started, _failure_kind(err, context))
                await _end_call(err, method, context)
            observe(time.perf_counter() - started, None)
            return response

        return wrapped

    def _wrap_stream(self, behavior: Behavior, method: str, streaming: bool) -> Behavior:
        observe = self._metrics.observer(self._service, method)

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                async for response in behavior(_decoded(request, streaming), context):
                    yield response
            except BaseException as err:
                observe(time.perf_counter() - started, _failure_kind(err, context))  # as above
                await _end_call(err, method, context)
            observe(time.perf_counter() - started, None)

        return wrapped


class _Undecodable:
    """What the tolerant deserializer returns for bytes that do not parse: grpc.aio would answer
    UNKNOWN naming the exception's class, the wrapped handler answers INVALID_ARGUMENT."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidInput) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    message = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    expected = message.full_name if message is not None else "its request message"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _Undecodable(
                InvalidInput(
                    f"the request to {method} does not parse as {expected}: a string field "
                    "holds invalid UTF-8, or the client serialized another message type; check "
                    "the client's protobuf encoding",
                    method=method,
                    bytes=len(data),
                )
            )

    return deserialize


def _decoded(request: Any, streaming: bool) -> Any:
    """The request, or for a request stream an iterator over it, that raises InvalidInput at the
    first message the deserializer could not parse."""
    if streaming:
        return _decoded_stream(request)
    if type(request) is _Undecodable:
        raise request.error
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if type(request) is _Undecodable:
            raise request.error
        yield request


def _failure_kind(err: BaseException, context: grpc.aio.ServicerContext) -> ErrorKind | None:
    """What the metrics count for a call that raised `err`; None for the generator and process
    exits that are not a failure of the call."""
    if isinstance(err, asyncio.CancelledError):
        return ErrorKind.CANCELLED  # the caller went away or its deadline passed
    if isinstance(err, grpc.aio.AbortError):
        return KIND_BY_STATUS.get(context.code(), ErrorKind.INTERNAL)  # the handler's own abort
    if isinstance(err, LooplineError):
        return err.kind
    return ErrorKind.INTERNAL if isinstance(err, Exception) else None


async def _end_call(err: BaseException, method: str, context: grpc.aio.ServicerContext) -> NoReturn:
    """End the call as `err` requires: a handler's error becomes its status (`context.abort`
    raises AbortError); an abort, a cancellation or an exit goes on as it is."""
    if isinstance(err, LooplineError):
        await context.abort(STATUS_BY_KIND[err.kind], err.message, _error_metadata(err))
    if isinstance(err, Exception) and not isinstance(err, grpc.aio.AbortError):
        await context.abort(grpc.StatusCode.INTERNAL, _log_unexpected(method))
    raise err


def _behavior_field(handler: grpc.RpcMethodHandler) -> str:
    requests = "stream" if handler.request_streaming else "unary"
    responses = "stream" if handler.response_streaming else "unary"
    return f"{requests}_{responses}"


def _log_unexpected(method: str) -> str:
    """Log the exception being handled under a fresh id; return the message safe for the caller."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("unhandled error in %s", method, extra={"error_id": error_id, "method": method})
    # Never echo str(err): it may hold paths, inputs or secrets. The id finds the traceback.
    return f"internal error (id {error_id}); the server log has the details"
