"""Variant assignment: users hashed into buckets, buckets allocated to variants by weight.

Pure: no I/O, no clock, no protobuf. Randomness comes from an injected source.

A user's bucket is a stable hash of (salt, user id) into `BUCKETS` buckets, the same on every
router, process and restart. An `Allocation` gives each variant a set of [start, end) bucket
ranges whose sizes follow the weights. It is stored with the experiment (as plain JSON), so every
router maps a bucket to the same variant, and weight changes go through `reallocate`, which moves
only the buckets it must: a user changes variant only when the new split takes their bucket away
from the variant they had.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, Protocol, TypeVar

from loopline.errors import InvalidInput

__all__ = [
    "BUCKETS",
    "NO_BUCKET",
    "Allocation",
    "Assignment",
    "HasShadows",
    "RandomSource",
    "Range",
    "SampledShadow",
    "Split",
    "WeightedVariant",
    "assign",
    "bucket",
    "bucket_counts",
    "initial_allocation",
    "reallocate",
    "shadows_for",
]

BUCKETS = 10_000
# The recorded `user_bucket` of an assignment that did not come from the user's hash.
NO_BUCKET = -1

Range = tuple[int, int]
Weights = Sequence[tuple[str, float]]
# Quotas are rounded before flooring so that float noise (33.33 * 100 = 3332.9999999999995)
# does not cost a variant the bucket it is owed; real quotas never differ at this resolution.
_QUOTA_DIGITS = 6


class RandomSource(Protocol):
    """What assignment needs from `random.Random`: a float in [0, 1)."""

    def random(self) -> float:
        """A float in [0, 1)."""


class SampledShadow(Protocol):
    """A shadow variant as shadow sampling sees it."""

    @property
    def name(self) -> str:
        """The shadow's name."""

    @property
    def sample_rate(self) -> float:
        """Fraction of requests mirrored, in [0, 1]; 0 is read as 1."""


class WeightedVariant(Protocol):
    """A served variant as assignment sees it."""

    @property
    def name(self) -> str:
        """The variant's name."""

    @property
    def weight(self) -> float:
        """Its share of the traffic (relative; served weights sum to 100)."""


VariantT = TypeVar("VariantT", bound=WeightedVariant)
VariantT_co = TypeVar("VariantT_co", bound=WeightedVariant, covariant=True)


class Split(Protocol[VariantT_co]):
    """What assignment needs from an experiment."""

    @property
    def id(self) -> str:
        """The experiment id (the default salt)."""

    @property
    def salt(self) -> str:
        """Salt of the user hash; empty means the id."""

    @property
    def variants(self) -> Sequence[VariantT_co]:
        """Served variants; the first is the baseline."""

    @property
    def pinned_users(self) -> Mapping[str, str]:
        """user id -> variant name."""

    @property
    def allocation(self) -> Allocation | None:
        """Bucket ranges per variant; None until stored (then the weights' initial one)."""

    @property
    def paused(self) -> bool:
        """True when everyone goes to the baseline."""

    @property
    def per_user(self) -> bool:
        """True when a user id keeps its caller on one variant."""


ShadowT_co = TypeVar("ShadowT_co", bound=SampledShadow, covariant=True)
ShadowT = TypeVar("ShadowT", bound=SampledShadow)


class HasShadows(Protocol[ShadowT_co]):
    """Anything with shadow variants (an experiment)."""

    @property
    def shadows(self) -> Sequence[ShadowT_co]:
        """The shadow variants."""


def bucket(salt: str, user_id: str) -> int:
    """The user's bucket in [0, BUCKETS): stable across processes, machines and restarts.

    sha256, never Python's `hash` (randomised per process). The NUL separator keeps
    ("ab", "c") and ("a", "bc") apart. 64 bits of digest make the modulo bias negligible.
    """
    digest = hashlib.sha256(f"{salt}\x00{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Allocation:
    """Which buckets each variant owns: disjoint [start, end) ranges covering [0, BUCKETS).

    Variants keep the order they were given in; the first is the baseline (control). A variant
    with weight 0 is listed with no ranges. `to_json` gives plain lists of ints for Redis.
    """

    ranges: Mapping[str, tuple[Range, ...]]
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _owners: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        normalised = {name: _merge(pieces) for name, pieces in self.ranges.items()}
        if not normalised:
            raise InvalidInput("allocation: no variants", field="allocation")
        pieces = sorted((start, end, name) for name, rs in normalised.items() for start, end in rs)
        _check_cover(pieces)
        object.__setattr__(self, "ranges", normalised)
        object.__setattr__(self, "_starts", tuple(start for start, _, _ in pieces))
        object.__setattr__(self, "_owners", tuple(name for _, _, name in pieces))

    @property
    def names(self) -> tuple[str, ...]:
        """Variant names in order; the first is the baseline."""
        return tuple(self.ranges)

    @property
    def baseline(self) -> str:
        """The first variant: where a paused experiment sends everyone."""
        return next(iter(self.ranges))

    def owner(self, bucket_: int) -> str:
        """The variant that owns `bucket_` (O(log ranges))."""
        if not 0 <= bucket_ < BUCKETS:
            raise InvalidInput(f"bucket {bucket_} outside [0, {BUCKETS})", bucket=bucket_)
        return self._owners[bisect.bisect_right(self._starts, bucket_) - 1]

    def counts(self) -> dict[str, int]:
        """Buckets per variant; they sum to BUCKETS."""
        return {name: sum(end - start for start, end in rs) for name, rs in self.ranges.items()}

    def to_json(self) -> dict[str, list[list[int]]]:
        """Plain JSON: variant name -> [[start, end], ...] (insertion order is variant order)."""
        return {name: [[start, end] for start, end in rs] for name, rs in self.ranges.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Sequence[Sequence[int]]]) -> Allocation:
        """The inverse of `to_json`; raises `InvalidInput` for ranges that do not tile."""
        try:
            ranges = {str(name): tuple(_range(pair) for pair in rs) for name, rs in data.items()}
        except (TypeError, ValueError) as err:
            raise InvalidInput(f"allocation: malformed ranges ({err})", field="allocation") from err
        return cls(ranges)


def _range(pair: Sequence[int]) -> Range:
    start, end = pair
    return int(start), int(end)


def _merge(ranges: Iterable[Range]) -> tuple[Range, ...]:
    """Sorted ranges with touching neighbours joined and empty ones dropped."""
    merged: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return tuple(merged)


def _check_cover(pieces: Sequence[tuple[int, int, str]]) -> None:
    """Raise unless the sorted pieces tile [0, BUCKETS) exactly: no gap, no overlap."""
    expected = 0
    for start, end, name in pieces:
        if start != expected:
            problem = "overlap" if start < expected else "gap"
            raise InvalidInput(
                f"allocation: {problem} at bucket {min(start, expected)} (variant {name!r}); "
                f"ranges must tile [0, {BUCKETS}) exactly",
                field="allocation",
            )
        expected = end
    if expected != BUCKETS:
        raise InvalidInput(
            f"allocation: buckets {expected}..{BUCKETS - 1} are not allocated", field="allocation"
        )


def bucket_counts(weights: Weights, previous: Mapping[str, int] | None = None) -> dict[str, int]:
    """Integer bucket counts proportional to `weights`, summing to BUCKETS (largest remainder).

    Weights are relative (served weights sum to 100, but any positive total works). Each count
    is the floor or the ceiling of its exact quota. Leftover buckets go first to variants that
    already had their ceiling in `previous` (so a variant whose weight did not change keeps its
    count), then by largest fractional part, then by position: deterministic.
    """
    _check_weights(weights)
    total = math.fsum(w for _, w in weights)
    quotas = [round(w * BUCKETS / total, _QUOTA_DIGITS) for _, w in weights]
    counts = [math.floor(q) for q in quotas]
    before = previous or {}

    def preference(i: int) -> tuple[int, float, int]:
        had = before.get(weights[i][0])
        tier = 0 if had == counts[i] + 1 else 2 if had == counts[i] else 1
        return tier, counts[i] - quotas[i], i

    # Zero quotas never take a bucket: a weight of 0 must send nothing.
    candidates = sorted((i for i, q in enumerate(quotas) if q > counts[i]), key=preference)
    for i in candidates[: BUCKETS - sum(counts)]:
        counts[i] += 1
    return {name: count for (name, _), count in zip(weights, counts, strict=True)}


def _check_weights(weights: Weights) -> None:
    names = [name for name, _ in weights]
    if not names:
        raise InvalidInput("no variants to allocate buckets to", field="variants")
    if len(set(names)) != len(names):
        raise InvalidInput(f"duplicate variant names in {names}", field="variants")
    for name, weight in weights:
        if not (math.isfinite(weight) and weight >= 0):
            raise InvalidInput(
                f"variant {name!r}: weight {weight} must be a finite number >= 0", field="weight"
            )
    if not math.fsum(w for _, w in weights) > 0:
        raise InvalidInput("at least one variant needs a weight above 0", field="weight")


def initial_allocation(weights: Weights) -> Allocation:
    """Contiguous ranges in variant order, sized by `bucket_counts`."""
    ranges: dict[str, tuple[Range, ...]] = {}
    start = 0
    for name, count in bucket_counts(weights).items():
        ranges[name] = ((start, start + count),) if count else ()
        start += count
    return Allocation(ranges)


def reallocate(previous: Allocation, new_weights: Weights) -> Allocation:
    """A new allocation for `new_weights` that moves as few buckets as possible.

    A variant whose count shrinks gives up buckets from the end of its ranges; growers take
    exactly those freed buckets, lowest first, in variant order; every other variant keeps every
    bucket it had. So the buckets that change owner number the sum of the positive count changes.
    Variants absent from `new_weights` free all their buckets; new ones start with none.
    """
    counts = bucket_counts(new_weights, previous.counts())
    kept: dict[str, list[Range]] = {}
    freed: list[Range] = []
    for name, owned in previous.ranges.items():
        keep, give = _split_tail(owned, counts.get(name, 0))
        kept[name] = keep
        freed += give
    pool = sorted(freed)
    ranges: dict[str, tuple[Range, ...]] = {}
    for name, count in counts.items():
        have = kept.get(name, [])
        taken, pool = _take(pool, count - _size(have))
        ranges[name] = tuple(have + taken)
    return Allocation(ranges)


def _size(ranges: Iterable[Range]) -> int:
    return sum(end - start for start, end in ranges)


def _split_tail(ranges: Sequence[Range], keep: int) -> tuple[list[Range], list[Range]]:
    """(the first `keep` buckets of `ranges`, the rest): shrinking gives up the tail."""
    kept: list[Range] = []
    given: list[Range] = []
    left = keep
    for start, end in ranges:
        take = max(0, min(end - start, left))
        left -= take
        if take:
            kept.append((start, start + take))
        if start + take < end:
            given.append((start + take, end))
    return kept, given


def _take(pool: list[Range], count: int) -> tuple[list[Range], list[Range]]:
    """(`count` buckets from the front of `pool`, what is left of the pool)."""
    taken: list[Range] = []
    rest = list(pool)
    while count > 0:
        start, end = rest.pop(0)
        size = min(count, end - start)
        taken.append((start, start + size))
        if start + size < end:
            rest.insert(0, (start + size, end))
        count -= size
    return taken, rest


class Assignment(NamedTuple, Generic[VariantT]):
    """The variant a request goes to, and the user's hash bucket.

    `bucket` (recorded as `user_bucket`) is the user's hash bucket when the hash decided, else
    `NO_BUCKET` (-1): pinned, paused and random assignments carry no user bucket, so analyses by
    bucket see only hashed users. Unpacks as `variant, bucket = assign(...)`.
    """

    variant: VariantT
    bucket: int


def assign(
    experiment: Split[VariantT], user_id: str | None, rng: RandomSource
) -> Assignment[VariantT]:
    """Pick the variant for one request.

    In order: a pinned user gets their variant (even while paused: QA accounts must see the
    candidate); a paused experiment sends everyone to the first (baseline) variant; with
    per-user stickiness and a user id, the owner of `bucket(salt, user_id)`; otherwise the owner
    of a bucket drawn from `rng`, so random requests follow the weights too. The salt defaults to
    the experiment id; an experiment without an allocation yet (a draft) uses its weights'.
    """
    variants = experiment.variants
    pinned = _named(variants, experiment.pinned_users.get(user_id, "")) if user_id else None
    if pinned is not None:
        return Assignment(pinned, NO_BUCKET)
    if experiment.paused:
        return Assignment(variants[0], NO_BUCKET)
    allocation = experiment.allocation or initial_allocation([(v.name, v.weight) for v in variants])
    if experiment.per_user and user_id:
        hashed = bucket(experiment.salt or experiment.id, user_id)
        return Assignment(_owner(variants, allocation, hashed), hashed)
    drawn = min(int(rng.random() * BUCKETS), BUCKETS - 1)
    return Assignment(_owner(variants, allocation, drawn), NO_BUCKET)


def _named(variants: Sequence[VariantT], name: str) -> VariantT | None:
    # A handful of variants: a scan beats building a dict per request.
    return next((v for v in variants if v.name == name), None) if name else None


def _owner(variants: Sequence[VariantT], allocation: Allocation, bucket_: int) -> VariantT:
    owner = allocation.owner(bucket_)
    found = _named(variants, owner)
    if found is None:  # validation keeps allocation and variants in step; say so if not
        raise InvalidInput(
            f"allocation names {owner!r}, which is not a variant", field="allocation"
        )
    return found


def shadows_for(experiment: HasShadows[ShadowT], rng: RandomSource) -> list[ShadowT]:
    """The shadows that get a copy of one request: each drawn independently at its sample rate.

    Whether a paused or finished experiment mirrors at all is the caller's decision.
    """
    return [s for s in experiment.shadows if _sampled(s.sample_rate, rng)]


def _sampled(rate: float, rng: RandomSource) -> bool:
    # 0 means "unset" in the contract and reads as 1; no draw is spent on certain outcomes.
    return rate <= 0 or rate >= 1 or rng.random() < rate
