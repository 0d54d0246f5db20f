"""Redis helpers: connecting, waiting for a server, and the stream operations of the record log.

Streams carry inference records and feedback. Producers `xadd_many` a batch in one round trip;
consumers in a group `read_group`, fold the entries into their state, then `ack` them, so nothing is
lost when Redis or a consumer restarts: a consumer first gets back its own unacknowledged entries.

Stream entry ids come back as `str`, field names as `str`, field values as raw `bytes` (payloads may
be binary; the caller decodes what it knows to be text).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from loopline.errors import NotReady

__all__ = [
    "FieldValue",
    "StreamEntry",
    "ack",
    "connect",
    "ensure_group",
    "read_group",
    "wait_ready",
    "xadd_many",
]

FieldValue = bytes | str | int | float
StreamEntry = tuple[str, dict[str, bytes]]


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """A client for `url` (redis://host:port/db) returning bytes; connects lazily on first use."""
    return aioredis.from_url(url, decode_responses=False, **kwargs)


async def wait_ready(client: aioredis.Redis, timeout: float = 10.0) -> None:
    """Wait until Redis answers PING, retrying with backoff; raise `NotReady` after `timeout` s."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            await client.ping()
            return
        except (RedisConnectionError, RedisTimeoutError, OSError) as err:
            if time.monotonic() + delay > deadline:
                raise NotReady(
                    f"Redis did not answer PING within {timeout:g}s ({err}); "
                    "is it running, and does LOOPLINE_REDIS_URL point at it?",
                    timeout_seconds=timeout,
                ) from err
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def ensure_group(
    client: aioredis.Redis, stream: str, group: str, start_id: str = "0"
) -> None:
    """Create consumer `group` on `stream` (and the stream) unless it exists.

    `start_id="0"` lets a new group read entries written before it existed; "$" only new ones.
    """
    try:
        await client.xgroup_create(stream, group, id=start_id, mkstream=True)
    except ResponseError as err:
        if not str(err).startswith("BUSYGROUP"):
            raise


async def xadd_many(
    client: aioredis.Redis,
    stream: str,
    records: Sequence[Mapping[str, FieldValue]],
    maxlen: int | None = None,
    approximate: bool = True,
) -> list[str]:
    """Append `records` to `stream` in one round trip and return their ids, in order.

    `maxlen` caps the stream; `approximate` (MAXLEN ~) lets Redis trim whole nodes, which is
    much cheaper than exact trimming. The batch runs in MULTI/EXEC so a failure writes none of it
    and the caller can retry the whole batch without duplicates.
    """
    if not records:
        return []
    async with client.pipeline(transaction=True) as pipe:
        for record in records:
            pipe.xadd(stream, _fields(record), maxlen=maxlen, approximate=approximate)
        ids = await pipe.execute()
    return [_text(entry_id) for entry_id in ids]


async def read_group(
    client: aioredis.Redis,
    stream: str,
    group: str,
    consumer: str,
    *,
    count: int = 100,
    block_ms: int | None = 1000,
) -> list[StreamEntry]:
    """Read up to `count` entries for `consumer` of `group`.

    This consumer's own pending entries (read before but never acknowledged: a crash, a failed
    fold) come first; only when there are none does it wait up to `block_ms` for new ones
    (None: do not block). Ack a batch before reading the next, or it is delivered again.
    If the group is gone (Redis restarted without persistence) it is recreated.
    """
    read = functools.partial(_xreadgroup, client, stream, group, consumer, count=count)
    pending = await read("0", block_ms=None)
    live = [(entry_id, fields) for entry_id, fields in pending if fields is not None]
    # Entries trimmed from the stream while pending have no fields left: nothing to fold, ack them.
    trimmed = [entry_id for entry_id, fields in pending if fields is None]
    if trimmed:
        await ack(client, stream, group, trimmed)
    if live:
        return live
    fresh = await read(">", block_ms=block_ms)
    return [(entry_id, fields) for entry_id, fields in fresh if fields is not None]


async def ack(client: aioredis.Redis, stream: str, group: str, ids: Sequence[str]) -> int:
    """Acknowledge `ids` in `group`; returns how many were pending."""
    if not ids:
        return 0
    return int(await client.xack(stream, group, *ids))


async def _xreadgroup(
    client: aioredis.Redis,
    stream: str,
    group: str,
    consumer: str,
    start: str,
    *,
    count: int,
    block_ms: int | None,
) -> list[tuple[str, dict[str, bytes] | None]]:
    try:
        reply: Any = await client.xreadgroup(group, consumer, {stream: start}, count, block_ms)
    except ResponseError as err:
        if not str(err).startswith("NOGROUP"):
            raise
        await ensure_group(client, stream, group)
        reply = await client.xreadgroup(group, consumer, {stream: start}, count, block_ms)
    return [_entry(raw_id, raw) for _name, entries in reply or [] for raw_id, raw in entries]


def _entry(
    raw_id: bytes | str, raw: Mapping[bytes, bytes] | None
) -> tuple[str, dict[str, bytes] | None]:
    if not raw:
        return _text(raw_id), None
    return _text(raw_id), {_text(key): value for key, value in raw.items()}


def _fields(record: Mapping[str, FieldValue]) -> dict[FieldT, EncodableT]:
    return dict(record.items())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
