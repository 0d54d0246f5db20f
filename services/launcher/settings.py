"""Launcher settings: `LOOPLINE_UP_*`, plus the shared `LOOPLINE_REDIS_URL` / `LOOPLINE_MLFLOW_URI`
which, when set, replace the private Redis and the embedded MLflow store."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["LauncherSettings"]


class LauncherSettings(BaseSettings):
    """What `loopline up` starts and where. A port of 0 takes any free port at start."""

    model_config = SettingsConfigDict(
        env_prefix="LOOPLINE_UP_", validate_by_name=True, validate_by_alias=True
    )

    home: Path = Field(
        default=Path(".loopline"),
        description="Everything the stack keeps: Redis data, the MLflow store (SQLite + "
        "artifacts), service homes, logs, generated data and specs.",
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias="LOOPLINE_REDIS_URL",
        description="An existing Redis to use instead of starting a private one.",
    )
    mlflow_uri: str | None = Field(
        default=None,
        validation_alias="LOOPLINE_MLFLOW_URI",
        description="An existing MLflow tracking URI instead of SQLite under the home folder.",
    )
    model: str = Field(default="sentiment", min_length=1, description="Public model name.")
    redis_port: int = Field(default=6390, ge=0, le=65535, description="Private Redis port.")
    router_port: int = Field(default=8000, ge=0, le=65535, description="Router gRPC port.")
    trainer_port: int = Field(default=8002, ge=0, le=65535, description="Trainer gRPC port.")
    monitor_port: int = Field(default=8003, ge=0, le=65535, description="Monitor gRPC port.")
    worker_ports: list[int] = Field(
        default_factory=lambda: [8001, 8004],
        min_length=1,
        max_length=16,
        description="One inference worker per port (OIP gRPC).",
    )
    metrics_offset: int = Field(
        default=1000,
        ge=0,
        description="Each service's Prometheus port is its gRPC port plus this; 0 = no metrics.",
    )
    data_dir: Path | None = Field(
        default=None,
        description="Folder with movie_reviews/{train,validation}.jsonl for the first champion; "
        "default: ../shared/data when present, else Rotten Tomatoes through `datasets`.",
    )
    champion_examples: int = Field(
        default=2000,
        ge=100,
        description="Training sentences for the first champion (a quick starter model).",
    )
    champion_epochs: int = Field(default=1, ge=1, le=20, description="Its epochs.")
    base_model: str = Field(
        default="",
        description="Base model for the first champion (id or folder); empty: the trainer's "
        "default, all-MiniLM-L6-v2.",
    )
    max_length: int = Field(default=64, ge=8, le=8192, description="Token cap for training.")
    start_timeout_seconds: float = Field(
        default=180.0, gt=0, description="How long each service may take to become ready."
    )

    @field_validator("worker_ports")
    @classmethod
    def _distinct(cls, ports: list[int]) -> list[int]:
        fixed = [p for p in ports if p]
        if len(set(fixed)) != len(fixed):
            raise ValueError("worker ports must differ")
        return ports
