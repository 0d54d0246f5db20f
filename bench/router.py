"""The router hop: added latency and throughput against calling a worker directly, and the
router's own ceiling against a bare grpc.aio echo server.

    python -m bench.router [--package DIR] [--seconds 10]

Without --package, the base all-MiniLM-L6-v2 int8 package is exported as `bench.inference` does
(kept in bench/results/minilm-package and reused on later runs). Texts: the 1,000 movie-review
validation sentences from ../shared/data. Everything runs as real processes on this machine: a
private `redis-server` on a free port (never the machine's 6379), the services started with
`python -m ...`, and one grpc.aio load generator in this process for every target, so the client
costs the same CPU everywhere. Each figure is measured in four interleaved rounds (direct, router,
direct, router, ...) so that a machine that gets busier part-way affects both sides alike.

1. Router hop: one inference worker (records off) serving the package folder, announced by its
   heartbeat in the private Redis, and one router that finds it there. Direct = OIP ModelInfer to
   the worker, carrying the same request the router builds; via router = loopline.v1
   Router.Classify naming only the model (plain traffic: its champion, which the worker serving
   the package folder stands in for).
   At concurrency 1 (a lone request), 32 (busy) and 128 (saturation: where the worker answers
   the most in bench.inference): p50/p99 latency and sentences/s, the p50/p99 the hop adds, and
   the router/direct throughput ratio; the target is judged at saturation.
   Also at concurrency 1 with a 2 ms pause after each answer ("paced"): requests that find
   the processes idle, as lone requests do in production. On this VM a worker answers slower
   after even 1 ms idle than back to back (docs/router.md).
   At both lone levels, in the same rounds, a bare grpc.aio proxy (`--serve proxy`: forwards
   the same ModelInfer bytes to the same worker, on the router's gRPC I/O path, and does
   nothing else) gives the p50 any grpc.aio hop adds here, and the router's part on top of it.
2. Router ceiling: a trivial OIP upstream (`--serve fake-oip`: answers ModelInfer at once with
   fixed probabilities) behind a router with a static worker list, against a bare echo server
   (`--serve echo`: a generic unary method returning its request bytes), both at high
   concurrency: calls/s and their ratio. Both also at concurrency 1: the p50 a lone call through
   router + trivial upstream takes over one bare round trip is the hop's cost without a model.
3. CPU seconds per call of every process (from /proc), which says where the time goes.
Results: bench/results/router.json and bench/results/router.png; logs in bench/results/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import USER_GRPC_EXPERIMENTS
from bench.inference import (
    RESULTS,
    CpuMeter,
    export_base_package,
    free_port,
    texts,
    wait_ready,
)

# SATURATING: where the worker straight from the load generator reaches its best throughput in
# bench.inference (concurrency 128; at 32 it answers about a fifth less). BUSY: a loaded worker
# below saturation, the level this benchmark judged the ratio at before 2026-11-29.
LONE, BUSY, SATURATING, CEILING = 1, 32, 128, 64
# The hop's levels: a lone caller back to back, a lone caller pausing PACE seconds after each
# answer (requests that find the processes idle), busy and saturation.
PACE = 0.002
LEVELS = {
    "lone": (LONE, 0.0),
    "paced": (LONE, PACE),
    "busy": (BUSY, 0.0),
    "saturated": (SATURATING, 0.0),
}
# Four short rounds rather than two long ones: on a shared VM a lone worker's latency drifts by
# 0.5 ms from one window to the next, which two rounds left in the added p50 (docs/router.md).
ROUNDS = 4
TARGETS = {"added_p50_ms": 1.0, "throughput_ratio": 0.90, "lone_classify_p50_ms": 5.0}
LOGS = RESULTS / "logs"
FAKE_MODEL, FAKE_VERSION, FAKE_LABELS = "fake", "1", ("negative", "positive")
ECHO_METHOD = "/bench.Echo/Echo"

Call = Callable[[int], Awaitable[object]]


# ----- processes -----


@dataclass
class Service:
    """One child process of the benchmark and where it listens."""

    name: str
    process: subprocess.Popen[bytes]
    address: str
    log: Path

    def check(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn(name: str, command: Sequence[str], env: dict[str, str], address: str) -> Service:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"router-bench-{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(command), env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )
    return Service(name, process, address, log)


@contextmanager
def services() -> Iterator[list[Service]]:
    """A list to append started services to; every one gets SIGTERM on the way out."""
    started: list[Service] = []
    try:
        yield started
    finally:
        for service in reversed(started):
            service.stop()


def start_redis(home: Path) -> Service:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (the benchmark runs a private one)")
    port = free_port()
    command = [
        binary,
        *("--port", str(port), "--bind", "127.0.0.1"),
        *("--save", "", "--appendonly", "no", "--dir", str(home)),
    ]
    return spawn("redis", command, {}, f"127.0.0.1:{port}")


async def wait_redis(service: Service, timeout: float = 10.0) -> None:
    host, port = service.address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        service.check()
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"PING\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), 1.0)
            writer.close()
            if answer.startswith(b"+PONG"):
                return
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"redis-server on {service.address}")


def shared_env(redis_url: str, home: Path) -> dict[str, str]:
    return {
        "LOOPLINE_REDIS_URL": redis_url,
        # Only experiment administration would touch it; a throwaway store all the same.
        "LOOPLINE_MLFLOW_URI": f"sqlite:///{home / 'mlflow.db'}",
        "LOOPLINE_LOG_LEVEL": "WARNING",
    }


def start_worker(package: Path, redis_url: str, home: Path) -> Service:
    port = free_port()
    env = {
        **shared_env(redis_url, home),
        "LOOPLINE_INFERENCE_MODELS": json.dumps([str(package)]),
        "LOOPLINE_INFERENCE_PORT": str(port),
        "LOOPLINE_INFERENCE_CPU_VARIANT": "int8",
        "LOOPLINE_INFERENCE_RECORDS": "0",
        "LOOPLINE_INFERENCE_CACHE_DIR": str(home / "cache"),
        "LOOPLINE_INFERENCE_SPOOL_PATH": str(home / "spool.jsonl"),
        "LOOPLINE_INFERENCE_HEARTBEAT_SECONDS": "0.5",
    }
    command = [sys.executable, "-m", "services.inference"]
    return spawn("worker", command, env, f"127.0.0.1:{port}")


def start_router(
    name: str,
    default_model: str,
    redis_url: str,
    home: Path,
    workers: Sequence[str] = (),
    metrics_port: int = 0,
) -> Service:
    """A router; with `workers` it uses that static list only, else heartbeats in Redis."""
    port = free_port()
    env = {
        **shared_env(redis_url, home),
        "LOOPLINE_ROUTER_PORT": str(port),
        "LOOPLINE_ROUTER_METRICS_PORT": str(metrics_port),
        "LOOPLINE_ROUTER_DEFAULT_MODEL": default_model,
        "LOOPLINE_ROUTER_WORKERS": json.dumps(list(workers)),
        "LOOPLINE_ROUTER_DISCOVER_WORKERS": "false" if workers else "true",
    }
    command = [sys.executable, "-m", "services.router"]
    return spawn(name, command, env, f"127.0.0.1:{port}")


def start_fake(kind: str, *options: str, grpc_experiments: str = USER_GRPC_EXPERIMENTS) -> Service:
    """A reference server (`--serve kind`), with gRPC set as the user has it (bench/__init__.py)
    unless `grpc_experiments` says otherwise."""
    port = free_port()
    command = [sys.executable, "-m", "bench.router", "--serve", kind, "--port", str(port)]
    env = {"GRPC_EXPERIMENTS": grpc_experiments}
    return spawn(kind, [*command, *options], env, f"127.0.0.1:{port}")


def services_grpc_experiments() -> str:
    """The `GRPC_EXPERIMENTS` every Loopline service runs with (services/__init__.py sets it in
    os.environ unless the user did)."""
    import services  # noqa: F401

    return os.environ["GRPC_EXPERIMENTS"]


async def wait_for(service: Service, probe: Call, what: str, timeout: float = 120.0) -> None:
    """Until `probe(0)` succeeds; the last error is in the timeout's message."""
    import grpc

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        service.check()
        try:
            await probe(0)
            return
        except grpc.aio.AioRpcError as err:
            last = f"{err.code().name}: {err.details()}"
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{what} ({service.address}): {last}")


# ----- the load generator -----


@dataclass
class Tally:
    """Latencies and counts of one target at one concurrency, summed over rounds."""

    concurrency: int
    pause: float = 0.0  # seconds each caller waits after an answer
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        calls = len(self.latencies)
        array = np.asarray(self.latencies or [float("nan")]) * 1000
        row: dict[str, Any] = {
            "concurrency": self.concurrency,
            "pause_ms": round(self.pause * 1000, 3),
            "calls": calls,
            "calls_per_s": round(calls / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(float(np.percentile(array, 50)), 3),
            "p99_ms": round(float(np.percentile(array, 99)), 3),
            "errors": self.errors,
            "cpu_ms_per_call": {
                name: round(1000 * used / calls, 3) if calls else None
                for name, used in self.cpu.items()
            },
        }
        if self.first_error:
            row["first_error"] = self.first_error
        return row


async def drive(
    tally: Tally, call: Call, seconds: float, watched: Sequence[Service], offset: int = 0
) -> None:
    """`tally.concurrency` callers, each awaiting `call(i)` back to back for `seconds`."""
    import grpc

    concurrency = tally.concurrency
    stop_at = time.monotonic() + seconds
    latencies = tally.latencies

    async def caller(start: int) -> None:
        index = start
        while time.monotonic() < stop_at:
            began = time.perf_counter()
            try:
                await call(index)
                latencies.append(time.perf_counter() - began)
            except grpc.aio.AioRpcError as err:
                tally.errors += 1
                tally.first_error = tally.first_error or f"{err.code().name}: {err.details()}"
            index += concurrency
            if tally.pause:
                await asyncio.sleep(tally.pause)

    cpu = CpuMeter({service.name: service.process.pid for service in watched})
    began = time.monotonic()
    await asyncio.gather(*(caller(offset + i) for i in range(concurrency)))
    tally.seconds += time.monotonic() - began
    for name, used in cpu.used().items():
        tally.cpu[name] = tally.cpu.get(name, 0.0) + used


def added(direct: dict[str, Any], router: dict[str, Any]) -> dict[str, Any]:
    return {
        "added_p50_ms": round(router["p50_ms"] - direct["p50_ms"], 3),
        "added_p99_ms": round(router["p99_ms"] - direct["p99_ms"], 3),
        "throughput_ratio": round(router["calls_per_s"] / direct["calls_per_s"], 3)
        if direct["calls_per_s"]
        else None,
    }


# ----- 1. the router hop with the MiniLM package -----


async def hop(package: Path, corpus: list[str], seconds: float, home: Path) -> dict[str, Any]:
    import grpc

    from loopline.oip import grpc_service_pb2_grpc as oip_grpc
    from loopline.package import read_manifest
    from loopline.v1 import common_pb2 as common
    from loopline.v1 import router_pb2 as rpb
    from loopline.v1 import router_pb2_grpc as rpb_grpc
    from services.router.oip import build_request

    manifest = read_manifest(package)
    name, version = manifest.name, manifest.version
    # Plain traffic: a Classify naming only the model goes to its champion, which a worker
    # serving one package folder stands in for. Direct calls send exactly what the router
    # sends upstream (services/router/oip.py), ids included.
    direct_requests = [
        build_request(name, "champion", [text], {"request_id": f"bench-{i}"}, f"bench-{i}")
        for i, text in enumerate(corpus)
    ]
    plain = common.ModelRef(name=name)
    router_requests = [
        rpb.ClassifyRequest(text=text, model=plain, request_id=f"bench-{i}")
        for i, text in enumerate(corpus)
    ]
    results: dict[str, Any] = {"model": name, "version": version}
    home.mkdir(parents=True, exist_ok=True)
    with services() as started:
        redis = start_redis(home)
        started.append(redis)
        await wait_redis(redis)
        redis_url = f"redis://{redis.address}/0"
        worker = start_worker(package, redis_url, home)
        started.append(worker)
        metrics_port = free_port()
        router = start_router("router", name, redis_url, home, metrics_port=metrics_port)
        started.append(router)
        # On the router's gRPC I/O path, so the two hops differ only in what the router does
        # on top of forwarding.
        proxy = start_fake(
            "proxy", "--upstream", worker.address, grpc_experiments=services_grpc_experiments()
        )
        started.append(proxy)
        async with (
            grpc.aio.insecure_channel(worker.address) as worker_channel,
            grpc.aio.insecure_channel(router.address) as router_channel,
            grpc.aio.insecure_channel(proxy.address) as proxy_channel,
        ):
            oip_stub = oip_grpc.GRPCInferenceServiceStub(worker_channel)
            router_stub = rpb_grpc.RouterStub(router_channel)
            proxy_stub = oip_grpc.GRPCInferenceServiceStub(proxy_channel)

            def direct(i: int) -> Awaitable[object]:
                pending: Awaitable[object] = oip_stub.ModelInfer(
                    direct_requests[i % len(corpus)], timeout=30
                )
                return pending

            def via_proxy(i: int) -> Awaitable[object]:
                pending: Awaitable[object] = proxy_stub.ModelInfer(
                    direct_requests[i % len(corpus)], timeout=30
                )
                return pending

            def via_router(i: int) -> Awaitable[object]:
                pending: Awaitable[object] = router_stub.Classify(
                    router_requests[i % len(corpus)], timeout=30
                )
                return pending

            await wait_ready(worker.address)
            await wait_for(router, via_router, "the router answering through the worker")
            await wait_for(proxy, via_proxy, "the bare proxy answering through the worker")
            results["bare_classify"] = await bare_classify(router_stub, corpus[0])
            targets = {
                "direct": Target(direct, (router, worker)),
                "router": Target(via_router, (router, worker)),
                # A reference for the lone hop only: at the loaded levels it would add a third
                # of the run time and say nothing about the router.
                "proxy": Target(via_proxy, (proxy, worker), ("lone", "paced")),
            }
            for target in targets.values():  # warm-up: connections, caches, ORT arenas
                await drive(Tally(4), target.call, 1.5, target.watched)
            tallies, merged = await hop_rounds(targets, seconds, metrics_port, name)
            for service in started:
                service.check()
    results["texts_per_worker_call_saturated"] = merged
    for key in LEVELS:
        results[key] = level_rows(tallies, key)
    return results


def level_rows(tallies: dict[tuple[str, str], Tally], key: str) -> dict[str, Any]:
    """One level's rows and what the router adds; with the bare proxy where it ran."""
    direct_row = tallies[("direct", key)].summary()
    router_row = tallies[("router", key)].summary()
    rows = {"direct": direct_row, "router": router_row, **added(direct_row, router_row)}
    if ("proxy", key) in tallies:
        proxy_row = tallies[("proxy", key)].summary()
        rows["proxy"] = proxy_row
        rows["added_p50_ms_bare_proxy"] = round(proxy_row["p50_ms"] - direct_row["p50_ms"], 3)
        rows["router_over_bare_proxy_p50_ms"] = round(router_row["p50_ms"] - proxy_row["p50_ms"], 3)
    return rows


@dataclass(frozen=True)
class Target:
    """One way to reach the worker: the call, the processes whose CPU it counts, its levels."""

    call: Call
    watched: Sequence[Service]
    levels: Sequence[str] = tuple(LEVELS)


async def hop_rounds(
    targets: dict[str, Target], seconds: float, metrics_port: int, model: str
) -> tuple[dict[tuple[str, str], Tally], float | None]:
    """Each target at each of its levels in interleaved rounds; with the router's texts per
    worker call at saturation (None when it made none)."""
    tallies = {
        (path, key): Tally(*LEVELS[key])
        for path, target in targets.items()
        for key in target.levels
    }
    texts, calls = 0.0, 0.0
    for round_ in range(ROUNDS):
        for key in LEVELS:
            for path, target in targets.items():
                if key not in target.levels:
                    continue
                offset = round_ * 7919  # other texts in every round
                counted = path == "router" and key == "saturated"
                sent = await upstream_texts(metrics_port, model) if counted else (0.0, 0.0)
                tally = tallies[(path, key)]
                await drive(tally, target.call, seconds / ROUNDS, target.watched, offset)
                if counted:
                    now = await upstream_texts(metrics_port, model)
                    texts, calls = texts + now[0] - sent[0], calls + now[1] - sent[1]
    return tallies, (round(texts / calls, 2) if calls else None)


async def upstream_texts(port: int, model: str) -> tuple[float, float]:
    """The router's `loopline_router_upstream_texts` sum and count for `model` so far: texts it
    sent to workers and the calls that carried them (more texts than calls: merged under load)."""
    import urllib.request

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    values = {}
    for line in (await asyncio.to_thread(scrape)).splitlines():
        if line.startswith("loopline_router_upstream_texts_") and f'model="{model}"' in line:
            name, value = line.rsplit(" ", 1)
            values[name.split("{", 1)[0]] = float(value)
    return (
        values.get("loopline_router_upstream_texts_sum", 0.0),
        values.get("loopline_router_upstream_texts_count", 0.0),
    )


async def bare_classify(stub: Any, text: str) -> str:
    """What a Classify naming no version gets when the worker serves a package folder."""
    import grpc

    from loopline.v1 import router_pb2 as rpb

    try:
        answer = await stub.Classify(rpb.ClassifyRequest(text=text), timeout=10)
    except grpc.aio.AioRpcError as err:
        return f"{err.code().name}: {err.details()}"
    return f"OK: {answer.model.name}/{answer.model.version} via {answer.model.alias or '-'}"


# ----- 2. the router's own ceiling -----


async def ceiling(corpus: list[str], seconds: float, home: Path) -> dict[str, Any]:
    import grpc

    from loopline.v1 import router_pb2 as rpb
    from loopline.v1 import router_pb2_grpc as rpb_grpc

    # The router's most common call: text only, default model, its champion.
    requests = [rpb.ClassifyRequest(text=text) for text in corpus]
    payloads = [request.SerializeToString() for request in requests]
    home.mkdir(parents=True, exist_ok=True)
    with services() as started:
        redis = start_redis(home)
        started.append(redis)
        fake = start_fake("fake-oip")
        started.append(fake)
        echo = start_fake("echo")
        started.append(echo)
        await wait_redis(redis)
        router = start_router(
            "router-fake", FAKE_MODEL, f"redis://{redis.address}/0", home, [fake.address]
        )
        started.append(router)
        async with (
            grpc.aio.insecure_channel(router.address) as router_channel,
            grpc.aio.insecure_channel(echo.address) as echo_channel,
        ):
            router_stub = rpb_grpc.RouterStub(router_channel)
            echo_call = echo_channel.unary_unary(ECHO_METHOD)

            def via_router(i: int) -> Awaitable[object]:
                pending: Awaitable[object] = router_stub.Classify(
                    requests[i % len(corpus)], timeout=30
                )
                return pending

            def echoed(i: int) -> Awaitable[object]:
                pending: Awaitable[object] = echo_call(payloads[i % len(corpus)], timeout=30)
                return pending

            await wait_ready(fake.address)
            await wait_for(echo, echoed, "the echo server")
            await wait_for(router, via_router, "the router answering through the fake upstream")
            targets = {"router": (via_router, [router, fake]), "echo": (echoed, [echo])}
            for call, watched in targets.values():
                await drive(Tally(8), call, 1.0, watched)
            tallies = {(key, level): Tally(level) for key in targets for level in (LONE, CEILING)}
            for round_ in range(ROUNDS):
                for level in (LONE, CEILING):
                    for key, (call, watched) in targets.items():
                        tally = tallies[(key, level)]
                        await drive(tally, call, seconds / ROUNDS, watched, round_ * 7919)
            for service in started:
                service.check()
    router_row, echo_row = (
        tallies[("router", CEILING)].summary(),
        tallies[("echo", CEILING)].summary(),
    )
    router_lone, echo_lone = tallies[("router", LONE)].summary(), tallies[("echo", LONE)].summary()
    return {
        "router_fake_upstream": router_row,
        "echo": echo_row,
        "router_vs_echo": round(router_row["calls_per_s"] / echo_row["calls_per_s"], 3)
        if echo_row["calls_per_s"]
        else None,
        # A lone call through router + trivial upstream against one bare round trip: what the
        # hop adds when the upstream costs nothing (one more gRPC round trip plus the router).
        "lone": {
            "router_fake_upstream": router_lone,
            "echo": echo_lone,
            "added_p50_ms": round(router_lone["p50_ms"] - echo_lone["p50_ms"], 3),
            "added_p99_ms": round(router_lone["p99_ms"] - echo_lone["p99_ms"], 3),
        },
    }


# ----- the trivial servers (`--serve fake-oip | echo`, run as child processes) -----


def fake_oip_servicer() -> Any:
    """Our worker's OIP surface as the router uses it, answering instantly with fixed values."""
    from loopline.oip import grpc_service_pb2 as pb
    from loopline.oip import grpc_service_pb2_grpc as pb_grpc
    from services.router.discovery import LOOPLINE_SERVER_NAME
    from services.router.oip import encode_bytes

    answers: dict[int, Any] = {}

    def answer(count: int) -> Any:
        if count not in answers:
            response = pb.ModelInferResponse(model_name=FAKE_MODEL, model_version=FAKE_VERSION)
            response.outputs.add(name="probabilities", datatype="FP32", shape=[count, 2])
            response.outputs.add(name="label", datatype="BYTES", shape=[count])
            response.outputs.add(name="truncated", datatype="BOOL", shape=[count])
            probabilities = np.tile(np.asarray([0.2, 0.8], dtype="<f4"), (count, 1))
            response.raw_output_contents.extend(
                [probabilities.tobytes(), encode_bytes([b"positive"] * count), bytes(count)]
            )
            answers[count] = response
        return answers[count]

    class FakeOip(pb_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.ServerReadyResponse(ready=True)

        async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
            # Named as our worker, so the router reads the alias list in the index's `reason`.
            return pb.ServerMetadataResponse(name=LOOPLINE_SERVER_NAME, version="bench")

        async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.ModelReadyResponse(ready=request.name == FAKE_MODEL)

        async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
            response = pb.RepositoryIndexResponse()
            response.models.add(
                name=FAKE_MODEL, version=FAKE_VERSION, state="READY", reason="champion"
            )
            return response

        async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
            config = pb.ModelConfig(name=FAKE_MODEL, backend="fake")
            config.parameters["labels"].string_value = json.dumps(list(FAKE_LABELS))
            return pb.ModelConfigResponse(config=config)

        async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
            shape = request.inputs[0].shape if request.inputs else [1]
            return answer(int(shape[0]) if shape else 1)

    # The methods not defined here answer UNIMPLEMENTED (the generated base class does that).
    return FakeOip()  # type: ignore[abstract]


def bare_proxy_handler(upstream: Any) -> Any:
    """A grpc.aio handler that forwards every unary call's bytes to `upstream` (a channel) and
    answers with the upstream's bytes or status: the least a grpc.aio proxy does (one persistent
    channel, the caller's remaining deadline passed on), with no parsing, routing or metrics."""
    import grpc

    def forwarding(method: str) -> Any:
        call = upstream.unary_unary(method)  # no (de)serializers: bytes

        async def handle(request: bytes, context: Any) -> bytes:
            try:
                answer: bytes = await call(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "")
            return answer

        return grpc.unary_unary_rpc_method_handler(handle)

    handlers: dict[str, Any] = {}

    class Forwarding(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: Any) -> Any:
            # Built once per method, as a generated servicer's handlers are: the router pays no
            # per-call handler construction, so neither does its reference.
            method = details.method
            if method not in handlers:
                handlers[method] = forwarding(method)
            return handlers[method]

    return Forwarding()


def build_server(kind: str, port: int, upstream: str = "") -> tuple[Any, Any]:
    """A reference server (not started) on 127.0.0.1:`port` and the channel it forwards on
    (None unless `kind` is "proxy")."""
    import grpc

    if kind == "proxy" and not upstream:
        raise SystemExit("--serve proxy needs --upstream HOST:PORT")
    server = grpc.aio.server()
    channel = None
    if kind == "echo":

        async def echo(request: bytes, context: Any) -> bytes:
            return request

        handler = grpc.unary_unary_rpc_method_handler(echo)  # no (de)serializers: bytes
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
        )
    elif kind == "proxy":
        channel = grpc.aio.insecure_channel(upstream)
        server.add_generic_rpc_handlers((bare_proxy_handler(channel),))
    else:
        from loopline.oip import grpc_service_pb2_grpc as pb_grpc

        pb_grpc.add_GRPCInferenceServiceServicer_to_server(fake_oip_servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    return server, channel


async def serve(kind: str, port: int, upstream: str = "") -> None:
    server, channel = build_server(kind, port, upstream)
    await server.start()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.stop(1.0)
    if channel is not None:
        await channel.close()


# ----- report -----


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    hop_ = results["hop"]
    lone, saturated = hop_["lone"], hop_["saturated"]
    lone_p50 = lone["router"]["p50_ms"]
    return {
        "added_p50_ms_lone": {
            "value": lone["added_p50_ms"],
            "target": f"<= {TARGETS['added_p50_ms']}",
            "met": lone["added_p50_ms"] <= TARGETS["added_p50_ms"],
        },
        "added_p99_ms_lone": {"value": lone["added_p99_ms"]},
        # The same hop through a bare grpc.aio proxy in front of the same worker, in the same
        # rounds: what any grpc.aio hop adds on this machine, and the router's part on top of it.
        "added_p50_ms_lone_bare_proxy": {"value": lone["added_p50_ms_bare_proxy"]},
        "router_over_bare_proxy_p50_ms_lone": {"value": lone["router_over_bare_proxy_p50_ms"]},
        "added_p50_ms_lone_paced": {"value": hop_["paced"]["added_p50_ms"]},
        "added_p50_ms_paced_bare_proxy": {"value": hop_["paced"]["added_p50_ms_bare_proxy"]},
        "added_p50_ms_saturated": {"value": saturated["added_p50_ms"]},
        "added_p99_ms_saturated": {"value": saturated["added_p99_ms"]},
        "throughput_ratio_saturated": {
            "value": saturated["throughput_ratio"],
            "target": f">= {TARGETS['throughput_ratio']}",
            "met": (saturated["throughput_ratio"] or 0) >= TARGETS["throughput_ratio"],
        },
        # The ratio the CPU per call allows when every process shares the cores and all of them
        # are busy: (worker + client) / (worker + router + client), summed from each path's
        # CPU per call. A measured ratio below it is time the cores sat idle on the routed path.
        "throughput_ratio_cpu_bound": {"value": cpu_bound_ratio(saturated)},
        "throughput_ratio_busy": {"value": hop_["busy"]["throughput_ratio"]},
        "lone_classify_p50_ms": {
            "value": lone_p50,
            "target": f"< {TARGETS['lone_classify_p50_ms']}",
            "met": lone_p50 < TARGETS["lone_classify_p50_ms"],
        },
        "router_vs_echo_calls": {"value": results["ceiling"]["router_vs_echo"]},
        "added_p50_ms_lone_trivial_upstream": {"value": results["ceiling"]["lone"]["added_p50_ms"]},
    }


def cpu_bound_ratio(level: dict[str, Any]) -> float | None:
    direct, routed = (
        [v for v in level[path]["cpu_ms_per_call"].values() if v is not None]
        for path in ("direct", "router")
    )
    return round(sum(direct) / sum(routed), 3) if direct and routed and sum(routed) else None


def print_report(results: dict[str, Any]) -> None:
    hop_ = results["hop"]
    print(f"router hop, {hop_['model']}/{hop_['version']} int8, one text per call")
    header = f"{'':10}{'path':8}{'conc':>5}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}"
    print(header)
    for key in LEVELS:
        for path in ("direct", "router", "proxy"):
            row = hop_[key].get(path)
            if row is None:
                continue
            print(
                f"{key:10}{path:8}{row['concurrency']:>5}{row['calls_per_s']:>10}"
                f"{row['p50_ms']:>9}{row['p99_ms']:>9}{row['errors']:>7}"
            )
    merged = hop_["texts_per_worker_call_saturated"]
    print(f"texts per worker call via the router at c={SATURATING}: {merged}")
    ceiling_ = results["ceiling"]
    print("\nrouter ceiling, trivial upstream, against a bare grpc.aio echo")
    for key, row in (
        ("router+fake", ceiling_["router_fake_upstream"]),
        ("echo", ceiling_["echo"]),
        ("router+fake", ceiling_["lone"]["router_fake_upstream"]),
        ("echo", ceiling_["lone"]["echo"]),
    ):
        print(
            f"{key:12} c={row['concurrency']:<3}{row['calls_per_s']:>9} calls/s  "
            f"p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  errors {row['errors']}"
        )
    print("\nCPU ms per call, by process")
    for label, row in (
        *(
            (f"{path} {key}", hop_[key][path])
            for key in LEVELS
            for path in ("direct", "router", "proxy")
            if path in hop_[key]
        ),
        ("router+fake", ceiling_["router_fake_upstream"]),
        ("echo", ceiling_["echo"]),
        ("router+fake lone", ceiling_["lone"]["router_fake_upstream"]),
        ("echo lone", ceiling_["lone"]["echo"]),
    ):
        print(f"  {label:18}{row['cpu_ms_per_call']}")
    print("\nverdicts")
    for key, verdict in results["verdicts"].items():
        target = verdict.get("target")
        met = ""
        if target is not None:
            met = f"  target {target}: {'met' if verdict['met'] else 'MISSED'}"
        print(f"  {key:36}{verdict['value']}{met}")
    print(f"\nload average before {results['loadavg_before']}, after {results['loadavg_after']}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hop_, ceiling_ = results["hop"], results["ceiling"]
    fig, (lat, thr, top) = plt.subplots(1, 3, figsize=(13, 4))
    x = np.arange(4)
    labels = ["c=1 p50", "c=1 p99", f"c={SATURATING} p50", f"c={SATURATING} p99"]
    for offset, path_ in ((-0.2, "direct"), (0.2, "router")):
        values = [hop_[k][path_][q] for k in ("lone", "saturated") for q in ("p50_ms", "p99_ms")]
        lat.bar(x + offset, values, 0.4, label=path_)
    lat.set_xticks(x, labels)
    lat.set_yscale("log")
    lat.set_ylabel("latency (ms, log)")
    lat.set_title("latency: direct vs via router")
    lat.legend()
    x = np.arange(2)
    for offset, path_ in ((-0.2, "direct"), (0.2, "router")):
        values = [hop_[k][path_]["calls_per_s"] for k in ("lone", "saturated")]
        thr.bar(x + offset, values, 0.4, label=path_)
    thr.set_xticks(x, ["c=1", f"c={SATURATING}"])
    thr.set_ylabel("sentences/s")
    thr.set_title(f"throughput (router/direct {hop_['saturated']['throughput_ratio']})")
    thr.legend()
    names = ["router + fake upstream", "bare echo"]
    values = [ceiling_["router_fake_upstream"]["calls_per_s"], ceiling_["echo"]["calls_per_s"]]
    top.bar(names, values, color=["tab:orange", "tab:grey"])
    top.set_ylabel("calls/s")
    top.set_title(
        f"c={CEILING}: ratio {ceiling_['router_vs_echo']}; "
        f"c=1 hop +{ceiling_['lone']['added_p50_ms']} ms p50"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def base_package() -> Path:
    """The base MiniLM package of bench.inference, exported once and reused."""
    cached = RESULTS / "minilm-package"
    if (cached / "loopline.json").is_file():
        return cached
    return export_base_package(cached)


async def run(package: Path, seconds: float) -> dict[str, Any]:
    corpus = texts()
    results: dict[str, Any] = {
        "package": str(package),
        "texts": len(corpus),
        "cpu_count": os.cpu_count(),
        "seconds_per_figure": seconds,
        "rounds": ROUNDS,
        "loadavg_before": [round(v, 2) for v in os.getloadavg()],
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loopline-bench-router-") as home:
        results["hop"] = await hop(package, corpus, seconds, Path(home) / "hop")
        results["ceiling"] = await ceiling(corpus, seconds, Path(home) / "ceiling")
    results["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    results["verdicts"] = verdicts(results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, help="model package folder (default: base MiniLM)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per figure, over all rounds")
    parser.add_argument("--serve", choices=["fake-oip", "echo", "proxy"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.port, args.upstream))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    package = args.package or base_package()
    results = asyncio.run(run(package, args.seconds))
    (RESULTS / "router.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "router.png")
    print_report(results)


if __name__ == "__main__":
    main()
