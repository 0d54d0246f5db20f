"""The closed loop, end to end, on one machine (`loopline demo`, `make demo`).

1. train v1 (or reuse the champion) and serve it;
2. train v2 with other hyperparameters; start an A/B experiment v1 vs v2 with a shadow arm;
3. movie-review traffic from a few hundred users with feedback labels; the experiment report;
4. Yelp traffic: the drift alert fires, the monitor starts a retraining job on labelled
   feedback, and the new version is registered as challenger behind the gate;
5. promote, then roll back, while traffic flows, counting failed requests;
6. an HTML report with the figures and plots.

Everything goes through the public interfaces a user has: the router, trainer and monitor over
gRPC, and the MLflow registry for promotion. Nothing is faked; the quick profile only uses fewer
sentences (and, in the tests, a tiny random base model).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import yaml

from loopline.errors import FailedPrecondition
from loopline.v1 import common_pb2 as common
from loopline.v1 import monitor_pb2 as mpb
from loopline.v1 import monitor_pb2_grpc as mpb_grpc
from loopline.v1 import router_pb2 as rpb
from loopline.v1 import trainer_pb2_grpc as tpb_grpc
from services.demo.figures import (
    AlertEvent,
    DemoFigures,
    DriftPoint,
    Marker,
    StepResult,
    VariantFigures,
)
from services.demo.traffic import Example, Traffic
from services.launcher.champion import find_data_dir, follow_job, rpc_failure
from services.launcher.settings import LauncherSettings
from services.launcher.stack import Stack

__all__ = ["PROFILES", "Profile", "run_demo"]


@dataclass(frozen=True)
class Profile:
    """How much of everything: sentences, users, epochs, and the monitor's pace."""

    name: str
    v1_examples: int
    v2_examples: int
    epochs: int
    max_length: int
    experiment_requests: int
    users: int
    yelp_holdout: int
    retrain_min_examples: int
    drift_window_records: int
    check_seconds: float


PROFILES = {
    # 5 to 11 minutes on 2 CPU cores with all-MiniLM-L6-v2 (training is most of it).
    "full": Profile("full", 2000, 2000, 1, 64, 1000, 300, 300, 200, 200, 2.0),
    # Minutes with a tiny base model: what the end-to-end test runs.
    "quick": Profile("quick", 200, 200, 1, 32, 240, 60, 200, 60, 100, 1.0),
}

Say = Callable[[str], None]


def _read(path: Path) -> list[Example]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [Example(str(r["text"]), str(r["label"])) for r in rows]


def _write(examples: list[Example], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) for e in examples]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _until(what: str, condition: Callable[[], bool], timeout: float, every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise FailedPrecondition(f"demo: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Demo:
    def __init__(
        self,
        settings: LauncherSettings,
        profile: Profile,
        say: Say,
        on_job_event: Callable[[Any], None],
    ) -> None:
        self.settings = settings
        self.profile = profile
        self.say = say
        self.home = settings.home.resolve()
        data = find_data_dir(settings.data_dir)
        if data is None or not (data / "restaurant_reviews" / "yelp.jsonl").is_file():
            raise FailedPrecondition(
                "the demo needs the labelled sentences in ../shared/data (movie_reviews/ and "
                "restaurant_reviews/yelp.jsonl); set LOOPLINE_UP_DATA_DIR to their folder"
            )
        self.data = data
        self.start = time.monotonic()
        self.figures = DemoFigures(
            model=settings.model,
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            profile=profile.name,
            base_model=settings.base_model or "all-MiniLM-L6-v2",
        )
        yelp = _read(data / "restaurant_reviews" / "yelp.jsonl")
        random.Random(13).shuffle(yelp)
        self.yelp_holdout = yelp[: profile.yelp_holdout]
        self.yelp_traffic = yelp[profile.yelp_holdout :]
        self.movies = _read(data / "movie_reviews" / "validation.jsonl")
        retrain = self._retrain_spec()
        self.stack = Stack(
            settings,
            on_event=lambda text: say(f"  {text}"),
            on_job_event=on_job_event,
            extra_env={"monitor": self._monitor_env(retrain)},
        )
        self.traffic: Traffic | None = None

    # ----- set-up -----

    def _retrain_spec(self) -> Path:
        """What the drift alert submits: continue from the champion on labelled production
        traffic, judged on held-out Yelp sentences, kept as challenger only if it is better."""
        holdout = _write(self.yelp_holdout, self.home / "yelp-holdout.jsonl")
        spec = {
            "name": self.settings.model,
            "base_model": f"models:/{self.settings.model}@champion",
            "data": [{"feedback": {"min_examples": self.profile.retrain_min_examples}}],
            "validation": {"file": {"path": str(holdout)}},
            "epochs": self.profile.epochs,
            "max_length": self.profile.max_length,
            "promotion": "gate",
            "gate": {"metric": "accuracy", "min_improvement": 0.0, "max_latency_factor": 2.0},
        }
        path = self.home / "retrain.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    def _monitor_env(self, retrain: Path) -> dict[str, str]:
        p = self.profile
        return {
            "LOOPLINE_MONITOR_RETRAIN_SPEC": str(retrain),
            "LOOPLINE_MONITOR_CHECK_SECONDS": str(p.check_seconds),
            "LOOPLINE_MONITOR_DRIFT_WINDOW_RECORDS": str(p.drift_window_records),
            "LOOPLINE_MONITOR_DRIFT_CONSECUTIVE": "2",
            "LOOPLINE_MONITOR_RETRAIN_COOLDOWN_SECONDS": "0",
        }

    def now(self) -> float:
        return time.monotonic() - self.start

    def step(self, number: int, title: str, action: Callable[[], str]) -> None:
        self.say(f"[{number}/6] {title}")
        began = time.monotonic()
        outcome = action()
        seconds = time.monotonic() - began
        self.figures.steps.append(StepResult(number, title, round(seconds, 1), outcome))
        self.say(f"      {outcome} ({seconds:.0f} s)")

    # ----- the steps -----

    def run(self) -> DemoFigures:
        try:
            self.step(1, "train v1 (or reuse the champion) and serve it", self.serve_v1)
            self.step(2, "train v2; A/B experiment v1 vs v2 with a shadow arm", self.experiment)
            self.step(3, "movie-review traffic with feedback; the experiment report", self.ab)
            self.step(4, "Yelp traffic: drift alert, retraining on feedback, gate", self.drift)
            self.step(5, "promote, then roll back, under traffic", self.promote_and_roll_back)
        finally:
            if self.traffic is not None:
                self.traffic.close()
                self.figures.requests = sorted(self.traffic.samples, key=lambda s: s.t)
            self.figures.seconds = round(self.now(), 1)
            self.figures.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
        return self.figures

    def serve_v1(self) -> str:
        # A fresh Redis each run: streams, alerts and experiments of an earlier run would blur
        # this one's figures. The registry (v1 to reuse) and the trainer's jobs stay.
        shutil.rmtree(self.home / "redis", ignore_errors=True)
        endpoints = self.stack.up()
        self.traffic = Traffic(endpoints.router, self.start, self.stack.metadata)
        self.v1 = self._registry().alias_version(self.settings.model, "champion") or ""
        self._describe(self.v1, "v1: the first champion")
        return f"{self.settings.model} v{self.v1} is the champion; router at {endpoints.router}"

    def _registry(self) -> Any:
        from loopline.registry import Registry

        return Registry(self.stack.endpoints.mlflow_uri)

    def _describe(self, version: str, role: str) -> None:
        info = next(
            (v for v in self._registry().versions(self.settings.model) if v.version == version),
            None,
        )
        tags = dict(info.tags) if info else {}
        self.figures.versions[version] = {
            "role": role,
            **{k.removeprefix("loopline."): v for k, v in sorted(tags.items())},
        }

    def _train(self, spec: dict[str, Any], key: str) -> Any:
        job = self.stack.train(spec, key=f"{key}-{time.time_ns()}")
        if not job.model.version:
            raise FailedPrecondition(f"demo: job {job.id} registered no version: {job.error}")
        return job

    def experiment(self) -> str:
        p = self.profile
        train = self.data / "movie_reviews" / "train.jsonl"
        subset = self.home / "v2-train.jsonl"
        # Other sentences and other hyperparameters than v1: a real candidate, not a copy.
        rows = train.read_text(encoding="utf-8").splitlines()[-p.v2_examples :]
        subset.parent.mkdir(parents=True, exist_ok=True)
        subset.write_text("\n".join(rows) + "\n", encoding="utf-8")
        spec: dict[str, Any] = {
            "name": self.settings.model,
            "alias": "challenger",
            "data": [{"file": {"path": str(subset)}}],
            "validation": {"file": {"path": str(self.data / "movie_reviews/validation.jsonl")}},
            "epochs": p.epochs,
            "max_length": p.max_length,
            "seed": 7,
            "hyperparameters": {"learning_rate": 5e-5, "batch_size": 16},
            "promotion": "always",
        }
        if self.settings.base_model:
            spec["base_model"] = self.settings.base_model
        self.v2 = self._train(spec, "demo-v2").model.version
        self._describe(self.v2, "v2: other data and hyperparameters")
        name = self.settings.model
        experiment = common.Experiment(
            name=f"demo-v{self.v1}-vs-v{self.v2}-{int(time.time())}",
            model=name,
            description="Does v2 (other sentences, lower learning rate) beat v1?",
            variants=[
                common.Variant(
                    name="control", model=common.ModelRef(name=name, version=self.v1), weight=50
                ),
                common.Variant(
                    name="candidate", model=common.ModelRef(name=name, version=self.v2), weight=50
                ),
            ],
            # Every request mirrored to v2: its accuracy on all users, not only its half.
            shadows=[
                common.ShadowVariant(
                    name="candidate-shadow",
                    model=common.ModelRef(name=name, version=self.v2),
                    sample_rate=1.0,
                )
            ],
            status=common.EXPERIMENT_STATUS_RUNNING,
        )
        assert self.traffic is not None
        created = self.traffic.stub.CreateExperiment(
            rpb.CreateExperimentRequest(experiment=experiment),
            metadata=self.stack.metadata,
            timeout=240,
        )
        self.experiment_id = created.id
        probe = rpb.ClassifyRequest(text="probe", user_id="probe")
        _until(
            "the router to apply the experiment",
            lambda: (
                self.traffic is not None
                and self.traffic.stub.Classify(
                    probe, metadata=self.stack.metadata, timeout=30
                ).experiment_id
                == created.id
            ),
            timeout=10,
            every=0.1,
        )
        self.figures.markers.append(Marker(self.now(), f"experiment v{self.v1} vs v{self.v2}"))
        return f"v{self.v2} trained; experiment {created.id} running (50/50, shadow on v2)"

    def _monitor(self) -> mpb_grpc.MonitorStub:
        channel = grpc.insecure_channel(self.stack.endpoints.monitor)
        return mpb_grpc.MonitorStub(channel)

    def ab(self) -> str:
        assert self.traffic is not None
        p = self.profile
        examples = (self.movies * (1 + p.experiment_requests // len(self.movies)))[
            : p.experiment_requests
        ]
        samples = self.traffic.send(examples, p.users, "experiment", feedback_share=0.9)
        failed = sum(not s.ok for s in samples)
        monitor = self._monitor()
        request = mpb.GetExperimentReportRequest(experiment_id=self.experiment_id)
        # Only answers routed through the experiment count (the first few may precede it).
        answered = sum(1 for s in samples if s.ok and s.variant)
        report: Any = None

        def folded() -> bool:
            nonlocal report
            report = monitor.GetExperimentReport(request, timeout=30)
            live = sum(int(v.requests) for v in report.variants if not v.shadow)
            labelled = sum(int(v.labelled) for v in report.variants if not v.shadow)
            return live >= answered and labelled >= 0.5 * answered

        try:
            _until("the monitor to fold the experiment's records", folded, timeout=120)
        except FailedPrecondition as err:
            seen = [(v.variant, v.requests, v.labelled) for v in report.variants]
            raise FailedPrecondition(
                f"{err.message}; {answered} answered, report: {seen}"
            ) from None
        for v in report.variants:
            self.figures.variants.append(
                VariantFigures(
                    variant=v.variant,
                    version=v.model.version,
                    shadow=v.shadow,
                    requests=v.requests,
                    labelled=v.labelled,
                    accuracy=v.accuracy,
                    ci_low=v.accuracy_interval.lower,
                    ci_high=v.accuracy_interval.upper,
                    p50_ms=v.latency.p50.ToMilliseconds(),
                    p99_ms=v.latency.p99.ToMilliseconds(),
                )
            )
        if report.comparisons:
            self.figures.p_value = report.comparisons[0].p_value
            self.figures.difference = report.comparisons[0].difference
        self.figures.recommendation = mpb.Recommendation.Name(report.recommendation).removeprefix(
            "RECOMMENDATION_"
        )
        self.figures.rationale = report.rationale
        self._read_drift(monitor)  # the baseline: movie reviews, what v1 was trained on
        shares = ", ".join(
            f"{v.variant} {v.accuracy:.1%} [{v.ci_low:.1%}, {v.ci_high:.1%}] n={v.labelled}"
            for v in self.figures.variants
        )
        self.say(f"      {shares}")
        p_text = f"{self.figures.p_value:.3g}" if self.figures.p_value is not None else "n/a"
        return (
            f"{len(samples)} requests from {p.users} users ({failed} failed); p = {p_text}; "
            f"recommendation: {self.figures.recommendation.lower().replace('_', ' ')}"
        )

    def _follow(self, job_id: str) -> Any:
        """Stream a job's events to the progress display; its final state."""
        with grpc.insecure_channel(self.stack.endpoints.trainer) as channel:
            stub = tpb_grpc.TrainerStub(channel)
            try:
                return follow_job(stub, job_id, self.stack.on_job_event, self.stack.metadata)
            except grpc.RpcError as err:
                raise rpc_failure(err, f"following job {job_id}") from None

    def _read_drift(self, monitor: mpb_grpc.MonitorStub) -> None:
        """One GetDrift of v1 (the version serving everyone outside the experiment)."""
        reading = monitor.GetDrift(
            mpb.GetDriftRequest(model=common.ModelRef(name=self.settings.model, version=self.v1)),
            timeout=60,
        )
        self.figures.drift.append(
            DriftPoint(
                t=self.now(),
                version=self.v1,
                samples=reading.samples,
                drifted=reading.drifted,
                scores={f.feature: f.value for f in reading.features},
                thresholds={f.feature: f.threshold for f in reading.features},
            )
        )

    def drift(self) -> str:
        assert self.traffic is not None
        monitor = self._monitor()
        name = self.settings.model
        self.traffic.stub.StopExperiment(
            rpb.StopExperimentRequest(id=self.experiment_id, reason="demo: moving on to drift"),
            metadata=self.stack.metadata,
            timeout=30,
        )
        self.figures.markers.append(Marker(self.now(), "traffic switches to Yelp"))
        # A steady, moderate rate: the monitor's checks need CPU as much as the workers do.
        self.traffic.start(
            self.yelp_traffic,
            self.profile.users,
            "drift",
            feedback_share=1.0,
            concurrency=2,
            pause=0.02,
        )
        seen: set[tuple[str, int]] = set()
        job_id = ""
        since = time.time() - 1.0  # alerts of earlier runs (same Redis) are not this one's
        readings = threading.Event()

        def read_drift() -> None:  # the drift scores over time, beside the alert watch
            while not readings.wait(2.0):
                with contextlib.suppress(grpc.RpcError):
                    self._read_drift(monitor)

        reader = threading.Thread(target=read_drift, daemon=True)
        reader.start()

        def watch() -> bool:
            nonlocal job_id
            alerts = monitor.ListAlerts(
                mpb.ListAlertsRequest(filter=mpb.AlertFilter(model=common.ModelRef(name=name))),
                timeout=30,
            ).alerts
            for alert in sorted(alerts, key=lambda a: a.time.ToNanoseconds()):
                key = (alert.id, alert.state)
                if key in seen or alert.time.ToSeconds() < since:
                    continue
                seen.add(key)
                kind = mpb.AlertKind.Name(alert.kind).removeprefix("ALERT_KIND_")
                state = mpb.AlertState.Name(alert.state).removeprefix("ALERT_STATE_")
                self.figures.alerts.append(AlertEvent(self.now(), kind, state, alert.message))
                self.say(f"      alert {kind} {state.lower()}: {alert.message}")
                if kind == "RETRAINING" and alert.fields.get("job_id"):
                    job_id = alert.fields["job_id"]
            return bool(job_id)

        try:
            _until("the drift alert and its retraining job", watch, timeout=300, every=1.0)
        finally:
            readings.set()
            reader.join(timeout=90)
        # One reading on the window the alert judged: checks can fire between two readings.
        with contextlib.suppress(grpc.RpcError):
            self._read_drift(monitor)
        # Enough labelled Yelp traffic is in; training should not compete with the traffic.
        self.traffic.stop()
        self.figures.markers.append(Marker(self.now(), "retraining starts"))
        job = self._follow(job_id)
        if not job.model.version:
            raise FailedPrecondition(f"demo: retraining job {job_id} failed: {job.error}")
        self.v3 = job.model.version
        self.figures.gate = job.gate_reason
        self.gate_passed = job.model.alias == "challenger"
        self._describe(self.v3, "v3: retrained on Yelp feedback")
        self.figures.markers.append(Marker(self.now(), f"v{self.v3} registered"))
        verdict = "passed: challenger" if self.gate_passed else "refused"
        return f"drift alert -> job {job_id} -> v{self.v3}, gate {verdict} ({job.gate_reason})"

    def promote_and_roll_back(self) -> str:
        assert self.traffic is not None
        registry = self._registry()
        name = self.settings.model
        mixed = [x for pair in zip(self.yelp_holdout, self.movies, strict=False) for x in pair]
        before = len(self.traffic.samples)
        self.traffic.start(mixed, self.profile.users, "promotion", feedback_share=0.0, pause=0.02)

        def answered_by(version: str) -> Callable[[], bool]:
            def check() -> bool:
                recent = [s for s in self.traffic.samples[-8:] if s.ok] if self.traffic else []
                return bool(recent) and all(s.version == version for s in recent)

            return check

        try:
            time.sleep(3)
            registry.promote(name, self.v3)
            self.figures.markers.append(Marker(self.now(), f"promote v{self.v3}"))
            _until(f"answers from v{self.v3}", answered_by(self.v3), timeout=180, every=0.5)
            self.say(f"      champion -> v{self.v3}; the workers swapped under traffic")
            time.sleep(3)
            registry.rollback(name)
            self.figures.markers.append(Marker(self.now(), f"roll back to v{self.v1}"))
            _until(f"answers from v{self.v1}", answered_by(self.v1), timeout=180, every=0.5)
            self.say(f"      champion -> v{self.v1} again (rollback)")
            time.sleep(3)
        finally:
            self.traffic.stop()
        during = self.traffic.samples[before:]
        failed = sum(not s.ok for s in during)
        self.figures.requests_during_swaps = len(during)
        self.figures.failed_during_swaps = failed
        return f"{len(during)} requests while the champion moved twice: {failed} failed"


def run_demo(
    settings: LauncherSettings,
    profile: Profile,
    say: Say,
    on_job_event: Callable[[Any], None],
) -> tuple[DemoFigures, Path]:
    """Run the loop, always stop the stack, and write the report (also after a failure)."""
    from services.demo.report import render_report

    demo = Demo(settings, profile, say, on_job_event)
    report = demo.home / "report.html"
    failure: BaseException | None = None
    try:
        demo.run()
    except BaseException as err:
        failure = err
        demo.figures.error = str(err) or type(err).__name__
    finally:
        say("stopping the stack ...")
        demo.stack.down()
    demo.figures.steps.append(StepResult(6, "HTML report", 0.0, str(report)))
    render_report(demo.figures, report)
    if failure is not None:
        raise failure
    return demo.figures, report
