"""Inference records: one per classified text, written to a Redis stream without ever blocking.

`RecordWriter.submit` is a plain deque append; a background task drains the deque in batches (one
MULTI/EXEC round trip each, approximate MAXLEN). While Redis is unreachable, records go to a
bounded local `Spool` (JSON lines) and are replayed, oldest first, when it answers again.

Delivery guarantee: exactly once into the stream, as long as Redis keeps what it acknowledged
(with persistence; a Redis that restarts empty has lost those records however they were written).
Every batch carries a sequence number, and the same transaction that appends it also sets this
writer's marker key (`<stream>:writers:<writer_id>`) to that number. A batch whose outcome is
unknown (the connection broke after EXEC was sent, or the process died mid-replay) is recorded as
the spool's *pending* batch with its number; before it is sent again the marker is read, and a
marker at or past the number means the first attempt committed, so it is skipped. Redis Streams
have no idempotent producer of their own (Kafka's producer ids play this role there); without the
marker a broken connection or a crash would double a batch, and the monitor counts records.

Weaker spots, on purpose: the spool is flushed to the OS but not fsynced per append (a process
crash loses nothing, a power cut can lose the last writes); a marker older than `MARKER_TTL_S`
is forgotten, so a pending batch left over more than a week may be written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from loopline.logging import get_logger
from loopline.redis import connect

__all__ = [
    "MARKER_TTL_S",
    "FailureRecord",
    "InferenceRecord",
    "Pending",
    "RecordWriter",
    "Spool",
    "SpoolBatch",
    "TextTags",
]

log = get_logger(__name__)

MiB = 1024 * 1024
MARKER_TTL_S = 7 * 24 * 3600
# Anything Redis or the socket can throw is an outage to wait out, not a reason to lose records.
_OUTAGE_ERRORS = (RedisError, OSError)


# --------------------------------------------------------------------------- the record


def _g(value: float) -> float:
    """Six significant digits: plenty for probabilities and sketches, half the bytes of repr."""
    return float(f"{value:.6g}")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class TextTags:
    """What every record of a text carries, answered or failed: who asked, when, what served it
    and the routing tags."""

    request_id: str
    time: float  # unix seconds
    model: str
    version: str
    experiment: str
    variant: str
    user_bucket: str  # "" when the request had no user
    language: str = field(default="", kw_only=True)  # detected by the router, when it routes
    shadow: bool = field(default=False, kw_only=True)  # a mirrored copy: never answered

    def tag_fields(self) -> dict[str, str]:
        """These tags as stream fields."""
        return {
            "request_id": self.request_id,
            "time": f"{self.time:.6f}",
            "model": self.model,
            "version": self.version,
            "experiment": self.experiment,
            "variant": self.variant,
            "user_bucket": self.user_bucket,
            "language": self.language,
            "shadow": "1" if self.shadow else "0",
        }


@dataclass(frozen=True)
class InferenceRecord(TextTags):
    """What a worker knows about one classified text; the monitor's raw material."""

    label: str
    probabilities: list[float]
    labels: list[str]  # the order of `probabilities`
    token_count: int
    unknown_share: float
    truncated: bool
    queue_ms: float
    compute_ms: float
    batch_size: int
    sketch: list[float]  # 16-dim projection of the pooled embedding
    text: str | None = None  # None when log_text is off

    def to_fields(self) -> dict[str, str]:
        """Flat stream fields: lists as compact JSON, bools "1"/"0", `text` omitted when None."""
        fields = {
            **self.tag_fields(),
            "label": self.label,
            "probabilities": _dumps([_g(p) for p in self.probabilities]),
            "labels": _dumps(self.labels),
            "token_count": str(self.token_count),
            "unknown_share": repr(_g(self.unknown_share)),
            "truncated": "1" if self.truncated else "0",
            "queue_ms": f"{self.queue_ms:.3f}",
            "compute_ms": f"{self.compute_ms:.3f}",
            "batch_size": str(self.batch_size),
            "sketch": _dumps([_g(s) for s in self.sketch]),
        }
        if self.text is not None:
            fields["text"] = self.text
        return fields

    @classmethod
    def from_fields(cls, raw: Mapping[Any, bytes | str]) -> InferenceRecord:
        """Rebuild a record from stream fields (bytes or str keys and values)."""
        f = {_text(k): _text(v) for k, v in raw.items()}
        return cls(
            request_id=f["request_id"],
            time=float(f["time"]),
            model=f["model"],
            version=f["version"],
            experiment=f.get("experiment", ""),
            variant=f.get("variant", ""),
            user_bucket=f.get("user_bucket", ""),
            label=f["label"],
            probabilities=[float(p) for p in json.loads(f["probabilities"])],
            labels=[str(label) for label in json.loads(f["labels"])],
            token_count=int(f["token_count"]),
            unknown_share=float(f["unknown_share"]),
            truncated=f["truncated"] == "1",
            queue_ms=float(f["queue_ms"]),
            compute_ms=float(f["compute_ms"]),
            batch_size=int(f["batch_size"]),
            sketch=[float(s) for s in json.loads(f["sketch"])],
            text=f.get("text"),
            language=f.get("language", ""),
            shadow=f.get("shadow", "0") == "1",
        )


@dataclass(frozen=True)
class FailureRecord(TextTags):
    """A text the worker accepted and could not answer. On the same stream as the answers, told
    apart by its `error` field (the failure's kind); it has no label, so readers of answers skip
    it, and the monitor counts it in `GetStats.errors`."""

    error: str  # ErrorKind value: overloaded, deadline, not_ready, internal

    def to_fields(self) -> dict[str, str]:
        """Flat stream fields, the tags named as an answer's are."""
        return {**self.tag_fields(), "error": self.error}


Record = InferenceRecord | FailureRecord


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- the spool


class Pending(NamedTuple):
    """The head batch that was (maybe) sent: its sequence number and where it ends."""

    token: int
    end: int


@dataclass
class SpoolBatch:
    """Records read from the spool; `end` is the offset to commit once they are safely written."""

    records: list[dict[str, Any]] = field(default_factory=list)
    end: int = 0


class Spool:
    """A bounded append-only JSON-lines file with a committed read offset beside it.

    Replay is `read_batch` -> write -> `commit(batch.end)`, so a crash between the write and the
    commit replays that one batch again (at least once); `mark_pending` records a sequence number
    for that batch first, which lets the caller find out after the crash whether the write
    happened (see the module docstring). The offset lives in `<path>.offset`, replaced atomically.
    The file is removed once everything is replayed; until then it only grows, and `max_bytes`
    caps its size (the replayed prefix included): records that do not fit are dropped and counted.
    A torn last line (a crash mid-append) is cut off on open; corrupt lines are skipped, with a
    warning each.
    """

    def __init__(self, path: Path, max_bytes: int = 256 * MiB) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._state_path = path.with_name(path.name + ".offset")
        self._offset = 0
        self._size = 0
        self._pending: Pending | None = None
        self._recover()

    @property
    def empty(self) -> bool:
        """True when nothing is waiting to be replayed."""
        return self._offset >= self._size

    @property
    def size_bytes(self) -> int:
        """Bytes on disk (what `max_bytes` caps)."""
        return self._size

    @property
    def backlog_bytes(self) -> int:
        """Bytes not yet replayed."""
        return self._size - self._offset

    @property
    def end(self) -> int:
        """The offset the next append starts at."""
        return self._size

    @property
    def pending(self) -> Pending | None:
        """The head batch marked by `mark_pending` and not committed since, if any."""
        return self._pending

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append `records` in order; returns how many were dropped because of the cap."""
        lines = [(_dumps(record) + "\n").encode() for record in records]
        keep = self._fitting(lines)
        if keep:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as out:
                out.write(b"".join(lines[:keep]))
            self._size += sum(len(line) for line in lines[:keep])
        return len(lines) - keep

    def _fitting(self, lines: Sequence[bytes]) -> int:
        """How many of `lines` fit under the cap; the rest (the newest) are dropped."""
        room = self.max_bytes - self._size
        for count, line in enumerate(lines):
            room -= len(line)
            if room < 0:
                return count
        return len(lines)

    def read_batch(self, max_records: int, until: int | None = None) -> SpoolBatch:
        """The next records after the committed offset: up to `max_records`, or up to `until`."""
        batch = SpoolBatch(end=self._offset)
        if self.empty:
            return batch
        limit = self._size if until is None else min(until, self._size)
        with self.path.open("rb") as source:
            source.seek(self._offset)
            while batch.end < limit and len(batch.records) < max_records:
                line = source.readline()
                if not line:
                    break
                batch.end += len(line)
                self._decode_into(batch, line)
        return batch

    def _decode_into(self, batch: SpoolBatch, line: bytes) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            batch.records.append(record)
        else:
            log.warning("skipping a corrupt spool line", extra={"spool": str(self.path)})

    def mark_pending(self, token: int, end: int) -> None:
        """Record that the batch up to `end` is about to be sent as `token` (survives a crash)."""
        self._pending = Pending(token, end)
        self._save_state()

    def commit(self, end: int) -> None:
        """Everything before `end` is written elsewhere; the file goes once it is all replayed."""
        self._offset = max(self._offset, end)
        self._pending = None
        if self.empty:
            self.clear()
        else:
            self._save_state()

    def clear(self) -> None:
        """Remove the file and its offset (the data file first: see `_recover`)."""
        self.path.unlink(missing_ok=True)
        self._state_path.unlink(missing_ok=True)
        self._offset = self._size = 0
        self._pending = None

    def _save_state(self) -> None:
        state = {"offset": self._offset, "pending": self._pending}
        tmp = self._state_path.with_name(self._state_path.name + ".tmp")
        tmp.write_text(_dumps(state))
        os.replace(tmp, self._state_path)

    def _recover(self) -> None:
        if not self.path.exists():
            # A leftover offset belongs to a file already replayed and removed; never reuse it.
            self._state_path.unlink(missing_ok=True)
            return
        self._size = self._cut_torn_tail()
        self._load_state()
        if self.empty:
            self.clear()

    def _cut_torn_tail(self) -> int:
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            log.warning(
                "cutting a torn last line off the spool (a crash mid-append)",
                extra={"spool": str(self.path), "bytes": len(data) - keep},
            )
            with self.path.open("r+b") as out:
                out.truncate(keep)
        return keep

    def _load_state(self) -> None:
        try:
            state = json.loads(self._state_path.read_text())
            self._offset = min(int(state["offset"]), self._size)
            pending = state.get("pending")
            self._pending = Pending(int(pending[0]), int(pending[1])) if pending else None
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, IndexError):
            log.warning("unreadable spool offset; replaying from the start", exc_info=True)


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class _Metrics:
    written: Counter
    spooled: Counter
    replayed: Counter
    dropped: Counter
    spool_bytes: Gauge


@functools.cache
def _metrics(registry: CollectorRegistry) -> _Metrics:
    """One set per registry, so several writers (or tests) can share or separate them."""

    def counter(name: str, doc: str) -> Counter:
        return Counter(f"loopline_records_{name}", doc, registry=registry)

    return _Metrics(
        written=counter("written", "Inference records appended to the Redis stream."),
        spooled=counter("spooled", "Inference records written to the local spool."),
        replayed=counter("replayed", "Spooled inference records later appended to the stream."),
        dropped=counter("dropped", "Inference records lost because the spool was full."),
        spool_bytes=Gauge(
            "loopline_records_spool_bytes", "Size of the local record spool.", registry=registry
        ),
    )


# --------------------------------------------------------------------------- the writer


def _default_writer_id(spool_path: Path) -> str:
    """Stable across restarts of the same worker (its host and spool), distinct between workers."""
    key = f"{socket.gethostname()}:{spool_path.resolve()}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class RecordWriter:
    """Writes inference records to a Redis stream from a background task; see the module doc.

    `submit` never blocks or raises. Order: records reach the stream in submission order,
    spooled ones included, because while the spool holds anything every newer record is appended
    behind it. `written` counts records in the stream (replayed ones too), `replayed` the subset
    that came from the spool, `spooled` records put on disk, `dropped` those the full spool refused.
    """

    def __init__(
        self,
        redis_url: str,
        stream: str = "loopline:inference",
        *,
        maxlen: int = 1_000_000,
        batch_size: int = 256,
        flush_interval: float = 0.05,
        buffer_size: int = 10_000,
        spool_path: Path,
        spool_max_bytes: int = 256 * MiB,
        registry: CollectorRegistry | None = None,
        writer_id: str | None = None,
        max_backoff: float = 2.0,
    ) -> None:
        # No client-side retries: a retried EXEC could double a batch, and we back off ourselves.
        retry = Retry(NoBackoff(), 0)
        self._client: aioredis.Redis = connect(
            redis_url, socket_timeout=5.0, socket_connect_timeout=2.0, retry=retry
        )
        self.stream = stream
        self._maxlen = maxlen
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._buffer_size = buffer_size
        self._max_backoff = max_backoff
        self._marker = f"{stream}:writers:{writer_id or _default_writer_id(spool_path)}"
        self._spool = Spool(spool_path, spool_max_bytes)
        self._memory: deque[Record] = deque()
        self._metrics = _metrics(registry if registry is not None else REGISTRY)
        self._metrics.spool_bytes.set(self._spool.size_bytes)
        self.written = self.spooled = self.replayed = self.dropped = 0
        self._seq = 0
        self._live_in_flight = False
        self._outage_since: float | None = None
        self._backoff = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._batch_ready = asyncio.Event()
        self._stop = asyncio.Event()

    # ---- public

    @property
    def spool_bytes(self) -> int:
        """Current size of the spool file."""
        return self._spool.size_bytes

    @property
    def buffered(self) -> int:
        """Records in memory, not yet written or spooled."""
        return len(self._memory)

    def start(self) -> None:
        """Start the background task on the running loop (spooled records are replayed first)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="record-writer")

    def submit(self, record: Record) -> None:
        """Queue `record`; never blocks, never raises (inference must not wait on Redis)."""
        try:
            self._memory.append(record)
            self._spill_overflow()
            if len(self._memory) >= self._batch_size:
                self._batch_ready.set()
        except Exception:  # a broken disk must not fail a request
            log.exception("could not queue an inference record")

    async def flush_and_close(self, timeout: float = 5.0) -> None:
        """Write out (or spool) everything, then close; what misses `timeout` stays spooled."""
        self._closing = True
        self._batch_ready.set()
        self._stop.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                self._task.cancel()
                await asyncio.wait({self._task})
        self._spill_memory()  # never started, or cancelled mid-way
        await self._client.aclose()

    # ---- the loop

    async def _run(self) -> None:
        try:
            while not (self._closing and self._idle()):
                if not await self._step_or_wait():
                    break
        finally:
            self._spill_memory()

    async def _step_or_wait(self) -> bool:
        """One step; False once closing and Redis is down (memory is then spooled)."""
        try:
            progressed = await self._step()
        except Exception as err:
            self._note_outage(err)
            if self._closing:
                return False
            await self._wait(self._stop, self._next_backoff())
            return True
        self._note_recovered()
        if not progressed:
            await self._wait(self._batch_ready, self._flush_interval)
        return True

    async def _step(self) -> bool:
        if not self._spool.empty:
            # Newer records queue behind the spool so that the stream keeps submission order.
            self._spill_memory()
            return await self._replay_once()
        return await self._write_live()

    def _idle(self) -> bool:
        return not self._memory and self._spool.empty

    async def _wait(self, event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
        if not self._closing:
            event.clear()

    async def _write_live(self) -> bool:
        count = min(self._batch_size, len(self._memory))
        if count == 0:
            return False
        records = [self._memory.popleft().to_fields() for _ in range(count)]
        seq = self._next_seq()
        self._live_in_flight = True
        try:
            await self._send(records, seq)
        except BaseException:  # also cancellation: the batch may or may not be in Redis
            self._spool_unsure(records, seq)
            raise
        finally:
            self._live_in_flight = False
            self._spill_overflow()
        self._count_written(len(records), replayed=False)
        return True

    async def _replay_once(self) -> bool:
        pending = self._spool.pending
        if pending is None:
            batch = self._spool.read_batch(self._batch_size)
            seq = self._next_seq()
            self._spool.mark_pending(seq, batch.end)
        else:
            batch = self._spool.read_batch(sys.maxsize, until=pending.end)
            seq = pending.token
            if await self._committed(seq):  # the earlier attempt made it: do not write twice
                self._commit(batch)
                return True
        if batch.records:
            await self._send(batch.records, seq)
        self._commit(batch)
        return True

    # ---- Redis

    async def _send(self, records: Sequence[Mapping[str, Any]], seq: int) -> None:
        """Append `records` and set the marker to `seq`, all or nothing (MULTI/EXEC).

        Not `loopline.redis.xadd_many`: the marker must commit in the same transaction.
        """
        async with self._client.pipeline(transaction=True) as pipe:
            for record in records:
                fields: dict[FieldT, EncodableT] = dict(record.items())
                pipe.xadd(self.stream, fields, maxlen=self._maxlen, approximate=True)
            pipe.set(self._marker, seq, ex=MARKER_TTL_S)
            await pipe.execute()

    async def _committed(self, seq: int) -> bool:
        raw = await self._client.get(self._marker)
        return raw is not None and int(raw) >= seq

    def _next_seq(self) -> int:
        # Wall-clock nanoseconds keep numbers rising across restarts of the same writer id.
        self._seq = max(self._seq + 1, time.time_ns())
        return self._seq

    # ---- spool bookkeeping

    def _spool_unsure(self, records: list[dict[str, str]], seq: int) -> None:
        """Spool a live batch whose send failed, marked pending so a retry checks the marker."""
        was_empty = self._spool.empty
        self._spool_append(records)
        # Live batches are only sent while the spool is empty, so this batch is now its head.
        if was_empty and not self._spool.empty:
            self._spool.mark_pending(seq, self._spool.end)

    def _spill_overflow(self) -> None:
        # Not while a live batch is out: if it fails it must reach the spool before newer records.
        excess = len(self._memory) - self._buffer_size
        if excess > 0 and not self._live_in_flight:
            self._spool_append([self._memory.popleft().to_fields() for _ in range(excess)])

    def _spill_memory(self) -> None:
        if self._memory:
            records = [record.to_fields() for record in self._memory]
            self._memory.clear()
            self._spool_append(records)

    def _spool_append(self, records: list[dict[str, str]]) -> None:
        try:
            dropped = self._spool.append(records)
        except OSError:
            log.exception("cannot write the record spool", extra={"spool": str(self._spool.path)})
            dropped = len(records)
        self._count(spooled=len(records) - dropped, dropped=dropped)

    def _commit(self, batch: SpoolBatch) -> None:
        self._spool.commit(batch.end)
        self._count_written(len(batch.records), replayed=True)

    # ---- counting and logging

    def _count(self, *, spooled: int = 0, dropped: int = 0) -> None:
        self.spooled += spooled
        self.dropped += dropped
        self._metrics.spooled.inc(spooled)
        self._metrics.dropped.inc(dropped)
        self._metrics.spool_bytes.set(self._spool.size_bytes)
        if dropped:
            log.error(
                "record spool full: records dropped",
                extra={"dropped": dropped, "spool_max_bytes": self._spool.max_bytes},
            )

    def _count_written(self, count: int, *, replayed: bool) -> None:
        self.written += count
        self._metrics.written.inc(count)
        if replayed:
            self.replayed += count
            self._metrics.replayed.inc(count)
        self._metrics.spool_bytes.set(self._spool.size_bytes)

    def _note_outage(self, err: Exception) -> None:
        if not isinstance(err, _OUTAGE_ERRORS):
            # A bug, not an outage: keep the task alive (records stay spooled) but show it loudly.
            log.exception("unexpected error in the record writer; retrying")
        if self._outage_since is None:  # once per outage, not once per retry
            self._outage_since = time.monotonic()
            log.warning(
                "Redis unreachable; spooling inference records",
                extra={"error": repr(err), "spool": str(self._spool.path)},
            )

    def _note_recovered(self) -> None:
        self._backoff = 0.0
        if self._outage_since is not None:
            seconds = time.monotonic() - self._outage_since
            self._outage_since = None
            log.info("Redis reachable again; replaying the spool", extra={"outage_s": seconds})

    def _next_backoff(self) -> float:
        self._backoff = min(max(self._backoff * 2, 0.05), self._max_backoff)
        # Jitter so that many workers do not reconnect in lockstep after a Redis restart.
        return self._backoff * (0.5 + 0.5 * (time.time_ns() % 1000) / 1000)
