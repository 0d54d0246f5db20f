"""Monitor wiring: `python -m services.monitor` or `loopline serve monitor`.

One process runs a stream consumer (in the shared consumer group, so several monitors split the
records), the periodic checker (drift, alert rules, retraining triggers), the gRPC API and,
optionally, an HTTP server for the saved Evidently reports. Everything it knows lives in Redis.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import threading
from typing import Any

import grpc

from loopline.auth import TokenAuth
from loopline.grpc_server import GrpcServer, run_service
from loopline.logging import get_logger
from loopline.redis import connect
from loopline.v1 import monitor_pb2_grpc as pb_grpc
from services.monitor.alerts import AlertBook, Rules
from services.monitor.consumer import Consumer
from services.monitor.handlers import Checker, References, Views
from services.monitor.metrics import MonitorMetrics
from services.monitor.retrain import Retrainer
from services.monitor.servicer import ADMIN_METHODS, MonitorServicer, service_name
from services.monitor.settings import MonitorSettings
from services.monitor.state import State, StateConfig

log = get_logger(__name__)


def trainer_submit(address: str, token: str | None) -> Any:
    """Submit a spec dict to the trainer service over gRPC; returns the job id."""
    from loopline.jobspec import parse_spec, spec_pb
    from loopline.v1 import trainer_pb2 as tpb
    from loopline.v1 import trainer_pb2_grpc as tpb_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def submit(spec: dict[str, Any], key: str) -> str:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = tpb_grpc.TrainerStub(channel)
            request = tpb.SubmitJobRequest(spec=spec_pb(parse_spec(spec)), request_id=key)
            job = await stub.SubmitJob(request, metadata=metadata, timeout=30)
            return str(job.id)

    return submit


class MonitorService:
    """Consumer, checker and API of one monitor process."""

    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        config = StateConfig(
            window_s=settings.window_seconds,
            prediction_ttl_s=int(settings.retention_hours * 3600),
            window_ttl_s=int(settings.retention_hours * 3600) + 86_400,
        )
        self.client = connect(settings.redis_url)
        self.consumer = Consumer(
            settings.redis_url,
            group=settings.group,
            streams=(settings.inference_stream, settings.feedback_stream),
            state_config=config,
        )
        state = State(self.client, config)
        references = References(settings.mlflow_uri, settings.home / "references")
        self.views = Views(state, self.client, references, settings.home / "reports")
        self.book = AlertBook(self.client)
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        submit = (
            trainer_submit(settings.trainer_address, token) if settings.trainer_address else None
        )
        self.retrainer = Retrainer(
            self.client,
            submit,
            Retrainer.load_spec(settings.retrain_spec),
            settings.retrain_cooldown_seconds,
            book=self.book,
        )
        rules = Rules(
            drift_consecutive=settings.drift_consecutive,
            accuracy_floor=settings.accuracy_floor,
            accuracy_min_labels=settings.accuracy_min_labels,
            latency_p99_ms=settings.latency_p99_ms,
            srm_p_value=settings.srm_p_value,
        )
        self.checker = Checker(
            self.views,
            self.book,
            rules,
            self.retrainer,
            settings.check_seconds,
            settings.window_seconds,
            settings.drift_window_records,
            MonitorMetrics(),
        )
        self.server = GrpcServer(
            settings,
            self.register,
            name="monitor",
            interceptors=[TokenAuth(settings.admin_token, admin_methods=ADMIN_METHODS)],
            on_shutdown=[self.close],
        )
        self._consuming: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> list[str]:
        servicer = MonitorServicer(self.views, self.book, self.retrainer)
        pb_grpc.add_MonitorServicer_to_server(servicer, server)
        return [service_name()]

    async def start(self) -> int:
        self._consuming = asyncio.get_running_loop().create_task(self.consumer.run())
        self.checker.start()
        if self.settings.report_port:
            serve_reports(self.settings.report_port, self.settings.home / "reports")
        return await self.server.start()

    async def close(self) -> None:
        await self.checker.stop()
        await self.consumer.stop()
        if self._consuming is not None:
            await asyncio.gather(self._consuming, return_exceptions=True)
        await self.client.aclose()

    async def run(self) -> None:
        await self.start()
        await self.server.run_until_signal()


def serve_reports(port: int, folder: Any) -> None:
    """The saved Evidently HTML reports over plain HTTP, from a daemon thread."""
    folder.mkdir(parents=True, exist_ok=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), handler)
    threading.Thread(target=server.serve_forever, name="reports", daemon=True).start()
    log.info("drift reports served", extra={"port": port, "folder": str(folder)})


def main(**overrides: Any) -> None:
    """Run until SIGTERM; settings from the environment, `overrides` win (see `run_service`)."""
    run_service(MonitorSettings, _serve, **overrides)


async def _serve(settings: MonitorSettings) -> None:
    await MonitorService(settings).run()
