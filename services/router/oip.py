"""Client side of the Open Inference Protocol: router texts -> ModelInferRequest -> WorkerAnswer.

The router's edge towards the workers, as `services/inference/convert.py` is the workers' edge:
only this module and the balancer (which owns the channels) touch `*_pb2`. Texts travel as one
BYTES tensor named `text` in `raw_input_contents` (each element a 4-byte little-endian length,
then the UTF-8 bytes: the KServe V2 / Triton wire format). Answers are read from
`raw_output_contents` or, for servers that use them, the typed `contents` fields.

Label order (the columns of `probabilities`) is not in OIP's ModelMetadata; our workers publish
it as the JSON `labels` parameter of ModelConfig. For a server without it (a Triton model whose
labels sit in a `label_filename`), the columns are named by their index.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from loopline.errors import InternalError
from loopline.oip import grpc_service_pb2 as pb

__all__ = [
    "LABEL_OUTPUT",
    "PROBABILITIES_OUTPUT",
    "TEXT_INPUT",
    "TRUNCATED_OUTPUT",
    "ParamValue",
    "WorkerAnswer",
    "build_request",
    "decode_bytes",
    "decode_response",
    "encode_bytes",
    "labels_from_config",
    "param_value",
]

TEXT_INPUT = "text"
PROBABILITIES_OUTPUT = "probabilities"
LABEL_OUTPUT = "label"
TRUNCATED_OUTPUT = "truncated"

ParamValue = str | bool | int | float
_LENGTH = struct.Struct("<I")


@dataclass
class WorkerAnswer:
    """A worker's answer to N texts, free of protobuf.

    `labels` are the predicted labels per text; `columns` names the columns of
    `probabilities` (the model's label order); `endpoint` is the worker that answered.
    """

    model: str
    version: str
    probabilities: np.ndarray  # [N, C] float32
    labels: list[str]
    truncated: list[bool]
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    columns: tuple[str, ...] = ()
    endpoint: str = ""

    @property
    def queue_seconds(self) -> float:
        """Time the texts waited in the worker's queue (0 when the server does not say)."""
        return _nanoseconds(self.parameters.get("queue_ns")) / 1e9

    @property
    def compute_seconds(self) -> float:
        """Time the worker's engine spent on the batch (0 when the server does not say)."""
        return _nanoseconds(self.parameters.get("compute_ns")) / 1e9


def _nanoseconds(value: ParamValue | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)


def encode_bytes(items: Iterable[bytes]) -> bytes:
    """A raw BYTES tensor: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def decode_bytes(raw: bytes) -> list[bytes]:
    """Split a raw BYTES tensor into its elements; a malformed buffer is the worker's fault."""
    out: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InternalError("a worker sent a BYTES tensor with a truncated length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4 + length
        if offset > len(raw):
            raise InternalError("a worker sent a BYTES tensor whose element runs past its end")
        out.append(raw[offset - length : offset])
    return out


def build_request(
    model: str,
    version: str,
    texts: Sequence[str],
    parameters: Mapping[str, ParamValue] | None = None,
    request_id: str = "",
) -> pb.ModelInferRequest:
    """A ModelInfer request for `texts`; `parameters` travel as InferParameters (strings as
    `string_param`: request_id, experiment, variant, user_bucket, language, shadow, ...)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    request.inputs.add(name=TEXT_INPUT, datatype="BYTES", shape=[len(texts)])
    request.raw_input_contents.append(encode_bytes(text.encode("utf-8") for text in texts))
    for key, value in (parameters or {}).items():
        _set_param(request.parameters[key], value)
    return request


def _set_param(param: pb.InferParameter, value: ParamValue) -> None:
    # bool before int: bool is an int subclass, and a flag must stay a flag on the wire.
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def param_value(param: pb.InferParameter) -> ParamValue:
    """An InferParameter's value in its own type ("" when unset)."""
    kind = param.WhichOneof("parameter_choice")
    if kind is None:
        return ""
    value: ParamValue = getattr(param, kind)
    return value


def decode_response(
    response: pb.ModelInferResponse,
    count: int,
    label_order: Sequence[str] | None = None,
    endpoint: str = "",
) -> WorkerAnswer:
    """A WorkerAnswer for `count` texts; a worker that answered another count is an error.

    Without a `label` output the predicted labels come from `label_order` (or column indices);
    without `truncated`, nothing counts as truncated.
    """
    outputs = _outputs(response)
    probabilities = _probabilities(outputs, count)
    order = tuple(label_order or (str(i) for i in range(probabilities.shape[1])))
    if len(order) != probabilities.shape[1]:
        raise InternalError(
            f"model {response.model_name}/{response.model_version} returned "
            f"{probabilities.shape[1]} probability columns but has {len(order)} labels"
        )
    return WorkerAnswer(
        model=response.model_name,
        version=response.model_version,
        probabilities=probabilities,
        labels=_predicted(outputs, probabilities, order, count),
        truncated=_truncated(outputs, count),
        parameters={key: param_value(value) for key, value in response.parameters.items()},
        columns=order,
        endpoint=endpoint,
    )


_Output = tuple[pb.ModelInferResponse.InferOutputTensor, bytes | None]


def _outputs(response: pb.ModelInferResponse) -> dict[str, _Output]:
    raw = list(response.raw_output_contents)
    return {
        tensor.name: (tensor, raw[index] if index < len(raw) else None)
        for index, tensor in enumerate(response.outputs)
    }


def _probabilities(outputs: Mapping[str, _Output], count: int) -> np.ndarray:
    if PROBABILITIES_OUTPUT not in outputs:
        raise InternalError(f"the worker's answer has no '{PROBABILITIES_OUTPUT}' output")
    tensor, raw = outputs[PROBABILITIES_OUTPUT]
    if tensor.datatype != "FP32":
        raise InternalError(f"output '{PROBABILITIES_OUTPUT}' is {tensor.datatype}, not FP32")
    if raw is not None:
        values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
    if count == 0 or values.size % count:
        raise InternalError(
            f"output '{PROBABILITIES_OUTPUT}' holds {values.size} numbers for {count} texts"
        )
    return values.reshape(count, values.size // count)


def _predicted(
    outputs: Mapping[str, _Output], probabilities: np.ndarray, order: Sequence[str], count: int
) -> list[str]:
    if LABEL_OUTPUT not in outputs:
        return [order[int(i)] for i in probabilities.argmax(axis=1)]
    tensor, raw = outputs[LABEL_OUTPUT]
    items = decode_bytes(raw) if raw is not None else list(tensor.contents.bytes_contents)
    _check_count(LABEL_OUTPUT, len(items), count)
    return [item.decode("utf-8", errors="replace") for item in items]


def _truncated(outputs: Mapping[str, _Output], count: int) -> list[bool]:
    if TRUNCATED_OUTPUT not in outputs:
        return [False] * count
    tensor, raw = outputs[TRUNCATED_OUTPUT]
    flags = [bool(b) for b in raw] if raw is not None else list(tensor.contents.bool_contents)
    _check_count(TRUNCATED_OUTPUT, len(flags), count)
    return flags


def _check_count(name: str, got: int, expected: int) -> None:
    # Ray Serve's check: an answer must never be matched to the wrong text.
    if got != expected:
        raise InternalError(f"output '{name}' holds {got} elements for {expected} texts")


def labels_from_config(response: pb.ModelConfigResponse) -> list[str] | None:
    """The label order a ModelConfigResponse publishes (our workers' `labels` parameter)."""
    parameters = response.config.parameters
    if "labels" not in parameters:
        return None
    try:
        labels = json.loads(parameters["labels"].string_value)
    except ValueError:
        return None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        return None
    return labels
