"""Retraining triggers in a real Redis: the derived spec, the cooldown, dry runs, the history."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from loopline.errors import InvalidInput, NotFound, NotReady
from loopline.jobspec import parse_spec
from loopline.redis import connect
from services.monitor.alerts import AlertBook
from services.monitor.handlers import References
from services.monitor.retrain import Retrainer, derive_spec
from tests.fixtures.mlflow_store import MlflowStore
from tests.fixtures.packages import register_package

BASE: dict[str, Any] = {
    "name": "placeholder",
    "data": [{"file": "train.jsonl"}, {"feedback": {"mix_ratio": 0.3}}],
    "validation": "validation.jsonl",
    "promotion": "gate",
    "gate": {"metric": "accuracy"},
}


def test_the_derived_spec_is_a_valid_challenger_job_on_recent_feedback() -> None:
    spec = derive_spec(BASE, "sentiment", since=1_700_000_000.0)
    parsed = parse_spec(spec)  # what the trainer will accept
    assert (parsed.name, parsed.alias, parsed.base_model) == (
        "sentiment",
        "challenger",
        "models:/sentiment@champion",
    )
    feedback = parsed.data[1].feedback
    assert feedback is not None
    assert feedback.since is not None
    assert feedback.since.timestamp() == 1_700_000_000.0
    assert BASE["data"][1]["feedback"] == {"mix_ratio": 0.3}  # the base is not modified


def test_a_flapping_alert_submits_once_within_the_cooldown(redis_url: str) -> None:
    submitted: list[tuple[str, str]] = []

    async def submit(spec: dict[str, Any], key: str) -> str:
        submitted.append((spec["name"], key))
        return f"job-{len(submitted)}"

    async def scenario() -> None:
        client = connect(redis_url)
        book = AlertBook(client)
        retrainer = Retrainer(client, submit, BASE, cooldown_seconds=3600, book=book)
        first = await retrainer.trigger("sentiment", "drift", alert_id="1-0")
        again = await retrainer.trigger("sentiment", "drift", alert_id="2-0")
        dry = await retrainer.trigger("sentiment", "manual", dry_run=True)
        forced = await retrainer.trigger("sentiment", "manual", force=True)
        other = await retrainer.trigger("toxicity", "drift", alert_id="3-0")
        assert (first.submitted, first.job_id) == (True, "job-1")
        assert not again.submitted
        assert "cooldown" in again.why_not
        assert (dry.submitted, dry.why_not) == (False, "dry run")
        assert dry.spec["alias"] == "challenger"
        assert forced.submitted
        assert other.submitted
        assert submitted[0] == ("sentiment", "monitor-sentiment-1-0")
        history = await retrainer.history()
        assert [t.submitted for t in history] == [True, True, False, False, True]
        listed = [a for a in await book.history() if a.kind == "retraining"]
        assert [a.fields["job_id"] for a in listed] == ["job-3", "job-2", "job-1"]
        await client.aclose()

    asyncio.run(scenario())


def test_without_a_spec_or_trainer_nothing_is_submitted(redis_url: str) -> None:
    async def scenario() -> None:
        client = connect(redis_url)
        none = await Retrainer(client, None, None, 0).trigger("m", "drift")
        assert (none.submitted, none.why_not) == (False, "no retraining spec configured")
        no_trainer = await Retrainer(client, None, BASE, 0).trigger("m", "drift")
        assert no_trainer.why_not == "no trainer configured"
        await client.aclose()

    asyncio.run(scenario())


def test_a_triggered_job_takes_feedback_since_the_version_was_registered(
    mlflow_store: MlflowStore, tiny_package: Path, tmp_path: Path
) -> None:
    before = time.time()
    version = register_package(mlflow_store.tracking_uri, tiny_package, "drifting")
    after = time.time()
    references = References(mlflow_store.tracking_uri, tmp_path)

    since = asyncio.run(references.trained_at("drifting", version))
    assert since is not None
    assert before - 1 <= since <= after + 1
    spec = derive_spec({"name": "x", "data": [{"feedback": {}}]}, "drifting", since)
    assert datetime.fromisoformat(spec["data"][0]["feedback"]["since"]).timestamp() == since
    # A version the registry does not know: no narrowing rather than no retraining.
    assert asyncio.run(references.trained_at("drifting", "99")) is None


def test_a_refused_submit_is_recorded_and_frees_the_cooldown(redis_url: str) -> None:
    calls: list[str] = []

    async def submit(spec: dict[str, Any], key: str) -> str:
        calls.append(key)
        if len(calls) == 1:
            raise ConnectionError("trainer unreachable")
        return "job-2"

    async def scenario() -> None:
        client = connect(redis_url)
        retrainer = Retrainer(client, submit, BASE, cooldown_seconds=3600)
        failed = await retrainer.trigger("sentiment", "drift", alert_id="1-0")
        assert not failed.submitted
        assert "trainer unreachable" in failed.why_not
        retried = await retrainer.trigger("sentiment", "drift", alert_id="2-0")
        assert (retried.submitted, retried.job_id) == (True, "job-2")  # no cooldown held
        await client.aclose()

    asyncio.run(scenario())


def test_a_spec_file_is_checked_and_its_paths_are_relative_to_it(tmp_path: Path) -> None:
    spec = tmp_path / "specs" / "retrain.yaml"
    spec.parent.mkdir()
    spec.write_text(
        "name: sentiment\ndata:\n  - file: ../data/train.jsonl\n  - feedback: {mix_ratio: 0.3}\n"
        "validation: ../data/validation.jsonl\n"
    )
    loaded = Retrainer.load_spec(spec)
    assert loaded is not None
    assert loaded["data"][0]["file"]["path"] == str(tmp_path / "data" / "train.jsonl")
    assert loaded["validation"]["file"]["path"] == str(tmp_path / "data" / "validation.jsonl")

    spec.write_text("name: sentiment\ndata: []\n")
    with pytest.raises(InvalidInput, match="data"):
        Retrainer.load_spec(spec)


def test_an_unreachable_registry_is_not_ready_not_a_missing_version(
    mlflow_store: MlflowStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = References(mlflow_store.tracking_uri, tmp_path / "a")
    with pytest.raises(NotFound):
        asyncio.run(missing.load("nobody", "1"))

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    down = References("http://127.0.0.1:1", tmp_path / "b")
    with pytest.raises(NotReady, match="cannot read the reference"):
        asyncio.run(down.load("sentiment", "1"))


@pytest.mark.parametrize(("model", "version"), [("../escape", "1"), ("a/b", "1"), ("m", "../1")])
def test_a_name_that_is_a_path_is_refused_before_it_touches_the_disk(
    mlflow_store: MlflowStore, tmp_path: Path, model: str, version: str
) -> None:
    home = tmp_path / "monitor"
    references = References(mlflow_store.tracking_uri, home / "cache" / "refs")
    with pytest.raises(InvalidInput):
        asyncio.run(references.load(model, version))
    assert not home.exists()  # not even the cache: nothing was created, inside it or out
