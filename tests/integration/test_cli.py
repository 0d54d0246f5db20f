"""`loopline train` and `loopline models`: exit codes, messages, and the registry they change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from services.cli.main import app
from tests.fixtures.mlflow_store import MlflowStore
from tests.fixtures.packages import TINY_INT8_MAX_DROP_POINTS

runner = CliRunner()

TINY_FLAGS = [
    "--epochs",
    "5",
    "--batch-size",
    "16",
    "--learning-rate",
    "3e-3",
    "--max-length",
    "32",
    "--int8-max-drop",  # a tiny model's int8 graph may flip a label or two; not the point here
    str(TINY_INT8_MAX_DROP_POINTS),
]


def _invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def test_bad_data_exits_2_names_the_row_and_registers_nothing(
    tmp_path: Path, mlflow_store: MlflowStore, tiny_model_factory: object
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "", "label": "b"}\n')
    result = _invoke(
        "train",
        "--data",
        str(bad),
        "--base-model",
        str(tiny_model_factory("bert")),  # type: ignore[operator]
        "--mlflow-uri",
        mlflow_store.tracking_uri,
    )
    assert result.exit_code == 2
    assert "row 2" in result.output
    assert "empty text" in result.output
    assert mlflow_store.client().search_registered_models() == []


def test_missing_data_argument_and_invalid_values(tmp_path: Path) -> None:
    result = _invoke("train")
    assert result.exit_code == 2
    assert "--data" in result.output
    data = tmp_path / "d.jsonl"
    data.write_text("")
    result = _invoke("train", "--data", str(data), "--epochs", "0", "--no-register")
    assert result.exit_code == 2
    assert "train.epochs" in result.output


def test_unknown_base_model_folder_is_not_found(
    tmp_path: Path, sentiment_files: tuple[Path, Path]
) -> None:
    result = _invoke(
        "train",
        "--data",
        str(sentiment_files[0]),
        "--base-model",
        str(tmp_path / "no-such-model"),
        "--no-register",
    )
    assert result.exit_code == 3
    assert "base model" in result.output


def test_train_then_promote_and_rollback(
    tmp_path: Path,
    mlflow_store: MlflowStore,
    tiny_model_factory: object,
    sentiment_files: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOOPLINE_MLFLOW_URI", mlflow_store.tracking_uri)
    base = str(tiny_model_factory("bert"))  # type: ignore[operator]
    versions = []
    for i in range(2):
        result = _invoke(
            "train",
            "--data",
            str(sentiment_files[0]),
            "--validation",
            str(sentiment_files[1]),
            "--base-model",
            base,
            "--name",
            "cli",
            "--output",
            str(tmp_path / f"run{i}"),
            "--json",
            *TINY_FLAGS,
        )
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        versions.append(summary["version"])
        assert summary["parity"]["fp32_max_abs_logit_diff"] < 1e-3
    assert versions == ["1", "2"]

    result = _invoke("models", "promote", "cli", "1")
    assert result.exit_code == 0
    assert result.stdout.strip() == "cli@champion -> version 1"
    result = _invoke("models", "promote", "cli", "2")
    assert "(was 1)" in result.output
    result = _invoke("models", "rollback", "cli")
    assert result.exit_code == 0
    assert "version 1 (was 2)" in result.output
    client = mlflow_store.client()
    assert str(client.get_model_version_by_alias("cli", "champion").version) == "1"

    result = _invoke("models", "list", "cli", "--json")
    assert result.exit_code == 0
    listed = {v["version"]: v["aliases"] for v in json.loads(result.stdout)}
    assert listed == {"1": ["champion"], "2": ["challenger"]}


def test_rollback_without_history_and_unknown_models(mlflow_store: MlflowStore) -> None:
    result = _invoke("models", "rollback", "nope", "--mlflow-uri", mlflow_store.tracking_uri)
    assert result.exit_code == 3
    assert "'nope' not found" in result.output
    result = _invoke("models", "promote", "nope", "1", "--mlflow-uri", mlflow_store.tracking_uri)
    assert result.exit_code == 3


def test_spec_file_fields_with_flags_taking_precedence(
    tmp_path: Path, tiny_model_factory: object, sentiment_files: tuple[Path, Path]
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"data: {sentiment_files[0]}\n"
        f"validation: {sentiment_files[1]}\n"
        f"base_model: {tiny_model_factory('bert')}\n"  # type: ignore[operator]
        "name: from-spec\n"
        "int8: false\n"
        "train:\n  epochs: 1\n  batch_size: 16\n  max_length: 24\n"
    )
    result = _invoke(
        "train",
        "--spec",
        str(spec),
        "--max-length",
        "16",
        "--no-register",
        "--output",
        str(tmp_path / "out"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "package" / "loopline.json").read_text())
    assert manifest["name"] == "from-spec"
    assert manifest["max_length"] == 16
    assert set(manifest["variants"]) == {"fp32"}


def test_unreadable_spec_is_invalid_input(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("- just\n- a list\n")
    result = _invoke("train", "--spec", str(spec))
    assert result.exit_code == 2
    assert "must be a mapping" in result.output


def test_misspelt_spec_field_is_named(tmp_path: Path, sentiment_files: tuple[Path, Path]) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(f"data: {sentiment_files[0]}\nepocs: 3\n")
    result = _invoke("train", "--spec", str(spec), "--no-register")
    assert result.exit_code == 2
    assert "epocs" in result.output
