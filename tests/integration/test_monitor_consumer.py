"""Monitor consumers as real processes (`python -m services.monitor.consumer`) against a private
redis-server: two consumers sharing a group, one killed with SIGKILL mid-batch and replaced,
Redis stopped and restarted under a running consumer. Every record must be counted exactly once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis

from loopline.redis import connect, xadd_many
from services.inference.records import InferenceRecord
from services.monitor.consumer import DEFAULT_GROUP, FEEDBACK_STREAM, INFERENCE_STREAM
from services.monitor.state import State, Totals
from tests.fixtures.waiting import until

if TYPE_CHECKING:
    from tests.fixtures.redis import RedisServer

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Written:
    """What a test wrote, and what the monitor must therefore count."""

    requests: int = 0  # served + shadow predictions
    labelled: int = 0  # predictions (served and shadow) whose request got a label
    correct: int = 0


class Monitor:
    """One consumer process; its JSON log lines go to a file the test can read."""

    def __init__(self, url: str, log: Path, *args: str) -> None:
        self.log = log
        command = [sys.executable, "-m", "services.monitor.consumer", "--redis-url", url]
        command += ["--block-ms", "200", "--claim-idle-ms", "1000", "--log-json", *args]
        with log.open("ab") as sink:
            self.process = subprocess.Popen(command, cwd=ROOT, stderr=sink)

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def said(self, message: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("message", "").startswith(message)]

    def terminate(self) -> dict[str, Any]:
        """SIGTERM, wait, and return the final stats line."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=15) == 0, self.log.read_text()[-3000:]
        (stopped,) = self.said("monitor consumer stopped")
        return stopped

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=5)


@pytest.fixture
def monitors(tmp_path: Path) -> Iterator[Callable[..., Monitor]]:
    started: list[Monitor] = []

    def start(url: str, name: str, *args: str) -> Monitor:
        monitor = Monitor(url, tmp_path / f"{name}.log", "--name", name, *args)
        started.append(monitor)
        return monitor

    yield start
    for monitor in started:
        if monitor.process.poll() is None:
            monitor.kill()


def record(rid: str, label: str, *, shadow: bool = False) -> dict[str, str]:
    return InferenceRecord(
        request_id=rid,
        time=time.time(),
        model="sentiment",
        version="2" if shadow else "1",
        experiment="exp",
        variant="shadow" if shadow else ("a" if hash(rid) % 2 else "b"),
        user_bucket="7",
        label=label,
        probabilities=[0.9, 0.1],
        labels=[label, "other"],
        token_count=20,
        unknown_share=0.0,
        truncated=False,
        queue_ms=0.5,
        compute_ms=3.0,
        batch_size=8,
        sketch=[0.1] * 16,
        text="some review text " * 10,
        shadow=shadow,
    ).to_fields()


def feedback(rid: str, label: str) -> dict[str, str]:
    return {"request_id": rid, "label": label, "source": "test", "time": f"{time.time():.6f}"}


async def _write(
    url: str, count: int, prefix: str, *, early_labels: bool = True, chunk: int = 250
) -> Written:
    """`count` served predictions (every 10th also shadowed), labels for every 3rd request:
    a third of those written before the predictions, the rest after."""
    client = connect(url)
    written = Written()
    labels: list[tuple[str, str, list[str]]] = []  # (request id, truth, predicted answers)
    preds: list[dict[str, str]] = []
    for i in range(count):
        rid = f"{prefix}-{i:06d}"
        served = "positive" if i % 2 else "negative"
        answers = [served]
        preds.append(record(rid, served))
        if i % 10 == 0:
            preds.append(record(rid, "positive", shadow=True))
            answers.append("positive")
        if i % 3 == 0:
            labels.append((rid, "positive" if i % 4 else "negative", answers))
    early = labels[: len(labels) // 3] if early_labels else []
    late = labels[len(early) :]
    await xadd_many(client, FEEDBACK_STREAM, [feedback(r, t) for r, t, _ in early])
    for start in range(0, len(preds), chunk):
        await xadd_many(client, INFERENCE_STREAM, preds[start : start + chunk])
    for start in range(0, len(late), chunk):
        await xadd_many(
            client, FEEDBACK_STREAM, [feedback(r, t) for r, t, _ in late[start : start + chunk]]
        )
    await client.aclose()
    written.requests = len(preds)
    for _rid, truth, answers in labels:
        written.labelled += len(answers)
        written.correct += sum(answer == truth for answer in answers)
    return written


def write(url: str, count: int, prefix: str, **kwargs: Any) -> Written:
    return asyncio.run(_write(url, count, prefix, **kwargs))


def totals(url: str) -> Totals:
    async def read() -> Totals:
        client = connect(url)
        try:
            return await State(client).window_totals("sentiment")
        finally:
            await client.aclose()

    return asyncio.run(read())


def pending(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return sum(
            int(client.xpending(stream, DEFAULT_GROUP)["pending"])
            for stream in (INFERENCE_STREAM, FEEDBACK_STREAM)
        )


def counted(url: str) -> tuple[int, int, int]:
    t = totals(url)
    return t.requests, t.labelled, t.correct


def wait_until_counted(
    url: str, expected: Written, monitors: list[Monitor], timeout: float = 30
) -> None:
    """Poll until the totals equal what was written and nothing is pending; then make sure
    they stay there (a late reclaim must not count anything twice)."""
    target = (expected.requests, expected.labelled, expected.correct)
    deadline = time.monotonic() + timeout
    while counted(url) != target or pending(url):
        for m in monitors:
            assert m.process.poll() in (None, 0), m.log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"counted {counted(url)}, wanted {target}"
        time.sleep(0.1)
    time.sleep(1.5)  # longer than claim-idle-ms: any reclaim would have happened
    assert counted(url) == target


def wait_joined(url: str, names: set[str], timeout: float = 30) -> None:
    """Until every consumer in `names` has read from the inference stream's group: started
    processes import for a second or two, and one consumer alone can drain 3,300 records."""

    def joined() -> bool:
        with redis.Redis.from_url(url) as client:
            try:
                consumers = client.xinfo_consumers(INFERENCE_STREAM, DEFAULT_GROUP)
            except redis.ResponseError:
                return False  # the group does not exist yet
        return names <= {_name(c["name"]) for c in consumers}

    until(joined, f"consumers {sorted(names)} in the group", timeout=timeout)


def _name(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def test_two_consumers_share_a_group_and_count_every_record_once(
    redis_url: str, monitors: Callable[..., Monitor]
) -> None:
    first = monitors(redis_url, "first", "--batch", "100")
    second = monitors(redis_url, "second", "--batch", "100")
    wait_joined(redis_url, {"first", "second"})
    expected = write(redis_url, 3000, "two")
    assert (expected.requests, expected.labelled) == (3300, 1100)

    wait_until_counted(redis_url, expected, [first, second])
    stats = [first.terminate(), second.terminate()]
    assert all(s["predictions"] > 0 for s in stats), stats  # both did part of the work
    assert sum(s["predictions"] for s in stats) == expected.requests
    assert sum(s["labels"] for s in stats) == 1000  # one label per labelled request
    assert sum(s["malformed"] for s in stats) == 0


def test_a_consumer_killed_mid_batch_loses_and_doubles_nothing(
    redis_url: str, monitors: Callable[..., Monitor]
) -> None:
    # The pause between fold and ack makes the kill land on a folded, unacknowledged batch.
    doomed = monitors(redis_url, "doomed", "--batch", "200", "--ack-delay-ms", "400")
    expected = write(redis_url, 2000, "kill")
    deadline = time.monotonic() + 20
    while not (totals(redis_url).requests > 0 and pending(redis_url) > 0):
        assert time.monotonic() < deadline, doomed.log.read_text()[-3000:]
        time.sleep(0.02)
    doomed.kill()
    assert pending(redis_url) > 0  # the dead consumer holds entries it read but never acked

    replacement = monitors(redis_url, "replacement", "--batch", "200")
    wait_until_counted(redis_url, expected, [replacement])
    stats = replacement.terminate()
    assert stats["reclaimed"] > 0
    assert stats["duplicates"] > 0  # the batch the dead consumer had folded: not counted again


def test_a_consumer_rides_out_a_redis_restart(
    redis_url: str, redis_server: RedisServer, monitors: Callable[..., Monitor]
) -> None:
    monitor = monitors(redis_url, "survivor", "--batch", "100")
    before = write(redis_url, 300, "before")
    wait_until_counted(redis_url, before, [monitor])

    redis_server.stop()
    time.sleep(1.0)  # the consumer notices: its blocking read fails
    redis_server.start()  # empty: this Redis keeps nothing across restarts
    after = write(redis_url, 500, "after")
    wait_until_counted(redis_url, after, [monitor])

    stats = monitor.terminate()
    assert stats["outages"] == 1
    assert len(monitor.said("Redis unreachable")) == 1  # logged once, not per retry
    assert monitor.said("Redis reachable again")
    assert monitor.said("consumer group recreated") or monitor.said("consumer group missing")
    assert stats["predictions"] == before.requests + after.requests
    assert stats["duplicates"] == 0


def test_malformed_entries_are_acknowledged_and_reported_once(
    redis_url: str, monitors: Callable[..., Monitor]
) -> None:
    monitor = monitors(redis_url, "picky", "--batch", "50")
    expected = write(redis_url, 100, "ok", early_labels=False)

    async def garbage() -> None:
        client = connect(redis_url)
        bad = [{"model": "sentiment", "label": "x"}, {"request_id": "r", "version": "1"}] * 3
        await xadd_many(client, INFERENCE_STREAM, bad)
        await xadd_many(client, FEEDBACK_STREAM, [{"label": "positive"}])
        await client.aclose()

    asyncio.run(garbage())
    wait_until_counted(redis_url, expected, [monitor])
    stats = monitor.terminate()
    assert stats["malformed"] == 7
    kinds = sorted(line["kind"] for line in monitor.said("unreadable stream entry"))
    assert kinds == [
        "feedback.missing_request_id",
        "inference.missing_model",
        "inference.missing_request_id",
    ]
