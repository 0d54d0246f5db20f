"""Fixtures for the real parts every test layer shares."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.redis",
    "tests.fixtures.mlflow_store",
    "tests.fixtures.tiny_models",
    "tests.fixtures.sentiment_text",
    "tests.fixtures.packages",
]

STRAY = ("mlflow.db", "mlruns", "mlartifacts")


@pytest.fixture(scope="session", autouse=True)
def _nothing_written_to_the_working_directory() -> Iterator[None]:
    """MLflow's defaults write `./mlflow.db` and `./mlruns`; our code must never rely on them."""
    before = {name for name in STRAY if Path(name).exists()}
    yield
    stray = {name for name in STRAY if Path(name).exists()} - before
    assert not stray, f"tests wrote MLflow files into the working directory: {sorted(stray)}"
