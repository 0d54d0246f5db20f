"""The reading side of the worker registry: what a worker's heartbeat says, typed.

Inference workers write the keys (`services/inference/heartbeat.py` holds the contract in its
module docstring); routers read them. The reader lives in the shared package because a service
never imports another service.

- A key `<prefix><endpoint>` exists while the worker lives (it carries a TTL); its value is JSON:
  `{"endpoint", "models": [{"name", "version", "aliases", "ready"}], "queue_depth",
  "started_at", "updated_at", "pid"}`.
- Beside its key, a worker keeps its key in the sorted set `<prefix>@index`, scored by the key's
  expiry time (unix ms). The index only says which keys to read: a key that expired or was
  deleted reads as nothing, members whose score has passed are ignored (and pruned by the next
  beat), so the key's own expiry stays the one liveness signal.
- `list_workers` returns the raw objects (the index, then one MGET; a SCAN MATCH only when there
  is no index, i.e. workers of an older release); `read_workers` the typed `WorkerInfo`s,
  skipping entries too malformed to route to (logged, never raised).

Why an index: SCAN walks the whole keyspace, and the monitor keeps a key per request for its
retention period; with a million keys one SCAN took 0.8 s, longer than the discovery interval.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from loopline.logging import get_logger

__all__ = [
    "DEFAULT_PREFIX",
    "ServedModelInfo",
    "WorkerInfo",
    "index_key",
    "list_workers",
    "parse_worker",
    "read_workers",
]

log = get_logger(__name__)

DEFAULT_PREFIX = "loopline:workers:"


@dataclass(frozen=True)
class ServedModelInfo:
    """One model version a worker holds, and the aliases it answers to there."""

    name: str
    version: str
    aliases: tuple[str, ...] = ()
    ready: bool = True

    def answers_to(self, target: str) -> bool:
        """True when a request's `model_version` (`target`) names this version or an alias."""
        return target == self.version or target in self.aliases


@dataclass(frozen=True)
class WorkerInfo:
    """A live worker as its last heartbeat (or an OIP server's repository index) describes it."""

    endpoint: str
    models: tuple[ServedModelInfo, ...] = ()
    queue_depth: int = 0
    started_at: float = 0.0
    updated_at: float = 0.0
    pid: int | None = None

    def serving(self, name: str, target: str) -> ServedModelInfo | None:
        """The ready model a request for `name` at `target` (version or alias) reaches, if any."""
        for model in self.models:
            if model.ready and model.name == name and model.answers_to(target):
                return model
        return None


def index_key(prefix: str = DEFAULT_PREFIX) -> str:
    """The sorted set of live heartbeat keys, scored by expiry (unix ms)."""
    return prefix + "@index"


async def list_workers(
    client: aioredis.Redis, prefix: str = DEFAULT_PREFIX
) -> list[dict[str, Any]]:
    """The live workers' heartbeat objects, sorted by endpoint (the index, then one MGET)."""
    index = index_key(prefix)
    async with client.pipeline(transaction=False) as pipe:
        pipe.exists(index)
        pipe.zrangebyscore(index, int(time.time() * 1000), "+inf")
        has_index, keys = await pipe.execute()
    if not has_index:
        keys = [
            key
            async for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=500)
            if key not in (index, index.encode())
        ]
    if not keys:
        return []
    values = await client.mget(keys)
    workers = [worker for value in values if (worker := _decode(value)) is not None]
    return sorted(workers, key=lambda worker: str(worker.get("endpoint", "")))


async def read_workers(client: aioredis.Redis, prefix: str = DEFAULT_PREFIX) -> list[WorkerInfo]:
    """`list_workers`, typed; entries without a usable endpoint are skipped."""
    raw = await list_workers(client, prefix)
    return [worker for item in raw if (worker := parse_worker(item)) is not None]


def parse_worker(raw: Mapping[str, Any]) -> WorkerInfo | None:
    """A heartbeat object as a `WorkerInfo`; None (after a warning) when it cannot be routed to.

    Extra fields are ignored and missing optional ones defaulted, so workers of a newer release
    that add fields stay routable.
    """
    endpoint = raw.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        log.warning(
            "ignoring a heartbeat without an endpoint", extra={"heartbeat": repr(raw)[:200]}
        )
        return None
    try:
        return WorkerInfo(
            endpoint=endpoint,
            models=tuple(_models(raw.get("models") or [])),
            queue_depth=int(raw.get("queue_depth") or 0),
            started_at=float(raw.get("started_at") or 0.0),
            updated_at=float(raw.get("updated_at") or 0.0),
            pid=int(raw["pid"]) if raw.get("pid") is not None else None,
        )
    except (TypeError, ValueError) as err:
        log.warning(
            "ignoring a malformed heartbeat", extra={"endpoint": endpoint, "error": repr(err)}
        )
        return None


def _models(items: Iterable[Any]) -> Iterable[ServedModelInfo]:
    for item in items:
        if not isinstance(item, Mapping) or not item.get("name"):
            raise ValueError(f"model entry {item!r} has no name")
        aliases = item.get("aliases") or ()
        if isinstance(aliases, str):  # a single alias written as a string still means one alias
            aliases = (aliases,)
        yield ServedModelInfo(
            name=str(item["name"]),
            version=str(item.get("version", "")),
            aliases=tuple(str(alias) for alias in aliases),
            ready=bool(item.get("ready", False)),
        )


def _decode(value: bytes | str | None) -> dict[str, Any] | None:
    if value is None:  # expired or deleted since the index (or SCAN) named it
        return None
    try:
        worker = json.loads(value)
    except ValueError:
        log.warning("ignoring an unreadable heartbeat", extra={"value": repr(value[:200])})
        return None
    return worker if isinstance(worker, dict) else None


def _glob_escape(text: str) -> str:
    """Escape the characters SCAN MATCH treats as a pattern."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)
