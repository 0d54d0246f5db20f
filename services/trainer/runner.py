"""Runs training jobs from the `JobStore`, one per slot at a time, each in its own child process.

Every job runs in a fresh process started with "spawn". A crash there (the out-of-memory killer,
a segfault in a kernel, a tokenizer that aborts) ends that process and fails the job, never the
trainer. All memory the job held, GPU memory included, goes back when its process exits, so
nothing needs releasing between jobs (no `torch.cuda.empty_cache()` bookkeeping). Spawn, not
fork: a forked child would inherit the parent's event loop, gRPC threads and any CUDA context,
none of which survive a fork.

The child calls a training function `(spec, progress) -> result` importable by name, and sends
each `progress(stage, fields)` report back through a pipe. The parent reads the pipe on its event
loop and turns the reports into state transitions and events in the store (see `interpret` for
the stage names); `watch` streams those events to any number of subscribers.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import importlib
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from loopline.errors import FailedPrecondition, LooplineError
from loopline.logging import configure_logging, get_logger
from services.trainer.jobs import EventKind, Job, JobEvent, JobState, JobStore, ModelRef

__all__ = [
    "DEFAULT_TARGET",
    "PROGRESS_FIELDS",
    "JobOutcome",
    "JobRunner",
    "Progress",
    "TrainFn",
    "Update",
    "describe_exit",
    "interpret",
]

log = get_logger(__name__)

Progress = Callable[[str, dict[str, Any]], None]
# A training function: runs in the child, reports through `progress`, returns JobOutcome.to_dict().
TrainFn = Callable[[dict[str, Any], Progress], Mapping[str, Any]]

# The production training function: a JobSpec (loopline/jobspec.py) run by the pipeline.
DEFAULT_TARGET = "services.trainer.execute:run_spec"

# The keys of `loopline.v1.Progress`; a progress event carries only these.
PROGRESS_FIELDS = (
    "epoch",
    "epochs",
    "step",
    "total_steps",
    "loss",
    "examples_per_second",
    "trial",
    "trials",
    "learning_rate",
)


# -- what a finished training function returns --------------------------------------------------


@dataclass(frozen=True)
class JobOutcome:
    """What a training function produced: the registered version, the final validation
    metrics and the promotion gate's decision. Crosses the process boundary as a dict."""

    model: ModelRef | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    gate_passed: bool = False
    gate_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The plain form a training function returns."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobOutcome:
        """Read a training function's result; KeyError/TypeError/ValueError when malformed."""
        model = data.get("model")
        metrics = data.get("metrics") or {}
        return cls(
            model=ModelRef.from_dict(model) if model else None,
            metrics={str(k): float(v) for k, v in metrics.items()},
            gate_passed=bool(data.get("gate_passed", False)),
            gate_reason=str(data.get("gate_reason") or ""),
        )


# -- what a progress report means for the job ---------------------------------------------------


@dataclass(frozen=True)
class Update:
    """What one progress report means for its job: a state to move to (with a message for
    the state event), progress fields, a metrics payload, the registered version."""

    state: JobState | None = None
    message: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    model: ModelRef | None = None


def _metrics(
    values: Mapping[str, Any], split: str, epoch: Any = 0, trial: Any = 0
) -> dict[str, Any]:
    """A MetricsUpdate payload; non-numeric values are dropped."""
    numbers = {
        str(k): float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    return {"metrics": numbers, "split": split, "epoch": epoch or 0, "trial": trial or 0}


def _progress(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: fields[k] for k in PROGRESS_FIELDS if k in fields}


def _validating(fields: Mapping[str, Any]) -> Update:
    return Update(JobState.VALIDATING, "loading and checking the data")


def _data_ok(fields: Mapping[str, Any]) -> Update:
    # Training starts once the data passed, so the data summary is the message of that change.
    labels = ", ".join(str(x) for x in fields.get("labels", []))
    counts = f"{int(fields['train']):,} training / {int(fields['validation']):,} validation"
    return Update(JobState.TRAINING, f"{counts} examples; labels: {labels}")


def _training(fields: Mapping[str, Any]) -> Update:
    return Update(JobState.TRAINING, f"fine-tuning {fields.get('base_model', 'the base model')}")


def _trial(fields: Mapping[str, Any]) -> Update:
    trial = int(fields["trial"])
    # A new trial restarts the epoch and step counts.
    progress = {"trial": trial, "epoch": 0, "step": 0, **_progress(fields)}
    return Update(JobState.TRAINING, f"trial {trial}", progress=progress)


def _trial_done(fields: Mapping[str, Any]) -> Update:
    score = {str(fields.get("metric", "score")): fields["score"]}
    return Update(metrics=_metrics(score, "validation", 0, int(fields["trial"])))


def _evaluating(fields: Mapping[str, Any]) -> Update:
    best = fields.get("best_metric")
    message = f"best validation score {best:.4f}" if isinstance(best, float) else ""
    return Update(JobState.EVALUATING, message)


def _exporting(fields: Mapping[str, Any]) -> Update:
    return Update(JobState.EXPORTING, "exporting to ONNX and checking parity")


def _exported(fields: Mapping[str, Any]) -> Update:
    # Registration follows the export directly in the pipeline, which has no stage of its own
    # for it; without a registry the job goes from here straight to SUCCEEDED.
    parity = _metrics(fields.get("parity") or {}, "export")
    return Update(JobState.REGISTERING, "registering the model package", metrics=parity)


def _registering(fields: Mapping[str, Any]) -> Update:
    return Update(JobState.REGISTERING, "registering the model package")


def _registered(fields: Mapping[str, Any]) -> Update:
    if not fields.get("version"):
        return Update()
    alias = str(fields.get("alias") or "")
    return Update(model=ModelRef(str(fields["name"]), str(fields["version"]), alias))


def _progress_only(fields: Mapping[str, Any]) -> Update:
    return Update(progress=_progress(fields))


def _epoch(fields: Mapping[str, Any]) -> Update:
    epoch, trial = fields.get("epoch", 0), fields.get("trial", 0)
    metrics = _metrics(fields.get("metrics") or {}, "validation", epoch, trial)
    return Update(progress=_progress(fields), metrics=metrics)


def _metrics_only(fields: Mapping[str, Any]) -> Update:
    split = str(fields.get("split") or "validation")
    metrics = _metrics(fields.get("metrics") or {}, split, fields.get("epoch"), fields.get("trial"))
    return Update(metrics=metrics)


# Stage names the pipeline reports (services/trainer/pipeline.py), plus three a training
# function may use for live figures: "progress" (Progress fields; throttled in the child),
# "epoch" (Progress fields plus `metrics` on validation data) and "metrics" (`metrics`, `split`,
# `epoch`, `trial`).
STAGES: Mapping[str, Callable[[Mapping[str, Any]], Update]] = {
    "validating data": _validating,
    "data ok": _data_ok,
    "training": _training,
    "trial": _trial,
    "trial done": _trial_done,
    "evaluating": _evaluating,
    "exporting": _exporting,
    "exported": _exported,
    "registering": _registering,
    "registered": _registered,
    "progress": _progress_only,
    "epoch": _epoch,
    "metrics": _metrics_only,
}


def interpret(stage: str, fields: Mapping[str, Any]) -> Update:
    """What the report `progress(stage, fields)` means for the job; an unknown stage means
    nothing. KeyError/TypeError/ValueError when a known stage lacks its fields."""
    handler = STAGES.get(stage)
    return handler(fields) if handler is not None else Update()


def describe_exit(code: int | None) -> str:
    """Why a child that sent no result ended, for the job's `error`."""
    if code is None:
        return "training process died (exit code unknown)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        # SIGKILL that we did not send is almost always the kernel's out-of-memory killer.
        hint = "; killed, often by the out-of-memory killer" if -code == signal.SIGKILL else ""
        return f"training process died (signal {name}){hint}"
    if code == 0:
        return "training process exited without a result (exit code 0)"
    return f"training process died (exit code {code})"


# -- the child process --------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChildOptions:
    log_level: str
    log_json: bool
    progress_interval: float
    device: str | None


class _Terminated(BaseException):
    """Raised in the child by SIGTERM. A BaseException so that the pipeline's own
    `except Exception` blocks do not swallow it, while its `finally` blocks (which close the
    MLflow run as failed) still run."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _json_safe(value: Any) -> Any:
    """Plain JSON data: numpy scalars and arrays become numbers and lists, the rest text."""

    def plain(item: Any) -> Any:
        tolist = getattr(item, "tolist", None)
        return tolist() if callable(tolist) else str(item)

    return json.loads(json.dumps(value, default=plain))


class _Reporter:
    """The `progress` callback the training function gets in the child."""

    def __init__(self, conn: Connection, interval: float) -> None:
        self._conn = conn
        self._interval = interval
        self._last = float("-inf")
        self._lock = threading.Lock()  # Connection.send is not thread-safe

    def __call__(self, stage: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        # Step-level progress could come hundreds of times a second; the store needs one every
        # `interval`. Every other stage is rare and always sent.
        if stage == "progress" and now - self._last < self._interval:
            return
        if stage == "progress":
            self._last = now
        message = ("progress", stage, _json_safe(fields))
        with self._lock:
            self._conn.send(message)


def _die_with_parent() -> None:
    """Exit when the trainer process dies, even by SIGKILL: an orphaned job would hold the GPU
    and might register a model for a job the restarted trainer has marked INTERRUPTED."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(70)  # no cleanup: the parent that would read it is gone

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _resolve(target: str | TrainFn) -> TrainFn:
    """The training function named `module:function` (or `module.function`)."""
    if callable(target):
        return target
    module, _, name = target.rpartition(":") if ":" in target else target.rpartition(".")
    function: TrainFn = getattr(importlib.import_module(module), name)
    return function


def _describe(err: BaseException) -> str:
    if isinstance(err, LooplineError):
        return err.message
    # Unlike an RPC error, the person reading a job's error is the one who asked for the job,
    # and "CUDA out of memory" or a tokenizer's complaint is what they need to act on.
    text = str(err)
    return f"{type(err).__name__}: {text}"[:2000] if text else type(err).__name__


JOB_ID_ENV = "LOOPLINE_TRAINER_JOB_ID"


def _child_main(
    target: str | TrainFn,
    job_id: str,
    spec: dict[str, Any],
    conn: Connection,
    options: _ChildOptions,
) -> None:
    """Entry point of the child process: run the training function and report back."""
    if options.device is not None:
        # Before anything imports torch: the device a slot owns is the only one the job sees.
        os.environ["CUDA_VISIBLE_DEVICES"] = options.device
    os.environ[JOB_ID_ENV] = job_id  # the training function's working folder is named for it
    configure_logging(options.log_level, options.log_json)
    _die_with_parent()
    signal.signal(signal.SIGTERM, _on_sigterm)
    bound = log.bind(job_id=job_id)
    try:
        result = _resolve(target)(spec, _Reporter(conn, options.progress_interval))
        conn.send(("result", _json_safe(dict(result))))
    except _Terminated:
        bound.info("training stopped by SIGTERM")
    except LooplineError as err:  # expected failures (bad data, unknown base model): no trace
        bound.warning("training failed", extra={"error": err.message})
        conn.send(("error", _describe(err)))
    except Exception as err:
        bound.exception("training failed")
        conn.send(("error", _describe(err)))
    finally:
        conn.close()


# -- the parent side ----------------------------------------------------------------------------


@dataclass
class _Run:
    """One job on a slot: its child process and what the child reported."""

    job_id: str
    slot: int
    spec: dict[str, Any]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_state: JobState | None = None
    stop_reason: str = ""
    process: BaseProcess | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    eof: bool = False

    def request_stop(self, state: JobState, reason: str) -> None:
        """Ask the supervisor to end the child; the first request decides the end state."""
        if self.stop_state is None:
            self.stop_state, self.stop_reason = state, reason
        self.stop.set()


class JobRunner:
    """Takes queued jobs from the store and runs each in a child process, one job per slot.

    `target` is the training function, as "module:function" or a module-level function (the
    child imports it by name). `devices`, when given, assigns one device per slot through
    CUDA_VISIBLE_DEVICES and sets the number of slots. Call `start()` once (it marks jobs a
    previous trainer left running INTERRUPTED) and `stop()` at shutdown (running jobs are
    stopped and marked INTERRUPTED; queued ones stay queued for the next start).

    One runner per store file: `start()` interrupts whatever another runner on the file is
    running. `watch` hears of new events at once while the runner is started, and by polling
    every `poll_interval` seconds otherwise (e.g. events written by another process).
    """

    def __init__(
        self,
        store: JobStore,
        target: str | TrainFn = DEFAULT_TARGET,
        *,
        slots: int = 1,
        devices: Sequence[str] | None = None,
        stop_grace: float = 5.0,
        progress_interval: float = 1.0,
        poll_interval: float = 1.0,
        log_level: str = "INFO",
        log_json: bool = False,
    ) -> None:
        self._devices: list[str | None] = list(devices) if devices else [None] * slots
        if not self._devices:
            raise ValueError("a job runner needs at least one slot")
        self._store = store
        self._target = target
        self._stop_grace = stop_grace
        self._poll_interval = poll_interval
        self._child = _ChildOptions(log_level, log_json, progress_interval, device=None)
        self._context = multiprocessing.get_context("spawn")
        self._running: dict[str, _Run] = {}
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unlisten: Callable[[], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> builtins.list[Job]:
        """Recover the store and start one worker per slot; returns the jobs now INTERRUPTED."""
        if self._workers:
            raise RuntimeError("the job runner is already started")
        self._loop = asyncio.get_running_loop()
        self._unlisten = self._store.add_listener(self._on_event)
        recovered = self._store.recover()
        self._workers = [
            asyncio.create_task(self._work(slot), name=f"trainer-slot-{slot}")
            for slot in range(len(self._devices))
        ]
        return recovered

    async def stop(self) -> None:
        """Stop taking jobs, stop running ones (they end INTERRUPTED) and wait for the workers."""
        self._closing = True
        self._wakeup.set()
        for run in list(self._running.values()):
            run.request_stop(JobState.INTERRUPTED, "the trainer shut down while the job ran")
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    async def __aenter__(self) -> JobRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- requests ------------------------------------------------------------------------------

    def submit(
        self, spec: Mapping[str, Any], idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        """Queue a job (see `JobStore.submit`) and wake an idle slot."""
        job, created = self._store.submit(spec, idempotency_key)
        self._wakeup.set()
        return job, created

    async def cancel(self, job_id: str, reason: str = "") -> Job:
        """Cancel a job: a queued one at once, a running one by ending its child (SIGTERM, then
        SIGKILL after `stop_grace` seconds); returns the job once it is terminal. A finished
        job is returned unchanged."""
        job = self._store.get(job_id)
        run = self._running.get(job_id)
        if job.state.terminal:
            return job
        if run is None:
            return self._cancel_idle(job, reason)
        log.info("cancelling a running job", extra={"job_id": job_id, "reason": reason})
        run.request_stop(JobState.CANCELLED, reason)
        await run.done.wait()
        return self._store.get(job_id)

    def child_pid(self, job_id: str) -> int | None:
        """The process id of the job's training process while it runs here, else None."""
        run = self._running.get(job_id)
        return None if run is None or run.process is None else run.process.pid

    async def watch(self, job_id: str, after_sequence: int = 0) -> AsyncIterator[JobEvent]:
        """Follow a job: a `job` snapshot (sequence 0), then its history after
        `after_sequence` (all of it by default), then new events as they are stored, ending
        with the final `job` snapshot once the job is terminal. NotFound for an unknown job."""
        self._loop = self._loop or asyncio.get_running_loop()
        yield JobEvent.snapshot(self._store.get(job_id))
        wake = asyncio.Event()
        self._watchers.setdefault(job_id, set()).add(wake)
        try:
            async for event in self._follow(job_id, after_sequence, wake):
                yield event
        finally:
            self._watchers[job_id].discard(wake)
            if not self._watchers[job_id]:
                del self._watchers[job_id]

    # -- internals: watching -------------------------------------------------------------------

    async def _follow(self, job_id: str, seen: int, wake: asyncio.Event) -> AsyncIterator[JobEvent]:
        while True:
            wake.clear()  # before reading: an event stored after the read sets it again
            events = self._store.events(job_id, seen)
            for event in events:
                yield event
                seen = event.sequence
                if event.final:
                    return
            if not events:
                job = self._store.get(job_id)
                if job.state.terminal:  # the final snapshot was before `after_sequence`
                    yield JobEvent.snapshot(job, seen)
                    return
                # The timeout catches events written by another process on the same file.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self._poll_interval)

    def _on_event(self, event: JobEvent) -> None:
        """Store listener (any thread): wake the watchers of the event's job."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._wake, event.job_id)

    def _wake(self, job_id: str) -> None:
        for wake in self._watchers.get(job_id, ()):
            wake.set()

    # -- internals: running --------------------------------------------------------------------

    def _cancel_idle(self, job: Job, reason: str) -> Job:
        """Cancel a job no child of ours runs: queued, or left by a runner that is gone."""
        message = reason or "cancelled"
        expect = {job.state}  # if it changed meanwhile, the caller sees the new state
        try:
            return self._store.transition(
                job.id, JobState.CANCELLED, message, expect=expect, cancel_reason=reason
            )
        except FailedPrecondition:
            return self._store.get(job.id)

    async def _work(self, slot: int) -> None:
        """One slot: take the oldest queued job, run it to its end, repeat."""
        while not self._closing:
            run = self._claim(slot)
            if run is None:
                self._wakeup.clear()  # no await since the empty claim: no submit slipped by
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self._poll_interval)
                continue
            try:
                await self._supervise(run)
            except asyncio.CancelledError:
                # Cancelled from outside (the loop is shutting down without stop()).
                self._end(run.job_id, JobState.INTERRUPTED, "the trainer stopped while the job ran")
                raise
            except Exception as err:
                log.exception("supervising a job failed", extra={"job_id": run.job_id})
                self._end(run.job_id, JobState.FAILED, f"trainer error: {type(err).__name__}")
            finally:
                self._running.pop(run.job_id, None)
                run.done.set()

    def _claim(self, slot: int) -> _Run | None:
        """Move the oldest queued job to VALIDATING and register it as running on `slot`."""
        while (job := self._store.next_queued()) is not None:
            device = self._devices[slot]
            where = f"training slot {slot}" + (f" (device {device})" if device else "")
            try:
                self._store.transition(
                    job.id, JobState.VALIDATING, f"started on {where}", expect={JobState.QUEUED}
                )
            except FailedPrecondition:
                continue  # cancelled (or taken by another process) since next_queued
            run = _Run(job.id, slot, job.spec)
            self._running[job.id] = run
            return run
        return None

    def _options(self, slot: int) -> _ChildOptions:
        return dataclasses.replace(self._child, device=self._devices[slot])

    async def _supervise(self, run: _Run) -> None:
        """Start the child, relay its reports until it exits (or is stopped), record the end."""
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_child_main,
            args=(self._target, run.job_id, run.spec, send, self._options(run.slot)),
            name=f"loopline-job-{run.job_id}",
            # Not a daemon: daemonic processes may not start children (DataLoader workers).
            # stop() and the child's parent watch keep it from outliving the trainer.
        )
        try:
            process.start()
        except BaseException:
            receive.close()
            raise
        finally:
            send.close()  # the child holds the only write end: EOF when it is gone
        run.process = process
        log.info("training process started", extra={"job_id": run.job_id, "pid": process.pid})
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(process.sentinel, _resolve_once, exited)
        loop.add_reader(receive.fileno(), self._receive, receive, run)
        try:
            await self._wait(run, process, exited)
        finally:
            loop.remove_reader(process.sentinel)
            loop.remove_reader(receive.fileno())
            _reap(process)
            self._receive(receive, run)  # what the child sent just before it exited
            receive.close()
        self._finish(run, process.exitcode)
        process.close()

    async def _wait(self, run: _Run, process: BaseProcess, exited: asyncio.Future[None]) -> None:
        stop: asyncio.Future[Any] = asyncio.ensure_future(run.stop.wait())
        try:
            await asyncio.wait([exited, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if exited.done():
            return
        log.info("terminating training process", extra={"job_id": run.job_id, "pid": process.pid})
        process.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(exited), self._stop_grace)
        except TimeoutError:
            log.warning(
                "training process ignored SIGTERM; killing it", extra={"job_id": run.job_id}
            )
            process.kill()
            await exited

    def _receive(self, conn: Connection, run: _Run) -> None:
        """Handle every message the child has sent so far (called when the pipe is readable)."""
        while not run.eof:
            try:
                if not conn.poll():
                    return
                message = conn.recv()
            except (EOFError, OSError):
                # The child is gone, possibly halfway through a message (SIGTERM, a crash).
                run.eof = True
                asyncio.get_running_loop().remove_reader(conn.fileno())
                return
            self._handle(run, message)

    def _handle(self, run: _Run, message: tuple[Any, ...]) -> None:
        match message:
            case ("progress", str(stage), dict(fields)):
                self._apply(run, stage, fields)
            case ("result", dict(result)):
                run.result = result
            case ("error", str(error)):
                run.error = error
            case _:
                log.warning("ignoring an unknown message", extra={"job_id": run.job_id})

    def _apply(self, run: _Run, stage: str, fields: dict[str, Any]) -> None:
        """Record one progress report, unless the job is being stopped (its end decides)."""
        if run.stop_state is not None:
            return
        try:
            self._record(run.job_id, interpret(stage, fields))
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed report", extra={"job_id": run.job_id, "stage": stage})
        except FailedPrecondition:
            pass  # the job ended meanwhile (cancelled from another process)

    def _record(self, job_id: str, update: Update) -> None:
        job = self._store.get(job_id)
        if update.state is not None and update.state is not job.state:
            job = self._store.transition(job_id, update.state, update.message)
        if update.progress:
            progress = {**job.progress, **update.progress}
            self._store.append_event(job_id, EventKind.PROGRESS, progress, progress=progress)
        if update.metrics is not None:
            self._store.append_event(job_id, EventKind.METRICS, update.metrics)
        if update.model is not None:
            self._store.update(job_id, model=update.model)

    def _finish(self, run: _Run, exit_code: int | None) -> None:
        """Record how the job ended: a result wins even over a late cancel (the version is
        registered by then), then a stop request, the child's error, and last its exit code."""
        extra = {"job_id": run.job_id, "exit_code": exit_code}
        if run.result is not None:
            self._succeed(run.job_id, run.result)
        elif run.stop_state is JobState.CANCELLED:
            message = run.stop_reason or "cancelled"
            self._end(run.job_id, JobState.CANCELLED, message, cancel_reason=run.stop_reason)
        elif run.stop_state is not None:
            self._end(run.job_id, run.stop_state, run.stop_reason)
        else:
            error = run.error if run.error is not None else describe_exit(exit_code)
            log.warning("training job failed", extra={**extra, "error": error})
            self._end(run.job_id, JobState.FAILED, error, error=error)
        log.info("training process ended", extra=extra)

    def _succeed(self, job_id: str, result: Mapping[str, Any]) -> None:
        try:
            outcome = JobOutcome.from_dict(result)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            error = f"training returned a result the trainer cannot read ({err!r})"
            self._end(job_id, JobState.FAILED, error, error=error)
            return
        if outcome.metrics:
            payload = _metrics(outcome.metrics, "validation")
            with contextlib.suppress(FailedPrecondition):
                self._store.append_event(
                    job_id, EventKind.METRICS, payload, metrics=outcome.metrics
                )
        model = outcome.model
        message = f"registered {model.name} version {model.version}" if model else "trained"
        fields = {"gate_passed": outcome.gate_passed, "gate_reason": outcome.gate_reason}
        self._end(job_id, JobState.SUCCEEDED, message, model=model, **fields)

    def _end(self, job_id: str, state: JobState, message: str, **fields: Any) -> None:
        try:
            self._store.transition(job_id, state, message, **fields)
        except FailedPrecondition:
            log.info("job already ended elsewhere", extra={"job_id": job_id})


def _resolve_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _reap(process: BaseProcess) -> None:
    """Make sure the child is gone and reaped; only still alive when supervision was cancelled,
    and then it must not outlive the job's record."""
    if process.is_alive():
        process.kill()
    process.join(timeout=5)
