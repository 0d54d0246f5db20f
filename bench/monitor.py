"""Monitor consumption throughput: records folded per second by one consumer.

    python -m bench.monitor [--records 50000] [--feedback 0.3] [--batch 500]

A private `redis-server` on a free port (never the machine's 6379) gets N realistic inference
records (two model versions, an A/B experiment with a shadow on a tenth of the traffic, a 16-float
sketch and a ~300-character text each, written by `InferenceRecord.to_fields`) and feedback for a
share of their request ids, all written before the clock starts. Then ONE `Consumer`, in this
process, folds the backlog through its real loop (`run()`: read script, fold script, XACK,
XAUTOCLAIM ticks) until every entry is acknowledged; records/s = entries / wall time. Feedback
is in the same backlog, so the consumer meets labels both before and after their predictions.

The fold is checked afterwards: requests and labelled counts must equal what was written.
CPU seconds of this process and of redis-server (INFO cpu) show where the time goes. The load
average before and after is recorded: on a shared 2-core machine, quote it with the figure.
Results: bench/results/monitor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from loopline.redis import connect, wait_ready, xadd_many
from services.inference.records import InferenceRecord
from services.monitor.consumer import FEEDBACK_STREAM, INFERENCE_STREAM, Consumer

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RECORDS_PER_S = 10_000
WORDS = (
    *("the", "movie", "was", "great", "awful", "boring", "touching", "plot", "acting"),
    *("score", "scenes", "long", "short", "and", "a", "it", "not", "very", "quite"),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server without persistence; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as workdir:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", workdir]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


def make_record(i: int, rng: random.Random, now: float) -> InferenceRecord:
    """One plausible record: 45 % variant a (v1), 45 % b (v2), 10 % also mirrored to a shadow."""
    p = rng.betavariate(5, 1.5)
    label = rng.choice(("positive", "negative"))
    variant = "a" if i % 2 else "b"
    return InferenceRecord(
        request_id=f"req-{i:08d}-{rng.getrandbits(32):08x}",
        time=now - 600 + i * 600 / 100_000,
        model="sentiment",
        version="1" if variant == "a" else "2",
        experiment="exp-1",
        variant=variant,
        user_bucket=str(rng.randrange(100)),
        label=label,
        probabilities=[p, 1 - p],
        labels=[label, "negative" if label == "positive" else "positive"],
        token_count=rng.randint(8, 200),
        unknown_share=rng.random() * 0.05,
        truncated=rng.random() < 0.02,
        queue_ms=rng.expovariate(1.0),
        compute_ms=rng.lognormvariate(1.5, 0.4),
        batch_size=rng.choice((1, 4, 8, 16)),
        sketch=[rng.gauss(0, 1) for _ in range(16)],
        text=" ".join(rng.choice(WORDS) for _ in range(50)),
        language="en",
    )


def shadow_of(record: InferenceRecord, rng: random.Random) -> InferenceRecord:
    flipped = "negative" if record.label == "positive" else "positive"
    label = record.label if rng.random() < 0.9 else flipped
    return InferenceRecord(
        **{**record.__dict__, "version": "3", "variant": "shadow", "label": label, "shadow": True}
    )


async def write_backlog(url: str, records: int, feedback: float) -> dict[str, int]:
    """Write the records and feedback; returns how many of each kind."""
    rng = random.Random(0)
    client = connect(url)
    now = time.time()
    served = shadows = labels = 0
    batch: list[dict[str, str]] = []
    answers: list[tuple[str, str]] = []
    for i in range(records):
        record = make_record(i, rng, now)
        batch.append(record.to_fields())
        served += 1
        if rng.random() < 0.1:
            batch.append(shadow_of(record, rng).to_fields())
            shadows += 1
        if rng.random() < feedback:
            truth = record.label if rng.random() < 0.85 else "other"
            answers.append((record.request_id, truth))
        if len(batch) >= 1000:
            await xadd_many(client, INFERENCE_STREAM, batch)
            batch = []
    await xadd_many(client, INFERENCE_STREAM, batch)
    for start in range(0, len(answers), 1000):
        rows: list[dict[str, str | int | float | bytes]] = [
            {"request_id": rid, "label": truth, "user_id": "", "source": "bench",
             "metadata": "{}", "time": f"{now:.6f}", "received": f"{now:.6f}"}
            for rid, truth in answers[start : start + 1000]
        ]  # fmt: skip
        await xadd_many(client, FEEDBACK_STREAM, rows)
        labels += len(rows)
    await client.aclose()
    return {"served": served, "shadows": shadows, "labels": labels}


async def redis_cpu(url: str) -> float:
    client = connect(url)
    info: dict[str, Any] = await client.info("cpu")
    await client.aclose()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def fold_backlog(url: str, entries: int, batch: int) -> dict[str, Any]:
    """Run one consumer until it has acknowledged `entries`; returns timing and its stats."""
    consumer = Consumer(url, batch=batch, block_ms=200, registry=CollectorRegistry())
    redis_before, cpu_before = await redis_cpu(url), own_cpu()
    started = time.perf_counter()
    task = asyncio.create_task(consumer.run())
    while consumer.stats.entries < entries and not task.done():
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - started
    cpu = own_cpu() - cpu_before
    await consumer.stop()
    await task
    return {
        "seconds": elapsed,
        "consumer_cpu_seconds": cpu,
        "redis_cpu_seconds": await redis_cpu(url) - redis_before,
        "stats": consumer.stats.__dict__,
    }


async def check(url: str, written: dict[str, int]) -> dict[str, Any]:
    from services.monitor.state import State

    client = connect(url)
    state = State(client)
    total = await state.window_totals("sentiment")
    await client.aclose()
    expected = written["served"] + written["shadows"]
    return {
        "requests": total.requests,
        "requests_expected": expected,
        "labelled": total.labelled,
        "exact": total.requests == expected,
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with redis_server() as url:
        client = connect(url)
        await wait_ready(client)
        await client.aclose()
        write_started = time.perf_counter()
        written = await write_backlog(url, args.records, args.feedback)
        write_s = time.perf_counter() - write_started
        entries = written["served"] + written["shadows"] + written["labels"]
        load_before, uptime_before = load_average(), uptime()
        folded = await fold_backlog(url, entries, args.batch)
        load_after = load_average()
        verdict = await check(url, written)
    rate = entries / folded["seconds"]
    cpu = (folded["consumer_cpu_seconds"], folded["redis_cpu_seconds"])
    return {
        "records_per_second": round(rate),
        # Less sensitive to a busy machine than the wall-clock rate: records per CPU second of
        # consumer + Redis together (the rate if they took turns on one idle core), and the
        # ceiling when each has an idle core (the consumer overlaps its parsing with the fold).
        "records_per_cpu_second": round(entries / sum(cpu)),
        "records_per_second_two_idle_cores": round(entries / max(cpu)),
        "target_records_per_second": TARGET_RECORDS_PER_S,
        "meets_target": rate >= TARGET_RECORDS_PER_S,
        "entries": entries,
        "written": written,
        "write_seconds": round(write_s, 2),
        "fold_seconds": round(folded["seconds"], 3),
        "consumer_cpu_seconds": round(folded["consumer_cpu_seconds"], 2),
        "redis_cpu_seconds": round(folded["redis_cpu_seconds"], 2),
        "batch": args.batch,
        "consumer": folded["stats"],
        "check": verdict,
        "uptime_before": uptime_before,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000, help="inference records (served)")
    parser.add_argument("--feedback", type=float, default=0.3, help="share that gets a label")
    parser.add_argument("--batch", type=int, default=500, help="consumer batch per stream")
    parser.add_argument("--out", type=Path, default=RESULTS / "monitor.json")
    args = parser.parse_args()
    result = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{result['records_per_second']:,} records/s folded by one consumer "
        f"({result['entries']:,} entries in {result['fold_seconds']} s; target "
        f"{TARGET_RECORDS_PER_S:,}); consumer CPU {result['consumer_cpu_seconds']} s, "
        f"redis CPU {result['redis_cpu_seconds']} s ({result['records_per_cpu_second']:,} "
        f"records per CPU second); exact: {result['check']['exact']}; "
        f"load average {result['load_average_before']} -> {result['load_average_after']}"
    )


if __name__ == "__main__":
    main()
