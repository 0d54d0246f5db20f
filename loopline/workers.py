"""The reading side of the worker registry: what a worker's heartbeat says, typed.

Inference workers write the keys (`services/inference/heartbeat.py` holds the contract in its
module docstring); routers read them. The reader lives in the shared package because a service
never imports another service.

- A key `<prefix><endpoint>` exists while the worker lives (it carries a TTL); its value is JSON:
  `{"endpoint", "models": [{"name", "version", "aliases", "ready"}], "queue_depth",
  "started_at", "updated_at", "pid"}`.
- `list_workers` returns the raw objects (SCAN MATCH, then one MGET); `read_workers` the typed
  `WorkerInfo`s, skipping entries too malformed to route to (logged, never raised).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from loopline.logging import get_logger

__all__ = [
    "DEFAULT_PREFIX",
    "ServedModelInfo",
    "WorkerInfo",
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


async def list_workers(
    client: aioredis.Redis, prefix: str = DEFAULT_PREFIX
) -> list[dict[str, Any]]:
    """The live workers' heartbeat objects, sorted by endpoint (SCAN, then one MGET)."""
    keys = [key async for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=500)]
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
    if value is None:  # expired between SCAN and MGET
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
