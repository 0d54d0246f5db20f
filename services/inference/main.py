"""Wiring and startup of one inference worker (`loopline serve inference`, `python -m
services.inference`).

Logging is configured before anything heavy is imported; the server starts NOT_SERVING, loads
every model source (warming each up), then turns SERVING. SIGTERM: stop accepting, finish what was
accepted, flush the inference records, exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from loopline import per_text
from loopline.package import Manifest
from loopline.runtime import Tokens
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)

VERSION = "0.1.0"


def default_pad_multiple(providers: Sequence[str]) -> int:
    """8 where a GPU provider runs the graph (tensor cores want widths in multiples of 8), 1 on
    CPU: rounding 20-token texts up to 24 or 32 is pure extra work there (sorted batches of 8 ran
    at 563-575 sentences/s rounded to 8 against 612-625 unrounded, MiniLM int8, 2 cores)."""
    return 8 if any(p != "CPUExecutionProvider" for p in providers) else 1


class TrimSchedule:
    """When to give freed memory back: after an interval in which no batch ran, once per burst.

    `due` is called once per interval with the batch counter and whether anything is queued or
    running right now.
    """

    def __init__(self, batches: int = 0) -> None:
        self._seen = batches  # the counter at the previous call
        self._trimmed_at = batches  # the counter at the last trim (nothing to trim before work)

    def due(self, batches: int, busy: bool) -> bool:
        quiet = batches == self._seen
        self._seen = batches
        if quiet and not busy and batches != self._trimmed_at:
            self._trimmed_at = batches
            return True
        return False


class Worker:
    """Everything one worker process runs, built from settings (also used in-process by tests)."""

    def __init__(self, settings: InferenceSettings) -> None:
        from services.inference.batching import Batcher, BatchSettings
        from services.inference.engines.base import EngineKind
        from services.inference.engines.onnx import OnnxOptions, detect_devices
        from services.inference.engines.registry import create_engine
        from services.inference.handlers import DataPlane
        from services.inference.metrics import InferenceMetrics
        from services.inference.models import ModelRepository, PackageStore

        self.settings = settings
        self.metrics = InferenceMetrics()
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tokenize")
        options = OnnxOptions(
            providers=tuple(settings.providers),
            cpu_variant=settings.cpu_variant,
            gpu_variant=settings.gpu_variant,
            intra_op_threads=settings.intra_op_threads,
            allow_spinning=settings.allow_spinning,
            spin_between_runs=settings.spin_between_runs,
            cuda_mem_limit_bytes=(settings.cuda_mem_limit_mb or 0) * 2**20 or None,
            trt_engine_cache=settings.trt_engine_cache,
            trt_workspace_bytes=settings.trt_workspace_mb * 2**20,
        )
        batch = BatchSettings(
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue_delay=settings.max_queue_delay_ms / 1000,
            max_queue_size=settings.max_queue_size,
            concurrency=settings.concurrency,
            overhead_tokens=settings.batch_overhead_tokens,
        )

        def build(directory: Path, manifest: Manifest) -> tuple[Any, Any]:
            engine = create_engine(EngineKind.ONNX, directory, manifest, options)
            label = manifest.name
            multiple = settings.pad_multiple or default_pad_multiple(engine.providers)
            batcher = Batcher(
                engine.run,
                manifest.pad_token_id,
                dataclasses.replace(batch, pad_multiple=multiple),
                name=label,
                on_batch=lambda s: self._on_batch(label, s),
            )
            return engine, batcher

        log.info("devices", extra=detect_devices())
        store = PackageStore(settings.cache_dir, settings.mlflow_uri)
        self.repository = ModelRepository(
            store,
            build,
            settings.max_batch_size,
            on_ready=lambda m: self.metrics.load_seconds.labels(m.name, m.version).set(
                m.load_seconds
            ),
        )
        # Read at scrape time, so alias moves and unloads are reflected without bookkeeping.
        self.metrics.queue_size.set_function(self.repository.queue_depth)
        self.metrics.loaded.set_function(lambda: len(self.repository.served()))
        self.records = self._record_writer()
        self.plane = DataPlane(
            self.repository,
            settings.max_text_chars,
            self.executor,
            record=self._record if self.records is not None else None,
            on_failure=self._record_failure if self.records is not None else None,
            inline_tokenize_chars=settings.inline_tokenize_chars,
            on_answer=lambda name, seconds: self.metrics.request.labels(name).observe(seconds),
        )
        self.ready = False
        self.batches = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self.heartbeat: Any = None

    def _on_batch(self, model: str, stats: Any) -> None:
        self.batches += 1
        self.metrics.batch(model, stats)

    async def _trim_when_idle(self, interval: float) -> None:
        """Return freed memory to the OS after work, once a whole interval passed without any.

        Activation buffers of large batches stay in the heap after a burst; trimming only when
        idle keeps RSS low without slowing batches (see OnnxOptions.malloc_mmap_threshold_bytes).
        Idle means no batch ran during the last interval and none is queued or running: under
        steady light load the model is idle between most requests, and a trim then would cost
        every few seconds what the heap would soon need again.
        """
        from services.inference.engines.onnx import release_free_memory

        trim = TrimSchedule(self.batches)
        while True:
            await asyncio.sleep(interval)
            busy = any(
                m.batcher.queue_depth or m.batcher.in_flight for m in self.repository.served()
            )
            if trim.due(self.batches, busy):
                await asyncio.to_thread(release_free_memory)

    def _record_writer(self) -> Any:
        if not self.settings.records:
            return None
        from services.inference.records import RecordWriter

        return RecordWriter(
            self.settings.redis_url,
            self.settings.record_stream,
            maxlen=self.settings.record_maxlen,
            spool_path=self.settings.spool_path,
            spool_max_bytes=self.settings.spool_max_mb * 2**20,
        )

    def _record(
        self, model: Any, request: Any, tokens: Sequence[Tokens], results: Sequence[Any]
    ) -> None:
        """One record per text; never blocks and never raises into the request."""
        from services.inference.records import InferenceRecord

        labels = model.manifest.labels
        texts = zip(_tags(model, request), tokens, results, strict=True)
        for index, (tags, token, result) in enumerate(texts):
            probs = result.probabilities
            self.records.submit(
                InferenceRecord(
                    **tags,
                    label=labels[int(probs.argmax())],
                    probabilities=[float(p) for p in probs],
                    labels=labels,
                    token_count=len(token.ids),
                    unknown_share=token.unknown_share,
                    truncated=token.truncated,
                    queue_ms=result.queue_seconds * 1000,
                    compute_ms=result.compute_seconds * 1000,
                    batch_size=result.batch_size,
                    sketch=[float(x) for x in result.embedding @ model.sketch],
                    text=request.texts[index] if self.settings.log_text else None,
                )
            )

    def _record_failure(self, model: Any, request: Any, error: Any) -> None:
        """One failure record per text of a request that was accepted and not answered."""
        from services.inference.records import FailureRecord

        for tags in _tags(model, request):
            self.records.submit(FailureRecord(**tags, error=str(error.kind)))

    def register(self, server: grpc.aio.Server) -> list[str]:
        from loopline.oip import grpc_service_pb2_grpc as pb_grpc
        from services.inference.servicer import InferenceServicer, service_name

        token = self.settings.admin_token.get_secret_value() if self.settings.admin_token else None
        servicer = InferenceServicer(
            self.plane,
            VERSION,
            self.settings.max_batch_size,
            lambda: self.ready,
            admin_token=token,
            stream_window=self.settings.stream_window,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        return [service_name()]

    async def start(self, endpoint: str) -> None:
        """Records, models (each warmed up), alias watching, heartbeat; then ready."""
        from services.inference.heartbeat import Heartbeat
        from services.inference.models import ModelSource

        if self.records is not None:
            self.records.start()
        sources = [ModelSource.parse(text) for text in self.settings.models]
        for source in sources:
            await self.repository.add(source)
        self._tasks.append(
            asyncio.create_task(
                self.repository.watch(self.settings.alias_poll_seconds), name="alias-watch"
            )
        )
        if self.settings.memory_trim_seconds > 0:
            self._tasks.append(
                asyncio.create_task(
                    self._trim_when_idle(self.settings.memory_trim_seconds), name="memory-trim"
                )
            )
        self.heartbeat = Heartbeat(
            self.settings.redis_url,
            endpoint=endpoint,
            interval=self.settings.heartbeat_seconds,
            # Three missed beats before routers forget the worker: one slow beat is not death.
            ttl=max(10.0, 3 * self.settings.heartbeat_seconds),
            describe=self.describe,
        )
        self.heartbeat.start()
        self.ready = True

    def describe(self) -> dict[str, Any]:
        models = [m.describe() for m in self.repository.served()]
        return {"models": models, "queue_depth": self.repository.queue_depth(), "pid": os.getpid()}

    async def stop(self) -> None:
        """Drain every model, flush records, leave the worker registry."""
        self.ready = False
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.repository.close()
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        if self.records is not None:
            await self.records.flush_and_close(timeout=self.settings.grace_period_seconds)
        self.executor.shutdown(wait=False, cancel_futures=True)


async def serve(settings: InferenceSettings) -> None:
    """Run a worker until SIGTERM/SIGINT."""
    from loopline.grpc_server import GrpcServer

    worker = Worker(settings)
    server = GrpcServer(settings, worker.register, name="inference", on_shutdown=[worker.stop])
    port = await server.start(serving=False)
    endpoint = settings.advertise or f"{settings.host}:{port}"
    try:
        await worker.start(endpoint)
    except BaseException:
        # A source that cannot load must not leave a half-started server behind.
        await server.stop(grace=0)
        raise
    await server.set_serving(True)
    log.info(
        "worker serving",
        extra={"endpoint": endpoint, "models": [m.describe() for m in worker.repository.served()]},
    )
    await server.run_until_signal()


def _tags(model: Any, request: Any) -> list[dict[str, Any]]:
    """What every record of a request's texts carries, one dict per text: its request id and
    user bucket (loopline/per_text.py), the model version and the request's routing tags."""
    params = request.parameters
    count = len(request.texts)
    ids = per_text.request_ids(params, request.request_id, count)
    buckets = per_text.user_buckets(params, count)
    shared = {
        "time": time.time(),
        "model": model.name,
        "version": model.version,
        "experiment": params.get("experiment", ""),
        "variant": params.get("variant", ""),
        "language": params.get("language", ""),
        "shadow": params.get("shadow", "") in ("1", "true", "True"),
    }
    return [
        {**shared, "request_id": rid, "user_bucket": bucket}
        for rid, bucket in zip(ids, buckets, strict=True)
    ]


def main(**overrides: Any) -> None:
    """Run until SIGTERM; settings from the environment, `overrides` win (see `run_service`)."""
    from loopline.grpc_server import run_service

    run_service(InferenceSettings, serve, **overrides)
