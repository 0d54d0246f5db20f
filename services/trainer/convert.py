"""`loopline.v1` trainer protobuf <-> the job spec and jobs. Only the servicer and this module
import generated code."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from loopline.v1 import trainer_pb2 as pb
from services.trainer.jobs import EventKind, Job, JobEvent
from services.trainer.spec import DataSource, JobSpec, parse_spec

POLICY_FROM_PB = {
    pb.PROMOTION_POLICY_UNSPECIFIED: "",
    pb.PROMOTION_POLICY_NONE: "none",
    pb.PROMOTION_POLICY_GATE: "gate",
    pb.PROMOTION_POLICY_ALWAYS: "always",
}
POLICY_TO_PB = {value: key for key, value in POLICY_FROM_PB.items()}


def _time(stamp: Timestamp, present: bool) -> str | None:
    return stamp.ToDatetime(tzinfo=UTC).isoformat() if present else None


def _source(message: pb.DataSource) -> dict[str, Any]:
    kind = message.WhichOneof("source")
    if kind == "file":
        return {"file": {"path": message.file.path, "format": message.file.format}}
    if kind == "feedback":
        f = message.feedback
        return {
            "feedback": {
                "since": _time(f.since, f.HasField("since")),
                "until": _time(f.until, f.HasField("until")),
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
    return out


def spec_dict(message: pb.JobSpec) -> dict[str, Any]:
    """The proto spec as the dict `parse_spec` validates (unset fields left to defaults)."""
    data: dict[str, Any] = {
        "name": message.name,
        "alias": message.alias,
        "data": [_source(s) for s in message.data],
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
        data["validation"] = _source(message.validation_data)
    elif which == "validation_fraction":
        data["validation_fraction"] = message.validation_fraction
    if message.HasField("gate"):
        data["gate"] = _gate(message.gate)
    return data


def job_spec(message: pb.JobSpec) -> JobSpec:
    """Validate a submitted spec; InvalidInput names each bad field."""
    return parse_spec(spec_dict(message))


def _stamp(value: datetime | None) -> Timestamp | None:
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
            since=_stamp(f.since),
            until=_stamp(f.until),
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
            )
        )
    return message


# ----- jobs -----

STATE_TO_PB = {
    "queued": pb.JOB_STATE_QUEUED,
    "validating": pb.JOB_STATE_VALIDATING,
    "training": pb.JOB_STATE_TRAINING,
    "exporting": pb.JOB_STATE_EXPORTING,
    "evaluating": pb.JOB_STATE_EVALUATING,
    "registering": pb.JOB_STATE_REGISTERING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
    "interrupted": pb.JOB_STATE_INTERRUPTED,
}
STATE_FROM_PB = {value: key for key, value in STATE_TO_PB.items()}
_PROGRESS_FIELDS = (
    "epoch",
    "epochs",
    "step",
    "total_steps",
    "loss",
    "examples_per_second",
    "trial",
    "trials",
    "learning_rate",
)


_INT_FIELDS = frozenset({"epoch", "epochs", "step", "total_steps", "trial", "trials"})


def progress_pb(progress: dict[str, Any]) -> pb.Progress:
    message = pb.Progress()
    for key in _PROGRESS_FIELDS:
        value = progress.get(key)
        if value is not None:
            setattr(message, key, int(value) if key in _INT_FIELDS else float(value))
    return message


def job_pb(job: Job) -> pb.Job:
    """A stored job as protobuf; its spec is shown validated, with defaults filled in."""
    message = pb.Job(
        id=job.id,
        spec=spec_pb(parse_spec(job.spec)),
        state=STATE_TO_PB[job.state.value],
        error=job.error,
        metrics=job.metrics,
        progress=progress_pb(job.progress),
        create_time=_stamp(job.create_time),
        start_time=_stamp(job.start_time),
        end_time=_stamp(job.end_time),
        gate_passed=job.gate_passed,
        gate_reason=job.gate_reason,
    )
    if job.model is not None:
        message.model.name, message.model.version = job.model.name, job.model.version
        message.model.alias = job.model.alias
    return message


def event_pb(event: JobEvent) -> pb.JobEvent:
    message = pb.JobEvent(job_id=event.job_id, time=_stamp(event.time), sequence=event.sequence)
    payload = event.payload
    if event.kind is EventKind.STATE:
        message.state_change.CopyFrom(
            pb.StateChange(
                previous_state=STATE_TO_PB.get(
                    payload.get("previous_state", ""), pb.JOB_STATE_UNSPECIFIED
                ),
                state=STATE_TO_PB.get(payload.get("state", ""), pb.JOB_STATE_UNSPECIFIED),
                message=str(payload.get("message", "")),
            )
        )
    elif event.kind is EventKind.PROGRESS:
        message.progress.CopyFrom(progress_pb(payload))
    elif event.kind is EventKind.METRICS:
        message.metrics.CopyFrom(
            pb.MetricsUpdate(
                metrics={k: float(v) for k, v in (payload.get("metrics") or {}).items()},
                split=str(payload.get("split", "")),
                epoch=int(payload.get("epoch") or 0),
                trial=int(payload.get("trial") or 0),
            )
        )
    else:
        message.job.CopyFrom(job_pb(event.job()))
    return message
