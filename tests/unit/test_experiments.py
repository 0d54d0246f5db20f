"""Experiments without Redis: JSON, validation, uniqueness, transitions, updates, stops, paging,
and the live cache over a scripted store. Times are injected; nothing sleeps."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from dataclasses import replace
from typing import Any, cast

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from loopline.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotReady
from loopline.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from services.router.assignment import (
    NO_BUCKET,
    assign,
    bucket,
    initial_allocation,
    shadows_for,
)
from services.router.domain import ModelRef
from services.router.experiments import (
    Experiment,
    ExperimentCache,
    ExperimentStore,
    ExperimentUpdate,
    Shadow,
    Status,
    Stickiness,
    Variant,
    apply_stop,
    apply_update,
    check_transition,
    check_unique,
    paginate,
    validate,
)

NOW = 1_736_850_000.0  # 2025-01-14


def experiment(**changes: Any) -> Experiment:
    """A valid running 90/10 experiment on `sentiment`, with `changes` applied."""
    base = Experiment(
        id="exp-20250114-0001",
        name="distil-vs-minilm",
        model="sentiment",
        description="does the distilled model hold accuracy?",
        variants=[
            Variant("control", ModelRef("sentiment", version="3"), 90.0),
            Variant("candidate", ModelRef("sentiment", version="4"), 10.0),
        ],
        shadows=[Shadow("big", ModelRef("sentiment-large", alias="champion"), 0.25)],
        status=Status.RUNNING,
        salt="exp-20250114-0001",
        pinned_users={"qa-1": "candidate"},
        start_time=NOW - 100,
        create_time=NOW - 200,
        update_time=NOW - 200,
        allocation=initial_allocation([("control", 90.0), ("candidate", 10.0)]),
    )
    return replace(base, **changes)


# --- JSON ------------------------------------------------------------------------------------


def test_json_round_trip_keeps_every_field() -> None:
    exp = experiment(end_time=NOW + 3600, winner="", sticky_by=Stickiness.REQUEST)
    assert Experiment.from_json(exp.to_json()) == exp
    assert Experiment.from_json(exp.to_json().encode()) == exp


def test_json_round_trip_of_a_draft_without_times_or_allocation() -> None:
    draft = Experiment(
        name="d", model="m", variants=[Variant("only", ModelRef("m", alias="champion"), 100)]
    )
    back = Experiment.from_json(draft.to_json())
    assert back == draft
    assert back.start_time is None
    assert back.allocation is None


@pytest.mark.parametrize(
    "text", ["not json", "{}", '{"id": "x", "name": "n", "model": "m", "variants": 3}']
)
def test_malformed_json_is_invalid_input(text: str) -> None:
    with pytest.raises(InvalidInput, match="malformed experiment JSON"):
        Experiment.from_json(text)


def test_unknown_status_in_json_is_invalid_input() -> None:
    text = experiment().to_json().replace('"status":"running"', '"status":"exploded"')
    with pytest.raises(InvalidInput):
        Experiment.from_json(text)


def test_lists_given_to_the_constructor_are_copied_into_immutable_fields() -> None:
    variants = [Variant("only", ModelRef("m"), 100.0)]
    exp = Experiment(name="n", model="m", variants=variants)
    variants.append(Variant("late", ModelRef("m"), 0.0))
    assert isinstance(exp.variants, tuple)
    assert [v.name for v in exp.variants] == ["only"]


# --- validation ------------------------------------------------------------------------------

V = Variant
REF = ModelRef("sentiment", version="1")


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"name": " "}, "name", "name is empty"),
        ({"model": ""}, "model", "model is empty"),
        ({"variants": []}, "variants", "no variants"),
        ({"variants": [V("a", REF, 50), V("a", REF, 50)]}, "variants.name", "'a' is used twice"),
        ({"variants": [V("", REF, 100)]}, "variants.name", "empty name"),
        ({"variants": [V("a", ModelRef(""), 100)]}, "variants.model.name", "names no model"),
        ({"variants": [V("a", REF, -10), V("b", REF, 110)]}, "variants.weight", "weight -10"),
        ({"variants": [V("a", REF, math.nan), V("b", REF, 100)]}, "variants.weight", "nan"),
        ({"variants": [V("a", REF, 60), V("b", REF, 30)]}, "variants.weight", "sum to 90"),
        ({"variants": [V("a", REF, 100.001)]}, "variants.weight", "not 100"),
        (
            {"shadows": [Shadow("control", REF, 1.0)]},
            "shadows.name",
            "'control' is used twice",
        ),
        ({"shadows": [Shadow("s", REF, 1.5)]}, "shadows.sample_rate", "sample_rate 1.5"),
        ({"shadows": [Shadow("s", REF, -0.1)]}, "shadows.sample_rate", "in \\[0, 1\\]"),
        ({"shadows": [Shadow("s", ModelRef(" "), 1)]}, "shadows.model.name", "names no model"),
        ({"pinned_users": {"qa": "nope"}}, "pinned_users", "'nope', which is not a served"),
        ({"pinned_users": {"qa": "big"}}, "pinned_users", "not a served variant"),  # a shadow
        ({"end_time": NOW - 101}, "end_time", "is before start_time"),
        ({"end_time": NOW - 200}, "end_time", "is before start_time"),
        ({"start_time": math.inf}, "start_time", "not a time"),
        (
            {"allocation": initial_allocation([("x", 1), ("y", 1)])},
            "allocation",
            "allocation covers",
        ),
    ],
)
def test_validate_names_the_field(changes: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        validate(experiment(**changes))
    assert caught.value.details["field"] == field


def test_valid_experiments_pass() -> None:
    validate(experiment())
    thirds = [V("a", REF, 33.33), V("b", REF, 33.33), V("c", REF, 33.34)]
    validate(experiment(variants=thirds, pinned_users={"qa": "c"}, allocation=None))
    validate(experiment(variants=[V("only", REF, 100)], pinned_users={}, allocation=None))
    validate(experiment(shadows=[Shadow("s", REF, 0.0)]))  # 0 reads as 1


# --- uniqueness ------------------------------------------------------------------------------


def test_a_name_held_by_an_experiment_that_is_not_stopped_already_exists() -> None:
    other = experiment(id="exp-20250101-aaaa", model="other", status=Status.DRAFT)
    with pytest.raises(AlreadyExists, match="exp-20250101-aaaa") as caught:
        check_unique(experiment(status=Status.DRAFT), [other], NOW)
    assert caught.value.details == {"resource": "experiment", "name": "distil-vs-minilm"}


def test_a_stopped_or_finished_experiment_frees_its_name_and_its_model() -> None:
    stopped = experiment(id="exp-1", status=Status.STOPPED)
    finished = experiment(id="exp-2", end_time=NOW - 1)  # RUNNING but past its end
    check_unique(experiment(), [stopped, finished], NOW)


def test_second_running_experiment_on_a_model_names_the_first() -> None:
    first = experiment(id="exp-20250101-aaaa", name="first", status=Status.PAUSED)
    with pytest.raises(FailedPrecondition, match=r"exp-20250101-aaaa.*'first', paused") as caught:
        check_unique(experiment(), [first], NOW)
    assert caught.value.details["experiment_id"] == "exp-20250101-aaaa"


def test_a_draft_may_wait_beside_a_running_experiment() -> None:
    first = experiment(id="exp-1", name="first")
    check_unique(experiment(status=Status.DRAFT), [first], NOW)
    check_unique(experiment(model="other"), [first], NOW)


def test_an_experiment_does_not_clash_with_itself() -> None:
    check_unique(experiment(), [experiment(description="older copy")], NOW)


# --- transitions -----------------------------------------------------------------------------

ALLOWED = [
    (Status.DRAFT, Status.RUNNING),
    (Status.RUNNING, Status.PAUSED),
    (Status.PAUSED, Status.RUNNING),
    (Status.DRAFT, Status.DRAFT),
    (Status.RUNNING, Status.RUNNING),
]
REFUSED = [
    (Status.DRAFT, Status.PAUSED, "cannot go from draft to paused"),
    (Status.RUNNING, Status.DRAFT, "cannot go from running to draft"),
    (Status.RUNNING, Status.STOPPED, "use StopExperiment"),
    (Status.STOPPED, Status.RUNNING, "stopped for good"),
    (Status.STOPPED, Status.STOPPED, "stopped for good"),
]


@pytest.mark.parametrize(("current", "target"), ALLOWED)
def test_allowed_transitions(current: Status, target: Status) -> None:
    check_transition(experiment(status=current), target, NOW)


@pytest.mark.parametrize(("current", "target", "message"), REFUSED)
def test_refused_transitions(current: Status, target: Status, message: str) -> None:
    with pytest.raises(FailedPrecondition, match=message):
        check_transition(experiment(status=current), target, NOW)


def test_an_experiment_past_its_end_time_is_stopped() -> None:
    ended = experiment(end_time=NOW)
    assert ended.effective_status(NOW - 1) is Status.RUNNING
    assert ended.effective_status(NOW) is Status.STOPPED
    assert ended.as_of(NOW).status is Status.STOPPED
    assert ended.as_of(NOW - 1) is ended
    with pytest.raises(FailedPrecondition, match="stopped for good"):
        check_transition(ended, Status.PAUSED, NOW)


@pytest.mark.parametrize(
    ("changes", "at", "expected"),
    [
        ({}, NOW, True),
        ({"status": Status.PAUSED}, NOW, True),  # paused still routes: to the baseline
        ({"status": Status.DRAFT}, NOW, False),
        ({"status": Status.STOPPED}, NOW, False),
        ({"start_time": NOW + 10}, NOW, False),  # scheduled, not yet started
        ({"start_time": NOW}, NOW, True),
        ({"end_time": NOW + 1}, NOW, True),
        ({"end_time": NOW}, NOW, False),
    ],
)
def test_takes_traffic(changes: dict[str, Any], at: float, expected: bool) -> None:
    assert experiment(**changes).takes_traffic(at) is expected


# --- updates ---------------------------------------------------------------------------------


def test_new_weights_reallocate_minimally() -> None:
    exp = experiment()
    updated = apply_update(exp, ExperimentUpdate(weights={"candidate": 30, "control": 70}), NOW)
    assert updated.weights == [("control", 70.0), ("candidate", 30.0)]
    assert updated.allocation is not None
    assert exp.allocation is not None
    assert updated.allocation.counts() == {"control": 7000, "candidate": 3000}
    moved = [b for b in range(10_000) if exp.allocation.owner(b) != updated.allocation.owner(b)]
    assert len(moved) == 2000
    assert {updated.allocation.owner(b) for b in moved} == {"candidate"}
    assert updated.update_time == NOW


def test_weights_for_unknown_variants_or_not_summing_to_100_are_refused() -> None:
    with pytest.raises(InvalidInput, match=r"no variant 'big'.*'control', 'candidate'"):
        apply_update(experiment(), ExperimentUpdate(weights={"big": 0}), NOW)
    with pytest.raises(InvalidInput, match="sum to 110"):
        apply_update(experiment(), ExperimentUpdate(weights={"candidate": 20}), NOW)


def test_starting_a_draft_stamps_its_start_time() -> None:
    draft = experiment(status=Status.DRAFT, start_time=None)
    started = apply_update(draft, ExperimentUpdate(status=Status.RUNNING), NOW)
    assert (started.status, started.start_time) == (Status.RUNNING, NOW)
    assert ExperimentUpdate(status=Status.RUNNING).starts(draft)


def test_pausing_keeps_the_start_time_and_resuming_starts_again() -> None:
    paused = apply_update(experiment(), ExperimentUpdate(status=Status.PAUSED), NOW)
    assert (paused.status, paused.start_time) == (Status.PAUSED, NOW - 100)
    assert ExperimentUpdate(status=Status.RUNNING).starts(paused)
    assert not ExperimentUpdate(status=Status.RUNNING).starts(experiment())


def test_end_time_and_description_updates_are_validated() -> None:
    updated = apply_update(
        experiment(), ExperimentUpdate(end_time=NOW + 60, description="new"), NOW
    )
    assert (updated.end_time, updated.description) == (NOW + 60, "new")
    with pytest.raises(InvalidInput, match="end_time"):
        apply_update(experiment(), ExperimentUpdate(end_time=NOW - 1000), NOW)


def test_nothing_changes_on_a_stopped_experiment() -> None:
    with pytest.raises(FailedPrecondition, match="stopped for good"):
        apply_update(experiment(status=Status.STOPPED), ExperimentUpdate(description="x"), NOW)


# --- stop ------------------------------------------------------------------------------------


def test_stop_records_the_winner_and_ends_now() -> None:
    stopped = apply_stop(experiment(), "candidate", NOW)
    assert (stopped.status, stopped.winner, stopped.end_time) == (Status.STOPPED, "candidate", NOW)
    assert stopped.update_time == NOW


def test_stop_keeps_an_earlier_end_time_and_allows_stopping_a_finished_experiment() -> None:
    stopped = apply_stop(experiment(end_time=NOW - 10), "", NOW)
    assert (stopped.end_time, stopped.winner) == (NOW - 10, "")


def test_stopping_before_the_scheduled_start_leaves_an_empty_window() -> None:
    stopped = apply_stop(experiment(start_time=NOW + 60), "", NOW)
    assert stopped.end_time == stopped.start_time == NOW + 60
    validate(stopped)
    assert not stopped.takes_traffic(NOW + 60)


def test_stop_refuses_unknown_winners_and_stopped_experiments() -> None:
    with pytest.raises(InvalidInput, match="no variant 'big'"):
        apply_stop(experiment(), "big", NOW)  # shadows cannot win
    with pytest.raises(FailedPrecondition, match="already stopped"):
        apply_stop(experiment(status=Status.STOPPED), "", NOW)


# --- assignment through the experiment -------------------------------------------------------


class Script:
    def __init__(self, *values: float) -> None:
        self._values = iter(values)

    def random(self) -> float:
        return next(self._values)


def test_an_experiment_is_what_assign_and_shadows_for_take() -> None:
    exp = experiment()
    pinned, no_bucket = assign(exp, "qa-1", Script())
    assert (pinned.name, no_bucket) == ("candidate", NO_BUCKET)
    variant, user_bucket = assign(exp, "alice", Script())
    assert user_bucket == bucket(exp.salt, "alice")
    assert variant is exp.variants[user_bucket >= 9000]  # 90/10: buckets 9000+ are candidate
    paused = assign(replace(exp, status=Status.PAUSED), "alice", Script())
    assert (paused.variant.name, paused.bucket) == ("control", NO_BUCKET)
    per_request = assign(replace(exp, sticky_by=Stickiness.REQUEST), "alice", Script(0.95))
    assert (per_request.variant.name, per_request.bucket) == ("candidate", NO_BUCKET)
    assert shadows_for(exp, Script(0.1)) == [exp.shadows[0]]  # sample rate 0.25
    assert shadows_for(exp, Script(0.3)) == []


def test_the_salt_defaults_to_the_id() -> None:
    exp = experiment(salt="")
    assert assign(exp, "alice", Script()).bucket == bucket(exp.id, "alice")


def test_a_draft_without_allocation_assigns_by_its_weights() -> None:
    draft = experiment(status=Status.DRAFT, allocation=None)
    assert assign(draft, "", Script(0.5)).variant.name == "control"
    assert assign(draft, "", Script(0.95)).variant.name == "candidate"


# --- paging ----------------------------------------------------------------------------------


def many(n: int) -> list[Experiment]:
    return [experiment(id=f"exp-{i:04d}", create_time=NOW + i // 2) for i in range(n)]


def test_pages_are_newest_first_and_tokens_walk_every_item_once() -> None:
    items = many(7)
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = paginate(random.Random(1).sample(items, len(items)), 3, token)
        seen += [e.id for e in page.experiments]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"exp-{i:04d}" for i in reversed(range(7))]


def test_a_new_experiment_does_not_shift_later_pages() -> None:
    items = many(4)
    first = paginate(items, 2, "")
    later = [*items, experiment(id="exp-new", create_time=NOW + 100)]
    second = paginate(later, 2, first.next_page_token)
    assert [e.id for e in second.experiments] == ["exp-0001", "exp-0000"]
    assert second.next_page_token == ""


def test_page_size_default_cap_and_errors() -> None:
    items = many(1200)
    assert len(paginate(items, 0, "").experiments) == DEFAULT_PAGE_SIZE
    assert len(paginate(items, 5000, "").experiments) == MAX_PAGE_SIZE
    with pytest.raises(InvalidInput, match="page_size"):
        paginate(items, -1, "")
    with pytest.raises(InvalidInput, match="page_token"):
        paginate(items, 1, "not-a-token")


# --- the live cache over a scripted store ----------------------------------------------------


class ScriptedStore:
    """Stands in for `ExperimentStore`: the cache only calls `version` and `snapshot`."""

    def __init__(self) -> None:
        self.current = 0
        self.experiments: list[Experiment] = []
        self.down = False
        self.snapshots = 0

    def put(self, exp: Experiment) -> None:
        self.experiments = [e for e in self.experiments if e.id != exp.id] + [exp]
        self.current += 1

    async def version(self) -> int:
        self._check()
        return self.current

    async def snapshot(self) -> tuple[int, list[Experiment]]:
        self._check()
        self.snapshots += 1
        return self.current, list(self.experiments)

    def _check(self) -> None:
        if self.down:
            raise RedisConnectionError("Connection refused")


def cache_over(store: ScriptedStore) -> ExperimentCache:
    return ExperimentCache(cast(ExperimentStore, store), poll_interval=0.01)


def test_cache_reloads_only_when_the_version_moves() -> None:
    store = ScriptedStore()
    store.put(experiment())
    cache = cache_over(store)

    async def main() -> None:
        assert await cache.poll_once()
        assert await cache.poll_once()
        assert store.snapshots == 1  # the version did not move: no reload
        store.put(experiment(status=Status.PAUSED))
        assert await cache.poll_once()
        assert store.snapshots == 2

    asyncio.run(main())
    found = cache.running_for("sentiment", NOW)
    assert found is not None
    assert found.status is Status.PAUSED
    assert cache.version == 2


def test_running_for_respects_model_status_and_time_window() -> None:
    store = ScriptedStore()
    store.put(experiment(end_time=NOW + 50))
    store.put(experiment(id="draft", name="draft", status=Status.DRAFT, model="other"))
    cache = cache_over(store)
    asyncio.run(cache.refresh())
    assert cache.running_for("other", NOW) is None
    assert cache.running_for("unknown", NOW) is None
    assert cache.running_for("sentiment", NOW - 101) is None  # before its start
    running = cache.running_for("sentiment", NOW)
    assert running is not None
    assert running.id == "exp-20250114-0001"
    assert cache.running_for("sentiment", NOW + 50) is None  # past its end: no traffic
    assert cache.get("draft") is not None
    assert len(cache.experiments) == 2


def test_cache_keeps_the_last_good_copy_while_redis_is_down_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = ScriptedStore()
    store.put(experiment())
    cache = cache_over(store)

    async def main() -> None:
        await cache.refresh()
        store.down = True
        with caplog.at_level(logging.INFO, logger="services.router.experiments"):
            assert not await cache.poll_once()
            assert not await cache.poll_once()
            assert not cache.healthy
            assert cache.running_for("sentiment", NOW) is not None
            with pytest.raises(NotReady, match="cannot read experiments"):
                await cache.refresh()
            store.down = False
            # A restarted Redis may restart the counter: recovery reloads even at the same
            # version.
            store.experiments = []
            assert await cache.poll_once()

    asyncio.run(main())
    assert cache.healthy
    assert cache.running_for("sentiment", NOW) is None
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_cache_task_starts_polls_and_stops() -> None:
    store = ScriptedStore()
    cache = cache_over(store)

    async def main() -> None:
        cache.start()
        cache.start()  # idempotent
        store.put(experiment())
        for _ in range(200):  # the loop yields to the task; no wall-clock sleep needed here
            if cache.running_for("sentiment", NOW) is not None:
                break
            await asyncio.sleep(0)
        await cache.stop()
        await cache.stop()

    asyncio.run(main())
    assert cache.running_for("sentiment", NOW) is not None
