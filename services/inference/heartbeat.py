"""The worker heartbeat, by which routers discover inference workers.

Discovery contract (routers rely on exactly this):

- A worker that serves at `endpoint` (the `host:port` a router dials) SETs the key
  `<prefix><endpoint>` (prefix `loopline:workers:` by default) every `interval` seconds, with an
  expiry of `ttl` seconds (SET ... PX), to a JSON object::

      {"endpoint": "10.0.0.5:8001",
       "models": [{"name": "sentiment", "version": "3", "aliases": ["prod"], "ready": true}],
       "queue_depth": 12, "started_at": 1718000000.0, "updated_at": 1718000042.5, "pid": 4242}

  Times are unix seconds. `describe()` supplies `models` and `queue_depth` (and may add fields);
  the heartbeat adds the rest.
- A key that exists is a live worker; the key expiring (crash, partition) or being deleted
  (graceful `stop`) takes it out of rotation. `ttl` is a few intervals, so one late beat does not.
- With the same write (one transaction) the key goes into the sorted set `<prefix>@index`,
  scored by its expiry time in unix ms, and members whose expiry has passed are pruned. Routers
  read the index, then MGET the keys (`loopline.workers.list_workers`, in the shared package
  since a router never imports this service): the key's expiry stays the liveness signal, the
  index only spares routers a SCAN of the whole keyspace.
- Only models with `ready: true` may be routed to.

A Redis outage is logged once and retried every interval; the heartbeat never raises into the
worker. When Redis comes back (even empty, after a restart) the next beat recreates the key.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from loopline.logging import get_logger
from loopline.redis import connect
from loopline.workers import DEFAULT_PREFIX, index_key, list_workers

__all__ = ["DEFAULT_PREFIX", "Heartbeat", "list_workers"]

log = get_logger(__name__)

_OUTAGE_ERRORS = (RedisError, OSError)


class Heartbeat:
    """Keeps `<key_prefix><endpoint>` alive in Redis while the worker runs; see the module doc."""

    def __init__(
        self,
        redis_url: str,
        key_prefix: str = DEFAULT_PREFIX,
        *,
        endpoint: str,
        describe: Callable[[], Mapping[str, Any]],
        ttl: float = 10.0,
        interval: float = 3.0,
    ) -> None:
        if not 0 < interval < ttl:
            raise ValueError(f"heartbeat interval ({interval}s) must be positive and below ttl")
        # A beat that fails is simply the next beat's job; client-side retries would only stall.
        self._client: aioredis.Redis = connect(
            redis_url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )
        self.key = key_prefix + endpoint
        self._index = index_key(key_prefix)
        self.endpoint = endpoint
        self._describe = describe
        self._ttl_ms = int(ttl * 1000)
        self._interval = interval
        self.started_at = time.time()
        self.beats = 0  # successful SETs, for tests and debugging
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    def payload(self) -> dict[str, Any]:
        """The JSON object the next beat writes."""
        described = dict(self._describe())
        return {
            **described,  # extra fields first, so they can never shadow the contract's own
            "endpoint": self.endpoint,
            "models": described.get("models", []),
            "queue_depth": described.get("queue_depth", 0),
            "started_at": self.started_at,
            "updated_at": time.time(),
            "pid": os.getpid(),
        }

    async def beat(self) -> bool:
        """Write the key once; False (after logging, once per outage) when that failed."""
        try:
            value = json.dumps(self.payload(), separators=(",", ":"))
        except Exception:  # describe() is the worker's code; a bug there must not stop the loop
            log.exception("heartbeat describe() failed; skipping this beat")
            return False
        now_ms = int(time.time() * 1000)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self.key, value, px=self._ttl_ms)
                pipe.zadd(self._index, {self.key: now_ms + self._ttl_ms})
                pipe.zremrangebyscore(self._index, "-inf", now_ms)
                await pipe.execute()
        except _OUTAGE_ERRORS as err:
            self._note_failure(err)
            return False
        self._note_success()
        return True

    def start(self) -> None:
        """Beat now and then every `interval` seconds, on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="heartbeat")

    async def stop(self) -> None:
        """Stop beating and delete the key so routers drop this worker at once (best effort)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None
        # The key only: its index entry expires with its score and is pruned by the next beat.
        # Removing it could empty the index, and routers fall back to SCAN when it is gone.
        try:
            await self._client.delete(self.key)
        except _OUTAGE_ERRORS as err:  # the TTL removes it soon anyway
            log.info(
                "could not delete the heartbeat key; it will expire", extra={"error": repr(err)}
            )
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self._interval)

    def _note_failure(self, err: Exception) -> None:
        if not self._failing:
            self._failing = True
            log.warning(
                "heartbeat: Redis unreachable; routers will not see this worker until it is back",
                extra={"key": self.key, "error": repr(err)},
            )

    def _note_success(self) -> None:
        self.beats += 1
        if self._failing:
            self._failing = False
            log.info("heartbeat: Redis reachable again", extra={"key": self.key})
