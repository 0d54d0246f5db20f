"""The monitor service as a real process: it consumes records and feedback from a private Redis,
answers statistics, experiment reports, drift (against a registered package's reference) and
alerts over gRPC, and the CLI prints them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from typer.testing import CliRunner

from loopline.v1 import common_pb2 as common
from loopline.v1 import monitor_pb2 as pb
from loopline.v1 import monitor_pb2_grpc as pb_grpc
from services.inference.records import FailureRecord, InferenceRecord
from tests.fixtures.mlflow_store import clone_store
from tests.fixtures.packages import register_package
from tests.fixtures.redis import RedisServer
from tests.fixtures.waiting import free_port, until

EXPERIMENT = "exp-test-0001"


@dataclass
class Stack:
    address: str
    stub: pb_grpc.MonitorStub
    redis_url: str
    metrics_port: int


def record(n: int, variant: str, label: str, *, shadow: bool = False) -> dict[str, str]:
    probabilities = [0.9, 0.1] if label == "negative" else [0.2, 0.8]
    return InferenceRecord(
        request_id=f"req-{n}",
        time=time.time(),
        model="tiny",
        version="1" if variant == "control" else "2",
        experiment=EXPERIMENT,
        variant=variant,
        user_bucket=str(n % 10_000),
        label=label,
        probabilities=probabilities,
        labels=["negative", "positive"],
        token_count=6 + n % 5,
        unknown_share=0.0,
        truncated=False,
        queue_ms=0.5,
        compute_ms=2.0 + n % 3,
        batch_size=4,
        sketch=[((n * 7 + i) % 11) / 11 - 0.5 for i in range(16)],
        text=f"review number {n}",
        shadow=shadow,
    ).to_fields()


@pytest.fixture(scope="module")
def stack(
    tiny_package: Path,
    redis_server: RedisServer,
    mlflow_template: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("monitor")
    store = clone_store(mlflow_template, home / "mlflow")
    register_package(store.tracking_uri, tiny_package, "tiny", alias="champion")
    register_package(store.tracking_uri, tiny_package, "tiny")
    redis_server.start()
    redis_server.flushall()
    client = redis.Redis.from_url(redis_server.url)
    experiment = {
        "id": EXPERIMENT,
        "name": "ab",
        "model": "tiny",
        "variants": [
            {"name": "control", "model": {"name": "tiny", "version": "1"}, "weight": 50},
            {"name": "candidate", "model": {"name": "tiny", "version": "2"}, "weight": 50},
        ],
        "shadows": [],
        "status": "running",
        "start_time": time.time() - 60,
    }
    client.hset("loopline:experiments:all", EXPERIMENT, json.dumps(experiment))
    # 400 requests, half per variant; feedback on all: control right on 80 %, candidate on 60 %.
    for n in range(400):
        variant = "control" if n % 2 == 0 else "candidate"
        predicted = "positive" if n % 4 < 2 else "negative"
        client.xadd("loopline:inference", record(n, variant, predicted))  # type: ignore[arg-type]
        right = (n % 10 != 0) if variant == "control" else (n % 10 < 6)
        truth = predicted if right else ("negative" if predicted == "positive" else "positive")
        client.xadd("loopline:feedback", {"request_id": f"req-{n}", "label": truth})
    for n in range(10):  # candidate requests a worker accepted and failed to answer
        failed = FailureRecord(
            request_id=f"failed-{n}",
            time=time.time(),
            model="tiny",
            version="2",
            experiment=EXPERIMENT,
            variant="candidate",
            user_bucket="",
            error="overloaded",
        )
        client.xadd("loopline:inference", failed.to_fields())  # type: ignore[arg-type]
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "LOOPLINE_MONITOR_PORT": str(port),
        "LOOPLINE_MONITOR_METRICS_PORT": str(metrics_port),
        "LOOPLINE_MONITOR_HOME": str(home / "monitor"),
        "LOOPLINE_MONITOR_CHECK_SECONDS": "1",
        "LOOPLINE_MONITOR_LATENCY_P99_MS": "1",  # every version breaks this SLO: an alert fires
        "LOOPLINE_REDIS_URL": redis_server.url,
        "LOOPLINE_MLFLOW_URI": store.tracking_uri,
        "LOOPLINE_LOG_JSON": "1",
    }
    log = (home / "monitor.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.monitor"], env=env, stdout=log, stderr=log
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.MonitorStub(channel)

    def folded() -> bool:
        try:
            stats = stub.GetStats(pb.GetStatsRequest(model=common.ModelRef(name="tiny")), timeout=5)
        except grpc.RpcError:
            assert process.poll() is None, (home / "monitor.log").read_text()[-3000:]
            return False
        return (stats.requests, stats.errors, stats.accuracy.labelled) == (400, 10, 400)

    try:
        until(folded, "every record folded")
        yield Stack(f"127.0.0.1:{port}", stub, redis_server.url, metrics_port)
    finally:
        channel.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0


def test_stats_count_every_record_once_with_live_accuracy(stack: Stack) -> None:
    stats = stack.stub.GetStats(pb.GetStatsRequest(model=common.ModelRef(name="tiny")), timeout=5)
    assert (stats.requests, stats.errors) == (400, 10)
    assert stats.accuracy.correct == 280  # 160 of 200 control + 120 of 200 candidate
    assert stats.accuracy.interval.lower < 0.7 < stats.accuracy.interval.upper
    assert {s.label: s.count for s in stats.labels} == {"negative": 200, "positive": 200}
    assert stats.latency.p50.ToNanoseconds() > 0
    since_deploy = pb.GetStatsRequest(
        model=common.ModelRef(name="tiny", version="1"),
        window=common.TimeWindow(end_time=Timestamp(seconds=int(time.time()) + 60)),
    )
    assert stack.stub.GetStats(since_deploy, timeout=5).requests == 200
    one = pb.GetStatsRequest(
        model=common.ModelRef(name="tiny"), experiment_id=EXPERIMENT, variant="control"
    )
    control = stack.stub.GetStats(one, timeout=5)
    assert (control.requests, control.errors, control.accuracy.correct) == (200, 0, 160)


@pytest.mark.parametrize(
    ("window", "field"),
    [
        (common.TimeWindow(end_time=Timestamp(seconds=2**40)), "window.end_time"),
        (common.TimeWindow(last=Duration(seconds=1, nanos=-1)), "window.last"),
        (common.TimeWindow(last=Duration(seconds=-60)), "window.last"),
    ],
)
def test_a_window_out_of_range_is_invalid_argument_naming_it(
    stack: Stack, window: common.TimeWindow, field: str
) -> None:
    request = pb.GetStatsRequest(model=common.ModelRef(name="tiny"), window=window)
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.GetStats(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


def test_the_experiment_report_keeps_the_baseline(stack: Stack) -> None:
    request = pb.GetExperimentReportRequest(experiment_id=EXPERIMENT)
    report = stack.stub.GetExperimentReport(request, timeout=10)
    assert [v.variant for v in report.variants] == ["control", "candidate"]
    assert [v.accuracy for v in report.variants] == pytest.approx([0.8, 0.6])
    assert [(v.requests, v.errors) for v in report.variants] == [(200, 0), (200, 10)]
    (comparison,) = report.comparisons
    assert comparison.difference == pytest.approx(-0.2)
    assert comparison.p_value < 1e-4
    # 200 labels per arm are fewer than the minimum sample for a 2-point difference.
    assert report.recommendation == pb.RECOMMENDATION_CONTINUE
    assert "more" in report.rationale
    missing = pb.GetExperimentReportRequest(experiment_id="exp-nope")
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.GetExperimentReport(missing, timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_drift_is_compared_with_the_registered_reference(stack: Stack) -> None:
    request = pb.GetDriftRequest(model=common.ModelRef(name="tiny", version="1"))
    drift = stack.stub.GetDrift(request, timeout=60)
    assert drift.model.version == "1"
    assert drift.samples == 200
    assert drift.reference_samples > 0
    assert drift.summary


def test_alerts_fire_and_the_cli_prints_them(stack: Stack) -> None:
    def fired() -> bool:
        listed = stack.stub.ListAlerts(pb.ListAlertsRequest(), timeout=5)
        return any(a.rule == "latency_slo" for a in listed.alerts)

    until(fired, "the latency alert")
    import urllib.request

    url = f"http://127.0.0.1:{stack.metrics_port}/metrics"

    def exported() -> str:
        return str(urllib.request.urlopen(url, timeout=5).read().decode())

    # The gauges are set at the end of the check that raised the alert.
    firing = 'loopline_monitor_alerts_firing{rule="latency_slo"} 2.0'  # versions 1 and 2
    until(lambda: firing in exported(), "the firing gauge")
    assert 'loopline_monitor_requests{model="tiny",version="1"} 200.0' in exported()
    from services.cli.main import app

    result = CliRunner().invoke(app, ["monitor", "alerts", "--monitor", stack.address])
    assert result.exit_code == 0, result.output
    assert "latency_slo" in result.output
    result = CliRunner().invoke(app, ["monitor", "stats", "tiny", "--monitor", stack.address])
    assert result.exit_code == 0, result.output
    assert "400" in result.output


def test_alert_listing_and_watching_refuse_what_redis_would_choke_on(stack: Stack) -> None:
    def refused(call: Callable[[], object]) -> str:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        return caught.value.details() or ""  # type: ignore[attr-defined]

    negative = pb.ListAlertsRequest(page=common.PageRequest(page_size=-1))
    assert "page_size" in refused(lambda: stack.stub.ListAlerts(negative, timeout=5))
    before_1970 = pb.ListAlertsRequest(window=common.TimeWindow(end_time=Timestamp(seconds=-100)))
    assert list(stack.stub.ListAlerts(before_1970, timeout=5).alerts) == []
    huge = pb.ListAlertsRequest(page=common.PageRequest(page_size=2**31 - 1))
    stack.stub.ListAlerts(huge, timeout=5)
    not_an_id = pb.WatchAlertsRequest(after_id="yesterday")
    message = refused(lambda: list(stack.stub.WatchAlerts(not_an_id, timeout=5)))
    assert "after_id 'yesterday'" in message


def test_a_dry_run_trigger_explains_itself(stack: Stack) -> None:
    request = pb.TriggerRetrainingRequest(
        model=common.ModelRef(name="tiny"), reason="test", dry_run=True
    )
    answer = stack.stub.TriggerRetraining(request, timeout=10)
    assert not answer.submitted
    assert answer.reason == "no retraining spec configured"
