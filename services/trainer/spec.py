"""A training job's spec: what `SubmitJob` takes and what a `retrain.yaml` holds.

One format for both, validated strictly (a misspelt field is an error naming its path), so a spec
that works with `loopline train --spec FILE --wait` is the same one a scheduler submits over gRPC.

    name: sentiment
    alias: champion
    base_model: models:/sentiment@champion     # continue from the served version
    data:
      - file: /data/movie_reviews/train.jsonl
      - feedback: {since: 2026-11-01T00:00:00Z, mix_ratio: 0.3}
    validation: /data/movie_reviews/validation.jsonl
    epochs: 2
    promotion: gate
    gate: {metric: accuracy, min_improvement: 0.005}
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loopline.errors import InvalidInput

__all__ = [
    "DataSource",
    "FeedbackSpec",
    "FileSpec",
    "GateSpec",
    "Hyperparameters",
    "JobSpec",
    "parse_spec",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileSpec(_Strict):
    """A file of labelled examples the trainer can read."""

    path: Path
    format: Literal["", "csv", "tsv", "jsonl", "parquet"] = ""


class FeedbackSpec(_Strict):
    """Labelled production traffic: inference records joined with feedback labels."""

    since: datetime | None = None
    until: datetime | None = None
    model: str = ""  # empty: the job's name
    sources: list[str] = Field(default_factory=list)
    max_examples: int = Field(0, ge=0)
    mix_ratio: float = Field(0.0, ge=0, le=1)
    min_examples: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _window(self) -> FeedbackSpec:
        if self.since and self.until and self.until <= self.since:
            raise ValueError("until must be after since")
        return self


class DataSource(_Strict):
    """Exactly one of a file or feedback."""

    file: FileSpec | None = None
    feedback: FeedbackSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `- file: path.jsonl` is the common case; accept it besides `- file: {path: ...}`.
        if isinstance(value, dict) and isinstance(value.get("file"), str | Path):
            return {**value, "file": {"path": value["file"]}}
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> DataSource:
        if (self.file is None) == (self.feedback is None):
            raise ValueError("set exactly one of file and feedback")
        return self


class Hyperparameters(_Strict):
    """Unset fields take the trainer's defaults (or are searched when trials > 1)."""

    learning_rate: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1, le=4096)
    weight_decay: float | None = Field(None, ge=0, le=1)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    extra: dict[str, str] = Field(default_factory=dict)


class GateSpec(_Strict):
    """When the new version may take the alias (policy `gate`)."""

    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    min_value: float = Field(0.0, ge=0, le=1)
    min_improvement: float = Field(0.0, ge=-1, le=1)
    compare_alias: str = "champion"
    max_export_error: float = Field(1e-3, gt=0)
    max_latency_factor: float = Field(1.25, gt=0)


class JobSpec(_Strict):
    """Everything a training job needs; see the module docstring for a YAML example."""

    name: str = Field(pattern=NAME_PATTERN)
    alias: str = ""
    data: list[DataSource] = Field(min_length=1)
    text_column: str = "text"
    label_column: str = "label"
    validation: DataSource | None = None
    validation_fraction: float | None = Field(None, gt=0, le=0.5)
    base_model: str = ""
    epochs: int = Field(0, ge=0, le=100)
    trials: int = Field(0, ge=0, le=1000)
    max_length: int = Field(0, ge=0, le=8192)
    seed: int = 42
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    promotion: Literal["", "none", "gate", "always"] = ""
    gate: GateSpec | None = None
    tags: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _validation_shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("validation"), str | Path):
            return {**value, "validation": {"file": value["validation"]}}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.validation is not None and self.validation_fraction is not None:
            raise ValueError("set validation or validation_fraction, not both")
        if self.promotion in ("gate", "always") and not self.alias:
            raise ValueError(f"promotion {self.promotion} needs an alias to move")
        return self

    @property
    def policy(self) -> Literal["none", "gate", "always"]:
        """The effective promotion policy: explicit, else gate with a gate, else always with an
        alias, else none."""
        if self.promotion:
            return self.promotion
        if not self.alias:
            return "none"
        return "gate" if self.gate is not None else "always"


def parse_spec(data: Any) -> JobSpec:
    """Validate a spec (a dict from YAML, JSON or the proto); InvalidInput names each field."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in err.errors()
        ]
        raise InvalidInput(
            "invalid job spec: " + "; ".join(problems), fields=[p.split(":")[0] for p in problems]
        ) from None
