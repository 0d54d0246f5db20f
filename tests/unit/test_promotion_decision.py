"""The promotion gate's decision, from figures alone: no packages, no registry, no clock."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.trainer.promotion import Decision, Gate, PackageFigures, decide


def figures(
    accuracy: float,
    latency: float = 4.0,
    *,
    macro_f1: float | None = None,
    version: str | None = "3",
    variant: str = "int8",
) -> PackageFigures:
    metrics = {"accuracy": accuracy, "macro_f1": accuracy if macro_f1 is None else macro_f1}
    return PackageFigures(metrics, latency, batches=4, variant=variant, count=100, version=version)


def test_better_and_not_slower_passes_with_both_figures_in_the_reason() -> None:
    gate = Gate(min_improvement=0.005)
    decision = decide(gate, figures(0.912, 4.1, version="4"), figures(0.897, 3.9))
    assert decision.passed
    assert "accuracy 0.912 >= champion v3 0.897 + 0.005" in decision.reason
    assert "int8 latency 4.10 ms/batch <= 1.25 x 3.90 ms" in decision.reason
    assert decision.compared_version == "3"
    assert decision.figures["candidate_accuracy"] == pytest.approx(0.912)
    assert decision.figures["current_accuracy"] == pytest.approx(0.897)
    assert decision.figures["current_latency_ms"] == pytest.approx(3.9)


def test_worse_candidate_fails_and_says_so_first() -> None:
    decision = decide(Gate(), figures(0.85), figures(0.90))
    assert not decision.passed
    assert decision.reason.startswith("accuracy 0.850 < champion v3 0.900 + 0.000")


@pytest.mark.parametrize(
    ("candidate", "margin", "passed"),
    [
        (0.900, 0.0, True),  # a tie passes when no margin is asked
        (0.940, 0.040, True),  # exactly at the margin (0.9 + 0.04 is a hair above 0.94 in binary)
        (0.939, 0.040, False),  # just short of it
        (0.895, -0.01, True),  # a negative margin tolerates a small regression
        (0.889, -0.01, False),
    ],
)
def test_margin(candidate: float, margin: float, passed: bool) -> None:
    decision = decide(Gate(min_improvement=margin), figures(candidate), figures(0.900))
    assert decision.passed is passed


@pytest.mark.parametrize(
    ("latency", "factor", "passed"),
    [(5.0, 1.25, True), (5.01, 1.25, False), (7.9, 2.0, True), (3.0, 0.5, False)],
)
def test_latency_factor(latency: float, factor: float, passed: bool) -> None:
    gate = Gate(max_latency_factor=factor)
    decision = decide(gate, figures(0.95, latency), figures(0.90, 4.0))
    assert decision.passed is passed
    if not passed:
        assert decision.reason.startswith(f"int8 latency {latency:.2f} ms/batch > {factor:g} x")


def test_faster_but_worse_still_fails() -> None:
    decision = decide(Gate(), figures(0.80, 1.0), figures(0.90, 4.0))
    assert not decision.passed


def test_no_current_version_passes_on_the_floor_alone() -> None:
    decision = decide(Gate(min_value=0.5), figures(0.6, latency=100.0), None)
    assert decision == Decision(
        passed=True,
        reason="accuracy 0.600 >= floor 0.500; no champion to compare with",
        figures=decision.figures,
        compared_version=None,
    )
    assert "current_accuracy" not in decision.figures


def test_floor_applies_with_and_without_a_current_version() -> None:
    gate = Gate(min_value=0.9)
    assert not decide(gate, figures(0.85), None).passed
    lower_champion = decide(gate, figures(0.85), figures(0.5))
    assert not lower_champion.passed
    assert lower_champion.reason.startswith("accuracy 0.850 < floor 0.900")


def test_macro_f1_decides_when_asked() -> None:
    gate = Gate(metric="macro_f1", compare_alias="staging")
    decision = decide(gate, figures(0.95, macro_f1=0.70), figures(0.90, macro_f1=0.80))
    assert not decision.passed
    assert "macro_f1 0.700 < staging v3 0.800" in decision.reason
    assert "candidate_macro_f1" in decision.figures


def test_an_old_champion_without_int8_is_named_by_its_variant() -> None:
    decision = decide(Gate(), figures(0.9, 3.0), figures(0.9, 5.0, variant="fp32"))
    assert "int8 latency 3.00 ms/batch <= 1.25 x fp32 5.00 ms" in decision.reason


def test_gate_defaults_and_proto_zero_values() -> None:
    gate = Gate()
    assert (gate.metric, gate.compare_alias, gate.max_latency_factor) == (
        "accuracy",
        "champion",
        1.25,
    )
    # The proto's "empty / 0 means the default" converts without special cases.
    assert Gate(metric="", compare_alias="", max_latency_factor=0) == gate


@pytest.mark.parametrize(
    "fields",
    [{"metric": "ece"}, {"min_value": 1.5}, {"max_latency_factor": -1}, {"max_export_err": 1}],
)
def test_gate_rejects_bad_fields(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Gate.model_validate(fields)


def test_a_zero_floor_is_left_out_of_a_comparison() -> None:
    reason = decide(Gate(), figures(0.95), figures(0.90)).reason
    assert "floor" not in reason
    assert reason.startswith("accuracy 0.950 >= champion v3 0.900 + 0.000; int8 latency")
