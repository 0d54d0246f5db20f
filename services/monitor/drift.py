"""Drift of live traffic against a model package's `reference.json`, measured with Evidently.

The reference stores histograms (confidence, token length), shares (predicted labels, texts with
an unknown token) and a sample of 16-dimensional embedding sketches, not raw values. So each
scalar feature is compared as a categorical distribution over the reference's own bins: the live
values are put into the same bins, the reference histogram is expanded back into rows, and
Evidently computes per column (`ValueDrift`):

- `predicted_label`: Jensen-Shannon distance of the label shares, drift at >= 0.1;
- `confidence` (10 bins of the top probability), `token_length` (the reference's length bins) and
  `unknown_token_share` (share of texts with at least one unknown token): PSI, drift at >= 0.1.

These are Evidently's default thresholds for both. We deliberately do not let Evidently pick a
p-value test for the sample size: its chi-square treats the reference as exact (more false alarms)
and breaks on a bin the reference never saw, and a p-value test flags ever smaller, harmless
shifts as windows grow. PSI and Jensen-Shannon measure the size of a shift, whatever the traffic.

`embedding`: Evidently's MMD method (RBF kernel, median-distance bandwidth, unbiased MMD^2) between
the reference sketch sample and at most `max_embedding_samples` live sketches, drift at >= 0.015
(Evidently's default). Its bootstrap mode flags drift above the 5th percentile of resampled
reference scores, which a same-distribution window passes 95 % of the time, so it is not used;
the statistic is a size of shift, with no p-value.

Overall rule (`DriftConfig`): drifted when the embedding drifts, or when at least two of the scalar
features drift (all of them when fewer than two are checked). One scalar feature alone is not
enough: a confidence shift without any change in inputs is more often a quiet day than drift.
Fewer than `min_samples` live samples: not drifted, and the summary says so.

Measured on a tiny movie-review model (tests/integration/test_drift.py), windows of 500: Yelp
traffic scores token-length PSI about 1.3, confidence PSI 0.19-0.37, label Jensen-Shannon
0.15-0.18 and MMD 0.07-0.10 (every window drifts); over 22 held-out movie-review windows the
largest figures were label Jensen-Shannon 0.074, PSI 0.03 and MMD 0.004 (no false alarm). The
label share is the noisiest feature, which is one reason a single feature does not decide.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loopline.errors import InvalidInput
from loopline.package import read_reference

PREDICTED_LABEL = "predicted_label"
CONFIDENCE = "confidence"
TOKEN_LENGTH = "token_length"
UNKNOWN_TOKENS = "unknown_token_share"
EMBEDDING = "embedding"
SCALAR_FEATURES = (PREDICTED_LABEL, CONFIDENCE, TOKEN_LENGTH, UNKNOWN_TOKENS)
FEATURES = (*SCALAR_FEATURES, EMBEDDING)

# Evidently's names of the distance measures we allow, and the names the protocol reports. Each
# is a size of shift that drifts at `value >= threshold` (no p-value).
STATISTICS = {
    "psi": "psi",
    "jensenshannon": "jensen_shannon",
    "hellinger": "hellinger",
    "kl_div": "kl_divergence",
}
MMD = "mmd"
_SKETCH = "sketch"
_HTML_WIDGETS = "evidently.legacy.renderers.html_widgets"
_WITH_UNKNOWN, _WITHOUT_UNKNOWN = "with unknown token", "no unknown token"


@dataclass(frozen=True)
class FeatureTest:
    """Which Evidently distance a scalar feature is compared with, and from what value it drifts."""

    method: str
    threshold: float

    def __post_init__(self) -> None:
        if self.method not in STATISTICS:
            raise ValueError(f"drift method {self.method!r}: expected one of {sorted(STATISTICS)}")


def _default_tests() -> dict[str, FeatureTest]:
    return {
        PREDICTED_LABEL: FeatureTest("jensenshannon", 0.1),
        CONFIDENCE: FeatureTest("psi", 0.1),
        TOKEN_LENGTH: FeatureTest("psi", 0.1),
        UNKNOWN_TOKENS: FeatureTest("psi", 0.1),
    }


@dataclass(frozen=True)
class DriftConfig:
    """Tests, thresholds and the overall rule (defaults documented in the module docstring)."""

    tests: Mapping[str, FeatureTest] = field(default_factory=_default_tests)
    embedding_threshold: float = 0.015
    min_drifted_features: int = 2
    max_embedding_samples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        missing = set(SCALAR_FEATURES) - set(self.tests)
        if missing:
            raise ValueError(f"drift config: no test for {sorted(missing)}")
        if self.min_drifted_features < 1:
            raise ValueError("drift config: min_drifted_features must be at least 1")

    def rule(self, scalars: int, embedding: bool) -> str:
        """The overall rule in words, for the features actually checked."""
        needed = min(self.min_drifted_features, scalars)
        parts = ["embedding"] if embedding else []
        if scalars:
            parts.append(f"at least {needed} of {scalars} other features")
        return "drifted when " + " or ".join(parts) if parts else "no feature could be checked"


@dataclass(frozen=True)
class Histogram:
    """Counts over fixed edges; the last bin includes its right edge (as `numpy.histogram`)."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]

    def bin_of(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """The bin index of each value; values beyond the edges go to the first or last bin."""
        edges = np.asarray(self.edges, dtype=np.float64)
        index = np.searchsorted(edges, np.asarray(values, dtype=np.float64), side="right") - 1
        return np.clip(index, 0, len(edges) - 2)

    def names(self) -> list[str]:
        """A readable name per bin, e.g. `0.5-0.6`."""
        return [f"{lo:g}-{hi:g}" for lo, hi in zip(self.edges, self.edges[1:], strict=False)]


@dataclass(frozen=True)
class Reference:
    """What `reference.json` says about the held-out data the package was checked on."""

    count: int
    labels: tuple[str, ...]
    label_shares: Mapping[str, float]
    confidence: Histogram
    token_length: Histogram
    texts_with_unknown: float
    sketch: np.ndarray = field(repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reference:
        """Parse the dictionary the trainer's exporter writes."""
        try:
            sketch = np.asarray(data["embedding_sketch"]["sample"], dtype=np.float64)
            return cls(
                count=int(data["count"]),
                labels=tuple(data["labels"]),
                label_shares={str(k): float(v) for k, v in data["predicted_class_shares"].items()},
                confidence=_histogram(data["confidence"]),
                token_length=_histogram(data["token_length"]),
                texts_with_unknown=float(data["unknown_token_share"]["texts_with_unknown"]),
                sketch=sketch.reshape(len(sketch), -1),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"reference.json is incomplete or malformed: {err!r}") from None

    @classmethod
    def load(cls, package: Path | str) -> Reference:
        """Read `reference.json` from a model package folder."""
        data = read_reference(package)
        if not data:
            raise ValueError(f"model package {package} has no reference.json; re-export it")
        return cls.from_dict(data)


def _histogram(data: Mapping[str, Any]) -> Histogram:
    return Histogram(tuple(float(e) for e in data["edges"]), tuple(int(c) for c in data["counts"]))


@dataclass(frozen=True)
class LiveSamples:
    """One window of live predictions, one entry per request (as the inference records carry).

    `sketches` may have fewer rows than the other fields (records without a sketch), or none.
    """

    labels: Sequence[str]
    confidence: Sequence[float] | np.ndarray
    token_counts: Sequence[int] | np.ndarray
    unknown_shares: Sequence[float] | np.ndarray
    sketches: Sequence[Sequence[float]] | np.ndarray = ()

    def __post_init__(self) -> None:
        sizes = {len(self.labels), len(self.confidence), len(self.token_counts)}
        if len(sizes | {len(self.unknown_shares)}) != 1:
            raise ValueError(
                "live samples: labels, confidence, token_counts and unknown_shares differ in "
                f"length ({len(self.labels)}, {len(self.confidence)}, {len(self.token_counts)}, "
                f"{len(self.unknown_shares)})"
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class FeatureDriftResult:
    """One feature's figure (maps onto `loopline.v1.FeatureDrift`)."""

    feature: str
    statistic: str
    value: float
    threshold: float
    drifted: bool
    p_value: float | None = None

    def describe(self) -> str:
        """e.g. `token_length (psi 1.26 >= 0.1)`."""
        sign = ">=" if self.drifted else "<"
        return f"{self.feature} ({self.statistic} {self.value:.3g} {sign} {self.threshold:g})"


@dataclass
class DriftEvidence:
    """What `save_html` needs to draw the Evidently report of a check."""

    scalar_run: Any
    sketch_reference: pd.DataFrame
    sketch_live: pd.DataFrame
    embedding_threshold: float


@dataclass
class DriftResult:
    """The verdict of one check (maps onto `loopline.v1.GetDriftResponse`)."""

    features: list[FeatureDriftResult]
    drifted: bool
    summary: str
    samples: int
    reference_samples: int
    evidence: DriftEvidence | None = field(default=None, repr=False, compare=False)


def _apportion(shares: Sequence[float], total: int) -> list[int]:
    """Whole counts summing to `total` in the given shares (largest remainder)."""
    weights = np.clip(np.asarray(shares, dtype=np.float64), 0.0, None)
    if weights.sum() <= 0 or total <= 0:
        return [0] * len(weights)
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[index] += 1
    return [int(c) for c in counts]


def _expand(names: Sequence[str], shares: Sequence[float], total: int) -> list[str]:
    """Rows that reproduce the shares exactly, so Evidently sees the reference distribution."""
    return [
        name for name, n in zip(names, _apportion(shares, total), strict=True) for _ in range(n)
    ]


def _reference_frame(ref: Reference, features: Sequence[str]) -> pd.DataFrame:
    """The reference histograms and shares expanded back into `ref.count` categorical rows."""
    total = ref.count
    columns: dict[str, list[str]] = {
        PREDICTED_LABEL: _expand(
            list(ref.labels), [ref.label_shares.get(x, 0.0) for x in ref.labels], total
        ),
        CONFIDENCE: _expand(ref.confidence.names(), ref.confidence.counts, total),
        TOKEN_LENGTH: _expand(ref.token_length.names(), ref.token_length.counts, total),
        UNKNOWN_TOKENS: _expand(
            [_WITH_UNKNOWN, _WITHOUT_UNKNOWN],
            [ref.texts_with_unknown, 1 - ref.texts_with_unknown],
            total,
        ),
    }
    return pd.DataFrame({name: columns[name] for name in features})


def _live_frame(ref: Reference, live: LiveSamples, features: Sequence[str]) -> pd.DataFrame:
    """The live window in the reference's bins."""
    conf_names, token_names = ref.confidence.names(), ref.token_length.names()
    columns: dict[str, list[str]] = {
        PREDICTED_LABEL: [str(x) for x in live.labels],
        CONFIDENCE: [conf_names[i] for i in ref.confidence.bin_of(live.confidence)],
        TOKEN_LENGTH: [token_names[i] for i in ref.token_length.bin_of(live.token_counts)],
        UNKNOWN_TOKENS: [
            _WITH_UNKNOWN if share > 0 else _WITHOUT_UNKNOWN for share in live.unknown_shares
        ],
    }
    return pd.DataFrame({name: columns[name] for name in features})


def _sketch_frames(
    ref: Reference, live: LiveSamples, config: DriftConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reference and live sketches as frames; the live side subsampled (MMD is quadratic)."""
    current = np.asarray(live.sketches, dtype=np.float64)
    dims = ref.sketch.shape[1]
    current = current.reshape(len(current), -1) if current.size else np.empty((0, dims))
    if current.shape[1] != dims:
        raise ValueError(
            f"live sketches have {current.shape[1]} dimensions, the reference {dims}: "
            "they come from different sketch settings"
        )
    if len(current) > config.max_embedding_samples:
        rng = np.random.default_rng(config.seed)
        current = current[rng.choice(len(current), config.max_embedding_samples, replace=False)]
    names = [f"{_SKETCH}_{i}" for i in range(dims)]
    return pd.DataFrame(ref.sketch, columns=names), pd.DataFrame(current, columns=names)


def _load_evidently() -> None:
    """Make Evidently importable on pandas 3.

    Evidently 0.7 imports `pandas.core.dtypes.common.infer_dtype_from_object`, which pandas 3
    removed; only its legacy `TestColumnsType` calls it, and we never run that. A stand-in with
    the old meaning (the scalar type of a dtype) lets the package import; nothing else is patched.
    """
    from pandas.core.dtypes import common

    if not hasattr(common, "infer_dtype_from_object"):

        def infer_dtype_from_object(dtype: Any) -> Any:
            return common.pandas_dtype(dtype).type

        common.infer_dtype_from_object = infer_dtype_from_object  # type: ignore[attr-defined]


def _evidently(module: str) -> Any:
    """Import an Evidently module (untyped, heavy: loaded on first use, after the pandas fix)."""
    _load_evidently()
    return importlib.import_module(module)


def _run_scalars(
    reference: pd.DataFrame, live: pd.DataFrame, tests: Mapping[str, FeatureTest]
) -> tuple[Any, list[FeatureDriftResult]]:
    """One Evidently report with a `ValueDrift` per scalar feature; its figures and verdicts."""
    ev, ev_metrics = _evidently("evidently"), _evidently("evidently.metrics")
    definition = ev.DataDefinition(categorical_columns=list(reference.columns))
    metrics = {
        name: ev_metrics.ValueDrift(
            column=name, method=tests[name].method, threshold=tests[name].threshold
        )
        for name in reference.columns
    }
    run = ev.Report(list(metrics.values()), include_tests=True).run(
        ev.Dataset.from_pandas(live, data_definition=definition),
        ev.Dataset.from_pandas(reference, data_definition=definition),
    )
    results = []
    for name, metric in metrics.items():
        outcome = run.metric_results[metric.metric_id]
        # Evidently's own verdict (its test fails on drift), not a comparison redone here.
        drifted = any(t.status.value == "FAIL" for t in outcome.tests)
        test = tests[name]
        value = float(outcome.value)
        results.append(
            FeatureDriftResult(name, STATISTICS[test.method], value, test.threshold, drifted)
        )
    return run, results


def _mmd(reference: pd.DataFrame, live: pd.DataFrame, threshold: float) -> FeatureDriftResult:
    """Evidently's MMD embedding-drift method, called without its t-SNE picture (seconds)."""
    method = _evidently("evidently.metrics.embeddings").MMDDriftMethod(threshold=threshold)
    score, drifted, _ = method(live, reference)
    return FeatureDriftResult(EMBEDDING, MMD, float(score), threshold, bool(drifted))


def _select(features: Sequence[str] | None) -> list[str]:
    chosen = list(FEATURES) if not features else list(dict.fromkeys(features))
    unknown = sorted(set(chosen) - set(FEATURES))
    if unknown:
        raise InvalidInput(
            f"unknown drift features {unknown}; known: {list(FEATURES)}", field="features"
        )
    return chosen


def check_drift(
    reference: Reference,
    live: LiveSamples,
    features: Sequence[str] | None = None,
    min_samples: int = 100,
    config: DriftConfig | None = None,
) -> DriftResult:
    """Compare a live window with the reference: per-feature figures and the overall verdict."""
    config = config or DriftConfig()
    chosen = _select(features)
    scalars = [f for f in chosen if f in SCALAR_FEATURES]
    samples = len(live)
    if samples < min_samples:
        summary = (
            f"too few samples to decide: {samples} live samples, at least {min_samples} needed; "
            "not drifted"
        )
        return DriftResult([], False, summary, samples, reference.count)
    results: list[FeatureDriftResult] = []
    evidence = DriftEvidence(None, pd.DataFrame(), pd.DataFrame(), config.embedding_threshold)
    if scalars:
        frames = _reference_frame(reference, scalars), _live_frame(reference, live, scalars)
        evidence.scalar_run, results = _run_scalars(*frames, config.tests)
    notes = []
    if EMBEDDING in chosen:
        sketch_ref, sketch_live = _sketch_frames(reference, live, config)
        if len(sketch_live) >= min_samples and len(sketch_ref) >= 2:
            evidence.sketch_reference, evidence.sketch_live = sketch_ref, sketch_live
            results.append(_mmd(sketch_ref, sketch_live, config.embedding_threshold))
        else:
            notes.append(f"embedding skipped: {len(sketch_live)} live sketches")
    return _verdict(results, config, samples, reference.count, notes, evidence)


def _verdict(
    results: list[FeatureDriftResult],
    config: DriftConfig,
    samples: int,
    reference_samples: int,
    notes: list[str],
    evidence: DriftEvidence,
) -> DriftResult:
    """Apply the overall rule and write the one-line summary."""
    scalars = [r for r in results if r.feature != EMBEDDING]
    embedding = [r for r in results if r.feature == EMBEDDING]
    drifted_scalars = [r for r in scalars if r.drifted]
    needed = min(config.min_drifted_features, len(scalars))
    drifted = any(r.drifted for r in embedding) or bool(scalars and len(drifted_scalars) >= needed)
    rule = config.rule(len(scalars), bool(embedding))
    shifted = [r for r in results if r.drifted]
    if drifted:
        summary = f"drift in {_join([r.describe() for r in shifted])} over {samples} live samples"
    elif shifted:
        summary = (
            f"no drift over {samples} live samples: {_join([r.describe() for r in shifted])} "
            "alone does not meet the rule"
        )
    else:
        top = max(results, key=lambda r: r.value / r.threshold, default=None)
        largest = f"; closest: {top.describe()}" if top else ""
        summary = f"no drift over {samples} live samples{largest}"
    summary = "; ".join([f"{summary} ({rule})", *notes])
    return DriftResult(results, drifted, summary, samples, reference_samples, evidence)


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def save_html(result: DriftResult | Any, path: Path | str, *, embedding_map: bool = False) -> Path:
    """Write the Evidently HTML report of a check (or save an Evidently snapshot as it is).

    The report shows the verdict, one distribution chart per scalar feature and the embedding
    figure; `embedding_map=True` adds Evidently's embedding-drift widget, a t-SNE density map of
    both samples that costs seconds of CPU, so a monitor checking every minute leaves it off.
    """
    path = Path(path)
    if not isinstance(result, DriftResult):
        result.save_html(str(path))  # an Evidently Snapshot
        return path
    if result.evidence is None:
        raise ValueError(f"no report to save: {result.summary}")
    widgets = [_verdict_widget(result)]
    evidence = result.evidence
    if evidence.scalar_run is not None:
        for outcome in evidence.scalar_run.metric_results.values():
            widgets.extend(outcome.get_widgets())
    if embedding_map and len(evidence.sketch_live):
        widgets.extend(_embedding_widgets(evidence))
    group = _evidently(_HTML_WIDGETS).group_widget(title="", widgets=widgets)
    html = _evidently("evidently.core.metric_types").render_widgets([group], as_iframe=False)
    path.write_text(html, encoding="utf-8")
    return path


def _verdict_widget(result: DriftResult) -> Any:
    """Evidently counters: the overall verdict and each feature's figure."""
    html = _evidently(_HTML_WIDGETS)
    verdict = "drift detected" if result.drifted else "no drift"
    counters = [html.CounterData(result.summary, verdict)]
    counters += [
        html.CounterData(r.describe(), "drift" if r.drifted else "ok") for r in result.features
    ]
    return html.counter(counters=counters, title="Drift against the package reference")


def _embedding_widgets(evidence: DriftEvidence) -> list[Any]:
    """Evidently's `EmbeddingsDrift` (MMD, same threshold) with its t-SNE map."""
    ev, embeddings = _evidently("evidently"), _evidently("evidently.metrics.embeddings")
    columns = list(evidence.sketch_reference.columns)
    definition = ev.DataDefinition(numerical_columns=columns, embeddings={_SKETCH: columns})
    metric = embeddings.EmbeddingsDrift(
        embeddings_name=_SKETCH,
        drift_method=embeddings.MMDDriftMethod(threshold=evidence.embedding_threshold),
    )
    run = ev.Report([metric]).run(
        ev.Dataset.from_pandas(evidence.sketch_live, data_definition=definition),
        ev.Dataset.from_pandas(evidence.sketch_reference, data_definition=definition),
    )
    return list(run.metric_results[metric.metric_id].get_widgets())
