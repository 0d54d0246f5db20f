"""Gated promotion against a real MLflow store with real packages run by ONNX Runtime.

A clearly better or worse candidate without training twice: the evaluation labels are the tiny
package's own int8 predictions, so the tiny package scores 1.0, and a copy whose manifest lists
the labels in reverse order (same graph, every answer flipped) scores 0.0.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from loopline.errors import InvalidInput
from loopline.package import read_manifest, write_manifest
from loopline.registry import CHAMPION, Registry
from loopline.runtime import PackageRunner
from services.trainer.promotion import (
    Decision,
    Gate,
    Policy,
    evaluate_package,
    evaluate_packages,
    promote,
)
from tests.fixtures.mlflow_store import MlflowStore
from tests.fixtures.packages import register_package
from tests.fixtures.sentiment_text import sentences

pytestmark = pytest.mark.slow

NAME = "tiny"
TEXTS = [row["text"] for row in sentences(80, seed=7)]
# These tests are about accuracy and alias moves, not speed: the latency rule is unit tested
# (test_promotion_decision.py), and a test below trips it on purpose with a factor of 0.01.
LENIENT = Gate(max_latency_factor=1000.0)


@pytest.fixture(scope="module")
def truth(tiny_package: Path) -> list[str]:
    """Labels the tiny package gets entirely right (its own int8 answers)."""
    return PackageRunner(tiny_package, "int8").labels(TEXTS)


@pytest.fixture(scope="module")
def flipped_package(tiny_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny package with its label order reversed: every answer is the other class."""
    copy = tmp_path_factory.mktemp("flipped") / "package"
    shutil.copytree(tiny_package, copy)
    manifest = read_manifest(copy)
    write_manifest(copy, manifest.model_copy(update={"labels": manifest.labels[::-1]}))
    return copy


@pytest.fixture
def registry(mlflow_store: MlflowStore) -> Registry:
    return Registry(mlflow_store.tracking_uri)


def tags(registry: Registry, version: str) -> dict[str, str]:
    found = registry.client.get_model_version(NAME, version)
    return {k: v for k, v in (found.tags or {}).items() if k.startswith("loopline.gate.")}


def run_promote(
    registry: Registry,
    version: str,
    candidate: Path,
    labels: list[str],
    workdir: Path,
    policy: Policy = "gate",
    gate: Gate = LENIENT,
    texts: list[str] = TEXTS,
) -> Decision:
    return promote(
        registry, NAME, version, CHAMPION, policy, gate, texts, labels, candidate, workdir
    )


def test_evaluate_package_serves_int8_with_the_package_runtime(
    tiny_package: Path, truth: list[str]
) -> None:
    figures = evaluate_package(tiny_package, TEXTS, truth)
    assert figures.variant == "int8"
    assert figures.metrics["accuracy"] == 1.0
    assert figures.metrics["macro_f1"] == pytest.approx(1.0)
    assert figures.batches == math.ceil(len(TEXTS) / 32)
    assert figures.count == len(TEXTS)
    assert figures.latency_ms_per_batch > 0


def test_packages_without_int8_fall_back_to_fp32(
    tiny_package: Path, flipped_package: Path, truth: list[str], tmp_path: Path
) -> None:
    fp32_only = tmp_path / "fp32"
    shutil.copytree(tiny_package, fp32_only)
    manifest = read_manifest(fp32_only)
    variants = {"fp32": manifest.variants["fp32"]}
    write_manifest(fp32_only, manifest.model_copy(update={"variants": variants}))
    first, second = evaluate_packages([fp32_only, flipped_package], TEXTS, truth)
    assert (first.variant, second.variant) == ("fp32", "int8")
    assert second.metrics["accuracy"] == 0.0


def test_unknown_evaluation_labels_are_refused(tiny_package: Path) -> None:
    with pytest.raises(InvalidInput, match="not among the package's labels"):
        evaluate_package(tiny_package, TEXTS[:2], ["positive", "sarcastic"])


def test_gate_passes_moves_champion_and_rollback_returns(
    mlflow_store: MlflowStore,
    registry: Registry,
    tiny_package: Path,
    flipped_package: Path,
    truth: list[str],
    tmp_path: Path,
) -> None:
    old = register_package(mlflow_store.tracking_uri, flipped_package, NAME, alias=CHAMPION)
    new = register_package(mlflow_store.tracking_uri, tiny_package, NAME)
    decision = run_promote(registry, new, tiny_package, truth, tmp_path, gate=LENIENT)
    assert decision.passed
    assert registry.alias_version(NAME, CHAMPION) == new
    recorded = tags(registry, new)
    assert recorded["loopline.gate.passed"] == "true"
    assert recorded["loopline.gate.compared_version"] == old
    assert recorded["loopline.gate.candidate_accuracy"] == "1"
    assert recorded["loopline.gate.current_accuracy"] == "0"
    assert float(recorded["loopline.gate.candidate_latency_ms"]) > 0
    assert float(recorded["loopline.gate.current_latency_ms"]) > 0
    assert f"accuracy 1.000 >= champion v{old} 0.000 + 0.000" in recorded["loopline.gate.reason"]
    assert registry.rollback(NAME) == (new, old)
    assert registry.alias_version(NAME, CHAMPION) == old


def test_gate_fails_keeps_champion_and_tags_why(
    mlflow_store: MlflowStore,
    registry: Registry,
    tiny_package: Path,
    flipped_package: Path,
    truth: list[str],
    tmp_path: Path,
) -> None:
    old = register_package(mlflow_store.tracking_uri, tiny_package, NAME, alias=CHAMPION)
    new = register_package(mlflow_store.tracking_uri, flipped_package, NAME)
    decision = run_promote(registry, new, flipped_package, truth, tmp_path)
    assert not decision.passed
    assert registry.alias_version(NAME, CHAMPION) == old
    recorded = tags(registry, new)
    assert recorded["loopline.gate.passed"] == "false"
    assert recorded["loopline.gate.reason"].startswith(
        f"accuracy 0.000 < champion v{old} 1.000 + 0.000"
    )
    assert recorded["loopline.gate.current_accuracy"] == "1"


def test_gate_fails_on_latency_alone(
    mlflow_store: MlflowStore,
    registry: Registry,
    tiny_package: Path,
    truth: list[str],
    tmp_path: Path,
) -> None:
    old = register_package(mlflow_store.tracking_uri, tiny_package, NAME, alias=CHAMPION)
    new = register_package(mlflow_store.tracking_uri, tiny_package, NAME)
    # The same graph cannot run 100x faster than itself.
    gate = Gate(max_latency_factor=0.01)
    decision = run_promote(registry, new, tiny_package, truth, tmp_path, gate=gate)
    assert not decision.passed
    assert registry.alias_version(NAME, CHAMPION) == old
    assert tags(registry, new)["loopline.gate.reason"].startswith("int8 latency")


def test_policy_always_moves_a_worse_candidate_and_says_what_the_gate_thought(
    mlflow_store: MlflowStore,
    registry: Registry,
    tiny_package: Path,
    flipped_package: Path,
    truth: list[str],
    tmp_path: Path,
) -> None:
    old = register_package(mlflow_store.tracking_uri, tiny_package, NAME, alias=CHAMPION)
    new = register_package(mlflow_store.tracking_uri, flipped_package, NAME)
    decision = run_promote(registry, new, flipped_package, truth, tmp_path, policy="always")
    assert decision.passed
    assert registry.alias_version(NAME, CHAMPION) == new
    reason = tags(registry, new)["loopline.gate.reason"]
    assert reason.startswith("policy always: alias moved; the gate would fail: accuracy 0.000")
    assert registry.rollback(NAME) == (new, old)


def test_policy_none_registers_only(
    mlflow_store: MlflowStore,
    registry: Registry,
    tiny_package: Path,
    flipped_package: Path,
    truth: list[str],
    tmp_path: Path,
) -> None:
    old = register_package(mlflow_store.tracking_uri, flipped_package, NAME, alias=CHAMPION)
    new = register_package(mlflow_store.tracking_uri, tiny_package, NAME)
    measured = run_promote(registry, new, tiny_package, truth, tmp_path / "a", policy="none")
    assert not measured.passed
    assert measured.reason.startswith("policy none: alias not moved; the gate would pass")
    # Without evaluation data nothing is downloaded or measured.
    bare = run_promote(registry, new, tiny_package, [], tmp_path / "b", policy="none", texts=[])
    assert bare.reason == "policy none: alias not moved"
    assert not (tmp_path / "b").exists()
    assert registry.alias_version(NAME, CHAMPION) == old
    assert tags(registry, new)["loopline.gate.passed"] == "false"


def test_no_current_champion_passes_on_the_floor_alone(
    mlflow_store: MlflowStore,
    registry: Registry,
    tiny_package: Path,
    flipped_package: Path,
    truth: list[str],
    tmp_path: Path,
) -> None:
    weak = register_package(mlflow_store.tracking_uri, flipped_package, NAME)
    strong = register_package(mlflow_store.tracking_uri, tiny_package, NAME)
    floor = Gate(min_value=0.5)
    refused = run_promote(registry, weak, flipped_package, truth, tmp_path, gate=floor)
    assert not refused.passed
    assert registry.alias_version(NAME, CHAMPION) is None
    accepted = run_promote(registry, strong, tiny_package, truth, tmp_path, gate=floor)
    assert accepted.passed
    assert registry.alias_version(NAME, CHAMPION) == strong
    recorded = tags(registry, strong)
    assert recorded["loopline.gate.reason"] == (
        "accuracy 1.000 >= floor 0.500; no champion to compare with"
    )
    assert recorded["loopline.gate.compared_version"] == ""
    assert "loopline.gate.current_accuracy" not in recorded


def test_gate_without_evaluation_data_is_refused(
    mlflow_store: MlflowStore, registry: Registry, tiny_package: Path, tmp_path: Path
) -> None:
    version = register_package(mlflow_store.tracking_uri, tiny_package, NAME)
    with pytest.raises(InvalidInput, match="needs evaluation texts"):
        run_promote(registry, version, tiny_package, [], tmp_path, texts=[])
    assert tags(registry, version) == {}


def test_a_candidate_already_holding_the_alias_is_not_compared_with_itself(
    mlflow_store: MlflowStore,
    registry: Registry,
    tiny_package: Path,
    truth: list[str],
    tmp_path: Path,
) -> None:
    version = register_package(mlflow_store.tracking_uri, tiny_package, NAME, alias=CHAMPION)
    decision = run_promote(
        registry, version, tiny_package, truth, tmp_path, gate=Gate(min_improvement=0.1)
    )
    assert decision.passed
    assert decision.compared_version is None
    assert registry.alias_version(NAME, CHAMPION) == version
