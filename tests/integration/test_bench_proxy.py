"""The benchmark's bare grpc.aio proxy, the reference for the router hop (bench/router.py), against
real grpc.aio servers on loopback: it must forward bytes, statuses and the caller's deadline, or
the hop it measures is not the hop a proxy makes."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from bench.router import ECHO_METHOD, build_server
from tests.fixtures.waiting import free_port


def test_bare_proxy_forwards_bytes_statuses_and_deadlines() -> None:
    seen_remaining: list[float | None] = []

    async def slow(request: bytes, context: Any) -> bytes:
        seen_remaining.append(context.time_remaining())
        await asyncio.sleep(5)
        return request

    async def main() -> None:
        echo_port, proxy_port = free_port(), free_port()
        echo, _ = build_server("echo", echo_port)
        echo.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "bench.Slow", {"Slow": grpc.unary_unary_rpc_method_handler(slow)}
                ),
            )
        )
        proxy, channel = build_server("proxy", proxy_port, f"127.0.0.1:{echo_port}")
        await echo.start()
        await proxy.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy_port}") as client:
                payload = bytes(range(256)) * 40
                assert await client.unary_unary(ECHO_METHOD)(payload, timeout=10) == payload

                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await client.unary_unary("/bench.Echo/Missing")(b"x", timeout=10)
                assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED

                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await client.unary_unary("/bench.Slow/Slow")(b"x", timeout=0.5)
                assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                # The upstream got the caller's deadline (0.5 s, give or take gRPC's rounding of
                # it), not none: without it the upstream would work on for 5 s unasked.
                (remaining,) = seen_remaining
                assert remaining is not None
                assert remaining < 1.0
        finally:
            await proxy.stop(None)
            await echo.stop(None)
            assert channel is not None
            await channel.close()

    asyncio.run(main())


def test_bare_proxy_needs_an_upstream() -> None:
    async def main() -> None:
        build_server("proxy", free_port())

    with pytest.raises(SystemExit, match="--upstream"):
        asyncio.run(main())
