"""`loopline train` turns flags, environment and a spec file into the TrainRequest it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loopline.errors import InvalidInput
from services.cli.main import app


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Requests `loopline train` would run; the job itself is not run."""
    requests: list[Any] = []

    def run_job(request: Any, **_: Any) -> Any:
        requests.append(request)
        raise InvalidInput("stopped before training")

    monkeypatch.setattr("services.trainer.pipeline.run_job", run_job)
    return requests


def test_the_int8_limit_flag_reaches_the_request(captured: list[Any], tmp_path: Path) -> None:
    args = ["train", "--data", str(tmp_path / "t.jsonl"), "--no-register"]
    CliRunner().invoke(app, [*args, "--int8-max-drop", "2.5"])
    CliRunner().invoke(app, args, env={"LOOPLINE_TRAIN_INT8_MAX_DROP": "-1"})
    CliRunner().invoke(app, args)
    assert [r.int8_max_drop_points for r in captured] == [2.5, -1.0, 0.5]


def test_a_limit_that_is_not_a_number_is_refused(captured: list[Any], tmp_path: Path) -> None:
    args = ["train", "--data", str(tmp_path / "t.jsonl"), "--no-register"]
    result = CliRunner().invoke(app, [*args, "--int8-max-drop", "nan"])
    assert result.exit_code == 2
    assert "int8_max_drop_points" in result.output
    assert captured == []
