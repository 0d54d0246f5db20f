"""`inference.GRPCInferenceService`: a thin adapter from protobuf to the data plane.

Errors are raised as LooplineError and turned into status codes by the shared interceptor.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from loopline import streams
from loopline.errors import LooplineError, NotFound, Unauthenticated
from loopline.logging import get_logger
from loopline.oip import grpc_service_pb2 as pb
from loopline.oip import grpc_service_pb2_grpc as pb_grpc
from services.inference import convert
from services.inference.handlers import DataPlane, deadline_from
from services.inference.models import ModelSource, ModelState

log = get_logger(__name__)

SERVER_NAME = "loopline-inference"
EXTENSIONS = ["model_repository", "parameters", "statistics"]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol over one worker's models."""

    def __init__(
        self,
        plane: DataPlane,
        version: str,
        max_batch_size: int,
        is_ready: Callable[[], bool],
        admin_token: str | None = None,
        stream_window: int = 256,
    ) -> None:
        self.stream_window = stream_window  # checked by loopline.streams
        self.plane = plane
        self.repository = plane.repository
        self.version = version
        self.max_batch_size = max_batch_size
        self.is_ready = is_ready
        self.admin_token = admin_token

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        try:
            model = self.repository.resolve(request.name, request.version)
        except LooplineError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=model.state is ModelState.READY)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self.version, extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        meta = self.plane.model_metadata(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        outputs = convert.requested_outputs(request)
        domain = convert.infer_request(request, deadline_from(context.time_remaining()))
        answer = await self.plane.infer(domain)
        return convert.infer_response(request, answer, outputs)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's streaming extension: the requests of one stream run concurrently, at most
        `stream_window` at a time, so the batcher batches them as it batches separate calls
        (`loopline.streams`).

        Answers go out in completion order, each carrying its request's `id` (and `model_name`
        and `model_version`), as Triton's do. A bad request gets an `error_message` answer with
        its id and the stream goes on.
        """
        async for answer in streams.answered(requests, self._stream_answer, self.stream_window):
            yield answer

    async def _stream_answer(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        try:
            outputs = convert.requested_outputs(request)
            answer = await self.plane.infer(convert.infer_request(request, None))
        except LooplineError as err:
            return _stream_error(request, err.message)
        except Exception:
            log.exception("stream request failed", extra={"request_id": request.id})
            return _stream_error(request, "internal error; the worker log has details")
        return pb.ModelStreamInferResponse(
            infer_response=convert.infer_response(request, answer, outputs)
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any
    ) -> pb.ModelConfigResponse:
        meta = self.plane.model_metadata(request.name, request.version)
        config = pb.ModelConfig(
            name=meta["name"],
            platform=meta["platform"],
            max_batch_size=self.max_batch_size,
            backend="onnxruntime",
        )
        config.input.append(pb.ModelInput(name="text", data_type=pb.TYPE_STRING, dims=[-1]))
        config.output.append(
            pb.ModelOutput(name="probabilities", data_type=pb.TYPE_FP32, dims=[len(meta["labels"])])
        )
        config.output.append(pb.ModelOutput(name="label", data_type=pb.TYPE_STRING, dims=[1]))
        config.output.append(pb.ModelOutput(name="truncated", data_type=pb.TYPE_BOOL, dims=[1]))
        config.parameters["labels"].string_value = json.dumps(meta["labels"])
        config.parameters["max_sequence_length"].string_value = str(meta["max_length"])
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        for model in self.repository.served():
            if request.name and model.name != request.name:
                continue
            if request.version and model.version != request.version:
                continue
            response.model_stats.append(pb.ModelStatistics(name=model.name, version=model.version))
        if request.name and not response.model_stats:
            raise NotFound("model", request.name)
        return response

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        response = pb.RepositoryIndexResponse()
        for model in self.repository.served():
            response.models.append(
                index(
                    name=model.name,
                    version=model.version,
                    state=model.state.value.upper(),
                    reason=",".join(sorted(model.aliases)),
                )
            )
        if not request.ready:
            for name, version in self.repository.loading():
                response.models.append(index(name=name, version=version, state="LOADING"))
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        """Load `parameters["source"]` (models:/NAME@ALIAS, models:/NAME/VERSION or a folder);
        without it, `model_name` itself is the source."""
        self._authorize(context)
        source = (
            request.parameters["source"].string_param
            if "source" in request.parameters
            else request.model_name
        )
        await self.repository.add(ModelSource.parse(source))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._authorize(context)
        version = (
            request.parameters["version"].string_param if "version" in request.parameters else None
        )
        await self.repository.unload(request.model_name, version)
        return pb.RepositoryModelUnloadResponse()

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.admin_token:
            return
        metadata = dict(context.invocation_metadata() or ())
        given = str(metadata.get("authorization", "")).removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.admin_token.encode()):
            raise Unauthenticated()


def service_name() -> str:
    return str(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """An in-stream error that names the request it answers."""
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )
