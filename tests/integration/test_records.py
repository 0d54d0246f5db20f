"""The record writer against a private redis-server: order, MAXLEN, outages, spool and replay."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from loopline.redis import connect, wait_ready
from services.inference.records import InferenceRecord, RecordWriter, Spool

if TYPE_CHECKING:
    from tests.fixtures.redis import RedisServer

pytest_plugins = ["tests.fixtures.redis"]

STREAM = "test:inference"


def record(i: int) -> InferenceRecord:
    return InferenceRecord(
        request_id=f"req-{i:05d}",
        time=time.time(),
        model="sentiment",
        version="1",
        experiment="",
        variant="",
        user_bucket=str(i % 10),
        label="positive" if i % 2 else "negative",
        probabilities=[0.25, 0.75] if i % 2 else [0.75, 0.25],
        labels=["negative", "positive"],
        token_count=5 + i % 7,
        unknown_share=0.0,
        truncated=False,
        queue_ms=0.5,
        compute_ms=2.0,
        batch_size=8,
        sketch=[0.01 * i] * 16,
        text=f"review {i}",
    )


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


async def stream_fields(url: str) -> list[dict[bytes, bytes]]:
    """The stream's entries, in order (a fresh client each time: Redis may have restarted)."""
    client = connect(url)
    try:
        await wait_ready(client, timeout=10)
        entries: Any = await client.xrange(STREAM)
    finally:
        await client.aclose()
    return [fields for _id, fields in entries]


async def stream_ids(url: str) -> list[str]:
    """The request ids in the stream, in stream order."""
    return [fields[b"request_id"].decode() for fields in await stream_fields(url)]


def make_writer(url: str, spool: Path, **options: Any) -> RecordWriter:
    options = {"batch_size": 16, "flush_interval": 0.01, "max_backoff": 0.2, **options}
    return RecordWriter(url, STREAM, spool_path=spool, registry=CollectorRegistry(), **options)


@asynccontextmanager
async def running(writer: RecordWriter) -> AsyncIterator[RecordWriter]:
    writer.start()
    try:
        yield writer
    finally:
        await writer.flush_and_close(timeout=10)


def test_records_arrive_in_order_with_their_fields(redis_url: str, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    sent = [record(i) for i in range(100)]

    async def main() -> None:
        writer = RecordWriter(
            redis_url, STREAM, batch_size=16, spool_path=tmp_path / "s", registry=registry
        )
        async with running(writer):
            for item in sent:
                writer.submit(item)
            await eventually(lambda: writer.written == 100, "100 records written")
        back = [InferenceRecord.from_fields(f) for f in await stream_fields(redis_url)]
        assert [r.request_id for r in back] == [r.request_id for r in sent]
        assert back[3].text == "review 3"
        assert back[3].probabilities == [0.25, 0.75]
        assert back[3].sketch == [0.03] * 16

    asyncio.run(main())
    assert registry.get_sample_value("loopline_records_written_total") == 100
    assert registry.get_sample_value("loopline_records_spooled_total") == 0


def test_maxlen_keeps_the_stream_bounded(redis_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        writer = make_writer(redis_url, tmp_path / "s", maxlen=50, batch_size=64)
        async with running(writer):
            for i in range(600):
                writer.submit(record(i))
            await eventually(lambda: writer.written == 600, "600 records written")
        ids = await stream_ids(redis_url)
        # MAXLEN ~ trims whole radix-tree nodes (100 entries by default), never below the cap.
        assert 50 <= len(ids) <= 50 + 100
        assert ids[-1] == "req-00599"

    asyncio.run(main())


@asynccontextmanager
async def persisted_restarts(url: str) -> AsyncIterator[None]:
    """Make the fixture's SIGTERM save an RDB that the restart loads, as a production Redis would.

    Without persistence a restarted Redis is empty, and "no record lost" could not be checked.
    The dump is removed afterwards so later restarts in this session start empty again.
    """
    client = connect(url)
    await client.config_set("shutdown-on-sigterm", "save")
    folder: Any = (await client.config_get("dir"))["dir"]
    folder = folder.decode() if isinstance(folder, bytes) else folder
    await client.aclose()
    try:
        yield
    finally:
        dump = Path(folder) / "dump.rdb"
        dump.unlink(missing_ok=True)


def test_no_record_is_lost_or_doubled_across_a_redis_restart(
    redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    total = 400
    submitted = 0

    async def produce(writer: RecordWriter) -> None:
        nonlocal submitted
        for i in range(total):
            writer.submit(record(i))
            submitted += 1
            await asyncio.sleep(0.003)

    async def main() -> RecordWriter:
        writer = make_writer(redis_url, tmp_path / "spool.jsonl")
        async with persisted_restarts(redis_url), running(writer):
            producer = asyncio.create_task(produce(writer))
            await eventually(lambda: writer.written >= 50, "first records written")
            await asyncio.to_thread(redis_server.stop)  # records keep coming meanwhile
            down_at = submitted
            await eventually(lambda: writer.spooled > 0, "records spooled while Redis is down")
            await eventually(lambda: submitted >= down_at + 50, "more submitted during the outage")
            await asyncio.to_thread(redis_server.start)
            await producer
            await eventually(lambda: writer.written == total, "every record written")
        return writer

    writer = asyncio.run(main())
    ids = asyncio.run(stream_ids(redis_url))
    duplicates = [i for i, n in collections.Counter(ids).items() if n > 1]
    assert not duplicates
    assert ids == [f"req-{i:05d}" for i in range(total)]  # none lost, and in submission order
    assert writer.spooled > 0
    assert writer.replayed > 0
    assert writer.dropped == 0
    assert not (tmp_path / "spool.jsonl").exists()


def test_records_spooled_at_shutdown_are_replayed_by_the_next_writer(
    redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.jsonl"
    redis_server.stop()

    async def shut_down_during_outage() -> RecordWriter:
        writer = make_writer(redis_url, spool)
        async with running(writer):
            for i in range(50):
                writer.submit(record(i))
        return writer

    first = asyncio.run(shut_down_during_outage())
    assert (first.spooled, first.written, first.dropped) == (50, 0, 0)
    assert spool.exists()

    redis_server.start()

    async def restart() -> RecordWriter:
        writer = make_writer(redis_url, spool)
        async with running(writer):
            await eventually(lambda: writer.written == 50, "spool replayed")
        return writer

    second = asyncio.run(restart())
    assert second.replayed == 50
    assert asyncio.run(stream_ids(redis_url)) == [f"req-{i:05d}" for i in range(50)]
    assert not spool.exists()


def test_a_batch_committed_before_a_crash_is_not_replayed(redis_url: str, tmp_path: Path) -> None:
    """A worker died after EXEC but before committing the spool: the marker says it is in Redis."""
    path = tmp_path / "spool.jsonl"
    spool = Spool(path)
    spool.append([record(i).to_fields() for i in range(10)])
    sent = spool.read_batch(4)
    spool.mark_pending(123, sent.end)

    async def main() -> RecordWriter:
        client = connect(redis_url)
        for fields in sent.records:  # what the dead worker's transaction had written
            await client.xadd(STREAM, dict[Any, Any](fields))
        await client.set(f"{STREAM}:writers:w1", 123)
        await client.aclose()
        writer = make_writer(redis_url, path, writer_id="w1")
        async with running(writer):
            await eventually(lambda: writer.written == 10, "spool replayed")
        return writer

    writer = asyncio.run(main())
    assert asyncio.run(stream_ids(redis_url)) == [f"req-{i:05d}" for i in range(10)]
    assert writer.replayed == 10


def test_records_are_dropped_only_when_the_spool_is_full(
    redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    one_record = len(record(0).to_fields()["sketch"]) + 300  # a line is a few hundred bytes
    registry = CollectorRegistry()
    redis_server.stop()

    async def main() -> RecordWriter:
        writer = RecordWriter(
            redis_url,
            STREAM,
            spool_path=tmp_path / "spool.jsonl",
            spool_max_bytes=5 * one_record,
            registry=registry,
        )
        async with running(writer):
            for i in range(20):
                writer.submit(record(i))
        return writer

    writer = asyncio.run(main())
    redis_server.start()
    assert writer.dropped > 0
    assert writer.spooled > 0
    assert writer.spooled + writer.dropped == 20
    assert registry.get_sample_value("loopline_records_dropped_total") == writer.dropped
    assert registry.get_sample_value("loopline_records_spool_bytes") == writer.spool_bytes > 0
