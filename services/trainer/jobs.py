"""Training jobs as data: their states, their event history, and a SQLite store that outlives
the trainer process.

Nothing here knows about protobuf or child processes. The servicer converts `Job` and `JobEvent`
to and from `loopline.v1` messages; `services.trainer.runner` drives the state machine.

A job moves QUEUED -> VALIDATING -> TRAINING -> EVALUATING/EXPORTING -> REGISTERING -> SUCCEEDED
and can end FAILED, CANCELLED or INTERRUPTED from any state that is not terminal. Every state
change is an event in the job's history, numbered from 1, and the change to a terminal state is
followed by a `job` snapshot event: replaying a history always ends with the final job, which is
what lets late `WatchJob` subscribers see everything an early one saw.
"""

from __future__ import annotations

import base64
import builtins
import dataclasses
import enum
import json
import sqlite3
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loopline import paging
from loopline.errors import FailedPrecondition, InvalidInput, NotFound
from loopline.logging import get_logger

__all__ = [
    "TERMINAL_STATES",
    "EventKind",
    "Job",
    "JobEvent",
    "JobState",
    "JobStore",
    "ModelRef",
    "default_path",
]

log = get_logger(__name__)


class JobState(enum.StrEnum):
    """Where a job is; the names follow `loopline.v1.JobState` without the prefix."""

    QUEUED = "queued"
    VALIDATING = "validating"
    TRAINING = "training"
    EXPORTING = "exporting"
    EVALUATING = "evaluating"
    REGISTERING = "registering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def terminal(self) -> bool:
        """Whether the job can no longer change state."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}
)


class EventKind(enum.StrEnum):
    """What a `JobEvent` carries; one per `JobEvent.event` oneof member of the proto."""

    STATE = "state"  # payload: previous_state, state, message
    PROGRESS = "progress"  # payload: the Progress fields (epoch, step, loss, trial, ...)
    METRICS = "metrics"  # payload: metrics {name: float}, split, epoch, trial
    JOB = "job"  # payload: Job.to_dict(), a full snapshot


@dataclass(frozen=True)
class ModelRef:
    """The registry version a job produced; `alias` only when the alias was moved to it."""

    name: str
    version: str
    alias: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelRef:
        """Rebuild from `dataclasses.asdict` output (or a child process's result dict)."""
        return cls(str(data["name"]), str(data["version"]), str(data.get("alias") or ""))


def _now() -> datetime:
    return datetime.now(UTC)


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass
class Job:
    """A training job. `spec` is opaque JSON to the store except for its `name`."""

    id: str
    spec: dict[str, Any]
    state: JobState = JobState.QUEUED
    create_time: datetime = field(default_factory=_now)
    start_time: datetime | None = None
    end_time: datetime | None = None
    error: str = ""
    model: ModelRef | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    gate_passed: bool = False
    gate_reason: str = ""
    idempotency_key: str | None = None
    cancel_reason: str = ""

    @property
    def name(self) -> str:
        """The registered model name the job trains (the spec's `name`), for filtering."""
        return str(self.spec.get("name") or "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: what the store keeps and what a `job` event carries."""
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        for key in ("create_time", "start_time", "end_time"):
            data[key] = _iso(getattr(self, key))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        """Inverse of `to_dict` (also reads the payload of a `job` event)."""
        values = dict(data)
        values["state"] = JobState(values["state"])
        values["model"] = ModelRef.from_dict(values["model"]) if values.get("model") else None
        for key in ("create_time", "start_time", "end_time"):
            values[key] = _time(values.get(key))
        return cls(**values)


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's history. `sequence` counts from 1 per job; 0 marks a snapshot that
    is not part of the history (the first event of a watch stream)."""

    job_id: str
    sequence: int
    time: datetime
    kind: EventKind
    payload: dict[str, Any]

    @classmethod
    def snapshot(cls, job: Job, sequence: int = 0) -> JobEvent:
        """A `job` event holding `job` as it is now."""
        return cls(job.id, sequence, _now(), EventKind.JOB, job.to_dict())

    @property
    def final(self) -> bool:
        """Whether this is the snapshot that closes a finished job's history."""
        return self.kind is EventKind.JOB and JobState(self.payload["state"]).terminal

    def job(self) -> Job:
        """The snapshot a `job` event carries."""
        if self.kind is not EventKind.JOB:
            raise ValueError(f"a {self.kind.value} event carries no job snapshot")
        return Job.from_dict(self.payload)


def default_path() -> Path:
    """Where the trainer keeps its jobs unless told otherwise (read at call time, not import)."""
    return Path.home() / ".loopline" / "trainer" / "jobs.db"


# Fields `update` may change; state and times change only through `transition`.
_MUTABLE = frozenset(
    {"error", "model", "metrics", "progress", "gate_passed", "gate_reason", "cancel_reason"}
)

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    n INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order: paging and queue order
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, n);
CREATE INDEX IF NOT EXISTS jobs_name ON jobs (name, n);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    sequence INTEGER NOT NULL,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
"""

Listener = Callable[[JobEvent], None]


def _dumps(value: Any) -> str:
    # default=str: a stray non-JSON value (a Path in a spec) is kept as text, not a crash.
    return json.dumps(value, default=str, separators=(",", ":"))


class JobStore:
    """Jobs and their event histories in one SQLite file (WAL), safe to share between threads.

    One connection guarded by a lock: writes are tiny and rare (a few per second per running
    job), so a pool would only add ways to deadlock. Each write runs in a `BEGIN IMMEDIATE`
    transaction, so a second process on the same file (the CLI reading jobs) never sees half a
    state change.
    """

    def __init__(self, path: Path | str | None = None) -> None:
        target = Path(path) if path is not None else default_path()
        if str(target) != ":memory:":
            target.parent.mkdir(parents=True, exist_ok=True)
        self.path = target
        self._lock = threading.RLock()
        self._listeners: builtins.list[Listener] = []
        # isolation_level=None: we open transactions ourselves (see _write).
        self._conn = sqlite3.connect(
            str(target), timeout=10.0, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)
        self._conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with every event appended from now on (after it is committed, on
        the appending thread); returns a function that removes it."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    # -- reads ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """The job `job_id`; NotFound when there is none."""
        with self._lock:
            return self._load(job_id)

    def list(
        self,
        state: JobState | None = None,
        name: str | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[builtins.list[Job], str]:
        """Jobs newest first, optionally only those in `state` or for model `name`; returns the
        page and the token of the next one ("" on the last page); `page_size` as
        `loopline.paging.page_size` reads it."""
        size = paging.page_size(page_size)
        where = ["n < ?"]
        args: builtins.list[Any] = [_decode_token(page_token)]
        if state is not None:
            where.append("state = ?")
            args.append(JobState(state).value)
        if name:
            where.append("name = ?")
            args.append(name)
        query = f"SELECT n, body FROM jobs WHERE {' AND '.join(where)} ORDER BY n DESC LIMIT ?"
        with self._lock:
            rows = self._conn.execute(query, [*args, size + 1]).fetchall()
        jobs = [_job(body) for _, body in rows[:size]]
        token = _encode_token(rows[size - 1][0]) if len(rows) > size else ""
        return jobs, token

    def next_queued(self) -> Job | None:
        """The oldest queued job, or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT body FROM jobs WHERE state = ? ORDER BY n LIMIT 1", [JobState.QUEUED.value]
            ).fetchone()
        return None if row is None else _job(row[0])

    def events(self, job_id: str, after_sequence: int = 0) -> builtins.list[JobEvent]:
        """The job's history after `after_sequence`, oldest first; NotFound for an unknown job."""
        with self._lock:
            self._load(job_id)
            rows = self._conn.execute(
                "SELECT sequence, time, kind, payload FROM events "
                "WHERE job_id = ? AND sequence > ? ORDER BY sequence",
                [job_id, after_sequence],
            ).fetchall()
        return [
            JobEvent(job_id, seq, datetime.fromisoformat(t), EventKind(kind), json.loads(payload))
            for seq, t, kind, payload in rows
        ]

    # -- writes --------------------------------------------------------------------------------

    def submit(
        self, spec: Mapping[str, Any], idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        """Queue a job for `spec`; returns it and whether it was created. A key already used
        returns the job submitted with it (whatever its spec) instead of a second job."""
        key = idempotency_key or None  # proto strings arrive as "" when unset
        job = Job(id=uuid.uuid4().hex[:16], spec=dict(spec), idempotency_key=key)
        try:
            with self._write() as emitted:
                existing = self._by_key(key)
                if existing is not None:
                    return existing, False
                self._conn.execute(
                    "INSERT INTO jobs (id, name, state, idempotency_key, body) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [job.id, job.name, job.state.value, key, _dumps(job.to_dict())],
                )
                message = f"queued by key {key}" if key else "queued"
                emitted.append(self._event(job, EventKind.STATE, _change(None, job.state, message)))
        except sqlite3.IntegrityError:
            # Another process inserted the same key between our check and our insert.
            found = self._by_key(key)
            if found is None:
                raise
            return found, False
        log.info("job queued", extra={"job_id": job.id, "model_name": job.name})
        return job, True

    def update(self, job_id: str, **fields: Any) -> Job:
        """Change non-state fields (error, model, metrics, progress, gate_*, cancel_reason)."""
        with self._write():
            job = dataclasses.replace(self._load(job_id), **_checked(fields))
            self._save(job)
        return job

    def append_event(
        self, job_id: str, kind: EventKind | str, payload: Mapping[str, Any], **fields: Any
    ) -> JobEvent:
        """Append an event to the job's history, and change `fields` of the job in the same
        transaction (e.g. `progress=` together with its progress event). FailedPrecondition once
        the job is terminal: its history ends with the final snapshot."""
        with self._write() as emitted:
            job = self._load(job_id)
            if job.state.terminal:
                raise FailedPrecondition(
                    f"job {job_id} is {job.state.value}; its history is closed",
                    job_id=job_id,
                    state=job.state.value,
                )
            if fields:
                job = dataclasses.replace(job, **_checked(fields))
                self._save(job)
            event = self._event(job, EventKind(kind), dict(payload))
            emitted.append(event)
        return event

    def transition(
        self,
        job_id: str,
        state: JobState,
        message: str = "",
        *,
        expect: Collection[JobState] | None = None,
        **fields: Any,
    ) -> Job:
        """Move the job to `state`, change `fields`, and append a `state` event (plus the final
        `job` snapshot when `state` is terminal). FailedPrecondition when the job is already
        terminal or not in one of the `expect`ed states. A move to the current state only
        changes `fields`."""
        with self._write() as emitted:
            job = self._load(job_id)
            if job.state.terminal or (expect is not None and job.state not in expect):
                raise FailedPrecondition(
                    f"job {job_id} is {job.state.value}; it cannot move to {state.value}",
                    job_id=job_id,
                    state=job.state.value,
                )
            job, events = self._move(job, JobState(state), message, fields)
            emitted.extend(events)
        return job

    def recover(self) -> builtins.list[Job]:
        """Mark every job that was running when the trainer stopped INTERRUPTED, keeping its last
        progress. Queued jobs stay queued: they will run. Call once at startup, before any job
        of this process runs."""
        active = [s.value for s in JobState if not s.terminal and s is not JobState.QUEUED]
        marks = ",".join("?" * len(active))
        interrupted: builtins.list[Job] = []
        with self._write() as emitted:
            rows = self._conn.execute(
                f"SELECT body FROM jobs WHERE state IN ({marks}) ORDER BY n", active
            ).fetchall()
            for (body,) in rows:
                job = _job(body)
                message = (
                    f"the trainer stopped while the job was {job.state.value}; "
                    "submit it again to retry"
                )
                job, events = self._move(job, JobState.INTERRUPTED, message, {})
                emitted.extend(events)
                interrupted.append(job)
        for job in interrupted:
            log.warning("job interrupted by a trainer restart", extra={"job_id": job.id})
        return interrupted

    # -- internals -----------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[builtins.list[JobEvent]]:
        """One write transaction; yields a list for the events it appends, which listeners
        hear about only once the transaction is committed."""
        emitted: builtins.list[JobEvent] = []
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield emitted
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            listeners = builtins.list(self._listeners)
        for event in emitted:
            for listener in listeners:
                _notify(listener, event)

    def _move(
        self, job: Job, state: JobState, message: str, fields: Mapping[str, Any]
    ) -> tuple[Job, builtins.list[JobEvent]]:
        previous = job.state
        job = dataclasses.replace(job, **_checked(fields), state=state)
        now = _now()
        # Started means taken by a slot: a job cancelled while queued never started.
        if not state.terminal and state is not JobState.QUEUED and job.start_time is None:
            job.start_time = now
        if state.terminal:
            job.end_time = now
        self._save(job)
        if state is previous:
            return job, []
        events = [self._event(job, EventKind.STATE, _change(previous, state, message))]
        if state.terminal:
            events.append(self._event(job, EventKind.JOB, job.to_dict()))
        log.info(
            "job state changed",
            extra={"job_id": job.id, "state": state.value, "previous_state": previous.value},
        )
        return job, events

    def _event(self, job: Job, kind: EventKind, payload: dict[str, Any]) -> JobEvent:
        (last,) = self._conn.execute(
            "SELECT COALESCE(MAX(sequence), 0) FROM events WHERE job_id = ?", [job.id]
        ).fetchone()
        event = JobEvent(job.id, int(last) + 1, _now(), kind, payload)
        self._conn.execute(
            "INSERT INTO events (job_id, sequence, time, kind, payload) VALUES (?, ?, ?, ?, ?)",
            [job.id, event.sequence, event.time.isoformat(), kind.value, _dumps(payload)],
        )
        return event

    def _load(self, job_id: str) -> Job:
        row = self._conn.execute("SELECT body FROM jobs WHERE id = ?", [job_id]).fetchone()
        if row is None:
            raise NotFound("job", job_id, "list jobs to see their ids")
        return _job(row[0])

    def _by_key(self, key: str | None) -> Job | None:
        if key is None:
            return None
        with self._lock:
            row = self._conn.execute(
                "SELECT body FROM jobs WHERE idempotency_key = ?", [key]
            ).fetchone()
        return None if row is None else _job(row[0])

    def _save(self, job: Job) -> None:
        self._conn.execute(
            "UPDATE jobs SET state = ?, body = ? WHERE id = ?",
            [job.state.value, _dumps(job.to_dict()), job.id],
        )


def _job(body: str) -> Job:
    return Job.from_dict(json.loads(body))


def _change(previous: JobState | None, state: JobState, message: str) -> dict[str, Any]:
    return {
        "previous_state": previous.value if previous is not None else "",
        "state": state.value,
        "message": message,
    }


def _checked(fields: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - _MUTABLE
    if unknown:
        raise ValueError(f"job fields {sorted(unknown)} cannot be updated; use transition()")
    return dict(fields)


def _notify(listener: Listener, event: JobEvent) -> None:
    # A broken subscriber must not fail the write that already committed.
    try:
        listener(event)
    except Exception:
        log.exception("job event listener failed", extra={"job_id": event.job_id})


def _encode_token(n: int) -> str:
    return base64.urlsafe_b64encode(f"jobs:{n}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> int:
    if not token:
        return 2**63 - 1  # before everything: the first page
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        prefix, n = text.split(":")
        if prefix != "jobs":
            raise ValueError(prefix)
        return int(n)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput(
            "page_token is not one this server issued; start again without a token",
            page_token=token,
        ) from None
