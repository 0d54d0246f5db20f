"""`loopline demo --profile quick`: the whole loop with real processes and a tiny base model.

The same code as `make demo`, with fewer sentences: the launcher trains v1, the trainer v2, the
router runs the experiment with a shadow arm, the monitor folds traffic and feedback, fires the
drift alert on Yelp text and submits the retraining job, the gate judges it, the registry moves
the champion forward and back under traffic, and the report is written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from loopline.registry import Registry
from services.demo.figures import DemoFigures


@pytest.mark.slow
def test_the_quick_demo_runs_the_loop_and_writes_its_report(
    tmp_path: Path, tiny_model_factory: Callable[[str], Path]
) -> None:
    home = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["LOOPLINE_ADMIN_TOKEN"] = "demo-admin-token"  # every admin call must carry it
    for name in ("LOOPLINE_REDIS_URL", "LOOPLINE_MLFLOW_URI"):
        env.pop(name, None)
    command = [sys.executable, "-m", "services.cli.main", "demo", "--profile", "quick"]
    command += ["--home", str(home), "--base-model", str(tiny_model_factory("bert"))]
    done = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    report = home / "report.html"
    assert report.is_file()
    assert str(report) in done.stdout
    figures = DemoFigures.from_json((home / "figures.json").read_text())
    assert [s.number for s in figures.steps] == [1, 2, 3, 4, 5, 6]

    # The experiment: both live arms and the shadow arm measured, with labels.
    arms = {v.variant: v for v in figures.variants}
    assert set(arms) == {"control", "candidate", "candidate-shadow"}
    assert arms["candidate-shadow"].shadow
    assert all(v.requests > 0 and v.labelled > 0 for v in arms.values())
    assert (arms["control"].version, arms["candidate"].version) == ("1", "2")
    assert figures.recommendation

    # Drift on Yelp text fired an alert, which submitted the job that made v3.
    kinds = {(a.kind, a.state) for a in figures.alerts}
    assert ("DRIFT", "FIRING") in kinds
    assert any(a.kind == "RETRAINING" for a in figures.alerts)
    assert any(point.drifted for point in figures.drift)
    assert set(figures.versions) == {"1", "2", "3"}
    assert figures.gate

    # Promotion and rollback under traffic: v3 answered in between, nothing failed.
    swaps = [r for r in figures.requests if r.phase == "promotion"]
    assert {r.version for r in swaps} >= {"1", "3"}
    assert figures.requests_during_swaps == len(swaps) > 0
    assert figures.failed_during_swaps == 0
    assert figures.failed == 0
    registry = Registry(f"sqlite:///{home / 'mlflow.db'}")
    assert registry.alias_version("sentiment", "champion") == "1"

    # Nothing of the stack outlives the demo.
    leftovers = subprocess.run(
        ["pgrep", "-f", str(home)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert leftovers == []
