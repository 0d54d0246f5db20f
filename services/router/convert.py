"""`loopline.v1` protobuf <-> the router's domain types. The only router module besides the
servicer that imports generated code."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from loopline import prototime
from loopline.errors import InvalidInput
from loopline.v1 import common_pb2 as common
from loopline.v1 import router_pb2 as pb
from services.router.domain import ModelRef
from services.router.experiments import Experiment, Shadow, Stickiness, Variant
from services.router.experiments import Status as ExperimentStatus
from services.router.handlers import Classification, ClassifyCall

STATUS_TO_PB = {
    ExperimentStatus.DRAFT: common.EXPERIMENT_STATUS_DRAFT,
    ExperimentStatus.RUNNING: common.EXPERIMENT_STATUS_RUNNING,
    ExperimentStatus.PAUSED: common.EXPERIMENT_STATUS_PAUSED,
    ExperimentStatus.STOPPED: common.EXPERIMENT_STATUS_STOPPED,
}
STATUS_FROM_PB = {value: key for key, value in STATUS_TO_PB.items()}
STICKY_TO_PB = {
    Stickiness.USER: common.STICKINESS_USER,
    Stickiness.REQUEST: common.STICKINESS_REQUEST,
}


def model_ref(message: common.ModelRef) -> ModelRef:
    return ModelRef.requested(message.name.strip(), message.version.strip(), message.alias.strip())


def model_ref_pb(ref: ModelRef) -> common.ModelRef:
    return common.ModelRef(name=ref.name, version=ref.version, alias=ref.alias)


def classify_call(request: pb.ClassifyRequest) -> ClassifyCall:
    model = model_ref(request.model) if request.HasField("model") else None
    return ClassifyCall(
        text=request.text,
        model=model,
        user_id=request.user_id,
        request_id=request.request_id,
        metadata=dict(request.metadata),
    )


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def classify_response(answer: Classification) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        label=answer.label,
        probabilities=[common.LabelScore(label=k, score=v) for k, v in answer.scores],
        model=model_ref_pb(answer.model),
        experiment_id=answer.experiment,
        variant=answer.variant,
        request_id=answer.request_id,
        truncated=answer.truncated,
        timings=pb.Timings(
            total=_duration(answer.total_seconds),
            queue=_duration(answer.queue_seconds),
            inference=_duration(answer.inference_seconds),
        ),
        language=answer.language,
    )


# ----- experiments -----


def _stamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def status_of(value: int) -> ExperimentStatus | None:
    """None for UNSPECIFIED (keep / any)."""
    if value == common.EXPERIMENT_STATUS_UNSPECIFIED:
        return None
    if value not in STATUS_FROM_PB:
        raise InvalidInput(f"unknown experiment status {value}", field="status")
    return STATUS_FROM_PB[value]  # type: ignore[index]


def experiment_draft(message: common.Experiment) -> Experiment:
    """What a caller may set on create; output-only fields are left out."""
    sticky = (
        Stickiness.REQUEST if message.sticky_by == common.STICKINESS_REQUEST else Stickiness.USER
    )
    return Experiment(
        name=message.name.strip(),
        model=message.model.strip(),
        description=message.description,
        variants=tuple(
            Variant(v.name.strip(), model_ref(v.model), v.weight) for v in message.variants
        ),
        shadows=tuple(
            Shadow(s.name.strip(), model_ref(s.model), s.sample_rate or 1.0)
            for s in message.shadows
        ),
        status=status_of(message.status) or ExperimentStatus.DRAFT,
        sticky_by=sticky,
        salt=message.salt.strip(),
        pinned_users=dict(message.pinned_users),
        start_time=prototime.optional_seconds(message, "start_time", "experiment.start_time"),
        end_time=prototime.optional_seconds(message, "end_time", "experiment.end_time"),
    )


def experiment_pb(experiment: Experiment) -> common.Experiment:
    return common.Experiment(
        id=experiment.id,
        name=experiment.name,
        model=experiment.model,
        description=experiment.description,
        variants=[
            common.Variant(name=v.name, model=model_ref_pb(v.model), weight=v.weight)
            for v in experiment.variants
        ],
        shadows=[
            common.ShadowVariant(
                name=s.name, model=model_ref_pb(s.model), sample_rate=s.sample_rate
            )
            for s in experiment.shadows
        ],
        status=STATUS_TO_PB[experiment.status],
        sticky_by=STICKY_TO_PB[experiment.sticky_by],
        start_time=_stamp(experiment.start_time),
        end_time=_stamp(experiment.end_time),
        create_time=_stamp(experiment.create_time),
        update_time=_stamp(experiment.update_time),
        winner=experiment.winner,
        salt=experiment.salt,
        pinned_users=dict(experiment.pinned_users),
    )


def experiments_pb(items: Iterable[Experiment]) -> list[common.Experiment]:
    return [experiment_pb(item) for item in items]
