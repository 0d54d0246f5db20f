"""Job specs: strict validation naming each field, the YAML shorthands, the proto round trip."""

from __future__ import annotations

from typing import Any

import pytest

from loopline.errors import InvalidInput
from loopline.jobspec import job_spec, parse_spec, spec_pb
from loopline.v1 import trainer_pb2 as pb

BASE: dict[str, Any] = {
    "name": "sentiment",
    "alias": "champion",
    "data": [{"file": "train.jsonl"}, {"feedback": {"mix_ratio": 0.3}}],
    "validation": "validation.jsonl",
    "promotion": "gate",
    "gate": {"metric": "accuracy", "min_improvement": 0.005},
}


def test_shorthands_and_defaults() -> None:
    spec = parse_spec(BASE)
    assert spec.data[0].file is not None
    assert str(spec.data[0].file.path) == "train.jsonl"
    assert spec.data[1].feedback is not None
    assert spec.data[1].feedback.mix_ratio == 0.3
    assert spec.validation is not None
    assert spec.validation.file is not None
    assert spec.policy == "gate"
    assert spec.gate is not None
    assert spec.gate.max_latency_factor == 1.25


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "bad name!"}, "name"),
        ({"data": []}, "data"),
        ({"data": [{}]}, "data.0"),
        ({"data": [{"file": "a", "feedback": {}}]}, "data.0"),
        ({"epochs": -1}, "epochs"),
        ({"gate": {"metric": "auc"}}, "gate.metric"),
        ({"gate": {"max_int8_drop_points": float("nan")}}, "gate.max_int8_drop_points"),
        ({"hyperparmeters": {}}, "hyperparmeters"),  # misspelt: refused, not ignored
        ({"validation_fraction": 0.2}, "spec"),  # both validation forms
        ({"alias": ""}, "spec"),  # gate without an alias to move
    ],
)
def test_bad_specs_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_spec({**BASE, **change})
    assert field in caught.value.message


@pytest.mark.parametrize(
    ("alias", "promotion", "gate", "policy"),
    [
        ("", "", None, "none"),
        ("challenger", "", None, "always"),
        ("champion", "", {"metric": "accuracy"}, "gate"),
        ("champion", "none", None, "none"),
    ],
)
def test_effective_policy(alias: str, promotion: str, gate: object, policy: str) -> None:
    data = {"name": "m", "data": [{"file": "t.jsonl"}], "alias": alias, "promotion": promotion}
    if gate is not None:
        data["gate"] = gate
    assert parse_spec(data).policy == policy


def test_proto_round_trip_keeps_every_field() -> None:
    spec = parse_spec(
        {
            **BASE,
            "base_model": "models:/sentiment@champion",
            "epochs": 2,
            "trials": 3,
            "max_length": 64,
            "seed": 7,
            "hyperparameters": {"learning_rate": 5e-5, "extra": {"dropout": "0.2"}},
            "tags": {"ticket": "ML-42"},
        }
    )
    message = spec_pb(spec)
    again = job_spec(pb.JobSpec.FromString(message.SerializeToString()))
    assert again == spec


def test_an_empty_proto_source_is_refused() -> None:
    message = pb.JobSpec(name="m", data=[pb.DataSource()])
    with pytest.raises(InvalidInput, match=r"data\.0"):
        job_spec(message)


@pytest.mark.parametrize("points", [0.0, -1.0, 3.5])
def test_the_int8_limit_survives_the_proto_even_when_zero(points: float) -> None:
    spec = parse_spec({**BASE, "gate": {"max_int8_drop_points": points}})
    again = job_spec(pb.JobSpec.FromString(spec_pb(spec).SerializeToString()))
    assert again.gate is not None
    assert again.gate.max_int8_drop_points == points


def test_an_unset_int8_limit_in_the_proto_is_the_default() -> None:
    message = spec_pb(parse_spec(BASE))
    message.gate.ClearField("max_int8_drop_points")
    again = job_spec(pb.JobSpec.FromString(message.SerializeToString()))
    assert again.gate is not None
    assert again.gate.max_int8_drop_points == 0.5


@pytest.mark.parametrize(
    ("gate", "limits"),
    [
        ({"max_export_error": 1e-5, "max_int8_drop_points": 2.0}, (1e-5, 2.0)),
        (None, (1e-3, 0.5)),
    ],
)
def test_the_gates_export_limits_reach_the_exporter(
    gate: dict[str, float] | None, limits: tuple[float, float], tmp_path: Any
) -> None:
    from services.trainer.execute import JobContext, _train_request

    spec = parse_spec({**BASE, "gate": gate, "base_model": ""})
    ctx = JobContext(workdir=tmp_path, mlflow_uri="sqlite:///x.db", redis_url="redis://x")
    request = _train_request(spec, tmp_path / "train.jsonl", None, ctx)
    assert (request.max_export_error, request.int8_max_drop_points) == limits


def test_relative_files_are_anchored_to_the_spec_folder(tmp_path: Any) -> None:
    from pathlib import Path

    from loopline.jobspec import anchor_files

    data = {
        "name": "m",
        "data": [
            {"file": "train.jsonl"},
            {"file": {"path": "/abs/more.csv", "format": "csv"}},
            {"feedback": {"mix_ratio": 0.2}},
        ],
        "validation": "../held/validation.jsonl",
    }
    anchor_files(data, Path(tmp_path) / "specs")
    spec = parse_spec(data)
    assert spec.data[0].file is not None
    assert spec.data[0].file.path == Path(tmp_path) / "specs" / "train.jsonl"
    assert spec.data[1].file is not None
    assert (spec.data[1].file.path, spec.data[1].file.format) == (
        Path("/abs/more.csv"),
        "csv",
    )
    assert spec.data[2].feedback is not None
    assert spec.validation is not None
    assert spec.validation.file is not None
    assert spec.validation.file.path == Path(tmp_path) / "held" / "validation.jsonl"


def test_a_submitted_spec_carries_paths_relative_to_its_file(tmp_path: Any) -> None:
    from pathlib import Path

    from services.cli.submit import _spec_message

    spec = Path(tmp_path) / "specs" / "job.yaml"
    spec.parent.mkdir()
    spec.write_text("name: m\ndata:\n  - file: ../data/train.jsonl\n")
    message = _spec_message(spec)
    assert message.data[0].file.path == str(Path(tmp_path) / "data" / "train.jsonl")


def test_a_feedback_window_past_the_year_9999_is_refused_naming_it() -> None:
    message = pb.JobSpec(name="m", data=[pb.DataSource(feedback=pb.FeedbackSource())])
    message.data[0].feedback.since.seconds = 2**40
    with pytest.raises(InvalidInput) as caught:
        job_spec(message)
    assert caught.value.message.startswith("data.0.feedback.since: ")
