"""Experiment statistics checked against scipy on many random cases, and the rule on built ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from services.monitor.stats import (
    Arm,
    Recommendation,
    agreement_rate,
    compare,
    compare_arms,
    holm_adjust,
    minimum_sample_size,
    needs_exact_test,
    newcombe_interval,
    proportion,
    recommend,
    sample_ratio_mismatch,
    two_proportion_z,
    wilson_interval,
)

LEVELS = (0.8, 0.9, 0.95, 0.99)
CASES = 300


def random_arm(rng: np.random.Generator, name: str, largest: int = 5000) -> Arm:
    """An arm with a random size and accuracy, sometimes at the edges (0 % or 100 %)."""
    n = int(rng.integers(1, largest))
    edge = rng.random()
    k = 0 if edge < 0.05 else n if edge < 0.1 else int(rng.binomial(n, rng.uniform(0.3, 0.99)))
    return Arm(name, k, n)


def table(a: Arm, b: Arm) -> list[list[int]]:
    return [[a.correct, a.labelled - a.correct], [b.correct, b.labelled - b.correct]]


def scipy_wilson(k: int, n: int, level: float) -> tuple[float, float]:
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def test_wilson_matches_scipy_binomtest() -> None:
    rng = np.random.default_rng(1)
    for _ in range(CASES):
        arm, level = random_arm(rng, "a"), float(rng.choice(LEVELS))
        got = wilson_interval(arm.correct, arm.labelled, level)
        lower, upper = scipy_wilson(arm.correct, arm.labelled, level)
        assert got.lower == pytest.approx(lower, abs=1e-12)
        assert got.upper == pytest.approx(upper, abs=1e-12)
        assert (got.level, got.method) == (level, "wilson")


def test_proportion_without_trials_is_nan_with_the_whole_range() -> None:
    empty = proportion(0, 0)
    assert math.isnan(empty.value)
    assert (empty.interval.lower, empty.interval.upper) == (0.0, 1.0)
    shadow = agreement_rate(90, 100, 0.9)
    assert shadow.value == 0.9
    assert (shadow.interval.lower, shadow.interval.upper) == pytest.approx(
        scipy_wilson(90, 100, 0.9)
    )


def test_newcombe_matches_the_published_example_and_scipy_wilson_bounds() -> None:
    # Newcombe (1998), Stat Med 17:873, example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339.
    got = newcombe_interval(Arm("b", 48, 80), Arm("c", 56, 70))
    assert (got.lower, got.upper) == pytest.approx((0.0524, 0.3339), abs=5e-5)
    rng = np.random.default_rng(2)
    for _ in range(CASES):
        base, cand, level = random_arm(rng, "b"), random_arm(rng, "c"), float(rng.choice(LEVELS))
        l1, u1 = scipy_wilson(base.correct, base.labelled, level)
        l2, u2 = scipy_wilson(cand.correct, cand.labelled, level)
        p1, p2 = base.accuracy, cand.accuracy
        lower = p2 - p1 - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
        upper = p2 - p1 + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
        got = newcombe_interval(base, cand, level)
        assert (got.lower, got.upper) == pytest.approx((lower, upper), abs=1e-12)
        assert -1.0 <= got.lower <= p2 - p1 <= got.upper <= 1.0


def test_z_test_matches_scipy_norm_and_the_uncorrected_chi_square() -> None:
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(CASES):
        base, cand = random_arm(rng, "b"), random_arm(rng, "c")
        pooled = (base.correct + cand.correct) / (base.labelled + cand.labelled)
        if pooled in (0.0, 1.0):
            continue
        se = math.sqrt(pooled * (1 - pooled) * (1 / base.labelled + 1 / cand.labelled))
        z_ref = (cand.accuracy - base.accuracy) / se
        z, p = two_proportion_z(base, cand)
        assert z == pytest.approx(z_ref, rel=1e-9, abs=1e-12)
        assert p == pytest.approx(2 * sps.norm.sf(abs(z_ref)), rel=1e-9, abs=1e-300)
        # The pooled z-test is the 2x2 chi-square test without Yates' correction: z^2 = chi2.
        chi2, p_chi2, _, _ = sps.chi2_contingency(table(base, cand), correction=False)
        assert z * z == pytest.approx(chi2, rel=1e-9, abs=1e-12)
        assert p == pytest.approx(p_chi2, rel=1e-7, abs=1e-300)
        checked += 1
    assert checked > CASES // 2


def test_fisher_is_chosen_for_small_expected_cells_and_matches_scipy() -> None:
    rng = np.random.default_rng(4)
    kinds = set()
    for _ in range(CASES):
        base, cand = random_arm(rng, "b", 60), random_arm(rng, "c", 60)
        expected = sps.contingency.expected_freq(np.array(table(base, cand)))
        assert needs_exact_test(base, cand) == bool((expected < 5).any())
        result = compare(base, cand)
        kinds.add(result.test)
        if result.test == "fisher_exact":
            ref = sps.fisher_exact(table(base, cand), alternative="two-sided").pvalue
        else:
            ref = two_proportion_z(base, cand)[1]
        assert result.p_value == pytest.approx(ref, rel=1e-9, abs=1e-300)
        assert result.difference == pytest.approx(cand.accuracy - base.accuracy)
    assert kinds == {"fisher_exact", "two_proportion_z"}


def holm_reference(p: list[float]) -> list[float]:
    """Holm by definition: the largest (m - j + 1) p_(j) over the ranks up to this one."""
    m, order = len(p), sorted(range(len(p)), key=lambda i: p[i])
    out = [0.0] * m
    for rank, index in enumerate(order):
        out[index] = min(1.0, max((m - j) * p[order[j]] for j in range(rank + 1)))
    return out


def test_holm_adjustment() -> None:
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    rng = np.random.default_rng(5)
    for _ in range(CASES):
        p = list(rng.uniform(0, 0.2, int(rng.integers(1, 8))))
        assert holm_adjust(p) == pytest.approx(holm_reference(p))


def test_compare_arms_corrects_for_several_candidates() -> None:
    base = Arm("control", 800, 1000)
    cands = [Arm("a", 830, 1000), Arm("b", 790, 1000), Arm("c", 805, 1000)]
    got = compare_arms(base, cands)
    raw = [compare(base, c).p_value for c in cands]
    assert [c.raw_p_value for c in got] == pytest.approx(raw)
    assert [c.p_value for c in got] == pytest.approx(holm_reference(raw))
    # Significance is judged on the adjusted p-values, not the raw ones.
    assert [c.significant for c in got] == [p < 0.05 for p in holm_reference(raw)]


def test_sample_ratio_mismatch_matches_scipy_chisquare() -> None:
    rng = np.random.default_rng(6)
    for _ in range(CASES):
        k = int(rng.integers(2, 5))
        weights = {f"v{i}": float(w) for i, w in enumerate(rng.uniform(0.1, 1.0, k))}
        skew = rng.uniform(0.9, 1.1, k)
        shares = np.array(list(weights.values())) * skew
        counts = rng.multinomial(int(rng.integers(50, 20000)), shares / shares.sum())
        observed = {name: int(c) for name, c in zip(weights, counts, strict=True)}
        total, wsum = counts.sum(), sum(weights.values())
        expected = [total * w / wsum for w in weights.values()]
        ref = sps.chisquare(counts, expected)
        got = sample_ratio_mismatch(observed, weights)
        assert got.statistic == pytest.approx(ref.statistic, rel=1e-9, abs=1e-12)
        assert got.p_value == pytest.approx(ref.pvalue, rel=1e-7, abs=1e-300)
        assert got.mismatch == (ref.pvalue < 0.001)


def test_sample_ratio_mismatch_edges() -> None:
    assert sample_ratio_mismatch({"a": 500, "b": 500}, {"a": 1, "b": 1}).mismatch is False
    assert sample_ratio_mismatch({"a": 5600, "b": 4400}, {"a": 1, "b": 1}).mismatch is True
    paused = sample_ratio_mismatch({"a": 10, "b": 1}, {"a": 1, "b": 0})
    assert (paused.p_value, paused.mismatch) == (0.0, True)
    assert sample_ratio_mismatch({}, {"a": 1, "b": 1}).p_value == 1.0
    with pytest.raises(ValueError, match="without a weight"):
        sample_ratio_mismatch({"z": 1}, {"a": 1})


def power(n: int, p1: float, diff: float, level: float) -> float:
    """Power of the two-sided pooled z-test with n per arm (normal approximation, scipy)."""
    p2 = p1 + diff if p1 + diff <= 1 else p1 - diff
    pbar = (p1 + p2) / 2
    z_a = sps.norm.ppf(1 - (1 - level) / 2)
    num = abs(p2 - p1) * math.sqrt(n) - z_a * math.sqrt(2 * pbar * (1 - pbar))
    return float(sps.norm.cdf(num / math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))))


def test_minimum_sample_size_reaches_the_power_one_short_does_not() -> None:
    assert minimum_sample_size(0.5, 0.02, 0.95, 0.8) == 9806
    rng = np.random.default_rng(7)
    for _ in range(CASES):
        p1, diff = float(rng.uniform(0.5, 0.99)), float(rng.uniform(0.01, 0.1))
        level = float(rng.choice(LEVELS))
        n = minimum_sample_size(p1, diff, level, 0.8)
        assert power(n, p1, diff, level) >= 0.8 - 1e-9
        assert n == 2 or power(n - 1, p1, diff, level) < 0.8


def test_recommend_continues_until_every_arm_has_the_minimum_sample() -> None:
    needed = minimum_sample_size(0.8)
    base, cand = Arm("control", 800, 1000), Arm("challenger", 950, 1000)
    decision = recommend(base, [cand])
    assert decision.recommendation is Recommendation.CONTINUE
    assert decision.min_samples == needed
    assert decision.more_needed == {"control": needed - 1000, "challenger": needed - 1000}
    assert f"{needed:,}" in decision.rationale
    assert f"{needed - 1000:,} more" in decision.rationale
    assert decision.comparisons[0].significant  # significant, but not enough labels yet


def test_recommend_promotes_the_best_significantly_better_candidate() -> None:
    n = 20000
    base = Arm("control", int(0.80 * n), n)
    cands = [Arm("a", int(0.82 * n), n), Arm("b", int(0.83 * n), n), Arm("c", int(0.79 * n), n)]
    decision = recommend(base, cands)
    assert decision.recommendation is Recommendation.PROMOTE_CANDIDATE
    assert decision.variant == "b"
    assert "Promote b" in decision.rationale
    assert "+3.0 points" in decision.rationale


def test_recommend_keeps_the_baseline_when_all_candidates_are_worse() -> None:
    n = 20000
    base = Arm("control", int(0.85 * n), n)
    decision = recommend(base, [Arm("a", int(0.82 * n), n), Arm("b", int(0.80 * n), n)])
    assert decision.recommendation is Recommendation.KEEP_BASELINE
    assert decision.variant == "control"
    assert "significantly worse" in decision.rationale


def test_recommend_no_difference_when_not_significant_or_mixed() -> None:
    n = 20000
    base = Arm("control", int(0.85 * n), n)
    same = recommend(base, [Arm("a", int(0.851 * n), n)])
    assert same.recommendation is Recommendation.NO_DIFFERENCE
    assert "No significant difference" in same.rationale
    mixed = recommend(base, [Arm("a", int(0.80 * n), n), Arm("b", int(0.851 * n), n)])
    assert mixed.recommendation is Recommendation.NO_DIFFERENCE
    assert mixed.variant == "control"


def test_arm_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="correct"):
        Arm("a", 5, 4)
    with pytest.raises(ValueError, match="candidate"):
        recommend(Arm("a", 1, 2), [])
