"""The transport-free data plane: what ModelInfer and the metadata calls do, without protobuf.

The servicer converts at the edge (convert.py) and calls these; tests can drive them directly.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loopline.errors import InvalidInput, LooplineError, NotReady
from loopline.runtime import Tokens
from services.inference.batching import Result
from services.inference.models import ModelRepository, ServedModel

TEXT_INPUT = "text"
PROBABILITIES_OUTPUT = "probabilities"
LABEL_OUTPUT = "label"
TRUNCATED_OUTPUT = "truncated"


@dataclass
class InferRequest:
    """One ModelInfer call in domain terms."""

    model: str
    version: str
    texts: list[str]
    request_id: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    deadline: float | None = None  # time.monotonic() deadline


@dataclass
class InferResponse:
    """Answers in request order, plus where they came from."""

    model: str
    version: str
    request_id: str
    labels: list[str]  # the model's label order (columns of probabilities)
    probabilities: np.ndarray  # [N, C] float32
    predicted: list[str]
    truncated: list[bool]
    queue_seconds: float
    compute_seconds: float


RecordSink = Callable[[ServedModel, InferRequest, Sequence[Tokens], Sequence[Result]], None]
FailureSink = Callable[[ServedModel, InferRequest, LooplineError], None]
AnswerSink = Callable[[str, float], None]  # (model name, seconds from arrival to answer)


class DataPlane:
    """Validates, tokenizes off the event loop, queues every text, gathers the answers."""

    def __init__(
        self,
        repository: ModelRepository,
        max_text_chars: int,
        executor: Executor | None = None,
        record: RecordSink | None = None,
        inline_tokenize_chars: int = 0,
        on_answer: AnswerSink | None = None,
        on_failure: FailureSink | None = None,
    ) -> None:
        self.repository = repository
        self.on_failure = on_failure
        self.on_answer = on_answer
        self.max_text_chars = max_text_chars
        self.executor = executor
        self.record = record
        self.inline_tokenize_chars = inline_tokenize_chars

    def validate(self, texts: Sequence[str]) -> None:
        """Empty or over-long texts are refused, naming the input and the element."""
        if not texts:
            raise InvalidInput(f"input '{TEXT_INPUT}' holds no texts", input=TEXT_INPUT)
        for index, text in enumerate(texts):
            if not text.strip():
                raise InvalidInput(
                    f"input '{TEXT_INPUT}' element {index} is empty", input=TEXT_INPUT, index=index
                )
            if len(text) > self.max_text_chars:
                raise InvalidInput(
                    f"input '{TEXT_INPUT}' element {index} has {len(text)} characters; the limit "
                    f"is {self.max_text_chars} (LOOPLINE_INFERENCE_MAX_TEXT_CHARS)",
                    input=TEXT_INPUT,
                    index=index,
                    chars=len(text),
                )

    async def infer(self, request: InferRequest) -> InferResponse:
        """Answer every text, or fail the request as a whole with one clear error."""
        started = time.monotonic()
        self.validate(request.texts)
        request.request_id = (
            request.request_id or request.parameters.get("request_id") or str(uuid.uuid4())
        )
        model = self.repository.resolve(request.model, request.version)
        tokens = await self._tokenize(model, request.texts)
        try:
            try:
                results = await self._run(model, tokens, request.deadline)
            except NotReady:
                # The version began draining after we resolved it (an alias just moved): the
                # new version is already installed, so resolve again once.
                model = self.repository.resolve(request.model, request.version)
                results = await self._run(model, tokens, request.deadline)
        except LooplineError as err:
            # Accepted and not answered (a caller that went away raises CancelledError instead).
            if self.on_failure is not None:
                self.on_failure(model, request, err)
            raise
        if self.record is not None:
            self.record(model, request, tokens, results)
        response = _response(model, request, tokens, results)
        if self.on_answer is not None:
            self.on_answer(model.name, time.monotonic() - started)
        return response

    async def _tokenize(self, model: ServedModel, texts: list[str]) -> list[Tokens]:
        """Small requests on the event loop (~0.1 ms, less than a hop to a thread and back);
        larger ones in the executor, where the Rust tokenizer runs without the GIL."""
        if sum(len(text) for text in texts) <= self.inline_tokenize_chars:
            return model.tokenizer.tokenize(texts)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, model.tokenizer.tokenize, texts)

    async def _run(
        self, model: ServedModel, tokens: Sequence[Tokens], deadline: float | None
    ) -> list[Result]:
        futures: list[asyncio.Future[Result]] = []
        try:
            alone = len(tokens) == 1
            for item in tokens:
                futures.append(model.batcher.submit(item.ids, deadline, alone=alone))
            return list(await asyncio.gather(*futures))
        except BaseException:
            # One failure fails the request: the other texts need not be computed.
            for future in futures:
                future.cancel()
            raise

    def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        model = self.repository.resolve(name, version)
        versions = sorted(m.version for m in self.repository.served() if m.name == name)
        labels = model.manifest.labels
        return {
            "name": name,
            "versions": versions,
            "platform": f"onnxruntime_{model.engine.variant}",
            "inputs": [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, len(labels)]},
                {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
                {"name": TRUNCATED_OUTPUT, "datatype": "BOOL", "shape": [-1]},
            ],
            "labels": labels,
            "max_length": model.manifest.max_length,
        }


def _response(
    model: ServedModel, request: InferRequest, tokens: Sequence[Tokens], results: Sequence[Result]
) -> InferResponse:
    labels = model.manifest.labels
    probabilities = np.stack([r.probabilities for r in results]).astype(np.float32, copy=False)
    return InferResponse(
        model=model.name,
        version=model.version,
        request_id=request.request_id,
        labels=labels,
        probabilities=probabilities,
        predicted=[labels[i] for i in probabilities.argmax(axis=1)],
        truncated=[t.truncated for t in tokens],
        queue_seconds=max(r.queue_seconds for r in results),
        compute_seconds=max(r.compute_seconds for r in results),
    )


def deadline_from(time_remaining: float | None) -> float | None:
    """A monotonic deadline from gRPC's `context.time_remaining()` (None = no deadline)."""
    return None if time_remaining is None else time.monotonic() + time_remaining
