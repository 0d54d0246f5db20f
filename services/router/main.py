"""Router wiring and startup: `python -m services.router` or `loopline serve router`.

Startup: settings -> logging -> Redis (experiments, feedback, heartbeats) -> worker discovery
and channels -> the gRPC server (auth, health, reflection, metrics). Nothing here waits for
workers: a router with no worker answers UNAVAILABLE with the reason until one appears.
Shutdown (SIGTERM): stop accepting, finish in-flight calls, wait briefly for shadow copies, stop
the experiment cache and discovery, close channels and Redis.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import grpc

from loopline.auth import TokenAuth
from loopline.errors import LooplineError, NotReady
from loopline.grpc_server import GrpcServer, run_service
from loopline.logging import get_logger
from loopline.redis import connect
from loopline.settings import SettingsError
from loopline.v1 import router_pb2_grpc as pb_grpc
from services.router.balancer import Balancer
from services.router.coalesce import Coalescer
from services.router.discovery import (
    CombinedDiscovery,
    Discovery,
    HeartbeatDiscovery,
    StaticDiscovery,
)
from services.router.domain import ModelRef
from services.router.experiments import ExperimentCache, Experiments, ExperimentStore
from services.router.feedback import FeedbackLog
from services.router.handlers import Limits, Router
from services.router.language import LanguageRoutes
from services.router.metrics import RouterMetrics
from services.router.references import References
from services.router.servicer import ADMIN_METHODS, CLASSIFY_METHODS, RouterServicer, service_name
from services.router.settings import RouterSettings

log = get_logger(__name__)


def source_of(ref: ModelRef) -> str:
    """The repository-extension source a worker loads for a reference."""
    if ref.version:
        return f"models:/{ref.name}/{ref.version}"
    return f"models:/{ref.name}@{ref.target}"


def discovery_for(settings: RouterSettings) -> Discovery:
    """Heartbeats in Redis, a static list of OIP servers, or both."""
    sources: list[Discovery] = []
    if settings.discover_workers:
        sources.append(
            HeartbeatDiscovery(
                settings.redis_url, settings.worker_key_prefix, settings.discovery_seconds
            )
        )
    if settings.workers:
        sources.append(
            StaticDiscovery(settings.workers, interval=max(settings.discovery_seconds, 1.0))
        )
    if not sources:
        raise SettingsError(
            RouterSettings,
            {
                "LOOPLINE_ROUTER_WORKERS": "no workers: list some, or turn discovery on "
                "(LOOPLINE_ROUTER_DISCOVER_WORKERS=true)"
            },
        )
    return sources[0] if len(sources) == 1 else CombinedDiscovery(sources)


class RouterService:
    """Every part of one router process, built from settings; `run()` serves until SIGTERM."""

    def __init__(self, settings: RouterSettings, metrics: RouterMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or RouterMetrics()
        self._keeper: asyncio.Task[None] | None = None
        self.redis = connect(settings.redis_url)
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        self.balancer = Balancer(
            discovery_for(settings),
            max_attempts=settings.max_attempts,
            eject_after=settings.eject_after,
            probe_interval=settings.probe_seconds,
            default_timeout=settings.timeout_seconds,
            admin_token=token,
            on_event=self.metrics.worker_event,
        )
        self.store = ExperimentStore(self.redis)
        self.cache = ExperimentCache(self.store, settings.experiment_poll_seconds)
        self.references = References(settings.mlflow_uri)
        self.experiments = Experiments(
            self.store,
            resolve=self.references.resolve,
            ensure_served=self.ensure_served,
            promote=self.references.promote,
        )
        languages = LanguageRoutes(settings.language_routes, languages=settings.language_set())
        self.coalescer = (
            Coalescer(
                self.balancer.infer,
                lambda ref: len(self.balancer.candidates(ref)),
                per_worker=settings.coalesce_per_worker,
                max_texts=settings.coalesce_max_texts,
                on_call=self.metrics.upstream_call,
            )
            if settings.coalesce_per_worker
            else None
        )
        self.router = Router(
            self.coalescer or self.balancer.infer,
            self.cache.running_for,
            languages.route,
            default_model=settings.default_model,
            limits=Limits(settings.max_text_chars, settings.max_batch_texts),
            metrics=self.metrics,
            shadow_max_in_flight=settings.shadow_max_in_flight,
        )
        self.feedback = FeedbackLog(
            self.redis, settings.feedback_stream, settings.feedback_maxlen, self.known_labels
        )
        self.auth = TokenAuth(
            settings.admin_token,
            settings.classify_token,
            admin_methods=ADMIN_METHODS,
            protected_methods=CLASSIFY_METHODS,
        )
        self.server = GrpcServer(
            settings,
            self.register,
            name="router",
            interceptors=[self.auth],
            on_shutdown=[self.router.drain_shadows, self.close],
        )

    def needed_refs(self, now: float) -> list[ModelRef]:
        """Every model version the experiments taking traffic at `now` send requests to."""
        refs: dict[ModelRef, None] = {}
        for exp in self.cache.experiments:
            if exp.takes_traffic(now):
                refs.update(dict.fromkeys(v.model for v in exp.variants))
                refs.update(dict.fromkeys(s.model for s in exp.shadows))
        return list(refs)

    async def keep_served(self, interval: float) -> None:
        """Every `interval`: load again any version a running experiment needs that no worker
        serves now. Workers replaced by a rolling update or added by an autoscaler start with
        their configured models only; without this, an arm whose workers were all replaced
        would fail until someone loaded it by hand."""
        loading: dict[ModelRef, asyncio.Task[None]] = {}
        try:
            while True:
                await asyncio.sleep(interval)
                if not self.balancer.discovery.snapshot():
                    continue  # no worker known at all: nothing could load it
                for ref in self.needed_refs(time.time()):
                    if ref in loading or self.balancer.candidates(ref):
                        continue
                    loading[ref] = asyncio.get_running_loop().create_task(self._reload(ref))
                    loading[ref].add_done_callback(functools.partial(_forget, loading, ref))
        finally:
            for task in list(loading.values()):
                task.cancel()

    async def _reload(self, ref: ModelRef) -> None:
        try:
            await self.ensure_served(ref)
        except Exception as err:  # a Redis or registry outage too: the next check tries again
            log.warning(
                "cannot load a running experiment's version",
                extra={"model": str(ref), "error": getattr(err, "message", repr(err))},
            )
        else:
            log.info("experiment version served again", extra={"model": str(ref)})

    async def ensure_served(self, ref: ModelRef) -> None:
        """Before an experiment runs: some worker must serve each version, loaded on demand."""
        if self.balancer.candidates(ref):
            return
        await self.balancer.ensure_loaded(
            ref, source_of(ref), timeout=self.settings.model_load_timeout_seconds
        )

    async def known_labels(self) -> set[str]:
        """Labels of every model version some worker serves (feedback is checked against them)."""
        labels: set[str] = set()
        seen = {
            (model.name, model.version)
            for worker in self.balancer.discovery.snapshot()
            for model in worker.models
            if model.ready
        }
        for name, version in seen:
            try:
                labels.update(await self.balancer.model_labels(ModelRef(name, version)))
            except LooplineError as err:
                log.warning("labels unavailable", extra={"model": name, "error": err.message})
        return labels

    def register(self, server: grpc.aio.Server) -> list[str]:
        servicer = RouterServicer(
            self.router,
            self.experiments,
            self.feedback,
            default_timeout=self.settings.timeout_seconds,
            stream_window=self.settings.stream_window,
        )
        pb_grpc.add_RouterServicer_to_server(servicer, server)
        return [service_name()]

    async def start(self) -> int:
        """Load experiments and find workers, then accept calls; returns the bound port."""
        try:
            await self.cache.refresh()
        except NotReady as err:
            # The cache keeps polling: experiments appear once Redis answers.
            log.warning("experiments not loaded yet", extra={"error": err.message})
        self.cache.start()
        await self.balancer.start()
        if self.settings.keep_served_seconds > 0:
            self._keeper = asyncio.get_running_loop().create_task(
                self.keep_served(self.settings.keep_served_seconds), name="keep-served"
            )
        return await self.server.start()

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        await self.cache.stop()
        if self.coalescer is not None:
            await self.coalescer.close()
        await self.balancer.close()
        await self.redis.aclose()

    async def run(self) -> None:
        await self.start()
        await self.server.run_until_signal()


def _forget(loading: dict[ModelRef, Any], ref: ModelRef, _task: Any) -> None:
    loading.pop(ref, None)


def main(**overrides: Any) -> None:
    """Run until SIGTERM; settings from the environment, `overrides` win (see `run_service`)."""
    run_service(RouterSettings, _serve, **overrides)


async def _serve(settings: RouterSettings) -> None:
    # Built inside the running loop: grpc.aio, redis.asyncio and asyncio objects bind to it.
    await RouterService(settings).run()
