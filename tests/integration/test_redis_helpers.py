"""The Redis stream helpers against a private redis-server, including a Redis restart."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from loopline.errors import ErrorKind, NotReady
from loopline.redis import FieldValue, ack, connect, ensure_group, read_group, wait_ready, xadd_many

if TYPE_CHECKING:
    from tests.fixtures.redis import RedisServer

# Loads the fixtures even before tests/conftest.py lists this plugin; harmless once it does.
pytest_plugins = ["tests.fixtures.redis"]

STREAM = "records"
GROUP = "monitor"


def run_with_client(url: str, body: Callable[[aioredis.Redis], Awaitable[None]]) -> None:
    async def main() -> None:
        client = connect(url)
        try:
            await wait_ready(client, timeout=5)
            await body(client)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_wait_ready_names_the_problem_when_redis_is_absent(redis_server: RedisServer) -> None:
    url = f"redis://127.0.0.1:{redis_server.port + 1}/0"  # nothing listens there

    async def main() -> None:
        client = connect(url)
        try:
            with pytest.raises(NotReady, match="LOOPLINE_REDIS_URL") as caught:
                await wait_ready(client, timeout=0.3)
        finally:
            await client.aclose()
        assert caught.value.kind is ErrorKind.NOT_READY

    asyncio.run(main())


def test_xadd_many_returns_ids_in_order_and_caps_the_stream(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        records: list[dict[str, FieldValue]] = [
            {"text": f"review {i}", "score": 0.5 + i, "n": i, "raw": b"\x00\xff"} for i in range(5)
        ]
        ids = await xadd_many(client, STREAM, records, maxlen=3, approximate=False)
        assert len(ids) == 5
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
        assert await client.xlen(STREAM) == 3
        assert await xadd_many(client, STREAM, []) == []

    run_with_client(redis_url, body)


def test_ensure_group_is_idempotent_and_creates_the_stream(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        await ensure_group(client, STREAM, GROUP)
        await ensure_group(client, STREAM, GROUP)
        groups = await client.xinfo_groups(STREAM)
        assert [g["name"] for g in groups] == [GROUP.encode()]

    run_with_client(redis_url, body)


def test_read_group_redelivers_unacked_entries_first(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        await ensure_group(client, STREAM, GROUP)
        ids = await xadd_many(client, STREAM, [{"n": 1}, {"n": 2}])
        first = await read_group(client, STREAM, GROUP, "c1", count=10, block_ms=None)
        assert [entry_id for entry_id, _ in first] == ids
        assert first[0][1] == {"n": b"1"}
        # Not acknowledged: a restarted consumer of the same name gets them again, before new ones.
        await xadd_many(client, STREAM, [{"n": 3}])
        again = await read_group(client, STREAM, GROUP, "c1", count=10, block_ms=None)
        assert [entry_id for entry_id, _ in again] == ids
        assert await ack(client, STREAM, GROUP, ids) == 2
        rest = await read_group(client, STREAM, GROUP, "c1", count=10, block_ms=None)
        assert [fields for _, fields in rest] == [{"n": b"3"}]

    run_with_client(redis_url, body)


def test_read_group_blocks_then_returns_nothing(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        await ensure_group(client, STREAM, GROUP)
        assert await read_group(client, STREAM, GROUP, "c1", count=10, block_ms=50) == []

    run_with_client(redis_url, body)


def test_pending_entries_trimmed_away_are_acked_and_skipped(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        await ensure_group(client, STREAM, GROUP)
        ids = await xadd_many(client, STREAM, [{"n": 1}, {"n": 2}])
        await read_group(client, STREAM, GROUP, "c1", count=10, block_ms=None)
        await client.xdel(STREAM, *ids)
        assert await read_group(client, STREAM, GROUP, "c1", count=10, block_ms=None) == []
        assert (await client.xpending(STREAM, GROUP))["pending"] == 0

    run_with_client(redis_url, body)


def test_helpers_recover_after_redis_restarts(redis_server: RedisServer, redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        await ensure_group(client, STREAM, GROUP)
        await xadd_many(client, STREAM, [{"n": 1}])
        redis_server.stop()
        with pytest.raises((RedisConnectionError, OSError)):
            await xadd_many(client, STREAM, [{"n": 2}])
        redis_server.start()
        await wait_ready(client, timeout=5)
        # No persistence: the stream and its group are gone; read_group recreates the group.
        assert await read_group(client, STREAM, GROUP, "c1", count=10, block_ms=None) == []
        ids = await xadd_many(client, STREAM, [{"n": 3}])
        fresh = await read_group(client, STREAM, GROUP, "c1", count=10, block_ms=None)
        assert fresh == [(ids[0], {"n": b"3"})]

    run_with_client(redis_url, body)
