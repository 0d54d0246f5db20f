"""A real worker process on loopback: the Open Inference Protocol, status codes, records.

The worker runs as `python -m services.inference` configured by LOOPLINE_* variables, exactly as
an operator starts it, with a private Redis; tritonclient (a standard OIP client) and our own
generated stubs talk to it.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis

from loopline.oip import grpc_service_pb2 as pb
from loopline.oip import grpc_service_pb2_grpc as pb_grpc
from loopline.runtime import PackageRunner
from services.inference.convert import encode_bytes_tensor
from tests.fixtures.redis import RedisServer
from tests.fixtures.waiting import free_port, until

TEXTS = ["the film was great overall", "the plot was awful again", "this movie was lovely"]


def _wait_serving(address: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"worker at {address} not SERVING after {timeout}s")


@pytest.fixture(scope="module")
def worker(
    tiny_package: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, object]]:
    """A worker process serving the tiny package; stopped with SIGTERM at the end."""
    home = tmp_path_factory.mktemp("worker")
    port, metrics_port = free_port(), free_port()
    env = dict(
        os.environ,
        LOOPLINE_INFERENCE_MODELS=json.dumps([str(tiny_package)]),
        LOOPLINE_INFERENCE_PORT=str(port),
        LOOPLINE_INFERENCE_METRICS_PORT=str(metrics_port),
        LOOPLINE_INFERENCE_CACHE_DIR=str(home / "cache"),
        LOOPLINE_INFERENCE_SPOOL_PATH=str(home / "spool.jsonl"),
        LOOPLINE_INFERENCE_MAX_TEXT_CHARS="2000",
        LOOPLINE_REDIS_URL=redis_server.url,
        LOOPLINE_MLFLOW_URI=f"sqlite:///{home}/mlflow.db",
        LOOPLINE_LOG_JSON="1",
    )
    log = (home / "worker.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.inference"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    address = f"127.0.0.1:{port}"
    try:
        _wait_serving(address, process)
        yield {
            "address": address,
            "process": process,
            "metrics_port": metrics_port,
            "log": home / "worker.log",
            "redis": redis_server,
        }
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        log.close()


def _stub(address: str) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))


def _request(texts: list[str], model: str = "tiny", **fields: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)  # type: ignore[arg-type]
    request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
    request.raw_input_contents.append(encode_bytes_tensor(t.encode() for t in texts))
    return request


# tritonclient ships its own copy of the `inference` proto package; protobuf refuses two
# definitions of one symbol in a process, so the standard client runs in its own process, as it
# would in a user's service. The scripts close their client: left to `__del__` at interpreter
# exit, tritonclient's channel close deadlocked in 2-12% of runs after a stream (grpcio 1.85,
# with gRPC's default I/O path and with Loopline's GRPC_EXPERIMENTS alike; none in 160 runs
# that called close()).
TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton

client = triton.InferenceServerClient(sys.argv[1])
texts = json.loads(sys.argv[2])
text = triton.InferInput("text", [len(texts)], "BYTES")
text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
result = client.infer("tiny", [text], parameters={"experiment": "exp-1", "variant": "b"})
print(json.dumps({
    "live": client.is_server_live(), "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready("tiny"),
    "metadata": client.get_model_metadata("tiny", as_json=True),
    "probabilities": result.as_numpy("probabilities").tolist(),
    "labels": [x.decode() for x in result.as_numpy("label")],
}))
client.close()
"""


def _triton(script: str, worker: dict[str, object]) -> Any:
    """Run a tritonclient script against the worker in its own process; its JSON output."""
    done = subprocess.run(
        [sys.executable, "-c", script, str(worker["address"]), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(done.stdout)


def test_tritonclient_metadata_and_infer(worker: dict[str, object], tiny_package: Path) -> None:
    answer = _triton(TRITON_CLIENT, worker)
    assert (answer["live"], answer["ready"], answer["model_ready"]) == (True, True, True)
    metadata = answer["metadata"]
    assert metadata["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": ["-1"]}
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "label", "truncated"]

    probabilities = np.asarray(answer["probabilities"])
    assert probabilities.shape == (3, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    runner = PackageRunner(tiny_package, "int8")
    assert answer["labels"] == runner.labels(TEXTS)
    expected, _ = runner.predict(TEXTS)
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)


def test_config_names_the_label_order(worker: dict[str, object], tiny_package: Path) -> None:
    config = _stub(str(worker["address"])).ModelConfig(pb.ModelConfigRequest(name="tiny"))
    assert json.loads(config.config.parameters["labels"].string_value) == ["negative", "positive"]


@pytest.mark.parametrize(
    ("mutate", "code", "phrase"),
    [
        (
            lambda r: r.raw_input_contents.__setitem__(0, encode_bytes_tensor([b"  "])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "element 0 is empty",
        ),
        (
            lambda r: setattr(r.inputs[0], "datatype", "FP32"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "datatype BYTES",
        ),
        (
            lambda r: setattr(r.inputs[0], "name", "words"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "missing input 'text'",
        ),
        (
            lambda r: r.inputs[0].shape.__setitem__(0, 5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "carries 1",
        ),
        (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
        (lambda r: setattr(r, "model_version", "99"), grpc.StatusCode.NOT_FOUND, "tiny/99"),
        (
            lambda r: r.raw_input_contents.__setitem__(0, encode_bytes_tensor([b"x" * 2001])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "limit is 2000",
        ),
        (
            lambda r: r.raw_input_contents.__setitem__(0, encode_bytes_tensor([b"\xff\xfe"])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not valid UTF-8",
        ),
    ],
)
def test_bad_requests_get_clear_status_codes(
    worker: dict[str, object], mutate: object, code: grpc.StatusCode, phrase: str
) -> None:
    request = _request(["fine"])
    mutate(request)  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as caught:
        _stub(str(worker["address"])).ModelInfer(request, timeout=10)
    assert caught.value.code() == code
    assert phrase in caught.value.details()


def test_long_text_is_truncated_and_says_so(worker: dict[str, object]) -> None:
    long_text = " ".join(["the film was great"] * 40)
    answer = _stub(str(worker["address"])).ModelInfer(_request([long_text, "short"]), timeout=10)
    assert answer.parameters["truncated"].bool_param is True
    index = [o.name for o in answer.outputs].index("truncated")
    assert list(answer.raw_output_contents[index]) == [1, 0]


def test_records_reach_the_redis_stream(worker: dict[str, object]) -> None:
    request = _request(["this movie was lovely"], id="req-42")
    request.parameters["experiment"].string_param = "exp-7"
    request.parameters["user_bucket"].string_param = "17"
    _stub(str(worker["address"])).ModelInfer(request, timeout=10)
    server = worker["redis"]
    assert isinstance(server, RedisServer)
    client = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 10
    found: dict[bytes, bytes] = {}
    while time.monotonic() < deadline and not found:
        for _, fields in client.xrange("loopline:inference"):
            if fields.get(b"request_id") == b"req-42":
                found = fields
        time.sleep(0.1)
    assert found, "record not written"
    assert found[b"experiment"] == b"exp-7"
    assert found[b"user_bucket"] == b"17"
    assert found[b"model"] == b"tiny"
    assert len(json.loads(found[b"sketch"])) == 16


def test_an_accepted_request_that_fails_leaves_a_failure_record_per_text(
    worker: dict[str, object],
) -> None:
    texts = ["fine"] * 2049  # one more than the queue holds (LOOPLINE_INFERENCE_MAX_QUEUE_SIZE)
    request = _request(texts, id="too-many")
    request.parameters["variant"].string_param = "control"
    with pytest.raises(grpc.RpcError) as caught:
        _stub(str(worker["address"])).ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    server = worker["redis"]
    assert isinstance(server, RedisServer)
    client = redis.Redis.from_url(server.url)

    def failures() -> dict[bytes, dict[bytes, bytes]]:
        return {
            fields[b"request_id"]: fields
            for _, fields in client.xrange("loopline:inference")
            if fields[b"request_id"].startswith(b"too-many:")
        }

    until(lambda: len(failures()) == len(texts), "a failure record per text", timeout=20)
    found = failures()
    first = found[b"too-many:0"]
    assert (first[b"error"], first[b"model"], first[b"variant"]) == (
        b"overloaded",
        b"tiny",
        b"control",
    )
    assert b"label" not in first
    assert b"too-many:2048" in found


def test_a_router_batch_keeps_each_request_id_bucket_language_and_shadow_tag(
    worker: dict[str, object],
) -> None:
    request = _request(["a fine film", "a dull film"], id="batch-1")
    request.parameters["request_ids"].string_param = json.dumps(["item-a", "item-b"])
    request.parameters["user_bucket"].string_param = "5"
    request.parameters["user_buckets"].string_param = json.dumps(["5", "9"])
    request.parameters["language"].string_param = "en"
    request.parameters["shadow"].string_param = "1"
    _stub(str(worker["address"])).ModelInfer(request, timeout=10)
    server = worker["redis"]
    assert isinstance(server, RedisServer)
    client = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 10
    found: dict[bytes, dict[bytes, bytes]] = {}
    while time.monotonic() < deadline and len(found) < 2:
        for _, fields in client.xrange("loopline:inference"):
            if fields.get(b"request_id") in (b"item-a", b"item-b"):
                found[fields[b"request_id"]] = fields
        time.sleep(0.1)
    assert set(found) == {b"item-a", b"item-b"}
    assert all(f[b"language"] == b"en" and f[b"shadow"] == b"1" for f in found.values())
    assert (found[b"item-a"][b"user_bucket"], found[b"item-b"][b"user_bucket"]) == (b"5", b"9")


def test_metrics_endpoint_exposes_batching(worker: dict[str, object]) -> None:
    import urllib.request

    _stub(str(worker["address"])).ModelInfer(_request(TEXTS), timeout=10)
    body = urllib.request.urlopen(f"http://127.0.0.1:{worker['metrics_port']}/metrics").read()
    text = body.decode()
    assert "loopline_inference_batch_size_count" in text
    assert "loopline_inference_padding_waste_bucket" in text
    # Arrival-to-answer time, by model: every answered request is counted.
    answered = re.findall(
        r'^loopline_inference_request_seconds_count\{model="[^"]+"\} (\S+)$', text, re.M
    )
    assert answered
    assert float(answered[0]) >= 1


def test_worker_process_never_imports_torch_or_transformers(tiny_package: Path) -> None:
    script = (
        "import sys, asyncio\n"
        "from services.inference.main import Worker\n"
        "from services.inference.settings import InferenceSettings\n"
        "from services.inference.models import ModelSource\n"
        f"s = InferenceSettings(models=[{str(tiny_package)!r}], records=False)\n"
        "w = Worker(s)\n"
        "asyncio.run(w.repository.add(ModelSource.parse(s.models[0])))\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _malformed(rng: random.Random) -> pb.ModelInferRequest:
    """A ModelInfer request with a random mix of wrong names, types, shapes, contents and
    parameters (some of them valid)."""
    texts = [
        rng.choice([b"good film", b"", b"\xff\xfe", b" ", "\u00e9".encode() * 5, b"x" * 2001])
        for _ in range(rng.randrange(0, 4))
    ]
    request = pb.ModelInferRequest(model_name=rng.choice(["tiny", "tiny", "", "nope"]))
    text = request.inputs.add(
        name=rng.choice(["text", "text", "TEXT", ""]),
        datatype=rng.choice(["BYTES", "BYTES", "FP32", ""]),
    )
    text.shape.extend(rng.choice([[len(texts)], [], [-1], [1, len(texts)], [len(texts) + 1]]))
    contents = rng.randrange(4)
    if contents == 0:
        request.raw_input_contents.append(encode_bytes_tensor(texts))
    elif contents == 1:
        text.contents.bytes_contents.extend(texts)
    elif contents == 2:
        request.raw_input_contents.append(bytes(rng.randrange(256) for _ in range(20)))
    else:
        request.raw_input_contents.append(b"\xff\xff\xff\x7fabc")  # a length past the end
    if rng.random() < 0.2:
        request.inputs.add(name="other", datatype="BYTES", shape=[1])
    if rng.random() < 0.3:
        request.outputs.add(name=rng.choice(["label", "probabilities", "nope", ""]))
    if rng.random() < 0.3:
        request.model_version = rng.choice(["1", "999", "abc", "-1"])
    if rng.random() < 0.3:
        key = rng.choice(["request_id", "request_ids", "user_buckets", "experiment", "shadow"])
        value = request.parameters[key]
        kind = rng.randrange(3)
        if kind == 0:
            value.string_param = rng.choice(["", "[1,2]", '["a"]', "not json", "x" * 5000])
        elif kind == 1:
            value.int64_param = rng.choice([0, -5, 2**62])
        else:
            value.bool_param = True
    return request


def test_malformed_requests_are_refused_with_the_callers_codes_never_internal(
    worker: dict[str, object],
) -> None:
    """Seeded random requests, most of them wrong: every answer is OK, INVALID_ARGUMENT or
    NOT_FOUND (never INTERNAL or UNKNOWN), and the worker serves normally afterwards."""
    stub = _stub(str(worker["address"]))
    rng = random.Random(20261129)
    codes: Counter[str] = Counter()
    for _ in range(300):
        try:
            stub.ModelInfer(_malformed(rng), timeout=10)
            codes["OK"] += 1
        except grpc.RpcError as err:
            codes[err.code().name] += 1  # type: ignore[attr-defined]
    assert set(codes) <= {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}, codes
    assert codes["INVALID_ARGUMENT"] > 100  # the generator does produce wrong requests
    garbage = grpc.insecure_channel(str(worker["address"])).unary_unary(
        "/inference.GRPCInferenceService/ModelInfer"
    )
    with pytest.raises(grpc.RpcError) as caught:
        garbage(b"\x0a\x02\xff\xfe", timeout=10)  # model_name holding invalid UTF-8
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelInferRequest" in caught.value.details()
    answer = stub.ModelInfer(_request(["a fine film"]), timeout=10)
    assert answer.model_name == "tiny"


def _records_by_id(server: RedisServer, prefix: str) -> dict[str, dict[bytes, bytes]]:
    client = redis.Redis.from_url(server.url)
    return {
        fields[b"request_id"].decode(): fields
        for _, fields in client.xrange("loopline:inference")
        if fields[b"request_id"].startswith(prefix.encode())
    }


def _probabilities(response: pb.ModelInferResponse) -> np.ndarray:
    index = [o.name for o in response.outputs].index("probabilities")
    return np.frombuffer(response.raw_output_contents[index], dtype="<f4")


def test_a_stream_runs_its_requests_together_and_answers_each_by_id(
    worker: dict[str, object], tiny_package: Path
) -> None:
    """ModelStreamInfer: the requests of one stream are batched together like separate calls,
    each answer carries its request's id, and a bad request is answered in-stream."""
    texts = [f"film {i} was {'great' if i % 2 else 'awful'} " * (1 + i % 5) for i in range(64)]
    requests = [_request([text], id=f"stream-{i}") for i, text in enumerate(texts)]
    requests.insert(10, _request([""], id="stream-bad"))
    answers = list(_stub(str(worker["address"])).ModelStreamInfer(iter(requests), timeout=30))

    assert len(answers) == len(requests)
    errors = {a.infer_response.id: a.error_message for a in answers if a.error_message}
    assert list(errors) == ["stream-bad"]
    assert "element 0 is empty" in errors["stream-bad"]
    answered = {a.infer_response.id: a.infer_response for a in answers if not a.error_message}
    assert set(answered) == {f"stream-{i}" for i in range(len(texts))}
    expected, _ = PackageRunner(tiny_package, "int8").predict(texts)
    for i in range(len(texts)):
        np.testing.assert_allclose(_probabilities(answered[f"stream-{i}"]), expected[i], atol=1e-4)

    server = worker["redis"]
    assert isinstance(server, RedisServer)
    until(lambda: len(_records_by_id(server, "stream-")) == len(texts), "a record per text")
    sizes = [int(f[b"batch_size"]) for f in _records_by_id(server, "stream-").values()]
    # Read one at a time, every batch would hold one text.
    assert max(sizes) > 1, sizes


def test_a_stream_answers_what_it_read_before_a_message_that_does_not_parse(
    worker: dict[str, object],
) -> None:
    stream = grpc.insecure_channel(str(worker["address"])).stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    good = [_request([text], id=f"before-{i}").SerializeToString() for i, text in enumerate(TEXTS)]
    answers: list[pb.ModelStreamInferResponse] = []
    responses = stream(iter([*good, b"\x0a\x02\xff\xfe"]), timeout=30)

    def read_all() -> None:
        answers.extend(responses)

    with pytest.raises(grpc.RpcError) as caught:
        read_all()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelInferRequest" in caught.value.details()
    assert sorted(a.infer_response.id for a in answers) == ["before-0", "before-1", "before-2"]
    assert not any(a.error_message for a in answers)


TRITON_STREAM_CLIENT = """
import json, queue, sys
import numpy as np
import tritonclient.grpc as triton

client = triton.InferenceServerClient(sys.argv[1])
texts = json.loads(sys.argv[2])
results = queue.Queue()
client.start_stream(callback=lambda result, error: results.put((result, error)))
for i, t in enumerate(texts):
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([t.encode()], dtype=np.object_))
    client.async_stream_infer("tiny", [text], request_id=f"triton-{i}")
answers = {}
for _ in texts:
    result, error = results.get(timeout=30)
    assert error is None, error
    response = result.get_response()
    answers[response.id] = result.as_numpy("label")[0].decode()
client.stop_stream()
client.close()
print(json.dumps(answers))
"""


def test_tritonclient_streaming_works_unchanged(
    worker: dict[str, object], tiny_package: Path
) -> None:
    labels = PackageRunner(tiny_package, "int8").labels(TEXTS)
    expected = {f"triton-{i}": label for i, label in enumerate(labels)}
    assert _triton(TRITON_STREAM_CLIENT, worker) == expected


def test_sigterm_drains_and_exits_cleanly(worker: dict[str, object]) -> None:
    process = worker["process"]
    assert isinstance(process, subprocess.Popen)
    # Last in the module: it stops the shared worker.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_unloadable_source_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        LOOPLINE_INFERENCE_MODELS=json.dumps(["models:/nope@champion"]),
        LOOPLINE_INFERENCE_PORT="0",
        LOOPLINE_INFERENCE_RECORDS="0",
        LOOPLINE_MLFLOW_URI=f"sqlite:///{tmp_path}/mlflow.db",
        LOOPLINE_INFERENCE_CACHE_DIR=str(tmp_path / "cache"),
    )
    done = subprocess.run(
        [sys.executable, "-m", "services.inference"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "model alias 'nope@champion' not found" in done.stderr
    assert "Traceback" not in done.stderr
