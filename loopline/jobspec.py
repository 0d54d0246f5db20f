"""A training job's spec: what `SubmitJob` takes and what a `retrain.yaml` holds, and its protobuf
form. Shared: the trainer runs specs, the CLI and the monitor submit them.

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

from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loopline import prototime
from loopline.errors import InvalidInput
from loopline.package import INT8_MAX_DROP_POINTS, MAX_EXPORT_ERROR
from loopline.v1 import trainer_pb2 as pb

__all__ = [
    "DataSource",
    "FeedbackSpec",
    "FileSpec",
    "GateSpec",
    "Hyperparameters",
    "JobSpec",
    "anchor_files",
    "job_spec",
    "parse_spec",
    "spec_dict",
    "spec_pb",
    "timestamp_pb",
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
    """When the new version may take the alias (policy `gate`), and the limits its export must
    meet (`max_export_error`, `max_int8_drop_points`) whatever the policy."""

    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    min_value: float = Field(0.0, ge=0, le=1)
    min_improvement: float = Field(0.0, ge=-1, le=1)
    compare_alias: str = "champion"
    max_export_error: float = Field(MAX_EXPORT_ERROR, gt=0)
    max_latency_factor: float = Field(1.25, gt=0)
    max_int8_drop_points: float = Field(INT8_MAX_DROP_POINTS, allow_inf_nan=False)


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


def anchor_files(data: dict[str, Any], folder: Path) -> None:
    """Make the relative file paths of raw spec `data` absolute against `folder`, in place.

    A spec file's data paths are relative to the file, wherever the service that reads them runs
    (the trainer, a monitor's retraining). Both shorthands (`file: PATH`, `validation: PATH`) are
    understood; anything else is left for `parse_spec` to judge.
    """
    if isinstance(data.get("validation"), str | Path):
        data["validation"] = {"file": data["validation"]}
    sources = data.get("data")
    for source in [*(sources if isinstance(sources, list) else []), data.get("validation")]:
        file = source.get("file") if isinstance(source, dict) else None
        if isinstance(file, str | Path):
            source["file"] = file = {"path": file}
        path = file.get("path") if isinstance(file, dict) else None
        if isinstance(path, str | Path) and not Path(path).is_absolute():
            file["path"] = str((folder / path).resolve())  # type: ignore[index]


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


# ----- protobuf <-> spec -----

POLICY_FROM_PB = {
    pb.PROMOTION_POLICY_UNSPECIFIED: "",
    pb.PROMOTION_POLICY_NONE: "none",
    pb.PROMOTION_POLICY_GATE: "gate",
    pb.PROMOTION_POLICY_ALWAYS: "always",
}
POLICY_TO_PB = {value: key for key, value in POLICY_FROM_PB.items()}


def _time(stamp: Timestamp, present: bool, field: str) -> str | None:
    return prototime.utc(stamp, field).isoformat() if present else None


def _source(message: pb.DataSource, where: str) -> dict[str, Any]:
    kind = message.WhichOneof("source")
    if kind == "file":
        return {"file": {"path": message.file.path, "format": message.file.format}}
    if kind == "feedback":
        f = message.feedback
        return {
            "feedback": {
                "since": _time(f.since, f.HasField("since"), f"{where}.feedback.since"),
                "until": _time(f.until, f.HasField("until"), f"{where}.feedback.until"),
                "model": f.model,
                "sources": list(f.sources),
                "max_examples": f.max_examples,
                "mix_ratio": f.mix_ratio,
                "min_examples": f.min_examples,
            }
        }
    return {}  # validation names the empty source


def _hyperparameters(message: pb.Hyperparameters) -> dict[str, Any]:
    out: dict[str, Any] = {"extra": dict(message.extra)}
    if message.HasField("learning_rate"):
        out["learning_rate"] = message.learning_rate
    if message.HasField("batch_size"):
        out["batch_size"] = message.batch_size
    if message.HasField("weight_decay"):
        out["weight_decay"] = message.weight_decay
    if message.HasField("warmup_ratio"):
        out["warmup_ratio"] = message.warmup_ratio
    return out


def _gate(message: pb.PromotionGate) -> dict[str, Any]:
    out: dict[str, Any] = {
        "metric": message.metric or "accuracy",
        "min_value": message.min_value,
        "min_improvement": message.min_improvement,
        "compare_alias": message.compare_alias or "champion",
    }
    if message.max_export_error:
        out["max_export_error"] = message.max_export_error
    if message.max_latency_factor:
        out["max_latency_factor"] = message.max_latency_factor
    if message.HasField("max_int8_drop_points"):
        out["max_int8_drop_points"] = message.max_int8_drop_points
    return out


def spec_dict(message: pb.JobSpec) -> dict[str, Any]:
    """The proto spec as the dict `parse_spec` validates (unset fields left to defaults)."""
    data: dict[str, Any] = {
        "name": message.name,
        "alias": message.alias,
        "data": [_source(s, f"data.{i}") for i, s in enumerate(message.data)],
        "text_column": message.text_column or "text",
        "label_column": message.label_column or "label",
        "base_model": message.base_model,
        "epochs": message.epochs,
        "trials": message.trials,
        "max_length": message.max_length,
        "seed": message.seed or 42,
        "hyperparameters": _hyperparameters(message.hyperparameters),
        "promotion": POLICY_FROM_PB.get(message.promotion, ""),
        "tags": dict(message.tags),
    }
    which = message.WhichOneof("validation")
    if which == "validation_data":
        data["validation"] = _source(message.validation_data, "validation_data")
    elif which == "validation_fraction":
        data["validation_fraction"] = message.validation_fraction
    if message.HasField("gate"):
        data["gate"] = _gate(message.gate)
    return data


def job_spec(message: pb.JobSpec) -> JobSpec:
    """Validate a submitted spec; InvalidInput names each bad field."""
    return parse_spec(spec_dict(message))


def timestamp_pb(value: datetime | None) -> Timestamp | None:
    """A protobuf Timestamp for a datetime (None stays None)."""
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _source_pb(source: DataSource) -> pb.DataSource:
    if source.file is not None:
        return pb.DataSource(
            file=pb.FileSource(path=str(source.file.path), format=source.file.format)
        )
    f = source.feedback
    assert f is not None  # DataSource validates exactly one kind
    return pb.DataSource(
        feedback=pb.FeedbackSource(
            since=timestamp_pb(f.since),
            until=timestamp_pb(f.until),
            model=f.model,
            sources=f.sources,
            max_examples=f.max_examples,
            mix_ratio=f.mix_ratio,
            min_examples=f.min_examples,
        )
    )


def spec_pb(spec: JobSpec) -> pb.JobSpec:
    """A validated spec back as protobuf (what GetJob shows, defaults filled in)."""
    h = spec.hyperparameters
    message = pb.JobSpec(
        name=spec.name,
        alias=spec.alias,
        data=[_source_pb(s) for s in spec.data],
        text_column=spec.text_column,
        label_column=spec.label_column,
        base_model=spec.base_model,
        epochs=spec.epochs,
        trials=spec.trials,
        max_length=spec.max_length,
        seed=spec.seed,
        hyperparameters=pb.Hyperparameters(
            learning_rate=h.learning_rate,
            batch_size=h.batch_size,
            weight_decay=h.weight_decay,
            warmup_ratio=h.warmup_ratio,
            extra=h.extra,
        ),
        promotion=POLICY_TO_PB[spec.policy],
        tags=spec.tags,
    )
    if spec.validation is not None:
        message.validation_data.CopyFrom(_source_pb(spec.validation))
    elif spec.validation_fraction is not None:
        message.validation_fraction = spec.validation_fraction
    if spec.gate is not None:
        g = spec.gate
        message.gate.CopyFrom(
            pb.PromotionGate(
                metric=g.metric,
                min_value=g.min_value,
                min_improvement=g.min_improvement,
                compare_alias=g.compare_alias,
                max_export_error=g.max_export_error,
                max_latency_factor=g.max_latency_factor,
                max_int8_drop_points=g.max_int8_drop_points,
            )
        )
    return message
