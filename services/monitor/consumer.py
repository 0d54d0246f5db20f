"""Stream consumption: inference records and feedback, read in a consumer group, folded, acked.

One `Consumer` per process; several processes in the same group share the work, since Redis
hands each entry to one consumer. The loop:

1. Read a batch of new entries, up to `batch` per stream (XREADGROUP). After a failure (and at
   start) this consumer's own pending entries come first: read before but never acknowledged.
   When there is nothing new it blocks up to `block_ms` on a plain XREADGROUP for one entry,
   which the next read picks up as pending.
2. Parse (`events`), fold (`state.State.fold`), and only then XACK. A crash between the fold and
   the ack leaves the batch pending; whoever folds it again counts nothing new, because folding is
   idempotent by request id. Reading and parsing batch N+1 overlaps the fold of batch N (the
   consumer and Redis each get a core instead of taking turns).
3. Every `claim_interval_s`, XAUTOCLAIM entries pending longer than `claim_idle_ms` in any
   consumer (a dead one, or one stuck mid-batch) and fold them the same way; consumers idle for a
   long time with nothing pending are dropped from the group.

The batch is read by a Lua script rather than by redis-py's XREADGROUP reply parser: without
hiredis, redis-py parses RESP in pure Python at ~45 items per record, which capped reading at
~3,600 records/s on this machine; the script returns the batch as one JSON string (with the fields
the fold never uses emptied, the text above all), which Python decodes at C speed.

Redis going away (restart, network) is not an error: the loop logs once, retries with backoff,
and recreates the consumer groups (from "0", so nothing written since is missed) when they are
gone, which happens when Redis restarted without persistence.

    python -m services.monitor.consumer --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from loopline.logging import configure_logging, get_logger
from loopline.redis import connect, ensure_group
from services.monitor.events import (
    Failure,
    Label,
    MalformedRecordError,
    Prediction,
    is_failure,
    parse_failure,
    parse_label,
    parse_prediction,
)
from services.monitor.state import FoldResult, State, StateConfig

__all__ = [
    "DEFAULT_GROUP",
    "FEEDBACK_STREAM",
    "INFERENCE_STREAM",
    "Consumer",
    "ConsumerStats",
    "main",
]

log = get_logger("services.monitor.consumer")  # not __name__: "__main__" under -m

INFERENCE_STREAM = "loopline:inference"
FEEDBACK_STREAM = "loopline:feedback"
DEFAULT_GROUP = "loopline-monitor"
# Fields the fold never uses cross the wire empty (the text is the bulk of a record).
DROPPED_FIELDS = ("text", "user_bucket", "batch_size", "labels", "metadata")
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
_CLAIM_ROUNDS = 20  # XAUTOCLAIM pages per stream per tick: bounds one tick's work

Rows = list[tuple[str, dict[str, str]]]


@dataclass
class ConsumerStats:
    """What one consumer did since it started."""

    batches: int = 0
    entries: int = 0  # stream entries acknowledged (folded, duplicate, malformed or trimmed)
    predictions: int = 0  # new predictions folded
    failures: int = 0  # new failure records folded
    labels: int = 0  # new labels folded
    duplicates: int = 0  # records folded before (reclaimed or replayed)
    malformed: int = 0
    reclaimed: int = 0  # entries taken over from other consumers with XAUTOCLAIM
    outages: int = 0


@dataclass(frozen=True)
class _Batch:
    """A parsed batch: what to fold, and every entry id to acknowledge after (malformed too)."""

    predictions: list[Prediction]
    labels: list[Label]
    acks: tuple[tuple[str, list[str]], ...]
    failures: list[Failure] = field(default_factory=list)


@dataclass(frozen=True)
class _Metrics:
    records: Counter
    problems: Counter
    reclaimed: Counter
    outages: Counter
    batch_seconds: Histogram


@functools.cache
def _metrics(registry: CollectorRegistry) -> _Metrics:
    """One set per registry, so several consumers in a process (tests, bench) can share it."""
    return _Metrics(
        records=Counter(
            "loopline_monitor_records",
            "Stream entries handled by the monitor, by stream and outcome "
            "(folded, failure: a failed text's record, duplicate, malformed).",
            ["stream", "outcome"],
            registry=registry,
        ),
        problems=Counter(
            "loopline_monitor_field_problems",
            "Optional record fields present but unreadable (the record was still folded).",
            ["field"],
            registry=registry,
        ),
        reclaimed=Counter(
            "loopline_monitor_reclaimed",
            "Entries taken over from another consumer with XAUTOCLAIM.",
            ["stream"],
            registry=registry,
        ),
        outages=Counter(
            "loopline_monitor_redis_outages", "Times Redis became unreachable.", registry=registry
        ),
        batch_seconds=Histogram(
            "loopline_monitor_batch_duration_seconds",
            "Time to parse, fold and acknowledge one batch.",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        ),
    )


def default_name() -> str:
    """host-pid: unique among live consumers, new after a restart (the old one's entries are
    reclaimed by XAUTOCLAIM)."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Consumer:
    """Reads both streams in a consumer group and folds them into `State`; see the module doc."""

    def __init__(
        self,
        redis_url: str,
        *,
        group: str = DEFAULT_GROUP,
        name: str | None = None,
        streams: tuple[str, str] = (INFERENCE_STREAM, FEEDBACK_STREAM),
        batch: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        claim_interval_s: float | None = None,
        state_config: StateConfig | None = None,
        registry: CollectorRegistry | None = None,
        max_backoff_s: float = 5.0,
        ack_delay_ms: int = 0,
    ) -> None:
        if batch < 1 or block_ms < 1 or claim_idle_ms < 1:
            raise ValueError("batch, block_ms and claim_idle_ms must be at least 1")
        # No client-side retries: this loop backs off itself and logs the outage once.
        self._client: aioredis.Redis = connect(
            redis_url,
            socket_timeout=block_ms / 1000 + 10.0,
            socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
        )
        self.group, self.name = group, name or default_name()
        self.inference_stream, self.feedback_stream = streams
        self.state = State(self._client, state_config)
        self.stats = ConsumerStats()
        self._batch, self._block_ms, self._claim_idle_ms = batch, block_ms, claim_idle_ms
        self._claim_interval = claim_interval_s or max(claim_idle_ms / 2000, 0.5)
        self._max_backoff = max_backoff_s
        # Fault injection for tests: a pause between fold and ack widens the crash window.
        self._ack_delay = ack_delay_ms / 1000
        self._metrics = _metrics(registry if registry is not None else REGISTRY)
        self._read = self._client.register_script(_READ_LUA)
        self._claim = self._client.register_script(_CLAIM_LUA)
        self._stopping = asyncio.Event()
        self._waiting: asyncio.Task[Any] | None = None
        self._next_claim = 0.0
        self._down_since: float | None = None
        self._backoff = 0.0
        self._reported: set[str] = set()
        self._log = log.bind(consumer=self.name, group=group)

    @property
    def streams(self) -> tuple[str, str]:
        """(inference stream, feedback stream)."""
        return self.inference_stream, self.feedback_stream

    # ----- lifecycle

    async def run(self) -> None:
        """Consume until `stop()`; Redis outages are waited out, not raised."""
        self._log.info("monitor consumer started", extra={"streams": list(self.streams)})
        try:
            with contextlib.suppress(*_REDIS_DOWN):
                await self.ensure_groups()
            while not self._stopping.is_set():
                try:
                    await self._consume()
                except _REDIS_DOWN as err:
                    await self._outage(err)
                except RedisError:  # e.g. OOM: the batch stays pending and is retried
                    self._log.exception("reading or folding a batch failed; retrying it")
                    await self._pause()
                except Exception:  # a bug must not end consumption unnoticed: log, retry
                    self._log.exception("consuming a batch failed; its entries stay pending")
                    await self._pause()
        finally:
            await self._client.aclose()
            self._log.info("monitor consumer stopped", extra=asdict(self.stats))

    async def stop(self) -> None:
        """Finish the batches in hand, acknowledge them, and make `run()` return."""
        self._stopping.set()
        if self._waiting is not None:
            self._waiting.cancel()

    async def ensure_groups(self) -> None:
        """Create the consumer group on both streams unless it exists (from "0": miss nothing)."""
        for stream in self.streams:
            await ensure_group(self._client, stream, self.group, start_id="0")

    async def claim(self) -> int:
        """Take over and fold entries pending longer than `claim_idle_ms`; returns how many."""
        total = 0
        for stream in self.streams:
            cursor = "0-0"
            for _ in range(_CLAIM_ROUNDS):
                cursor, rows = await self._claim_page(stream, cursor)
                if rows:
                    total += len(rows)
                    self._metrics.reclaimed.labels(stream).inc(len(rows))
                    is_inference = stream == self.inference_stream
                    inference, feedback = (rows, []) if is_inference else ([], rows)
                    await self._fold_and_ack(self._parse(inference, feedback))
                if cursor == "0-0":
                    break
        if total:
            self.stats.reclaimed += total
            self._log.info("reclaimed pending entries", extra={"entries": total})
        await self._forget_idle_consumers()
        return total

    # ----- the loop

    async def _consume(self) -> None:
        """Read, parse and fold in a two-stage pipeline until stopped; Redis errors propagate.

        Batch N+1 is read and parsed (Python) while Redis folds batch N, so the two processes
        work at the same time instead of taking turns. Folds still run one after another. A
        pass starts by re-reading this consumer's pending entries: whatever an interrupted pass
        had read but not acknowledged.
        """
        reading: asyncio.Future[tuple[Rows, Rows]] | None = asyncio.ensure_future(
            self._read_batch(pending=True)
        )
        folding: asyncio.Future[None] | None = None
        try:
            while reading is not None:
                inference, feedback = await reading
                reading = None
                if not inference and not feedback:  # caught up: flush, then wait for more
                    if folding is not None:
                        await folding
                        folding = None
                    if not await self._idle():
                        break
                    reading = asyncio.ensure_future(self._read_batch(pending=True))
                    continue
                if not self._stopping.is_set():
                    reading = asyncio.ensure_future(self._read_batch(pending=False))
                batch = self._parse(inference, feedback)
                if folding is not None:
                    await folding
                folding = asyncio.ensure_future(self._fold_and_ack(batch))
                if self._claim_due():
                    await folding
                    folding = None
                    await self._claim_if_due()
            if folding is not None:
                await folding
        finally:
            for task in (reading, folding):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, *_REDIS_DOWN):
                        await task

    async def _read_batch(self, *, pending: bool) -> tuple[Rows, Rows]:
        """Up to `batch` entries per stream: with `pending`, this consumer's own unacknowledged
        ones first (from an interrupted pass, or the blocking wait), then new ones."""
        raw: Any = await self._read(
            keys=list(self.streams),
            args=[self.group, self.name, self._batch, int(pending), *DROPPED_FIELDS],
        )
        reply = json.loads(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw)
        if reply[2]:
            self._log.warning(
                "consumer group recreated: the stream or group vanished (Redis restarted?)",
                extra={"groups": reply[2]},
            )
        self._recovered()
        return _rows(reply[0]), _rows(reply[1])

    async def _idle(self) -> bool:
        """With nothing to read: reclaim if due, then block for new entries; False on stop."""
        if self._stopping.is_set():
            return False
        await self._claim_if_due()
        await self._wait_for_entries()
        return True

    def _claim_due(self) -> bool:
        return time.monotonic() >= self._next_claim

    async def _claim_if_due(self) -> None:
        if self._claim_due():
            self._next_claim = time.monotonic() + self._claim_interval
            await self.claim()

    async def _wait_for_entries(self) -> None:
        """Block until an entry arrives (or `block_ms` passes); the next read takes it as
        pending."""
        streams = dict.fromkeys(self.streams, ">")
        self._waiting = asyncio.ensure_future(
            self._client.xreadgroup(self.group, self.name, streams, 1, self._block_ms)  # type: ignore[arg-type]
        )
        try:
            await self._waiting
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                raise
        except ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            self._log.warning("consumer group missing; recreating it", extra={"error": str(err)})
            await self.ensure_groups()
        finally:
            self._waiting = None

    def _parse(self, inference: Rows, feedback: Rows) -> _Batch:
        records = [r for r in map(self._inference_record, inference) if r is not None]
        return _Batch(
            predictions=[r for r in records if isinstance(r, Prediction)],
            labels=[lab for lab in map(self._label, feedback) if lab is not None],
            acks=((self.inference_stream, [i for i, _ in inference]),
                  (self.feedback_stream, [i for i, _ in feedback])),
            failures=[r for r in records if isinstance(r, Failure)],
        )  # fmt: skip

    async def _fold_and_ack(self, batch: _Batch) -> None:
        """Fold, then acknowledge: an entry is never acked before its record is in the state."""
        started = time.perf_counter()
        result = await self.state.fold(batch.predictions, batch.labels, batch.failures)
        if self._ack_delay:
            await asyncio.sleep(self._ack_delay)
        async with self._client.pipeline(transaction=False) as pipe:
            for stream, ids in batch.acks:
                if ids:
                    pipe.xack(stream, self.group, *ids)
            await pipe.execute()
        self._count(result, sum(len(ids) for _, ids in batch.acks))
        self._metrics.batch_seconds.observe(time.perf_counter() - started)

    def _inference_record(self, row: tuple[str, dict[str, str]]) -> Prediction | Failure | None:
        entry_id, fields = row
        if not fields:  # trimmed from the stream while pending: nothing left to fold
            return None
        try:
            if is_failure(fields):
                return parse_failure(entry_id, fields)
            prediction = parse_prediction(entry_id, fields)
        except MalformedRecordError as err:
            self._malformed(self.inference_stream, entry_id, err)
            return None
        for problem in prediction.problems:
            self._metrics.problems.labels(problem).inc()
            self._report(f"inference.bad_{problem}", self.inference_stream, entry_id)
        return prediction

    def _label(self, row: tuple[str, dict[str, str]]) -> Label | None:
        entry_id, fields = row
        if not fields:
            return None
        try:
            return parse_label(entry_id, fields)
        except MalformedRecordError as err:
            self._malformed(self.feedback_stream, entry_id, err)
            return None

    def _malformed(self, stream: str, entry_id: str, err: MalformedRecordError) -> None:
        self.stats.malformed += 1
        self._metrics.records.labels(stream, "malformed").inc()
        self._report(err.kind, stream, entry_id, str(err))

    def _report(self, kind: str, stream: str, entry_id: str, detail: str = "") -> None:
        """Log the first entry of each kind of problem; the metrics count all of them."""
        if kind in self._reported:
            return
        self._reported.add(kind)
        self._log.warning(
            "unreadable stream entry (further ones of this kind are only counted)",
            extra={"kind": kind, "stream": stream, "entry_id": entry_id, "detail": detail},
        )

    def _count(self, result: FoldResult, entries: int) -> None:
        s = self.stats
        s.batches += 1
        s.entries += entries
        s.predictions += result.predictions
        s.failures += result.failures
        s.labels += result.labels
        s.duplicates += (
            result.duplicate_predictions + result.duplicate_labels + result.duplicate_failures
        )
        records = self._metrics.records
        records.labels(self.inference_stream, "folded").inc(result.predictions)
        records.labels(self.inference_stream, "failure").inc(result.failures)
        records.labels(self.inference_stream, "duplicate").inc(
            result.duplicate_predictions + result.duplicate_failures
        )
        records.labels(self.feedback_stream, "folded").inc(result.labels)
        records.labels(self.feedback_stream, "duplicate").inc(result.duplicate_labels)

    async def _claim_page(self, stream: str, cursor: str) -> tuple[str, Rows]:
        raw: Any = await self._claim(
            keys=[stream],
            args=[self.group, self.name, self._claim_idle_ms, cursor, self._batch, *DROPPED_FIELDS],
        )
        reply = json.loads(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw)
        return str(reply[0]), _rows(reply[1])

    async def _forget_idle_consumers(self) -> None:
        """Drop consumers with nothing pending and idle for long: every restart adds a name."""
        idle_ms = max(10 * self._claim_idle_ms, 60_000)
        for stream in self.streams:
            try:
                consumers: list[dict[str, Any]] = await self._client.xinfo_consumers(
                    stream, self.group
                )
            except ResponseError:  # no stream or group yet
                continue
            for c in consumers:
                name = _text(c["name"])
                if name != self.name and int(c["pending"]) == 0 and int(c["idle"]) > idle_ms:
                    await self._client.xgroup_delconsumer(stream, self.group, name)

    async def _outage(self, err: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.stats.outages += 1
            self._metrics.outages.inc()
            self._log.warning(
                "Redis unreachable; retrying with backoff",
                extra={"error": f"{type(err).__name__}: {err}"},
            )
            # Every pooled connection is as dead as the one that failed: drop them all, or each
            # would fail once more after Redis is back.
            with contextlib.suppress(*_REDIS_DOWN):
                await self._client.connection_pool.disconnect()
        await self._pause()

    async def _pause(self) -> None:
        """Wait the next backoff step (interrupted by `stop()`)."""
        self._backoff = min(max(self._backoff * 2, 0.05), self._max_backoff)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=self._backoff)

    def _recovered(self) -> None:
        if self._down_since is not None:
            down = time.monotonic() - self._down_since
            self._log.info("Redis reachable again", extra={"down_seconds": round(down, 3)})
            self._down_since = None
        self._backoff = 0.0


def _rows(entries: Sequence[Any] | Mapping[str, Any]) -> Rows:
    """[[id, [k, v, ...]], ...] (as the scripts encode XREADGROUP's reply) -> [(id, {k: v})].

    cjson writes an empty list as {}; an entry trimmed from the stream has no fields (false).
    """
    if not isinstance(entries, list):
        return []
    return [
        (entry_id, dict(zip(fields[::2], fields[1::2], strict=True)) if fields else {})
        for entry_id, fields in entries
    ]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# ----- entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.monitor.consumer",
        description="Fold inference records and feedback from Redis into the monitor state.",
    )
    p.add_argument("--redis-url", default=None, help="default: $LOOPLINE_REDIS_URL or local 6379")
    p.add_argument("--group", default=DEFAULT_GROUP, help="consumer group name")
    p.add_argument("--name", default=None, help="consumer name (default: host-pid)")
    p.add_argument("--inference-stream", default=INFERENCE_STREAM)
    p.add_argument("--feedback-stream", default=FEEDBACK_STREAM)
    p.add_argument("--batch", type=int, default=500, help="entries per stream per read")
    p.add_argument("--block-ms", type=int, default=1000, help="wait for new entries this long")
    p.add_argument(
        "--claim-idle-ms", type=int, default=30_000, help="reclaim entries idle this long"
    )
    p.add_argument("--window-s", type=int, default=60, help="tumbling window length")
    p.add_argument("--prefix", default=StateConfig.prefix, help="Redis key prefix of the state")
    p.add_argument(
        "--prediction-ttl-s", type=int, default=StateConfig.prediction_ttl_s,
        help="how long predictions wait for feedback (and duplicates are recognised)",
    )  # fmt: skip
    p.add_argument("--ack-delay-ms", type=int, default=0, help="fault injection for tests")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Run one consumer until SIGTERM or SIGINT, then finish its batch and exit."""
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, json=args.log_json)
    url = args.redis_url or os.environ.get("LOOPLINE_REDIS_URL", "redis://127.0.0.1:6379/0")
    config = StateConfig(
        prefix=args.prefix,
        window_s=args.window_s,
        prediction_ttl_s=args.prediction_ttl_s,
        # Windows outlive the index by a day, so the latest label still finds its window.
        window_ttl_s=max(StateConfig.window_ttl_s, args.prediction_ttl_s + 86_400),
    )
    asyncio.run(_serve(url, args, config))


async def _serve(url: str, args: argparse.Namespace, config: StateConfig) -> None:
    consumer = Consumer(
        url,
        group=args.group,
        name=args.name,
        streams=(args.inference_stream, args.feedback_stream),
        batch=args.batch,
        block_ms=args.block_ms,
        claim_idle_ms=args.claim_idle_ms,
        state_config=config,
        ack_delay_ms=args.ack_delay_ms,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(consumer.stop()))
    await consumer.run()


# Reads one batch for `consumer` from each stream in KEYS: (when ARGV[4] is "1") its own pending
# entries first, then new ones, up to COUNT per stream; blanks the fields named after the fourth
# argument; recreates a vanished group (from "0"). Returns JSON: [[[id, [k, v, ...]], ...] per
# stream, groups recreated].
_READ_LUA = r"""
local group, consumer, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local with_pending = ARGV[4] == '1'
local drop = {}
for i = 5, #ARGV do drop[ARGV[i]] = true end
local created = 0

local function xread(stream, id, n)
  local reply = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n,
                            'STREAMS', stream, id)
  if type(reply) == 'table' and reply.err then
    if not string.find(reply.err, 'NOGROUP', 1, true) then error(reply) end
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
    created = created + 1
    reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n, 'STREAMS', stream, id)
  end
  if not reply then return {} end
  return reply[1][2]
end

-- Dropped fields keep their name with an empty value: blanking in place is cheaper in Lua than
-- building a new list per entry.
local function blank(entries)
  for _, e in ipairs(entries) do
    local f = e[2]
    if type(f) == 'table' then
      for i = 1, #f, 2 do
        if drop[f[i]] then f[i + 1] = '' end
      end
    end
  end
  return entries
end

local result = {}
for s, stream in ipairs(KEYS) do
  local entries = {}
  if with_pending then entries = xread(stream, '0', count) end
  if #entries < count then
    for _, e in ipairs(xread(stream, '>', count - #entries)) do entries[#entries + 1] = e end
  end
  result[s] = blank(entries)
end
result[#KEYS + 1] = created
return cjson.encode(result)
"""

# XAUTOCLAIM one page of KEYS[1] for ARGV group, consumer, min idle ms, cursor, count; blanks
# the fields named after that. Returns JSON: [next cursor, [[id, [k, v, ...]], ...]].
_CLAIM_LUA = r"""
local drop = {}
for i = 6, #ARGV do drop[ARGV[i]] = true end
local reply = redis.pcall('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                          'COUNT', ARGV[5])
if type(reply) == 'table' and reply.err then
  if string.find(reply.err, 'NOGROUP', 1, true) then return cjson.encode({'0-0', {}}) end
  error(reply)
end
for _, e in ipairs(reply[2]) do
  local f = e[2]
  if type(f) == 'table' then
    for i = 1, #f, 2 do
      if drop[f[i]] then f[i + 1] = '' end
    end
  end
end
return cjson.encode({reply[1], reply[2]})
"""


if __name__ == "__main__":
    main()
