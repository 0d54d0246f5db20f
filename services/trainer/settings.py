"""Trainer service settings: `LOOPLINE_TRAINER_*` (plus the shared `LOOPLINE_REDIS_URL` etc.)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from loopline.settings import ServiceSettings


def _home() -> Path:
    return Path.home() / ".loopline" / "trainer"


class TrainerSettings(ServiceSettings):
    """Everything a trainer service reads at startup (`loopline serve trainer`)."""

    model_config = SettingsConfigDict(env_prefix="LOOPLINE_TRAINER_")

    port: int = Field(default=8002, ge=0, le=65535, description="gRPC port; 0 = any free.")
    home: Path = Field(
        default_factory=_home,
        description="Job database (jobs.db) and one working folder per job (data, checkpoint, "
        "package). Survives restarts: queued jobs run after a restart.",
    )
    slots: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Jobs run at once: one per device. Each job runs in its own process.",
    )
    cancel_grace_seconds: float = Field(
        default=5.0, gt=0, description="After SIGTERM, how long a cancelled job may take to exit."
    )
    keep_job_files: bool = Field(
        default=False,
        description="Keep each job's working folder after it ends (the package is in MLflow).",
    )
    inference_stream: str = Field(
        default="loopline:inference", description="Redis stream of inference records."
    )
    feedback_stream: str = Field(
        default="loopline:feedback", description="Redis stream of feedback labels."
    )
    feedback_lookback_days: float = Field(
        default=7.0,
        gt=0,
        description="How far before a feedback window the matching predictions are looked for.",
    )
