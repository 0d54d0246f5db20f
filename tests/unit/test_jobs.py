"""The job store on a real SQLite file (idempotency, paging, transitions, recovery) and the pure
pieces of the runner: what each pipeline report means, how a dead child is described."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from loopline.errors import FailedPrecondition, InvalidInput, NotFound
from services.trainer.jobs import EventKind, Job, JobEvent, JobState, JobStore, ModelRef
from services.trainer.runner import JobOutcome, describe_exit, interpret


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.db")


def spec(name: str = "sentiment", **more: object) -> dict[str, object]:
    return {"name": name, "data": "train.jsonl", **more}


def kinds(events: list[JobEvent]) -> list[str]:
    return [e.kind.value for e in events]


def test_submit_queues_a_job_with_a_state_event(store: JobStore) -> None:
    job, created = store.submit(spec(epochs=2))
    assert created
    assert job.state is JobState.QUEUED
    assert job.name == "sentiment"
    assert store.get(job.id) == job
    (event,) = store.events(job.id)
    assert (event.sequence, event.kind) == (1, EventKind.STATE)
    assert event.payload == {"previous_state": "", "state": "queued", "message": "queued"}


def test_a_repeated_idempotency_key_returns_the_first_job(store: JobStore, tmp_path: Path) -> None:
    first, created = store.submit(spec(), idempotency_key="nightly-2024-06-01")
    again, created_again = store.submit(spec(epochs=9), idempotency_key="nightly-2024-06-01")
    other, _ = store.submit(spec(), idempotency_key="nightly-2024-06-02")
    assert created
    assert not created_again
    assert again == first
    assert other.id != first.id
    # The key survives a restart: a second store on the same file still answers with the job.
    reopened, created_later = JobStore(tmp_path / "jobs.db").submit(spec(), "nightly-2024-06-01")
    assert not created_later
    assert reopened.id == first.id


def test_jobs_without_a_key_are_always_new(store: JobStore) -> None:
    a, _ = store.submit(spec())
    b, _ = store.submit(spec(), idempotency_key="")  # proto's unset string
    assert a.id != b.id
    assert b.idempotency_key is None


def test_get_of_an_unknown_job_is_not_found(store: JobStore) -> None:
    with pytest.raises(NotFound, match="job 'nope' not found"):
        store.get("nope")
    with pytest.raises(NotFound):
        store.events("nope")


def test_list_pages_newest_first_and_filters(store: JobStore) -> None:
    ids = [store.submit(spec("sentiment" if i % 2 else "topics"))[0].id for i in range(7)]
    store.transition(ids[0], JobState.CANCELLED, "no longer needed")
    seen, token = [], ""
    while True:
        page, token = store.list(page_size=3, page_token=token)
        assert len(page) <= 3
        seen += [j.id for j in page]
        if not token:
            break
    assert seen == ids[::-1]
    named, _ = store.list(name="sentiment")
    assert [j.id for j in named] == [ids[5], ids[3], ids[1]]
    with pytest.raises(InvalidInput, match="page_size"):  # as ListExperiments and ListAlerts
        store.list(page_size=-1)
    cancelled, token = store.list(state=JobState.CANCELLED)
    assert [j.id for j in cancelled] == [ids[0]]
    assert token == ""


def test_a_foreign_page_token_is_invalid_input(store: JobStore) -> None:
    with pytest.raises(InvalidInput, match="page_token"):
        store.list(page_token="not-a-token")


def test_next_queued_is_the_oldest_queued_job(store: JobStore) -> None:
    assert store.next_queued() is None
    first, second = store.submit(spec())[0], store.submit(spec())[0]
    assert store.next_queued() == first
    store.transition(first.id, JobState.VALIDATING)
    assert store.next_queued() == second


def test_transitions_record_events_times_and_a_final_snapshot(store: JobStore) -> None:
    job, _ = store.submit(spec())
    store.transition(job.id, JobState.VALIDATING, "started")
    started = store.get(job.id)
    assert started.start_time is not None
    assert started.end_time is None
    store.transition(job.id, JobState.TRAINING, "1,000 training / 100 validation examples")
    model = ModelRef("sentiment", "4", "challenger")
    done = store.transition(
        job.id, JobState.SUCCEEDED, "registered", model=model, gate_passed=True, gate_reason="ok"
    )
    assert done.end_time is not None
    assert done.start_time == started.start_time
    events = store.events(job.id)
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5]
    assert kinds(events) == ["state", "state", "state", "state", "job"]
    assert events[2].payload == {
        "previous_state": "validating",
        "state": "training",
        "message": "1,000 training / 100 validation examples",
    }
    assert events[-1].final
    assert events[-1].job() == done == store.get(job.id)
    assert [e.sequence for e in store.events(job.id, after_sequence=3)] == [4, 5]


def test_a_terminal_job_cannot_move_or_grow_its_history(store: JobStore) -> None:
    job, _ = store.submit(spec())
    store.transition(job.id, JobState.FAILED, "bad data", error="label column missing")
    with pytest.raises(FailedPrecondition, match="is failed"):
        store.transition(job.id, JobState.TRAINING)
    with pytest.raises(FailedPrecondition):
        store.append_event(job.id, EventKind.PROGRESS, {"step": 1})
    assert store.get(job.id).error == "label column missing"


def test_expect_guards_a_transition(store: JobStore) -> None:
    job, _ = store.submit(spec())
    store.transition(job.id, JobState.VALIDATING, expect={JobState.QUEUED})
    with pytest.raises(FailedPrecondition):
        store.transition(job.id, JobState.CANCELLED, expect={JobState.QUEUED})
    assert store.get(job.id).state is JobState.VALIDATING


def test_a_move_to_the_current_state_adds_no_event(store: JobStore) -> None:
    job, _ = store.submit(spec())
    store.transition(job.id, JobState.TRAINING)
    store.transition(job.id, JobState.TRAINING, "again", gate_reason="x")
    assert len(store.events(job.id)) == 2
    assert store.get(job.id).gate_reason == "x"


def test_events_carry_fields_in_the_same_write(store: JobStore) -> None:
    job, _ = store.submit(spec())
    heard: list[JobEvent] = []
    remove = store.add_listener(heard.append)
    progress = {"epoch": 1, "epochs": 3, "step": 40, "total_steps": 120, "loss": 0.41}
    event = store.append_event(job.id, "progress", progress, progress=progress)
    assert event.kind is EventKind.PROGRESS
    assert event.sequence == 2
    assert store.get(job.id).progress == progress
    remove()
    store.append_event(job.id, EventKind.METRICS, {"metrics": {"accuracy": 0.9}})
    assert heard == [event]


def test_update_refuses_state_and_times(store: JobStore) -> None:
    job, _ = store.submit(spec())
    with pytest.raises(ValueError, match="transition"):
        store.update(job.id, state=JobState.SUCCEEDED)
    assert store.update(job.id, metrics={"accuracy": 0.5}).metrics == {"accuracy": 0.5}


def test_recover_interrupts_running_jobs_and_keeps_queued_ones(
    store: JobStore, tmp_path: Path
) -> None:
    running, _ = store.submit(spec())
    queued, _ = store.submit(spec())
    done, _ = store.submit(spec())
    store.transition(running.id, JobState.TRAINING)
    store.append_event(running.id, "progress", {"step": 7}, progress={"step": 7})
    store.transition(done.id, JobState.CANCELLED)

    restarted = JobStore(tmp_path / "jobs.db")
    (interrupted,) = restarted.recover()
    assert interrupted.id == running.id
    assert interrupted.state is JobState.INTERRUPTED
    assert interrupted.progress == {"step": 7}
    assert interrupted.end_time is not None
    change, snapshot = restarted.events(running.id)[-2:]
    assert change.payload["previous_state"] == "training"
    assert "submit it again" in change.payload["message"]
    assert snapshot.final
    assert restarted.get(queued.id).state is JobState.QUEUED
    assert restarted.get(done.id).state is JobState.CANCELLED
    assert restarted.recover() == []


def test_job_round_trips_through_its_dict() -> None:
    job = Job(id="j1", spec=spec(), model=ModelRef("m", "2"), metrics={"accuracy": 0.8})
    assert Job.from_dict(job.to_dict()) == job


# -- the runner's pure parts --------------------------------------------------------------------


def test_pipeline_stages_map_to_states() -> None:
    assert interpret("validating data", {"data": "x"}).state is JobState.VALIDATING
    ok = interpret("data ok", {"train": 12480, "validation": 1387, "labels": ["neg", "pos"]})
    assert ok.state is JobState.TRAINING
    assert ok.message == "12,480 training / 1,387 validation examples; labels: neg, pos"
    assert interpret("training", {"base_model": "m"}).state is JobState.TRAINING
    assert interpret("evaluating", {"best_metric": 0.9}).state is JobState.EVALUATING
    assert interpret("exporting", {}).state is JobState.EXPORTING
    assert interpret("exported", {}).state is JobState.REGISTERING
    assert interpret("something new", {"x": 1}) == interpret("other", {})


def test_reports_become_progress_and_metrics_payloads() -> None:
    trial = interpret("trial", {"trial": 2, "learning_rate": 3e-5, "batch_size": 16})
    assert trial.progress == {"trial": 2, "epoch": 0, "step": 0, "learning_rate": 3e-5}
    done = interpret("trial done", {"trial": 2, "score": 0.91})
    assert done.metrics == {
        "metrics": {"score": 0.91},
        "split": "validation",
        "epoch": 0,
        "trial": 2,
    }
    epoch = interpret("epoch", {"epoch": 1, "step": 50, "metrics": {"accuracy": 0.8, "x": "y"}})
    assert epoch.progress == {"epoch": 1, "step": 50}
    assert epoch.metrics is not None
    assert epoch.metrics["metrics"] == {"accuracy": 0.8}
    parity = interpret("exported", {"parity": {"fp32_max_abs_logit_diff": 1e-5, "texts": 9}})
    assert parity.metrics is not None
    assert parity.metrics["split"] == "export"
    registered = interpret("registered", {"name": "s", "version": "3", "alias": "challenger"})
    assert registered.model == ModelRef("s", "3", "challenger")
    assert interpret("registered", {"name": "s", "version": None}).model is None


def test_a_report_missing_its_fields_raises() -> None:
    with pytest.raises(KeyError):
        interpret("data ok", {})


def test_outcome_round_trips_and_rejects_bad_metrics() -> None:
    outcome = JobOutcome(ModelRef("s", "3"), {"accuracy": 0.9}, True, "better")
    assert JobOutcome.from_dict(outcome.to_dict()) == outcome
    with pytest.raises(ValueError, match="high"):
        JobOutcome.from_dict({"metrics": {"accuracy": "high"}})


def test_dead_children_are_described_by_code_or_signal() -> None:
    assert describe_exit(3) == "training process died (exit code 3)"
    assert describe_exit(-signal.SIGSEGV) == "training process died (signal SIGSEGV)"
    assert "out-of-memory" in describe_exit(-signal.SIGKILL)
    assert "without a result" in describe_exit(0)
