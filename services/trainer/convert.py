"""`loopline.v1` trainer protobuf <-> jobs and events (the spec's conversion is shared, in
`loopline.jobspec`). Only the servicer and this module import generated code."""

from __future__ import annotations

from typing import Any

from loopline.jobspec import job_spec, parse_spec, spec_pb, timestamp_pb
from loopline.v1 import trainer_pb2 as pb
from services.trainer.jobs import EventKind, Job, JobEvent
from services.trainer.runner import PROGRESS_FIELDS

__all__ = ["event_pb", "job_pb", "job_spec", "progress_pb", "spec_pb"]


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


_INT_FIELDS = frozenset({"epoch", "epochs", "step", "total_steps", "trial", "trials"})


def progress_pb(progress: dict[str, Any]) -> pb.Progress:
    message = pb.Progress()
    for key in PROGRESS_FIELDS:
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
        create_time=timestamp_pb(job.create_time),
        start_time=timestamp_pb(job.start_time),
        end_time=timestamp_pb(job.end_time),
        gate_passed=job.gate_passed,
        gate_reason=job.gate_reason,
    )
    if job.model is not None:
        message.model.name, message.model.version = job.model.name, job.model.version
        message.model.alias = job.model.alias
    return message


def event_pb(event: JobEvent) -> pb.JobEvent:
    message = pb.JobEvent(
        job_id=event.job_id, time=timestamp_pb(event.time), sequence=event.sequence
    )
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
