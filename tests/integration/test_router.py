"""The router end to end, with real processes: a router, two inference workers, a private Redis
and a throwaway MLflow store holding `tiny` (versions 1 and 2) and `tiny-pt` (version 1).

Workers follow `models:/tiny@champion` and `models:/tiny-pt@champion`, announce themselves by
heartbeat, and write inference records to the Redis stream; the router finds them through Redis
and resolves experiment references in MLflow. The last test kills one worker under load.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from loopline.auth import bearer_metadata
from loopline.oip import grpc_service_pb2 as oip
from loopline.oip import grpc_service_pb2_grpc as oip_grpc
from loopline.registry import Registry
from loopline.v1 import common_pb2 as common
from loopline.v1 import router_pb2 as pb
from loopline.v1 import router_pb2_grpc as pb_grpc
from tests.fixtures.mlflow_store import clone_store
from tests.fixtures.packages import register_package
from tests.fixtures.redis import RedisServer
from tests.fixtures.waiting import free_port, until

TOKEN = "router-test-token"
ADMIN = bearer_metadata(TOKEN)
PORTUGUESE = "O filme é maravilhoso, os atores são ótimos e a história é emocionante."


@dataclass
class Process:
    address: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _spawn(module: str, env: dict[str, str], home: Path, port: int) -> Process:
    home.mkdir(parents=True, exist_ok=True)
    log = home / f"{module.rsplit('.', 1)[-1]}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", module], env={**os.environ, **env}, stdout=out, stderr=out
        )
    return Process(f"127.0.0.1:{port}", process, log)


@dataclass
class Stack:
    router: Process
    workers: list[Process]
    redis_url: str
    mlflow_uri: str
    stub: pb_grpc.RouterStub
    metrics_url: str


def _worker(home: Path, redis_url: str, mlflow_uri: str) -> Process:
    port = free_port()
    env = {
        "LOOPLINE_INFERENCE_MODELS": json.dumps(
            ["models:/tiny@champion", "models:/tiny-pt@champion"]
        ),
        "LOOPLINE_INFERENCE_PORT": str(port),
        "LOOPLINE_INFERENCE_CACHE_DIR": str(home / "cache"),
        "LOOPLINE_INFERENCE_SPOOL_PATH": str(home / "spool.jsonl"),
        "LOOPLINE_INFERENCE_HEARTBEAT_SECONDS": "0.2",
        "LOOPLINE_INFERENCE_ALIAS_POLL_SECONDS": "0.5",
        "LOOPLINE_INFERENCE_MEMORY_TRIM_SECONDS": "0",
        "LOOPLINE_INFERENCE_INTRA_OP_THREADS": "1",
        "LOOPLINE_ADMIN_TOKEN": TOKEN,
        "LOOPLINE_REDIS_URL": redis_url,
        "LOOPLINE_MLFLOW_URI": mlflow_uri,
        "LOOPLINE_LOG_JSON": "1",
    }
    return _spawn("services.inference", env, home, port)


def _router(home: Path, redis_url: str, mlflow_uri: str, metrics_port: int) -> Process:
    port = free_port()
    env = {
        "LOOPLINE_ROUTER_PORT": str(port),
        "LOOPLINE_ROUTER_METRICS_PORT": str(metrics_port),
        "LOOPLINE_ROUTER_DEFAULT_MODEL": "tiny",
        "LOOPLINE_ROUTER_LANGUAGE_ROUTES": json.dumps({"tiny": {"pt": "tiny-pt"}}),
        "LOOPLINE_ROUTER_MAX_BATCH_TEXTS": "8",
        "LOOPLINE_ROUTER_PROBE_SECONDS": "0.5",
        "LOOPLINE_ROUTER_KEEP_SERVED_SECONDS": "0.5",
        "LOOPLINE_ADMIN_TOKEN": TOKEN,
        "LOOPLINE_REDIS_URL": redis_url,
        "LOOPLINE_MLFLOW_URI": mlflow_uri,
        "LOOPLINE_LOG_JSON": "1",
    }
    return _spawn("services.router", env, home, port)


@pytest.fixture(scope="module")
def stack(
    tiny_package: Path,
    redis_server: RedisServer,
    mlflow_template: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("router-stack")
    store = clone_store(mlflow_template, home / "mlflow")
    register_package(store.tracking_uri, tiny_package, "tiny", alias="champion")
    register_package(store.tracking_uri, tiny_package, "tiny")
    register_package(store.tracking_uri, tiny_package, "tiny-pt", alias="champion")
    redis_server.start()
    redis_server.flushall()
    workers = [_worker(home / f"w{n}", redis_server.url, store.tracking_uri) for n in range(2)]
    metrics_port = free_port()
    router = _router(home / "router", redis_server.url, store.tracking_uri, metrics_port)
    channel = grpc.insecure_channel(router.address)
    stub = pb_grpc.RouterStub(channel)
    try:
        until(lambda: _answers(stub), "the router to answer through a worker", timeout=120)
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        yield Stack(router, workers, redis_server.url, store.tracking_uri, stub, metrics)
    except BaseException:
        for process in (router, *workers):
            print(process.log, process.tail())
        raise
    finally:
        channel.close()
        for process in (router, *workers):
            process.stop()


def _answers(stub: pb_grpc.RouterStub) -> bool:
    with contextlib.suppress(grpc.RpcError):
        stub.Classify(pb.ClassifyRequest(text="a fine film"), timeout=5)
        return True
    return False


def classify(stack: Stack, text: str, **fields: object) -> pb.ClassifyResponse:
    request = pb.ClassifyRequest(text=text, **fields)  # type: ignore[arg-type]
    return stack.stub.Classify(request, timeout=10)


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    return error.code(), error.details()  # type: ignore[attr-defined]


# ----- classification -----


def test_classify_answers_with_the_champion_and_its_provenance(stack: Stack) -> None:
    answer = classify(stack, "the film was a delight", user_id="u1")
    scores = {s.label: s.score for s in answer.probabilities}
    assert set(scores) == {"negative", "positive"}
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert answer.label == max(scores, key=lambda k: scores[k])
    assert (answer.model.name, answer.model.version, answer.model.alias) == (
        "tiny",
        "1",
        "champion",
    )
    assert answer.request_id
    assert not answer.experiment_id
    assert answer.language == "en"
    assert answer.timings.total.ToNanoseconds() > 0


def test_bad_input_gets_invalid_argument_naming_it(stack: Stack) -> None:
    code, message = code_of(lambda: classify(stack, "   "))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in message
    ref = common.ModelRef(name="tiny", version="1", alias="champion")
    code, message = code_of(lambda: classify(stack, "fine", model=ref))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not both" in message
    code, message = code_of(lambda: classify(stack, "x" * 20_001))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "20000" in message
    unknown = common.ModelRef(name="no-such-model")
    code, message = code_of(lambda: classify(stack, "fine", model=unknown))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "no-such-model" in message


def test_portuguese_text_is_routed_to_the_portuguese_model(stack: Stack) -> None:
    answer = classify(stack, PORTUGUESE)
    assert (answer.model.name, answer.language) == ("tiny-pt", "pt")
    pinned = classify(stack, PORTUGUESE, model=common.ModelRef(name="tiny", alias="champion"))
    assert (pinned.model.name, pinned.language) == ("tiny", "")


def test_batch_answers_in_order_and_keeps_request_ids(stack: Stack) -> None:
    items = [
        pb.ClassifyRequest(text=text, request_id=f"b-{n}")
        for n, text in enumerate(["great", "awful", PORTUGUESE])
    ]
    answer = stack.stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=items), timeout=10)
    assert [r.request_id for r in answer.results] == ["b-0", "b-1", "b-2"]
    assert [r.model.name for r in answer.results] == ["tiny", "tiny", "tiny-pt"]
    too_many = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(text="ok")] * 9)
    code, message = code_of(lambda: stack.stub.ClassifyBatch(too_many, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit is 8" in message


def _merged_calls(stack: Stack) -> float:
    """Texts sent to workers beyond one per call: above 0 once single calls were merged."""
    text = urllib.request.urlopen(stack.metrics_url, timeout=5).read().decode()
    values = {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in text.splitlines() if line[0] != "#")
    }
    texts = values.get('loopline_router_upstream_texts_sum{model="tiny"}', 0.0)
    return texts - values.get('loopline_router_upstream_texts_count{model="tiny"}', 0.0)


def test_concurrent_calls_merged_under_load_keep_their_own_answers(stack: Stack) -> None:
    texts = [f"review {n}: " + ("good " if n % 2 else "dull ") * (1 + n % 7) for n in range(48)]
    alone = {text: classify(stack, text) for text in texts}
    client = redis.Redis.from_url(stack.redis_url)
    merged_before = _merged_calls(stack)
    for burst in range(5):  # a burst sent at once outruns 2 calls per worker; retried if not
        ids = [f"burst-{burst}-{n}" for n in range(len(texts))]
        futures = [
            stack.stub.Classify.future(pb.ClassifyRequest(text=text, request_id=rid), timeout=30)
            for text, rid in zip(texts, ids, strict=True)
        ]
        for text, rid, future in zip(texts, ids, futures, strict=True):
            answer = future.result()
            assert (answer.request_id, answer.label) == (rid, alone[text].label)
            scores = {s.label: s.score for s in answer.probabilities}
            for expected in alone[text].probabilities:
                assert scores[expected.label] == pytest.approx(expected.score, abs=0.01)
        if _merged_calls(stack) > merged_before:
            break
    assert _merged_calls(stack) > merged_before, "no burst was ever merged"

    def one_record_each() -> bool:
        seen = Counter(
            fields[b"request_id"].decode()
            for _, fields in client.xrange("loopline:inference")
            if fields[b"request_id"].startswith(f"burst-{burst}-".encode())
        )
        return seen == Counter(ids)

    until(one_record_each, "one record per merged caller", timeout=10)


def test_stream_answers_every_item_and_a_bad_one_does_not_end_it(stack: Stack) -> None:
    texts = [f"review number {n} was good" for n in range(30)]
    texts[7] = ""
    requests = [pb.ClassifyRequest(text=t, request_id=f"s-{n}") for n, t in enumerate(texts)]
    # A version and an alias together: refused while the item is read, not by the router.
    requests[12].model.CopyFrom(common.ModelRef(name="tiny", version="1", alias="champion"))
    answers = {a.request_id: a for a in stack.stub.ClassifyStream(iter(requests), timeout=30)}
    assert set(answers) == {f"s-{n}" for n in range(30)}
    for bad in ("s-7", "s-12"):
        assert answers[bad].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    ok = [a for key, a in answers.items() if key not in ("s-7", "s-12")]
    assert all(a.status.code == 0 and a.result.label for a in ok)


def test_feedback_is_checked_and_appended_to_the_stream(stack: Stack) -> None:
    answer = classify(stack, "what a film")
    reply = stack.stub.Feedback(
        pb.FeedbackRequest(request_id=answer.request_id, label="positive", source="test"),
        timeout=10,
    )
    client = redis.Redis.from_url(stack.redis_url)
    entries = client.xrange("loopline:feedback", min=reply.feedback_id, max=reply.feedback_id)
    assert entries[0][1][b"request_id"] == answer.request_id.encode()
    assert entries[0][1][b"label"] == b"positive"
    code, message = code_of(
        lambda: stack.stub.Feedback(
            pb.FeedbackRequest(request_id=answer.request_id, label="meh"), timeout=10
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "negative, positive" in message
    past_9999 = pb.FeedbackRequest(request_id=answer.request_id, label="positive")
    past_9999.time.seconds = 2**40
    code, message = code_of(lambda: stack.stub.Feedback(past_9999, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("time: ")


# ----- experiments -----


def _experiment(name: str, weights: tuple[float, float], **fields: object) -> common.Experiment:
    return common.Experiment(
        name=name,
        model="tiny",
        variants=[
            common.Variant(
                name="control", model=common.ModelRef(name="tiny", version="1"), weight=weights[0]
            ),
            common.Variant(
                name="candidate",
                model=common.ModelRef(name="tiny", version="2"),
                weight=weights[1],
            ),
        ],
        **fields,  # type: ignore[arg-type]
    )


def _create(stack: Stack, experiment: common.Experiment) -> common.Experiment:
    request = pb.CreateExperimentRequest(experiment=experiment)
    return stack.stub.CreateExperiment(request, metadata=ADMIN, timeout=120)


def test_admin_rpcs_need_the_token(stack: Stack) -> None:
    request = pb.CreateExperimentRequest(experiment=_experiment("nope", (50, 50)))
    code, _ = code_of(lambda: stack.stub.CreateExperiment(request, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    wrong = bearer_metadata("not-the-token")
    code, _ = code_of(lambda: stack.stub.CreateExperiment(request, metadata=wrong, timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_experiment_rules_give_clear_codes(stack: Stack) -> None:
    bad_sum = _experiment("bad-sum", (50, 40))
    code, message = code_of(lambda: _create(stack, bad_sum))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "100" in message
    missing = _experiment("missing", (50, 50))
    missing.variants[1].model.version = "99"
    code, message = code_of(lambda: _create(stack, missing))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "tiny/99" in message
    past_9999 = _experiment("past-9999", (50, 50))
    past_9999.start_time.seconds = 2**40
    code, message = code_of(lambda: _create(stack, past_9999))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("experiment.start_time: ")
    update = pb.UpdateExperimentRequest(id="any")
    update.end_time.seconds = 2**40
    code, message = code_of(lambda: stack.stub.UpdateExperiment(update, metadata=ADMIN, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("end_time: ")


def test_a_running_experiment_splits_users_stickily_and_follows_weight_changes(
    stack: Stack,
) -> None:
    running = common.EXPERIMENT_STATUS_RUNNING
    created = _create(stack, _experiment("split", (50, 50), status=running))
    assert created.status == running
    assert created.id
    # Version 2 was served by no worker: the router had the workers load it before starting.
    code, message = code_of(lambda: _create(stack, _experiment("second", (50, 50), status=running)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert created.name in message

    def variants_of(users: range) -> dict[str, str]:
        out = {}
        for n in users:
            answer = classify(stack, "a good film", user_id=f"user-{n}")
            assert answer.experiment_id == created.id
            expected = "1" if answer.variant == "control" else "2"
            assert answer.model.version == expected
            out[f"user-{n}"] = answer.variant
        return out

    until(lambda: classify(stack, "ok", user_id="x").experiment_id == created.id, "experiment")
    first = variants_of(range(40))
    assert set(first.values()) == {"control", "candidate"}
    assert variants_of(range(40)) == first  # sticky

    # Every worker drops version 2, as if a rollout had replaced them: the router loads it again.
    for worker in stack.workers:
        with grpc.insecure_channel(worker.address) as channel:
            unload = oip.RepositoryModelUnloadRequest(model_name="tiny")
            unload.parameters["version"].string_param = "2"
            oip_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                unload, metadata=ADMIN, timeout=30
            )
    candidate = next(user for user, variant in first.items() if variant == "candidate")

    def candidate_served() -> bool:
        with contextlib.suppress(grpc.RpcError):
            return classify(stack, "a good film", user_id=candidate).model.version == "2"
        return False

    until(candidate_served, "version 2 loaded again by the router", timeout=60)
    assert variants_of(range(40)) == first

    update = pb.UpdateExperimentRequest(id=created.id, weights={"control": 100, "candidate": 0})
    stack.stub.UpdateExperiment(update, metadata=ADMIN, timeout=10)
    # The change reaches the router through its cache poll; how fast is for `make bench`.
    until(lambda: set(variants_of(range(10)).values()) == {"control"}, "weights", timeout=30)

    stop = pb.StopExperimentRequest(id=created.id, winner="candidate", reason="test")
    stopped = stack.stub.StopExperiment(stop, metadata=ADMIN, timeout=30)
    assert stopped.experiment.status == common.EXPERIMENT_STATUS_STOPPED
    assert (stopped.promoted.version, stopped.promoted.alias) == ("2", "champion")
    assert Registry(stack.mlflow_uri).alias_version("tiny", "champion") == "2"
    Registry(stack.mlflow_uri).rollback("tiny")  # leave champion where the other tests expect it
    until(lambda: classify(stack, "fine").model.version == "1", "champion back at 1")


def test_a_shadow_variant_is_recorded_and_never_answers(stack: Stack) -> None:
    shadowed = _experiment("shadowed", (100, 0), status=common.EXPERIMENT_STATUS_RUNNING)
    del shadowed.variants[1]
    shadowed.variants[0].weight = 100
    shadowed.shadows.add(name="mirror", model=common.ModelRef(name="tiny", version="2"))
    created = _create(stack, shadowed)
    try:
        until(lambda: classify(stack, "ok").experiment_id == created.id, "experiment")
        answer = classify(stack, "a mirrored review", request_id="mirror-1")
        assert (answer.variant, answer.model.version) == ("control", "1")
        client = redis.Redis.from_url(stack.redis_url)

        def shadow_record() -> bool:
            for _, fields in client.xrange("loopline:inference"):
                if fields[b"request_id"] == b"mirror-1" and fields[b"shadow"] == b"1":
                    return (fields[b"version"], fields[b"variant"]) == (b"2", b"mirror")
            return False

        until(shadow_record, "the shadow's record", timeout=10)
    finally:
        stop = pb.StopExperimentRequest(id=created.id)
        stack.stub.StopExperiment(stop, metadata=ADMIN, timeout=30)


def test_experiments_are_listed_newest_first(stack: Stack) -> None:
    listed = stack.stub.ListExperiments(pb.ListExperimentsRequest(model="tiny"), timeout=10)
    names = [e.name for e in listed.experiments]
    assert names[:2] == ["shadowed", "split"]


# ----- resilience (last: it kills a worker) -----


def test_killing_one_of_two_workers_under_load_fails_no_request(stack: Stack) -> None:
    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                classify(stack, "a steady stream of reviews")
                outcomes["ok"] += 1
            except grpc.RpcError as err:
                outcomes[f"{err.code().name}: {err.details()}"] += 1  # type: ignore[attr-defined]

    # 12 callers for 2 workers x 2 calls each: past the limit, so calls are also merged, and a
    # merged call caught on the killed worker must be retried whole on the other.
    clients = [threading.Thread(target=load) for _ in range(12)]
    merged_before = _merged_calls(stack)
    for client in clients:
        client.start()
    try:
        until(lambda: outcomes["ok"] >= 40, "load")
        stack.workers[1].process.send_signal(signal.SIGKILL)
        killed_at = outcomes["ok"]
        until(lambda: outcomes["ok"] >= killed_at + 150, "load after the kill")
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert set(outcomes) == {"ok"}, outcomes
    assert _merged_calls(stack) > merged_before


def test_sigterm_drains_and_exits_zero(stack: Stack) -> None:
    assert stack.router.stop() == 0
