"""The error table, and the interceptor's translation against a fake context (no network)."""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from loopline.errors import (
    KIND_BY_STATUS,
    STATUS_BY_KIND,
    ErrorInterceptor,
    ErrorKind,
    InvalidInput,
    LooplineError,
    NotFound,
    Overloaded,
)
from loopline.metrics import RequestMetrics

METHOD = "/loopline.test.Echo/Call"


class AbortedError(Exception):
    """What the fake context raises from `abort`, as grpc.aio raises AbortError."""


class FakeContext:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: tuple[tuple[str, str], ...] = ()

    async def abort(
        self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.code, self.details, self.trailing = code, details, trailing
        raise AbortedError


class CallDetails:
    method = METHOD


def intercept(behavior: Any, *, stream: bool = False) -> tuple[Any, RequestMetrics]:
    """Run `behavior` through the interceptor; return the wrapped behavior and its metrics."""
    metrics = RequestMetrics(CollectorRegistry())
    interceptor = ErrorInterceptor("test", metrics)
    factory = (
        grpc.unary_stream_rpc_method_handler if stream else grpc.unary_unary_rpc_method_handler
    )
    handler = factory(behavior)

    async def continuation(_details: Any) -> Any:
        return handler

    wrapped = asyncio.run(interceptor.intercept_service(continuation, CallDetails()))
    return (wrapped.unary_stream if stream else wrapped.unary_unary), metrics


def call(behavior: Any) -> tuple[FakeContext, RequestMetrics]:
    wrapped, metrics = intercept(behavior)
    context = FakeContext()
    with pytest.raises(AbortedError):
        asyncio.run(wrapped(b"", context))
    return context, metrics


def failures(metrics: RequestMetrics, kind: str) -> float | None:
    labels = {"service": "test", "method": METHOD, "kind": kind}
    return metrics.registry.get_sample_value("loopline_request_failures_total", labels)


def test_every_kind_has_one_distinct_status() -> None:
    assert set(STATUS_BY_KIND) == set(ErrorKind)
    assert len(set(STATUS_BY_KIND.values())) == len(ErrorKind)
    assert all(KIND_BY_STATUS[code] is kind for kind, code in STATUS_BY_KIND.items())


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        (ErrorKind.INVALID_INPUT, grpc.StatusCode.INVALID_ARGUMENT),
        (ErrorKind.NOT_FOUND, grpc.StatusCode.NOT_FOUND),
        (ErrorKind.OVERLOADED, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ErrorKind.DEADLINE, grpc.StatusCode.DEADLINE_EXCEEDED),
        (ErrorKind.NOT_READY, grpc.StatusCode.UNAVAILABLE),
        (ErrorKind.INTERNAL, grpc.StatusCode.INTERNAL),
    ],
)
def test_table_follows_the_style_guide(kind: ErrorKind, code: grpc.StatusCode) -> None:
    assert STATUS_BY_KIND[kind] is code


def test_exceptions_carry_data_and_survive_pickling() -> None:
    err = Overloaded(num_queued=64, max_queued=64)
    assert err.kind is ErrorKind.OVERLOADED
    assert err.details == {"num_queued": 64, "max_queued": 64}
    assert "retry" in err.message
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is Overloaded
    assert (copy.kind, copy.message, copy.details) == (err.kind, err.message, err.details)
    assert NotFound("model", "sentiment", "list models with `loopline models list`").details == {
        "resource": "model",
        "name": "sentiment",
    }


@pytest.mark.parametrize(
    "error",
    [
        InvalidInput("text must not be empty", field="text"),
        NotFound("model", "nope"),
        Overloaded(3, 3),
        LooplineError("plain", kind=ErrorKind.PERMISSION_DENIED),
    ],
)
def test_looplineerror_becomes_its_status_with_message(error: LooplineError) -> None:
    async def behavior(_request: bytes, _context: Any) -> bytes:
        raise error

    context, metrics = call(behavior)
    assert context.code is STATUS_BY_KIND[error.kind]
    assert context.details == error.message
    assert dict(context.trailing)["loopline-error-kind"] == error.kind.value
    assert failures(metrics, error.kind.value) == 1


def test_unknown_exception_is_internal_without_leaking(caplog: pytest.LogCaptureFixture) -> None:
    async def behavior(_request: bytes, _context: Any) -> bytes:
        raise RuntimeError("password=hunter2")

    with caplog.at_level(logging.ERROR, logger="loopline.errors"):
        context, metrics = call(behavior)
    assert context.code is grpc.StatusCode.INTERNAL
    assert "hunter2" not in context.details
    error_id = context.details.split("(id ")[1].split(")")[0]
    record = caplog.records[-1]
    assert record.error_id == error_id  # type: ignore[attr-defined]
    assert "hunter2" in caplog.text  # the traceback stays in the server's log
    assert failures(metrics, "internal") == 1


def test_success_records_duration_only() -> None:
    async def behavior(request: bytes, _context: Any) -> bytes:
        return request

    wrapped, metrics = intercept(behavior)
    assert asyncio.run(wrapped(b"hi", FakeContext())) == b"hi"
    labels = {"service": "test", "method": METHOD}
    count = metrics.registry.get_sample_value("loopline_request_duration_seconds_count", labels)
    assert count == 1
    assert failures(metrics, "internal") is None


def test_streaming_handler_error_mid_stream() -> None:
    async def behavior(_request: bytes, _context: Any) -> AsyncIterator[bytes]:
        yield b"one"
        raise Overloaded(1, 1)

    wrapped, metrics = intercept(behavior, stream=True)
    context = FakeContext()
    received: list[bytes] = []

    async def consume() -> None:
        async for item in wrapped(b"", context):
            received.append(item)

    with pytest.raises(AbortedError):
        asyncio.run(consume())
    assert received == [b"one"]
    assert context.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failures(metrics, "overloaded") == 1


class WatchingContext(FakeContext):
    """Notes the failures counted so far when the status is sent (grpc.aio's abort sends it)."""

    def __init__(self, metrics: RequestMetrics) -> None:
        super().__init__()
        self.metrics = metrics
        self.counted_at_abort: list[float | None] = []

    async def abort(
        self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.counted_at_abort.append(failures(self.metrics, "overloaded"))
        await super().abort(code, details, trailing)


@pytest.mark.parametrize("stream", [False, True])
def test_a_failure_is_counted_before_its_status_goes_out(stream: bool) -> None:
    """A caller that has its error may scrape the metrics at once (tests do): counting after the
    abort left that to a race with the handler's coroutine."""

    async def unary(_request: bytes, _context: Any) -> bytes:
        raise Overloaded(1, 1)

    async def streaming(_request: bytes, _context: Any) -> AsyncIterator[bytes]:
        yield b"one"
        raise Overloaded(1, 1)

    wrapped, metrics = intercept(streaming if stream else unary, stream=stream)
    context = WatchingContext(metrics)

    async def run() -> None:
        if stream:
            async for _ in wrapped(b"", context):
                pass
        else:
            await wrapped(b"", context)

    with pytest.raises(AbortedError):
        asyncio.run(run())
    assert context.counted_at_abort == [1]
    assert failures(metrics, "overloaded") == 1  # and only once
