"""The balancer against real gRPC servers on loopback.

Two kinds of upstream: a minimal OIP servicer that fails on demand (retries, client errors,
deadlines, discovery of servers that are not ours), and real inference worker processes
(`python -m services.inference` on the tiny package) found through their heartbeats in the test
Redis: one of two killed with SIGKILL under load, StaticDiscovery, and loading a package through
the repository extension.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest

from loopline.errors import DeadlineExceeded, FailedPrecondition, InvalidInput, NotFound, NotReady
from loopline.oip import grpc_service_pb2 as pb
from loopline.oip import grpc_service_pb2_grpc as pb_grpc
from loopline.package import read_manifest, write_manifest
from loopline.redis import connect
from services.router import oip
from services.router.balancer import Balancer
from services.router.discovery import HeartbeatDiscovery, StaticDiscovery
from services.router.domain import ModelRef
from tests.fixtures.waiting import free_port

if TYPE_CHECKING:
    from tests.fixtures.redis import RedisServer

TOKEN = "test-admin-token"
TINY = ModelRef("tiny", version="1")
FAKE = ModelRef("fake", version="1")
TEXTS = ["the film was great overall", "the plot was awful again", "this movie was lovely"]


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


# ----- a minimal OIP server that fails on demand -----


@dataclass
class Script:
    """What the fake servers do, shared by all of them: the first calls take `failures`."""

    failures: list[grpc.StatusCode] = field(default_factory=list)
    delay: float = 0.0


class FakeOip(pb_grpc.GRPCInferenceServiceServicer):
    """One model `fake` version 1 with labels neg/pos; ModelInfer follows the shared script."""

    def __init__(self, script: Script, name: str, reason: str = "", index: bool = True) -> None:
        self.script = script
        self.name = name
        self.reason = reason
        self.index = index
        self.calls = 0
        self.time_remaining: list[float | None] = []

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:  # noqa: N802
        return pb.ServerMetadataResponse(name=self.name, version="0")

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        return pb.ModelReadyResponse(ready=(request.name, request.version) == ("fake", "1"))

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:  # noqa: N802
        if not self.index:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no repository extension")
        entry = pb.RepositoryIndexResponse.ModelIndex(
            name="fake", version="1", state="READY", reason=self.reason
        )
        return pb.RepositoryIndexResponse(models=[entry])

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:  # noqa: N802
        response = pb.ModelConfigResponse()
        response.config.parameters["labels"].string_value = '["neg", "pos"]'
        return response

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        self.calls += 1
        self.time_remaining.append(context.time_remaining())
        if self.script.failures:
            code = self.script.failures.pop(0)
            await context.abort(code, f"{self.name} says {code.name}")
        await asyncio.sleep(self.script.delay)
        count = request.inputs[0].shape[0]
        response = pb.ModelInferResponse(model_name="fake", model_version="1")
        response.outputs.add(name="probabilities", datatype="FP32", shape=[count, 2])
        response.raw_output_contents.append(
            np.tile(np.asarray([0.9, 0.1], "<f4"), (count, 1)).tobytes()
        )
        response.outputs.add(name="label", datatype="BYTES", shape=[count])
        response.raw_output_contents.append(oip.encode_bytes([b"neg"] * count))
        return response


@contextlib.asynccontextmanager
async def fake_servers(servicers: list[FakeOip]) -> AsyncIterator[dict[str, FakeOip]]:
    """Each servicer on its own real server on 127.0.0.1; yields address -> servicer."""
    servers, by_address = [], {}
    for servicer in servicers:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        by_address[f"127.0.0.1:{port}"] = servicer
    try:
        yield by_address
    finally:
        await asyncio.gather(*(server.stop(grace=None) for server in servers))


@contextlib.asynccontextmanager
async def static_balancer(
    addresses: list[str], events: list[tuple[str, str]] | None = None, **kw: Any
) -> AsyncIterator[Balancer]:
    discovery = StaticDiscovery(addresses, interval=0.2)
    record = (
        (lambda kind, endpoint: events.append((kind, endpoint))) if events is not None else None
    )
    balancer = Balancer(discovery, on_event=record, probe_interval=0.1, **kw)
    await balancer.start()
    try:
        yield balancer
    finally:
        await balancer.close()


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND],
)
def test_a_failed_attempt_is_retried_once_on_another_worker(code: grpc.StatusCode) -> None:
    script = Script(failures=[code])
    events: list[tuple[str, str]] = []

    async def main() -> None:
        servicers = [FakeOip(script, "one"), FakeOip(script, "two")]
        async with fake_servers(servicers) as fakes, static_balancer(list(fakes), events) as lb:
            answer = await lb.infer(FAKE, ["hello"], {"experiment": "e1"})
            assert answer.labels == ["neg"]
            assert answer.columns == ("neg", "pos")
            assert [f.calls for f in fakes.values()] == [1, 1]  # one failure, one answer
            assert events == [("retry", answer.endpoint)]

    run(main)


def test_not_found_from_every_worker_is_the_callers_answer() -> None:
    script = Script(failures=[grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND])

    async def main() -> None:
        servicers = [FakeOip(script, "one"), FakeOip(script, "two")]
        async with fake_servers(servicers) as fakes, static_balancer(list(fakes)) as lb:
            with pytest.raises(NotFound):
                await lb.infer(FAKE, ["hello"])
            assert sum(f.calls for f in fakes.values()) == 2

    run(main)


def test_a_worker_that_said_not_found_is_skipped_until_discovery_lists_it_again() -> None:
    script = Script(failures=[grpc.StatusCode.NOT_FOUND])

    async def main() -> None:
        servicers = [FakeOip(script, "one"), FakeOip(script, "two")]
        async with fake_servers(servicers) as fakes, static_balancer(list(fakes)) as lb:
            first = await lb.infer(FAKE, ["hello"])
            for _ in range(6):
                assert (await lb.infer(FAKE, ["hello"])).endpoint == first.endpoint
            calls = sorted(f.calls for f in fakes.values())
            assert calls == [1, 7]  # the worker that said NOT_FOUND was asked once

    run(main)


def test_client_errors_are_forwarded_and_never_retried() -> None:
    script = Script(failures=[grpc.StatusCode.INVALID_ARGUMENT])

    async def main() -> None:
        servicers = [FakeOip(script, "one"), FakeOip(script, "two")]
        async with fake_servers(servicers) as fakes, static_balancer(list(fakes)) as lb:
            with pytest.raises(InvalidInput, match="says INVALID_ARGUMENT"):
                await lb.infer(FAKE, ["hello"])
            assert sum(f.calls for f in fakes.values()) == 1

    run(main)


def test_the_callers_deadline_is_the_upstream_timeout_and_is_not_retried() -> None:
    script = Script()

    async def main() -> None:
        servicers = [FakeOip(script, "one"), FakeOip(script, "two")]
        async with fake_servers(servicers) as fakes, static_balancer(list(fakes)) as lb:
            await lb.infer(FAKE, ["hello"], deadline=time.monotonic() + 1.5)
            (remaining,) = [r for f in fakes.values() for r in f.time_remaining]
            assert remaining is not None
            assert 1.0 < remaining <= 1.55  # gRPC rounds the deadline it sends up a little

            script.delay = 2.0
            with pytest.raises(DeadlineExceeded):
                await lb.infer(FAKE, ["hello"], deadline=time.monotonic() + 0.3)
            sent = [r for f in fakes.values() for r in f.time_remaining if r is not None]
            assert len(sent) == 2
            assert min(sent) <= 0.35  # the caller's deadline went upstream
            assert sum(f.calls for f in fakes.values()) == 2  # the late one was not retried

    run(main)


def test_when_every_worker_is_unavailable_the_error_names_them() -> None:
    script = Script(failures=[grpc.StatusCode.UNAVAILABLE] * 2)

    async def main() -> None:
        servicers = [FakeOip(script, "one"), FakeOip(script, "two")]
        async with fake_servers(servicers) as fakes, static_balancer(list(fakes)) as lb:
            with pytest.raises(NotReady) as caught:
                await lb.infer(FAKE, ["hello"])
            assert all(address in caught.value.message for address in fakes)

    run(main)


def test_static_discovery_reads_aliases_only_from_our_workers() -> None:
    async def main() -> None:
        ours = FakeOip(Script(), "loopline-inference", reason="champion,prod")
        theirs = FakeOip(Script(), "triton", reason="champion")  # free text, not aliases
        async with fake_servers([ours, theirs]) as fakes, static_balancer(list(fakes)) as lb:
            ours_address = next(a for a, f in fakes.items() if f is ours)
            assert lb.candidates(ModelRef("fake", alias="champion")) == [ours_address]
            assert lb.candidates(ModelRef("fake", alias="prod")) == [ours_address]
            assert sorted(lb.candidates(FAKE)) == sorted(fakes)

    run(main)


def test_a_server_without_a_repository_index_is_asked_model_ready() -> None:
    async def main() -> None:
        bare = FakeOip(Script(), "mlserver", index=False)
        async with fake_servers([bare]) as fakes, static_balancer(list(fakes)) as lb:
            assert lb.candidates(FAKE) == []  # nothing known until a request names the model
            answer = await lb.infer(FAKE, ["hello"])
            assert answer.endpoint == next(iter(fakes))
            with pytest.raises(NotReady, match="version 2"):
                await lb.infer(ModelRef("fake", version="2"), ["hello"])

    run(main)


def test_heartbeat_discovery_keeps_the_last_good_list_while_redis_is_down(
    redis_server: RedisServer, redis_url: str
) -> None:
    prefix = "test:balancer:"
    beat = {
        "endpoint": "10.0.0.7:8001",
        "models": [{"name": "tiny", "version": "1", "aliases": ["champion"], "ready": True}],
    }

    async def main() -> None:
        client = connect(redis_url)
        await client.set(prefix + "10.0.0.7:8001", json.dumps(beat), px=10_000)
        await client.aclose()
        discovery = HeartbeatDiscovery(redis_url, prefix, interval=0.05)
        await discovery.start()
        (seen,) = discovery.snapshot()
        assert seen.serving("tiny", "champion") is not None
        generation = discovery.generation

        await asyncio.to_thread(redis_server.stop)
        assert [w.endpoint for w in await discovery.refresh()] == ["10.0.0.7:8001"]
        assert discovery.generation == generation

        await asyncio.to_thread(redis_server.start)  # no persistence: it comes back empty
        await eventually(lambda: discovery.snapshot() == [], "the empty registry seen")
        await discovery.stop()

    run(main)


# ----- real inference workers -----


def _package_copy(source: Path, target: Path, name: str, version: str) -> Path:
    """The tiny package under another name and a registry-style version number."""
    shutil.copytree(source, target)
    manifest = read_manifest(target)
    write_manifest(target, manifest.model_copy(update={"name": name, "version": version}))
    return target


@dataclass
class WorkerProcess:
    address: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _spawn_worker(package: Path, redis_url: str, home: Path) -> WorkerProcess:
    home.mkdir(parents=True)
    port = free_port()
    env = dict(
        os.environ,
        LOOPLINE_INFERENCE_MODELS=json.dumps([str(package)]),
        LOOPLINE_INFERENCE_PORT=str(port),
        LOOPLINE_INFERENCE_CACHE_DIR=str(home / "cache"),
        LOOPLINE_INFERENCE_RECORDS="0",
        LOOPLINE_INFERENCE_HEARTBEAT_SECONDS="0.1",
        LOOPLINE_INFERENCE_MEMORY_TRIM_SECONDS="0",
        LOOPLINE_INFERENCE_INTRA_OP_THREADS="1",
        LOOPLINE_INFERENCE_MAX_BATCH_SIZE="8",
        LOOPLINE_ADMIN_TOKEN=TOKEN,
        LOOPLINE_REDIS_URL=redis_url,
        LOOPLINE_MLFLOW_URI=f"sqlite:///{home}/mlflow.db",
        LOOPLINE_LOG_JSON="1",
    )
    log = home / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.inference"], env=env, stdout=out, stderr=out
        )
    return WorkerProcess(f"127.0.0.1:{port}", process, log)


def _wait_ready(worker: WorkerProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if worker.process.poll() is not None:
                tail = worker.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker exited with {worker.process.returncode}:\n{tail}")
            with contextlib.suppress(grpc.RpcError):
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    return
            time.sleep(0.1)
    raise TimeoutError(f"worker at {worker.address} not ready after {timeout}s")


@pytest.fixture(scope="module")
def workers(
    tiny_package: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[WorkerProcess]]:
    """Two workers serving tiny/1, started together; the second one may be killed by a test."""
    home = tmp_path_factory.mktemp("balancer")
    package = _package_copy(tiny_package, home / "tiny-1", "tiny", "1")
    started = [_spawn_worker(package, redis_server.url, home / f"w{n}") for n in range(2)]
    try:
        for worker in started:
            _wait_ready(worker)
        yield started
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture(scope="module")
def tiny2_package(tiny_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _package_copy(tiny_package, tmp_path_factory.mktemp("tiny2") / "pkg", "tiny2", "3")


@contextlib.asynccontextmanager
async def heartbeat_balancer(redis_url: str, **kw: Any) -> AsyncIterator[Balancer]:
    balancer = Balancer(HeartbeatDiscovery(redis_url, interval=0.1), probe_interval=0.2, **kw)
    await balancer.start()
    try:
        yield balancer
    finally:
        await balancer.close()


def test_static_discovery_fronts_a_real_worker(workers: list[WorkerProcess]) -> None:
    address = workers[0].address

    async def main() -> None:
        async with static_balancer([address]) as lb:
            assert lb.candidates(TINY) == [address]
            assert await lb.model_labels(TINY) == ["negative", "positive"]
            answer = await lb.infer(TINY, TEXTS, {"request_id": "r-1", "experiment": "e"})
            assert (answer.model, answer.version, answer.endpoint) == ("tiny", "1", address)
            assert answer.probabilities.shape == (3, 2)
            np.testing.assert_allclose(answer.probabilities.sum(axis=1), 1.0, atol=1e-5)
            columns = answer.probabilities.argmax(axis=1)
            assert answer.labels == [answer.columns[i] for i in columns]
            assert answer.truncated == [False, False, False]
            assert answer.parameters["request_id"] == "r-1"

    run(main)


def test_ensure_loaded_loads_a_package_through_the_repository_extension(
    workers: list[WorkerProcess], tiny2_package: Path, redis_url: str
) -> None:
    tiny2 = ModelRef("tiny2", version="3")

    async def main() -> None:
        async with heartbeat_balancer(redis_url) as anonymous:
            await eventually(lambda: len(anonymous.candidates(TINY)) >= 1, "workers discovered")
            assert anonymous.candidates(tiny2) == []
            with pytest.raises(FailedPrecondition, match="admin token"):
                await anonymous.ensure_loaded(tiny2, str(tiny2_package), timeout=30)

        async with heartbeat_balancer(redis_url, admin_token=TOKEN) as lb:
            await eventually(lambda: len(lb.candidates(TINY)) >= 1, "workers discovered")
            with pytest.raises(FailedPrecondition, match="neither a registry URI"):
                await lb.ensure_loaded(ModelRef("ghost", version="1"), "/no/such/package")
            loaded = await lb.ensure_loaded(tiny2, str(tiny2_package), timeout=60)
            assert loaded
            answer = await lb.infer(tiny2, ["a lovely film"])
            assert (answer.model, answer.version) == ("tiny2", "3")
            assert await lb.ensure_loaded(tiny2, str(tiny2_package)) == lb.candidates(tiny2)

    run(main)


def test_killing_one_of_two_workers_under_load_fails_no_request(
    workers: list[WorkerProcess], redis_url: str
) -> None:
    survivor, victim = workers
    events: list[tuple[str, str]] = []
    served: Counter[str] = Counter()
    failures: list[BaseException] = []

    async def client(lb: Balancer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                answer = await lb.infer(TINY, ["the film was great"], deadline=time.monotonic() + 5)
                served[answer.endpoint] += 1
            except Exception as err:
                failures.append(err)

    async def main() -> None:
        async with heartbeat_balancer(
            redis_url, on_event=lambda kind, endpoint: events.append((kind, endpoint))
        ) as lb:
            both = sorted([survivor.address, victim.address])
            await eventually(lambda: sorted(lb.candidates(TINY)) == both, "both workers")
            stop = asyncio.Event()
            tasks = [asyncio.create_task(client(lb, stop)) for _ in range(4)]
            await eventually(lambda: min(served[a] for a in both) >= 10, "both serving")
            victim.process.send_signal(signal.SIGKILL)  # mid-load: calls are in flight on it
            killed_at = sum(served.values())
            assert await asyncio.to_thread(victim.process.wait, 10) == -signal.SIGKILL
            await eventually(lambda: ("eject", victim.address) in events, "victim ejected")
            await eventually(lambda: sum(served.values()) >= killed_at + 200, "load continues")
            stop.set()
            await asyncio.gather(*tasks)
            assert lb.candidates(TINY) == [survivor.address]

        assert failures == []
        assert ("retry", survivor.address) in events

    run(main)
