"""`loopline train`: fine-tune, export and register a classifier on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from loopline.errors import InvalidInput
from services.cli.common import console, out, reports_errors
from services.cli.common import mlflow_uri as resolve_mlflow_uri

HELP = (
    "Fine-tune a classifier on labelled text, export a model package (ONNX fp32 + int8, "
    "tokenizer, reference) and register it in MLflow."
)


def _opt(help_text: str, env: str, *names: str) -> Any:
    return typer.Option(*names, help=help_text, envvar=f"LOOPLINE_TRAIN_{env}")


def load_spec_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise InvalidInput(f"cannot read spec {path}: {err}", spec=str(path)) from None
    if not isinstance(loaded, dict):
        raise InvalidInput(f"spec {path} must be a mapping of fields", spec=str(path))
    return loaded


def _request(fields: dict[str, Any], recipe: dict[str, Any], spec: Path | None) -> Any:
    from pydantic import ValidationError

    from services.trainer.pipeline import TrainRequest

    base = load_spec_file(spec) if spec else {}
    base.update({k: v for k, v in fields.items() if v is not None})
    base.setdefault("train", {}).update({k: v for k, v in recipe.items() if v is not None})
    if base.get("register_version", True):
        base["mlflow_uri"] = resolve_mlflow_uri(base.get("mlflow_uri"))
    try:
        return TrainRequest.model_validate(base)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise InvalidInput(f"invalid training arguments: {problems}") from None


@reports_errors
def train(
    data: Annotated[
        Path | None, _opt("Training file (JSONL, CSV or Parquet).", "DATA", "--data")
    ] = None,
    validation: Annotated[
        Path | None,
        _opt("Validation file; default: a stratified split.", "VALIDATION", "--validation"),
    ] = None,
    spec: Annotated[
        Path | None, _opt("YAML file with the same fields as the flags.", "SPEC", "--spec")
    ] = None,
    text_column: Annotated[
        str | None, _opt("Column holding the text.", "TEXT_COLUMN", "--text-column")
    ] = None,
    label_column: Annotated[
        str | None, _opt("Column holding the label.", "LABEL_COLUMN", "--label-column")
    ] = None,
    base_model: Annotated[
        str | None,
        _opt(
            "Hugging Face id or local folder; default all-MiniLM-L6-v2 (offline).",
            "BASE_MODEL",
            "--base-model",
        ),
    ] = None,
    name: Annotated[str | None, _opt("Registered model name.", "NAME", "--name")] = None,
    alias: Annotated[str | None, _opt("Alias for the new version.", "ALIAS", "--alias")] = None,
    output: Annotated[
        Path | None, _opt("Folder for package, checkpoint and evaluation.", "OUTPUT", "--output")
    ] = None,
    epochs: Annotated[int | None, _opt("Maximum epochs.", "EPOCHS", "--epochs")] = None,
    trials: Annotated[
        int | None, _opt("Optuna trials (0 = one run).", "TRIALS", "--trials")
    ] = None,
    max_length: Annotated[
        int | None, _opt("Tokens per text.", "MAX_LENGTH", "--max-length")
    ] = None,
    seed: Annotated[int | None, _opt("Random seed.", "SEED", "--seed")] = None,
    learning_rate: Annotated[
        float | None, _opt("Peak encoder learning rate.", "LEARNING_RATE", "--learning-rate")
    ] = None,
    batch_size: Annotated[
        int | None, _opt("Examples per step.", "BATCH_SIZE", "--batch-size")
    ] = None,
    device: Annotated[str | None, _opt("auto, cuda, mps or cpu.", "DEVICE", "--device")] = None,
    precision: Annotated[
        str | None, _opt("auto, fp32, fp16 or bf16.", "PRECISION", "--precision")
    ] = None,
    int8: Annotated[
        bool | None,
        _opt("Export the int8 CPU variant [default: yes].", "INT8", "--int8/--no-int8"),
    ] = None,
    int8_max_drop: Annotated[
        float | None,
        _opt(
            "Int8 accuracy points it may lose against fp32 before the export is refused "
            "[default: 0.5; never under one validation text's worth].",
            "INT8_MAX_DROP",
            "--int8-max-drop",
        ),
    ] = None,
    fp16: Annotated[
        bool | None,
        _opt("Export the fp16 GPU variant [default: no].", "FP16", "--fp16/--no-fp16"),
    ] = None,
    register: Annotated[
        bool | None,
        _opt(
            "Register the version in MLflow [default: yes].", "REGISTER", "--register/--no-register"
        ),
    ] = None,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(
            "--mlflow-uri", envvar="LOOPLINE_MLFLOW_URI", help="MLflow tracking/registry URI."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    submit: Annotated[
        bool,
        typer.Option(
            "--submit",
            help="Send --spec (a trainer job spec) to the trainer service instead of training "
            "here.",
            rich_help_panel="Trainer service",
        ),
    ] = False,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Submit and follow the job to its end; exit 0 only if it succeeded.",
            rich_help_panel="Trainer service",
        ),
    ] = False,
    trainer: Annotated[
        str,
        typer.Option(
            "--trainer",
            envvar="LOOPLINE_TRAINER_ADDRESS",
            help="Trainer service address, host:port.",
            rich_help_panel="Trainer service",
        ),
    ] = "127.0.0.1:8002",
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="LOOPLINE_ADMIN_TOKEN",
            help="Admin token for the trainer service.",
            rich_help_panel="Trainer service",
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="Submitting again with the same key returns the existing job.",
            rich_help_panel="Trainer service",
        ),
    ] = None,
) -> None:
    """Validate the data, fine-tune, evaluate, export and register (here, or with --submit /
    --wait on the trainer service)."""
    if submit or wait:
        from services.cli.submit import submit as submit_job

        if spec is None:
            raise InvalidInput("--submit and --wait take a job spec: give --spec SPEC.yaml")
        submit_job(spec, trainer, token, idempotency_key, wait, as_json)
        return
    from services.trainer.pipeline import run_job

    fields = dict(
        data=data,
        validation=validation,
        text_column=text_column,
        label_column=label_column,
        base_model=base_model,
        name=name,
        alias=alias,
        output=output,
        trials=trials,
        int8=int8,
        int8_max_drop_points=int8_max_drop,
        fp16=fp16,
        register_version=register,
        mlflow_uri=mlflow_uri,
    )
    recipe = dict(
        epochs=epochs,
        max_length=max_length,
        seed=seed,
        learning_rate=learning_rate,
        batch_size=batch_size,
        device=device,
        precision=precision,
    )
    if data is None and spec is None:
        raise InvalidInput("give --data FILE (or --spec SPEC.yaml)")
    request = _request(fields, recipe, spec)

    def progress(stage: str, info: dict[str, Any]) -> None:
        if not as_json:
            details = " ".join(f"{k}={v}" for k, v in info.items() if k != "parity")
            console.print(f"[bold cyan]{stage}[/] {details}", highlight=False)

    result = run_job(request, progress=progress, show_progress=not as_json)
    _report(result, as_json)


def _report(result: Any, as_json: bool) -> None:
    manifest = result.manifest
    summary = {
        "name": manifest.name,
        "version": result.version,
        "run_id": result.run_id,
        "package": str(result.package_dir),
        "accuracy": result.evaluation.accuracy,
        "macro_f1": result.evaluation.macro_f1,
        "ece": result.evaluation.ece,
        "parity": manifest.parity.model_dump() if manifest.parity else None,
        "best_epoch": result.train_result.best_epoch,
        "train_seconds": round(result.train_result.seconds, 1),
        "trials": result.trials,
    }
    if as_json:
        out.print_json(json.dumps(summary))
        return
    table = Table("figure", "value", title=f"{manifest.name} v{result.version or '-'}")
    for key in ("accuracy", "macro_f1", "ece", "best_epoch", "train_seconds", "package"):
        value = summary[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    if manifest.parity is not None:
        for key, value in manifest.parity.model_dump().items():
            if value is not None:
                table.add_row(
                    f"parity.{key}", f"{value:.4g}" if isinstance(value, float) else str(value)
                )
    out.print(table)
