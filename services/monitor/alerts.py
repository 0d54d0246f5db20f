"""Alerts: rules over each check's figures, a state per condition (firing, resolved), and a
history in Redis that ListAlerts pages through and WatchAlerts follows.

Redis layout (prefix `loopline:monitor`):
- `<prefix>:alerts`: a stream, one entry per alert raised or resolved; the entry id is the
  alert id (ids increase with time, so `after_id` resumes a watch), fields hold the alert as JSON;
- `<prefix>:firing`: a hash, condition key (`rule|model|version|detail`) -> the id of the entry
  that raised it, so a condition fires once and resolves once, across restarts and monitors.

Rules (settings in services/monitor/settings.py):
- `drift`: the drift check said drifted in `drift_consecutive` checks in a row;
- `accuracy_floor`: live accuracy below the floor with at least `accuracy_min_labels` labels;
- `latency_slo`: p99 latency above the SLO;
- `srm`: an experiment's variant shares are this unlikely under its weights (sample-ratio
  mismatch: assignment or logging is broken, and the report cannot be trusted).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis

from loopline.logging import get_logger

__all__ = ["Alert", "AlertBook", "Condition", "RuleInputs", "Rules", "evaluate"]

log = get_logger(__name__)

FIRING, RESOLVED = "firing", "resolved"


@dataclass(frozen=True)
class Alert:
    """One alert as stored and served."""

    id: str
    kind: str  # drift | accuracy_drop | latency | experiment | retraining
    severity: str  # info | warning | critical
    rule: str
    model: str
    version: str
    message: str
    time: float
    state: str = FIRING
    resolve_time: float | None = None
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Condition:
    """A rule's verdict on one model version (or experiment) at one check."""

    rule: str
    kind: str
    severity: str
    model: str
    version: str
    holds: bool
    message: str
    detail: str = ""  # e.g. the experiment id: several conditions per rule and model
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return "|".join((self.rule, self.model, self.version, self.detail))


@dataclass(frozen=True)
class Rules:
    """Thresholds; 0 turns a rule off."""

    drift_consecutive: int = 2
    accuracy_floor: float = 0.0
    accuracy_min_labels: int = 100
    latency_p99_ms: float = 0.0
    srm_p_value: float = 0.001


@dataclass(frozen=True)
class RuleInputs:
    """What one check measured for one model version."""

    model: str
    version: str
    drifted_in_a_row: int = 0
    drift_summary: str = ""
    labelled: int = 0
    accuracy: float | None = None
    latency_p99_ms: float | None = None
    srm: Mapping[str, float] = field(default_factory=dict)  # experiment id -> SRM p-value


def evaluate(rules: Rules, inputs: RuleInputs) -> list[Condition]:
    """Every rule's verdict (pure): holds or not, with a message for a person."""
    name, version = inputs.model, inputs.version
    out = [
        Condition(
            "drift",
            "drift",
            "warning",
            name,
            version,
            inputs.drifted_in_a_row >= rules.drift_consecutive,
            f"{name}/{version}: live traffic drifted from the reference in "
            f"{inputs.drifted_in_a_row} checks in a row: {inputs.drift_summary}",
            fields={"checks": str(inputs.drifted_in_a_row)},
        )
    ]
    if rules.accuracy_floor > 0:
        judged = inputs.accuracy is not None and inputs.labelled >= rules.accuracy_min_labels
        below = judged and (inputs.accuracy or 0.0) < rules.accuracy_floor
        out.append(
            Condition(
                "accuracy_floor",
                "accuracy_drop",
                "critical",
                name,
                version,
                below,
                f"{name}/{version}: live accuracy {inputs.accuracy or 0:.3f} < floor "
                f"{rules.accuracy_floor:.3f} over {inputs.labelled} labelled requests",
                fields={"labelled": str(inputs.labelled), "accuracy": f"{inputs.accuracy or 0}"},
            )
        )
    if rules.latency_p99_ms > 0 and inputs.latency_p99_ms is not None:
        out.append(
            Condition(
                "latency_slo",
                "latency",
                "warning",
                name,
                version,
                inputs.latency_p99_ms > rules.latency_p99_ms,
                f"{name}/{version}: p99 latency {inputs.latency_p99_ms:.1f} ms > SLO "
                f"{rules.latency_p99_ms:.1f} ms",
            )
        )
    out += [
        srm_condition(rules, name, version, experiment, p_value)
        for experiment, p_value in inputs.srm.items()
    ]
    return out


def srm_condition(
    rules: Rules, model: str, version: str, experiment: str, p_value: float
) -> Condition:
    """The sample-ratio rule for one experiment: its variant shares are this unlikely under its
    weights (the checker passes version "" : the experiment spans versions)."""
    return Condition(
        "srm",
        "experiment",
        "critical",
        model,
        version,
        p_value < rules.srm_p_value,
        f"experiment {experiment}: variant shares do not match the weights "
        f"(sample-ratio mismatch, p={p_value:.2g}); check assignment and logging",
        detail=experiment,
        fields={"experiment_id": experiment, "p_value": f"{p_value:.3g}"},
    )


class AlertBook:
    """The alert history and the firing conditions, in Redis; see the module docstring."""

    def __init__(
        self, client: aioredis.Redis, prefix: str = "loopline:monitor", maxlen: int = 100_000
    ) -> None:
        self._client = client
        self._stream = f"{prefix}:alerts"
        self._firing = f"{prefix}:firing"
        self._maxlen = maxlen

    async def apply(self, conditions: list[Condition], now: float | None = None) -> list[Alert]:
        """Raise what newly holds, resolve what stopped holding; returns the alerts written."""
        now = time.time() if now is None else now
        firing = {_text(k): _text(v) for k, v in (await self._client.hgetall(self._firing)).items()}
        written = []
        for condition in conditions:
            raised = firing.get(condition.key)
            if condition.holds and raised is None:
                written.append(await self._raise(condition, now))
            elif not condition.holds and raised is not None:
                written.append(await self._resolve(condition, raised, now))
        return written

    async def record(self, alert: Alert) -> Alert:
        """Write a one-off alert (e.g. a retraining was triggered); returns it with its id."""
        entry = await self._client.xadd(
            self._stream, {"alert": _dumps(alert)}, maxlen=self._maxlen, approximate=True
        )
        stored = _with(alert, id=_text(entry))
        log.info("alert", extra={"alert_id": stored.id, "rule": alert.rule, "state": alert.state})
        return stored

    async def _raise(self, condition: Condition, now: float) -> Alert:
        alert = await self.record(_alert(condition, now))
        await self._client.hset(self._firing, condition.key, alert.id)
        return alert

    async def _resolve(self, condition: Condition, raised: str, now: float) -> Alert:
        original = await self.get(raised)
        started = original.time if original else now
        resolved = _with(_alert(condition, started), state=RESOLVED, resolve_time=now)
        await self._client.hdel(self._firing, condition.key)
        return await self.record(resolved)

    async def get(self, alert_id: str) -> Alert | None:
        entries = await self._client.xrange(self._stream, alert_id, alert_id)
        return _parse(entries[0]) if entries else None

    async def firing(self) -> list[Alert]:
        """The alerts whose condition still holds."""
        ids = [_text(v) for v in (await self._client.hgetall(self._firing)).values()]
        found = [await self.get(i) for i in ids]
        return [a for a in found if a is not None]

    async def history(
        self, start: float | None = None, end: float | None = None, count: int = 1000
    ) -> list[Alert]:
        """Alerts in [start, end), newest first."""
        if end is not None and end <= 0:
            return []  # stream ids start at the epoch: nothing came before it
        low = f"{int(start * 1000)}-0" if start is not None and start > 0 else "-"
        high = f"({int(end * 1000)}-0" if end is not None else "+"
        entries: Any = await self._client.xrevrange(self._stream, high, low, count=count)
        return [_parse(e) for e in entries or ()]

    async def follow(self, after_id: str = "$", block_ms: int = 5000) -> AsyncIterator[Alert]:
        """Alerts after `after_id` ("$": only new ones), as they are written."""
        last = after_id or "$"
        while True:
            reply: Any = await self._client.xread({self._stream: last}, block=block_ms, count=100)
            for _stream, entries in reply or ():
                for entry in entries:
                    last = _text(entry[0])
                    yield _parse(entry)


def _alert(condition: Condition, now: float) -> Alert:
    return Alert(
        id="",
        kind=condition.kind,
        severity=condition.severity,
        rule=condition.rule,
        model=condition.model,
        version=condition.version,
        message=condition.message,
        time=now,
        fields=dict(condition.fields),
    )


def _with(alert: Alert, **changes: Any) -> Alert:
    return Alert(**{**asdict(alert), **changes})


def _dumps(alert: Alert) -> str:
    data = asdict(alert)
    data.pop("id")
    return json.dumps(data, separators=(",", ":"))


def _parse(entry: Any) -> Alert:
    entry_id, fields = entry
    raw = fields.get(b"alert") or fields.get("alert")
    return Alert(id=_text(entry_id), **json.loads(_text(raw)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
