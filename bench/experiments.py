"""How long an experiment change takes to reach every router.

A router routes from its `ExperimentCache`, which polls the store's version key and reloads on a
change. This benchmark runs a private `redis-server`, one writer (`ExperimentStore`, what the
router that takes an admin call uses) and several caches with their own connections (the other
routers), changes one experiment's weights many times at random moments, and measures, for every
change, the time from the write's return until the last cache holds it. Target: within 1 s.

    python -m bench.experiments [--routers 8] [--changes 60]

Figures print and go to bench/results/experiments.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.router import services, start_redis, wait_redis
from loopline.redis import connect
from services.router.domain import ModelRef
from services.router.experiments import (
    Experiment,
    ExperimentCache,
    ExperimentStore,
    Status,
    Variant,
)

RESULTS = Path(__file__).parent / "results"
TARGET_SECONDS = 1.0


def _experiment() -> Experiment:
    return Experiment(
        id="exp-bench",
        name="propagation",
        model="sentiment",
        variants=[
            Variant("control", ModelRef("sentiment", "1"), 50.0),
            Variant("candidate", ModelRef("sentiment", "2"), 50.0),
        ],
        status=Status.RUNNING,
    )


def _weight(cache: ExperimentCache) -> float | None:
    exp = cache.get("exp-bench")
    return exp.variants[1].weight if exp is not None else None


async def measure(redis_url: str, routers: int, changes: int, poll: float) -> dict[str, Any]:
    writer_client = connect(redis_url)
    store = ExperimentStore(writer_client)
    await store.create(_experiment())
    clients = [connect(redis_url) for _ in range(routers)]
    caches = [ExperimentCache(ExperimentStore(c), poll_interval=poll) for c in clients]
    for cache in caches:
        await cache.refresh()
        cache.start()
    rng = random.Random(5)
    delays: list[float] = []
    try:
        for n in range(changes):
            await asyncio.sleep(rng.uniform(0.0, 2 * poll))  # land anywhere in the poll cycle
            weight = float(n % 99 + 1)

            def reweigh(exp: Experiment, weight: float = weight) -> Experiment:
                control, candidate = exp.variants
                return replace(
                    exp,
                    variants=[
                        replace(control, weight=100 - weight),
                        replace(candidate, weight=weight),
                    ],
                )

            await store.update("exp-bench", reweigh)
            written = time.perf_counter()
            while any(_weight(cache) != weight for cache in caches):
                await asyncio.sleep(0.001)
                if time.perf_counter() - written > 10:
                    raise TimeoutError(f"change {n} did not reach every cache within 10 s")
            delays.append(time.perf_counter() - written)
    finally:
        for cache in caches:
            await cache.stop()
        for client in [*clients, writer_client]:
            await client.aclose()
    ordered = sorted(delays)
    return {
        "routers": routers,
        "changes": changes,
        "poll_interval_s": poll,
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "max_ms": round(1000 * ordered[-1], 1),
        "target_ms": 1000 * TARGET_SECONDS,
        "met": ordered[-1] <= TARGET_SECONDS,
    }


async def main_async(routers: int, changes: int, poll: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch, services() as running:
        redis = start_redis(Path(scratch))
        running.append(redis)
        await wait_redis(redis)
        return await measure(f"redis://{redis.address}/0", routers, changes, poll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routers", type=int, default=8, help="caches, one per router")
    parser.add_argument("--changes", type=int, default=60, help="weight changes to time")
    parser.add_argument("--poll", type=float, default=0.25, help="the routers' poll interval (s)")
    args = parser.parse_args()
    result = asyncio.run(main_async(args.routers, args.changes, args.poll))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "experiments.json").write_text(json.dumps(result, indent=2) + "\n")
    verdict = "met" if result["met"] else "MISSED"
    print(
        f"experiment change reaches all {result['routers']} routers: p50 {result['p50_ms']} ms, "
        f"p99 {result['p99_ms']} ms, max {result['max_ms']} ms over {result['changes']} changes "
        f"(poll {result['poll_interval_s']} s; target max {result['target_ms']:.0f} ms: {verdict})"
    )


if __name__ == "__main__":
    main()
