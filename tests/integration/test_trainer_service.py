"""The trainer service end to end, as a real process: jobs over gRPC that train tiny models,
register them in a throwaway MLflow store, learn from feedback kept in a private Redis, and move
`champion` only when the promotion policy says so.
"""

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
from typing import Any

import grpc
import pytest
import redis
from typer.testing import CliRunner

from loopline.auth import bearer_metadata
from loopline.jobspec import parse_spec, spec_pb
from loopline.registry import Registry
from loopline.v1 import trainer_pb2 as pb
from loopline.v1 import trainer_pb2_grpc as pb_grpc
from services.inference.records import InferenceRecord
from tests.fixtures.mlflow_store import clone_store
from tests.fixtures.packages import TINY_INT8_MAX_DROP_POINTS
from tests.fixtures.redis import RedisServer
from tests.fixtures.waiting import free_port, until

TOKEN = "trainer-test-token"
ADMIN = bearer_metadata(TOKEN)
TINY = {  # the tiny recipe (tests/fixtures/packages.py), as a job spec's hyperparameters
    "learning_rate": 3e-3,
    "batch_size": 16,
    "warmup_ratio": 0.0,
    "extra": {"head_learning_rate": "0.01", "dropout": "0.0", "patience": "3"},
}


@dataclass
class Trainer:
    address: str
    env: dict[str, str]
    home: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.home / "trainer.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.trainer"],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=log,
        )
        until(self.ready, "the trainer to serve", 120)

    def ready(self) -> bool:
        try:
            with grpc.insecure_channel(self.address) as channel:
                pb_grpc.TrainerStub(channel).ListJobs(pb.ListJobsRequest(), timeout=1)
            return True
        except grpc.RpcError:
            assert self.process is not None
            assert self.process.poll() is None, self.tail()
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=60)
        return int(self.process.returncode)

    def tail(self) -> str:
        return (self.home / "trainer.log").read_text(errors="replace")[-3000:]


@dataclass
class Stack:
    trainer: Trainer
    stub: pb_grpc.TrainerStub
    mlflow_uri: str
    redis_url: str
    base: Path
    files: tuple[Path, Path]


@pytest.fixture(scope="module")
def stack(
    tiny_model_factory: Callable[[str], Path],
    sentiment_files: tuple[Path, Path],
    redis_server: RedisServer,
    mlflow_template: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("trainer-service")
    store = clone_store(mlflow_template, home / "mlflow")
    redis_server.start()
    redis_server.flushall()
    port = free_port()
    env = {
        "LOOPLINE_TRAINER_PORT": str(port),
        "LOOPLINE_TRAINER_HOME": str(home / "trainer"),
        "LOOPLINE_ADMIN_TOKEN": TOKEN,
        "LOOPLINE_MLFLOW_URI": store.tracking_uri,
        "LOOPLINE_REDIS_URL": redis_server.url,
        "LOOPLINE_LOG_JSON": "1",
        "HF_HUB_OFFLINE": "1",
    }
    trainer = Trainer(f"127.0.0.1:{port}", env, home)
    trainer.start()
    channel = grpc.insecure_channel(trainer.address)
    try:
        yield Stack(
            trainer,
            pb_grpc.TrainerStub(channel),
            store.tracking_uri,
            redis_server.url,
            tiny_model_factory("bert"),
            sentiment_files,
        )
    except BaseException:
        print(trainer.tail())
        raise
    finally:
        channel.close()
        trainer.stop()


def spec(stack: Stack, **changes: Any) -> pb.JobSpec:
    data: dict[str, Any] = {
        "name": "tiny",
        "alias": "champion",
        "data": [{"file": str(stack.files[0])}],
        "validation": str(stack.files[1]),
        "base_model": str(stack.base),
        "epochs": 2,
        "max_length": 32,
        "hyperparameters": TINY,
        "promotion": "always",
    }
    data.update(changes)
    # A random tiny model's int8 graph may flip a label or two of the 60 validation texts;
    # these tests are about the service, not the int8 gate (tests/integration/test_int8_export).
    data["gate"] = {"max_int8_drop_points": TINY_INT8_MAX_DROP_POINTS, **data.get("gate", {})}
    return spec_pb(parse_spec(data))


def submit(stack: Stack, message: pb.JobSpec, key: str = "") -> pb.Job:
    request = pb.SubmitJobRequest(spec=message, request_id=key)
    return stack.stub.SubmitJob(request, metadata=ADMIN, timeout=30)


def watch(stack: Stack, job_id: str) -> list[pb.JobEvent]:
    return list(stack.stub.WatchJob(pb.WatchJobRequest(id=job_id), timeout=600))


def _feedback(stack: Stack, texts: list[tuple[str, str]]) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    for n, (text, label) in enumerate(texts):
        record = InferenceRecord(
            request_id=f"req-{n}",
            time=time.time(),
            model="tiny",
            version="1",
            experiment="",
            variant="",
            user_bucket="",
            label=label,
            probabilities=[0.5, 0.5],
            labels=["negative", "positive"],
            token_count=5,
            unknown_share=0.0,
            truncated=False,
            queue_ms=0.1,
            compute_ms=1.0,
            batch_size=1,
            sketch=[0.0] * 16,
            text=text,
        )
        client.xadd("loopline:inference", record.to_fields())  # type: ignore[arg-type]
        client.xadd("loopline:feedback", {"request_id": f"req-{n}", "label": label})


def test_a_job_with_feedback_trains_registers_and_promotes(stack: Stack) -> None:
    rows = [json.loads(line) for line in stack.files[1].read_text().splitlines()]
    _feedback(stack, [(r["text"] + " indeed", r["label"]) for r in rows])
    feedback = {"feedback": {"mix_ratio": 0.25, "min_examples": 20}}
    message = spec(stack, data=[{"file": str(stack.files[0])}, feedback])
    job = submit(stack, message, key="first")
    assert job.state == pb.JOB_STATE_QUEUED
    events = watch(stack, job.id)
    final = events[-1].job
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert (final.model.name, final.model.version, final.model.alias) == ("tiny", "1", "champion")
    # Learnt the task (chance is 0.5); the exact figure moves a little between machines.
    assert final.metrics["accuracy"] > 0.7
    states = [
        pb.JobState.Name(e.state_change.state)
        for e in events
        if e.WhichOneof("event") == "state_change"
    ]
    assert states[:2] == ["JOB_STATE_QUEUED", "JOB_STATE_VALIDATING"]
    assert states[-1] == "JOB_STATE_SUCCEEDED"
    assert any(e.WhichOneof("event") == "progress" for e in events)  # epochs reported
    assert Registry(stack.mlflow_uri).alias_version("tiny", "champion") == "1"
    workdir = stack.trainer.home / "trainer" / "jobs" / job.id
    report = json.loads((workdir / "data.json").read_text())
    assert report["feedback_used"] > 0
    assert report["fingerprint"]
    # The same key returns the same job instead of training again.
    assert submit(stack, message, key="first").id == job.id


def test_the_gate_keeps_champion_when_the_candidate_is_not_better_enough(stack: Stack) -> None:
    gate = {"metric": "accuracy", "min_improvement": 0.5, "max_latency_factor": 100}
    message = spec(stack, base_model="models:/tiny@champion", promotion="gate", gate=gate)
    final = watch(stack, submit(stack, message).id)[-1].job
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert not final.gate_passed
    assert "accuracy" in final.gate_reason
    assert Registry(stack.mlflow_uri).alias_version("tiny", "champion") == "1"
    # The version records where it continued from, not the job's local copy of it.
    from mlflow import MlflowClient

    continued = MlflowClient(stack.mlflow_uri).get_model_version("tiny", final.model.version)
    assert continued.tags["loopline.base_model"] == "models:/tiny/1"

    lenient = {"metric": "accuracy", "min_improvement": -1.0, "max_latency_factor": 100}
    message = spec(stack, base_model="models:/tiny@champion", promotion="gate", gate=lenient)
    final = watch(stack, submit(stack, message).id)[-1].job
    assert final.gate_passed, final.gate_reason
    assert Registry(stack.mlflow_uri).alias_version("tiny", "champion") == final.model.version
    assert Registry(stack.mlflow_uri).rollback("tiny") == (final.model.version, "1")


def test_bad_specs_and_missing_tokens_are_refused(stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        submit(stack, pb.JobSpec(name="tiny"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "data" in caught.value.details()  # type: ignore[attr-defined]
    request = pb.SubmitJobRequest(spec=spec(stack))
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.SubmitJob(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.GetJob(pb.GetJobRequest(id="job-nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_cancel_and_restart(stack: Stack) -> None:
    long = spec(stack, epochs=100, hyperparameters={**TINY, "extra": {"patience": "100"}})
    running = submit(stack, long)
    until(
        lambda: (
            stack.stub.GetJob(pb.GetJobRequest(id=running.id), timeout=5).state
            == pb.JOB_STATE_TRAINING
        ),
        "the job to train",
        120,
    )
    cancelled = stack.stub.CancelJob(
        pb.CancelJobRequest(id=running.id, reason="test"), metadata=ADMIN, timeout=30
    )
    assert cancelled.state == pb.JOB_STATE_CANCELLED

    # A trainer killed mid-job: the running job is interrupted, the queued one still runs.
    interrupted = submit(stack, long)
    queued = submit(stack, spec(stack, alias="", promotion="none"))
    until(
        lambda: (
            stack.stub.GetJob(pb.GetJobRequest(id=interrupted.id), timeout=5).state
            == pb.JOB_STATE_TRAINING
        ),
        "the job to train",
        120,
    )
    stack.trainer.stop(signal.SIGKILL)
    stack.trainer.start()
    after = stack.stub.GetJob(pb.GetJobRequest(id=interrupted.id), timeout=5)
    assert after.state == pb.JOB_STATE_INTERRUPTED
    final = watch(stack, queued.id)[-1].job
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert not final.model.alias  # policy none: registered only


def test_loopline_train_wait_follows_the_job_and_exits_with_its_outcome(
    stack: Stack, tmp_path: Path
) -> None:
    from services.cli.main import app
    from services.cli.router_client import EXIT_BY_STATUS

    spec_file = tmp_path / "retrain.yaml"
    spec_file.write_text(
        json.dumps(  # JSON is YAML
            {
                "name": "tiny",
                "data": [{"file": str(stack.files[0])}],
                "validation": str(stack.files[1]),
                "base_model": str(stack.base),
                "epochs": 1,
                "max_length": 32,
                "hyperparameters": TINY,
            }
        )
    )
    args = ["train", "--spec", str(spec_file), "--wait", "--trainer", stack.trainer.address]
    result = CliRunner().invoke(app, args, env={"LOOPLINE_ADMIN_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    assert "succeeded: tiny version" in result.output

    bad = CliRunner().invoke(
        app, [*args, "--token", ""], env={"LOOPLINE_ADMIN_TOKEN": ""}
    )  # the right trainer, no token: refused, and the message says so
    assert bad.exit_code == EXIT_BY_STATUS["UNAUTHENTICATED"], bad.output
    assert "token" in bad.output.lower()
