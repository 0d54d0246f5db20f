"""Bearer-token authorization against a real grpc.aio server on loopback: the status codes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from loopline.auth import TokenAuth, bearer_metadata
from loopline.errors import KIND_METADATA_KEY, PermissionDenied, Unauthenticated
from loopline.grpc_server import running
from loopline.metrics import RequestMetrics
from loopline.settings import ServiceSettings, load_settings

SERVICE = "loopline.test.Guarded"
ADMIN, CLASSIFY = "admin-secret", "classify-secret"
ADMIN_METHODS = (f"/{SERVICE}/Admin", f"/{SERVICE}/Watch")
PROTECTED_METHODS = (f"/{SERVICE}/Classify", f"/{SERVICE}/Chat")

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


class Guarded:
    """Raw-bytes methods of every shape; `calls` counts the handlers that really ran."""

    def __init__(self) -> None:
        self.calls = 0

    async def unary(self, request: bytes, _context: Any) -> bytes:
        self.calls += 1
        return request

    async def server_stream(self, request: bytes, _context: Any) -> AsyncIterator[bytes]:
        self.calls += 1
        for _ in range(3):
            yield request

    async def bidi(self, requests: AsyncIterator[bytes], _context: Any) -> AsyncIterator[bytes]:
        self.calls += 1
        async for request in requests:
            yield request

    def register(self, server: grpc.aio.Server) -> list[str]:
        handlers = {
            "Admin": grpc.unary_unary_rpc_method_handler(self.unary),
            "Watch": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "Classify": grpc.unary_unary_rpc_method_handler(self.unary),
            "Chat": grpc.stream_stream_rpc_method_handler(self.bidi),
            "Open": grpc.unary_unary_rpc_method_handler(self.unary),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        return [SERVICE]


Body = Callable[[grpc.aio.Channel, Guarded, RequestMetrics], Awaitable[None]]


def run_guarded(body: Body, auth: TokenAuth) -> None:
    """Run `body` against a fresh server with `auth` and a channel to it, in a fresh loop."""

    async def main() -> None:
        guarded = Guarded()
        metrics = RequestMetrics(CollectorRegistry())
        settings = load_settings(ServiceSettings, host="127.0.0.1", port=0)
        async with (
            running(settings, guarded.register, metrics=metrics, interceptors=[auth]) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            await body(channel, guarded, metrics)

    asyncio.run(main())


def both_tokens() -> TokenAuth:
    return TokenAuth(
        ADMIN, CLASSIFY, admin_methods=ADMIN_METHODS, protected_methods=PROTECTED_METHODS
    )


def bearer(token: str) -> tuple[tuple[str, str]]:
    return bearer_metadata(token)


async def unary_code(channel: grpc.aio.Channel, method: str, metadata: Any = None) -> Any:
    """The status code of one unary call (OK when it succeeds)."""
    try:
        await channel.unary_unary(f"/{SERVICE}/{method}")(b"x", metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


MALFORMED = [
    (("authorization", "Basic YWRtaW46c2VjcmV0"),),
    (("authorization", "Bearer"),),
    (("authorization", "Bearer    "),),
    (("authorization", ADMIN),),  # the token without its scheme
]


def test_admin_method_without_header_is_unauthenticated() -> None:
    async def body(channel: grpc.aio.Channel, guarded: Guarded, metrics: RequestMetrics) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(f"/{SERVICE}/Admin")(b"x", timeout=5)
        assert caught.value.code() is UNAUTHENTICATED
        assert "Bearer <token>" in str(caught.value.details())
        # Translated by the error interceptor like any error: kind in the trailers, counted.
        assert dict(caught.value.trailing_metadata() or ())[KIND_METADATA_KEY] == "unauthenticated"
        labels = {"service": "test", "method": f"/{SERVICE}/Admin", "kind": "unauthenticated"}
        failures = metrics.registry.get_sample_value("loopline_request_failures_total", labels)
        assert failures == 1.0
        assert guarded.calls == 0

    run_guarded(body, both_tokens())


@pytest.mark.parametrize("metadata", MALFORMED)
def test_malformed_header_is_unauthenticated(metadata: Any) -> None:
    async def body(channel: grpc.aio.Channel, guarded: Guarded, _metrics: RequestMetrics) -> None:
        assert await unary_code(channel, "Admin", metadata) is UNAUTHENTICATED
        assert guarded.calls == 0

    run_guarded(body, both_tokens())


def test_wrong_token_is_permission_denied() -> None:
    async def body(channel: grpc.aio.Channel, guarded: Guarded, _metrics: RequestMetrics) -> None:
        assert await unary_code(channel, "Admin", bearer("guess")) is PERMISSION_DENIED
        # A valid classify token is still the wrong one for an admin method.
        assert await unary_code(channel, "Admin", bearer(CLASSIFY)) is PERMISSION_DENIED
        assert await unary_code(channel, "Classify", bearer("guess")) is PERMISSION_DENIED
        assert guarded.calls == 0

    run_guarded(body, both_tokens())


def test_right_token_passes() -> None:
    async def body(channel: grpc.aio.Channel, guarded: Guarded, _metrics: RequestMetrics) -> None:
        assert await unary_code(channel, "Admin", bearer(ADMIN)) is grpc.StatusCode.OK
        # The scheme is case-insensitive; a protected method takes either token.
        assert await unary_code(channel, "Admin", (("authorization", f"bearer {ADMIN}"),)) is (
            grpc.StatusCode.OK
        )
        assert await unary_code(channel, "Classify", bearer(CLASSIFY)) is grpc.StatusCode.OK
        assert await unary_code(channel, "Classify", bearer(ADMIN)) is grpc.StatusCode.OK
        assert await unary_code(channel, "Classify") is UNAUTHENTICATED
        assert guarded.calls == 4

    run_guarded(body, both_tokens())


def test_unprotected_methods_are_untouched() -> None:
    async def body(channel: grpc.aio.Channel, guarded: Guarded, _metrics: RequestMetrics) -> None:
        assert await unary_code(channel, "Open") is grpc.StatusCode.OK
        assert await unary_code(channel, "Open", bearer("anything")) is grpc.StatusCode.OK
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # An unknown method stays UNIMPLEMENTED, token or not.
        assert await unary_code(channel, "Missing") is grpc.StatusCode.UNIMPLEMENTED
        assert guarded.calls == 2

    run_guarded(body, both_tokens())


def test_streaming_methods_are_protected_too() -> None:
    async def body(channel: grpc.aio.Channel, guarded: Guarded, _metrics: RequestMetrics) -> None:
        watch = channel.unary_stream(f"/{SERVICE}/Watch")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [reply async for reply in watch(b"x", timeout=5)]
        assert caught.value.code() is UNAUTHENTICATED
        assert [r async for r in watch(b"x", metadata=bearer(ADMIN), timeout=5)] == [b"x"] * 3

        chat = channel.stream_stream(f"/{SERVICE}/Chat")
        # Refused before any request is written: an asyncio client that is still writing when
        # the status arrives may report INTERNAL instead (grpc/grpc#36066, a client-side bug).
        assert await chat(timeout=5).code() is UNAUTHENTICATED
        assert await chat(metadata=bearer(ADMIN + "x"), timeout=5).code() is PERMISSION_DENIED
        replies = [r async for r in chat(iter([b"a", b"b"]), metadata=bearer(CLASSIFY), timeout=5)]
        assert replies == [b"a", b"b"]
        assert guarded.calls == 2  # only the two authorized calls reached a handler

    run_guarded(body, both_tokens())


def test_no_admin_token_means_open_admin_methods_and_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="loopline.auth"):
        auth = TokenAuth("", admin_methods=ADMIN_METHODS, protected_methods=PROTECTED_METHODS)
    assert "LOOPLINE_ADMIN_TOKEN" in caplog.text
    assert auth.checked_methods == frozenset()

    async def body(channel: grpc.aio.Channel, _guarded: Guarded, _metrics: RequestMetrics) -> None:
        assert await unary_code(channel, "Admin") is grpc.StatusCode.OK
        assert await unary_code(channel, "Classify") is grpc.StatusCode.OK

    run_guarded(body, auth)


def test_without_a_classify_token_classification_is_open() -> None:
    auth = TokenAuth(ADMIN, admin_methods=ADMIN_METHODS, protected_methods=PROTECTED_METHODS)
    assert auth.checked_methods == frozenset(ADMIN_METHODS)

    async def body(channel: grpc.aio.Channel, _guarded: Guarded, _metrics: RequestMetrics) -> None:
        assert await unary_code(channel, "Classify") is grpc.StatusCode.OK
        assert await unary_code(channel, "Admin") is UNAUTHENTICATED

    run_guarded(body, auth)


def test_check_is_usable_without_a_server() -> None:
    auth = both_tokens()
    auth.check(f"/{SERVICE}/Admin", bearer(ADMIN))
    auth.check(f"/{SERVICE}/Open", None)
    twice = (*bearer(ADMIN), *bearer(ADMIN))
    with pytest.raises(Unauthenticated, match="more than one"):
        auth.check(f"/{SERVICE}/Admin", twice)
    with pytest.raises(PermissionDenied) as caught:
        auth.check(f"/{SERVICE}/Admin", bearer(CLASSIFY))
    assert CLASSIFY not in caught.value.message  # never echo a token


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"admin_methods": ["Router/CreateExperiment"]}, "not full method names"),
        ({"admin_methods": f"/{SERVICE}/Admin"}, "expected a list"),
        (
            {"admin_methods": ADMIN_METHODS, "protected_methods": ADMIN_METHODS[:1]},
            "both admin and protected",
        ),
        ({"classify_token": ADMIN}, "must differ"),
    ],
)
def test_misconfiguration_is_refused(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        TokenAuth(ADMIN, **kwargs)
