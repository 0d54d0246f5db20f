"""Monitor settings: `LOOPLINE_MONITOR_*` (plus the shared `LOOPLINE_REDIS_URL` etc.)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from loopline.settings import ServiceSettings


def _home() -> Path:
    return Path.home() / ".loopline" / "monitor"


class MonitorSettings(ServiceSettings):
    """Everything a monitor reads at startup (`loopline serve monitor`)."""

    model_config = SettingsConfigDict(env_prefix="LOOPLINE_MONITOR_")

    port: int = Field(default=8003, ge=0, le=65535, description="gRPC port; 0 = any free.")
    home: Path = Field(
        default_factory=_home,
        description="Downloaded reference distributions and the Evidently HTML reports.",
    )
    report_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="HTTP port serving the saved Evidently drift reports; 0 = off.",
    )
    inference_stream: str = Field(
        default="loopline:inference", description="Redis stream of inference records."
    )
    feedback_stream: str = Field(
        default="loopline:feedback", description="Redis stream of feedback labels."
    )
    group: str = Field(
        default="loopline-monitor",
        description="Consumer group: monitors in one group share the records.",
    )
    window_seconds: int = Field(
        default=60, ge=1, description="Tumbling window length for statistics and drift."
    )
    retention_hours: float = Field(
        default=168.0,
        gt=0,
        description="How long predictions wait for their feedback label (and windows are kept).",
    )
    check_seconds: float = Field(
        default=30.0, gt=0, description="How often alert rules and drift are evaluated."
    )
    drift_window_records: int = Field(
        default=500,
        ge=50,
        description="Most recent records of a version compared with its reference per check.",
    )
    drift_consecutive: int = Field(
        default=2, ge=1, description="Drifted checks in a row before the drift alert fires."
    )
    accuracy_floor: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Live accuracy below this (with enough labels) fires an alert; 0 = off.",
    )
    accuracy_min_labels: int = Field(
        default=100, ge=1, description="Labels needed before the accuracy rule judges."
    )
    latency_p99_ms: float = Field(
        default=0.0, ge=0, description="p99 latency above this fires an alert; 0 = off."
    )
    srm_p_value: float = Field(
        default=0.001,
        gt=0,
        lt=1,
        description="Sample-ratio mismatch: variant shares this unlikely under the weights fire.",
    )
    trainer_address: str = Field(
        default="", description="Trainer host:port for retraining triggers; empty = no triggers."
    )
    retrain_spec: Path | None = Field(
        default=None,
        description="Job spec (YAML) a retraining trigger submits; its feedback source is "
        "narrowed to what arrived since the version was trained, its alias set to challenger.",
    )
    retrain_cooldown_seconds: float = Field(
        default=6 * 3600.0,
        ge=0,
        description="At most one triggered retraining per model within this period.",
    )
