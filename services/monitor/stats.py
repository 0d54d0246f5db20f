"""Experiment statistics: intervals, tests and the recommendation rule (pure, no I/O, no protobuf).

Choices, so that a report states exactly what it computed:

- One proportion (live accuracy, shadow agreement): the Wilson score interval. Unlike the Wald
  interval it keeps its coverage near 0 and 1 and with few labels, where accuracy often sits.
- Difference of two proportions (candidate - baseline): Newcombe's hybrid score interval (method
  10 of Newcombe 1998), built from the two Wilson intervals; it never leaves [-1, 1] and keeps its
  coverage where the Wald difference interval collapses (an arm at 100 %).
- Test of "no difference": the pooled two-proportion z-test, two-sided, computed here; Fisher's
  exact test (scipy) instead when any expected cell of the 2x2 table is below 5, where the normal
  approximation is poor.
- Several candidates against one baseline: Holm's step-down correction. It controls the
  family-wise error like Bonferroni and is never less powerful.
- Sample-ratio mismatch: Pearson's chi-square goodness of fit of the assigned counts against the
  configured weights, flagged at p < 0.001 by default (a real mismatch is a bug, not noise, and a
  stricter level keeps a monitor that checks every window from crying wolf).
- Minimum sample per arm: the classic two-proportion formula (pooled variance under the null,
  unpooled under the alternative) for a given difference, confidence and power.

Normal quantiles come from `statistics.NormalDist`; scipy is used only for Fisher's exact test and
the chi-square tail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from statistics import NormalDist

DEFAULT_LEVEL = 0.95
DEFAULT_POWER = 0.8
DEFAULT_MIN_DIFFERENCE = 0.02
DEFAULT_SRM_P_VALUE = 0.001
FISHER_BELOW_EXPECTED = 5.0

_NORMAL = NormalDist()


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval (maps onto `loopline.v1.ConfidenceInterval`)."""

    lower: float
    upper: float
    level: float
    method: str


@dataclass(frozen=True)
class Proportion:
    """successes / trials with its Wilson interval; `value` is NaN when there are no trials."""

    successes: int
    trials: int
    value: float
    interval: Interval


@dataclass(frozen=True)
class Arm:
    """One variant's labelled results."""

    name: str
    correct: int
    labelled: int

    def __post_init__(self) -> None:
        if self.labelled < 0 or not 0 <= self.correct <= self.labelled:
            raise ValueError(
                f"arm {self.name!r}: need 0 <= correct ({self.correct}) <= labelled "
                f"({self.labelled})"
            )

    @property
    def accuracy(self) -> float:
        """correct / labelled; NaN without labels."""
        return self.correct / self.labelled if self.labelled else math.nan


@dataclass(frozen=True)
class Comparison:
    """A candidate against the baseline.

    `p_value` is the Holm-adjusted two-sided p-value when the comparison comes from
    `compare_arms` (so `significant == p_value < 1 - level` holds, as the protocol expects);
    `raw_p_value` is the unadjusted one. The interval is not adjusted.
    """

    baseline: str
    candidate: str
    difference: float
    interval: Interval
    p_value: float
    raw_p_value: float
    significant: bool
    test: str


@dataclass(frozen=True)
class SampleRatio:
    """Chi-square goodness of fit of assigned counts against the configured weights."""

    observed: dict[str, int]
    expected: dict[str, float]
    statistic: float
    p_value: float
    threshold: float
    mismatch: bool


class Recommendation(StrEnum):
    """What the evidence says to do (the names of `loopline.v1.Recommendation`, unprefixed)."""

    CONTINUE = "CONTINUE"
    PROMOTE_CANDIDATE = "PROMOTE_CANDIDATE"
    KEEP_BASELINE = "KEEP_BASELINE"
    NO_DIFFERENCE = "NO_DIFFERENCE"


@dataclass(frozen=True)
class Decision:
    """The recommendation, the variant it is about, why, and the figures behind it."""

    recommendation: Recommendation
    variant: str
    rationale: str
    comparisons: list[Comparison]
    min_samples: int
    more_needed: dict[str, int]


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return level


def z_critical(level: float) -> float:
    """The two-sided normal critical value, e.g. 1.96 for 0.95."""
    return _NORMAL.inv_cdf(0.5 + _check_level(level) / 2)


def wilson_interval(successes: int, trials: int, level: float = DEFAULT_LEVEL) -> Interval:
    """Wilson score interval of successes / trials; [0, 1] (no information) without trials."""
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ValueError(f"need 0 <= successes ({successes}) <= trials ({trials})")
    z = z_critical(level)
    if trials == 0:
        return Interval(0.0, 1.0, level, "wilson")
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / trials + z2n / (4 * trials))
    # At 0 and n successes the bounds are exactly 0 and 1; rounding would leave a 1e-17 crumb.
    lower = 0.0 if successes == 0 else max(0.0, centre - half)
    upper = 1.0 if successes == trials else min(1.0, centre + half)
    return Interval(lower, upper, level, "wilson")


def proportion(successes: int, trials: int, level: float = DEFAULT_LEVEL) -> Proportion:
    """A proportion with its Wilson interval: live accuracy, or a shadow's agreement rate."""
    value = successes / trials if trials else math.nan
    return Proportion(successes, trials, value, wilson_interval(successes, trials, level))


def agreement_rate(agreed: int, compared: int, level: float = DEFAULT_LEVEL) -> Proportion:
    """A shadow's agreement with the served answer over the requests both answered."""
    return proportion(agreed, compared, level)


def newcombe_interval(baseline: Arm, candidate: Arm, level: float = DEFAULT_LEVEL) -> Interval:
    """Newcombe's hybrid score interval of candidate accuracy - baseline accuracy."""
    if not baseline.labelled or not candidate.labelled:
        return Interval(-1.0, 1.0, level, "newcombe")
    p1, p2 = baseline.accuracy, candidate.accuracy
    w1 = wilson_interval(baseline.correct, baseline.labelled, level)
    w2 = wilson_interval(candidate.correct, candidate.labelled, level)
    diff = p2 - p1
    lower = diff - math.hypot(p2 - w2.lower, w1.upper - p1)
    upper = diff + math.hypot(w2.upper - p2, p1 - w1.lower)
    return Interval(max(-1.0, lower), min(1.0, upper), level, "newcombe")


def two_proportion_z(baseline: Arm, candidate: Arm) -> tuple[float, float]:
    """(z, two-sided p-value) of the pooled two-proportion z-test; (0, 1) when undefined."""
    n1, n2 = baseline.labelled, candidate.labelled
    if not n1 or not n2:
        return 0.0, 1.0
    pooled = (baseline.correct + candidate.correct) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0.0:  # both arms all right or all wrong: the data cannot tell them apart
        return 0.0, 1.0
    z = (candidate.accuracy - baseline.accuracy) / se
    return z, math.erfc(abs(z) / math.sqrt(2))  # = 2 * (1 - Phi(|z|)), without cancellation


def _table(baseline: Arm, candidate: Arm) -> list[list[int]]:
    return [
        [baseline.correct, baseline.labelled - baseline.correct],
        [candidate.correct, candidate.labelled - candidate.correct],
    ]


def needs_exact_test(baseline: Arm, candidate: Arm) -> bool:
    """True when any expected cell of the 2x2 table is below 5 (the z-test's rule of thumb)."""
    table = _table(baseline, candidate)
    total = baseline.labelled + candidate.labelled
    if total == 0:
        return True
    rows = [sum(row) for row in table]
    cols = [table[0][j] + table[1][j] for j in range(2)]
    return any(r * c / total < FISHER_BELOW_EXPECTED for r in rows for c in cols)


def fisher_p_value(baseline: Arm, candidate: Arm) -> float:
    """Two-sided p-value of Fisher's exact test on the 2x2 table of right / wrong."""
    from scipy.stats import fisher_exact

    if not baseline.labelled or not candidate.labelled:
        return 1.0
    return float(fisher_exact(_table(baseline, candidate), alternative="two-sided").pvalue)


def compare(baseline: Arm, candidate: Arm, level: float = DEFAULT_LEVEL) -> Comparison:
    """One candidate against the baseline, uncorrected: difference, Newcombe interval, p-value.

    Fisher's exact test when any expected cell is below 5, else the two-proportion z-test.
    """
    if needs_exact_test(baseline, candidate):
        test, p_value = "fisher_exact", fisher_p_value(baseline, candidate)
    else:
        test, p_value = "two_proportion_z", two_proportion_z(baseline, candidate)[1]
    diff = candidate.accuracy - baseline.accuracy
    return Comparison(
        baseline=baseline.name,
        candidate=candidate.name,
        difference=diff,
        interval=newcombe_interval(baseline, candidate, level),
        p_value=p_value,
        raw_p_value=p_value,
        significant=p_value < 1 - level,
        test=test,
    )


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        # Monotone: a smaller raw p-value never gets a larger adjusted one than a later rank.
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def compare_arms(
    baseline: Arm, candidates: Sequence[Arm], level: float = DEFAULT_LEVEL
) -> list[Comparison]:
    """Every candidate against the baseline, with Holm-adjusted p-values and significance."""
    raw = [compare(baseline, c, level) for c in candidates]
    adjusted = holm_adjust([c.raw_p_value for c in raw])
    return [
        Comparison(
            baseline=c.baseline,
            candidate=c.candidate,
            difference=c.difference,
            interval=c.interval,
            p_value=p,
            raw_p_value=c.raw_p_value,
            significant=p < 1 - level,
            test=c.test,
        )
        for c, p in zip(raw, adjusted, strict=True)
    ]


def chi2_sf(statistic: float, dof: int) -> float:
    """Upper tail of the chi-square distribution."""
    from scipy.stats import chi2

    return float(chi2.sf(statistic, dof))


def sample_ratio_mismatch(
    observed: Mapping[str, int],
    weights: Mapping[str, float],
    threshold: float = DEFAULT_SRM_P_VALUE,
) -> SampleRatio:
    """Chi-square goodness of fit of assigned counts against the configured weights.

    Variants with weight 0 expect no traffic: any request they got is a mismatch (p = 0).
    Fewer than two weighted variants, or no traffic, cannot mismatch (p = 1).
    """
    if set(observed) - set(weights):
        unknown = sorted(set(observed) - set(weights))
        raise ValueError(f"counts for variants without a weight: {unknown}")
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"weights must be >= 0: {dict(weights)}")
    counts = {name: int(observed.get(name, 0)) for name in weights}
    live = [name for name, w in weights.items() if w > 0]
    total, weight_sum = sum(counts[n] for n in live), sum(weights[n] for n in live)
    expected = {n: (total * weights[n] / weight_sum if weights[n] > 0 else 0.0) for n in weights}
    if any(counts[n] for n in weights if weights[n] == 0):
        return SampleRatio(counts, expected, math.inf, 0.0, threshold, True)
    if len(live) < 2 or total == 0:
        return SampleRatio(counts, expected, 0.0, 1.0, threshold, False)
    statistic = sum((counts[n] - expected[n]) ** 2 / expected[n] for n in live)
    p_value = chi2_sf(statistic, len(live) - 1)
    return SampleRatio(counts, expected, statistic, p_value, threshold, p_value < threshold)


def minimum_sample_size(
    baseline_accuracy: float = 0.5,
    difference: float = DEFAULT_MIN_DIFFERENCE,
    level: float = DEFAULT_LEVEL,
    power: float = DEFAULT_POWER,
) -> int:
    """Labelled requests per arm to detect `difference` in accuracy (two-sided, equal arms).

    n = (z_a * sqrt(2 pbar qbar) + z_b * sqrt(p1 q1 + p2 q2))^2 / difference^2, with
    p2 = p1 + difference (p1 - difference when that would pass 1).
    """
    if not 0.0 < difference < 1.0:
        raise ValueError(f"difference must be in (0, 1), got {difference}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    p1 = min(max(baseline_accuracy, 0.0), 1.0)
    p2 = p1 + difference if p1 + difference <= 1.0 else p1 - difference
    p2 = min(max(p2, 0.0), 1.0)
    pbar = (p1 + p2) / 2
    z_a, z_b = z_critical(level), _NORMAL.inv_cdf(power)
    root = z_a * math.sqrt(2 * pbar * (1 - pbar)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return max(2, math.ceil(root * root / (difference * difference)))


def _points(value: float) -> str:
    return f"{value * 100:+.1f} points"


def _ci(interval: Interval) -> str:
    return f"{interval.level:.0%} CI {interval.lower * 100:+.1f} to {interval.upper * 100:+.1f}"


def _describe(c: Comparison) -> str:
    return f"{c.candidate} {_points(c.difference)} ({_ci(c.interval)}, adjusted p={c.p_value:.3g})"


def _continue(arms: Sequence[Arm], more: dict[str, int], plan: str) -> str:
    short = ", ".join(
        f"{a.name} has {a.labelled:,} ({more[a.name]:,} more)" for a in arms if more[a.name]
    )
    return f"Keep running: {plan}; {short}."


def recommend(
    baseline: Arm,
    candidates: Sequence[Arm],
    level: float = DEFAULT_LEVEL,
    min_difference: float = DEFAULT_MIN_DIFFERENCE,
    power: float = DEFAULT_POWER,
) -> Decision:
    """The recommendation rule.

    1. CONTINUE until every arm has the minimum labelled sample (computed at the baseline's
       observed accuracy, 0.5 before it has labels): stopping at the first significant peek
       would inflate false promotions.
    2. PROMOTE_CANDIDATE: the most accurate of the candidates significantly better than the
       baseline (Holm-adjusted p < 1 - level).
    3. KEEP_BASELINE: every candidate is significantly worse.
    4. NO_DIFFERENCE otherwise: stop the experiment, either may stay.
    """
    if not candidates:
        raise ValueError("an experiment needs at least one candidate besides the baseline")
    observed = baseline.accuracy if baseline.labelled else 0.5
    needed = minimum_sample_size(observed, min_difference, level, power)
    arms = [baseline, *candidates]
    more = {a.name: max(0, needed - a.labelled) for a in arms}
    comparisons = compare_arms(baseline, candidates, level)
    plan = (
        f"each arm needs {needed:,} labelled requests to detect a {min_difference * 100:.1f}-point "
        f"accuracy difference at {level:.0%} confidence with {power:.0%} power"
    )
    if any(more.values()):
        rationale = _continue(arms, more, plan)
        return Decision(Recommendation.CONTINUE, "", rationale, comparisons, needed, more)
    return _decide(baseline, candidates, comparisons, level, needed, more)


def _decide(
    baseline: Arm,
    candidates: Sequence[Arm],
    comparisons: list[Comparison],
    level: float,
    needed: int,
    more: dict[str, int],
) -> Decision:
    """Rules 2-4 of `recommend`, once every arm has its minimum sample."""
    alpha = f"{1 - level:.2g}"
    better = [c for c in comparisons if c.significant and c.difference > 0]
    if better:
        best = max(better, key=lambda c: (c.difference, -c.p_value))
        accuracy = {a.name: a.accuracy for a in candidates}[best.candidate]
        rationale = (
            f"Promote {best.candidate}: accuracy {accuracy:.1%} vs {baseline.name} "
            f"{baseline.accuracy:.1%} ({_points(best.difference)}, {_ci(best.interval)}), "
            f"Holm-adjusted p={best.p_value:.3g} < {alpha} with at least {needed:,} labels per arm."
        )
        kind, variant = Recommendation.PROMOTE_CANDIDATE, best.candidate
    elif all(c.significant and c.difference < 0 for c in comparisons):
        listed = "; ".join(_describe(c) for c in comparisons)
        rationale = (
            f"Keep {baseline.name}: every candidate is significantly worse at {level:.0%} "
            f"confidence (Holm-adjusted p < {alpha}): {listed}."
        )
        kind, variant = Recommendation.KEEP_BASELINE, baseline.name
    else:
        listed = "; ".join(_describe(c) for c in comparisons)
        rationale = (
            f"No significant difference at {level:.0%} confidence with at least {needed:,} labels "
            f"per arm ({listed}); stop the experiment, either may stay."
        )
        kind, variant = Recommendation.NO_DIFFERENCE, baseline.name
    return Decision(kind, variant, rationale, comparisons, needed, more)
