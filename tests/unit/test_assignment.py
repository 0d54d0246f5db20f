"""Variant assignment: stable buckets, weight-true allocations, stickiness and minimal movement.

Pure: no clock, no I/O; randomness is seeded or scripted. Property tests use hypothesis.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopline.errors import InvalidInput
from services.router.assignment import (
    BUCKETS,
    NO_BUCKET,
    Allocation,
    assign,
    bucket,
    bucket_counts,
    initial_allocation,
    reallocate,
    shadows_for,
)

SALT = "exp-20250114-3f9a"
USERS = 100_000
Weights = list[tuple[str, float]]


@cache
def user_buckets(salt: str = SALT) -> tuple[int, ...]:
    """The buckets of 100,000 deterministic users (computed once: it is the slow part)."""
    return tuple(bucket(salt, f"user-{i}") for i in range(USERS))


def shares(allocation: Allocation) -> dict[str, float]:
    counts = Counter(allocation.owner(b) for b in user_buckets())
    return {name: 100 * counts[name] / USERS for name in allocation.names}


def named(weights: Sequence[float]) -> Weights:
    return [(f"v{i}", w) for i, w in enumerate(weights)]


def owners(allocation: Allocation) -> list[str]:
    """The owner of every bucket, in bucket order (read off the ranges, not `owner`)."""
    table = [""] * BUCKETS
    for name, ranges in allocation.ranges.items():
        for start, end in ranges:
            table[start:end] = [name] * (end - start)
    return table


class Script:
    """A random source that returns the given floats in turn."""

    def __init__(self, *values: float) -> None:
        self._values: Iterator[float] = iter(values)

    def random(self) -> float:
        return next(self._values)


@dataclass(frozen=True)
class Arm:
    name: str
    weight: float


@dataclass(frozen=True)
class Split:
    """The experiment surface `assign` reads (the real `Experiment` has the same)."""

    variants: tuple[Arm, ...]
    allocation: Allocation | None
    id: str = SALT
    salt: str = ""
    pinned_users: Mapping[str, str] = field(default_factory=dict)
    paused: bool = False
    per_user: bool = True


def split(weights: Weights, **changes: object) -> Split:
    arms = tuple(Arm(name, weight) for name, weight in weights)
    return Split(arms, initial_allocation(weights), **changes)  # type: ignore[arg-type]


def name_and_bucket(result: tuple[Arm, int]) -> tuple[str, int]:
    variant, bucket_ = result
    return variant.name, bucket_


# Weight vectors: relative weights, at least one positive. Integer weights (the usual admin
# input) and arbitrary floats (to exercise rounding).
int_weights = st.lists(st.integers(0, 100), min_size=1, max_size=8).filter(any)
float_weights = st.lists(
    st.floats(0, 100, allow_nan=False, allow_infinity=False), min_size=1, max_size=8
).filter(lambda ws: sum(ws) > 1e-3)
any_weights = st.one_of(int_weights, float_weights)


# --- buckets ---------------------------------------------------------------------------------


def test_bucket_values_are_pinned() -> None:
    # Changing the hash would move every user of every running experiment on the next deploy.
    assert [bucket(SALT, u) for u in ("alice", "bob", "user-0", "")] == [9215, 6596, 8422, 2981]


def test_bucket_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = (
        "from services.router.assignment import bucket;"
        f"print([bucket({SALT!r}, f'user-{{i}}') for i in range(50)])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert out.strip() == str([bucket(SALT, f"user-{i}") for i in range(50)])


def test_salt_and_user_do_not_run_together() -> None:
    # ("ab", "c") and ("a", "bc") are different (salt, user) pairs and must hash apart.
    pairs = [(s, u) for s in ("a", "ab", "abc") for u in ("", "c", "bc", "x")]
    values = {(s, u): bucket(s, u) for s, u in pairs}
    assert values[("ab", "c")] != values[("a", "bc")]
    assert all(0 <= b < BUCKETS for b in values.values())


def test_buckets_are_spread_evenly() -> None:
    per_tenth = Counter(b * 10 // BUCKETS for b in user_buckets())
    assert all(abs(n - USERS / 10) < USERS / 100 for n in per_tenth.values())


# --- allocations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [[50, 50], [90, 10], [33.3, 33.3, 33.4], [70, 20, 10, 0], [1, 99], [25, 25, 25, 25], [100]],
)
def test_shares_over_100k_users_are_within_one_point_of_the_weights(
    weights: list[float],
) -> None:
    allocation = initial_allocation(named(weights))
    got = shares(allocation)
    for name, weight in named(weights):
        assert got[name] == pytest.approx(weight, abs=1.0), (name, got)


def test_zero_weight_variant_gets_no_users_but_stays_listed() -> None:
    allocation = initial_allocation([("control", 70), ("off", 0), ("candidate", 30)])
    assert allocation.names == ("control", "off", "candidate")
    assert allocation.counts()["off"] == 0
    assert "off" not in set(owners(allocation))


def test_integer_percentages_map_to_exact_bucket_counts() -> None:
    counts = bucket_counts([("a", 33.33), ("b", 33.33), ("c", 33.34)])
    assert counts == {"a": 3333, "b": 3333, "c": 3334}  # float noise cost no one a bucket


def test_rounding_is_deterministic_largest_remainder() -> None:
    # 10,000 / 3 = 3333.33 each: one leftover bucket, ties broken by position.
    assert bucket_counts([("a", 1), ("b", 1), ("c", 1)]) == {"a": 3334, "b": 3333, "c": 3333}
    # 2/3 of 10,000 = 6666.67 has the largest remainder and takes the leftover.
    assert bucket_counts([("a", 1), ("b", 2)]) == {"a": 3333, "b": 6667}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([], "no variants"),
        ([("a", 50), ("a", 50)], "duplicate"),
        ([("a", -1), ("b", 101)], "weight -1"),
        ([("a", float("nan")), ("b", 100)], "weight nan"),
        ([("a", 0), ("b", 0)], "above 0"),
    ],
)
def test_bad_weights_are_refused(weights: Weights, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        initial_allocation(weights)


def assert_tiles(allocation: Allocation, weights: Weights) -> None:
    """Counts follow the quotas, sum to BUCKETS, ranges are disjoint and cover every bucket."""
    counts = allocation.counts()
    total = sum(w for _, w in weights)
    assert sum(counts.values()) == BUCKETS
    assert list(counts) == [name for name, _ in weights]
    for name, weight in weights:
        assert abs(counts[name] - weight * BUCKETS / total) < 1, (name, counts)
        if weight == 0:
            assert counts[name] == 0
    pieces = sorted(r for rs in allocation.ranges.values() for r in rs)
    assert pieces[0][0] == 0
    assert pieces[-1][1] == BUCKETS
    assert all(a[1] == b[0] for a, b in pairwise(pieces))
    assert all(start < end for start, end in pieces)


@given(any_weights)
def test_initial_allocation_tiles_the_buckets_by_weight(weights: list[float]) -> None:
    assert_tiles(initial_allocation(named(weights)), named(weights))


@given(any_weights)
def test_allocation_json_round_trip(weights: list[float]) -> None:
    allocation = initial_allocation(named(weights))
    assert Allocation.from_json(allocation.to_json()) == allocation
    assert all(
        isinstance(x, int) for rs in allocation.to_json().values() for pair in rs for x in pair
    )


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"a": [[0, 6000]], "b": [[5000, 10000]]}, "overlap"),
        ({"a": [[0, 4000]], "b": [[5000, 10000]]}, "gap"),
        ({"a": [[0, 9000]]}, "not allocated"),
        ({"a": [[0, "x"]]}, "malformed"),
        ({}, "no variants"),
    ],
)
def test_allocation_from_json_refuses_ranges_that_do_not_tile(
    data: dict[str, list[list[int]]], problem: str
) -> None:
    with pytest.raises(InvalidInput, match=problem):
        Allocation.from_json(data)


# --- stickiness ------------------------------------------------------------------------------

HALVES: Weights = [("control", 50), ("candidate", 50)]
SPLIT = split(HALVES)


@given(
    int_weights,
    st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=30),
    st.text(max_size=20),
)
def test_same_salt_and_user_get_the_same_variant_from_separately_built_allocations(
    weights: list[int], users: list[str], salt: str
) -> None:
    first = split(named(weights), salt=salt)
    second = split(named(list(weights)), salt=salt)
    rng = random.Random(0)  # must not be consulted: every user here has an id
    for user in users:
        got = {name_and_bucket(assign(s, user, rng)) for s in (first, second, first)}
        assert len(got) == 1
        assert next(iter(got))[1] == bucket(salt or SALT, user)  # an empty salt means the id


def test_user_assignment_reports_the_hash_bucket() -> None:
    variant, user_bucket = assign(SPLIT, "alice", random.Random(0))
    assert user_bucket == bucket(SALT, "alice") == 9215
    assert variant.name == "candidate"  # 9215 >= 5000
    assert variant is SPLIT.variants[1]


def test_a_different_salt_reshuffles_users() -> None:
    one = split(HALVES, salt="one")
    two = split(HALVES, salt="two")
    same = sum(
        assign(one, f"user-{i}", Script()).variant == assign(two, f"user-{i}", Script()).variant
        for i in range(2000)
    )
    assert 800 < same < 1200  # independent halves agree about half the time


# --- the assignment order --------------------------------------------------------------------


@pytest.mark.parametrize("paused", [False, True])
def test_pinned_user_wins_over_hash_and_pause(paused: bool) -> None:
    user = "alice"  # hashes to candidate
    pinned = split(HALVES, paused=paused, pinned_users={user: "candidate", "bob": "control"})
    assert name_and_bucket(assign(pinned, user, Script())) == ("candidate", NO_BUCKET)
    assert name_and_bucket(assign(pinned, "bob", Script())) == ("control", NO_BUCKET)


def test_a_pin_to_a_variant_that_is_gone_falls_back_to_the_hash() -> None:
    stale = split(HALVES, pinned_users={"alice": "retired"})
    assert name_and_bucket(assign(stale, "alice", Script())) == ("candidate", 9215)


def test_paused_sends_everyone_to_the_baseline() -> None:
    paused = split(HALVES, paused=True)
    for user in ("alice", "bob", "", None):
        assert name_and_bucket(assign(paused, user, Script(0.99))) == ("control", NO_BUCKET)


@pytest.mark.parametrize(("user", "per_user"), [("", True), (None, True), ("alice", False)])
def test_no_user_or_per_request_draws_a_random_bucket(user: str | None, per_user: bool) -> None:
    per_request = split(HALVES, per_user=per_user)
    low = name_and_bucket(assign(per_request, user, Script(0.1)))
    high = name_and_bucket(assign(per_request, user, Script(0.9)))
    assert (low, high) == (("control", NO_BUCKET), ("candidate", NO_BUCKET))


def test_random_assignment_follows_the_weights() -> None:
    rng = random.Random(7)
    eighty = split([("a", 80), ("b", 20)])
    counts = Counter(assign(eighty, "", rng).variant.name for _ in range(20_000))
    assert counts["b"] / 20_000 == pytest.approx(0.2, abs=0.01)


def test_random_draw_of_almost_one_stays_in_range() -> None:
    assert assign(SPLIT, "", Script(0.9999999999)).variant.name == "candidate"


def test_without_an_allocation_the_weights_decide() -> None:
    draft = Split((Arm("a", 30), Arm("b", 70)), allocation=None)
    assert assign(draft, "", Script(0.29)).variant.name == "a"
    assert assign(draft, "", Script(0.31)).variant.name == "b"


def test_an_allocation_out_of_step_with_the_variants_is_refused() -> None:
    broken = Split((Arm("a", 100),), allocation=initial_allocation([("z", 100)]))
    with pytest.raises(InvalidInput, match="'z', which is not a variant"):
        assign(broken, "alice", Script())


# --- minimal movement ------------------------------------------------------------------------


def moved_buckets(before: Allocation, after: Allocation) -> list[tuple[str, str]]:
    return [(a, b) for a, b in zip(owners(before), owners(after), strict=True) if a != b]


def test_raising_a_weight_moves_only_the_users_it_must() -> None:
    before = initial_allocation([("control", 50), ("candidate", 50)])
    after = reallocate(before, [("control", 40), ("candidate", 60)])
    moves = [
        (before.owner(b), after.owner(b))
        for b in user_buckets()
        if before.owner(b) != after.owner(b)
    ]
    assert len(moves) / USERS == pytest.approx(0.10, abs=0.01)
    assert set(moves) == {("control", "candidate")}


def test_unchanged_variants_keep_every_bucket() -> None:
    before = initial_allocation([("a", 25), ("b", 25), ("c", 25), ("d", 25)])
    after = reallocate(before, [("a", 10), ("b", 25), ("c", 25), ("d", 40)])
    assert after.ranges["b"] == before.ranges["b"]
    assert after.ranges["c"] == before.ranges["c"]
    assert set(moved_buckets(before, after)) == {("a", "d")}
    assert len(moved_buckets(before, after)) == 1500


def test_unchanged_fractional_weight_keeps_its_rounded_count() -> None:
    # Quotas 365.4 / 5502 / 525 / 3607.6: d takes the leftover bucket (3608). After a gives
    # weight to b, plain largest remainder would hand the leftovers to a and b (.7 > .6) and move
    # a user out of d although d's weight did not change; the previous counts break that tie.
    old = [("a", 3.654), ("b", 55.02), ("c", 5.25), ("d", 36.076)]
    new = [("a", 1.087), ("b", 57.587), ("c", 5.25), ("d", 36.076)]
    assert bucket_counts(new)["d"] == 3607  # the trap
    before = initial_allocation(old)
    after = reallocate(before, new)
    assert before.counts()["d"] == after.counts()["d"] == 3608
    assert after.ranges["c"] == before.ranges["c"]
    assert after.ranges["d"] == before.ranges["d"]
    assert set(moved_buckets(before, after)) == {("a", "b")}


@dataclass(frozen=True)
class Shift:
    """Move `amount` basis points of weight from variant `source` to variant `target`."""

    source: int
    target: int
    amount: int


@st.composite
def basis_points_and_shift(draw: st.DrawFn) -> tuple[list[int], Shift]:
    """Weights in basis points (summing to 10,000) and a shift between two of them."""
    cuts = sorted(draw(st.lists(st.integers(0, BUCKETS), min_size=1, max_size=7)))
    weights = [b - a for a, b in zip([0, *cuts], [*cuts, BUCKETS], strict=True)]
    source = draw(st.integers(0, len(weights) - 1))
    target = draw(st.integers(0, len(weights) - 1).filter(lambda t: t != source))
    return weights, Shift(source, target, draw(st.integers(0, weights[source])))


@given(basis_points_and_shift())
def test_a_shift_between_two_variants_moves_exactly_that_weight_between_them(
    case: tuple[list[int], Shift],
) -> None:
    weights, shift = case
    new = list(weights)
    new[shift.source] -= shift.amount
    new[shift.target] += shift.amount
    before = initial_allocation(named(weights))
    after = reallocate(before, named(new))
    assert_tiles(after, named(new))
    moves = moved_buckets(before, after)
    assert len(moves) == shift.amount
    assert set(moves) <= {(f"v{shift.source}", f"v{shift.target}")}


@given(any_weights, any_weights)
def test_reallocate_moves_the_sum_of_positive_changes_and_no_more(
    old: list[float], new: list[float]
) -> None:
    width = min(len(old), len(new))
    old, new = old[:width], new[:width]
    if not (sum(old) > 1e-3 and sum(new) > 1e-3):
        return
    before = initial_allocation(named(old))
    after = reallocate(before, named(new))
    assert_tiles(after, named(new))
    gained = {n: c - before.counts()[n] for n, c in after.counts().items()}
    moves = moved_buckets(before, after)
    assert len(moves) == sum(g for g in gained.values() if g > 0)
    for source, target in moves:  # buckets leave only shrinking variants, for growing ones
        assert gained[source] < 0 < gained[target]


@settings(max_examples=30)
@given(st.lists(int_weights.filter(lambda ws: len(ws) >= 3), min_size=2, max_size=20))
def test_a_chain_of_reallocations_stays_a_valid_tiling(chain: list[list[int]]) -> None:
    width = min(len(ws) for ws in chain)
    chain = [ws[:width] for ws in chain if any(ws[:width])]
    if not chain:
        return
    allocation = initial_allocation(named(chain[0]))
    for weights in chain[1:]:
        allocation = reallocate(allocation, named(weights))
        assert_tiles(allocation, named(weights))
        assert Allocation.from_json(allocation.to_json()) == allocation


def test_user_share_moved_matches_the_weight_moved() -> None:
    before = initial_allocation([("a", 50), ("b", 30), ("c", 20)])
    after = reallocate(before, [("a", 35), ("b", 30), ("c", 35)])
    moved = sum(before.owner(b) != after.owner(b) for b in user_buckets())
    assert moved / USERS == pytest.approx(0.15, abs=0.01)  # 15 points moved from a to c
    for b in user_buckets()[:5000]:
        if before.owner(b) == "b":
            assert after.owner(b) == "b"


def test_removed_variant_frees_its_buckets_and_new_one_takes_them() -> None:
    before = initial_allocation([("a", 50), ("b", 50)])
    after = reallocate(before, [("a", 50), ("c", 50)])
    assert after.ranges == {"a": before.ranges["a"], "c": before.ranges["b"]}


# --- shadows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeShadow:
    name: str
    sample_rate: float


@dataclass(frozen=True)
class FakeExperiment:
    shadows: tuple[FakeShadow, ...]


def test_shadow_sample_rates_zero_and_one_mean_always_without_a_draw() -> None:
    exp = FakeExperiment((FakeShadow("zero", 0.0), FakeShadow("one", 1.0)))
    assert [s.name for s in shadows_for(exp, Script())] == ["zero", "one"]


def test_partial_shadows_are_drawn_independently() -> None:
    exp = FakeExperiment((FakeShadow("quarter", 0.25), FakeShadow("half", 0.5)))
    assert [s.name for s in shadows_for(exp, Script(0.1, 0.7))] == ["quarter"]
    assert [s.name for s in shadows_for(exp, Script(0.3, 0.2))] == ["half"]


def test_shadow_sampling_follows_the_rate() -> None:
    exp = FakeExperiment((FakeShadow("tenth", 0.1),))
    rng = random.Random(3)
    hits = sum(len(shadows_for(exp, rng)) for _ in range(20_000))
    assert hits / 20_000 == pytest.approx(0.1, abs=0.01)
