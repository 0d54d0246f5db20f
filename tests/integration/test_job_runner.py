"""The job runner with real child processes: success with its events in order, a crash and an
exception that fail only their job, cancellation (also of a child that ignores SIGTERM), a
trainer restart (graceful and by SIGKILL), and two watchers of one job.

The training function is a small fake defined here, at module level, so that the spawned child
can import it by name; `spec["mode"]` picks how it behaves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from services.trainer.jobs import EventKind, JobEvent, JobState, JobStore, ModelRef
from services.trainer.runner import JobOutcome, JobRunner, Progress

pytestmark = pytest.mark.timeout(60)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


# -- the fake training function (runs in the child) --------------------------------------------


def _succeed(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    steps = int(spec.get("steps", 4))
    progress("validating data", {"data": "reviews.jsonl"})
    progress("data ok", {"train": 40, "validation": 10, "labels": ["neg", "pos"]})
    progress("training", {"base_model": "tiny"})
    for step in range(1, steps + 1):
        time.sleep(0.01)
        fields = {"epoch": 1, "epochs": 1, "step": step, "total_steps": steps, "loss": 1 / step}
        progress("progress", fields)
    release = spec.get("release")
    while release and not Path(release).exists():  # held until the test lets it finish
        time.sleep(0.02)
    progress("epoch", {"epoch": 1, "epochs": 1, "step": steps, "metrics": {"accuracy": 0.75}})
    progress("evaluating", {"best_metric": 0.75})
    progress("exporting", {"output": "/nowhere"})
    progress("exported", {"parity": {"fp32_max_abs_logit_diff": 2e-6}})
    progress("registered", {"name": spec["name"], "version": "7", "alias": "challenger"})
    model = ModelRef(spec["name"], "7", "challenger")
    return JobOutcome(model, {"accuracy": 0.75}, True, "no gate").to_dict()


def _crash(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    progress("validating data", {"data": "reviews.jsonl"})
    os._exit(3)  # what a native crash looks like to the parent: no result, no error message


def _raise(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    progress("validating data", {"data": "reviews.jsonl"})
    raise ValueError("tokenizer cannot read vocab.txt")


def _slow(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    progress("training", {"base_model": "tiny"})
    for step in range(1, 100_000):
        time.sleep(0.02)
        progress("progress", {"step": step})
    return {}


def _stubborn(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    progress("training", {"base_model": "tiny"})
    while True:  # swallows the runner's SIGTERM, as a hung native call would ignore it
        try:
            time.sleep(0.02)
        except BaseException:
            progress("progress", {"step": 1})


MODES: dict[str, Callable[[dict[str, Any], Progress], dict[str, Any]]] = {
    "ok": _succeed,
    "crash": _crash,
    "raise": _raise,
    "slow": _slow,
    "stubborn": _stubborn,
}


def fake_train(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """A training function that behaves as `spec["mode"]` says."""
    return MODES[spec.get("mode", "ok")](spec, progress)


TARGET = f"{fake_train.__module__}:fake_train"


# -- helpers ------------------------------------------------------------------------------------


def make_runner(store: JobStore, **options: Any) -> JobRunner:
    settings: dict[str, Any] = {"poll_interval": 0.05, "progress_interval": 0.0, "stop_grace": 3}
    return JobRunner(store, TARGET, **(settings | options))


async def follow(runner: JobRunner, job_id: str, after: int = 0) -> list[JobEvent]:
    async with asyncio.timeout(20):
        return [event async for event in runner.watch(job_id, after)]


async def eventually(check: Callable[[], bool], seconds: float = 15) -> None:
    async with asyncio.timeout(seconds):
        while not check():
            await asyncio.sleep(0.02)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie counts: an orphan's reaper may be slow or absent)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return status.rsplit(")", 1)[1].split()[0] == "Z"


def states(events: list[JobEvent]) -> list[str]:
    return [e.payload["state"] for e in events if e.kind is EventKind.STATE]


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.db")


# -- tests --------------------------------------------------------------------------------------


def test_a_job_runs_to_success_with_its_events_in_order(store: JobStore) -> None:
    async def main() -> None:
        async with make_runner(store) as runner:
            job, _ = runner.submit({"name": "sentiment", "mode": "ok"})
            events = await follow(runner, job.id)
            assert runner.child_pid(job.id) is None

        opening, history = events[0], events[1:]
        assert (opening.kind, opening.sequence) == (EventKind.JOB, 0)
        assert [e.sequence for e in history] == list(range(1, len(history) + 1))
        assert states(history) == [
            "queued",
            "validating",
            "training",
            "evaluating",
            "exporting",
            "registering",
            "succeeded",
        ]
        steps = [e.payload["step"] for e in history if e.kind is EventKind.PROGRESS]
        assert steps == [1, 2, 3, 4, 4]  # four steps, then the epoch report
        splits = [e.payload["split"] for e in history if e.kind is EventKind.METRICS]
        assert splits == ["validation", "export", "validation"]  # epoch 1, parity, final
        data_ok = next(e for e in history if e.payload.get("state") == "training")
        assert (
            data_ok.payload["message"] == "40 training / 10 validation examples; labels: neg, pos"
        )

        final = history[-1]
        assert final.final
        done = final.job()
        assert done == store.get(job.id)
        assert done.state is JobState.SUCCEEDED
        assert done.model == ModelRef("sentiment", "7", "challenger")
        assert done.metrics == {"accuracy": 0.75}
        assert (done.gate_passed, done.gate_reason) == (True, "no gate")
        assert done.progress["step"] == 4
        assert done.start_time is not None
        assert done.end_time is not None

    run(main)


def test_a_crash_or_an_exception_fails_only_its_job(store: JobStore) -> None:
    async def main() -> None:
        async with make_runner(store) as runner:
            crash, _ = runner.submit({"name": "s", "mode": "crash"})
            error, _ = runner.submit({"name": "s", "mode": "raise"})
            fine, _ = runner.submit({"name": "s", "mode": "ok"})
            await follow(runner, fine.id)

        crashed = store.get(crash.id)
        assert crashed.state is JobState.FAILED
        assert crashed.error == "training process died (exit code 3)"
        assert states(store.events(crash.id))[-2:] == ["validating", "failed"]
        raised = store.get(error.id)
        assert raised.state is JobState.FAILED
        assert raised.error == "ValueError: tokenizer cannot read vocab.txt"
        assert store.get(fine.id).state is JobState.SUCCEEDED

    run(main)


def test_cancel_stops_a_running_job_within_seconds_and_a_queued_one_at_once(
    store: JobStore,
) -> None:
    async def main() -> None:
        async with make_runner(store) as runner:
            running, _ = runner.submit({"name": "s", "mode": "slow"})
            queued, _ = runner.submit({"name": "s", "mode": "ok"})
            await eventually(lambda: store.get(running.id).progress.get("step", 0) >= 2)
            pid = runner.child_pid(running.id)
            assert pid is not None

            waiting = await runner.cancel(queued.id, "not needed")
            assert waiting.state is JobState.CANCELLED
            assert waiting.start_time is None

            # Bounded, not timed: a cancel that hangs fails here; speed is not the point.
            cancelled = await asyncio.wait_for(runner.cancel(running.id, "wrong data"), 60)
            assert cancelled.state is JobState.CANCELLED
            assert cancelled.cancel_reason == "wrong data"
            assert cancelled.error == ""
            assert gone(pid)
            assert await runner.cancel(running.id, "again") == cancelled  # a no-op now

        change = store.events(running.id)[-2]
        assert (change.payload["state"], change.payload["message"]) == ("cancelled", "wrong data")

    run(main)


def test_a_child_that_ignores_sigterm_is_killed(store: JobStore) -> None:
    async def main() -> None:
        async with make_runner(store, stop_grace=0.5) as runner:
            job, _ = runner.submit({"name": "s", "mode": "stubborn"})
            await eventually(lambda: store.get(job.id).state is JobState.TRAINING)
            pid = runner.child_pid(job.id)
            assert pid is not None
            cancelled = await asyncio.wait_for(runner.cancel(job.id), 60)
            assert cancelled.state is JobState.CANCELLED
            assert gone(pid)  # it ignores SIGTERM: only the SIGKILL after the grace ends it

    run(main)


def test_a_restart_interrupts_running_jobs_and_runs_queued_ones(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"

    async def first_life() -> tuple[str, str, int]:
        store = JobStore(path)
        runner = make_runner(store)
        await runner.start()
        running, _ = runner.submit({"name": "s", "mode": "slow"})
        queued, _ = runner.submit({"name": "s", "mode": "ok"})
        await eventually(lambda: store.get(running.id).progress.get("step", 0) >= 2)
        pid = runner.child_pid(running.id)
        assert pid is not None
        await runner.stop()
        return running.id, queued.id, pid

    async def second_life(running: str, queued: str, died: str) -> None:
        store = JobStore(path)  # a new process would open the same file
        async with make_runner(store) as runner:
            assert store.get(died).state is JobState.INTERRUPTED
            done = await follow(runner, queued)
        assert done[-1].job().state is JobState.SUCCEEDED
        assert store.get(running).state is JobState.INTERRUPTED

    async def main() -> None:
        running, queued, pid = await first_life()
        assert gone(pid)
        store = JobStore(path)
        stopped = store.get(running)
        assert stopped.state is JobState.INTERRUPTED
        assert stopped.progress["step"] >= 2
        assert store.get(queued).state is JobState.QUEUED
        # A job a trainer left TRAINING when it died without stopping (SIGKILL, power loss).
        died = store.submit({"name": "s", "mode": "slow"})[0].id
        store.transition(died, JobState.TRAINING)
        store.append_event(died, "progress", {"step": 5}, progress={"step": 5})
        await second_life(running, queued, died)
        assert JobStore(path).get(died).progress == {"step": 5}

    run(main)


TRAINER_SCRIPT = f"""
import asyncio, sys
from services.trainer.jobs import JobStore
from services.trainer.runner import JobRunner

async def main():
    store = JobStore(sys.argv[1])
    runner = JobRunner(store, {TARGET!r}, poll_interval=0.05, progress_interval=0.0)
    await runner.start()
    job, _ = runner.submit({{"name": "s", "mode": "slow"}})
    while runner.child_pid(job.id) is None or not store.get(job.id).progress:
        await asyncio.sleep(0.02)
    print(job.id, runner.child_pid(job.id), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_a_child_does_not_outlive_a_killed_trainer(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER_SCRIPT, str(path)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert trainer.stdout is not None
        job_id, pid = trainer.stdout.readline().split()
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=5)

        async def child_gone() -> None:
            await eventually(lambda: gone(int(pid)), seconds=5)

        run(child_gone)
    finally:
        trainer.kill()
        trainer.wait()
    store = JobStore(path)
    assert store.get(job_id).state is JobState.TRAINING  # what the dead trainer left
    (interrupted,) = store.recover()
    assert interrupted.id == job_id
    assert interrupted.state is JobState.INTERRUPTED


def test_two_watchers_one_late_see_the_whole_history(store: JobStore, tmp_path: Path) -> None:
    release = tmp_path / "release"

    async def main() -> None:
        async with make_runner(store) as runner:
            job, _ = runner.submit({"name": "s", "mode": "ok", "release": str(release)})
            early = asyncio.create_task(follow(runner, job.id))
            await eventually(lambda: store.get(job.id).progress.get("step") == 4)
            late = asyncio.create_task(follow(runner, job.id))
            await asyncio.sleep(0.1)  # the late watcher has replayed the history by now
            release.touch()
            first, second = await early, await late
            resumed = await follow(runner, job.id, after=first[3].sequence)

        assert first[0].kind is EventKind.JOB
        assert second[0].kind is EventKind.JOB
        assert not JobState(first[0].payload["state"]).terminal
        assert second[0].payload["state"] == "training"  # the snapshot is taken on joining
        assert first[1:] == second[1:] == store.events(job.id)
        assert first[-1].final
        assert resumed[1:] == first[4:]

    run(main)
