"""The thin gRPC adapter of `loopline.v1.Trainer` over the job store and runner."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from loopline.v1 import trainer_pb2 as pb
from loopline.v1 import trainer_pb2_grpc as pb_grpc
from services.trainer import convert
from services.trainer.jobs import JobState, JobStore
from services.trainer.runner import JobRunner


class TrainerServicer(pb_grpc.TrainerServicer):
    """SubmitJob validates the spec (INVALID_ARGUMENT with field paths) and queues it;
    WatchJob streams a snapshot, the history and live events until the job ends."""

    def __init__(self, store: JobStore, runner: JobRunner) -> None:
        self.store = store
        self.runner = runner

    async def SubmitJob(
        self, request: pb.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.Job:
        spec = convert.job_spec(request.spec)
        job, _created = self.runner.submit(
            spec.model_dump(mode="json"), request.request_id.strip() or None
        )
        return convert.job_pb(job)

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return convert.job_pb(self.store.get(request.id.strip()))

    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListJobsResponse:
        state = convert.STATE_FROM_PB.get(request.state)
        jobs, token = self.store.list(
            state=JobState(state) if state else None,
            name=request.name.strip() or None,
            page_size=request.page.page_size,
            page_token=request.page.page_token,
        )
        return pb.ListJobsResponse(jobs=[convert.job_pb(j) for j in jobs], next_page_token=token)

    async def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.Job:
        return convert.job_pb(await self.runner.cancel(request.id.strip(), request.reason))

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Any
    ) -> AsyncIterator[pb.JobEvent]:
        self.store.get(request.id.strip())  # NOT_FOUND before the stream starts
        async for event in self.runner.watch(request.id.strip()):
            yield convert.event_pb(event)


def service_name() -> str:
    return str(pb.DESCRIPTOR.services_by_name["Trainer"].full_name)


ADMIN_METHODS = tuple(f"/{service_name()}/{m}" for m in ("SubmitJob", "CancelJob"))
