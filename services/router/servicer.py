"""The thin gRPC adapter of `loopline.v1.Router`: convert, call the domain, convert back.

Errors are `loopline.errors` exceptions, turned into statuses by the shared interceptor; only
ClassifyStream answers per item (a bad item gets its own status and the stream goes on).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc

from loopline import prototime, streams
from loopline.errors import STATUS_BY_KIND, LooplineError
from loopline.logging import get_logger
from loopline.v1 import common_pb2 as common
from loopline.v1 import router_pb2 as pb
from loopline.v1 import router_pb2_grpc as pb_grpc
from services.router import convert
from services.router.domain import CHAMPION
from services.router.experiments import Experiments
from services.router.feedback import FeedbackLog
from services.router.handlers import Router

log = get_logger(__name__)


class RouterServicer(pb_grpc.RouterServicer):
    """`loopline.v1.Router` over a transport-free `Router`, `Experiments` and `FeedbackLog`."""

    def __init__(
        self,
        router: Router,
        experiments: Experiments,
        feedback: FeedbackLog,
        *,
        default_timeout: float,
        stream_window: int,
    ) -> None:
        self.router = router
        self.experiments = experiments
        self.feedback = feedback
        self.default_timeout = default_timeout
        self.stream_window = stream_window

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        seconds = self.default_timeout if remaining is None else remaining
        return time.monotonic() + seconds

    # ----- classification -----

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        answer = await self.router.classify(convert.classify_call(request), self._deadline(context))
        return convert.classify_response(answer)

    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        calls = [convert.classify_call(item) for item in request.requests]
        answers = await self.router.classify_many(calls, self._deadline(context))
        return pb.ClassifyBatchResponse(results=[convert.classify_response(a) for a in answers])

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: Any
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """Items run concurrently (the worker batches them), at most `stream_window` of them
        until their answers are written (`loopline.streams`); a bad item gets its own status and
        the stream goes on."""

        def answer(request: pb.ClassifyRequest) -> Awaitable[pb.ClassifyStreamResponse]:
            return self._answer_item(request, context)

        async for item in streams.answered(request_iterator, answer, self.stream_window):
            yield item

    async def _answer_item(
        self, request: pb.ClassifyRequest, context: Any
    ) -> pb.ClassifyStreamResponse:
        call = None
        try:
            call = convert.classify_call(request)  # a version and an alias together: refused
            answer = await self.router.classify(call, self._deadline(context))
        except Exception as err:
            # The id the router generated when the caller sent none, once it got that far.
            request_id = call.request_id if call is not None else request.request_id
            if isinstance(err, LooplineError):
                status = common.Status(code=STATUS_BY_KIND[err.kind].value[0], message=err.message)
            else:
                log.exception("stream item failed", extra={"request_id": request_id})
                status = common.Status(
                    code=grpc.StatusCode.INTERNAL.value[0], message="internal error; see router log"
                )
            return pb.ClassifyStreamResponse(request_id=request_id, status=status)
        return pb.ClassifyStreamResponse(
            request_id=answer.request_id,
            status=common.Status(code=0),
            result=convert.classify_response(answer),
        )

    # ----- feedback -----

    async def Feedback(
        self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.FeedbackResponse:
        observed = prototime.optional_seconds(request, "time", "time")
        feedback_id = await self.feedback.append(
            request.request_id.strip(),
            request.label.strip(),
            user_id=request.user_id,
            source=request.source,
            metadata=dict(request.metadata),
            observed_at=observed,
        )
        return pb.FeedbackResponse(feedback_id=feedback_id)

    # ----- experiments (admin; the auth interceptor guards them) -----

    async def CreateExperiment(
        self, request: pb.CreateExperimentRequest, context: grpc.aio.ServicerContext
    ) -> common.Experiment:
        created = await self.experiments.create(convert.experiment_draft(request.experiment))
        return convert.experiment_pb(created)

    async def GetExperiment(
        self, request: pb.GetExperimentRequest, context: grpc.aio.ServicerContext
    ) -> common.Experiment:
        return convert.experiment_pb(await self.experiments.get(request.id.strip()))

    async def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListExperimentsResponse:
        items, token = await self.experiments.list(
            model=request.model.strip() or None,
            status=convert.status_of(request.status),
            page_size=request.page.page_size,
            page_token=request.page.page_token,
        )
        return pb.ListExperimentsResponse(
            experiments=convert.experiments_pb(items), next_page_token=token
        )

    async def UpdateExperiment(
        self, request: pb.UpdateExperimentRequest, context: grpc.aio.ServicerContext
    ) -> common.Experiment:
        updated = await self.experiments.update(
            request.id.strip(),
            weights=dict(request.weights) or None,
            status=convert.status_of(request.status),
            end_time=prototime.optional_seconds(request, "end_time", "end_time"),
            description=request.description or None,
        )
        return convert.experiment_pb(updated)

    async def StopExperiment(
        self, request: pb.StopExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopExperimentResponse:
        stopped, promoted = await self.experiments.stop(
            request.id.strip(),
            winner=request.winner.strip(),
            alias=request.alias.strip() or CHAMPION,
            reason=request.reason,
        )
        response = pb.StopExperimentResponse(experiment=convert.experiment_pb(stopped))
        if promoted is not None:
            response.promoted.CopyFrom(convert.model_ref_pb(promoted))
        return response


def service_name() -> str:
    return str(pb.DESCRIPTOR.services_by_name["Router"].full_name)


ADMIN_METHODS = tuple(
    f"/{service_name()}/{method}"
    for method in (
        "CreateExperiment",
        "UpdateExperiment",
        "StopExperiment",
    )
)
CLASSIFY_METHODS = tuple(
    f"/{service_name()}/{method}"
    for method in ("Classify", "ClassifyBatch", "ClassifyStream", "Feedback")
)
