"""The gRPC contracts: OIP wire compatibility, the loopline.v1 surface, and the stale-code check."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_tools import protoc

from loopline.oip import grpc_service_pb2 as oip
from loopline.oip import grpc_service_pb2_grpc as oip_grpc
from loopline.v1 import (
    common_pb2,
    monitor_pb2,
    monitor_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

ROOT = Path(__file__).resolve().parents[2]

UNARY, BIDI, SERVER_STREAM = "unary", "bidi", "server-stream"

OIP_METHODS = {
    "ServerLive": UNARY,
    "ServerReady": UNARY,
    "ModelReady": UNARY,
    "ServerMetadata": UNARY,
    "ModelMetadata": UNARY,
    "ModelInfer": UNARY,
    "ModelStreamInfer": BIDI,
    "ModelConfig": UNARY,
    "ModelStatistics": UNARY,
    "RepositoryIndex": UNARY,
    "RepositoryModelLoad": UNARY,
    "RepositoryModelUnload": UNARY,
}

V1_SERVICES = {
    router_pb2.DESCRIPTOR.services_by_name["Router"]: {
        "Classify": UNARY,
        "ClassifyBatch": UNARY,
        "ClassifyStream": BIDI,
        "Feedback": UNARY,
        "CreateExperiment": UNARY,
        "GetExperiment": UNARY,
        "ListExperiments": UNARY,
        "UpdateExperiment": UNARY,
        "StopExperiment": UNARY,
    },
    trainer_pb2.DESCRIPTOR.services_by_name["Trainer"]: {
        "SubmitJob": UNARY,
        "GetJob": UNARY,
        "ListJobs": UNARY,
        "CancelJob": UNARY,
        "WatchJob": SERVER_STREAM,
    },
    monitor_pb2.DESCRIPTOR.services_by_name["Monitor"]: {
        "GetStats": UNARY,
        "GetDrift": UNARY,
        "GetExperimentReport": UNARY,
        "ListAlerts": UNARY,
        "WatchAlerts": SERVER_STREAM,
        "TriggerRetraining": UNARY,
    },
}


def _kind(method: MethodDescriptor) -> str:
    if method.client_streaming and method.server_streaming:
        return BIDI
    if method.server_streaming:
        return SERVER_STREAM
    assert not method.client_streaming, f"{method.full_name}: client streaming is not used"
    return UNARY


def _methods(service: ServiceDescriptor) -> dict[str, str]:
    return {m.name: _kind(m) for m in service.methods}


# --- Open Inference Protocol --------------------------------------------------------------------


def test_oip_service_keeps_the_inference_package_and_methods() -> None:
    service = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert oip.DESCRIPTOR.package == "inference"
    assert service.full_name == "inference.GRPCInferenceService"
    assert _methods(service) == OIP_METHODS
    infer = service.methods_by_name["ModelInfer"]
    assert infer.input_type.full_name == "inference.ModelInferRequest"
    assert infer.output_type.full_name == "inference.ModelInferResponse"
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.output_type.full_name == "inference.ModelStreamInferResponse"


# (message, field, number) as published in the KServe V2 / Triton grpc_service.proto.
OIP_FIELD_NUMBERS: list[tuple[type[Message], str, int]] = [
    (oip.InferParameter, "bool_param", 1),
    (oip.InferParameter, "int64_param", 2),
    (oip.InferParameter, "string_param", 3),
    (oip.InferParameter, "double_param", 4),
    (oip.InferParameter, "uint64_param", 5),
    (oip.InferTensorContents, "bool_contents", 1),
    (oip.InferTensorContents, "int_contents", 2),
    (oip.InferTensorContents, "int64_contents", 3),
    (oip.InferTensorContents, "uint_contents", 4),
    (oip.InferTensorContents, "uint64_contents", 5),
    (oip.InferTensorContents, "fp32_contents", 6),
    (oip.InferTensorContents, "fp64_contents", 7),
    (oip.InferTensorContents, "bytes_contents", 8),
    (oip.ModelInferRequest, "model_name", 1),
    (oip.ModelInferRequest, "model_version", 2),
    (oip.ModelInferRequest, "id", 3),
    (oip.ModelInferRequest, "parameters", 4),
    (oip.ModelInferRequest, "inputs", 5),
    (oip.ModelInferRequest, "outputs", 6),
    (oip.ModelInferRequest, "raw_input_contents", 7),
    (oip.ModelInferRequest.InferInputTensor, "name", 1),
    (oip.ModelInferRequest.InferInputTensor, "datatype", 2),
    (oip.ModelInferRequest.InferInputTensor, "shape", 3),
    (oip.ModelInferRequest.InferInputTensor, "parameters", 4),
    (oip.ModelInferRequest.InferInputTensor, "contents", 5),
    (oip.ModelInferRequest.InferRequestedOutputTensor, "name", 1),
    (oip.ModelInferRequest.InferRequestedOutputTensor, "parameters", 2),
    (oip.ModelInferResponse, "outputs", 5),
    (oip.ModelInferResponse, "raw_output_contents", 6),
    (oip.ModelInferResponse.InferOutputTensor, "contents", 5),
    (oip.ModelStreamInferResponse, "error_message", 1),
    (oip.ModelStreamInferResponse, "infer_response", 2),
    (oip.ModelMetadataResponse, "platform", 3),
    (oip.ModelMetadataResponse, "inputs", 4),
    (oip.ModelMetadataResponse, "outputs", 5),
    (oip.ModelMetadataResponse.TensorMetadata, "shape", 3),
    (oip.ServerMetadataResponse, "extensions", 3),
    (oip.ModelConfigResponse, "config", 1),
    (oip.ModelConfig, "max_batch_size", 4),
    (oip.ModelConfig, "input", 5),
    (oip.ModelConfig, "output", 6),
    (oip.ModelConfig, "dynamic_batching", 11),
    (oip.ModelConfig, "backend", 17),
    (oip.ModelStatistics, "inference_stats", 6),
    (oip.InferStatistics, "compute_infer", 5),
    (oip.RepositoryIndexResponse.ModelIndex, "reason", 4),
    (oip.RepositoryModelLoadRequest, "model_name", 2),
    (oip.RepositoryModelLoadRequest, "parameters", 3),
    (oip.ModelRepositoryParameter, "bytes_param", 4),
]


@pytest.mark.parametrize(
    ("message", "field", "number"),
    OIP_FIELD_NUMBERS,
    ids=[f"{m.DESCRIPTOR.name}.{f}" for m, f, _ in OIP_FIELD_NUMBERS],
)
def test_oip_field_numbers_match_the_published_spec(
    message: type[Message], field: str, number: int
) -> None:
    assert message.DESCRIPTOR.fields_by_name[field].number == number


def test_oip_parameter_is_a_oneof() -> None:
    oneof = oip.InferParameter.DESCRIPTOR.oneofs_by_name["parameter_choice"]
    assert [f.name for f in oneof.fields] == [
        "bool_param",
        "int64_param",
        "string_param",
        "double_param",
        "uint64_param",
    ]
    param = oip.InferParameter(int64_param=7)
    param.string_param = "x"
    assert param.WhichOneof("parameter_choice") == "string_param"


def _encode_bytes_tensor(items: list[bytes]) -> bytes:
    """The OIP raw encoding of a BYTES tensor: each element as uint32 LE length + data."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _decode_bytes_tensor(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        (size,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return items


def test_model_infer_request_with_bytes_tensor_round_trips() -> None:
    texts = ["a great film", "", "pas terrible du tout — 😐"]
    encoded = [t.encode() for t in texts]
    request = oip.ModelInferRequest(
        model_name="sentiment",
        model_version="3",
        id="req-1",
        parameters={"priority": oip.InferParameter(int64_param=1)},
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="text", datatype="BYTES", shape=[len(texts), 1]
            )
        ],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
        raw_input_contents=[_encode_bytes_tensor(encoded)],
    )

    parsed = oip.ModelInferRequest.FromString(request.SerializeToString())

    assert parsed == request
    assert parsed.inputs[0].datatype == "BYTES"
    assert list(parsed.inputs[0].shape) == [3, 1]
    assert parsed.parameters["priority"].int64_param == 1
    assert [b.decode() for b in _decode_bytes_tensor(parsed.raw_input_contents[0])] == texts

    contents = oip.InferTensorContents(bytes_contents=encoded)
    typed = oip.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[3], contents=contents
    )
    again = oip.ModelInferRequest.InferInputTensor.FromString(typed.SerializeToString())
    assert list(again.contents.bytes_contents) == encoded


def test_oip_decodes_hand_encoded_wire_bytes() -> None:
    # Built by hand from the spec's field numbers, independent of our descriptors:
    # model_name (1, len) = "m"; raw_input_contents (7, len) = b"xy".
    request = oip.ModelInferRequest.FromString(b"\x0a\x01m" + b"\x3a\x02xy")
    assert request.model_name == "m"
    assert list(request.raw_input_contents) == [b"xy"]
    # raw_output_contents (6, len) = b"z"; id (3, len) = "r".
    response = oip.ModelInferResponse.FromString(b"\x32\x01z" + b"\x1a\x01r")
    assert list(response.raw_output_contents) == [b"z"]
    assert response.id == "r"


def test_oip_servicer_and_stub_are_generated() -> None:
    for name in OIP_METHODS:
        assert hasattr(oip_grpc.GRPCInferenceServiceServicer, name)
    assert callable(oip_grpc.add_GRPCInferenceServiceServicer_to_server)


# --- loopline.v1 --------------------------------------------------------------------------------


@pytest.mark.parametrize("service", list(V1_SERVICES), ids=lambda s: s.full_name)
def test_v1_services_expose_the_documented_methods(service: ServiceDescriptor) -> None:
    assert service.full_name.startswith("loopline.v1.")
    assert _methods(service) == V1_SERVICES[service]


def test_v1_servicers_and_stubs_are_generated() -> None:
    modules = {"Router": router_pb2_grpc, "Trainer": trainer_pb2_grpc, "Monitor": monitor_pb2_grpc}
    for service, methods in V1_SERVICES.items():
        module = modules[service.name]
        servicer = getattr(module, f"{service.name}Servicer")
        assert all(hasattr(servicer, name) for name in methods)
        assert hasattr(module, f"{service.name}Stub")
        assert callable(getattr(module, f"add_{service.name}Servicer_to_server"))


def test_v1_messages_share_common_types() -> None:
    model_ref = common_pb2.ModelRef.DESCRIPTOR
    uses = [
        router_pb2.ClassifyRequest.DESCRIPTOR.fields_by_name["model"],
        router_pb2.ClassifyResponse.DESCRIPTOR.fields_by_name["model"],
        trainer_pb2.Job.DESCRIPTOR.fields_by_name["model"],
        monitor_pb2.GetStatsRequest.DESCRIPTOR.fields_by_name["model"],
        monitor_pb2.Alert.DESCRIPTOR.fields_by_name["model"],
    ]
    assert all(field.message_type is model_ref for field in uses)
    retrain_spec = monitor_pb2.TriggerRetrainingRequest.DESCRIPTOR.fields_by_name["spec"]
    assert retrain_spec.message_type is trainer_pb2.JobSpec.DESCRIPTOR


def test_v1_times_use_well_known_types() -> None:
    timestamp, duration = "google.protobuf.Timestamp", "google.protobuf.Duration"
    time_fields: list[tuple[type[Message], str, str]] = [
        (common_pb2.Experiment, "start_time", timestamp),
        (common_pb2.TimeWindow, "last", duration),
        (router_pb2.Timings, "total", duration),
        (trainer_pb2.JobEvent, "time", timestamp),
        (monitor_pb2.LatencyStats, "p99", duration),
        (monitor_pb2.Alert, "time", timestamp),
    ]
    for message, name, type_name in time_fields:
        field = message.DESCRIPTOR.fields_by_name[name]
        assert field.message_type is not None
        assert field.message_type.full_name == type_name, f"{message.DESCRIPTOR.name}.{name}"


def test_job_states_cover_the_pipeline_in_order() -> None:
    names = [v.name.removeprefix("JOB_STATE_") for v in trainer_pb2.JobState.DESCRIPTOR.values]
    assert names == [
        "UNSPECIFIED",
        "QUEUED",
        "VALIDATING",
        "TRAINING",
        "EXPORTING",
        "EVALUATING",
        "REGISTERING",
        "SUCCEEDED",
        "FAILED",
        "CANCELLED",
        "INTERRUPTED",
    ]


def test_classify_stream_item_carries_its_own_status() -> None:
    item = router_pb2.ClassifyStreamResponse(
        request_id="r-9", status=common_pb2.Status(code=3, message="text is empty")
    )
    parsed = router_pb2.ClassifyStreamResponse.FromString(item.SerializeToString())
    assert parsed.request_id == "r-9"
    assert parsed.status.code == 3
    assert not parsed.HasField("result")


def _v1_descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path / "v1.pb"
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in ROOT.glob("protos/loopline/v1/*"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", "--include_source_info"]
    assert protoc.main([*args, f"--descriptor_set_out={out}", *protos]) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_v1_public_api_is_documented_everywhere(tmp_path: Path) -> None:
    """Every service, method, message, field, enum and enum value carries a comment."""
    undocumented = []
    for file in _v1_descriptor_set(tmp_path).file:
        documented = {
            tuple(loc.path)
            for loc in file.source_code_info.location
            if loc.leading_comments.strip() or loc.trailing_comments.strip()
        }
        undocumented += [
            f"{file.name}: {name}" for path, name in _elements(file) if path not in documented
        ]
    assert undocumented == []


def _elements(file: descriptor_pb2.FileDescriptorProto) -> list[tuple[tuple[int, ...], str]]:
    """(source path, name) of every documentable element, per descriptor.proto's field numbers."""
    found: list[tuple[tuple[int, ...], str]] = []

    def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto) -> None:
        found.append((path, e.name))
        found.extend(((*path, 2, i), f"{e.name}.{v.name}") for i, v in enumerate(e.value))

    def message(path: tuple[int, ...], m: descriptor_pb2.DescriptorProto) -> None:
        if m.options.map_entry:
            return
        found.append((path, m.name))
        found.extend(((*path, 2, i), f"{m.name}.{f.name}") for i, f in enumerate(m.field))
        for i, nested in enumerate(m.nested_type):
            message((*path, 3, i), nested)
        for i, e in enumerate(m.enum_type):
            enum((*path, 4, i), e)

    for i, m in enumerate(file.message_type):
        message((4, i), m)
    for i, e in enumerate(file.enum_type):
        enum((5, i), e)
    for i, s in enumerate(file.service):
        found.append(((6, i), s.name))
        found.extend(((6, i, 2, j), f"{s.name}.{m.name}") for j, m in enumerate(s.method))
    return found


# --- generation policy --------------------------------------------------------------------------


def _run_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(root / "scripts" / "protos.sh"), "--check"],
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_committed_generated_code_is_up_to_date() -> None:
    result = _run_check(ROOT)
    assert result.returncode == 0, result.stderr


def test_check_names_stale_files_and_the_fix(tmp_path: Path) -> None:
    for part in ("protos", "scripts", "loopline/v1", "loopline/oip"):
        shutil.copytree(ROOT / part, tmp_path / part)
    (tmp_path / "loopline/v1/router_pb2.py").write_text("# edited by hand\n")
    (tmp_path / "loopline/v1/old_pb2.py").write_text("# left over from a deleted proto\n")

    result = _run_check(tmp_path)

    assert result.returncode == 1
    assert "loopline/v1/router_pb2.py (differs)" in result.stderr
    assert "loopline/v1/old_pb2.py (no longer generated" in result.stderr
    assert "make protos" in result.stderr
