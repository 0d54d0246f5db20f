"""MLflow runs for training jobs, driven through the client API (no global MLflow state)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loopline.registry import Registry


def code_revision() -> str:
    """The git commit this code runs from, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


class RunLog:
    """One MLflow run driven through the client API: no global MLflow state is touched, so the
    trainer can run inside a service (or a test) that talks to another store at the same time."""

    def __init__(self, client: Any, run_id: str, artifact_uri: str) -> None:
        self.client = client
        self.run_id = run_id
        self.artifact_uri = artifact_uri.rstrip("/")

    @classmethod
    def start(
        cls, registry: Registry, experiment_id: str, name: str, parent: RunLog | None = None
    ) -> RunLog:
        tags = {"mlflow.runName": name}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent.run_id
        run = registry.client.create_run(experiment_id, run_name=name, tags=tags)
        return cls(registry.client, run.info.run_id, run.info.artifact_uri)

    def params(self, values: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:6000]) for k, v in values.items()]
        for start in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[start : start + 100])

    def metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def tags(self, values: Mapping[str, str]) -> None:
        for key, value in values.items():
            self.client.set_tag(self.run_id, key, value)

    def artifacts(self, local_dir: Path, path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), path)

    def artifact(self, local_file: Path, path: str) -> None:
        self.client.log_artifact(self.run_id, str(local_file), path)

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class NoRunLog(RunLog):
    """Stands in when nothing is to be registered: every call does nothing."""

    def __init__(self) -> None:
        super().__init__(None, "", "")

    def params(self, values: Mapping[str, object]) -> None:
        return None

    def metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        return None

    def tags(self, values: Mapping[str, str]) -> None:
        return None

    def artifacts(self, local_dir: Path, path: str) -> None:
        return None

    def artifact(self, local_file: Path, path: str) -> None:
        return None

    def finish(self, ok: bool) -> None:
        return None
