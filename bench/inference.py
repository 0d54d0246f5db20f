"""Worker throughput and latency over gRPC against the in-process ONNX Runtime ceiling.

    python -m bench.inference [--package DIR] [--variant int8] [--seconds 8]

Without --package, the base all-MiniLM-L6-v2 (from its PyPI package, no network) is exported with
a seeded random head: the compute is the same as a fine-tuned package's, which is all that speed
depends on. Texts: the 1,000 movie-review validation sentences from ../shared/data.

Measured in one run, on one machine, so the ratios hold even when the machine is noisy:
1. in-process: the same ORT session options the worker uses, length-sorted batches of several
   sizes; the best sentences/s is the ceiling, batch 1 gives the latency floor. Measured before
   the worker starts and again after it stops; the higher of the two is the ceiling every ratio
   is judged against, so that a machine busy during one of them cannot flatter the worker;
2. a worker process (`python -m services.inference`) driven by a grpc.aio load generator, one text
   per request, at several concurrencies: sentences/s and p50/p95/p99 latency; then the same
   load as a few ModelStreamInfer streams (one text per message), for clients that hold a stream;
3. the worker's data plane (validation, tokenizing, batching, engine) built in this process and
   called without gRPC at the highest concurrency: between it and the ceiling is what batching
   costs (texts drawn from what is queued pad more than the sorted corpus), between it and the
   worker is what gRPC costs;
4. a lone request: the worker at concurrency 1 against the same texts alone in-process, in
   alternating rounds, whose p50 difference is the worker's added latency;
5. the worker's RSS after the load;
6. the CPU each answered call cost the worker process and the load generator at every level, and
   the in-process engine's per text: on shared cores, cores / (worker + client CPU per call) is
   the most any worker with that CPU per call could answer (`cpu_bound_sentences_per_s`).
Results: bench/results/inference.json and bench/results/inference.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "movie_reviews" / "validation.jsonl"
TRAIN = DATA.with_name("train.jsonl")
RESULTS = ROOT / "bench" / "results"
CONCURRENCIES = (1, 4, 16, 32, 64, 128)
STREAMS = 4  # ModelStreamInfer streams, sharing the highest concurrency between them
BATCH_SIZES = (1, 8, 16, 32, 64)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def texts() -> list[str]:
    return [json.loads(line)["text"] for line in DATA.read_text().splitlines() if line.strip()]


def export_base_package(directory: Path) -> Path:
    """MiniLM with a seeded random head, exported exactly as `loopline train` exports."""
    import torch
    from transformers import AutoTokenizer

    from loopline.package import Manifest, write_manifest
    from services.trainer.export import (
        ExportOptions,
        calibration_batches,
        save_tokenizer,
        write_graphs,
    )
    from services.trainer.modeling import build_classifier
    from services.trainer.presets import resolve_base_model

    source, name = resolve_base_model(None)
    torch.manual_seed(0)
    model = build_classifier(source, 2)
    tokenizer = AutoTokenizer.from_pretrained(source)
    # Static int8 scales are calibrated on training text, as `loopline train` does.
    train = [json.loads(line)["text"] for line in TRAIN.read_text().splitlines() if line.strip()]
    ids = tokenizer(train[:2000], truncation=True, max_length=128)["input_ids"]
    calibration = calibration_batches(ids, int(tokenizer.pad_token_id))
    variants, optimization = write_graphs(
        model.eval(), directory, ExportOptions(int8=True), calibration
    )
    save_tokenizer(tokenizer, directory)
    write_manifest(
        directory,
        Manifest(
            name="bench",
            version="1",
            labels=["negative", "positive"],
            max_length=128,
            pad_token_id=int(tokenizer.pad_token_id),
            unk_token_id=tokenizer.unk_token_id,
            embedding_dim=384,
            architecture="bert",
            base_model=name,
            variants=variants,
            default_cpu_variant="int8",
            optimization=optimization,
        ),
    )
    return directory


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {f"p{q}_ms": float("nan") for q in (50, 95, 99)}
    array = np.asarray(values) * 1000
    return {f"p{q}_ms": round(float(np.percentile(array, q)), 3) for q in (50, 95, 99)}


def in_process(package: Path, variant: str, corpus: list[str]) -> dict[str, Any]:
    """The ceiling: the worker's engine called directly, no queue, no network."""
    from loopline.package import read_manifest
    from loopline.runtime import PackageTokenizer, pad
    from services.inference.engines.onnx import OnnxEngine, OnnxOptions
    from services.inference.main import default_pad_multiple

    manifest = read_manifest(package)
    engine = OnnxEngine.load(package, manifest, OnnxOptions(cpu_variant=variant))  # type: ignore[arg-type]
    multiple = default_pad_multiple(engine.providers)  # batches padded as the worker pads them
    tokens = PackageTokenizer(package, manifest).tokenize(corpus)
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i].ids))
    rows: dict[str, Any] = {
        "variant": engine.variant,
        "pad_multiple": multiple,
        "batches": {},
        "cpu_ms_per_text": {},
    }
    for size in BATCH_SIZES:
        started, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            engine.run(*pad([tokens[i].ids for i in chunk], manifest.pad_token_id, multiple))
        rows["batches"][size] = round(len(order) / (time.perf_counter() - started), 1)
        rows["cpu_ms_per_text"][size] = round((time.process_time() - cpu) * 1000 / len(order), 3)
    lone = []
    for index in range(0, len(tokens), 5):
        started = time.perf_counter()
        engine.run(*pad([tokens[index].ids], manifest.pad_token_id))
        lone.append(time.perf_counter() - started)
    best = max(rows["batches"], key=rows["batches"].get)
    rows["ceiling_sentences_per_s"] = rows["batches"][best]
    rows["ceiling_cpu_ms_per_text"] = rows["cpu_ms_per_text"][best]
    rows["batch1_latency"] = percentiles(lone)
    engine.close()
    return rows


async def data_plane(
    package: Path, variant: str, corpus: list[str], concurrency: int, seconds: float, home: Path
) -> dict[str, Any]:
    """The worker's `DataPlane` with its batcher and engine, in this process, no gRPC: the same
    one text per request from `concurrency` callers."""
    from loopline.package import read_manifest
    from services.inference.handlers import InferRequest
    from services.inference.main import Worker
    from services.inference.models import ModelSource
    from services.inference.settings import InferenceSettings

    settings = InferenceSettings(
        models=[str(package)],
        cpu_variant=variant,  # type: ignore[arg-type]
        records=False,
        cache_dir=home / "cache",
    )
    worker = Worker(settings)  # not started: no heartbeat, no records, no alias watching
    model = read_manifest(package).name
    answered = 0
    try:
        await worker.repository.add(ModelSource.parse(str(package)))

        async def caller(offset: int, stop_at: float) -> None:
            nonlocal answered
            index = offset
            while time.monotonic() < stop_at:
                request = InferRequest(model=model, version="", texts=[corpus[index % len(corpus)]])
                await worker.plane.infer(request)
                answered += 1
                index += concurrency

        for duration in (2.0, seconds):  # a warm-up, then the measured run
            answered = 0
            started, cpu = time.monotonic(), time.process_time()
            stop_at = started + duration
            await asyncio.gather(*(caller(i, stop_at) for i in range(concurrency)))
            elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
    finally:
        await worker.stop()
    return {
        "concurrency": concurrency,
        "sentences_per_s": round(answered / elapsed, 1),
        # Callers, batcher and engine together: the worker's CPU per call less gRPC's.
        "cpu_ms_per_call": round(cpu * 1000 / answered, 3),
    }


def lone_in_process(engine: Any, ids: list[list[int]], pad_id: int) -> list[float]:
    """Seconds per call for each text run alone (batch 1), as the worker runs a lone text."""
    from loopline.runtime import pad

    latencies = []
    for row in ids:
        started = time.perf_counter()
        engine.run(*pad([row], pad_id))
        latencies.append(time.perf_counter() - started)
    return latencies


async def lone_rounds(
    package: Path, variant: str, corpus: list[str], address: str, model: str, rounds: int = 3
) -> dict[str, Any]:
    """A lone request through the worker against the same text alone in-process, measured in
    alternating rounds (in-process, worker, in-process, ...) so that a machine getting busier
    part-way through moves both sides alike; the worker idles (no spinning) while in-process runs.
    """
    from loopline.package import read_manifest
    from loopline.runtime import PackageTokenizer
    from services.inference.engines.onnx import OnnxEngine, OnnxOptions

    manifest = read_manifest(package)
    engine = OnnxEngine.load(package, manifest, OnnxOptions(cpu_variant=variant))  # type: ignore[arg-type]
    sample = corpus[::4]
    ids = [t.ids for t in PackageTokenizer(package, manifest).tokenize(sample)]
    local: list[float] = []
    remote: list[float] = []
    try:
        for _ in range(rounds):
            local += lone_in_process(engine, ids, manifest.pad_token_id)
            await drive(address, model, sample, 1, 2.0, samples=remote)
    finally:
        engine.close()
    in_process_p50 = percentiles(local)["p50_ms"]
    worker_p50 = percentiles(remote)["p50_ms"]
    return {
        "rounds": rounds,
        "in_process_batch1": percentiles(local),
        "worker": percentiles(remote),
        "overhead_p50_ms": round(worker_p50 - in_process_p50, 3),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_worker(package: Path, variant: str, home: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(
        os.environ,
        LOOPLINE_INFERENCE_MODELS=json.dumps([str(package)]),
        LOOPLINE_INFERENCE_PORT=str(port),
        LOOPLINE_INFERENCE_CPU_VARIANT=variant,
        LOOPLINE_INFERENCE_RECORDS="0",
        LOOPLINE_INFERENCE_CACHE_DIR=str(home / "cache"),
        LOOPLINE_REDIS_URL="redis://127.0.0.1:1/0",
        LOOPLINE_LOG_LEVEL="WARNING",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "services.inference"],
        env=env,
        stdout=(RESULTS / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    return process, f"127.0.0.1:{port}"


async def wait_ready(address: str, timeout: float = 120) -> None:
    import grpc

    from loopline.oip import grpc_service_pb2 as pb
    from loopline.oip import grpc_service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if (await stub.ServerReady(pb.ServerReadyRequest(), timeout=1)).ready:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(address)


def label_requests(model: str, corpus: list[str]) -> list[Any]:
    """One ModelInfer request per text asking for the label only, with the text's index as id."""
    from loopline.oip import grpc_service_pb2 as pb
    from services.inference.convert import encode_bytes_tensor

    requests = []
    for index, text in enumerate(corpus):
        request = pb.ModelInferRequest(model_name=model, id=str(index))
        request.inputs.add(name="text", datatype="BYTES", shape=[1])
        request.outputs.add(name="label")
        request.raw_input_contents.append(encode_bytes_tensor([text.encode()]))
        requests.append(request)
    return requests


async def drive(
    address: str,
    model: str,
    corpus: list[str],
    concurrency: int,
    seconds: float,
    samples: list[float] | None = None,
    worker_pid: int | None = None,
) -> dict[str, Any]:
    """`concurrency` callers, one text per request, for `seconds`; latencies also go to
    `samples` when given. The row has the CPU each answered call cost this process (the load
    generator) and, with `worker_pid`, the worker process."""
    import grpc

    from loopline.oip import grpc_service_pb2_grpc as pb_grpc

    requests = label_requests(model, corpus)
    latencies: list[float] = []
    errors = 0
    cpu = CpuMeter({"worker": worker_pid} if worker_pid is not None else {})
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def caller(offset: int) -> None:
            nonlocal errors
            index = offset
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    await stub.ModelInfer(requests[index % len(requests)], timeout=30)
                    latencies.append(time.perf_counter() - started)
                except grpc.aio.AioRpcError:
                    errors += 1
                index += concurrency

        started = time.monotonic()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        elapsed = time.monotonic() - started
    if samples is not None:
        samples.extend(latencies)
    return {
        "concurrency": concurrency,
        "sentences_per_s": round(len(latencies) / elapsed, 1),
        "requests": len(latencies),
        "errors": errors,
        **percentiles(latencies),
        **cpu.per_call(len(latencies)),
    }


class CpuMeter:
    """CPU seconds used since construction by each named process (from /proc) and by this one,
    the load generator (`client`)."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.start = self._now()

    def _now(self) -> dict[str, float]:
        now = {name: process_cpu_seconds(pid) for name, pid in self.pids.items()}
        now["client"] = time.process_time()
        return now

    def used(self) -> dict[str, float]:
        now = self._now()
        return {name: now[name] - self.start[name] for name in now}

    def per_call(self, calls: int) -> dict[str, float]:
        """`<name>_cpu_ms_per_call` for every process; nothing when no call was answered."""
        if not calls:
            return {}
        return {
            f"{name}_cpu_ms_per_call": round(used * 1000 / calls, 3)
            for name, used in self.used().items()
        }


async def drive_streams(
    address: str,
    model: str,
    corpus: list[str],
    streams: int,
    window: int,
    seconds: float,
    worker_pid: int | None = None,
) -> dict[str, Any]:
    """`streams` ModelStreamInfer streams, each keeping `window` requests of one text in flight:
    a client that holds a stream instead of making one call per text. A stream that breaks
    counts what it had in flight as errors; the others go on."""
    import grpc

    from loopline.oip import grpc_service_pb2_grpc as pb_grpc

    requests = label_requests(model, corpus)
    latencies: list[float] = []
    errors = answered = 0
    cpu = CpuMeter({"worker": worker_pid} if worker_pid is not None else {})
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def stream(offset: int) -> None:
            # Stream `offset` sends texts offset, offset + streams, ...: ids in flight stay
            # unique as long as `window` < len(corpus) / streams.
            nonlocal errors, answered
            call = stub.ModelStreamInfer(timeout=seconds + 60)
            sent: dict[str, float] = {}
            slots = asyncio.Semaphore(window)

            async def write() -> None:
                index = offset
                while time.monotonic() < stop_at:
                    await slots.acquire()
                    request = requests[index % len(requests)]
                    sent[request.id] = time.perf_counter()
                    await call.write(request)
                    index += streams
                await call.done_writing()

            writer = asyncio.get_running_loop().create_task(write())
            try:
                async for answer in call:
                    began = sent.pop(answer.infer_response.id)
                    answered += 1
                    if answer.error_message:
                        errors += 1
                    elif time.monotonic() < stop_at:
                        latencies.append(time.perf_counter() - began)
                    slots.release()
                await writer
            except grpc.aio.AioRpcError:
                errors += max(len(sent), 1)
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await writer

        started = time.monotonic()
        await asyncio.gather(*(stream(i) for i in range(streams)))
    return {
        "streams": streams,
        "window": window,
        "concurrency": streams * window,
        "sentences_per_s": round(len(latencies) / (stop_at - started), 1),
        "requests": len(latencies),
        "errors": errors,
        **percentiles(latencies),
        **cpu.per_call(answered),
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["worker"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["sentences_per_s"] for r in rows], [r["p50_ms"] for r in rows], "o-", label="p50")
    ax.plot([r["sentences_per_s"] for r in rows], [r["p99_ms"] for r in rows], "s--", label="p99")
    for r in rows:
        ax.annotate(str(r["concurrency"]), (r["sentences_per_s"], r["p50_ms"]))
    ax.axvline(
        results["summary"]["ceiling_sentences_per_s"],
        color="grey",
        linestyle=":",
        label="in-process ceiling",
    )
    ax.axvline(
        results["data_plane"]["sentences_per_s"],
        color="tab:green",
        linestyle="-.",
        label=f"data plane, no gRPC (c={results['data_plane']['concurrency']})",
    )
    streamed = results["worker_streams"]
    ax.plot(
        [streamed["sentences_per_s"]],
        [streamed["p50_ms"]],
        "D",
        label=f"{streamed['streams']} streams x {streamed['window']} (p50)",
    )
    ax.set_xlabel("sentences/s")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"worker ({results['variant']}) throughput vs latency, by concurrency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def run(package: Path, variant: str, seconds: float) -> dict[str, Any]:
    from loopline.package import read_manifest

    corpus = texts()
    results: dict[str, Any] = {
        "variant": variant,
        "texts": len(corpus),
        "cpu_count": os.cpu_count(),
        "package": str(package),
    }
    results["in_process"] = in_process(package, variant, corpus)
    with tempfile.TemporaryDirectory() as home:
        results["data_plane"] = await data_plane(
            package, variant, corpus, CONCURRENCIES[-1], seconds, Path(home)
        )
        process, address = start_worker(package, variant, Path(home))
        try:
            await wait_ready(address)
            model = read_manifest(package).name
            await drive(address, model, corpus, 4, 2.0)  # warm-up
            results["worker"] = [
                await drive(address, model, corpus, c, seconds, worker_pid=process.pid)
                for c in CONCURRENCIES
            ]
            results["worker_streams"] = await drive_streams(
                address,
                model,
                corpus,
                STREAMS,
                CONCURRENCIES[-1] // STREAMS,
                seconds,
                worker_pid=process.pid,
            )
            results["lone"] = await lone_rounds(package, variant, corpus, address, model)
            results["worker_rss_mb_under_load"] = rss_mb(process.pid)
            # The worker returns freed memory after one whole quiet interval
            # (LOOPLINE_INFERENCE_MEMORY_TRIM_SECONDS, 2 s): within 4 s of the last request.
            await asyncio.sleep(5)
            results["worker_rss_mb"] = rss_mb(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    results["in_process_after"] = in_process(package, variant, corpus)
    ceiling_row = max(
        results["in_process"],
        results["in_process_after"],
        key=lambda r: r["ceiling_sentences_per_s"],
    )
    best_row = max(results["worker"], key=lambda r: r["sentences_per_s"])
    best = best_row["sentences_per_s"]
    ceiling = ceiling_row["ceiling_sentences_per_s"]
    lone = results["lone"]["overhead_p50_ms"]
    results["summary"] = {
        "worker_best_sentences_per_s": best,
        "worker_best_concurrency": best_row["concurrency"],
        "ceiling_sentences_per_s": ceiling,
        "ceiling_before_and_after": [
            results["in_process"]["ceiling_sentences_per_s"],
            results["in_process_after"]["ceiling_sentences_per_s"],
        ],
        "worker_vs_ceiling": round(best / ceiling, 3),
        "worker_streams_sentences_per_s": results["worker_streams"]["sentences_per_s"],
        "worker_streams_vs_ceiling": round(
            results["worker_streams"]["sentences_per_s"] / ceiling, 3
        ),
        "data_plane_sentences_per_s": results["data_plane"]["sentences_per_s"],
        "data_plane_vs_ceiling": round(results["data_plane"]["sentences_per_s"] / ceiling, 3),
        "data_plane_cpu_ms_per_call": results["data_plane"]["cpu_ms_per_call"],
        "lone_request_p50_ms": results["lone"]["worker"]["p50_ms"],
        "in_process_batch1_p50_ms": results["lone"]["in_process_batch1"]["p50_ms"],
        "lone_request_overhead_ms": round(lone, 3),
        "worker_rss_mb_right_after_load": results["worker_rss_mb_under_load"],
        "worker_rss_mb": results["worker_rss_mb"],
        **cpu_budget(ceiling_row, best_row, results["cpu_count"]),
    }
    return results


def cpu_budget(in_process: dict[str, Any], row: dict[str, Any], cores: int) -> dict[str, Any]:
    """What the CPU a call costs allows on this machine, every process sharing its cores: the
    load generator's and the worker's CPU per answered call at the best concurrency against
    the in-process engine's per text. `cpu_bound` is the rate at which both would keep every
    core busy, with no idle time at all: no worker can beat it without spending less CPU per
    call."""
    engine = in_process["ceiling_cpu_ms_per_text"]
    if "worker_cpu_ms_per_call" not in row:  # the worker answered nothing at any level
        return {"ceiling_cpu_ms_per_text": engine}
    worker, client = row["worker_cpu_ms_per_call"], row["client_cpu_ms_per_call"]
    bound = cores * 1000 / (worker + client)
    return {
        "ceiling_cpu_ms_per_text": engine,
        "worker_cpu_ms_per_call": worker,
        "worker_cpu_ms_per_call_beyond_engine": round(worker - engine, 3),
        "client_cpu_ms_per_call": client,
        "cpu_bound_sentences_per_s": round(bound, 1),
        "cpu_bound_vs_ceiling": round(bound / in_process["ceiling_sentences_per_s"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, help="model package folder (default: base MiniLM)")
    parser.add_argument("--variant", default="int8", choices=["int8", "fp32"])
    parser.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    package = args.package or export_base_package(RESULTS / "minilm-package")
    results = asyncio.run(run(package, args.variant, args.seconds))
    (RESULTS / "inference.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "inference.png")
    print(json.dumps(results["in_process"], indent=2))
    for row in results["worker"]:
        print(row)
    print("streams:", results["worker_streams"])
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
