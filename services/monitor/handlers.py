"""What the Monitor RPCs compute, without protobuf: statistics, drift and experiment reports from
the folded state, and the periodic check that raises alerts and triggers retraining.

Experiments are read from the router's Redis document (`loopline:experiments:all`, one JSON per
experiment: names, weights, shadows, the baseline first); references (`reference.json` of each
version's package) from the MLflow registry, cached on disk per version.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from loopline.errors import FailedPrecondition, InvalidInput, NotFound, NotReady
from loopline.logging import get_logger
from services.monitor import stats as st
from services.monitor.alerts import AlertBook, Condition, RuleInputs, Rules, evaluate, srm_condition
from services.monitor.drift import DriftResult, LiveSamples, Reference, check_drift, save_html
from services.monitor.metrics import MonitorMetrics
from services.monitor.retrain import Retrainer
from services.monitor.state import State, Totals, sum_totals

__all__ = ["Checker", "ExperimentInfo", "References", "Report", "Views"]

log = get_logger(__name__)

EXPERIMENTS_KEY = "loopline:experiments:all"
LOW_CONFIDENCE = 0.6


@dataclass(frozen=True)
class ExperimentInfo:
    """The parts of a router experiment a report needs."""

    id: str
    name: str
    model: str
    variants: list[tuple[str, float]]  # (name, weight), baseline first
    shadows: list[str]
    start_time: float | None
    raw: dict[str, Any] = field(repr=False)


async def read_experiment(client: aioredis.Redis, experiment_id: str) -> ExperimentInfo:
    raw = await client.hget(EXPERIMENTS_KEY, experiment_id)
    if raw is None:
        raise NotFound(
            "experiment", experiment_id, "list experiments with `loopline experiments list`"
        )
    data = json.loads(raw)
    return ExperimentInfo(
        id=data["id"],
        name=data.get("name", ""),
        model=data.get("model", ""),
        variants=[(v["name"], float(v["weight"])) for v in data.get("variants", [])],
        shadows=[s["name"] for s in data.get("shadows", [])],
        start_time=data.get("start_time"),
        raw=data,
    )


class References:
    """`reference.json` of a registered version, fetched once from MLflow and kept on disk."""

    def __init__(self, mlflow_uri: str, cache: Path) -> None:
        self._uri = mlflow_uri
        self._cache = cache

    def _fetch(self, model: str, version: str) -> Path:
        from mlflow import MlflowClient
        from mlflow.artifacts import download_artifacts

        folder = self._cache / model / version
        if (folder / "reference.json").is_file():
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self._uri, registry_uri=self._uri)
        uri = client.get_model_version_download_uri(model, version)
        download_artifacts(
            artifact_uri=f"{uri}/reference.json", dst_path=str(folder), tracking_uri=self._uri
        )
        return folder

    async def load(self, model: str, version: str) -> Reference:
        # Both name a folder under the cache: refuse what MLflow refuses (a '/' or ':' in a
        # name) and anything but a version number before they touch the file system.
        if model in ("", ".", "..") or "/" in model or ":" in model or not version.isdigit():
            raise InvalidInput(
                f"no registered model version is called {model!r} version {version!r}: names "
                "hold no '/' or ':', versions are numbers",
                model=model,
                version=version,
            )
        try:
            folder = await asyncio.to_thread(self._fetch, model, version)
            return await asyncio.to_thread(Reference.load, folder)
        except (OSError, ValueError) as err:
            raise FailedPrecondition(
                f"no reference distribution for {model}/{version} ({err}); was it exported by "
                "`loopline train`?"
            ) from None
        except Exception as err:  # MLflow raises its own types
            code = getattr(err, "error_code", "")
            if code == "RESOURCE_DOES_NOT_EXIST":
                raise NotFound("model version", f"{model}/{version}", str(err)[:200]) from None
            if code == "INVALID_PARAMETER_VALUE":
                refused = f"MLflow refused {model}/{version}: {err}"
                raise InvalidInput(refused, model=model) from None
            # An unreachable registry is not a missing version: UNAVAILABLE, worth a retry.
            raise NotReady(
                f"cannot read the reference of {model}/{version} from MLflow ({err!r:.200})",
                model=model,
            ) from None

    async def trained_at(self, model: str, version: str) -> float | None:
        """When a version was registered (unix seconds): traffic after it is traffic the version
        was not trained on. None when the registry cannot say (logged)."""

        def created() -> float:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=self._uri, registry_uri=self._uri)
            return float(client.get_model_version(model, version).creation_timestamp) / 1000

        try:
            return await asyncio.to_thread(created)
        except Exception as err:  # MLflow raises its own types for a missing version
            log.warning(
                "no registration time for a version; retraining takes all feedback",
                extra={"model": model, "version": version, "error": repr(err)[:200]},
            )
            return None

    async def champion(self, model: str) -> str:
        from loopline.registry import Registry

        version = await asyncio.to_thread(Registry(self._uri).alias_version, model, "champion")
        if version is None:
            raise NotFound("model alias", f"{model}@champion", "give a version")
        return version


@dataclass
class VariantView:
    variant: str
    model: str
    version: str
    shadow: bool
    totals: Totals
    accuracy: st.Proportion


@dataclass
class Report:
    experiment: ExperimentInfo
    variants: list[VariantView]
    comparisons: list[st.Comparison]
    decision: st.Decision | None
    srm: st.SampleRatio | None
    agreement: dict[str, st.Proportion]


def live_samples(samples: Any) -> LiveSamples:
    sketches = samples.sketch[~np.isnan(samples.sketch).any(axis=1)] if len(samples) else ()
    return LiveSamples(
        labels=list(samples.labels),
        confidence=np.nan_to_num(samples.confidence, nan=0.0),
        token_counts=np.nan_to_num(samples.token_count, nan=0.0).astype(int),
        unknown_shares=np.nan_to_num(samples.unknown_share, nan=0.0),
        sketches=sketches,
    )


class Views:
    """Statistics, drift and experiment reports over the folded state."""

    def __init__(
        self, state: State, client: aioredis.Redis, references: References, reports: Path
    ) -> None:
        self.state = state
        self.client = client
        self.references = references
        self.reports = reports

    async def stats(
        self,
        model: str,
        version: str | None,
        start: float | None,
        end: float | None,
        experiment: str = "",
        variant: str = "",
    ) -> Totals:
        if not model:
            raise InvalidInput("a model name is required", field="model.name")
        if experiment:
            found = await self.state.variant_totals(experiment, start, end)
            if variant:
                if variant not in found:
                    raise NotFound("variant", f"{experiment}/{variant}", f"known: {sorted(found)}")
                return found[variant].totals
            return sum_totals(v.totals for v in found.values() if not v.shadow)
        return await self.state.window_totals(model, version or None, start, end)

    async def drift(
        self,
        model: str,
        version: str,
        start: float | None,
        end: float | None,
        features: Sequence[str] | None = None,
        limit: int = 2000,
        report: bool = True,
    ) -> tuple[str, DriftResult, Path | None]:
        version = version or await self.references.champion(model)
        reference = await self.references.load(model, version)
        samples = await self.state.drift_samples(model, version, start, end, limit)
        result = await asyncio.to_thread(
            check_drift, reference, live_samples(samples), list(features or []) or None
        )
        path = None
        if report and result.evidence is not None:
            self.reports.mkdir(parents=True, exist_ok=True)
            path = self.reports / f"{model}-{version}-{int(time.time())}.html"
            try:
                await asyncio.to_thread(save_html, result, path)
            except Exception:  # a report that cannot be drawn must not fail the check
                log.warning("drift report not saved", exc_info=True)
                path = None
        return version, result, path

    async def experiment_report(
        self, experiment_id: str, start: float | None, end: float | None, level: float
    ) -> Report:
        info = await read_experiment(self.client, experiment_id)
        found = await self.state.variant_totals(experiment_id, start, end)
        views = []
        for name, _weight in info.variants:
            views.append(_view(name, found.get(name), False, level))
        for name in info.shadows:
            views.append(_view(name, found.get(f"{name}:shadow") or found.get(name), True, level))
        arms = [
            st.Arm(v.variant, v.totals.correct, v.totals.labelled) for v in views if not v.shadow
        ]
        decision = st.recommend(arms[0], arms[1:], level) if len(arms) > 1 else None
        srm = _sample_ratio(info, found)
        agreement = {
            v.variant: st.agreement_rate(v.totals.shadow_agreed, v.totals.shadow_compared, level)
            for v in views
            if v.shadow
        }
        comparisons = decision.comparisons if decision else []
        return Report(info, views, comparisons, decision, srm, agreement)

    async def sample_ratio(
        self, experiment_id: str
    ) -> tuple[ExperimentInfo, st.SampleRatio | None]:
        """An experiment and its sample-ratio test on the assignments since it started (None
        before any traffic); what the checker needs of `experiment_report`, without the rest."""
        info = await read_experiment(self.client, experiment_id)
        return info, _sample_ratio(info, await self.state.variant_totals(experiment_id))


def _sample_ratio(info: ExperimentInfo, found: dict[str, Any]) -> st.SampleRatio | None:
    """Served variants' request counts against their weights; None before any traffic."""
    weights = dict(info.variants)
    observed = {name: found[name].totals.requests if name in found else 0 for name in weights}
    return st.sample_ratio_mismatch(observed, weights) if any(observed.values()) else None


def _view(name: str, found: Any, shadow: bool, level: float) -> VariantView:
    totals = found.totals if found is not None else Totals()
    model = found.model if found is not None else ""
    version = found.version if found is not None else ""
    accuracy = st.proportion(totals.correct, totals.labelled, level)
    return VariantView(name, model, version, shadow, totals, accuracy)


class Checker:
    """Every `interval`: drift and rules per served version, alerts, retraining triggers."""

    def __init__(
        self,
        views: Views,
        book: AlertBook,
        rules: Rules,
        retrainer: Retrainer,
        interval: float,
        window_seconds: int,
        drift_records: int,
        metrics: MonitorMetrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.views = views
        self.book = book
        self.rules = rules
        self.retrainer = retrainer
        self.interval = interval
        self.window = window_seconds
        self.drift_records = drift_records
        self._streak: dict[tuple[str, str], int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="monitor-checker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_once()
            except Exception:  # one bad check must not end the loop; say so once per spell
                if not failing:
                    log.exception("monitor check failed; retrying every interval")
                failing = True
            else:
                if failing:
                    log.info("monitor checks succeed again")
                failing = False

    async def check_once(self, now: float | None = None) -> list[Any]:
        """One pass over every model version seen; returns the alerts written."""
        now = time.time() if now is None else now
        written = []
        for model, versions in (await self.views.state.models()).items():
            for version in versions:
                inputs = await self._inputs(model, version, now)
                alerts = await self.book.apply(evaluate(self.rules, inputs), now)
                written += alerts
                for alert in alerts:
                    if alert.state == "firing" and alert.rule in ("drift", "accuracy_floor"):
                        # Feedback since the version was trained: what it has not learnt yet.
                        since = await self.views.references.trained_at(model, version)
                        await self.retrainer.trigger(
                            model, alert.message, alert_id=alert.id, since=since
                        )
        written += await self.book.apply(await self.experiment_conditions(), now)
        if self.metrics is not None:
            firing = [a.rule for a in await self.book.firing()]
            for rule in ("drift", "accuracy_floor", "latency_slo", "srm"):
                self.metrics.firing.labels(rule).set(firing.count(rule))
        return written

    async def experiment_conditions(self) -> list[Condition]:
        """The sample-ratio rule for every experiment with traffic: a running one is judged on
        its assignments since it started; one no longer running resolves what it had raised."""
        conditions = []
        for experiment_id in await self.views.state.experiments():
            try:
                info, srm = await self.views.sample_ratio(experiment_id)
            except NotFound:
                continue  # deleted from the router's store: nothing left to judge
            running = info.raw.get("status") == "running"
            p_value = srm.p_value if running and srm is not None else 1.0
            conditions.append(srm_condition(self.rules, info.model, "", experiment_id, p_value))
        return conditions

    async def _inputs(self, model: str, version: str, now: float) -> RuleInputs:
        start = now - self.window * 10
        totals = await self.views.state.window_totals(model, version, start, now)
        if self.metrics is not None:
            self.metrics.observe(model, version, totals, now - start)
        streak, summary = await self._drift(model, version, start, now)
        accuracy = totals.accuracy() if totals.labelled else None
        latency = totals.latency_percentile(0.99) if totals.requests else None
        return RuleInputs(
            model,
            version,
            drifted_in_a_row=streak,
            drift_summary=summary,
            labelled=totals.labelled,
            accuracy=None if accuracy is None or math.isnan(accuracy) else accuracy,
            latency_p99_ms=latency,
        )

    async def _drift(self, model: str, version: str, start: float, end: float) -> tuple[int, str]:
        key = (model, version)
        try:
            # No HTML per periodic check (megabytes, seconds of CPU): GetDrift draws one.
            _v, result, _path = await self.views.drift(
                model, version, start, end, limit=self.drift_records, report=False
            )
        except (NotFound, FailedPrecondition) as err:
            log.info(
                "drift not checked", extra={"model": model, "version": version, "why": err.message}
            )
            return 0, ""
        self._streak[key] = self._streak.get(key, 0) + 1 if result.drifted else 0
        if self.metrics is not None:
            self.metrics.drift(model, version, result.drifted, self._streak[key])
        return self._streak[key], result.summary
