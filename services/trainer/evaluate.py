"""Classification metrics from probabilities: accuracy, macro-F1, per class, confusion, ECE."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Evaluation:
    """Every figure we report for one model on one labelled set."""

    labels: list[str]
    accuracy: float
    macro_f1: float
    precision: dict[str, float]
    recall: dict[str, float]
    f1: dict[str, float]
    support: dict[str, int]
    confusion: list[list[int]]
    ece: float
    count: int

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Flat metric names for MLflow and the manifest."""
        out = {
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}macro_f1": self.macro_f1,
            f"{prefix}ece": self.ece,
        }
        for label in self.labels:
            out[f"{prefix}precision_{label}"] = self.precision[label]
            out[f"{prefix}recall_{label}"] = self.recall[label]
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "labels": self.labels,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "support": self.support,
            "confusion_matrix": self.confusion,
            "confusion_axes": "rows = true label, columns = predicted label",
            "expected_calibration_error": self.ece,
            "count": self.count,
        }


def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, bins: int = 15) -> float:
    """Confidence-weighted gap between confidence and accuracy over equal-width bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == truth
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def evaluate(
    probs: np.ndarray, truth: Sequence[int] | np.ndarray, labels: Sequence[str]
) -> Evaluation:
    """All metrics for predicted probabilities against integer truth (index into labels)."""
    y = np.asarray(truth, dtype=np.int64)
    pred = probs.argmax(axis=1)
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    precision, recall, f1, support = {}, {}, {}, {}
    for i, label in enumerate(labels):
        tp = confusion[i, i]
        precision[label] = _ratio(tp, confusion[:, i].sum())
        recall[label] = _ratio(tp, confusion[i, :].sum())
        f1[label] = _ratio(2 * precision[label] * recall[label], precision[label] + recall[label])
        support[label] = int(confusion[i, :].sum())
    return Evaluation(
        labels=list(labels),
        accuracy=float((pred == y).mean()),
        macro_f1=float(np.mean(list(f1.values()))),
        precision=precision,
        recall=recall,
        f1=f1,
        support=support,
        confusion=confusion.tolist(),
        ece=expected_calibration_error(probs, y),
        count=len(y),
    )


def plot_confusion(evaluation: Evaluation, path: Path, title: str = "Confusion matrix") -> Path:
    """A PNG heat map with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(evaluation.confusion)
    size = max(3.5, 0.9 * len(evaluation.labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(evaluation.labels))
    ax.set_xticks(ticks, evaluation.labels, rotation=45, ha="right")
    ax.set_yticks(ticks, evaluation.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {evaluation.accuracy:.3f}, macro-F1 {evaluation.macro_f1:.3f}")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(
            col,
            row,
            str(value),
            ha="center",
            va="center",
            color="white" if value > threshold else "black",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
