"""`InferenceServicer.ModelStreamInfer` over a fake data plane held by a gate: how many requests
of one stream are in flight, what a bad request gets, and what a cancelled stream leaves behind.
The real worker's streams are tested in tests/integration/test_inference_worker.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from loopline.errors import InvalidInput
from loopline.oip import grpc_service_pb2 as pb
from services.inference.convert import encode_bytes_tensor
from services.inference.handlers import InferRequest, InferResponse
from services.inference.servicer import InferenceServicer


class GatedPlane:
    """Answers each text with its length once `gate` opens; refuses the text "bad"."""

    repository = None

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.active = 0
        self.max_active = 0
        self.started: list[str] = []
        self.finished: list[str] = []

    async def infer(self, request: InferRequest) -> InferResponse:
        if request.texts == ["bad"]:
            raise InvalidInput("input 'text' element 0 is bad")
        self.started.append(request.request_id)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.gate.wait()
        finally:
            self.active -= 1
        self.finished.append(request.request_id)
        return InferResponse(
            model="m",
            version="1",
            request_id=request.request_id,
            labels=["short", "long"],
            probabilities=np.asarray([[0.5, 0.5]], dtype=np.float32),
            predicted=["long" if len(request.texts[0]) > 3 else "short"],
            truncated=[False],
            queue_seconds=0.0,
            compute_seconds=0.0,
        )


def _request(text: str, request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id=request_id)
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes_tensor([text.encode()]))
    return request


async def _requests(texts: list[str]) -> AsyncIterator[pb.ModelInferRequest]:
    for index, text in enumerate(texts):
        yield _request(text, f"r{index}")


def _servicer(plane: GatedPlane, window: int) -> InferenceServicer:
    return InferenceServicer(plane, "test", 8, lambda: True, stream_window=window)  # type: ignore[arg-type]


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def _open(
    plane: GatedPlane, window: int, texts: list[str]
) -> tuple[AsyncIterator[pb.ModelStreamInferResponse], asyncio.Task[pb.ModelStreamInferResponse]]:
    """A stream over `texts` and the task awaiting its first answer, once reading has settled."""
    stream = _servicer(plane, window).ModelStreamInfer(_requests(texts), None)
    first = asyncio.get_running_loop().create_task(anext(stream))
    await _settle()
    return stream, first


def test_at_most_the_window_is_in_flight_and_every_request_is_answered() -> None:
    async def scenario() -> None:
        plane = GatedPlane()
        stream, first = await _open(plane, 3, ["ab"] * 7)
        assert (plane.active, plane.started) == (3, ["r0", "r1", "r2"])  # reading stopped
        plane.gate.set()
        answers = [await first] + [answer async for answer in stream]
        assert sorted(a.infer_response.id for a in answers) == [f"r{i}" for i in range(7)]
        assert plane.max_active == 3

    asyncio.run(scenario())


def test_answers_not_yet_written_keep_their_place_in_the_window() -> None:
    """A client that sends without reading: the worker computes a window's worth, no more."""

    async def scenario() -> None:
        plane = GatedPlane()
        plane.gate.set()
        stream, first = await _open(plane, 3, ["ab"] * 7)
        assert first.done()  # one answer is out; the other two wait to be written
        assert plane.finished == ["r0", "r1", "r2"]
        answers = [first.result()] + [answer async for answer in stream]
        assert len(answers) == 7

    asyncio.run(scenario())


def test_a_bad_request_is_answered_in_stream_with_its_id() -> None:
    async def scenario() -> None:
        plane = GatedPlane()
        plane.gate.set()
        requests = _requests(["ok!", "bad", "fine"])
        stream = _servicer(plane, window=4).ModelStreamInfer(requests, None)
        answers = {a.infer_response.id: a async for a in stream}
        assert answers["r1"].error_message == "input 'text' element 0 is bad"
        assert answers["r1"].infer_response.model_name == "m"
        assert not answers["r0"].error_message
        assert not answers["r2"].error_message
        label = answers["r2"].infer_response.raw_output_contents[1]
        assert label.endswith(b"long")

    asyncio.run(scenario())


def test_a_cancelled_stream_drops_the_requests_still_waiting() -> None:
    async def scenario() -> None:
        plane = GatedPlane()
        stream, first = await _open(plane, 8, ["ab"] * 5)
        assert plane.active == 5
        first.cancel()  # grpc cancels the handler when the client goes away
        with pytest.raises(asyncio.CancelledError):
            await first
        await stream.aclose()  # type: ignore[attr-defined]
        await _settle()
        assert (plane.active, plane.finished) == (0, [])
        plane.gate.set()
        await _settle()
        assert plane.finished == []  # nothing ran after the caller left

    asyncio.run(scenario())
