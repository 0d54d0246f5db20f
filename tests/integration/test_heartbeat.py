"""The worker heartbeat against a private redis-server: TTL, updates, removal, Redis restarts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest
from redis.exceptions import RedisError

from loopline.redis import connect
from loopline.workers import index_key
from services.inference.heartbeat import Heartbeat, list_workers

if TYPE_CHECKING:
    from tests.fixtures.redis import RedisServer

pytest_plugins = ["tests.fixtures.redis"]

PREFIX = "test:workers:"


class Worker:
    """Stands in for the worker's state that `describe()` reports."""

    def __init__(self) -> None:
        self.queue_depth = 0

    def describe(self) -> dict[str, Any]:
        model = {"name": "sentiment", "version": "2", "aliases": ["prod"], "ready": True}
        return {"models": [model], "queue_depth": self.queue_depth}


async def eventually(
    condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0
) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


async def workers(url: str) -> list[dict[str, Any]]:
    client = connect(url)
    try:
        return await list_workers(client, PREFIX)
    except (RedisError, OSError):
        return []  # Redis is restarting: nobody is visible
    finally:
        await client.aclose()


def heartbeat(url: str, worker: Worker, endpoint: str = "10.0.0.5:8001") -> Heartbeat:
    return Heartbeat(
        url, PREFIX, endpoint=endpoint, describe=worker.describe, ttl=2.0, interval=0.1
    )


def test_the_key_carries_a_ttl_updates_and_goes_at_stop(redis_url: str) -> None:
    worker = Worker()

    async def main() -> None:
        beat = heartbeat(redis_url, worker)
        beat.start()
        await eventually(lambda: has_workers(redis_url, 1), "heartbeat key written")
        client = connect(redis_url)
        ttl_ms = await client.pttl(f"{PREFIX}10.0.0.5:8001")
        (seen,) = await list_workers(client, PREFIX)
        assert 0 < ttl_ms <= 2000
        assert seen["endpoint"] == "10.0.0.5:8001"
        assert seen["models"] == [worker.describe()["models"][0]]
        assert seen["pid"] > 0
        assert seen["updated_at"] >= seen["started_at"]

        worker.queue_depth = 7
        await eventually(lambda: depth_is(redis_url, 7), "queue depth updated")
        await beat.stop()
        assert await client.exists(f"{PREFIX}10.0.0.5:8001") == 0
        await client.aclose()

    asyncio.run(main())


async def has_workers(url: str, count: int) -> bool:
    return len(await workers(url)) == count


async def depth_is(url: str, depth: int) -> bool:
    found = await workers(url)
    return bool(found) and found[0]["queue_depth"] == depth


def test_the_heartbeat_comes_back_after_a_redis_restart(
    redis_server: RedisServer, redis_url: str
) -> None:
    async def main() -> None:
        beat = heartbeat(redis_url, Worker())
        beat.start()
        await eventually(lambda: has_workers(redis_url, 1), "heartbeat key written")
        await asyncio.to_thread(redis_server.stop)  # no persistence: the key goes with it
        beats_before = beat.beats
        await asyncio.sleep(0.3)  # a few failing beats; none may raise
        await asyncio.to_thread(redis_server.start)
        await eventually(lambda: has_workers(redis_url, 1), "heartbeat key rewritten")
        assert beat.beats > beats_before
        await beat.stop()

    asyncio.run(main())


def test_list_workers_sees_only_live_workers_sorted(redis_url: str) -> None:
    async def main() -> None:
        client = connect(redis_url)
        await client.set("test:other", "x")
        await client.set(f"{PREFIX}broken", b"{not json")
        beats = [heartbeat(redis_url, Worker(), f"10.0.0.{n}:8001") for n in (9, 3)]
        for beat in beats:
            await beat.beat()
        found = await list_workers(client, PREFIX)
        assert [w["endpoint"] for w in found] == ["10.0.0.3:8001", "10.0.0.9:8001"]
        for beat in beats:
            await beat.stop()
        assert await list_workers(client, PREFIX) == []
        await client.aclose()

    asyncio.run(main())


def test_a_failing_describe_skips_the_beat_without_raising(redis_url: str) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("model table locked")

    async def main() -> None:
        beat = Heartbeat(redis_url, PREFIX, endpoint="e:1", describe=broken, interval=0.1)
        assert await beat.beat() is False
        await beat.stop()

    asyncio.run(main())


def test_interval_must_be_below_ttl() -> None:
    with pytest.raises(ValueError, match="below ttl"):
        Heartbeat("redis://127.0.0.1:1/0", endpoint="e:1", describe=dict, ttl=1.0, interval=2.0)


def test_routers_read_the_index_not_the_keyspace(redis_url: str) -> None:
    async def main() -> None:
        client = connect(redis_url)
        old = json.dumps({"endpoint": "10.0.0.7:8001", "models": []})
        # A worker of an older release (a key, no index): found by SCAN while there is no index.
        await client.set(f"{PREFIX}10.0.0.7:8001", old)
        assert [w["endpoint"] for w in await list_workers(client, PREFIX)] == ["10.0.0.7:8001"]

        crashed = heartbeat(redis_url, Worker(), "10.0.0.8:8001")
        await crashed.beat()
        live = heartbeat(redis_url, Worker(), "10.0.0.9:8001")
        await live.beat()
        # With an index, only what it names is read: the key-only worker is not (SCAN is gone).
        listed = [w["endpoint"] for w in await list_workers(client, PREFIX)]
        assert listed == ["10.0.0.8:8001", "10.0.0.9:8001"]

        # A crash: the key expires and its index entry is no longer read, then pruned.
        await client.delete(crashed.key)
        assert [w["endpoint"] for w in await list_workers(client, PREFIX)] == ["10.0.0.9:8001"]
        index = index_key(PREFIX)
        await client.zadd(index, {crashed.key: 1})  # as if its expiry had passed long ago
        await live.beat()
        assert await client.zscore(index, crashed.key) is None
        await live.stop()
        assert await list_workers(client, PREFIX) == []
        # The last worker out leaves the index, so routers never fall back to a SCAN.
        assert await client.exists(index) == 1
        await client.set(f"{PREFIX}10.0.0.7:8001", old)  # still a key-only stray: not read
        assert await list_workers(client, PREFIX) == []
        await crashed.stop()
        await client.aclose()

    asyncio.run(main())
