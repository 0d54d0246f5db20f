"""The server bootstrap against real grpc.aio servers on loopback, with a generic bytes servicer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from loopline.errors import NotFound, Overloaded
from loopline.grpc_server import GrpcServer, running, serve
from loopline.metrics import RequestMetrics
from loopline.settings import ServiceSettings, load_settings
from tests.fixtures.waiting import free_port

SERVICE = "loopline.test.Echo"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Echo:
    """A servicer without generated code: methods take and return raw bytes."""

    def __init__(self) -> None:
        self.slow_started = asyncio.Event()
        self.slow_finished = False

    async def echo(self, request: bytes, _context: Any) -> bytes:
        return request

    async def fail(self, request: bytes, _context: Any) -> bytes:
        raise NotFound("model", request.decode(), "list models with `loopline models list`")

    async def crash(self, _request: bytes, _context: Any) -> bytes:
        raise RuntimeError("secret detail")

    async def slow(self, _request: bytes, _context: Any) -> bytes:
        self.slow_started.set()
        await asyncio.sleep(0.5)
        self.slow_finished = True
        return b"done"

    async def count(self, _request: bytes, _context: Any) -> AsyncIterator[bytes]:
        yield b"1"
        raise Overloaded(num_queued=8, max_queued=8)

    async def parse(self, request: health_pb2.HealthCheckRequest, _context: Any) -> bytes:
        return request.service.encode()

    async def parse_each(
        self, requests: AsyncIterator[health_pb2.HealthCheckRequest], _context: Any
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request.service.encode()

    def register(self, server: grpc.aio.Server) -> list[str]:
        unary = grpc.unary_unary_rpc_method_handler
        parsed = health_pb2.HealthCheckRequest.FromString  # a protobuf request, bytes answers
        handlers = {
            "Echo": unary(self.echo),
            "Fail": unary(self.fail),
            "Crash": unary(self.crash),
            "Slow": unary(self.slow),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "Parse": unary(self.parse, request_deserializer=parsed),
            "ParseEach": grpc.stream_stream_rpc_method_handler(
                self.parse_each, request_deserializer=parsed
            ),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        return [SERVICE]


def settings(**overrides: Any) -> ServiceSettings:
    return load_settings(ServiceSettings, **{"host": "127.0.0.1", "port": 0, **overrides})


Body = Callable[[GrpcServer, grpc.aio.Channel, Echo], Awaitable[None]]


def run_server(body: Body, **overrides: Any) -> None:
    """Run `body` against a fresh server and a channel to it, in a fresh event loop."""

    async def main() -> None:
        echo = Echo()
        metrics = RequestMetrics(CollectorRegistry())
        async with (
            running(settings(**overrides), echo.register, metrics=metrics) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            await body(server, channel, echo)

    asyncio.run(main())


def unary(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{method}")


def test_health_reports_serving_for_server_and_services() -> None:
    async def body(_server: GrpcServer, channel: grpc.aio.Channel, _echo: Echo) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND

    run_server(body)


def test_reflection_lists_services() -> None:
    async def body(_server: GrpcServer, channel: grpc.aio.Channel, _echo: Echo) -> None:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [reply async for reply in stub.ServerReflectionInfo(iter([request]))]
        names = {s.name for s in replies[0].list_services_response.service}
        assert names == {
            SERVICE,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }

    run_server(body)


def test_errors_become_status_codes() -> None:
    async def body(server: GrpcServer, channel: grpc.aio.Channel, _echo: Echo) -> None:
        assert await unary(channel, "Echo")(b"hi") == b"hi"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(channel, "Fail")(b"sentiment")
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == (
            "model 'sentiment' not found; list models with `loopline models list`"
        )
        trailing = dict(caught.value.trailing_metadata() or ())
        assert trailing["loopline-error-kind"] == "not_found"
        assert json.loads(trailing["loopline-error-details"])["name"] == "sentiment"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(channel, "Crash")(b"")
        assert caught.value.code() is grpc.StatusCode.INTERNAL
        assert "secret" not in (caught.value.details() or "")
        # A second failure of the same method goes through the handler wrapped on the first.
        with pytest.raises(grpc.aio.AioRpcError):
            await unary(channel, "Fail")(b"sentiment")
        assert await unary(channel, "Echo")(b"again") == b"again"

        registry = server._metrics.registry

        def sample(name: str, method: str, **labels: str) -> float | None:
            value = registry.get_sample_value(
                name, {"service": "test", "method": f"/{SERVICE}/{method}", **labels}
            )
            return None if value is None else float(value)

        assert sample("loopline_request_duration_seconds_count", "Echo") == 2
        assert sample("loopline_request_failures_total", "Echo", kind="not_found") is None
        assert sample("loopline_request_duration_seconds_count", "Fail") == 2
        assert sample("loopline_request_failures_total", "Fail", kind="not_found") == 2
        assert sample("loopline_request_failures_total", "Crash", kind="internal") == 1

    run_server(body)


NOT_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (service, a string) holding invalid UTF-8


def test_requests_that_do_not_parse_are_invalid_argument_naming_the_message() -> None:
    async def body(server: GrpcServer, channel: grpc.aio.Channel, _echo: Echo) -> None:
        good = health_pb2.HealthCheckRequest(service="sentiment").SerializeToString()
        assert await unary(channel, "Parse")(good) == b"sentiment"
        for bad in (NOT_UTF8, b"\xff\xff\xff"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary(channel, "Parse")(bad)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            details = caught.value.details() or ""
            assert "grpc.health.v1.HealthCheckRequest" in details
            assert "UTF-8" in details
            trailing = dict(caught.value.trailing_metadata() or ())
            assert trailing["loopline-error-kind"] == "invalid_input"
        failures = server._metrics.registry.get_sample_value(
            "loopline_request_failures_total",
            {"service": "test", "method": f"/{SERVICE}/Parse", "kind": "invalid_input"},
        )
        assert failures == 2

        # In a request stream, what came before the bad message is answered, then the call ends.
        call = channel.stream_stream(f"/{SERVICE}/ParseEach")()
        await call.write(good)
        assert await call.read() == b"sentiment"
        await call.write(NOT_UTF8)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert await unary(channel, "Parse")(good) == b"sentiment"

    run_server(body)


def test_stream_error_after_first_response() -> None:
    async def body(_server: GrpcServer, channel: grpc.aio.Channel, _echo: Echo) -> None:
        call = channel.unary_stream(f"/{SERVICE}/Count")(b"")
        assert await call.read() == b"1"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "8 requests queued" in (caught.value.details() or "")

    run_server(body)


def test_stop_drains_in_flight_call_and_flips_health() -> None:
    flushed_after_slow: list[bool] = []

    async def main() -> None:
        echo = Echo()

        async def flush() -> None:
            flushed_after_slow.append(echo.slow_finished)

        metrics = RequestMetrics(CollectorRegistry())
        async with (
            running(settings(), echo.register, on_shutdown=[flush], metrics=metrics) as srv,
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel,
        ):
            await drain(srv, channel, echo)

    async def drain(server: GrpcServer, channel: grpc.aio.Channel, echo: Echo) -> None:
        slow = asyncio.ensure_future(unary(channel, "Slow")(b""))
        await echo.slow_started.wait()
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        stopping = asyncio.ensure_future(server.stop(grace=5))
        assert (await watch.read()).status == NOT_SERVING
        watch.cancel()  # a well-behaved watcher lets go on NOT_SERVING, so the drain can end
        assert await slow == b"done"
        await asyncio.wait_for(stopping, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(channel, "Echo")(b"late", timeout=1)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())
    assert flushed_after_slow == [True]


def test_metrics_endpoint_shows_request_metrics() -> None:
    port = free_port()

    async def body(server: GrpcServer, channel: grpc.aio.Channel, _echo: Echo) -> None:
        assert server.metrics_port == port
        await unary(channel, "Echo")(b"hi")
        url = f"http://127.0.0.1:{port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        assert b'loopline_request_duration_seconds_count{method="/loopline.test.Echo/Echo"' in text

    run_server(body, metrics_port=port)


def test_busy_port_fails_loudly() -> None:
    async def body(server: GrpcServer, _channel: grpc.aio.Channel, echo: Echo) -> None:
        second = GrpcServer(settings(port=server.port), echo.register, name="second")
        with pytest.raises(RuntimeError, match="cannot listen"):
            await second.start()

    run_server(body)


def test_serve_sets_ready_and_returns_on_sigterm() -> None:
    async def main() -> None:
        ready = asyncio.Event()
        echo = Echo()
        serving = asyncio.ensure_future(serve(settings(), echo.register, name="t", ready=ready))
        await asyncio.wait_for(ready.wait(), timeout=10)
        # Safe: the handler is installed before `ready` is set, so pytest itself is not killed.
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, timeout=10)

    asyncio.run(main())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers removed again


TINY_SERVER = """
import asyncio

import grpc

from loopline.grpc_server import serve
from loopline.logging import configure_logging, get_logger
from loopline.settings import ServiceSettings, load_settings

log = get_logger("tiny")


async def slow(request, context):
    log.info("slow call started")
    await asyncio.sleep(0.5)
    return b"done"


def register(server):
    handler = grpc.method_handlers_generic_handler(
        "loopline.test.Echo", {"Slow": grpc.unary_unary_rpc_method_handler(slow)}
    )
    server.add_generic_rpc_handlers([handler])
    return ["loopline.test.Echo"]


async def flush():
    log.info("flushed")


settings = load_settings(ServiceSettings)
configure_logging(settings.log_level, settings.log_json)
asyncio.run(serve(settings, register, name="tiny", on_shutdown=[flush]))
"""


async def next_log(stream: asyncio.StreamReader, message: str) -> dict[str, Any]:
    """The next JSON log record whose message is `message` (other lines are skipped)."""
    while True:
        line = await asyncio.wait_for(stream.readline(), timeout=20)
        assert line, f"server exited before logging {message!r}"
        record = json.loads(line) if line.startswith(b"{") else {}
        if record.get("message") == message:
            return record


def test_sigterm_finishes_in_flight_call_and_exits_zero(tmp_path: Path) -> None:
    script = tmp_path / "tiny_server.py"
    script.write_text(TINY_SERVER)
    env = {
        **os.environ,
        "LOOPLINE_PORT": "0",
        "LOOPLINE_LOG_JSON": "true",
        "LOOPLINE_GRACE_PERIOD_SECONDS": "5",
        "LOOPLINE_METRICS_PORT": "0",
    }

    async def main() -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(script), env=env, stderr=asyncio.subprocess.PIPE
        )
        assert process.stderr is not None
        try:
            port = (await next_log(process.stderr, "serving"))["port"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                slow = asyncio.ensure_future(unary(channel, "Slow")(b"", timeout=10))
                await next_log(process.stderr, "slow call started")
                process.send_signal(signal.SIGTERM)
                assert await slow == b"done"
            await next_log(process.stderr, "flushed")
            assert await asyncio.wait_for(process.wait(), timeout=10) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    asyncio.run(main())


def test_a_hanging_shutdown_step_is_abandoned_and_the_next_still_runs() -> None:
    ran: list[str] = []

    async def hangs() -> None:
        ran.append("hangs")
        await asyncio.Event().wait()  # e.g. a close on a connection that never answers

    async def flush() -> None:
        ran.append("flush")

    async def main() -> None:
        server = GrpcServer(
            settings(), Echo().register, name="tiny", on_shutdown=[hangs, flush], step_timeout=0.2
        )
        await server.start()
        await asyncio.wait_for(server.stop(grace=0), timeout=10)

    asyncio.run(main())
    assert ran == ["hangs", "flush"]


@pytest.mark.parametrize("module", ["services.trainer", "services.monitor", "services.router"])
def test_a_service_that_cannot_start_says_why_in_one_line(module: str, tmp_path: Path) -> None:
    prefix = "LOOPLINE_" + module.rsplit(".", 1)[1].upper() + "_"
    base = {**os.environ, "LOOPLINE_REDIS_URL": "redis://127.0.0.1:1/0", "HOME": str(tmp_path)}

    def start(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", module],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    bad = start(**{prefix + "PORT": "http"})
    assert bad.returncode == 2
    assert f"{prefix}PORT" in bad.stderr
    assert "Traceback" not in bad.stderr

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = start(**{prefix + "PORT": str(holder.getsockname()[1])})
    assert busy.returncode == 1
    assert "failed to start" in busy.stdout + busy.stderr
    assert "Traceback" not in busy.stdout + busy.stderr
