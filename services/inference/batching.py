"""Dynamic batching for one served model version: a bounded queue and the loop that drains it.

Two layers, tested separately (style.md, "The batching queue"):

- `BatchQueue` is pure: no event loop, no clock. `next_batch(now, ...)` drops callers that went
  away, fails expired deadlines, and picks a batch anchored on the oldest entry, filled with the
  entries closest to it in token length so padding stays small (TEI's queue, plus deadlines).
- `Batcher` owns the asyncio side: one loop task that forms batches, at most `concurrency` batches
  executing on the batcher's own engine threads (the engine releases the GIL), and the next batch
  formed while the current one runs.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from loopline.errors import Cancelled, DeadlineExceeded, InternalError, NotReady, Overloaded
from loopline.logging import get_logger
from loopline.runtime import PAD_MULTIPLE, pad, padded_width, softmax
from services.inference.engines.base import EngineOutput

__all__ = [
    "BatchQueue",
    "BatchSettings",
    "BatchStats",
    "Batcher",
    "EngineCall",
    "Entry",
    "Result",
    "collate",
    "padded_width",
]

log = get_logger(__name__)

EngineCall = Callable[[np.ndarray, np.ndarray], EngineOutput]


@dataclass(frozen=True)
class Result:
    """One text's answer, with the timings and batch shape a record and the metrics need."""

    probabilities: np.ndarray  # [C] float32, softmax of the logits row
    embedding: np.ndarray  # [H] float32
    queue_seconds: float  # enqueue -> batch start
    compute_seconds: float  # the engine call for its batch
    batch_size: int
    padded_length: int  # width of the batch it ran in


# eq=False: entries are compared by identity (two requests with the same text are different).
@dataclass(eq=False)
class Entry:
    """One queued text: its token ids (truncated, unpadded) and the future its caller awaits."""

    ids: list[int]
    future: asyncio.Future[Result]  # a done (cancelled) future means the caller is gone
    enqueued_at: float  # time.monotonic()
    deadline: float | None = None  # monotonic; None means no deadline

    @property
    def tokens(self) -> int:
        """Unpadded length, what the batch picker groups by."""
        return len(self.ids)


@dataclass(frozen=True)
class BatchSettings:
    """How batches are formed and how many run at once, for one model version."""

    max_batch_size: int = 32
    max_batch_tokens: int = 8192  # budget on padded tokens: rows x padded width
    max_queue_delay: float = 0.002  # seconds the oldest entry may wait for company
    max_queue_size: int = 1024  # admission bound (entries)
    overhead_tokens: int = 0  # a batch's fixed cost in padded tokens; 0 = fill batches
    concurrency: int = 1  # batches of this model executing at once
    pad_multiple: int = PAD_MULTIPLE  # batch widths round up to this (tensor cores; 1 on CPU)

    def __post_init__(self) -> None:
        if self.overhead_tokens < 0:
            raise ValueError(
                f"BatchSettings.overhead_tokens must be >= 0, got {self.overhead_tokens}"
            )
        for name in (
            "max_batch_size",
            "max_batch_tokens",
            "max_queue_size",
            "concurrency",
            "pad_multiple",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"BatchSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay < 0:
            raise ValueError(
                f"BatchSettings.max_queue_delay must be >= 0, got {self.max_queue_delay}"
            )


@dataclass(frozen=True)
class BatchStats:
    """What one executed batch looked like; padding waste is `1 - real_tokens / padded_tokens`."""

    batch_size: int
    padded_length: int
    real_tokens: int
    padded_tokens: int
    queue_seconds: float  # the longest wait in the batch
    compute_seconds: float


# One padding rule for trainer parity checks, tests and serving: loopline.runtime owns it.
collate = pad


def _set_result(future: asyncio.Future[Result], result: Result) -> None:
    # The caller may have cancelled between batch formation and now; that must not raise.
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Result], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _fail_all(entries: Iterable[Entry], error: BaseException) -> None:
    for entry in entries:
        _set_exception(entry.future, error)


def _expired(entry: Entry, now: float) -> bool:
    return entry.deadline is not None and entry.deadline < now


def _fail_expired(entry: Entry, now: float) -> None:
    waited = now - entry.enqueued_at
    error = DeadlineExceeded(
        f"deadline passed after {waited * 1000:.1f} ms in the batching queue; "
        "raise the deadline or reduce load",
        queued_seconds=round(waited, 6),
    )
    _set_exception(entry.future, error)


def _drop_gone_and_expired(entries: Iterable[Entry], now: float) -> list[Entry]:
    """Keep the entries still worth computing; fail the expired ones, skip cancelled callers."""
    alive: list[Entry] = []
    for entry in entries:
        if entry.future.done():
            continue  # caller cancelled (or already answered): never reaches compute
        if _expired(entry, now):
            _fail_expired(entry, now)
            continue
        alive.append(entry)
    return alive


class BatchQueue:
    """A bounded FIFO of entries with a pure batch picker: no event loop, no clock (now is passed).

    `put` never blocks: a full queue raises `Overloaded` at once, so the caller answers
    RESOURCE_EXHAUSTED instead of piling up (MLServer blocks on `queue.put`; we do not).
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self._entries: list[Entry] = []  # arrival order
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def queued_tokens(self) -> int:
        """Unpadded tokens of everything queued (callers gone included, until pruned)."""
        return self._tokens

    def put(self, entry: Entry) -> None:
        """Append an entry; raise `Overloaded(len, max)` when the queue is full."""
        if len(self._entries) >= self.max_size:
            # Callers that went away still hold slots; reclaim them before refusing anyone.
            self._replace([e for e in self._entries if not e.future.done()])
        if len(self._entries) >= self.max_size:
            raise Overloaded(len(self._entries), self.max_size)
        self._entries.append(entry)
        self._tokens += entry.tokens

    def oldest_wait(self, now: float) -> float:
        """Seconds the oldest entry has waited; 0 when empty."""
        return max(0.0, now - self._entries[0].enqueued_at) if self._entries else 0.0

    def next_batch(
        self,
        now: float,
        max_requests: int,
        max_tokens: int,
        overhead_tokens: int = 0,
        pad_multiple: int = PAD_MULTIPLE,
    ) -> list[Entry]:
        """Remove and return the next batch (possibly empty), in the order chosen.

        Anchored on the oldest live entry so nobody starves, then filled with the entries
        closest to it in length (ties: older first) while the batch stays within `max_requests`
        rows and `max_tokens` padded tokens. An entry over the token budget on its own still
        runs, alone, so it is never stuck. With `overhead_tokens` (a batch's fixed cost, in
        padded tokens) the batch is cut where it is most efficient (`_efficiency`). The rest stay
        queued in arrival order.
        """
        self._replace(_drop_gone_and_expired(self._entries, now))
        if not self._entries:
            return []
        chosen = _pick(self._entries, max_requests, max_tokens, overhead_tokens, pad_multiple)
        taken = {id(entry) for entry in chosen}
        self._replace([e for e in self._entries if id(e) not in taken])
        return chosen

    def take_all(self) -> list[Entry]:
        """Remove and return every entry (shutdown)."""
        entries = self._entries
        self._replace([])
        return entries

    def _replace(self, entries: list[Entry]) -> None:
        self._entries = entries
        self._tokens = sum(entry.tokens for entry in entries)


def _pick(
    entries: list[Entry],
    max_requests: int,
    max_tokens: int,
    overhead_tokens: int,
    pad_multiple: int,
) -> list[Entry]:
    anchor = entries[0]
    # Stable sort by distance keeps arrival order among equal distances: older first.
    candidates = sorted(entries[1:], key=lambda e: abs(e.tokens - anchor.tokens))
    chosen = [anchor]
    longest, real = anchor.tokens, anchor.tokens
    best, best_size = _efficiency(real, 1, longest, overhead_tokens, pad_multiple), 1
    for entry in candidates:
        if len(chosen) >= max_requests:
            break
        width = padded_width(max(longest, entry.tokens), multiple=pad_multiple)
        # A candidate that breaks the budget may be followed by a shorter one that fits: skip
        # it rather than stop, so the batch stays as full as the budget allows.
        if (len(chosen) + 1) * width > max_tokens:
            continue
        chosen.append(entry)
        longest, real = max(longest, entry.tokens), real + entry.tokens
        score = _efficiency(real, len(chosen), longest, overhead_tokens, pad_multiple)
        if score >= best:
            best, best_size = score, len(chosen)
    return chosen[:best_size]


def _efficiency(
    real: int, rows: int, longest: int, overhead_tokens: int, pad_multiple: int
) -> float:
    """Real tokens per unit of cost, the cost being padded tokens plus a fixed cost per batch.

    With no per-batch cost (`overhead_tokens` 0) every prefix scores 1, so the batch is filled as
    far as the limits allow. With one, a batch stops growing where the next, longer candidates
    would add more padding than the batch saves: on CPU, where cost follows padded tokens and a
    batch's fixed cost is small, tight batches beat full ones (measured in docs/inference.md).
    """
    if overhead_tokens <= 0:
        return 1.0
    return real / (rows * padded_width(longest, rows, pad_multiple) + overhead_tokens)


@dataclass(eq=False)
class _Prepared:
    """A formed batch, padded and ready for the engine."""

    entries: list[Entry]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    real_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.real_tokens = sum(entry.tokens for entry in self.entries)


def _prepare(entries: list[Entry], pad_id: int, pad_multiple: int) -> _Prepared:
    input_ids, mask = collate([entry.ids for entry in entries], pad_id, pad_multiple)
    return _Prepared(entries, input_ids, mask)


class Batcher:
    """Batches requests for one served model version and runs them on its engine.

    One loop task waits on an event set by `submit` (and by a batch finishing). A batch is formed
    when the queue holds a full batch, or when an execution slot is free and the oldest entry has
    waited `max_queue_delay`. With every slot busy a full batch is formed and padded ahead
    (prefetch one, as TEI does), but a partial one is left open: it cannot run sooner, so
    waiting only lets later arrivals join it.
    """

    def __init__(
        self,
        run: EngineCall,
        pad_id: int,
        settings: BatchSettings,
        *,
        executor: concurrent.futures.Executor | None = None,
        name: str = "model",
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self._run = run
        self._pad_id = pad_id
        self._settings = settings
        # One thread per execution slot, owned here unless the caller passes a pool: each slot
        # always runs on the same thread, so glibc serves its activation buffers from the same
        # per-thread heap and ONNX Runtime sees the same calling thread. A pool of `concurrency`
        # threads hands consecutive batches to alternating threads even when they run one at a
        # time: with concurrency 2, lone requests through the worker measured 5.2 ms p50 and
        # 11.7 ms p95 that way against 4.3 and 6.5 ms on a fixed thread (MiniLM int8, 2 cores).
        self._owns_executor = executor is None
        self._executors: list[concurrent.futures.Executor] = (
            [executor] * settings.concurrency
            if executor is not None
            else [
                concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"engine-{name}-{slot}"
                )
                for slot in range(settings.concurrency)
            ]
        )
        self._name = name
        self._on_batch = on_batch
        self._queue = BatchQueue(settings.max_queue_size)
        self._wakeup = asyncio.Event()
        self._free = list(range(settings.concurrency))  # slots free to start a batch, ascending
        self._task: asyncio.Task[None] | None = None
        self._executing: set[asyncio.Task[None]] = set()
        self._prefetched: _Prepared | None = None  # formed, waiting for a slot
        self._in_flight = 0
        self._stopping = False

    @property
    def queue_depth(self) -> int:
        """Entries waiting: queued, plus a formed batch still waiting for a slot."""
        prefetched = len(self._prefetched.entries) if self._prefetched else 0
        return len(self._queue) + prefetched

    @property
    def in_flight(self) -> int:
        """Entries in batches currently executing."""
        return self._in_flight

    def start(self) -> None:
        """Start the loop task on the running event loop."""
        if self._task is not None:
            raise RuntimeError(f"batcher for {self._name} already started")
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"batcher-{self._name}"
        )

    def submit(
        self, ids: list[int], deadline: float | None, *, alone: bool = False
    ) -> asyncio.Future[Result]:
        """Queue one text; raise `Overloaded` when full or `NotReady` when not running.

        `alone`: the caller sends no other text with this one (a single-text request). On an
        idle model it is then dispatched at once instead of by the loop task a scheduling round
        later; texts submitted together without it still wait for the loop to batch them.
        """
        if self._stopping or self._task is None:
            raise NotReady(f"model {self._name} is not accepting requests", model=self._name)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.put(Entry(list(ids), future, time.monotonic(), deadline))
        if alone and self._runs_at_once():
            self._dispatch(self._form())
            return future
        self._wakeup.set()
        return future

    def _runs_at_once(self) -> bool:
        """Whether what was just queued is alone, with nothing to wait for: no company expected
        (no queue delay), a free execution slot, and no batch formed and waiting for one."""
        return (
            len(self._queue) == 1
            and bool(self._free)
            and self._prefetched is None
            and self._settings.max_queue_delay == 0
        )

    async def drain_and_stop(self) -> None:
        """Stop accepting, finish everything queued and in flight, then end the loop task."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            # Returns once the queue is empty and the last batch dispatched; gather so that a
            # drain after stop_now does not raise the loop task's CancelledError here.
            await asyncio.gather(self._task, return_exceptions=True)
        while self._executing:
            await asyncio.gather(*self._executing, return_exceptions=True)
        self._close_executor()

    async def stop_now(self) -> None:
        """Cancel everything: queued entries fail with NotReady, executing ones with Cancelled."""
        self._stopping = True
        tasks = [t for t in (self._task, *self._executing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _fail_all(
            self._queue.take_all(),
            NotReady(f"model {self._name} stopped before this request ran", model=self._name),
        )
        self._close_executor()

    def _close_executor(self) -> None:
        # Nothing is executing any more; a batch cancelled mid-run finishes on its thread.
        if self._owns_executor:
            for executor in self._executors:
                executor.shutdown(wait=False, cancel_futures=True)

    # --- the loop -------------------------------------------------------------------------

    async def _loop(self) -> None:
        while await self._wait_until_ready():
            try:
                await self._form_and_dispatch()
            except asyncio.CancelledError:
                self._fail_prefetched(Cancelled("batcher stopped"))
                raise
            except Exception:
                # A bug here must not kill the loop and hang every later caller.
                log.exception("batch formation failed", extra={"model": self._name})
                self._fail_prefetched(InternalError("batch formation failed"))

    async def _form_and_dispatch(self) -> None:
        self._prefetched = self._form()
        if self._prefetched is None:
            return  # every candidate had gone or expired
        while not self._free:
            # A finishing batch sets it; a submit meanwhile is seen by _wait_until_ready later.
            self._wakeup.clear()
            await self._wakeup.wait()
        prepared = self._refresh(self._prefetched)
        self._prefetched = None
        self._dispatch(prepared)

    def _fail_prefetched(self, error: Exception) -> None:
        if self._prefetched is not None:
            _fail_all(self._prefetched.entries, error)
        self._prefetched = None

    async def _wait_until_ready(self) -> bool:
        """Wait until a batch should be formed; False once stopping with nothing queued."""
        loop = asyncio.get_running_loop()
        while True:
            # Clear before checking: a submit after the check sets it again, so none is missed.
            self._wakeup.clear()
            if self._stopping and not self._queue:
                return False
            delay = self._seconds_until_ready(time.monotonic())
            if delay == 0:
                return True
            timer = loop.call_later(delay, self._wakeup.set) if delay is not None else None
            try:
                await self._wakeup.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    def _seconds_until_ready(self, now: float) -> float | None:
        """0: form a batch now; a number: wait that long; None: wait for an event."""
        settings = self._settings
        if not self._queue:
            return None
        if (
            len(self._queue) >= settings.max_batch_size
            or self._queue.queued_tokens >= settings.max_batch_tokens
        ):
            return 0.0  # full: nothing to gain by waiting, form it now (prefetch if busy)
        if not self._free:
            return None  # a slot freeing up sets the event
        if self._stopping:
            return 0.0  # draining: waiting for company only delays shutdown
        return max(0.0, settings.max_queue_delay - self._queue.oldest_wait(now))

    def _form(self) -> _Prepared | None:
        settings = self._settings
        entries = self._queue.next_batch(
            time.monotonic(),
            settings.max_batch_size,
            settings.max_batch_tokens,
            settings.overhead_tokens,
            settings.pad_multiple,
        )
        return _prepare(entries, self._pad_id, settings.pad_multiple) if entries else None

    def _refresh(self, prepared: _Prepared) -> _Prepared | None:
        """Drop entries that went away or expired while the batch waited for a slot."""
        alive = _drop_gone_and_expired(prepared.entries, time.monotonic())
        if len(alive) == len(prepared.entries):
            return prepared
        return _prepare(alive, self._pad_id, self._settings.pad_multiple) if alive else None

    def _dispatch(self, prepared: _Prepared | None) -> None:
        """Start a formed batch on a free slot (the caller made sure there is one)."""
        if prepared is None:
            return
        slot = self._free.pop(0)
        self._in_flight += len(prepared.entries)
        task = asyncio.get_running_loop().create_task(self._execute(prepared, slot))
        self._executing.add(task)
        task.add_done_callback(self._executing.discard)

    # --- one batch ------------------------------------------------------------------------

    async def _execute(self, prepared: _Prepared, slot: int) -> None:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            output, probabilities, seconds = await loop.run_in_executor(
                self._executors[slot],
                _compute,
                self._run,
                prepared.input_ids,
                prepared.attention_mask,
            )
            self._deliver(prepared, output, probabilities, started, seconds)
        except asyncio.CancelledError:
            _fail_all(prepared.entries, Cancelled("batcher stopped while the batch ran"))
            raise
        except Exception as err:
            log.exception(
                "engine failed on a batch",
                extra={"model": self._name, "batch_size": len(prepared.entries)},
            )
            error = err if isinstance(err, InternalError) else _engine_error(self._name, err)
            _fail_all(prepared.entries, error)
        finally:
            self._in_flight -= len(prepared.entries)
            bisect.insort(self._free, slot)
            self._wakeup.set()

    def _deliver(
        self,
        prepared: _Prepared,
        output: EngineOutput,
        probabilities: np.ndarray,
        started: float,
        compute_seconds: float,
    ) -> None:
        size, width = prepared.input_ids.shape
        for row, entry in enumerate(prepared.entries):
            result = Result(
                probabilities=probabilities[row],
                embedding=np.asarray(output.embedding[row], dtype=np.float32),
                queue_seconds=started - entry.enqueued_at,
                compute_seconds=compute_seconds,
                batch_size=size,
                padded_length=width,
            )
            _set_result(entry.future, result)
        oldest = min(entry.enqueued_at for entry in prepared.entries)
        self._report(
            BatchStats(
                size, width, prepared.real_tokens, size * width, started - oldest, compute_seconds
            )
        )

    def _report(self, stats: BatchStats) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(stats)
        except Exception:
            # Metrics must never fail requests that already have their answers.
            log.exception("on_batch callback failed", extra={"model": self._name})


def _compute(
    run: EngineCall, input_ids: np.ndarray, attention_mask: np.ndarray
) -> tuple[EngineOutput, np.ndarray, float]:
    # Runs in an engine thread; softmax too, to keep numpy work off the event loop.
    started = time.perf_counter()
    output = run(input_ids, attention_mask)
    seconds = time.perf_counter() - started
    _check_rows(output, len(input_ids))
    return output, softmax(np.asarray(output.logits, dtype=np.float32)), seconds


def _check_rows(output: EngineOutput, expected: int) -> None:
    rows = {len(output.logits), len(output.embedding)}
    if rows != {expected}:
        raise InternalError(
            f"engine returned {len(output.logits)} logits rows and {len(output.embedding)} "
            f"embedding rows for a batch of {expected}",
            expected=expected,
            logits_rows=len(output.logits),
            embedding_rows=len(output.embedding),
        )


def _engine_error(name: str, err: Exception) -> InternalError:
    # Only the exception type reaches the caller: its message may hold inputs or paths.
    return InternalError(
        f"model {name} failed on this batch ({type(err).__name__}); the server log has details",
        model=name,
        error=type(err).__name__,
    )
