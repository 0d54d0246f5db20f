"""One training job from its spec, as the job's child process runs it.

1. assemble the data: file sources read and checked, feedback (labelled production traffic)
   collected from Redis and mixed in; the assembled set is written to the job folder and its
   fingerprint and size reported;
2. resolve the base model (`models:/NAME@ALIAS` continues from a registered version's
   checkpoint);
3. train, export and register through the same pipeline as `loopline train`;
4. apply the promotion policy (none, gate, always) against the alias's current version.

Returns a JSON-able result: the registered model, the final metrics, the gate decision.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopline.errors import FailedPrecondition, InvalidInput
from loopline.jobspec import DataSource, JobSpec
from loopline.logging import get_logger

__all__ = ["JobContext", "execute"]

log = get_logger(__name__)

Progress = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class JobContext:
    """Where a job runs and what it talks to (from the trainer's settings)."""

    workdir: Path
    mlflow_uri: str
    redis_url: str
    inference_stream: str = "loopline:inference"
    feedback_stream: str = "loopline:feedback"
    feedback_lookback_seconds: float = 7 * 24 * 3600.0


def _file_examples(source: DataSource, spec: JobSpec) -> list[tuple[str, str]]:
    from services.trainer.data import load_dataset

    assert source.file is not None
    dataset = load_dataset(
        source.file.path, text_column=spec.text_column, label_column=spec.label_column
    )
    return list(zip(dataset.texts, dataset.labels, strict=True))


def _feedback(source: DataSource, spec: JobSpec, ctx: JobContext) -> Any:
    import redis

    from services.trainer.feedback_data import FeedbackQuery, collect

    feedback = source.feedback
    assert feedback is not None
    query = FeedbackQuery(
        since=feedback.since,
        until=feedback.until,
        model=feedback.model or spec.name,
        sources=tuple(feedback.sources),
        max_examples=feedback.max_examples,
        mix_ratio=feedback.mix_ratio,
        min_examples=feedback.min_examples,
    )
    client = redis.Redis.from_url(ctx.redis_url)
    try:
        return collect(
            client,
            query,
            ctx.inference_stream,
            ctx.feedback_stream,
            lookback_s=ctx.feedback_lookback_seconds,
        )
    finally:
        client.close()


def assemble_data(spec: JobSpec, ctx: JobContext, progress: Progress) -> Path:
    """Write the training set to `workdir/train.jsonl`; report its size and fingerprint."""
    from services.trainer.feedback_data import assemble, write_jsonl

    base: list[tuple[str, str]] = []
    feedback_sets = []
    for source in spec.data:
        if source.file is not None:
            base += _file_examples(source, spec)
        else:
            feedback_sets.append((source, _feedback(source, spec, ctx)))
    if len(feedback_sets) > 1:
        raise InvalidInput("a job takes at most one feedback source", field="data")
    if feedback_sets:
        source, found = feedback_sets[0]
        assert source.feedback is not None
        texts, labels, report = assemble(base, found, source.feedback.mix_ratio, spec.seed)
        summary = report.to_dict()
    else:
        texts, labels = [t for t, _ in base], [label for _, label in base]
        summary = {"size": len(texts)}
    path = write_jsonl(ctx.workdir / "train.jsonl", texts, labels)
    (ctx.workdir / "data.json").write_text(json.dumps(summary, indent=2, default=str))
    progress("data assembled", summary)
    return path


def _validation(spec: JobSpec, ctx: JobContext) -> Path | None:
    from services.trainer.feedback_data import write_jsonl

    if spec.validation is None:
        return None
    if spec.validation.file is not None:
        return spec.validation.file.path
    found = _feedback(spec.validation, spec, ctx)
    texts = [e.text for e in found.examples]
    labels = [e.label for e in found.examples]
    return write_jsonl(ctx.workdir / "validation.jsonl", texts, labels)


def resolve_base(base_model: str, ctx: JobContext) -> tuple[str | None, str | None]:
    """(what to load, what to record as the base model). A registered version
    (`models:/NAME@ALIAS` or `models:/NAME/VERSION`) loads from the local folder of its training
    checkpoint and is recorded as `models:/NAME/VERSION`; anything else is passed on as it is."""
    if not base_model.startswith("models:/"):
        return base_model or None, None
    from loopline.registry import Registry

    ref = base_model.removeprefix("models:/")
    name, _, rest = ref.partition("@") if "@" in ref else ref.partition("/")
    if not name or not rest:
        raise InvalidInput(
            f"base_model {base_model!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION",
            field="base_model",
        )
    registry = Registry(ctx.mlflow_uri)
    version = registry.resolve(name, rest)
    folder = registry.download_checkpoint(name, version, ctx.workdir / "base")
    log.info("continuing from a registered version", extra={"model": name, "version": version})
    return str(folder), f"models:/{name}/{version}"


def _train_request(spec: JobSpec, data: Path, validation: Path | None, ctx: JobContext) -> Any:
    from services.trainer.pipeline import TrainRequest, with_preset

    hyper = spec.hyperparameters
    train: dict[str, Any] = {"seed": spec.seed}
    if spec.epochs:
        train["epochs"] = spec.epochs
    if spec.max_length:
        train["max_length"] = spec.max_length
    for field in ("learning_rate", "batch_size", "weight_decay", "warmup_ratio"):
        value = getattr(hyper, field)
        if value is not None:
            train[field] = value
    train.update(hyper.extra)  # unknown names fail TrainConfig's extra="forbid"
    base, label = resolve_base(spec.base_model, ctx)
    fields: dict[str, Any] = {
        "data": data,
        "validation": validation,
        "text_column": "text",
        "label_column": "label",
        "base_model": base,
        "base_model_label": label,
        "name": spec.name,
        "alias": None,  # the promotion policy moves the alias, after the gate
        "output": ctx.workdir / "out",
        "trials": spec.trials,
        "mlflow_uri": ctx.mlflow_uri,
        "train": train,
    }
    if spec.validation_fraction is not None:
        fields["validation_fraction"] = spec.validation_fraction
    if spec.gate is not None:  # the export's limits, whatever the promotion policy
        fields["max_export_error"] = spec.gate.max_export_error
        fields["int8_max_drop_points"] = spec.gate.max_int8_drop_points
    return with_preset(TrainRequest.model_validate(fields))


def execute(spec: JobSpec, ctx: JobContext, progress: Progress) -> dict[str, Any]:
    """Run one job to the end; raises with a reason a person can act on when it cannot. The
    result is what `runner.JobOutcome.from_dict` reads."""
    from services.trainer.pipeline import run_job

    ctx.workdir.mkdir(parents=True, exist_ok=True)
    data = assemble_data(spec, ctx, progress)
    validation = _validation(spec, ctx)
    request = _train_request(spec, data, validation, ctx)
    result = run_job(request, progress)
    if result.version is None:
        raise FailedPrecondition("the pipeline registered no version")
    decision = _promote(spec, result, ctx, progress)
    model = {"name": spec.name, "version": result.version, "alias": ""}
    if decision["gate_passed"] and spec.alias:
        model["alias"] = spec.alias
    metrics = {k: float(v) for k, v in result.evaluation.scalars("").items()}
    return {"model": model, "metrics": metrics, **decision}


def _promote(spec: JobSpec, result: Any, ctx: JobContext, progress: Progress) -> dict[str, Any]:
    from loopline.registry import Registry
    from services.trainer.promotion import Gate, promote

    policy = spec.policy
    if policy == "none" or not spec.alias:
        return {"gate_passed": False, "gate_reason": "policy none: registered, alias not moved"}
    gate_spec = spec.gate
    gate = Gate(
        metric=gate_spec.metric if gate_spec else "accuracy",
        min_value=gate_spec.min_value if gate_spec else 0.0,
        min_improvement=gate_spec.min_improvement if gate_spec else 0.0,
        compare_alias=gate_spec.compare_alias if gate_spec else "champion",
        max_latency_factor=gate_spec.max_latency_factor if gate_spec else 1.25,
    )
    # The candidate and the current version are compared on the job's own validation data.
    texts, labels = result.validation_texts, result.validation_labels
    decision = promote(
        Registry(ctx.mlflow_uri),
        spec.name,
        result.version,
        spec.alias,
        policy,
        gate,
        texts,
        labels,
        result.package_dir,
        ctx.workdir / "promotion",
    )
    progress("promoted" if decision.passed else "not promoted", {"reason": decision.reason})
    return {"gate_passed": decision.passed, "gate_reason": decision.reason}


def run_spec(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """The job runner's training function (runs in the job's child process): the trainer's
    settings come from the environment the service passed down, the job id from the runner."""
    import os

    from loopline.jobspec import parse_spec
    from loopline.settings import load_settings
    from services.trainer.runner import JOB_ID_ENV
    from services.trainer.settings import TrainerSettings

    settings = load_settings(TrainerSettings)
    job_id = os.environ.get(JOB_ID_ENV, "adhoc")
    ctx = JobContext(
        workdir=settings.home / "jobs" / job_id,
        mlflow_uri=settings.mlflow_uri,
        redis_url=settings.redis_url,
        inference_stream=settings.inference_stream,
        feedback_stream=settings.feedback_stream,
        feedback_lookback_seconds=settings.feedback_lookback_days * 86400,
    )
    return execute(parse_spec(spec), ctx, progress)
