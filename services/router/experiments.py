"""A/B experiments: domain types, validation, the Redis store, the live cache and admin operations.

Layers, from pure to wired:

- `Experiment` and friends (frozen dataclasses, JSON round trip) and the pure rules: `validate`
  (one experiment on its own), `check_unique` (against the others), `check_transition`,
  `apply_update` and `apply_stop` (the new state of an experiment after an admin change).
- `ExperimentStore`: every experiment as JSON in one Redis hash, plus a version counter that each
  change INCRs. Writes are optimistic transactions (WATCH, re-check the rules against the freshly
  read set, MULTI/EXEC, retry on WatchError), so several routers can administer at once.
- `ExperimentCache`: each router's in-memory copy, reloaded when the version changes (polled) and
  kept as is while Redis is unreachable. The hot path reads only this.
- `Experiments`: the admin operations behind the RPCs, with the registry and the workers injected
  as async callables so that this module knows neither MLflow nor gRPC.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import json
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from loopline import paging
from loopline.errors import (
    AlreadyExists,
    FailedPrecondition,
    InternalError,
    InvalidInput,
    NotFound,
    NotReady,
)
from loopline.logging import get_logger
from services.router import assignment
from services.router.assignment import Allocation
from services.router.domain import CHAMPION, ModelRef

__all__ = [
    "EnsureServed",
    "Experiment",
    "ExperimentCache",
    "ExperimentStore",
    "ExperimentUpdate",
    "Experiments",
    "Page",
    "Promote",
    "Resolve",
    "Shadow",
    "Status",
    "Stickiness",
    "Variant",
    "apply_stop",
    "apply_update",
    "check_transition",
    "check_unique",
    "validate",
]

log = get_logger(__name__)

WEIGHT_TOTAL = 100.0
WEIGHT_TOLERANCE = 1e-6
_JSON_VERSION = 1


class Status(enum.StrEnum):
    """Lifecycle of an experiment."""

    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class Stickiness(enum.StrEnum):
    """What keeps a caller on one variant: their user id's hash, or nothing (per request)."""

    USER = "user"
    REQUEST = "request"


# The ones that hold a model's traffic: at most one per model.
ACTIVE = frozenset({Status.RUNNING, Status.PAUSED})
# Status changes `update` may make; stopping goes through `stop`, which can promote a winner.
TRANSITIONS = frozenset(
    {
        (Status.DRAFT, Status.RUNNING),
        (Status.RUNNING, Status.PAUSED),
        (Status.PAUSED, Status.RUNNING),
    }
)


@dataclass(frozen=True)
class Variant:
    """An arm that answers live traffic; `weight` is its percentage of the experiment's traffic."""

    name: str
    model: ModelRef
    weight: float


@dataclass(frozen=True)
class Shadow:
    """A model that gets a mirrored copy of a fraction of the traffic; never answers callers."""

    name: str
    model: ModelRef
    sample_rate: float = 1.0


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """An A/B experiment on the public model name `model`.

    Times are unix seconds (None when unset). `allocation` maps buckets to variants; it is set
    when the experiment is stored and changed only through `assignment.reallocate`, so users
    move only when a weight change must move them. The first variant is the baseline.
    It is what `assignment.assign` and `assignment.shadows_for` take.
    """

    id: str = ""
    name: str
    model: str
    description: str = ""
    variants: Sequence[Variant]
    shadows: Sequence[Shadow] = ()
    status: Status = Status.DRAFT
    sticky_by: Stickiness = Stickiness.USER
    salt: str = ""
    pinned_users: Mapping[str, str] = field(default_factory=dict)
    start_time: float | None = None
    end_time: float | None = None
    create_time: float | None = None
    update_time: float | None = None
    winner: str = ""
    allocation: Allocation | None = None

    def __post_init__(self) -> None:
        # Callers may pass lists and dicts; keep immutable copies so no one edits a shared one.
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "shadows", tuple(self.shadows))
        object.__setattr__(self, "pinned_users", dict(self.pinned_users))

    @property
    def paused(self) -> bool:
        """True while PAUSED: everyone but pinned users goes to the baseline."""
        return self.status is Status.PAUSED

    @property
    def per_user(self) -> bool:
        """True when a user id keeps its caller on one variant (see `assignment.assign`)."""
        return self.sticky_by is Stickiness.USER

    @property
    def weights(self) -> list[tuple[str, float]]:
        """(variant name, weight) in variant order."""
        return [(v.name, v.weight) for v in self.variants]

    def variant(self, name: str) -> Variant:
        """The served variant called `name`; `InvalidInput` naming the choices otherwise."""
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(repr(v.name) for v in self.variants)
        raise InvalidInput(
            f"experiment {self.id or self.name!r} has no variant {name!r}; its variants: {known}",
            field="variant",
            variant=name,
        )

    def effective_status(self, now: float) -> Status:
        """The status, with a RUNNING or PAUSED experiment past its end_time read as STOPPED."""
        if self.status in ACTIVE and self.end_time is not None and now >= self.end_time:
            return Status.STOPPED
        return self.status

    def as_of(self, now: float) -> Experiment:
        """This experiment as a reader should see it at `now` (see `effective_status`)."""
        status = self.effective_status(now)
        return self if status is self.status else replace(self, status=status)

    def takes_traffic(self, now: float) -> bool:
        """RUNNING or PAUSED, with start_time <= now < end_time."""
        started = self.start_time is None or self.start_time <= now
        return started and self.effective_status(now) in ACTIVE

    def to_json(self) -> str:
        """Compact JSON, as stored in Redis."""
        return json.dumps(_to_dict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Experiment:
        """The inverse of `to_json`; `InvalidInput` for malformed data."""
        try:
            return _from_dict(json.loads(text))
        except InvalidInput:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidInput(f"malformed experiment JSON ({err!r})", field="experiment") from err


def _ref_dict(ref: ModelRef) -> dict[str, str]:
    return {"name": ref.name, "version": ref.version, "alias": ref.alias}


def _ref(data: Mapping[str, Any]) -> ModelRef:
    return ModelRef(str(data["name"]), str(data.get("version", "")), str(data.get("alias", "")))


def _to_dict(exp: Experiment) -> dict[str, Any]:
    return {
        "v": _JSON_VERSION,
        "id": exp.id,
        "name": exp.name,
        "model": exp.model,
        "description": exp.description,
        "variants": [
            {"name": v.name, "model": _ref_dict(v.model), "weight": v.weight} for v in exp.variants
        ],
        "shadows": [
            {"name": s.name, "model": _ref_dict(s.model), "sample_rate": s.sample_rate}
            for s in exp.shadows
        ],
        "status": exp.status.value,
        "sticky_by": exp.sticky_by.value,
        "salt": exp.salt,
        "pinned_users": dict(exp.pinned_users),
        "start_time": exp.start_time,
        "end_time": exp.end_time,
        "create_time": exp.create_time,
        "update_time": exp.update_time,
        "winner": exp.winner,
        "allocation": exp.allocation.to_json() if exp.allocation else None,
    }


def _from_dict(data: Mapping[str, Any]) -> Experiment:
    allocation = data.get("allocation")
    return Experiment(
        id=str(data["id"]),
        name=str(data["name"]),
        model=str(data["model"]),
        description=str(data.get("description", "")),
        variants=[
            Variant(str(v["name"]), _ref(v["model"]), float(v["weight"])) for v in data["variants"]
        ],
        shadows=[
            Shadow(str(s["name"]), _ref(s["model"]), float(s["sample_rate"]))
            for s in data.get("shadows", ())
        ],
        status=Status(data["status"]),
        sticky_by=Stickiness(data.get("sticky_by", Stickiness.USER)),
        salt=str(data.get("salt", "")),
        pinned_users={str(k): str(v) for k, v in data.get("pinned_users", {}).items()},
        start_time=_time(data.get("start_time")),
        end_time=_time(data.get("end_time")),
        create_time=_time(data.get("create_time")),
        update_time=_time(data.get("update_time")),
        winner=str(data.get("winner", "")),
        allocation=Allocation.from_json(allocation) if allocation is not None else None,
    )


def _time(value: Any) -> float | None:
    return None if value is None else float(value)


# --- validation (pure) -----------------------------------------------------------------------


def validate(exp: Experiment) -> None:
    """Raise `InvalidInput` naming the field for anything wrong with `exp` on its own."""
    _require(exp.name.strip(), "name", "experiment name is empty; give it a unique name")
    _require(exp.model.strip(), "model", "experiment model is empty; name the public model")
    if not exp.variants:
        raise InvalidInput(
            f"experiment {exp.name!r} has no variants; add one (the first is the baseline)",
            field="variants",
        )
    _check_names(exp)
    _check_variants(exp.variants)
    _check_shadows(exp.shadows)
    _check_pins(exp)
    _check_times(exp.start_time, exp.end_time)
    _check_allocation(exp)


def _require(value: str, field_name: str, message: str) -> None:
    if not value:
        raise InvalidInput(message, field=field_name)


def _check_names(exp: Experiment) -> None:
    # Variants and shadows share one namespace: records and reports name either by name alone.
    seen: set[str] = set()
    for kind, arm in [("variants", v) for v in exp.variants] + [
        ("shadows", s) for s in exp.shadows
    ]:
        _require(arm.name.strip(), f"{kind}.name", f"a {kind[:-1]} has an empty name; name it")
        if arm.name in seen:
            raise InvalidInput(
                f"name {arm.name!r} is used twice; variant and shadow names must be unique "
                "within an experiment",
                field=f"{kind}.name",
                name=arm.name,
            )
        seen.add(arm.name)
        _require(
            arm.model.name.strip(),
            f"{kind}.model.name",
            f"{kind[:-1]} {arm.name!r} names no model; set its model name",
        )


def _check_variants(variants: Sequence[Variant]) -> None:
    for v in variants:
        if not (math.isfinite(v.weight) and v.weight >= 0):
            raise InvalidInput(
                f"variant {v.name!r}: weight {v.weight} must be a number >= 0",
                field="variants.weight",
                variant=v.name,
            )
    total = math.fsum(v.weight for v in variants)
    if abs(total - WEIGHT_TOTAL) > WEIGHT_TOLERANCE:
        listed = ", ".join(f"{v.name}={v.weight:g}" for v in variants)
        raise InvalidInput(
            f"served variant weights sum to {total:g}, not 100 ({listed}); they are percentages",
            field="variants.weight",
            total=total,
        )


def _check_shadows(shadows: Sequence[Shadow]) -> None:
    for s in shadows:
        if not (math.isfinite(s.sample_rate) and 0 <= s.sample_rate <= 1):
            raise InvalidInput(
                f"shadow {s.name!r}: sample_rate {s.sample_rate} must be in [0, 1] (0 means 1)",
                field="shadows.sample_rate",
                shadow=s.name,
            )


def _check_pins(exp: Experiment) -> None:
    served = {v.name for v in exp.variants}
    for user, name in exp.pinned_users.items():
        _require(user, "pinned_users", "a pinned user has an empty user id")
        if name not in served:
            raise InvalidInput(
                f"user {user!r} is pinned to {name!r}, which is not a served variant "
                f"(variants: {', '.join(sorted(served))})",
                field="pinned_users",
                user_id=user,
                variant=name,
            )


def _check_times(start: float | None, end: float | None) -> None:
    for name, value in (("start_time", start), ("end_time", end)):
        if value is not None and not math.isfinite(value):
            raise InvalidInput(f"{name} {value} is not a time", field=name)
    if start is not None and end is not None and end < start:
        raise InvalidInput(
            f"end_time ({_iso(end)}) is before start_time ({_iso(start)})",
            field="end_time",
        )


def _check_allocation(exp: Experiment) -> None:
    if exp.allocation is not None and list(exp.allocation.names) != [v.name for v in exp.variants]:
        raise InvalidInput(
            f"experiment {exp.id!r}: allocation covers {list(exp.allocation.names)}, "
            f"variants are {[v.name for v in exp.variants]}",
            field="allocation",
        )


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def check_unique(exp: Experiment, others: Iterable[Experiment], now: float) -> None:
    """Raise when `exp` clashes with another experiment (same id is the same experiment).

    `AlreadyExists` for a name held by an experiment that is not stopped; `FailedPrecondition`
    for a second RUNNING or PAUSED experiment on one model, naming the one that holds it.
    """
    mine = exp.effective_status(now)
    for other in others:
        theirs = other.effective_status(now)
        if other.id == exp.id or theirs is Status.STOPPED or mine is Status.STOPPED:
            continue
        if other.name == exp.name:
            raise AlreadyExists(
                "experiment",
                exp.name,
                f"{other.id} ({theirs}) uses that name; pick another or stop {other.id}",
            )
        if mine in ACTIVE and theirs in ACTIVE and other.model == exp.model:
            raise FailedPrecondition(
                f"model {exp.model!r} already has experiment {other.id} ({other.name!r}, "
                f"{theirs}); stop it before starting another",
                model=exp.model,
                experiment_id=other.id,
            )


def check_transition(exp: Experiment, target: Status, now: float) -> None:
    """Raise `FailedPrecondition` unless `update` may move `exp` to `target`."""
    current = exp.effective_status(now)
    if current is Status.STOPPED:
        raise FailedPrecondition(
            f"experiment {exp.id} is stopped for good; create a new one", experiment_id=exp.id
        )
    if target is Status.STOPPED:
        raise FailedPrecondition(
            f"use StopExperiment to stop {exp.id} (it can promote a winner)", experiment_id=exp.id
        )
    if target is not current and (current, target) not in TRANSITIONS:
        raise FailedPrecondition(
            f"experiment {exp.id} cannot go from {current} to {target}; allowed: "
            "draft -> running, running <-> paused",
            experiment_id=exp.id,
            status=str(current),
        )


@dataclass(frozen=True)
class ExperimentUpdate:
    """The fields an admin update changes; None leaves a field as it is."""

    weights: Mapping[str, float] | None = None
    status: Status | None = None
    end_time: float | None = None
    description: str | None = None

    def starts(self, exp: Experiment) -> bool:
        """True when this update makes `exp` RUNNING (its models must be served first)."""
        return self.status is Status.RUNNING and exp.status is not Status.RUNNING


def apply_update(exp: Experiment, change: ExperimentUpdate, now: float) -> Experiment:
    """`exp` after `change` (pure); raises what the RPC answers for a change not allowed."""
    check_transition(exp, change.status or exp.status, now)
    updated = exp
    if change.weights is not None:
        updated = _reweighted(updated, change.weights)
    if change.status is not None and change.status is not exp.status:
        start = exp.start_time
        if change.status is Status.RUNNING and start is None:
            start = now
        updated = replace(updated, status=change.status, start_time=start)
    if change.end_time is not None:
        updated = replace(updated, end_time=change.end_time)
    if change.description is not None:
        updated = replace(updated, description=change.description)
    validate(updated)
    return replace(updated, update_time=now)


def _reweighted(exp: Experiment, weights: Mapping[str, float]) -> Experiment:
    for name in weights:
        exp.variant(name)  # unknown names are InvalidInput, naming the known ones
    variants = [replace(v, weight=float(weights.get(v.name, v.weight))) for v in exp.variants]
    _check_variants(variants)
    moved = replace(exp, variants=variants)
    previous = exp.allocation or assignment.initial_allocation(exp.weights)
    return replace(moved, allocation=assignment.reallocate(previous, moved.weights))


def apply_stop(exp: Experiment, winner: str, now: float) -> Experiment:
    """`exp` stopped at `now` with `winner` recorded (pure). An experiment that ran past its
    end_time can still be stopped, to record a winner; one stopped by `stop` cannot."""
    if exp.status is Status.STOPPED:
        raise FailedPrecondition(f"experiment {exp.id} is already stopped", experiment_id=exp.id)
    if winner:
        exp.variant(winner)
    end = now if exp.end_time is None else min(exp.end_time, now)
    if exp.start_time is not None:
        end = max(end, exp.start_time)  # stopped before its scheduled start: an empty window
    return replace(exp, status=Status.STOPPED, winner=winner, end_time=end, update_time=now)


# --- paging (pure) ---------------------------------------------------------------------------


class Page(NamedTuple):
    """One page of a list, newest first; `next_page_token` is empty on the last page.

    Unpacks as `experiments, token = await service.list(...)`.
    """

    experiments: list[Experiment]
    next_page_token: str = ""


def _order_key(exp: Experiment) -> tuple[float, str]:
    return (exp.create_time or 0.0, exp.id)


def paginate(experiments: Iterable[Experiment], page_size: int, page_token: str) -> Page:
    """Newest first; the token is the sort key of the last item given, so pages stay stable
    while experiments are created (new ones sort before the token)."""
    size = paging.page_size(page_size)
    ordered = sorted(experiments, key=_order_key, reverse=True)
    if page_token:
        after = _decode_token(page_token)
        ordered = [e for e in ordered if _order_key(e) < after]
    page = ordered[:size]
    more = len(ordered) > size
    return Page(page, _encode_token(_order_key(page[-1])) if more else "")


def _encode_token(key: tuple[float, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def _decode_token(token: str) -> tuple[float, str]:
    try:
        created, exp_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(created), str(exp_id)
    except (binascii.Error, ValueError, TypeError) as err:
        raise InvalidInput(
            "page_token is not one this server gave out; pass next_page_token unchanged",
            field="page_token",
        ) from err


# --- Redis store -----------------------------------------------------------------------------


class ExperimentStore:
    """Every experiment as JSON in one Redis hash, with a version counter.

    Keys: `{prefix}:all` (hash id -> JSON), `{prefix}:version` (INCR on every change; what caches
    poll) and the channel `{prefix}:changes` (the changed id is PUBLISHed, for anyone who would
    rather listen than poll). Writes re-check `check_unique` against the set read under WATCH, so
    two routers cannot both start an experiment on one model or both take one name.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = "loopline:experiments",
        *,
        now: Callable[[], float] = time.time,
        max_attempts: int = 50,
    ) -> None:
        self.client = client
        self.hash_key = f"{prefix}:all"
        self.version_key = f"{prefix}:version"
        self.channel = f"{prefix}:changes"
        self._now = now
        self._max_attempts = max_attempts

    async def version(self) -> int:
        """The change counter (0 before the first change)."""
        raw: Any = await self.client.get(self.version_key)
        return int(raw or 0)

    async def snapshot(self) -> tuple[int, list[Experiment]]:
        """The version and every experiment, read together (one MULTI/EXEC)."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.get(self.version_key)
            pipe.hgetall(self.hash_key)
            raw_version, raw_all = await pipe.execute()
        return int(raw_version or 0), list(_decode_all(raw_all).values())

    async def get(self, experiment_id: str) -> Experiment:
        """The stored experiment; `NotFound` for an unknown id."""
        raw: Any = await self.client.hget(self.hash_key, experiment_id)
        if raw is None:
            raise NotFound("experiment", experiment_id, "list experiments to see the ids")
        return Experiment.from_json(raw)

    async def list(
        self,
        model: str | None = None,
        status: Status | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page:
        """A page of experiments, newest first, filtered by model and by status as of now."""
        now = self._now()
        _, everything = await self.snapshot()
        chosen = [
            e.as_of(now)
            for e in everything
            if (not model or e.model == model)
            and (status is None or e.effective_status(now) is status)
        ]
        return paginate(chosen, page_size, page_token)

    async def create(self, exp: Experiment) -> Experiment:
        """Store a new experiment; `AlreadyExists("experiment id", ...)` if its id is taken."""

        def insert(current: Mapping[str, Experiment]) -> Experiment:
            if exp.id in current:
                raise AlreadyExists("experiment id", exp.id)
            return exp

        return await self._transact(insert)

    async def update(
        self, experiment_id: str, change: Callable[[Experiment], Experiment]
    ) -> Experiment:
        """Replace an experiment with `change(fresh copy)`, atomically; `change` must be pure
        (it may run several times) and may raise to refuse."""

        def rewrite(current: Mapping[str, Experiment]) -> Experiment:
            if experiment_id not in current:
                raise NotFound("experiment", experiment_id, "list experiments to see the ids")
            return change(current[experiment_id])

        return await self._transact(rewrite)

    async def _transact(
        self, write: Callable[[Mapping[str, Experiment]], Experiment]
    ) -> Experiment:
        for _ in range(self._max_attempts):
            try:
                return await self._try_write(write)
            except WatchError:
                # Another router changed the set between our read and EXEC: read it again.
                await asyncio.sleep(random.uniform(0, 0.01))
        raise NotReady(
            f"experiments changed concurrently {self._max_attempts} times in a row; retry",
            attempts=self._max_attempts,
        )

    async def _try_write(
        self, write: Callable[[Mapping[str, Experiment]], Experiment]
    ) -> Experiment:
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(self.version_key, self.hash_key)
            raw: Any = await pipe.hgetall(self.hash_key)
            current = _decode_all(raw)
            written = write(current)
            validate(written)
            check_unique(written, current.values(), self._now())
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            pipe.hset(self.hash_key, written.id, written.to_json())
            pipe.incr(self.version_key)
            pipe.publish(self.channel, written.id)
            await pipe.execute()
        return written


def _decode_all(raw: Mapping[bytes | str, bytes | str]) -> dict[str, Experiment]:
    decoded: dict[str, Experiment] = {}
    for key, value in raw.items():
        exp_id = key.decode() if isinstance(key, bytes) else key
        try:
            decoded[exp_id] = Experiment.from_json(value)
        except InvalidInput as err:
            # One bad entry (written by hand, or by a newer version) must not hide the rest.
            log.error("skipping unreadable experiment %s: %s", exp_id, err.message)
    return decoded


# --- live cache ------------------------------------------------------------------------------


class ExperimentCache:
    """A router's live copy of the experiments, for the hot path.

    A task polls the store's version key every `poll_interval` seconds and reloads everything
    when it changes, so a change reaches every router within about one interval. While Redis is
    unreachable it keeps serving the last good copy (logging once), and reloads in full as soon as
    Redis answers again: a restarted Redis may have restarted the counter too.
    """

    def __init__(self, store: ExperimentStore, poll_interval: float = 0.25) -> None:
        self._store = store
        self._interval = poll_interval
        # A hung Redis must not stall the poll loop forever; the copy stays as it is meanwhile.
        self._timeout = max(1.0, 4 * poll_interval)
        self._version: int | None = None
        self._by_id: dict[str, Experiment] = {}
        self._active: dict[str, list[Experiment]] = {}
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def version(self) -> int | None:
        """The store version of the copy held; None before the first load."""
        return self._version

    @property
    def healthy(self) -> bool:
        """False while Redis is unreachable (the copy may be stale)."""
        return not self._failing

    @property
    def experiments(self) -> list[Experiment]:
        """Every experiment in the copy."""
        return list(self._by_id.values())

    def get(self, experiment_id: str) -> Experiment | None:
        """The experiment `experiment_id` in the copy, if there."""
        return self._by_id.get(experiment_id)

    def running_for(self, model: str, now: float) -> Experiment | None:
        """The RUNNING or PAUSED experiment taking `model`'s traffic at `now`, if any."""
        for exp in self._active.get(model, ()):
            if exp.takes_traffic(now):
                return exp
        return None

    async def refresh(self) -> None:
        """Load everything now; `NotReady` when Redis does not answer (the copy is kept)."""
        try:
            version, experiments = await asyncio.wait_for(self._store.snapshot(), self._timeout)
        except (RedisError, OSError, TimeoutError) as err:
            raise NotReady(
                f"cannot read experiments from Redis ({err!r}); is LOOPLINE_REDIS_URL right?"
            ) from err
        self._install(version, experiments)

    def _install(self, version: int, experiments: list[Experiment]) -> None:
        active: dict[str, list[Experiment]] = {}
        for exp in sorted(experiments, key=_order_key, reverse=True):
            if exp.status in ACTIVE:
                active.setdefault(exp.model, []).append(exp)
        # Swap whole dicts so a reader never sees a half-built copy.
        self._by_id = {exp.id: exp for exp in experiments}
        self._active = active
        self._version = version

    async def poll_once(self) -> bool:
        """Reload if the version moved (or after an outage); False when Redis did not answer."""
        try:
            if self._failing or self._version is None:
                await self.refresh()
            else:
                version = await asyncio.wait_for(self._store.version(), self._timeout)
                if version != self._version:
                    await self.refresh()
        except (NotReady, RedisError, OSError, TimeoutError) as err:
            self._note_failure(err)
            return False
        self._note_recovery()
        return True

    def _note_failure(self, err: BaseException) -> None:
        if not self._failing:
            log.warning(
                "experiments: Redis unreachable (%r); serving the last good copy (%d experiments)",
                err,
                len(self._by_id),
            )
        self._failing = True

    def _note_recovery(self) -> None:
        if self._failing:
            log.info("experiments: Redis answers again; %d experiments loaded", len(self._by_id))
        self._failing = False

    def start(self) -> None:
        """Start polling in the background (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="experiment-cache")

    async def stop(self) -> None:
        """Stop polling and wait for the task to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self._interval)


# --- admin operations ------------------------------------------------------------------------

Resolve = Callable[[ModelRef], Awaitable[ModelRef]]
EnsureServed = Callable[[ModelRef], Awaitable[None]]
Promote = Callable[[ModelRef, str, str], Awaitable[ModelRef]]

_ID_ATTEMPTS = 8


class Experiments:
    """The experiment admin operations behind the Router RPCs.

    `resolve` turns a reference into a concrete version (`NotFound` when the registry has no
    such model, version or alias); `ensure_served` makes sure some worker serves a reference
    (`FailedPrecondition` when none can) and is awaited for every variant and shadow before an
    experiment becomes RUNNING; `promote(ref, alias, reason)` points `alias` at `ref` and returns
    the concrete promoted reference. Slow calls happen before the store's transaction, never
    inside it, so a long model load does not make concurrent writers retry.
    """

    def __init__(
        self,
        store: ExperimentStore,
        *,
        resolve: Resolve,
        ensure_served: EnsureServed,
        promote: Promote,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._resolve = resolve
        self._ensure_served = ensure_served
        self._promote = promote
        self._now = now

    async def create(self, draft: Experiment) -> Experiment:
        """Validate, resolve and store a new DRAFT or RUNNING experiment.

        Output-only fields of `draft` (id, times but start/end, winner, allocation) are ignored.
        Variant and shadow references are stored resolved to concrete versions: an alias that
        moves mid-experiment must not change what is being compared.
        """
        if draft.status not in (Status.DRAFT, Status.RUNNING):
            raise InvalidInput(
                f"a new experiment is draft or running, not {draft.status}", field="status"
            )
        validate(draft)
        now = self._now()
        # Cheap early answer for the common clash; the transaction checks again for real.
        check_unique(draft, (await self._store.snapshot())[1], now)
        resolved = await self._resolved(draft)
        if resolved.status is Status.RUNNING:
            await self._ensure_all(resolved)
        for _ in range(_ID_ATTEMPTS):
            try:
                created = await self._store.create(_stamped(resolved, _new_id(now), now))
            except AlreadyExists as err:
                if err.resource != "experiment id":
                    raise
                continue  # two ids drawn alike on one day: draw again
            log.info("experiment created", extra=_log_fields(created))
            return created
        raise InternalError(f"could not draw a free experiment id in {_ID_ATTEMPTS} attempts")

    async def get(self, experiment_id: str) -> Experiment:
        """The experiment as of now; `NotFound` for an unknown id."""
        return (await self._store.get(experiment_id)).as_of(self._now())

    async def list(
        self,
        model: str | None = None,
        status: Status | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page:
        """A page of experiments, newest first (page_size 0: 50; at most 1000)."""
        return await self._store.list(model, status, page_size, page_token)

    async def update(
        self,
        experiment_id: str,
        *,
        weights: Mapping[str, float] | None = None,
        status: Status | None = None,
        end_time: float | None = None,
        description: str | None = None,
    ) -> Experiment:
        """Change weights (users move minimally), status, end time or description."""
        change = ExperimentUpdate(weights, status, end_time, description)
        if change == ExperimentUpdate():
            return await self.get(experiment_id)
        current = await self._store.get(experiment_id)
        apply_update(current, change, self._now())  # refuse early, before any slow call
        if change.starts(current):
            await self._ensure_all(current)
        updated = await self._store.update(
            experiment_id, lambda fresh: apply_update(fresh, change, self._now())
        )
        log.info("experiment updated", extra=_log_fields(updated))
        return updated

    async def stop(
        self, experiment_id: str, winner: str = "", alias: str = CHAMPION, reason: str = ""
    ) -> tuple[Experiment, ModelRef | None]:
        """Stop for good; with a `winner`, first point `alias` at its model version.

        Promotion comes first so that a failed promotion leaves the experiment running; a retry
        after a failure between the two steps promotes the same version again (harmless).
        """
        current = await self._store.get(experiment_id)
        apply_stop(current, winner, self._now())
        promoted = None
        if winner:
            promoted = await self._promote(current.variant(winner).model, alias or CHAMPION, reason)
        stopped = await self._store.update(
            experiment_id, lambda fresh: apply_stop(fresh, winner, self._now())
        )
        fields = _log_fields(stopped) | {"promoted": str(promoted or ""), "reason": reason}
        log.info("experiment stopped", extra=fields)
        return stopped, promoted

    async def _resolved(self, exp: Experiment) -> Experiment:
        variant_refs = await asyncio.gather(*(self._resolve(v.model) for v in exp.variants))
        shadow_refs = await asyncio.gather(*(self._resolve(s.model) for s in exp.shadows))
        return replace(
            exp,
            variants=[replace(v, model=r) for v, r in zip(exp.variants, variant_refs, strict=True)],
            shadows=[replace(s, model=r) for s, r in zip(exp.shadows, shadow_refs, strict=True)],
        )

    async def _ensure_all(self, exp: Experiment) -> None:
        refs = {v.model for v in exp.variants} | {s.model for s in exp.shadows}
        await asyncio.gather(*(self._ensure_served(ref) for ref in refs))


def _new_id(now: float) -> str:
    return f"exp-{datetime.fromtimestamp(now, UTC):%Y%m%d}-{secrets.token_hex(2)}"


def _stamped(exp: Experiment, exp_id: str, now: float) -> Experiment:
    start = exp.start_time
    if exp.status is Status.RUNNING and start is None:
        start = now
    return replace(
        exp,
        id=exp_id,
        salt=exp.salt or exp_id,
        start_time=start,
        create_time=now,
        update_time=now,
        winner="",
        allocation=assignment.initial_allocation(exp.weights),
    )


def _log_fields(exp: Experiment) -> dict[str, Any]:
    return {
        "experiment_id": exp.id,
        "experiment": exp.name,
        "model": exp.model,
        "status": str(exp.status),
        "weights": dict(exp.weights),
    }
