"""Where the launcher's first champion gets its text: ../shared/data, else Rotten Tomatoes through
`datasets` (faked here: no network in tests), else a message that says what to set."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from loopline.errors import FailedPrecondition
from services.launcher import champion
from services.launcher.champion import champion_spec, training_text


class FakeSplit:
    """The bits of a `datasets.Dataset` the launcher uses: shuffle, iteration, label names."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        label = types.SimpleNamespace(names=["neg", "pos"])
        self.features = {"label": label}

    def shuffle(self, seed: int) -> FakeSplit:
        return FakeSplit(list(reversed(self.rows)))

    def __iter__(self) -> Any:
        return iter(self.rows)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load: Any) -> None:
    module = types.ModuleType("datasets")
    module.load_dataset = load  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


def _nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(champion, "find_data_dir", lambda explicit: None)


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_shared_data_is_used_first_and_cut_to_the_count(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "movie_reviews").mkdir(parents=True)
    lines = [json.dumps({"text": f"t{n}", "label": "positive"}) for n in range(10)]
    (data / "movie_reviews" / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "movie_reviews" / "validation.jsonl").write_text(lines[0] + "\n")

    text = training_text(tmp_path / "home", data, count=4)

    assert [r["text"] for r in _rows(text.train)] == ["t0", "t1", "t2", "t3"]
    assert text.validation == data / "movie_reviews" / "validation.jsonl"
    spec = champion_spec("sentiment", text, epochs=1, max_length=64, base_model="")
    assert spec["alias"] == "champion"
    assert spec["promotion"] == "always"
    assert "base_model" not in spec  # the trainer's default


def test_a_data_dir_without_movie_reviews_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match=r"movie_reviews/train\.jsonl"):
        training_text(tmp_path / "home", tmp_path, count=4)


def test_without_shared_data_rotten_tomatoes_comes_through_datasets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nowhere(monkeypatch)
    asked: list[str] = []

    def load(name: str) -> dict[str, FakeSplit]:
        asked.append(name)
        rows = [{"text": f"s{n}", "label": n % 2} for n in range(6)]
        return {"train": FakeSplit(rows), "validation": FakeSplit(rows[:2])}

    _fake_datasets(monkeypatch, load)
    text = training_text(tmp_path / "home", None, count=3)

    assert asked == ["cornell-movie-review-data/rotten_tomatoes"]
    assert text.data_dir is None
    assert _rows(text.train) == [
        {"text": "s5", "label": "pos"},
        {"text": "s4", "label": "neg"},
        {"text": "s3", "label": "pos"},
    ]
    assert len(_rows(text.validation)) == 2


def test_without_data_or_network_the_message_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nowhere(monkeypatch)

    def offline(name: str) -> None:
        raise ConnectionError("no route to huggingface.co")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(FailedPrecondition) as caught:
        training_text(tmp_path / "home", None, count=3)
    assert "ConnectionError: no route to huggingface.co" in caught.value.message
    assert "LOOPLINE_UP_DATA_DIR" in caught.value.message

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(FailedPrecondition, match="pip install datasets"):
        training_text(tmp_path / "home", None, count=3)


def test_without_text_the_stack_still_starts_but_alerts_do_not_retrain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.launcher.settings import LauncherSettings
    from services.launcher.stack import Stack
    from services.launcher.supervisor import ChildSpec

    _nowhere(monkeypatch)
    monkeypatch.setitem(sys.modules, "datasets", None)
    said: list[str] = []
    started: list[ChildSpec] = []
    stack = Stack(LauncherSettings(home=tmp_path), on_event=said.append, environ={})
    monkeypatch.setattr(stack, "_start", started.append)

    stack._trainer_and_monitor()

    assert [spec.name for spec in started] == ["trainer", "monitor"]
    monitor_env = started[1].env
    assert "LOOPLINE_MONITOR_RETRAIN_SPEC" not in monitor_env
    assert monitor_env["LOOPLINE_MONITOR_TRAINER_ADDRESS"] == "127.0.0.1:8002"
    assert any("alerts will not start retraining" in line for line in said)
