"""Metrics against figures worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.trainer.evaluate import evaluate, expected_calibration_error, plot_confusion


def test_metrics_match_hand_computed_values() -> None:
    # truth:  a a a b b ; predicted: a a b b a
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])
    ev = evaluate(probs, [0, 0, 0, 1, 1], ["a", "b"])
    assert ev.accuracy == pytest.approx(3 / 5)
    assert ev.confusion == [[2, 1], [1, 1]]
    assert ev.precision == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 2)}
    assert ev.recall == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 2)}
    assert ev.macro_f1 == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert ev.support == {"a": 3, "b": 2}


def test_class_never_predicted_gets_zero_not_nan() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2]])
    ev = evaluate(probs, [0, 1], ["a", "b"])
    assert ev.precision["b"] == 0.0
    assert ev.f1["b"] == 0.0


def test_ece_is_zero_when_confidence_equals_accuracy_and_large_when_overconfident() -> None:
    # Four texts at confidence 0.75, three of them right: perfectly calibrated.
    calibrated = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(calibrated, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    overconfident = np.array([[0.99, 0.01]] * 4)
    assert expected_calibration_error(overconfident, np.array([0, 1, 1, 1])) == pytest.approx(0.74)


def test_confusion_plot_is_a_png(tmp_path: Path) -> None:
    ev = evaluate(np.array([[0.9, 0.1], [0.2, 0.8]]), [0, 1], ["neg", "pos"])
    path = plot_confusion(ev, tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
