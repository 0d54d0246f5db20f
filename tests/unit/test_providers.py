"""Execution provider and variant selection, with fake provider lists: no GPU needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopline.errors import FailedPrecondition, NotFound
from loopline.package import Manifest
from services.inference.engines.base import EngineKind
from services.inference.engines.onnx import (
    Execution,
    OnnxOptions,
    detect_devices,
    pin_malloc_mmap_threshold,
    select_execution,
)
from services.inference.engines.registry import ENGINES, create_engine

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"
CPU_ONLY = ["AzureExecutionProvider", CPU]  # what the onnxruntime CPU wheel reports
GPU_BUILD = [TRT, CUDA, CPU]

FP32 = {"fp32": "model.onnx"}
WITH_INT8 = FP32 | {"int8": "model.int8.onnx"}
WITH_FP16 = FP32 | {"fp16": "model.fp16.onnx"}
ALL = WITH_INT8 | WITH_FP16


def names(execution: Execution) -> list[str]:
    return execution.provider_names


def options_of(execution: Execution, provider: str) -> dict[str, object]:
    return dict(dict(execution.providers)[provider])


# --- providers -------------------------------------------------------------------------------


def test_cpu_build_skips_gpu_providers() -> None:
    chosen = select_execution(CPU_ONLY, ALL, OnnxOptions(), default_cpu_variant="int8")
    assert names(chosen) == [CPU]
    assert chosen.device == "cpu"
    assert chosen.skipped == ("tensorrt", "cuda")


def test_gpu_build_keeps_the_preference_order() -> None:
    chosen = select_execution(GPU_BUILD, ALL, OnnxOptions())
    assert names(chosen) == [TRT, CUDA, CPU]
    assert chosen.device == "gpu"
    assert chosen.skipped == ()


def test_user_order_wins() -> None:
    chosen = select_execution(GPU_BUILD, ALL, OnnxOptions(providers=("cuda", "tensorrt", "cpu")))
    assert names(chosen) == [CUDA, TRT, CPU]


def test_cuda_without_tensorrt_in_the_build() -> None:
    chosen = select_execution([CUDA, CPU], ALL, OnnxOptions())
    assert names(chosen) == [CUDA, CPU]
    assert chosen.skipped == ("tensorrt",)


def test_cpu_only_configured_on_a_gpu_host() -> None:
    chosen = select_execution(GPU_BUILD, ALL, OnnxOptions(providers=("cpu",)))
    assert names(chosen) == [CPU]
    assert chosen.device == "cpu"


def test_gpu_without_cpu_configured_still_lists_cpu_last() -> None:
    chosen = select_execution(GPU_BUILD, ALL, OnnxOptions(providers=("cuda",)))
    assert names(chosen) == [CUDA, CPU]


def test_no_configured_provider_available_fails_naming_both_lists() -> None:
    with pytest.raises(FailedPrecondition, match=r"cuda.*available: .*CPUExecutionProvider"):
        select_execution(CPU_ONLY, ALL, OnnxOptions(providers=("cuda",)))


@pytest.mark.parametrize("bad", [("gpu",), ("cpu", "CPUExecutionProvider"), ("CUDA", "cpu")])
def test_unknown_provider_names_are_refused_with_the_allowed_ones(bad: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match=r"allowed: tensorrt, cuda, cpu"):
        OnnxOptions(providers=bad)


def test_empty_and_duplicate_provider_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="no execution provider"):
        OnnxOptions(providers=())
    with pytest.raises(ValueError, match="twice"):
        OnnxOptions(providers=("cpu", "cpu"))


def test_select_execution_validates_options_built_around_the_constructor() -> None:
    options = OnnxOptions()
    object.__setattr__(options, "providers", ("tpu",))  # e.g. a settings layer that skips init
    with pytest.raises(ValueError, match="allowed: tensorrt, cuda, cpu"):
        select_execution(CPU_ONLY, FP32, options)


@pytest.mark.parametrize(
    "field", ["intra_op_threads", "inter_op_threads", "device_id", "trt_workspace_bytes"]
)
def test_negative_numbers_are_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        OnnxOptions(**{field: -1})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["cuda_mem_limit_bytes", "malloc_mmap_threshold_bytes"])
def test_zero_limits_are_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        OnnxOptions(**{field: 0})  # type: ignore[arg-type]


# --- provider options ------------------------------------------------------------------------


def test_tensorrt_options() -> None:
    options = OnnxOptions(trt_engine_cache=Path("/cache/trt"), trt_workspace_bytes=1 << 30)
    trt = options_of(select_execution(GPU_BUILD, ALL, options), TRT)
    assert trt == {
        "device_id": 0,
        "trt_fp16_enable": True,
        "trt_max_workspace_size": 1 << 30,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": "/cache/trt",
    }


def test_tensorrt_without_cache_or_fp16() -> None:
    options = OnnxOptions(trt_fp16=False, gpu_variant="fp32", device_id=1)
    trt = options_of(select_execution(GPU_BUILD, ALL, options), TRT)
    assert trt["trt_fp16_enable"] is False
    assert trt["device_id"] == 1
    assert "trt_engine_cache_enable" not in trt
    assert "trt_engine_cache_path" not in trt


def test_tensorrt_runs_an_fp16_graph_with_fp16_enabled() -> None:
    trt = options_of(select_execution(GPU_BUILD, ALL, OnnxOptions(trt_fp16=False)), TRT)
    assert trt["trt_fp16_enable"] is True


def test_cuda_options() -> None:
    options = OnnxOptions(cuda_mem_limit_bytes=4 << 30, device_id=2)
    cuda = options_of(select_execution(GPU_BUILD, ALL, options), CUDA)
    assert cuda == {
        "device_id": 2,
        "gpu_mem_limit": 4 << 30,
        "arena_extend_strategy": "kSameAsRequested",
    }


def test_cuda_without_memory_limit() -> None:
    cuda = options_of(select_execution([CUDA, CPU], ALL, OnnxOptions()), CUDA)
    assert "gpu_mem_limit" not in cuda


def test_cpu_provider_has_no_options() -> None:
    assert options_of(select_execution(CPU_ONLY, ALL, OnnxOptions()), CPU) == {}


# --- variants --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variants", "wanted", "expected", "reason"),
    [
        (ALL, "fp16", "fp16", "fp16 package"),
        (WITH_INT8, "fp16", "fp32", "no fp16 variant"),
        (ALL, "fp32", "fp32", "fp32 requested"),
        (FP32, "fp32", "fp32", "fp32 requested"),
    ],
)
def test_gpu_variant(variants: dict[str, str], wanted: str, expected: str, reason: str) -> None:
    for available in (GPU_BUILD, [CUDA, CPU], [TRT, CPU]):
        chosen = select_execution(available, variants, OnnxOptions(gpu_variant=wanted))  # type: ignore[arg-type]
        assert chosen.variant == expected
        assert reason in chosen.reason


@pytest.mark.parametrize(
    ("variants", "wanted", "default", "opt_in", "expected", "reason"),
    [
        (WITH_INT8, "int8", "int8", False, "int8", "batch independent"),
        (WITH_INT8, "int8", "fp32", False, "fp32", "allow_batch_dependent_int8"),
        (WITH_INT8, "int8", "fp32", True, "int8", "opted in"),
        (FP32, "int8", "fp32", False, "fp32", "no int8 variant"),
        (FP32, "int8", "int8", True, "fp32", "no int8 variant"),
        (WITH_INT8, "fp32", "int8", False, "fp32", "fp32 requested"),
        (WITH_INT8, "fp32", "fp32", True, "fp32", "fp32 requested"),
        (ALL, "int8", "int8", False, "int8", "batch independent"),
    ],
)
def test_cpu_variant(
    variants: dict[str, str], wanted: str, default: str, opt_in: bool, expected: str, reason: str
) -> None:
    options = OnnxOptions(cpu_variant=wanted, allow_batch_dependent_int8=opt_in)  # type: ignore[arg-type]
    chosen = select_execution(CPU_ONLY, variants, options, default_cpu_variant=default)
    assert chosen.variant == expected
    assert chosen.reason.startswith("CPU: ")
    assert reason in chosen.reason


def test_default_cpu_variant_defaults_to_the_safe_choice() -> None:
    assert select_execution(CPU_ONLY, WITH_INT8, OnnxOptions()).variant == "fp32"


def test_a_package_without_fp32_fails_when_fp32_is_needed() -> None:
    with pytest.raises(FailedPrecondition, match="no fp32 variant"):
        select_execution(CPU_ONLY, {"int8": "model.int8.onnx"}, OnnxOptions())


def test_gpu_never_picks_int8() -> None:
    chosen = select_execution(GPU_BUILD, WITH_INT8, OnnxOptions(), default_cpu_variant="int8")
    assert chosen.variant == "fp32"


# --- host and registry -----------------------------------------------------------------------


def test_detect_devices_reports_this_host() -> None:
    import onnxruntime as ort

    found = detect_devices()
    assert found["available_providers"] == ort.get_available_providers()
    assert found["device"] in {"CPU", "GPU"}
    assert set(found["gpu_providers"]) <= {"tensorrt", "cuda"}
    assert found["cuda_device_count"] is None or found["cuda_device_count"] >= 0


def test_pin_malloc_mmap_threshold_is_harmless_to_repeat() -> None:
    assert pin_malloc_mmap_threshold(128 * 1024) == pin_malloc_mmap_threshold(128 * 1024)


def test_registry_maps_every_engine_kind() -> None:
    assert set(ENGINES) == set(EngineKind)


def test_create_engine_refuses_an_unregistered_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(ENGINES, EngineKind.ONNX)
    manifest = Manifest(
        name="m",
        labels=["neg", "pos"],
        max_length=16,
        embedding_dim=8,
        architecture="bert",
        base_model="tiny",
        variants=FP32,
    )
    with pytest.raises(NotFound, match="engine 'onnx' not found"):
        create_engine(EngineKind.ONNX, Path("/nowhere"), manifest, OnnxOptions())


@pytest.mark.parametrize(("between_runs", "entry"), [(False, "1"), (True, "0")])
def test_threads_spin_between_runs_only_when_asked(between_runs: bool, entry: str) -> None:
    from services.inference.engines.onnx import _session_options

    options = _session_options(OnnxOptions(spin_between_runs=between_runs))
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == entry
