"""The monitor's state in Redis: tumbling windows, since-deploy totals, drift samples and the
prediction index that joins late feedback; folded idempotently, read back as `Totals`.

Everything lives in Redis, so a restarted monitor loses nothing and several monitors share one
state. A batch is folded by one Lua script (`_FOLD_LUA`), atomically: it checks each record against
the prediction index, counts the new ones, joins labels, and writes all counter deltas at once. A
record folded twice (reclaimed after a crash, replayed) finds its index field already there and
counts nothing, so folding and acknowledging need not be one transaction: fold, then XACK.
One script call per batch is cheaper than a pipeline of per-record commands, because the
script sums the deltas of a batch and writes each (key, field) once.

Redis key layout (`P` = `StateConfig.prefix`, default `loopline:monitor`; `W` = window length in
seconds; `w` = a window's start, unix seconds, a multiple of W; names are joined with ':' and are
assumed not to contain it):

    P:req:<request_id>                      hash, TTL prediction_ttl_s (refreshed on each touch)
        s                                   the served prediction: model, version, experiment,
                                            variant, shadow (0/1), w, predicted label (joined
                                            by \\x1f)
        h:<variant>:<model>:<version>       a shadow's prediction, same layout
        y                                   the true label (pending until a prediction arrives)
        es, eh:<variant>:<model>:<version>  a failure of the served request or of a shadow copy
    P:win:W:mv:<model>:<version>:<w>        hash, window counters of a model version; TTL
                                            window_ttl_s after the last write
    P:win:W:ev:<exp>:<variant>:<0|1>:<w>    hash, window counters of an experiment variant
                                            (1: shadow)
    P:tot:mv:<model>:<version>              hash, since-deploy counters (+ first, last: times of
                                            the earliest and latest record); no TTL
    P:tot:ev:<exp>:<variant>:<0|1>          hash, since-start counters of a variant; no TTL
    P:wins:W:mv:<model>:<version>           zset of window starts that have data (score = w)
    P:wins:W:ev:<exp>:<variant>:<0|1>       zset, the same per variant
    P:smp:W:<model>:<version>:<w>           list, reservoir sample (at most sample_size rows
                                            "confidence,tokens,unknown_share,s1..s16\\x1flabel";
                                            nan when missing), TTL sample_ttl_s
    P:models                                set of model names
    P:versions:<model>                      set of versions seen
    P:experiments                           set of experiment ids
    P:variants:<exp>                        hash "<variant>:<0|1>" -> "<model>\\x1f<version>"

Counter fields of the window and total hashes: `n` requests, `p:<label>` predicted-label
counts, `c:<i>` / `q:<i>` / `k:<i>` confidence / latency / token-count histogram bins (edges
below), `cs` confidence sum, `qs` latency sum (ms), `ks` token sum, `u` unknown-share sum and
`un` its count, `t` truncated, `y` labelled, `ok` correct, `ac` shadow answers compared with the
served one, `aa` of those, agreeing, `e` requests that failed in the worker (not in `n`). Absent
fields are zero.

Counting rules. A shadow's prediction counts for its own model version as well as for its
variant: it is a real inference on live traffic. A label counts once per request id (the first
one wins) and is credited to the window of each prediction of that request (served and shadows),
whenever it arrives within the retention. Idempotency holds within the retention: a record
replayed after its index entry expired is counted again.

Memory, measured: ~170 bytes per request id in the index (times the requests of
`prediction_ttl_s`), ~1-3 KiB per window hash, ~370 KiB per full sample (one per model version
and window, kept `sample_ttl_s`).

Idempotency is per request id and kind: the served prediction (`s`), each shadow's (`h:...`,
since a shadow shares the served request's id) and the label (`y`) are separate index fields.
"""

from __future__ import annotations

import bisect
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from numpy.typing import NDArray

from services.monitor.events import SKETCH_DIM, Failure, Label, Prediction

__all__ = [
    "CONFIDENCE_EDGES",
    "LATENCY_EDGES_MS",
    "TOKEN_EDGES",
    "FoldResult",
    "Samples",
    "State",
    "StateConfig",
    "Totals",
    "VariantTotals",
    "histogram_quantile",
    "sum_totals",
]

# Bin i of a histogram holds values in [edges[i-1], edges[i]); bin 0 what is below edges[0], the
# last bin what is at or above edges[-1]. Fixed edges make windows add up bin by bin.
CONFIDENCE_EDGES: tuple[float, ...] = tuple(i / 100 for i in range(1, 100))
# 0.1 ms to ~2 min in 10 % steps: a percentile read back is within ~5 % of the true one.
LATENCY_EDGES_MS: tuple[float, ...] = tuple(float(f"{0.1 * 1.1**i:.4g}") for i in range(148))
TOKEN_EDGES: tuple[int, ...] = (
    *(1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112),
    *(128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1536, 2048, 4096, 8192),
)

SEP = "\x1f"
_CONFIDENCE_FIELDS = tuple(f"c:{i}" for i in range(len(CONFIDENCE_EDGES) + 1))
_LATENCY_FIELDS = tuple(f"q:{i}" for i in range(len(LATENCY_EDGES_MS) + 1))
_TOKEN_FIELDS = tuple(f"k:{i}" for i in range(len(TOKEN_EDGES) + 1))
_NAN_SKETCH = ",".join(["nan"] * SKETCH_DIM)
_SAMPLE_COLUMNS = 3 + SKETCH_DIM


@dataclass(frozen=True)
class StateConfig:
    """Where the state lives and how long it is kept."""

    prefix: str = "loopline:monitor"
    window_s: int = 60  # tumbling window length
    prediction_ttl_s: int = 7 * 86_400  # how late feedback may arrive (and the dedup horizon)
    window_ttl_s: int = 8 * 86_400  # windows outlive the index so late labels still land
    sample_size: int = 2000  # drift sample rows per (model, version, window); 0: none
    sample_ttl_s: int = 6 * 3600  # samples are the bulk of the memory: kept for recent checks
    fold_chunk: int = 1000  # records per script call: bounds how long Redis is busy at once

    def __post_init__(self) -> None:
        for name in ("window_s", "prediction_ttl_s", "window_ttl_s", "sample_ttl_s", "fold_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"StateConfig.{name} must be at least 1")
        if self.sample_size < 0:
            raise ValueError("StateConfig.sample_size must not be negative")
        if self.window_ttl_s < self.prediction_ttl_s:
            raise ValueError(
                "StateConfig.window_ttl_s must be at least prediction_ttl_s, or a late label "
                "lands in a window that has already expired"
            )


def histogram_quantile(
    counts: Sequence[int], edges: Sequence[float], q: float, top: float | None = None
) -> float:
    """The `q` quantile (0..1) of binned values, interpolated linearly inside its bin.

    `top` is the upper bound of the last bin (default: its lower edge, for open-ended bins).
    NaN when the histogram is empty.
    """
    total = sum(counts)
    if total == 0:
        return math.nan
    rank = min(max(q, 0.0), 1.0) * total
    cumulative = 0
    for i, count in enumerate(counts):
        if count and cumulative + count >= rank:
            low = edges[i - 1] if i > 0 else 0.0
            high = edges[i] if i < len(edges) else (edges[-1] if top is None else top)
            return float(low + (high - low) * (rank - cumulative) / count)
        cumulative += count
    return float(edges[-1] if top is None else top)


def _zeros(edges: Sequence[float]) -> list[int]:
    return [0] * (len(edges) + 1)


@dataclass
class Totals:
    """Counters and histograms of predictions over a window, a range of windows or since deploy.

    `first` and `last` bound the time covered (window edges for windows, record times for the
    since-deploy totals); None when nothing was counted.
    """

    requests: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    confidence_counts: list[int] = field(default_factory=lambda: _zeros(CONFIDENCE_EDGES))
    confidence_sum: float = 0.0
    latency_counts: list[int] = field(default_factory=lambda: _zeros(LATENCY_EDGES_MS))
    latency_sum_ms: float = 0.0
    token_counts: list[int] = field(default_factory=lambda: _zeros(TOKEN_EDGES))
    token_sum: int = 0
    unknown_share_sum: float = 0.0
    unknown_share_count: int = 0
    truncated: int = 0
    labelled: int = 0
    correct: int = 0
    shadow_compared: int = 0
    shadow_agreed: int = 0
    errors: int = 0  # requests that failed in the worker, not counted in `requests`
    first: float | None = None
    last: float | None = None

    def merge(self, other: Totals) -> Totals:
        """Add `other` into this one (in place) and return self."""
        self.requests += other.requests
        for label, count in other.label_counts.items():
            self.label_counts[label] = self.label_counts.get(label, 0) + count
        for mine, theirs in (
            (self.confidence_counts, other.confidence_counts),
            (self.latency_counts, other.latency_counts),
            (self.token_counts, other.token_counts),
        ):
            for i, count in enumerate(theirs):
                mine[i] += count
        self.confidence_sum += other.confidence_sum
        self.latency_sum_ms += other.latency_sum_ms
        self.token_sum += other.token_sum
        self.unknown_share_sum += other.unknown_share_sum
        self.unknown_share_count += other.unknown_share_count
        self.errors += other.errors
        self.truncated += other.truncated
        self.labelled += other.labelled
        self.correct += other.correct
        self.shadow_compared += other.shadow_compared
        self.shadow_agreed += other.shadow_agreed
        self.first = _min(self.first, other.first)
        self.last = _max(self.last, other.last)
        return self

    # ----- read-back helpers (NaN where there is nothing to divide by)

    def label_shares(self) -> dict[str, float]:
        """Predicted-label shares of all requests, by label."""
        total = sum(self.label_counts.values())
        return {k: v / total for k, v in sorted(self.label_counts.items())} if total else {}

    def mean_confidence(self) -> float:
        """Mean top-label probability."""
        return _ratio(self.confidence_sum, sum(self.confidence_counts))

    def confidence_percentile(self, q: float) -> float:
        """The `q` quantile (0..1) of the confidence, from its 0.01-wide bins."""
        return histogram_quantile(self.confidence_counts, CONFIDENCE_EDGES, q, top=1.0)

    def confidence_share_below(self, threshold: float) -> float:
        """Share of predictions whose confidence is below `threshold` (interpolated in a bin)."""
        total = sum(self.confidence_counts)
        if total == 0:
            return math.nan
        below = 0.0
        for i, count in enumerate(self.confidence_counts):
            low = CONFIDENCE_EDGES[i - 1] if i > 0 else 0.0
            high = CONFIDENCE_EDGES[i] if i < len(CONFIDENCE_EDGES) else 1.0
            if high <= threshold:
                below += count
            elif low < threshold:
                below += count * (threshold - low) / (high - low)
        return below / total

    def latency_percentile(self, q: float) -> float:
        """The `q` quantile (0..1) of queue + compute latency, in milliseconds."""
        return histogram_quantile(self.latency_counts, LATENCY_EDGES_MS, q)

    def mean_latency_ms(self) -> float:
        """Mean queue + compute latency, in milliseconds."""
        return _ratio(self.latency_sum_ms, sum(self.latency_counts))

    def token_percentile(self, q: float) -> float:
        """The `q` quantile (0..1) of the token count."""
        return histogram_quantile(self.token_counts, TOKEN_EDGES, q)

    def mean_tokens(self) -> float:
        """Mean token count."""
        return _ratio(self.token_sum, sum(self.token_counts))

    def mean_unknown_share(self) -> float:
        """Mean share of unknown tokens."""
        return _ratio(self.unknown_share_sum, self.unknown_share_count)

    def truncation_rate(self) -> float:
        """Share of requests whose text was truncated."""
        return _ratio(self.truncated, self.requests)

    def accuracy(self) -> float:
        """correct / labelled (live accuracy from feedback)."""
        return _ratio(self.correct, self.labelled)

    def coverage(self) -> float:
        """labelled / requests: how much of the traffic the accuracy rests on."""
        return _ratio(self.labelled, self.requests)

    def agreement(self) -> float:
        """For a shadow: share of its answers equal to the served answer of the same request."""
        return _ratio(self.shadow_agreed, self.shadow_compared)


@dataclass
class VariantTotals:
    """An experiment variant (or shadow) with the model version that answered for it."""

    variant: str
    shadow: bool
    model: str
    version: str
    totals: Totals


@dataclass(frozen=True)
class Samples:
    """Per-prediction rows sampled from windows, for drift checks; NaN where a value was missing."""

    confidence: NDArray[np.float64]  # (n,)
    token_count: NDArray[np.float64]  # (n,)
    unknown_share: NDArray[np.float64]  # (n,)
    labels: list[str]  # predicted labels, (n,)
    sketch: NDArray[np.float64]  # (n, 16)
    windows: list[int]  # window starts the rows come from

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class FoldResult:
    """What a fold counted: new and already-folded records, and label-prediction joins made."""

    predictions: int = 0
    duplicate_predictions: int = 0
    labels: int = 0
    duplicate_labels: int = 0
    joins: int = 0
    failures: int = 0
    duplicate_failures: int = 0

    def __add__(self, other: FoldResult) -> FoldResult:
        return FoldResult(
            self.predictions + other.predictions,
            self.duplicate_predictions + other.duplicate_predictions,
            self.labels + other.labels,
            self.duplicate_labels + other.duplicate_labels,
            self.joins + other.joins,
            self.failures + other.failures,
            self.duplicate_failures + other.duplicate_failures,
        )


class State:
    """Folds predictions and labels into Redis and reads statistics back; see the module doc."""

    def __init__(
        self,
        client: aioredis.Redis,
        config: StateConfig | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or StateConfig()
        self._client = client
        self._script = client.register_script(_FOLD_LUA)
        self._random = (rng or random.Random()).random

    # ----- writing

    async def fold(
        self,
        predictions: Sequence[Prediction],
        labels: Sequence[Label] = (),
        failures: Sequence[Failure] = (),
    ) -> FoldResult:
        """Fold a batch; records folded before (by request id and kind) count nothing."""
        result = FoldResult()
        size = self.config.fold_chunk
        preds, labs, fails = list(predictions), list(labels), list(failures)
        while preds or labs or fails:
            p_part, preds = preds[:size], preds[size:]
            room = size - len(p_part)
            l_part, labs = labs[:room], labs[room:]
            room -= len(l_part)
            f_part, fails = fails[:room], fails[room:]
            result = result + await self._fold_chunk(p_part, l_part, f_part)
        return result

    async def _fold_chunk(
        self, preds: Sequence[Prediction], labs: Sequence[Label], fails: Sequence[Failure]
    ) -> FoldResult:
        c = self.config
        reply: Any = await self._script(
            args=[
                *(c.prefix, c.window_s, c.prediction_ttl_s, c.window_ttl_s),
                *(c.sample_size, c.sample_ttl_s, self._payload(preds, labs, fails)),
            ]
        )
        return FoldResult(*(int(x) for x in reply))

    def _payload(
        self, preds: Sequence[Prediction], labs: Sequence[Label], fails: Sequence[Failure]
    ) -> str:
        """The batch as one JSON argument: one string for redis-py to pack instead of ~20 per
        record, and decoded in C by the script (cjson)."""
        window_s, draw = self.config.window_s, self._random
        groups: dict[tuple[str, str, str, str, bool, int], int] = {}
        rows: list[list[Any]] = []
        for p in preds:
            key = (p.model, p.version, p.experiment, p.variant, p.shadow, int(p.time // window_s))
            number = groups.setdefault(key, len(groups) + 1)
            conf, lat, tok, unk = p.confidence, p.latency_ms, p.token_count, p.unknown_share
            sample = (
                f"{'nan' if conf is None else conf},{'nan' if tok is None else tok},"
                f"{'nan' if unk is None else unk},{p.sketch or _NAN_SKETCH}{SEP}{p.label}"
            )
            rows.append([
                p.request_id, number, p.label,
                *_binned(_CONFIDENCE_FIELDS, CONFIDENCE_EDGES, conf),
                *_binned(_LATENCY_FIELDS, LATENCY_EDGES_MS, lat),
                *_binned(_TOKEN_FIELDS, TOKEN_EDGES, tok),
                -1 if unk is None else unk, int(p.truncated), sample, draw(), p.time,
            ])  # fmt: skip
        failed: list[list[Any]] = []
        for f in fails:
            key = (f.model, f.version, f.experiment, f.variant, f.shadow, int(f.time // window_s))
            failed.append([f.request_id, groups.setdefault(key, len(groups) + 1), f.time])
        names = [
            SEP.join((m, v, e, var, "1" if shadow else "0", str(w * window_s)))
            for (m, v, e, var, shadow, w) in groups
        ]
        labels = [[label.request_id, label.label] for label in labs]
        batch = {"g": names, "p": rows, "l": labels, "f": failed}
        return json.dumps(batch, separators=(",", ":"))

    # ----- reading

    async def models(self) -> dict[str, list[str]]:
        """Every model seen, with its versions (sorted)."""
        names = sorted(_text(m) for m in await self._client.smembers(self._key("models")))
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.smembers(self._key("versions", name))
            replies = await pipe.execute()
        return {n: sorted(_text(v) for v in vs) for n, vs in zip(names, replies, strict=True)}

    async def versions(self, model: str) -> list[str]:
        """Versions of `model` seen, sorted."""
        return sorted(_text(v) for v in await self._client.smembers(self._key("versions", model)))

    async def experiments(self) -> list[str]:
        """Experiment ids seen, sorted."""
        return sorted(_text(e) for e in await self._client.smembers(self._key("experiments")))

    async def window_totals(
        self,
        model: str,
        version: str | None = None,
        start: float | None = None,
        end: float | None = None,
    ) -> Totals:
        """Totals of `model` (one version, or all) over the windows overlapping [start, end).

        Without start and end: the since-deploy totals, which outlive the windows' retention.
        """
        versions = [version] if version is not None else await self.versions(model)
        scopes = [f"mv:{model}:{v}" for v in versions]
        if start is None and end is None:
            return await self._since_start(scopes)
        return sum_totals(t for _w, t in await self._windows(scopes, start, end))

    async def window_series(
        self,
        model: str,
        version: str | None = None,
        start: float | None = None,
        end: float | None = None,
    ) -> list[tuple[int, Totals]]:
        """Per-window totals of `model` (one version, or all added up), oldest window first."""
        versions = [version] if version is not None else await self.versions(model)
        by_window: dict[int, Totals] = {}
        for w, totals in await self._windows([f"mv:{model}:{v}" for v in versions], start, end):
            by_window.setdefault(w, Totals()).merge(totals)
        return sorted(by_window.items())

    async def variant_totals(
        self, experiment_id: str, start: float | None = None, end: float | None = None
    ) -> dict[str, VariantTotals]:
        """Totals per variant of an experiment (since it started without start and end).

        Keyed by variant name; a name that both served and shadowed (unusual) has its shadow
        entry under "<variant>:shadow".
        """
        raw = await self._client.hgetall(self._key("variants", experiment_id))
        out: dict[str, VariantTotals] = {}
        for member, served_by in sorted((_text(k), _text(v)) for k, v in raw.items()):
            variant, _, flag = member.rpartition(":")
            model, _, version = served_by.partition(SEP)
            scope = [f"ev:{experiment_id}:{member}"]
            if start is None and end is None:
                totals = await self._since_start(scope)
            else:
                totals = sum_totals(t for _w, t in await self._windows(scope, start, end))
            name = f"{variant}:shadow" if flag == "1" and variant in out else variant
            out[name] = VariantTotals(variant, flag == "1", model, version, totals)
        return out

    async def drift_samples(
        self,
        model: str,
        version: str,
        start: float | None = None,
        end: float | None = None,
        limit: int | None = None,
    ) -> Samples:
        """Sampled rows of `model`/`version` from the windows overlapping [start, end).

        `limit` thins the rows evenly (a drift test needs a few thousand, not every window's).
        """
        windows = await self._window_starts(f"mv:{model}:{version}", start, end)
        c = self.config
        async with self._client.pipeline(transaction=False) as pipe:
            for w in windows:
                pipe.lrange(f"{c.prefix}:smp:{c.window_s}:{model}:{version}:{w}", 0, -1)
            replies: list[list[bytes]] = await pipe.execute()
        return _samples([row for rows in replies for row in rows], windows, limit)

    # ----- reading helpers

    def _key(self, *parts: str) -> str:
        return ":".join((self.config.prefix, *parts))

    async def _since_start(self, scopes: Sequence[str]) -> Totals:
        async with self._client.pipeline(transaction=False) as pipe:
            for scope in scopes:
                pipe.hgetall(self._key("tot", scope))
            replies: list[dict[bytes, bytes]] = await pipe.execute()
        return sum_totals(_totals(h) for h in replies)

    async def _window_starts(self, scope: str, start: float | None, end: float | None) -> list[int]:
        w = self.config.window_s
        low = "-inf" if start is None else str(int(start // w) * w)
        high = "+inf" if end is None else f"({end!r}"
        zkey = f"{self.config.prefix}:wins:{w}:{scope}"
        members: Any = await self._client.zrangebyscore(zkey, low, high)
        return sorted(int(m) for m in members)

    async def _windows(
        self, scopes: Sequence[str], start: float | None, end: float | None
    ) -> list[tuple[int, Totals]]:
        """(window start, totals) of every window of `scopes` overlapping [start, end)."""
        w = self.config.window_s
        starts = [(s, ws) for s in scopes for ws in await self._window_starts(s, start, end)]
        async with self._client.pipeline(transaction=False) as pipe:
            for scope, ws in starts:
                pipe.hgetall(f"{self.config.prefix}:win:{w}:{scope}:{ws}")
            replies: list[dict[bytes, bytes]] = await pipe.execute()
        out = []
        for (_scope, ws), h in zip(starts, replies, strict=True):
            totals = _totals(h)
            if totals.requests or totals.labelled:
                totals.first, totals.last = float(ws), float(ws + w)
            out.append((ws, totals))
        return out


# ----- helpers


def _binned(
    fields: Sequence[str], edges: Sequence[float], value: float | None
) -> tuple[str, float]:
    """(hash field of the value's bin, value); ("", 0) when the value is missing."""
    if value is None:
        return "", 0
    return fields[bisect.bisect_right(edges, value)], value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def sum_totals(parts: Iterable[Totals]) -> Totals:
    """One `Totals` adding up `parts`."""
    total = Totals()
    for part in parts:
        total.merge(part)
    return total


_HISTOGRAMS = {"c": "confidence_counts", "q": "latency_counts", "k": "token_counts"}
_INTS = {
    "n": "requests",
    "ks": "token_sum",
    "un": "unknown_share_count",
    "t": "truncated",
    "y": "labelled",
    "ok": "correct",
    "ac": "shadow_compared",
    "aa": "shadow_agreed",
    "e": "errors",
}
_FLOATS = {
    "cs": "confidence_sum",
    "qs": "latency_sum_ms",
    "u": "unknown_share_sum",
    "first": "first",
    "last": "last",
}


def _totals(raw: Mapping[bytes, bytes]) -> Totals:
    """A `Totals` from one window or total hash (field names in the module doc)."""
    t = Totals()
    for raw_key, raw_value in raw.items():
        key, value = raw_key.decode(), raw_value.decode()
        kind, _, rest = key.partition(":")
        if kind == "p" and rest:
            t.label_counts[rest] = t.label_counts.get(rest, 0) + int(value)
        elif kind in _HISTOGRAMS and rest:
            counts: list[int] = getattr(t, _HISTOGRAMS[kind])
            index = int(rest)
            if 0 <= index < len(counts):  # bins from other edges (an older monitor): dropped
                counts[index] += int(value)
        elif key in _INTS:
            setattr(t, _INTS[key], int(value))
        elif key in _FLOATS:
            setattr(t, _FLOATS[key], float(value))
    return t


def _samples(rows: Sequence[bytes], windows: list[int], limit: int | None) -> Samples:
    numbers: list[str] = []
    labels: list[str] = []
    for raw in rows:
        body, _, label = raw.decode("utf-8", "replace").partition(SEP)
        parts = body.split(",")
        if len(parts) == _SAMPLE_COLUMNS:
            numbers.extend(parts)
            labels.append(label)
    table = np.array(numbers, dtype=np.float64).reshape(len(labels), _SAMPLE_COLUMNS)
    if limit is not None and len(labels) > limit:
        keep = np.linspace(0, len(labels) - 1, num=limit).round().astype(np.int64)
        table, labels = table[keep], [labels[i] for i in keep]
    return Samples(
        confidence=table[:, 0],
        token_count=table[:, 1],
        unknown_share=table[:, 2],
        labels=labels,
        sketch=table[:, 3:],
        windows=windows,
    )


_FOLD_LUA = r"""
-- Fold a batch of predictions and labels into the monitor's state, atomically and idempotently.
-- The key layout is documented in the module docstring; `State._payload` builds the batch.
--
-- ARGV: prefix, window_s, prediction_ttl_s, window_ttl_s, sample_size, sample_ttl_s, batch JSON
--   {"g": [group, ...], "p": [prediction, ...], "l": [[request_id, label], ...],
--    "f": [[request_id, group number, time], ...]} where a group
--   is "model SEP version SEP experiment SEP variant SEP shadow SEP window" and a prediction
--   [request_id, group number, label, confidence field, confidence, latency field, latency ms,
--    token field, tokens, unknown share (-1: none), truncated (0/1), sample row, uniform draw,
--    time]; a field is the hash field of the value's histogram bin, "" when the value is missing.
-- Returns {new predictions, duplicate predictions, new labels, duplicate labels, joins,
--          new failures, duplicate failures}.
--
-- Keys are derived from the arguments rather than passed in KEYS: one Redis instance only
-- (a Cluster would need every key of a request id and its windows in one hash slot).
local P, W = ARGV[1], ARGV[2]
local PTTL, WTTL = tonumber(ARGV[3]), tonumber(ARGV[4])
local CAP, STTL = tonumber(ARGV[5]), tonumber(ARGV[6])
local batch = cjson.decode(ARGV[7])
local SEP = '\31'

-- Counter deltas are summed per group (a window of one model version and variant) and written
-- once per (key, field) at the end: a batch of 1000 records touches a few hundred fields of a
-- handful of keys, not 1000 x 4 x 10.
local groups = {}   -- group string -> group
local samples = {}  -- sample list key -> {length, seen}
local label_fields = {}

local function split(s)
  local out, i = {}, 1
  while true do
    local j = string.find(s, SEP, i, true)
    if not j then out[#out + 1] = string.sub(s, i); return out end
    out[#out + 1] = string.sub(s, i, j - 1)
    i = j + 1
  end
end

-- A group's hashes: {window (model, version), since-deploy (model, version), and with an
-- experiment: window (experiment, variant, shadow), since-start (experiment, variant, shadow)}.
local function group(gs)
  local g = groups[gs]
  if g then return g end
  local f = split(gs)
  local model, version, exp, variant, shadow, w = f[1], f[2], f[3], f[4], f[5], f[6]
  local mv = model .. ':' .. version
  g = {
    keys = {P .. ':win:' .. W .. ':mv:' .. mv .. ':' .. w, P .. ':tot:mv:' .. mv},
    zkeys = {P .. ':wins:' .. W .. ':mv:' .. mv},
    sample = P .. ':smp:' .. W .. ':' .. mv .. ':' .. w,
    field = 's', model = model, version = version, exp = exp, variant = variant,
    shadow = shadow, w = w, ints = {}, floats = {}, new = false,
  }
  if exp ~= '' then
    local ev = exp .. ':' .. variant .. ':' .. shadow
    g.keys[3] = P .. ':win:' .. W .. ':ev:' .. ev .. ':' .. w
    g.keys[4] = P .. ':tot:ev:' .. ev
    g.zkeys[2] = P .. ':wins:' .. W .. ':ev:' .. ev
  end
  if shadow == '1' then g.field = 'h:' .. variant .. ':' .. mv end
  groups[gs] = g
  return g
end

local function inc(g, field, v) g.ints[field] = (g.ints[field] or 0) + v end
local function incf(g, field, v) g.floats[field] = (g.floats[field] or 0) + v end

-- A stored prediction is "<group> SEP <label>".
local function stored(info)
  local gs, label = string.match(info, '^(.*)\31([^\31]*)$')
  return group(gs), label
end

local function count_label(g, predicted, truth)
  inc(g, 'y', 1)
  if predicted == truth then inc(g, 'ok', 1) end
end

local function count_agreement(g, shadow_label, served_label)
  inc(g, 'ac', 1)
  if shadow_label == served_label then inc(g, 'aa', 1) end
end

-- Reservoir sampling (Algorithm R) per (model, version, window): the first CAP predictions fill
-- the list, later ones replace a random slot with probability CAP / seen, so the sample stays
-- uniform over the whole window instead of keeping its first or last seconds. The uniform draw
-- comes from the caller (a script's math.random is seeded the same on every call).
local function sample(g, row, u)
  if CAP <= 0 then return end
  local s = samples[g.sample]
  if not s then
    s = {redis.call('LLEN', g.sample), tonumber(redis.call('HGET', g.keys[1], 'n') or '0')}
    samples[g.sample] = s
  end
  s[2] = s[2] + 1
  if s[1] < CAP then
    redis.call('RPUSH', g.sample, row)
    s[1] = s[1] + 1
  else
    local slot = math.floor(u * s[2])
    if slot < CAP then redis.call('LSET', g.sample, slot, row) end
  end
end

-- The prediction index: one hash per request id. Field 's' is the served prediction,
-- 'h:<variant>:<model>:<version>' a shadow's, 'y' the true label. A field that is already there
-- means this record was folded before: the HSET that creates it is the idempotency guard.
local function read_index(key)
  local flat = redis.call('HGETALL', key)
  local index = {}
  for i = 1, #flat, 2 do index[flat[i]] = flat[i + 1] end
  return index
end

local new_p, dup_p, new_l, dup_l, joins, new_f, dup_f = 0, 0, 0, 0, 0, 0, 0
local group_names = batch['g']

local function fold_prediction(r)
  local rid, g, label = r[1], group(group_names[r[2]]), r[3]
  local ikey = P .. ':req:' .. rid
  local index = read_index(ikey)
  if index[g.field] then dup_p = dup_p + 1; return end
  new_p = new_p + 1
  redis.call('HSET', ikey, g.field, group_names[r[2]] .. SEP .. label)
  redis.call('EXPIRE', ikey, PTTL)

  g.new = true
  local lf = label_fields[label]
  if not lf then lf = 'p:' .. label; label_fields[label] = lf end
  inc(g, 'n', 1)
  inc(g, lf, 1)
  if r[4] ~= '' then inc(g, r[4], 1); incf(g, 'cs', r[5]) end
  if r[6] ~= '' then inc(g, r[6], 1); incf(g, 'qs', r[7]) end
  if r[8] ~= '' then inc(g, r[8], 1); inc(g, 'ks', r[9]) end
  if r[10] >= 0 then incf(g, 'u', r[10]); inc(g, 'un', 1) end
  if r[11] == 1 then inc(g, 't', 1) end
  local t = r[14]
  if not g.first or t < g.first then g.first = t end
  if not g.last or t > g.last then g.last = t end
  sample(g, r[12], r[13])

  if index['y'] then joins = joins + 1; count_label(g, label, index['y']) end
  if g.shadow == '1' then
    if index['s'] then
      local _, served = stored(index['s'])
      count_agreement(g, label, served)
    end
  else
    for f, info in pairs(index) do
      if string.sub(f, 1, 2) == 'h:' then
        local sg, shadow_label = stored(info)
        count_agreement(sg, shadow_label, label)
      end
    end
  end
end

local function fold_label(r)
  local rid, truth = r[1], r[2]
  local ikey = P .. ':req:' .. rid
  local index = read_index(ikey)
  if index['y'] then dup_l = dup_l + 1; return end
  new_l = new_l + 1
  redis.call('HSET', ikey, 'y', truth)
  redis.call('EXPIRE', ikey, PTTL)
  -- A label before its prediction stays here, pending, until the prediction joins it.
  for f, info in pairs(index) do
    if f == 's' or string.sub(f, 1, 2) == 'h:' then
      local g, predicted = stored(info)
      joins = joins + 1
      count_label(g, predicted, truth)
    end
  end
end

-- A failed request: counted once per request id and kind ('e' before the prediction field's
-- name), in `e` of its group; it has no label, so feedback for it stays pending.
local function fold_failure(r)
  local rid, g, t = r[1], group(group_names[r[2]]), r[3]
  local ikey = P .. ':req:' .. rid
  if redis.call('HSETNX', ikey, 'e' .. g.field, '1') == 0 then dup_f = dup_f + 1; return end
  redis.call('EXPIRE', ikey, PTTL)
  new_f = new_f + 1
  g.new = true
  inc(g, 'e', 1)
  if not g.first or t < g.first then g.first = t end
  if not g.last or t > g.last then g.last = t end
end

for _, r in ipairs(batch['p']) do fold_prediction(r) end
for _, r in ipairs(batch['l']) do fold_label(r) end
for _, r in ipairs(batch['f'] or {}) do fold_failure(r) end

-- Write the deltas, keep the indexes of windows, models and variants, refresh TTLs.
local sets = {}
local function add_member(key, member)
  sets[key] = sets[key] or {}
  sets[key][member] = true
end

local function write_span(key, first, last)
  local old_first = tonumber(redis.call('HGET', key, 'first') or '')
  local old_last = tonumber(redis.call('HGET', key, 'last') or '')
  if not old_first or first < old_first then
    redis.call('HSET', key, 'first', string.format('%.6f', first))
  end
  if not old_last or last > old_last then
    redis.call('HSET', key, 'last', string.format('%.6f', last))
  end
end

for _, g in pairs(groups) do
  for i, key in ipairs(g.keys) do
    for field, v in pairs(g.ints) do redis.call('HINCRBY', key, field, v) end
    for field, v in pairs(g.floats) do
      redis.call('HINCRBYFLOAT', key, field, string.format('%.17g', v))
    end
    if i % 2 == 1 then
      redis.call('EXPIRE', key, WTTL)
    elseif g.new then
      write_span(key, g.first, g.last)
    end
  end
  if g.new then
    for _, z in ipairs(g.zkeys) do
      redis.call('ZADD', z, g.w, g.w)
      redis.call('ZREMRANGEBYSCORE', z, '-inf', '(' .. string.format('%d', tonumber(g.w) - WTTL))
    end
    add_member(P .. ':models', g.model)
    add_member(P .. ':versions:' .. g.model, g.version)
    if g.exp ~= '' then
      add_member(P .. ':experiments', g.exp)
      redis.call('HSET', P .. ':variants:' .. g.exp, g.variant .. ':' .. g.shadow,
                 g.model .. SEP .. g.version)
    end
  end
end
for key in pairs(samples) do redis.call('EXPIRE', key, STTL) end
for key, members in pairs(sets) do
  for m in pairs(members) do redis.call('SADD', key, m) end
end
return {new_p, dup_p, new_l, dup_l, joins, new_f, dup_f}
"""
