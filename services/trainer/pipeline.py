"""One training job end to end: check data, (search,) train, evaluate, export, register.

Nothing reaches the registry unless every step before it passed: bad data fails before a model is
loaded, and an export that fails parity is refused before anything is logged as a version.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from loopline.errors import InvalidInput, NotFound
from loopline.package import (
    INT8_MAX_DROP_POINTS,
    MAX_EXPORT_ERROR,
    Manifest,
    Parity,
    write_manifest,
)
from loopline.registry import CHECKPOINT_ARTIFACT_PATH, PACKAGE_ARTIFACT_PATH, Registry
from loopline.runtime import PackageRunner, softmax
from services.trainer import data as datalib
from services.trainer import export as exportlib
from services.trainer.evaluate import Evaluation, evaluate, plot_confusion
from services.trainer.finetune import (
    EpochRecord,
    TrainConfig,
    Trainer,
    TrainResult,
    encode,
    predict,
    seed_everything,
    select_device,
)
from services.trainer.modeling import (
    HEAD_FILE,
    LABELS_FILE,
    SentenceClassifier,
    build_classifier,
    save_checkpoint,
)
from services.trainer.presets import preset_for, resolve_base_model
from services.trainer.reference import build_reference
from services.trainer.search import run_search
from services.trainer.tracking import NoRunLog, RunLog, code_revision

log = logging.getLogger(__name__)


class TrainRequest(BaseModel):
    """Everything one training job needs; the CLI flags and a SPEC.yaml map onto it."""

    model_config = ConfigDict(extra="forbid")  # a misspelt spec field is an error, not ignored

    data: Path = Field(description="training file: JSONL, CSV or Parquet")
    validation: Path | None = Field(None, description="validation file; else a stratified split")
    text_column: str = "text"
    label_column: str = "label"
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    base_model: str | None = Field(None, description="Hugging Face id or local folder")
    name: str = Field("sentiment", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    alias: str | None = Field("challenger", description="alias set on the new version")
    output: Path | None = Field(None, description="where the package and checkpoint are kept")
    trials: int = Field(0, ge=0, description="Optuna trials; 0 trains the recipe once")
    languages: list[str] = ["en"]
    int8: bool = True
    fp16: bool = False
    register_version: bool = Field(True, description="register the version in MLflow")
    mlflow_uri: str | None = None
    experiment: str = "loopline-training"
    train: TrainConfig = Field(default_factory=TrainConfig)
    min_rows_per_class: int = Field(8, ge=1)
    int8_max_drop_points: float = Field(
        INT8_MAX_DROP_POINTS,
        allow_inf_nan=False,
        description="largest int8 accuracy loss vs fp32, in points, before export is refused",
    )
    base_model_label: str | None = Field(
        None,
        description="what versions record as their base model (default: base_model); a job "
        "continuing a registered version records models:/NAME/VERSION, not its local copy",
    )
    max_export_error: float = Field(
        MAX_EXPORT_ERROR,
        gt=0,
        description="largest |ONNX fp32 - PyTorch| logit difference before export is refused",
    )


@dataclass
class JobResult:
    """What a finished job produced."""

    package_dir: Path
    manifest: Manifest
    evaluation: Evaluation
    train_result: TrainResult
    run_id: str | None = None
    version: str | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)
    # The validation set the job scored on: a promotion gate compares versions on exactly it.
    validation_texts: list[str] = field(default_factory=list)
    validation_labels: list[str] = field(default_factory=list)


@dataclass
class _Prepared:
    data: datalib.TrainingData
    tokenizer: Any
    source: str
    base_name: str
    train: Any
    validation: Any
    train_y: list[int]
    val_y: np.ndarray


Progress = Callable[[str, dict[str, Any]], None]


def _noop(stage: str, fields: dict[str, Any]) -> None:
    # Prefixed: a field called `name` or `message` would collide with LogRecord's own attributes.
    log.info(stage, extra={f"job_{key}": value for key, value in fields.items()})


def load_tokenizer(source: str, name: str) -> Any:
    """The base model's fast tokenizer; a clear error when it cannot be found."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise NotFound(
            "base model",
            name,
            f"pass a local folder or a Hugging Face model id "
            f"reachable from this machine ({err.__class__.__name__})",
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidInput(
            f"base model '{name}' has no fast tokenizer; the serving path needs tokenizer.json",
            base_model=name,
        )
    return tokenizer


def prepare(request: TrainRequest) -> _Prepared:
    """Data checks first (cheap), then the tokenizer; encode both sets once."""
    checks = datalib.DataChecks(min_rows_per_class=request.min_rows_per_class)
    data = datalib.prepare(
        request.data,
        request.validation,
        text_column=request.text_column,
        label_column=request.label_column,
        validation_fraction=request.validation_fraction,
        seed=request.train.seed,
        checks=checks,
    )
    source, base_name = resolve_base_model(request.base_model)
    tokenizer = load_tokenizer(source, base_name)
    index = {label: i for i, label in enumerate(data.labels)}
    max_length = request.train.max_length
    return _Prepared(
        data=data,
        tokenizer=tokenizer,
        source=source,
        base_name=request.base_model_label or base_name,
        train=encode(tokenizer, data.train.texts, max_length),
        validation=encode(tokenizer, data.validation.texts, max_length),
        train_y=[index[x] for x in data.train.labels],
        val_y=np.asarray([index[x] for x in data.validation.labels]),
    )


@contextmanager
def _run(
    registry: Registry | None, experiment_id: str, name: str, parent: RunLog | None = None
) -> Iterator[RunLog]:
    """An MLflow run (or a stand-in when not registering), marked FAILED if the block raises."""
    log_ = NoRunLog() if registry is None else RunLog.start(registry, experiment_id, name, parent)
    ok = False
    try:
        yield log_
        ok = True
    finally:
        log_.finish(ok)


def _train_once(
    prep: _Prepared,
    config: TrainConfig,
    run: RunLog,
    show_progress: bool,
    should_stop: Callable[[EpochRecord], bool] | None = None,
    progress: Progress | None = None,
) -> tuple[SentenceClassifier, TrainResult]:
    seed_everything(config.seed)  # the head's initial weights come from the seed too
    model = build_classifier(prep.source, len(prep.data.labels), config.dropout)
    _continue_head(model, Path(prep.source), prep.data.labels)
    pad_id = int(prep.tokenizer.pad_token_id or 0)
    device = select_device(config.device)
    labels = prep.data.labels

    def score(m: SentenceClassifier) -> dict[str, float]:
        logits, _ = predict(m, prep.validation, pad_id, device, config.eval_batch_size)
        ev = evaluate(softmax(logits), prep.val_y, labels)
        return {"accuracy": ev.accuracy, "macro_f1": ev.macro_f1}

    def record(r: EpochRecord) -> None:
        values = {f"val_{k}": v for k, v in r.metrics.items()}
        values.update(
            train_loss=r.train_loss, examples_per_second=r.examples_per_second, epoch=r.epoch
        )
        run.metrics(values, step=r.step)
        if progress is not None:
            progress(
                "epoch",
                {
                    "epoch": r.epoch,
                    "epochs": config.epochs,
                    "step": r.step,
                    "loss": r.train_loss,
                    "examples_per_second": r.examples_per_second,
                    "metrics": dict(r.metrics),
                },
            )

    trainer = Trainer(
        model,
        config,
        pad_id,
        score,
        on_eval=record,
        show_progress=show_progress,
        should_stop=should_stop,
    )
    return model, trainer.fit(prep.train, prep.train_y)


def _continue_head(model: SentenceClassifier, source: Path, labels: list[str]) -> None:
    """Starting from a Loopline checkpoint with the same labels, keep its trained head too:
    continuing from a served version means continuing all of it, not only the encoder."""
    head, known = source / HEAD_FILE, source / LABELS_FILE
    if not (head.is_file() and known.is_file()):
        return
    if json.loads(known.read_text()) != list(labels):
        log.info("checkpoint labels differ from the data's: the head starts fresh")
        return
    from safetensors.torch import load_file

    model.head.load_state_dict(load_file(str(head)))


def _search(
    prep: _Prepared,
    request: TrainRequest,
    ctx: _Context,
) -> tuple[SentenceClassifier, TrainResult, TrainConfig, list[dict[str, Any]]]:
    def train(
        config: TrainConfig, number: int, should_stop: Callable[[EpochRecord], bool]
    ) -> tuple[SentenceClassifier, TrainResult]:
        ctx.progress("trial", {"trial": number, **config.model_dump(include=_SEARCHED)})
        with _run(ctx.registry, ctx.experiment_id, f"trial-{number}", ctx.parent) as run:
            run.params(config.model_dump())
            model, result = _train_once(
                prep, config, run, ctx.show_progress, should_stop, ctx.progress
            )
            run.metrics({f"best_{config.metric}": result.best_metric})
            run.tags({"pruned": str(result.pruned), "stopped_early": str(result.stopped_early)})
        ctx.progress("trial done", {"trial": number, "score": result.best_metric})
        return model, result

    found = run_search(train, request.train, request.trials)
    table = [
        {"trial": t.number, "score": t.score, **t.config.model_dump(include=_SEARCHED)}
        for t in found.trials
    ]
    assert found.best.result is not None
    return found.best_model, found.best.result, found.best.config, table


@dataclass
class _Context:
    """Where a job reports to: the registry (or none), the MLflow experiment, the parent run."""

    registry: Registry | None
    experiment_id: str
    progress: Progress
    show_progress: bool
    parent: RunLog | None = None


_SEARCHED = {"learning_rate", "epochs", "batch_size", "warmup_ratio", "weight_decay"}


def _parity(
    logits32: np.ndarray,
    model: SentenceClassifier,
    prep: _Prepared,
    package: Path,
    variants: dict[str, str],
    options: exportlib.ExportOptions,
    fallback: Callable[[], None] | None = None,
) -> Parity:
    """Measure the exported graphs against PyTorch on the validation texts; refuse on failure.

    `logits32` are the ONNX fp32 graph's logits for the validation texts, in order. `fallback`
    rewrites the int8 graph block-wise when the one written first fails its gates.
    """
    texts = prep.data.validation.texts
    torch_logits, _ = predict(
        model, prep.validation, int(prep.tokenizer.pad_token_id or 0), torch.device("cpu")
    )
    diff = float(np.abs(logits32 - torch_logits).max())
    agree = float((logits32.argmax(1) == torch_logits.argmax(1)).mean())
    acc32 = float((logits32.argmax(1) == prep.val_y).mean())
    parity = Parity(
        fp32_max_abs_logit_diff=diff,
        fp32_label_agreement=agree,
        fp32_accuracy=acc32,
        texts=len(texts),
    )
    if diff > options.max_abs_logit_diff:
        raise exportlib.ExportRefused(
            f"ONNX fp32 logits differ from PyTorch by {diff:.2e} (limit "
            f"{options.max_abs_logit_diff:.0e}); label agreement {agree:.4f}",
            **parity.model_dump(),
        )
    if "int8" in variants:
        _int8_parity(package, texts, prep.val_y, parity)
        if not _int8_passes(parity, options) and fallback is not None:
            # A static graph that loses accuracy or depends on its batch: block-wise instead.
            log.warning(
                "static int8 failed its gates; exporting block-wise int8 instead",
                extra={"int8_parity": parity.model_dump()},
            )
            fallback()
            _int8_parity(package, texts, prep.val_y, parity)
        _refuse_int8_accuracy(parity, options)
    if "fp16" in variants:
        # Recorded, not gated: fp16 is for GPUs, where the worker checks it at load.
        logits16, _ = PackageRunner(package, "fp16").outputs(texts)
        parity.fp16_max_abs_logit_diff = float(np.abs(logits16 - logits32).max())
        parity.fp16_label_agreement = float((logits16.argmax(1) == logits32.argmax(1)).mean())
    return parity


def _int8_parity(package: Path, texts: list[str], truth: np.ndarray, parity: Parity) -> None:
    """Fill the int8 figures: accuracy, batched (32) vs one-at-a-time differences and flips."""
    int8 = PackageRunner(package, "int8")
    batched, _ = int8.predict(texts, batch_size=32)
    alone = [int8.predict([t], batch_size=1)[0] for t in texts]
    parity.int8_accuracy = float((batched.argmax(1) == truth).mean())
    assert parity.fp32_accuracy is not None
    parity.int8_accuracy_drop_points = round(100 * (parity.fp32_accuracy - parity.int8_accuracy), 3)
    diff, flips = exportlib.batch_independence(batched, alone)
    parity.int8_max_batch_prob_diff, parity.int8_batch_label_flips = diff, flips


# A text's int8 probabilities may move this much between batched and alone (the bar).
INT8_MAX_BATCH_PROB_DIFF = 0.01


def _int8_batch_independent(parity: Parity) -> bool:
    """No label flips and small probability differences between batched and alone."""
    return (
        parity.int8_batch_label_flips == 0
        and parity.int8_max_batch_prob_diff is not None
        and parity.int8_max_batch_prob_diff < INT8_MAX_BATCH_PROB_DIFF
    )


def _int8_drop_allowed(parity: Parity, options: exportlib.ExportOptions) -> float:
    """The int8 accuracy loss allowed, in points: the configured limit, but never less than one
    validation text's worth, since a finer limit cannot be judged on so few texts (one label of
    60 is 1.7 points; on the 1,000-text validation set the 0.5-point default stands). A negative
    limit (int8 must beat fp32) is kept as given."""
    limit = options.max_int8_accuracy_drop_points
    if limit < 0 or not parity.texts:
        return limit
    return max(limit, 100.0 / parity.texts)


def _int8_passes(parity: Parity, options: exportlib.ExportOptions) -> bool:
    """Batch independent and within the accuracy allowance."""
    drop = parity.int8_accuracy_drop_points
    return (
        _int8_batch_independent(parity)
        and drop is not None
        and drop <= _int8_drop_allowed(parity, options)
    )


def _refuse_int8_accuracy(parity: Parity, options: exportlib.ExportOptions) -> None:
    assert parity.int8_accuracy is not None
    assert parity.int8_accuracy_drop_points is not None
    allowed = _int8_drop_allowed(parity, options)
    if parity.int8_accuracy_drop_points > allowed:
        raise exportlib.ExportRefused(
            f"int8 accuracy {parity.int8_accuracy:.4f} is {parity.int8_accuracy_drop_points:.2f} "
            f"points below fp32 {parity.fp32_accuracy:.4f} (limit {allowed:.2f} on "
            f"{parity.texts} texts); export with --no-int8 to ship fp32 only, or raise the limit "
            "(--int8-max-drop, or gate.max_int8_drop_points in a job spec)",
            **parity.model_dump(),
        )


def build_package(
    model: SentenceClassifier,
    prep: _Prepared,
    request: TrainRequest,
    directory: Path,
    evaluation: Evaluation,
) -> Manifest:
    """Write graphs, tokenizer, reference and manifest into `directory` and check parity."""
    directory.mkdir(parents=True, exist_ok=True)
    options = exportlib.ExportOptions(
        int8=request.int8,
        fp16=request.fp16,
        max_int8_accuracy_drop_points=request.int8_max_drop_points,
        max_abs_logit_diff=request.max_export_error,
    )
    pad_id = int(prep.tokenizer.pad_token_id or 0)
    # Static int8 activation scales are calibrated on training text, never on validation text.
    calibration = exportlib.calibration_batches(prep.train.ids, pad_id) if request.int8 else None
    variants, optimization = exportlib.write_graphs(model, directory, options, calibration)
    exportlib.save_tokenizer(prep.tokenizer, directory)
    config = model.config
    manifest = Manifest(
        name=request.name,
        labels=prep.data.labels,
        max_length=request.train.max_length,
        pad_token_id=pad_id,
        unk_token_id=prep.tokenizer.unk_token_id,
        embedding_dim=int(config.hidden_size),
        architecture=str(config.model_type),
        base_model=prep.base_name,
        languages=request.languages,
        variants=variants,
        data_fingerprint=prep.data.fingerprint,
        metrics=evaluation.scalars(),
        code_revision=code_revision(),
        optimization=optimization,
    )
    write_manifest(directory, manifest)
    # One pass of the fp32 graph over the validation texts serves parity and the reference.
    runner = PackageRunner(directory, "fp32")
    texts = prep.data.validation.texts
    logits32, embeddings = runner.outputs(texts)

    def blockwise() -> None:
        fp32, int8 = directory / variants["fp32"], directory / variants["int8"]
        described = exportlib.write_int8(fp32, int8, "blockwise", options, [])
        manifest.optimization = manifest.optimization.split("; int8: ")[0] + "; int8: " + described

    static = "int8" in variants and "int8: static" in optimization
    fallback = blockwise if static else None
    manifest.parity = _parity(logits32, model, prep, directory, variants, options, fallback)
    if "int8" in variants and _int8_batch_independent(manifest.parity):
        manifest.default_cpu_variant = "int8"
    tokens = runner.tokenizer.tokenize(texts)
    reference = build_reference(
        softmax(logits32),
        embeddings,
        [len(t.ids) for t in tokens],
        [t.unknown_share for t in tokens],
        prep.data.labels,
        manifest.max_length,
        manifest.sketch,
        seed=request.train.seed,
    )
    (directory / "reference.json").write_text(json.dumps(reference))
    write_manifest(directory, manifest)
    return manifest


def with_preset(request: TrainRequest) -> TrainRequest:
    """Fill what the job left unset from the base model's preset (today: the max length)."""
    preset = preset_for(request.base_model)
    if preset is None or "max_length" in request.train.model_fields_set:
        return request
    train = request.train.model_copy(update={"max_length": preset.max_length})
    return request.model_copy(update={"train": train})


def run_job(
    request: TrainRequest, progress: Progress = _noop, show_progress: bool = False
) -> JobResult:
    """The whole job. Raises LooplineError subclasses with actionable messages."""
    request = with_preset(request)
    progress("validating data", {"data": str(request.data)})
    prep = prepare(request)
    progress(
        "data ok",
        {
            "train": len(prep.data.train.examples),
            "validation": len(prep.data.validation.examples),
            "labels": prep.data.labels,
            "fingerprint": prep.data.fingerprint[:12],
        },
    )
    registry, experiment_id = None, ""
    if request.register_version:
        if not request.mlflow_uri:
            raise InvalidInput("registering needs an MLflow URI (LOOPLINE_MLFLOW_URI)")
        registry = Registry(request.mlflow_uri)
        experiment_id = registry.ensure_experiment(request.experiment)
    output = request.output or Path(tempfile.mkdtemp(prefix="loopline-train-"))
    ctx = _Context(registry, experiment_id, progress, show_progress)
    with _run(registry, experiment_id, f"{request.name}-train") as run:
        ctx.parent = run
        _log_request(run, request, prep)
        trials: list[dict[str, Any]] = []
        if request.trials > 0:
            model, result, best_config, trials = _search(prep, request, ctx)
            run.params(
                {f"best_{k}": v for k, v in best_config.model_dump(include=_SEARCHED).items()}
            )
        else:
            progress("training", {"base_model": prep.base_name})
            model, result = _train_once(prep, request.train, run, show_progress, None, progress)
        progress("evaluating", {"best_metric": result.best_metric})
        evaluation = _evaluate(model, prep, request.train, output, run)
        progress("exporting", {"output": str(output / "package")})
        save_checkpoint(model, prep.tokenizer, prep.data.labels, output / "checkpoint")
        manifest = build_package(model, prep, request, output / "package", evaluation)
        progress("exported", {"parity": manifest.parity.model_dump() if manifest.parity else {}})
        version = None
        if registry is not None:
            version = _register(registry, request, prep, manifest, output, run)
            progress(
                "registered", {"name": request.name, "version": version, "alias": request.alias}
            )
    return JobResult(
        package_dir=output / "package",
        manifest=manifest,
        evaluation=evaluation,
        train_result=result,
        run_id=run.run_id or None,
        version=version,
        trials=trials,
        validation_texts=prep.data.validation.texts,
        validation_labels=prep.data.validation.labels,
    )


def _log_request(run: RunLog, request: TrainRequest, prep: _Prepared) -> None:
    params = {f"train.{k}": v for k, v in request.train.model_dump().items()}
    params.update(
        data=str(request.data),
        validation=str(request.validation),
        base_model=prep.base_name,
        trials=request.trials,
        train_rows=len(prep.data.train.examples),
        validation_rows=len(prep.data.validation.examples),
        train_truncated=prep.train.truncated,
    )
    run.params(params)
    run.tags(
        {
            "loopline.data_fingerprint": prep.data.fingerprint,
            "loopline.base_model": prep.base_name,
            "loopline.code_revision": code_revision(),
        }
    )
    preset = preset_for(request.base_model)
    if preset is not None:
        run.tags({"loopline.preset": preset.model_id})


def _evaluate(
    model: SentenceClassifier, prep: _Prepared, config: TrainConfig, output: Path, run: RunLog
) -> Evaluation:
    pad_id = int(prep.tokenizer.pad_token_id or 0)
    logits, _ = predict(
        model, prep.validation, pad_id, select_device(config.device), config.eval_batch_size
    )
    evaluation = evaluate(softmax(logits), prep.val_y, prep.data.labels)
    folder = output / "evaluation"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps(evaluation.to_json(), indent=2))
    plot_confusion(evaluation, folder / "confusion_matrix.png")
    run.metrics(evaluation.scalars("final_"))
    run.artifacts(folder, "evaluation")
    return evaluation


def _register(
    registry: Registry,
    request: TrainRequest,
    prep: _Prepared,
    manifest: Manifest,
    output: Path,
    run: RunLog,
) -> str:
    package = output / "package"
    run.artifacts(package, PACKAGE_ARTIFACT_PATH)
    # The trained weights, so a later job can continue from this version (models:/NAME@ALIAS).
    run.artifacts(output / "checkpoint", CHECKPOINT_ARTIFACT_PATH)
    tags = {
        "loopline.data_fingerprint": prep.data.fingerprint,
        "loopline.base_model": prep.base_name,
        "loopline.code_revision": code_revision(),
        "loopline.accuracy": f"{manifest.metrics.get('accuracy', 0.0):.4f}",
    }
    source = f"{run.artifact_uri}/{PACKAGE_ARTIFACT_PATH}"
    version = registry.register(request.name, run.run_id, source, tags, request.alias)
    # The version number exists only now; the manifest in the registry must carry it.
    manifest.version = version
    write_manifest(package, manifest)
    run.artifact(package / "loopline.json", PACKAGE_ARTIFACT_PATH)
    return version
