"""Gated promotion: move an alias to a new version only when it beats the version holding it.

Three policies, as in `PromotionPolicy`: `none` registers only, `always` moves the alias, `gate`
evaluates the candidate and the version currently holding `compare_alias` on the same held-out
texts with each package's own ONNX runtime (what will be served, int8 where the package has it)
and moves the alias only if the candidate's metric clears a floor and beats the current one by a
margin, and its latency per batch is at most a factor slower. Whatever the policy, the decision
and both packages' figures are written as tags on the candidate version, so `loopline models
list` shows why a version is (or is not) champion; the alias moves through `Registry.set_alias`,
which remembers the previous champion, so `loopline models rollback` undoes an automatic promotion.

`decide` is pure (figures in, decision out) and unit tested; measuring is apart from deciding.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from loopline.errors import InvalidInput
from loopline.package import MANIFEST_FILE, Variant, read_manifest
from loopline.registry import PACKAGE_ARTIFACT_PATH, Registry
from loopline.runtime import Batch, PackageRunner, softmax
from services.trainer.evaluate import evaluate

log = logging.getLogger(__name__)

Policy = Literal["none", "gate", "always"]
GateMetric = Literal["accuracy", "macro_f1"]

TAG_PREFIX = "loopline.gate."
DEFAULT_METRIC: GateMetric = "accuracy"
DEFAULT_COMPARE_ALIAS = "champion"
DEFAULT_LATENCY_FACTOR = 1.25
BATCH_SIZE = 32
ROUNDS = 2
# Metrics are means of small counts: `0.94 >= 0.9 + 0.04` must hold although in binary floating
# point 0.9 + 0.04 is a hair above 0.94. A tolerance far below one example's weight allows that.
EPSILON = 1e-9


class Gate(BaseModel):
    """What a candidate must show to take the alias (`PromotionGate` without the export check,
    which the trainer applies before a package exists)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: GateMetric = Field(DEFAULT_METRIC, description="the metric that decides")
    min_value: float = Field(0.0, ge=0.0, le=1.0, description="floor for the candidate's metric")
    min_improvement: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        description="margin over the compared version's metric (negative: tolerated regression)",
    )
    compare_alias: str = Field(DEFAULT_COMPARE_ALIAS, description="alias of the version to beat")
    max_latency_factor: float = Field(
        DEFAULT_LATENCY_FACTOR, gt=0.0, description="allowed slow-down of latency per batch"
    )

    # The proto documents empty and zero as "the default", so a converter can pass fields through.
    @field_validator("metric", "compare_alias", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value == "":
            return DEFAULT_METRIC if info.field_name == "metric" else DEFAULT_COMPARE_ALIAS
        return value

    @field_validator("max_latency_factor", mode="before")
    @classmethod
    def _zero_is_default(cls, value: Any) -> Any:
        return DEFAULT_LATENCY_FACTOR if value == 0 else value


@dataclass(frozen=True)
class PackageFigures:
    """One package measured on one evaluation set."""

    metrics: dict[str, float]
    latency_ms_per_batch: float
    batches: int
    variant: str = "int8"
    count: int = 0
    version: str | None = None


@dataclass(frozen=True)
class Decision:
    """Whether the alias moves (or, under the gate, may move), why, and the figures behind it."""

    passed: bool
    reason: str
    figures: dict[str, float] = field(default_factory=dict)
    compared_version: str | None = None


# --- measuring ------------------------------------------------------------------------------


@dataclass
class _Subject:
    """One package under measurement: its session, its encoding of the shared batches, timings."""

    runner: PackageRunner
    batches: list[Batch]
    truth: np.ndarray
    logits: list[np.ndarray] = field(default_factory=list)
    timings_ms: list[float] = field(default_factory=list)


def _variant_of(directory: Path, wanted: Variant) -> Variant:
    """The wanted variant if the package has it, else fp32 (every package has fp32)."""
    return wanted if wanted in read_manifest(directory).variants else "fp32"


def _session_options() -> Any:
    """ORT defaults, but idle threads sleep instead of spinning.

    Two sessions share this process; with spinning on, the pool of the package just run keeps
    its cores busy for a while and slows whichever package runs next (we saw 8x between
    identical graphs on a shared 2-core machine). Both packages get the same options.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _length_sorted_chunks(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of the shared batches: sorted by character length so padding stays small, as the
    worker's batcher does; characters, not tokens, so every package gets the very same texts."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _subject(
    directory: Path,
    texts: Sequence[str],
    labels: Sequence[str],
    chunks: list[list[int]],
    variant: Variant,
) -> _Subject:
    runner = PackageRunner(directory, _variant_of(directory, variant), _session_options())
    names = runner.manifest.labels
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise InvalidInput(
            f"evaluation labels {unknown} are not among the package's labels {names}",
            package=str(directory),
        )
    index = {name: i for i, name in enumerate(names)}
    # Encoded once, outside the timing: the gate compares graphs, and the multi-threaded
    # tokenizer would only add noise that has nothing to do with the variant.
    batches = [runner.tokenizer.encode([texts[i] for i in chunk]) for chunk in chunks]
    truth = np.asarray([index[labels[i]] for chunk in chunks for i in chunk], dtype=np.int64)
    return _Subject(runner, batches, truth)


def _time_batch(subject: _Subject, position: int) -> None:
    start = time.perf_counter()
    subject.runner.run(subject.batches[position])
    subject.timings_ms.append((time.perf_counter() - start) * 1000.0)


def _measure(subjects: list[_Subject], rounds: int) -> None:
    """One untimed pass per subject for the metrics, then `rounds` timed passes, interleaved.

    The untimed pass doubles as the warm-up: ORT allocates arenas and picks kernels per shape on
    first sight, and every batch shape gets seen. Interleaving the timed batches (A, B, then B, A
    on the next batch) spreads a noisy neighbour or a clock change over both packages alike, and
    alternating who goes first cancels any advantage of running right after the other.
    """
    for subject in subjects:
        subject.logits = [subject.runner.run(batch)[0] for batch in subject.batches]
    for _ in range(rounds):
        for position in range(len(subjects[0].batches)):
            for subject in subjects if position % 2 == 0 else subjects[::-1]:
                _time_batch(subject, position)


def _figures(subject: _Subject) -> PackageFigures:
    probs = softmax(np.concatenate(subject.logits))
    result = evaluate(probs, subject.truth, subject.runner.manifest.labels)
    return PackageFigures(
        metrics={"accuracy": result.accuracy, "macro_f1": result.macro_f1, "ece": result.ece},
        latency_ms_per_batch=statistics.median(subject.timings_ms),
        batches=len(subject.batches),
        variant=subject.runner.variant,
        count=result.count,
        version=subject.runner.manifest.version,
    )


def evaluate_packages(
    package_dirs: Sequence[Path],
    texts: Sequence[str],
    labels: Sequence[str],
    variant: Variant = "int8",
    *,
    batch_size: int = BATCH_SIZE,
    rounds: int = ROUNDS,
) -> list[PackageFigures]:
    """Measure several packages on the same texts and batches, interleaved; figures in order.

    Each package runs `variant` if it has it, else fp32. Latency is the median over every timed
    batch (`rounds` passes over the length-sorted batches of `batch_size`, after one untimed
    pass that gives the metrics).
    """
    if not texts or len(texts) != len(labels):
        raise InvalidInput(
            f"evaluation needs texts and as many labels ({len(texts)} texts, {len(labels)} labels)"
        )
    chunks = _length_sorted_chunks(texts, batch_size)
    subjects = [_subject(Path(d), texts, labels, chunks, variant) for d in package_dirs]
    _measure(subjects, max(1, rounds))
    return [_figures(subject) for subject in subjects]


def evaluate_package(
    package_dir: Path,
    texts: Sequence[str],
    labels: Sequence[str],
    variant: Variant = "int8",
    *,
    batch_size: int = BATCH_SIZE,
    rounds: int = ROUNDS,
) -> PackageFigures:
    """Measure one package (see `evaluate_packages`; compare packages with that instead)."""
    return evaluate_packages(
        [package_dir], texts, labels, variant, batch_size=batch_size, rounds=rounds
    )[0]


# --- deciding -------------------------------------------------------------------------------


def _floor_check(gate: Gate, value: float) -> tuple[bool, str]:
    ok = value + EPSILON >= gate.min_value
    sign = ">=" if ok else "<"
    return ok, f"{gate.metric} {value:.3f} {sign} floor {gate.min_value:.3f}"


def _improvement_check(gate: Gate, value: float, current: PackageFigures) -> tuple[bool, str]:
    baseline = current.metrics[gate.metric]
    ok = value + EPSILON >= baseline + gate.min_improvement
    sign = ">=" if ok else "<"
    who = f"{gate.compare_alias} v{current.version}" if current.version else gate.compare_alias
    return ok, (
        f"{gate.metric} {value:.3f} {sign} {who} {baseline:.3f} + {gate.min_improvement:.3f}"
    )


def _latency_check(
    gate: Gate, candidate: PackageFigures, current: PackageFigures
) -> tuple[bool, str]:
    limit = current.latency_ms_per_batch * gate.max_latency_factor
    ok = candidate.latency_ms_per_batch <= limit
    sign = "<=" if ok else ">"
    # Name the compared variant only when it differs (an old champion without int8).
    other = "" if current.variant == candidate.variant else f"{current.variant} "
    return ok, (
        f"{candidate.variant} latency {candidate.latency_ms_per_batch:.2f} ms/batch {sign} "
        f"{gate.max_latency_factor:g} x {other}{current.latency_ms_per_batch:.2f} ms"
    )


def _decision_figures(
    gate: Gate, candidate: PackageFigures, current: PackageFigures | None
) -> dict[str, float]:
    figures = {
        f"candidate_{gate.metric}": candidate.metrics[gate.metric],
        "candidate_latency_ms": candidate.latency_ms_per_batch,
        "min_value": gate.min_value,
        "min_improvement": gate.min_improvement,
        "max_latency_factor": gate.max_latency_factor,
    }
    if current is not None:
        figures[f"current_{gate.metric}"] = current.metrics[gate.metric]
        figures["current_latency_ms"] = current.latency_ms_per_batch
    return figures


def decide(gate: Gate, candidate: PackageFigures, current: PackageFigures | None) -> Decision:
    """Whether `candidate` may take the alias from `current` (None: nobody holds it).

    Passes when the candidate's metric is at least the floor and, if there is a current version,
    at least its metric plus the margin with latency per batch at most the factor times its.
    The reason names every check with its figures, failing ones first.
    """
    value = candidate.metrics[gate.metric]
    checks = []
    # A floor of 0 says nothing when there is a version to beat; leave it out of the reason.
    if gate.min_value > 0 or current is None:
        checks.append(_floor_check(gate, value))
    if current is None:
        checks.append((True, f"no {gate.compare_alias} to compare with"))
    else:
        checks.append(_improvement_check(gate, value, current))
        checks.append(_latency_check(gate, candidate, current))
    passed = all(ok for ok, _ in checks)
    # Failing parts first: a person reading the tag wants the reason it stopped.
    ordered = sorted(checks, key=lambda check: check[0])
    return Decision(
        passed=passed,
        reason="; ".join(text for _, text in ordered),
        figures=_decision_figures(gate, candidate, current),
        compared_version=current.version if current is not None else None,
    )


# --- promoting ------------------------------------------------------------------------------


def _package_root(downloaded: Path) -> Path:
    """The folder holding the manifest: the download itself, or its `package/` folder."""
    nested = downloaded / PACKAGE_ARTIFACT_PATH
    return nested if (nested / MANIFEST_FILE).is_file() else downloaded


def _measure_pair(
    registry: Registry,
    name: str,
    current_version: str | None,
    candidate_dir: Path,
    texts: Sequence[str],
    labels: Sequence[str],
    workdir: Path,
) -> tuple[PackageFigures, PackageFigures | None]:
    """Figures of the candidate and (when there is one) the compared version, measured together."""
    dirs = [candidate_dir]
    if current_version is not None:
        target = workdir / f"compare-{name}-v{current_version}"
        dirs.append(_package_root(registry.download(name, current_version, target)))
    figures = evaluate_packages(dirs, texts, labels)
    current = replace(figures[1], version=current_version) if len(figures) > 1 else None
    return figures[0], current


def _policy_decision(policy: Policy, gated: Decision | None) -> Decision:
    """Policies other than `gate` decide by themselves; the gate's verdict, when measured, is
    kept in the reason so a person sees what the gate would have done."""
    moved = policy == "always"
    reason = f"policy {policy}: alias {'moved' if moved else 'not moved'}"
    if gated is None:
        return Decision(passed=moved, reason=reason)
    verdict = "would pass" if gated.passed else "would fail"
    return Decision(
        passed=moved,
        reason=f"{reason}; the gate {verdict}: {gated.reason}",
        figures=gated.figures,
        compared_version=gated.compared_version,
    )


def _tag_value(value: float) -> str:
    return format(value, ".6g")


def _tags(policy: Policy, alias: str, gate: Gate, decision: Decision) -> dict[str, str]:
    tags = {
        "policy": policy,
        "alias": alias,
        "metric": gate.metric,
        "passed": str(decision.passed).lower(),
        "reason": decision.reason,
        "compared_version": decision.compared_version or "",
    }
    tags.update({key: _tag_value(value) for key, value in decision.figures.items()})
    return {TAG_PREFIX + key: value for key, value in tags.items()}


def promote(
    registry: Registry,
    name: str,
    version: str,
    alias: str,
    policy: Policy,
    gate: Gate | None,
    eval_texts: Sequence[str],
    eval_labels: Sequence[str],
    candidate_dir: Path,
    workdir: Path,
) -> Decision:
    """Apply a promotion policy to a registered version and record the decision on it.

    `gate` needs evaluation data; `none` and `always` measure too when given some (the tags then
    say what the gate would have done) and skip measuring when the texts are empty.
    """
    gate = gate or Gate()
    if policy == "gate" and not eval_texts:
        raise InvalidInput("promotion policy 'gate' needs evaluation texts and labels")
    gated = None
    if eval_texts:
        gated = _gate_decision(
            registry, name, version, gate, eval_texts, eval_labels, candidate_dir, workdir
        )
    decision = gated if policy == "gate" and gated is not None else _policy_decision(policy, gated)
    # Record before moving: an alias that moved without a recorded reason is the worse failure.
    for key, value in _tags(policy, alias, gate, decision).items():
        registry.describe_version(name, version, key, value)
    if decision.passed:
        # set_alias remembers the previous champion, which `loopline models rollback` needs.
        before = registry.set_alias(name, alias, version)
        log.info(
            "promoted %s v%s to %s (before: %s): %s", name, version, alias, before, decision.reason
        )
    else:
        log.info("kept %s@%s: v%s not promoted: %s", name, alias, version, decision.reason)
    return decision


def _gate_decision(
    registry: Registry,
    name: str,
    version: str,
    gate: Gate,
    texts: Sequence[str],
    labels: Sequence[str],
    candidate_dir: Path,
    workdir: Path,
) -> Decision:
    """Measure the candidate beside the version holding `compare_alias` and decide."""
    current_version = registry.alias_version(name, gate.compare_alias)
    if current_version == version:
        # The alias already holds the candidate (set at registration): beating oneself is
        # meaningless, so only the floor applies.
        current_version = None
    candidate, current = _measure_pair(
        registry, name, current_version, candidate_dir, texts, labels, workdir
    )
    return decide(gate, replace(candidate, version=version), current)
