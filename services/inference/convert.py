"""Open Inference Protocol protobuf <-> the data plane's domain types.

BYTES tensors travel either as `contents.bytes_contents` or in `raw_input_contents`, where each
element is a 4-byte little-endian length followed by the bytes (the KServe V2 / Triton wire
format). Both are accepted; answers always use `raw_output_contents`, as Triton does.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence

import numpy as np

from loopline.errors import InvalidInput
from loopline.oip import grpc_service_pb2 as pb
from services.inference.handlers import (
    LABEL_OUTPUT,
    PROBABILITIES_OUTPUT,
    TEXT_INPUT,
    TRUNCATED_OUTPUT,
    InferRequest,
    InferResponse,
)

OUTPUTS = (PROBABILITIES_OUTPUT, LABEL_OUTPUT, TRUNCATED_OUTPUT)
_LENGTH = struct.Struct("<I")


def parameter_value(param: pb.InferParameter) -> str:
    """Any InferParameter as a string (records store strings)."""
    kind = param.WhichOneof("parameter_choice")
    return "" if kind is None else str(getattr(param, kind))


def decode_bytes_tensor(raw: bytes, name: str) -> list[bytes]:
    """Split a raw BYTES tensor into its elements; a malformed buffer names the input."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(
                f"input '{name}': truncated length prefix in raw BYTES contents", input=name
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(
                f"input '{name}': element length {length} runs past the end of raw BYTES contents",
                input=name,
            )
        out.append(raw[offset : offset + length])
        offset += length
    return out


def encode_bytes_tensor(items: Iterable[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def _text_input(request: pb.ModelInferRequest) -> tuple[int, pb.ModelInferRequest.InferInputTensor]:
    names = [tensor.name for tensor in request.inputs]
    if TEXT_INPUT not in names:
        raise InvalidInput(
            f"missing input '{TEXT_INPUT}' (got: {', '.join(names) or 'none'}); "
            f"send texts as a BYTES tensor named '{TEXT_INPUT}'",
            input=TEXT_INPUT,
        )
    index = names.index(TEXT_INPUT)
    tensor = request.inputs[index]
    if tensor.datatype != "BYTES":
        raise InvalidInput(
            f"input '{TEXT_INPUT}' must have datatype BYTES, got '{tensor.datatype}'",
            input=TEXT_INPUT,
        )
    shape = list(tensor.shape)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or min(shape) < 0:
        raise InvalidInput(
            f"input '{TEXT_INPUT}' must have shape [N] or [N, 1], got {shape}", input=TEXT_INPUT
        )
    return index, tensor


def texts_of(request: pb.ModelInferRequest) -> list[str]:
    """The UTF-8 texts of the `text` input, checked against its declared shape."""
    index, tensor = _text_input(request)
    if request.raw_input_contents:
        if index >= len(request.raw_input_contents):
            raise InvalidInput(f"input '{TEXT_INPUT}' has no raw contents", input=TEXT_INPUT)
        items = decode_bytes_tensor(request.raw_input_contents[index], TEXT_INPUT)
    else:
        items = list(tensor.contents.bytes_contents)
    expected = math.prod(tensor.shape)
    if len(items) != expected:
        raise InvalidInput(
            f"input '{TEXT_INPUT}' declares shape {list(tensor.shape)} "
            f"({expected} texts) but carries {len(items)}",
            input=TEXT_INPUT,
        )
    texts = []
    for position, item in enumerate(items):
        try:
            texts.append(item.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(
                f"input '{TEXT_INPUT}' element {position} is not valid UTF-8",
                input=TEXT_INPUT,
                index=position,
            ) from None
    return texts


def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    """The outputs to send: those asked for, or all of them."""
    asked = [output.name for output in request.outputs]
    unknown = [name for name in asked if name not in OUTPUTS]
    if unknown:
        raise InvalidInput(
            f"unknown output(s) {', '.join(unknown)}; this model offers {', '.join(OUTPUTS)}",
            outputs=unknown,
        )
    return asked or list(OUTPUTS)


def infer_request(request: pb.ModelInferRequest, deadline: float | None) -> InferRequest:
    params = {key: parameter_value(value) for key, value in request.parameters.items()}
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        texts=texts_of(request),
        request_id=params.get("request_id") or request.id,
        parameters=params,
        deadline=deadline,
    )


def _output(
    name: str, response: InferResponse
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    count = len(response.predicted)
    tensor = pb.ModelInferResponse.InferOutputTensor(name=name)
    if name == PROBABILITIES_OUTPUT:
        tensor.datatype, raw = "FP32", np.ascontiguousarray(response.probabilities, "<f4").tobytes()
        tensor.shape.extend([count, len(response.labels)])
        return tensor, raw
    tensor.shape.append(count)
    if name == LABEL_OUTPUT:
        tensor.datatype = "BYTES"
        return tensor, encode_bytes_tensor(label.encode() for label in response.predicted)
    tensor.datatype = "BOOL"
    return tensor, bytes(bytearray(int(t) for t in response.truncated))


def infer_response(
    request: pb.ModelInferRequest, response: InferResponse, outputs: Sequence[str]
) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(
        model_name=response.model,
        model_version=response.version,
        id=request.id or response.request_id,
    )
    for name in outputs:
        tensor, raw = _output(name, response)
        message.outputs.append(tensor)
        message.raw_output_contents.append(raw)
    message.parameters["request_id"].string_param = response.request_id
    message.parameters["truncated"].bool_param = any(response.truncated)
    message.parameters["queue_ns"].int64_param = int(response.queue_seconds * 1e9)
    message.parameters["compute_ns"].int64_param = int(response.compute_seconds * 1e9)
    return message
