"""The ONNX Runtime engine: execution providers chosen from what is available and configured.

Preference order is the user's (`OnnxOptions.providers`, default TensorRT -> CUDA -> CPU); a GPU
provider is used only when this onnxruntime build offers it. The package variant follows the
device: fp16 (or fp32) on a GPU, the int8 package on a CPU when the exporter proved it batch
independent, fp32 otherwise. `select_execution` makes that choice as a pure function so that every
combination is unit-tested without a GPU; `OnnxEngine.load` only applies it.

Memory: ONNX Runtime's CPU arena keeps every block it ever grew to, and glibc keeps freed
activation buffers in the heap once its dynamic mmap threshold has risen, so a worker serving
varied batch shapes holds its worst batch forever. `_session_options` documents the figures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from loopline.errors import FailedPrecondition, InvalidInput, NotReady
from loopline.package import EMBEDDING_OUTPUT, LOGITS_OUTPUT, Manifest, PackageError, Variant
from services.inference.engines.base import EngineKind, EngineOutput

__all__ = [
    "GPU_PROVIDERS",
    "PROVIDER_NAMES",
    "Execution",
    "OnnxEngine",
    "OnnxOptions",
    "ProviderOptions",
    "detect_devices",
    "pin_malloc_mmap_threshold",
    "select_execution",
    "validate_providers",
]

log = logging.getLogger(__name__)

GIB = 1 << 30

# Settings use short names; ONNX Runtime uses these. The dict order is the default preference.
PROVIDER_NAMES: Mapping[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = frozenset({"tensorrt", "cuda"})
CPU_PROVIDER = PROVIDER_NAMES["cpu"]

ProviderOptions = dict[str, str | int | bool]
GraphOptimization = Literal["disabled", "basic", "extended", "all"]


@dataclass(frozen=True)
class OnnxOptions:
    """How to run ONNX packages; the worker's settings map one-to-one onto these fields."""

    providers: tuple[str, ...] = ("tensorrt", "cuda", "cpu")  # preference order
    cpu_variant: Literal["int8", "fp32"] = "int8"
    # The exporter marks int8 as the CPU default only when batching cannot change an answer. Set
    # this to serve a batch-dependent int8 package anyway (an opt-in with its flip rate known).
    allow_batch_dependent_int8: bool = False
    gpu_variant: Literal["fp16", "fp32"] = "fp16"
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per physical core)
    inter_op_threads: int = 1  # the graphs are sequential; parallel executors only add threads
    # Spinning intra-op threads cut latency a little but burn a core the tokenizer and the event
    # loop need on a small machine; the worker can turn it off.
    allow_spinning: bool = True
    # Keep spinning after a Run returns (ORT's default) instead of only during one. Off, a lone
    # request measured here went 4.9 -> 3.6 ms p50 and the worker's CPU 1.95 -> 1.57 cores at
    # concurrency 1: idle spinning took the cores the answer's way back through gRPC needed.
    spin_between_runs: bool = False
    graph_optimization: GraphOptimization = "all"
    cuda_mem_limit_bytes: int | None = None
    device_id: int = 0
    trt_fp16: bool = True
    trt_engine_cache: Path | None = None
    trt_workspace_bytes: int = 2 * GIB
    arena: bool = False  # CPU memory arena: off keeps RSS flat (module docstring)
    memory_pattern: bool = False  # only pays off for repeated identical shapes; ours vary
    # glibc raises its mmap threshold each time a large block is freed, after which activation
    # buffers come from the heap and are reused. Pinning the threshold (process-wide, set at
    # load) makes every large buffer a fresh mmap that goes back to the OS on free, and each run
    # pays the page faults. Measured in-process on the MiniLM int8 package (2 cores, sentences/s
    # at batch 1 / 8 / 32, RSS after the run -> after `release_free_memory()`):
    #   128 KiB pinned:  318-484 / 289-362 / 319-358, RSS 181 -> 175 MB
    #   None (dynamic):  502-523 / 578-590 / 523-542, RSS 273-284 -> 174 MB
    # The worker trims when idle, so the dynamic threshold costs no memory once a burst is over.
    malloc_mmap_threshold_bytes: int | None = None

    def __post_init__(self) -> None:
        validate_providers(self.providers)
        for name in ("intra_op_threads", "inter_op_threads", "device_id"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.trt_workspace_bytes <= 0:
            raise ValueError(f"trt_workspace_bytes must be > 0, got {self.trt_workspace_bytes}")
        for name in ("cuda_mem_limit_bytes", "malloc_mmap_threshold_bytes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 or unset, got {getattr(self, name)}")


def validate_providers(providers: Sequence[str]) -> None:
    """Raise ValueError unless `providers` is a non-empty list of distinct known short names."""
    allowed = ", ".join(PROVIDER_NAMES)
    unknown = [p for p in providers if p not in PROVIDER_NAMES]
    if unknown:
        raise ValueError(f"unknown execution provider(s) {unknown}; allowed: {allowed}")
    if not providers:
        raise ValueError(f"no execution provider configured; allowed: {allowed}")
    if len(set(providers)) != len(providers):
        raise ValueError(f"execution providers listed twice: {list(providers)}")


@dataclass(frozen=True)
class Execution:
    """What `select_execution` chose: ONNX Runtime providers in order, the variant, and why."""

    providers: tuple[tuple[str, ProviderOptions], ...]
    variant: Variant
    device: Literal["gpu", "cpu"]
    reason: str
    skipped: tuple[str, ...] = field(default=())  # configured but not in this build

    @property
    def provider_names(self) -> list[str]:
        """The ONNX Runtime provider names, in order."""
        return [name for name, _ in self.providers]


def select_execution(
    available: Sequence[str],
    manifest_variants: Mapping[str, str],
    options: OnnxOptions,
    *,
    default_cpu_variant: str = "fp32",
) -> Execution:
    """Choose providers and package variant; pure, so it is tested without a GPU.

    `available` is `onnxruntime.get_available_providers()`; `default_cpu_variant` is the
    manifest's (int8 only when the exporter measured it batch independent).
    """
    validate_providers(options.providers)
    usable = [p for p in options.providers if PROVIDER_NAMES[p] in available]
    skipped = tuple(p for p in options.providers if p not in usable)
    if not usable:
        raise FailedPrecondition(
            f"none of the configured execution providers ({', '.join(options.providers)}) is "
            f"available in this onnxruntime build (available: {', '.join(available)}); "
            "add 'cpu' to the providers or install onnxruntime-gpu",
            configured=list(options.providers),
            available=list(available),
        )
    gpu = [p for p in usable if p in GPU_PROVIDERS]
    if gpu:
        variant, reason = _gpu_variant(manifest_variants, options)
    else:
        variant, reason = _cpu_variant(manifest_variants, options, default_cpu_variant)
    if variant not in manifest_variants:
        raise FailedPrecondition(
            f"the package has no {variant} variant (has: {', '.join(manifest_variants)})",
            variants=list(manifest_variants),
        )
    providers = [(PROVIDER_NAMES[p], _provider_options(p, options, variant)) for p in usable]
    if gpu and "cpu" not in usable:
        # ONNX Runtime places nodes no GPU provider supports on the CPU anyway; say so.
        providers.append((CPU_PROVIDER, {}))
    return Execution(tuple(providers), variant, "gpu" if gpu else "cpu", reason, skipped)


def _gpu_variant(variants: Mapping[str, str], options: OnnxOptions) -> tuple[Variant, str]:
    if options.gpu_variant == "fp16" and "fp16" in variants:
        return "fp16", "GPU: fp16 package"
    if options.gpu_variant == "fp32":
        return "fp32", "GPU: fp32 requested"
    return "fp32", "GPU: fp16 requested but the package has no fp16 variant; serving fp32"


def _cpu_variant(
    variants: Mapping[str, str], options: OnnxOptions, default_cpu_variant: str
) -> tuple[Variant, str]:
    if options.cpu_variant == "fp32":
        return "fp32", "CPU: fp32 requested"
    if "int8" not in variants:
        return "fp32", "CPU: int8 requested but the package has no int8 variant; serving fp32"
    if default_cpu_variant == "int8":
        return "int8", "CPU: int8 package (the exporter measured it batch independent)"
    if options.allow_batch_dependent_int8:
        return "int8", "CPU: int8 package although batching can change answers (opted in)"
    return "fp32", (
        "CPU: int8 requested but the exporter did not make it the default (its answers depend "
        "on batch neighbours or it lost accuracy); serving fp32, set allow_batch_dependent_int8 "
        "to override"
    )


def _provider_options(name: str, options: OnnxOptions, variant: Variant) -> ProviderOptions:
    if name == "tensorrt":
        return _tensorrt_options(options, variant)
    if name == "cuda":
        return _cuda_options(options)
    return {}


def _tensorrt_options(options: OnnxOptions, variant: Variant) -> ProviderOptions:
    # TensorRT builds its own fp16 kernels from an fp32 graph; an fp16 graph needs the flag too.
    opts: ProviderOptions = {
        "device_id": options.device_id,
        "trt_fp16_enable": options.trt_fp16 or variant == "fp16",
        "trt_max_workspace_size": options.trt_workspace_bytes,
    }
    if options.trt_engine_cache is not None:
        # Engine builds take minutes for dynamic shapes; the cache makes restarts cheap.
        opts["trt_engine_cache_enable"] = True
        opts["trt_engine_cache_path"] = str(options.trt_engine_cache)
    return opts


def _cuda_options(options: OnnxOptions) -> ProviderOptions:
    # kSameAsRequested: the CUDA arena otherwise doubles each growth and never gives memory back.
    opts: ProviderOptions = {
        "device_id": options.device_id,
        "arena_extend_strategy": "kSameAsRequested",
    }
    if options.cuda_mem_limit_bytes is not None:
        opts["gpu_mem_limit"] = options.cuda_mem_limit_bytes
    return opts


_OPTIMIZATION_LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def _session_options(options: OnnxOptions) -> Any:
    """SessionOptions that keep CPU RSS flat across varying batch shapes.

    Measured with one intra-op thread on a random-weight MiniLM-shaped BERT exported by the
    trainer (6 layers, 384 wide, 30,522 tokens, 22.7M parameters): RSS in MB after 150 runs of
    random batch 1-32 x length 8-128 ending with a 32 x 128 batch (peak in brackets); the bare
    process with numpy and onnxruntime imported is 75 MB.

        fp32, arena + memory pattern (ORT defaults)       333 (333)
        fp32, no arena, no pattern                        322 (334)   glibc keeps the buffers
        fp32, no arena, memory pattern                    338 (401)
        fp32, no arena, no pattern, mmap threshold fixed  176 (290)
        fp32, arena + pattern, mmap threshold fixed       326 (326)   the arena keeps them
        int8, arena + memory pattern                      350 (354)
        int8, no arena, no pattern, mmap threshold fixed  157 (271)

    So the arena stays off (it never gives memory back) and memory patterns off (they only pay
    off for repeated identical shapes). Freed activation buffers then stay in glibc's heaps, which
    is fast, and the worker returns them with `release_free_memory()` once idle; pinning glibc's
    mmap threshold returns them at once but slows every batch (`OnnxOptions`). With the arena
    off, `arena_extend_strategy` and `session.use_env_allocators` have nothing to act on.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, _OPTIMIZATION_LEVELS[options.graph_optimization]
    )
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.enable_cpu_mem_arena = options.arena
    so.enable_mem_pattern = options.memory_pattern
    so.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if options.allow_spinning else "0"
    )
    # Spinning only while a Run is active: when the last concurrent Run returns, the threads
    # block at once instead of spinning on cores the event loop and gRPC need next.
    so.add_session_config_entry(
        "session.force_spinning_stop", "0" if options.spin_between_runs else "1"
    )
    return so


_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def pin_malloc_mmap_threshold(threshold_bytes: int) -> bool:
    """Fix glibc's mmap threshold so large freed buffers return to the OS; False if not glibc.

    Process-wide and idempotent; the same as starting with `MALLOC_MMAP_THRESHOLD_` set.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))


def release_free_memory() -> bool:
    """Give freed heap pages back to the OS (glibc `malloc_trim`); False where unavailable.

    Cheap when little is free; the worker calls it only when no batch is queued or running.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    return trim is not None and bool(trim(0))


@functools.cache
def _libc() -> Any:
    """The C library, loaded once: `find_library` runs `ldconfig` in a child process each call."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None  # musl, macOS: no mallopt/malloc_trim, and their allocators return memory


_FEEDS = ("input_ids", "attention_mask")


class OnnxEngine:
    """One ONNX Runtime session over the variant `select_execution` chose for this machine."""

    kind: EngineKind = EngineKind.ONNX

    def __init__(self, session: Any, manifest: Manifest, execution: Execution) -> None:
        self.variant: str = execution.variant
        self.providers: list[str] = list(session.get_providers())
        self.execution = execution
        self._session: Any = session
        _check_graph(session, manifest)

    @classmethod
    def load(cls, package_dir: Path, manifest: Manifest, options: OnnxOptions) -> OnnxEngine:
        """Create the session for `package_dir` with the providers and variant this host allows."""
        import onnxruntime as ort

        available = ort.get_available_providers()
        execution = select_execution(
            available,
            manifest.variants,
            options,
            default_cpu_variant=manifest.default_cpu_variant,
        )
        path = Path(package_dir) / manifest.variants[execution.variant]
        if not path.is_file():
            raise PackageError(f"missing {path.name}", path=package_dir)
        if options.malloc_mmap_threshold_bytes is not None:
            pin_malloc_mmap_threshold(options.malloc_mmap_threshold_bytes)
        session = ort.InferenceSession(
            str(path),
            sess_options=_session_options(options),
            providers=[name for name, _ in execution.providers],
            provider_options=[opts for _, opts in execution.providers],
        )
        engine = cls(session, manifest, execution)
        _log_selection(manifest, available, execution, engine.providers)
        return engine

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EngineOutput:
        """Logits [N, C] and embeddings [N, H] (float32) for one padded int64 batch."""
        session = self._session
        if session is None:
            raise NotReady("the ONNX engine is closed", variant=self.variant)
        if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
            raise InvalidInput(
                "input_ids and attention_mask must be 2-D arrays of the same shape",
                input_ids=list(input_ids.shape),
                attention_mask=list(attention_mask.shape),
            )
        feeds = {
            "input_ids": np.asarray(input_ids, np.int64),
            "attention_mask": np.asarray(attention_mask, np.int64),
        }
        logits, embedding = session.run([LOGITS_OUTPUT, EMBEDDING_OUTPUT], feeds)
        return EngineOutput(
            logits=np.asarray(logits, np.float32), embedding=np.asarray(embedding, np.float32)
        )

    def close(self) -> None:
        """Drop the session; ONNX Runtime frees its memory when the last reference goes."""
        self._session = None


def _check_graph(session: Any, manifest: Manifest) -> None:
    """Fail at load, not on the first request, when the graph is not what this engine feeds."""
    graph = {i.name for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    names = list(manifest.input_names)
    if set(names) != graph or graph != set(_FEEDS):
        raise FailedPrecondition(
            f"the graph's inputs {sorted(graph)} do not match the manifest's {names}; "
            f"this engine feeds exactly {list(_FEEDS)}",
            graph_inputs=sorted(graph),
        )
    missing = {LOGITS_OUTPUT, EMBEDDING_OUTPUT} - outputs
    if missing:
        raise FailedPrecondition(f"the graph lacks outputs {sorted(missing)}; re-export it")


def _log_selection(
    manifest: Manifest, available: Sequence[str], execution: Execution, actual: list[str]
) -> None:
    log.info(
        "onnx engine: %s %s on %s (%s)",
        manifest.name,
        execution.variant,
        ", ".join(actual),
        execution.reason,
        extra={
            "model": manifest.name,
            "version": manifest.version,
            "available_providers": list(available),
            "requested_providers": execution.provider_names,
            "providers": actual,
            "skipped_providers": list(execution.skipped),
            "variant": execution.variant,
            "device": execution.device,
            "reason": execution.reason,
        },
    )


def detect_devices() -> dict[str, Any]:
    """What this host offers ONNX Runtime: providers, device kind, CUDA GPU count (or None).

    The count comes from the CUDA driver (`cuDeviceGetCount`) through ctypes, so neither torch
    nor a CUDA toolkit is needed; None means no driver was found.
    """
    import onnxruntime as ort

    available = list(ort.get_available_providers())
    return {
        "onnxruntime": ort.__version__,
        "device": ort.get_device(),
        "available_providers": available,
        "gpu_providers": [s for s, n in PROVIDER_NAMES.items() if s != "cpu" and n in available],
        "cuda_device_count": _cuda_device_count(),
    }


def _cuda_device_count() -> int | None:
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        driver = ctypes.CDLL(name)
    except OSError:
        return None
    count = ctypes.c_int(0)
    # CUDA_SUCCESS is 0; a driver without a usable GPU fails cuInit, which means zero devices.
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)
