"""Retraining triggers: a firing drift or accuracy alert (or TriggerRetraining) submits a job to
the trainer, at most once per model within the cooldown, and never twice for one alert.

- The spec is the configured one (`LOOPLINE_MONITOR_RETRAIN_SPEC`, e.g. examples/retrain.yaml)
  with the model's name, `alias: challenger` (a person or the gate promotes it further), and its
  feedback sources narrowed to what arrived since the version was trained; or the caller's.
- The cooldown is a Redis key per model (`SET NX EX`), so several monitors agree; `force`
  bypasses it. The job's idempotency key is derived from the alert id, so a flapping alert or a
  retried call returns the job already submitted instead of starting a second one.
- Every trigger (submitted or not, and why) is kept in a Redis stream for the history.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from loopline.errors import FailedPrecondition
from loopline.jobspec import anchor_files, parse_spec
from loopline.logging import get_logger
from services.monitor.alerts import RESOLVED, Alert, AlertBook

__all__ = ["Retrainer", "Trigger", "derive_spec"]

log = get_logger(__name__)

# (spec dict, idempotency key) -> job id; the service passes a gRPC client, tests a fake.
Submit = Callable[[dict[str, Any], str], Awaitable[str]]


@dataclass(frozen=True)
class Trigger:
    """One retraining decision, as the history keeps it."""

    model: str
    reason: str
    alert_id: str
    submitted: bool
    job_id: str
    why_not: str
    time: float
    spec: dict[str, Any]


def derive_spec(base: dict[str, Any], model: str, since: float | None) -> dict[str, Any]:
    """The configured spec for `model`: challenger alias, feedback since `since`."""
    spec: dict[str, Any] = json.loads(json.dumps(base, default=str))  # a deep JSON copy
    spec["name"] = model
    spec["alias"] = "challenger"
    spec.setdefault("base_model", f"models:/{model}@champion")
    for source in spec.get("data", []):
        feedback = source.get("feedback") if isinstance(source, dict) else None
        if isinstance(feedback, dict) and since is not None:
            feedback["since"] = datetime.fromtimestamp(since, UTC).isoformat()
            feedback["model"] = feedback.get("model") or model
    return spec


class Retrainer:
    """Submits retraining jobs with a cooldown; see the module docstring."""

    def __init__(
        self,
        client: aioredis.Redis,
        submit: Submit | None,
        base_spec: dict[str, Any] | None,
        cooldown_seconds: float,
        prefix: str = "loopline:monitor",
        book: AlertBook | None = None,
    ) -> None:
        self._book = book
        self._client = client
        self._submit = submit
        self._base = base_spec
        self._cooldown = cooldown_seconds
        self._history = f"{prefix}:triggers"
        self._cooldown_prefix = f"{prefix}:cooldown:"

    @classmethod
    def load_spec(cls, path: Path | None) -> dict[str, Any] | None:
        if path is None:
            return None
        import yaml

        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise FailedPrecondition(f"retraining spec {path} is not a mapping of fields")
        parse_spec(derive_spec(data, str(data.get("name") or "model"), None))  # at start, not alert
        anchor_files(data, path.parent)
        return data

    async def trigger(
        self,
        model: str,
        reason: str,
        *,
        alert_id: str = "",
        since: float | None = None,
        spec: dict[str, Any] | None = None,
        dry_run: bool = False,
        force: bool = False,
    ) -> Trigger:
        """Submit (or explain why not) a retraining job for `model`."""
        chosen = spec if spec is not None else self._spec_for(model, since)
        if chosen is None:
            return await self._keep(
                model, reason, alert_id, "", "no retraining spec configured", {}
            )
        if dry_run:
            return await self._keep(model, reason, alert_id, "", "dry run", chosen)
        if self._submit is None:
            return await self._keep(model, reason, alert_id, "", "no trainer configured", chosen)
        if not force and not await self._claim(model):
            why = f"a retraining for {model} was triggered within the cooldown"
            return await self._keep(model, reason, alert_id, "", why, chosen)
        key = f"monitor-{model}-{alert_id}" if alert_id else f"monitor-{model}-{int(time.time())}"
        chosen.setdefault("tags", {}).update({"trigger": reason[:250], "alert_id": alert_id})
        try:
            job_id = await self._submit(chosen, key)
        except Exception as err:  # the trainer refused or is down: free the cooldown, say why
            await self._client.delete(self._cooldown_prefix + model)
            why = f"submitting failed: {getattr(err, 'message', None) or err!r}"[:500]
            log.warning("retraining not submitted", extra={"model": model, "why": why})
            return await self._keep(model, reason, alert_id, "", why, chosen)
        log.info("retraining submitted", extra={"model": model, "job_id": job_id})
        return await self._keep(model, reason, alert_id, job_id, "", chosen)

    def _spec_for(self, model: str, since: float | None) -> dict[str, Any] | None:
        return derive_spec(self._base, model, since) if self._base is not None else None

    async def _claim(self, model: str) -> bool:
        if self._cooldown <= 0:
            return True
        key = self._cooldown_prefix + model
        return bool(await self._client.set(key, "1", nx=True, ex=max(1, int(self._cooldown))))

    async def _keep(
        self,
        model: str,
        reason: str,
        alert_id: str,
        job_id: str,
        why_not: str,
        spec: dict[str, Any],
    ) -> Trigger:
        trigger = Trigger(model, reason, alert_id, bool(job_id), job_id, why_not, time.time(), spec)
        await self._client.xadd(
            self._history, {"trigger": json.dumps(asdict(trigger))}, maxlen=10_000, approximate=True
        )
        if self._book is not None and trigger.submitted:
            # The history people query: ListAlerts / WatchAlerts with kind RETRAINING.
            await self._book.record(_alert(trigger))
        return trigger

    async def history(self, count: int = 100) -> list[Trigger]:
        """Triggers, newest first."""
        entries: Any = await self._client.xrevrange(self._history, count=count)
        out = []
        for _entry_id, fields in entries or ():
            raw = fields.get(b"trigger") or fields.get("trigger")
            out.append(Trigger(**json.loads(raw)))
        return out


def _alert(trigger: Trigger) -> Alert:
    """A submitted retraining as an alert (already resolved: nothing stays firing)."""
    return Alert(
        id="",
        kind="retraining",
        severity="info",
        rule="retraining",
        model=trigger.model,
        version="",
        message=f"retraining job {trigger.job_id} submitted for {trigger.model}: {trigger.reason}",
        time=trigger.time,
        state=RESOLVED,
        resolve_time=trigger.time,
        fields={"job_id": trigger.job_id, "alert_id": trigger.alert_id},
    )
