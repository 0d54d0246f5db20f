"""Worker settings: `LOOPLINE_INFERENCE_*` (plus the shared `LOOPLINE_REDIS_URL` etc.)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from loopline.settings import ServiceSettings

Provider = Literal["tensorrt", "cuda", "cpu"]


def _all_providers() -> list[Provider]:
    return ["tensorrt", "cuda", "cpu"]


class InferenceSettings(ServiceSettings):
    """Everything a worker reads at startup. Flags of `loopline serve inference` map onto it."""

    model_config = SettingsConfigDict(env_prefix="LOOPLINE_INFERENCE_")

    port: int = Field(default=8001, ge=0, le=65535, description="gRPC (OIP) port; 0 = any free.")
    models: list[str] = Field(
        default_factory=list,
        description="Model sources: models:/NAME@ALIAS, models:/NAME/VERSION or a package folder.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".loopline" / "cache",
        description="Downloaded packages, one folder per name and version (survives restarts).",
    )
    alias_poll_seconds: float = Field(
        default=5.0, gt=0, description="How often served aliases are checked in the registry."
    )
    max_batch_size: int = Field(default=32, ge=1, le=1024, description="Texts per batch.")
    max_batch_tokens: int = Field(
        default=8192, ge=8, description="Padded tokens per batch (rows x padded width)."
    )
    max_queue_delay_ms: float = Field(
        default=0.0,
        ge=0,
        description="How long the oldest queued text may wait for company. 0: a lone request "
        "runs at once and batches form from what arrives while a batch runs.",
    )
    batch_overhead_tokens: int = Field(
        default=64,
        ge=0,
        description="Fixed cost of running a batch, in padded tokens. Batches stop growing "
        "where longer candidates would add more padding than they save; 0 fills every batch "
        "(raise it on GPUs, where a batch's fixed cost is high and padding is cheap).",
    )
    pad_multiple: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Round a batch's width up to a multiple of this many tokens. Unset: 8 on a "
        "GPU (tensor cores), 1 on CPU, where the rounding only adds work (measured 7-12 %).",
    )
    max_queue_size: int = Field(default=2048, ge=1, description="Queued texts per model version.")
    concurrency: int = Field(default=1, ge=1, le=64, description="Batches run at once per model.")
    max_text_chars: int = Field(default=20_000, ge=1, description="Longer texts are refused.")
    stream_window: int = Field(
        default=256,
        ge=1,
        le=65_536,
        description="Requests of one ModelStreamInfer stream in flight at once, each until its "
        "answer is written; the stream reads no further meanwhile (back-pressure).",
    )
    inline_tokenize_chars: int = Field(
        default=1024,
        ge=0,
        description="Requests up to this many characters are tokenized on the event loop "
        "(faster than a thread hop); longer ones in a thread. 0: always in a thread.",
    )
    providers: list[Provider] = Field(
        default_factory=_all_providers,
        description="Execution providers in order of preference (used when available).",
    )
    cpu_variant: Literal["int8", "fp32"] = Field(
        default="int8", description="Package variant on CPU (int8 only if batch-independent)."
    )
    gpu_variant: Literal["fp16", "fp32"] = Field(default="fp16", description="Variant on GPU.")
    intra_op_threads: int = Field(default=0, ge=0, description="ORT intra-op threads; 0 = auto.")
    allow_spinning: bool = Field(
        default=True,
        description="Let idle ORT threads spin (ORT's default; measured faster here than off).",
    )
    spin_between_runs: bool = Field(
        default=False,
        description="Let ORT threads keep spinning after a run returns (ORT's default). Off: "
        "they spin only while a run is active, leaving idle cores to gRPC and the event loop.",
    )
    cuda_mem_limit_mb: int | None = Field(default=None, ge=1, description="CUDA arena cap.")
    trt_engine_cache: Path | None = Field(default=None, description="TensorRT engine cache.")
    trt_workspace_mb: int = Field(default=2048, ge=64, description="TensorRT workspace.")
    record_stream: str = Field(
        default="loopline:inference", description="Redis stream for inference records."
    )
    record_maxlen: int = Field(default=1_000_000, ge=1000, description="Approximate stream cap.")
    log_text: bool = Field(default=True, description="Include the text in inference records.")
    records: bool = Field(default=True, description="Write inference records at all.")
    spool_path: Path = Field(
        default_factory=lambda: Path.home() / ".loopline" / "spool" / "inference.jsonl",
        description="Local spool for records while Redis is unreachable.",
    )
    spool_max_mb: int = Field(default=256, ge=1, description="Spool cap; beyond it, drop+count.")
    advertise: str | None = Field(
        default=None, description="host:port routers should dial (default: host:bound port)."
    )
    heartbeat_seconds: float = Field(default=3.0, gt=0, description="Heartbeat interval.")
    memory_trim_seconds: float = Field(
        default=2.0,
        ge=0,
        description="After a whole interval this long without a batch, return freed memory to "
        "the OS (once per burst); 0 = never.",
    )
