"""Where the router learns which upstream endpoints serve which models.

Two sources, one small interface (`Discovery`), both polled in the background:

- `HeartbeatDiscovery` reads our workers' heartbeats from Redis (SCAN + MGET, see
  `loopline.workers`). A worker appears within one interval of its first beat and disappears when
  its key expires or is deleted. While Redis is unreachable the last good list is kept (logged once
  per outage): routing continues on what was known, and the balancer's ejection takes care of a
  worker that died meanwhile.
- `StaticDiscovery` fronts any Open Inference Protocol server (Triton, MLServer, our own workers
  without Redis) from a fixed list of `host:port`s. Each endpoint's models come from
  `RepositoryIndex(ready=True)`; our workers put a version's aliases in the index entry's `reason`
  field (comma-separated), other servers have no aliases, so only versions match there. A server
  without the repository extension (UNIMPLEMENTED) is asked `ModelReady` for each (name, version)
  requests have asked for (`track`). An endpoint that does not answer is left out until it does.

`CombinedDiscovery` merges several sources (heartbeats plus a static list) into one.

Readers call `snapshot()` on the hot path (no I/O); `generation` changes whenever the list does,
so a reader can rebuild its own index only then.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

import grpc
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from loopline.logging import get_logger
from loopline.oip import grpc_service_pb2 as pb
from loopline.oip import grpc_service_pb2_grpc as pb_grpc
from loopline.redis import connect
from loopline.workers import DEFAULT_PREFIX, ServedModelInfo, WorkerInfo, read_workers

__all__ = [
    "LOOPLINE_SERVER_NAME",
    "CombinedDiscovery",
    "Discovery",
    "HeartbeatDiscovery",
    "StaticDiscovery",
]

log = get_logger(__name__)

# What our workers answer in ServerMetadata.name (services/inference/servicer.py SERVER_NAME);
# only their index entries carry aliases in `reason`. Triton puts free text there.
LOOPLINE_SERVER_NAME = "loopline-inference"
# Distinct (name, version) pairs remembered for ModelReady polling: requests name models, and a
# caller must not grow this (or the polling) without bound by asking for random names.
MAX_TRACKED = 256


class Discovery(Protocol):
    """A source of upstream endpoints and the models they serve."""

    @property
    def generation(self) -> int:
        """Changes whenever `snapshot()` would return something different."""
        ...

    def snapshot(self) -> list[WorkerInfo]:
        """The last known endpoints, sorted by endpoint; no I/O."""
        ...

    async def refresh(self) -> list[WorkerInfo]:
        """Poll the source now and return the (possibly updated) snapshot; never raises."""
        ...

    def track(self, name: str, target: str) -> bool:
        """Note a (model, version or alias) a request asked for; True if a refresh may find it."""
        ...

    async def start(self) -> None:
        """Poll once (so the first snapshot is filled), then every interval in the background."""
        ...

    async def stop(self) -> None:
        """Stop polling and release connections."""
        ...


class _Polling:
    """The snapshot, its generation and the background loop both discoveries share."""

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"discovery interval must be positive, got {interval}")
        self.interval = interval
        self._workers: list[WorkerInfo] = []
        self._generation = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def generation(self) -> int:
        return self._generation

    def snapshot(self) -> list[WorkerInfo]:
        return self._workers

    def track(self, name: str, target: str) -> bool:
        return False

    async def refresh(self) -> list[WorkerInfo]:
        raise NotImplementedError

    def _publish(self, workers: list[WorkerInfo]) -> None:
        workers = sorted(workers, key=lambda worker: worker.endpoint)
        if workers != self._workers:
            self._workers = workers
            self._generation += 1

    async def start(self) -> None:
        if self._task is None:
            await self.refresh()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.refresh()


class HeartbeatDiscovery(_Polling):
    """Our workers, from their Redis heartbeats; see the module docstring."""

    def __init__(self, redis_url: str, prefix: str = DEFAULT_PREFIX, interval: float = 0.5) -> None:
        super().__init__(interval)
        self.prefix = prefix
        # A failed poll is simply the next poll's job; client-side retries would only delay it.
        timeout = max(0.2, min(2.0, interval * 2))
        self._client: aioredis.Redis = connect(
            redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._failing = False

    async def refresh(self) -> list[WorkerInfo]:
        try:
            workers = await read_workers(self._client, self.prefix)
        except (RedisError, OSError) as err:
            self._note_outage(err)
            return self._workers
        if self._failing:
            self._failing = False
            log.info("discovery: Redis reachable again", extra={"workers": len(workers)})
        self._publish(workers)
        return self._workers

    def _note_outage(self, err: Exception) -> None:
        if not self._failing:
            self._failing = True
            log.warning(
                "discovery: Redis unreachable; routing on the last known workers",
                extra={"workers": len(self._workers), "error": repr(err)},
            )

    async def stop(self) -> None:
        await super().stop()
        await self._client.aclose()


class StaticDiscovery(_Polling):
    """A fixed list of OIP servers, their models learnt from each; see the module docstring."""

    def __init__(
        self,
        endpoints: Sequence[str],
        interval: float = 2.0,
        *,
        timeout: float = 2.0,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(interval)
        self.endpoints = list(dict.fromkeys(endpoints))  # order kept, duplicates dropped
        self.timeout = timeout
        self._channels = {
            endpoint: grpc.aio.insecure_channel(endpoint, options=list(channel_options))
            for endpoint in self.endpoints
        }
        self._stubs = {e: pb_grpc.GRPCInferenceServiceStub(c) for e, c in self._channels.items()}
        self._ours: dict[str, bool] = {}  # endpoint -> runs our worker (aliases in `reason`)
        self._no_index: set[str] = set()  # endpoints without the repository extension
        self._tracked: dict[tuple[str, str], None] = {}  # insertion-ordered, bounded
        self._down: set[str] = set()

    def track(self, name: str, target: str) -> bool:
        key = (name, target)
        if key in self._tracked:
            return False
        if len(self._tracked) >= MAX_TRACKED:
            del self._tracked[next(iter(self._tracked))]
        self._tracked[key] = None
        return bool(self._no_index)

    async def refresh(self) -> list[WorkerInfo]:
        found = await asyncio.gather(*(self._describe(e) for e in self.endpoints))
        self._publish([worker for worker in found if worker is not None])
        return self._workers

    async def _describe(self, endpoint: str) -> WorkerInfo | None:
        try:
            models = await self._models(endpoint)
        except grpc.aio.AioRpcError as err:
            if endpoint not in self._down:
                self._down.add(endpoint)
                log.warning(
                    "discovery: endpoint not answering; left out until it does",
                    extra={"endpoint": endpoint, "code": err.code().name, "error": err.details()},
                )
            return None
        if endpoint in self._down:
            self._down.discard(endpoint)
            log.info("discovery: endpoint answering again", extra={"endpoint": endpoint})
        return WorkerInfo(endpoint=endpoint, models=tuple(models))

    async def _models(self, endpoint: str) -> list[ServedModelInfo]:
        if endpoint not in self._no_index:
            try:
                return await self._indexed(endpoint)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info(
                    "discovery: no repository index; asking ModelReady per requested model",
                    extra={"endpoint": endpoint},
                )
                self._no_index.add(endpoint)
        return await self._ready_tracked(endpoint)

    async def _indexed(self, endpoint: str) -> list[ServedModelInfo]:
        stub = self._stubs[endpoint]
        ours = await self._is_ours(endpoint)
        index = await stub.RepositoryIndex(
            pb.RepositoryIndexRequest(ready=True), timeout=self.timeout
        )
        return [
            ServedModelInfo(
                name=entry.name,
                version=entry.version,
                aliases=_aliases(entry.reason) if ours else (),
                ready=True,
            )
            for entry in index.models
            # `ready=True` asks for ready models only; servers that list more say so in `state`.
            if entry.state.upper() in ("READY", "")
        ]

    async def _is_ours(self, endpoint: str) -> bool:
        if endpoint not in self._ours:
            metadata = await self._stubs[endpoint].ServerMetadata(
                pb.ServerMetadataRequest(), timeout=self.timeout
            )
            self._ours[endpoint] = metadata.name == LOOPLINE_SERVER_NAME
        return self._ours[endpoint]

    async def _ready_tracked(self, endpoint: str) -> list[ServedModelInfo]:
        stub = self._stubs[endpoint]
        await stub.ServerReady(pb.ServerReadyRequest(), timeout=self.timeout)  # reachable at all?
        models = []
        for name, target in list(self._tracked):
            try:
                answer = await stub.ModelReady(
                    pb.ModelReadyRequest(name=name, version=target), timeout=self.timeout
                )
            except grpc.aio.AioRpcError:
                continue  # this model is unknown there; others may still be served
            if answer.ready:
                models.append(ServedModelInfo(name=name, version=target, ready=True))
        return models

    async def stop(self) -> None:
        await super().stop()
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))


def _aliases(reason: str) -> tuple[str, ...]:
    return tuple(alias.strip() for alias in reason.split(",") if alias.strip())


class CombinedDiscovery:
    """Several sources as one; an endpoint listed by two is taken from the first."""

    def __init__(self, sources: Sequence[Discovery]) -> None:
        if not sources:
            raise ValueError("CombinedDiscovery needs at least one source")
        self.sources = list(sources)
        self._merged: list[WorkerInfo] = []
        self._merged_at = -1

    @property
    def generation(self) -> int:
        # Each source's generation only grows, so their sum changes whenever any of them does.
        return sum(source.generation for source in self.sources)

    def snapshot(self) -> list[WorkerInfo]:
        generation = self.generation
        if generation != self._merged_at:
            merged: dict[str, WorkerInfo] = {}
            for source in self.sources:
                for worker in source.snapshot():
                    merged.setdefault(worker.endpoint, worker)
            self._merged = sorted(merged.values(), key=lambda worker: worker.endpoint)
            self._merged_at = generation
        return self._merged

    async def refresh(self) -> list[WorkerInfo]:
        await asyncio.gather(*(source.refresh() for source in self.sources))
        return self.snapshot()

    def track(self, name: str, target: str) -> bool:
        return any([source.track(name, target) for source in self.sources])  # all must hear it

    async def start(self) -> None:
        await asyncio.gather(*(source.start() for source in self.sources))

    async def stop(self) -> None:
        await asyncio.gather(*(source.stop() for source in self.sources))
