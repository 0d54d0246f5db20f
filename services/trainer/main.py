"""Trainer service wiring: `python -m services.trainer` or `loopline serve trainer`.

The service queues and runs training jobs (one per device, each in its own process) and keeps
them in a SQLite file under LOOPLINE_TRAINER_HOME, so a restart loses nothing: queued jobs run,
a job that was running is marked interrupted with its last progress.
"""

from __future__ import annotations

from typing import Any

import grpc

from loopline.auth import TokenAuth
from loopline.grpc_server import GrpcServer, run_service
from loopline.logging import get_logger
from loopline.v1 import trainer_pb2_grpc as pb_grpc
from services.trainer.jobs import JobStore
from services.trainer.runner import DEFAULT_TARGET, JobRunner
from services.trainer.servicer import ADMIN_METHODS, TrainerServicer, service_name
from services.trainer.settings import TrainerSettings

log = get_logger(__name__)


class TrainerService:
    """The job store, the runner and the gRPC server of one trainer process."""

    def __init__(self, settings: TrainerSettings, target: str = DEFAULT_TARGET) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(settings.home / "jobs.db")
        self.runner = JobRunner(
            self.store,
            target,
            slots=settings.slots,
            stop_grace=settings.cancel_grace_seconds,
            log_level=settings.log_level,
            log_json=settings.log_json,
        )
        self.server = GrpcServer(
            settings,
            self.register,
            name="trainer",
            interceptors=[TokenAuth(settings.admin_token, admin_methods=ADMIN_METHODS)],
            on_shutdown=[self.close],
        )

    def register(self, server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_TrainerServicer_to_server(TrainerServicer(self.store, self.runner), server)
        return [service_name()]

    async def start(self) -> int:
        interrupted = await self.runner.start()
        for job in interrupted:
            log.warning("job interrupted by a restart", extra={"job_id": job.id})
        return await self.server.start()

    async def close(self) -> None:
        await self.runner.stop()
        self.store.close()

    async def run(self) -> None:
        await self.start()
        await self.server.run_until_signal()


def main(**overrides: Any) -> None:
    """Run until SIGTERM; settings from the environment, `overrides` win (see `run_service`)."""
    run_service(TrainerSettings, _serve, **overrides)


async def _serve(settings: TrainerSettings) -> None:
    await TrainerService(settings).run()
