"""Experiments against a real Redis: the admin operations, two routers racing, and the live
cache (changes seen within one second, last good copy kept while Redis is down)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from loopline.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidInput,
    LooplineError,
    NotFound,
)
from loopline.redis import connect, wait_ready
from services.router.domain import ModelRef
from services.router.experiments import (
    Experiment,
    ExperimentCache,
    Experiments,
    ExperimentStore,
    Shadow,
    Status,
    Variant,
)

if TYPE_CHECKING:
    from tests.fixtures.redis import RedisServer

pytest_plugins = ["tests.fixtures.redis"]

T0 = 1_736_850_000.0  # 2025-01-14 10:20 UTC
VISIBLE_WITHIN_S = 1.0


class Clock:
    """A settable clock shared by the store and the service."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rendezvous:
    """Holds every caller until `parties` different registries have arrived."""

    def __init__(self, parties: int) -> None:
        self._parties = parties
        self._arrived: set[int] = set()
        self._all_here = asyncio.Event()

    async def arrive(self, who: object) -> None:
        self._arrived.add(id(who))
        if len(self._arrived) >= self._parties:
            self._all_here.set()
        await asyncio.wait_for(self._all_here.wait(), timeout=5)


@dataclass
class FakeRegistry:
    """Resolves aliases, records what workers were asked to serve and what was promoted."""

    versions: dict[tuple[str, str], str] = field(
        default_factory=lambda: {
            ("sentiment", "champion"): "3",
            ("sentiment", "challenger"): "4",
            ("sentiment-large", "champion"): "1",
        }
    )
    unservable: set[ModelRef] = field(default_factory=set)
    served: list[ModelRef] = field(default_factory=list)
    promoted: list[tuple[ModelRef, str, str]] = field(default_factory=list)
    gate: Rendezvous | None = None  # holds resolvers so that racing creates overlap

    async def resolve(self, ref: ModelRef) -> ModelRef:
        if self.gate is not None:
            await self.gate.arrive(self)
        if ref.version:
            known = any(
                name == ref.name and v == ref.version for (name, _), v in self.versions.items()
            )
            if known:
                return ref
        elif (ref.name, ref.target) in self.versions:
            return ModelRef(ref.name, version=self.versions[(ref.name, ref.target)])
        raise NotFound("model", str(ref), "register it first")

    async def ensure_served(self, ref: ModelRef) -> None:
        if ref in self.unservable:
            raise FailedPrecondition(f"no worker can load {ref}", model=str(ref))
        self.served.append(ref)

    async def promote(self, ref: ModelRef, alias: str, reason: str) -> ModelRef:
        self.promoted.append((ref, alias, reason))
        self.versions[(ref.name, alias)] = ref.version
        return ref


def fast_client(url: str) -> aioredis.Redis:
    # Fail fast while Redis is down (no client-side retries); the cache copes with failures.
    return connect(url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))


@dataclass
class Router:
    """What one router process holds: a client, a store, the service and its registry."""

    client: aioredis.Redis
    store: ExperimentStore
    experiments: Experiments
    registry: FakeRegistry


@asynccontextmanager
async def router(url: str, clock: Callable[[], float] = time.time) -> AsyncIterator[Router]:
    client = fast_client(url)
    await wait_ready(client, timeout=5)
    store = ExperimentStore(client, now=clock)
    registry = FakeRegistry()
    service = Experiments(
        store,
        resolve=registry.resolve,
        ensure_served=registry.ensure_served,
        promote=registry.promote,
        now=clock,
    )
    try:
        yield Router(client, store, service, registry)
    finally:
        await client.aclose()


def draft(name: str = "distil-vs-minilm", model: str = "sentiment", **changes: Any) -> Experiment:
    """A RUNNING 90/10 experiment with a shadow; variants may serve another model than `model`."""
    exp = Experiment(
        name=name,
        model=model,
        variants=[
            Variant("control", ModelRef("sentiment", alias="champion"), 90.0),
            Variant("candidate", ModelRef("sentiment", alias="challenger"), 10.0),
        ],
        shadows=[Shadow("large", ModelRef("sentiment-large"), 0.5)],
        status=Status.RUNNING,
        pinned_users={"qa-1": "candidate"},
    )
    return replace(exp, **changes)


async def poll_until(condition: Callable[[], bool], timeout: float, step: float = 0.01) -> float:
    """Seconds until `condition()` held; fails the test after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(step)
    return time.monotonic() - started


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


# --- the admin operations --------------------------------------------------------------------


def test_create_resolves_stamps_serves_and_stores(redis_url: str) -> None:
    clock = Clock()

    async def body() -> None:
        async with router(redis_url, clock) as r:
            created = await r.experiments.create(draft())
            assert re.fullmatch(r"exp-20250114-[0-9a-f]{4}", created.id)
            assert created.salt == created.id
            assert (created.create_time, created.update_time, created.start_time) == (T0, T0, T0)
            # References are pinned to the versions they resolved to when the experiment began.
            assert [v.model for v in created.variants] == [
                ModelRef("sentiment", version="3"),
                ModelRef("sentiment", version="4"),
            ]
            assert created.shadows[0].model == ModelRef("sentiment-large", version="1")
            assert set(r.registry.served) == {
                ModelRef("sentiment", version="3"),
                ModelRef("sentiment", version="4"),
                ModelRef("sentiment-large", version="1"),
            }
            assert created.allocation is not None
            assert created.allocation.counts() == {"control": 9000, "candidate": 1000}
            assert await r.experiments.get(created.id) == created
            assert await r.store.version() == 1
            with pytest.raises(NotFound, match="experiment 'exp-nope' not found"):
                await r.experiments.get("exp-nope")

    run(body)


def test_create_refuses_unresolvable_or_unservable_models_and_stores_nothing(
    redis_url: str,
) -> None:
    async def body() -> None:
        async with router(redis_url) as r:
            bad = draft(shadows=[Shadow("s", ModelRef("sentiment", alias="nightly"), 1)])
            with pytest.raises(NotFound, match="sentiment@nightly"):
                await r.experiments.create(bad)
            r.registry.unservable.add(ModelRef("sentiment", version="4"))
            with pytest.raises(FailedPrecondition, match="no worker can load sentiment/4"):
                await r.experiments.create(draft())
            assert (await r.experiments.list()).experiments == []
            # A draft needs no worker yet; starting it does.
            created = await r.experiments.create(draft(status=Status.DRAFT))
            assert created.start_time is None
            with pytest.raises(FailedPrecondition, match="sentiment/4"):
                await r.experiments.update(created.id, status=Status.RUNNING)
            assert (await r.experiments.get(created.id)).status is Status.DRAFT
            r.registry.unservable.clear()
            started = await r.experiments.update(created.id, status=Status.RUNNING)
            assert started.status is Status.RUNNING
            assert started.start_time is not None

    run(body)


@pytest.mark.parametrize("status", [Status.PAUSED, Status.STOPPED])
def test_create_accepts_only_draft_or_running(redis_url: str, status: Status) -> None:
    async def body() -> None:
        async with router(redis_url) as r:
            with pytest.raises(InvalidInput, match="draft or running"):
                await r.experiments.create(draft(status=status))

    run(body)


def test_rules_are_enforced_on_create(redis_url: str) -> None:
    async def body() -> None:
        async with router(redis_url) as r:
            first = await r.experiments.create(draft())
            with pytest.raises(AlreadyExists, match=first.id):
                await r.experiments.create(draft(model="other"))
            with pytest.raises(FailedPrecondition, match=f"already has experiment {first.id}"):
                await r.experiments.create(draft(name="second"))
            bad = draft(name="third", variants=[Variant("a", ModelRef("x"), 50)])
            with pytest.raises(InvalidInput, match="sum to 50"):
                await r.experiments.create(bad)

    run(body)


def test_list_filters_and_pages_newest_first(redis_url: str) -> None:
    clock = Clock()

    async def body() -> None:
        async with router(redis_url, clock) as r:
            ids = []
            for i in range(5):
                clock.now = T0 + i
                model = "sentiment" if i == 4 else f"m{i}"
                status = Status.RUNNING if i in (1, 4) else Status.DRAFT
                exp = draft(name=f"e{i}", model=model, status=status)
                ids.append((await r.experiments.create(exp)).id)
            page = await r.experiments.list(page_size=2)
            assert [e.id for e in page.experiments] == [ids[4], ids[3]]
            rest = await r.experiments.list(page_size=10, page_token=page.next_page_token)
            assert [e.id for e in rest.experiments] == [ids[2], ids[1], ids[0]]
            assert rest.next_page_token == ""
            running = await r.experiments.list(status=Status.RUNNING)
            assert [e.id for e in running.experiments] == [ids[4], ids[1]]
            on_m1 = await r.experiments.list(model="m1")
            assert [e.id for e in on_m1.experiments] == [ids[1]]

    run(body)


def test_update_reallocates_minimally_and_refuses_unknown_variants(redis_url: str) -> None:
    async def body() -> None:
        async with router(redis_url) as r:
            created = await r.experiments.create(draft())
            updated = await r.experiments.update(
                created.id, weights={"candidate": 30, "control": 70}
            )
            assert created.allocation is not None
            assert updated.allocation is not None
            moved = [
                b
                for b in range(10_000)
                if created.allocation.owner(b) != updated.allocation.owner(b)
            ]
            assert len(moved) == 2000
            assert (await r.experiments.get(created.id)).allocation == updated.allocation
            with pytest.raises(InvalidInput, match="no variant 'large'"):
                await r.experiments.update(created.id, weights={"large": 10})
            paused = await r.experiments.update(created.id, status=Status.PAUSED)
            assert paused.status is Status.PAUSED
            with pytest.raises(FailedPrecondition, match="use StopExperiment"):
                await r.experiments.update(created.id, status=Status.STOPPED)
            same = await r.experiments.update(created.id)  # nothing asked: nothing written
            assert same == paused
            assert await r.store.version() == 3

    run(body)


def test_stop_promotes_the_winner_then_stops_for_good(redis_url: str) -> None:
    async def body() -> None:
        async with router(redis_url) as r:
            created = await r.experiments.create(draft())
            stopped, promoted = await r.experiments.stop(
                created.id, winner="candidate", reason="higher accuracy"
            )
            assert promoted == ModelRef("sentiment", version="4")
            assert r.registry.promoted == [
                (ModelRef("sentiment", version="4"), "champion", "higher accuracy")
            ]
            assert (stopped.status, stopped.winner) == (Status.STOPPED, "candidate")
            assert (await r.experiments.get(created.id)).status is Status.STOPPED
            with pytest.raises(FailedPrecondition, match="already stopped"):
                await r.experiments.stop(created.id)
            with pytest.raises(FailedPrecondition, match="stopped for good"):
                await r.experiments.update(created.id, description="late")
            # The name and the model are free again.
            again = await r.experiments.create(draft())
            assert again.id != created.id
            plain, nothing = await r.experiments.stop(again.id)
            assert (plain.winner, nothing) == ("", None)
            with pytest.raises(InvalidInput, match="no variant 'large'"):
                await r.experiments.stop((await r.experiments.create(draft())).id, "large")

    run(body)


def test_every_change_bumps_the_version_and_is_published(redis_url: str) -> None:
    async def body() -> None:
        async with router(redis_url) as r:
            async with r.client.pubsub() as pubsub:
                await pubsub.subscribe(r.store.channel)
                await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
                created = await r.experiments.create(draft())
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            assert message is not None
            assert message["data"] == created.id.encode()
            await r.experiments.update(created.id, description="x")
            assert await r.store.version() == 2

    run(body)


# --- two routers racing ----------------------------------------------------------------------


async def race(
    routers: list[Router], make: Callable[[int], Experiment]
) -> tuple[list[Experiment], list[LooplineError]]:
    gate = Rendezvous(len(routers))
    for r in routers:
        r.registry.gate = gate  # every create passes its pre-check before any one writes
    results = await asyncio.gather(
        *(r.experiments.create(make(i)) for i, r in enumerate(routers)), return_exceptions=True
    )
    for r in routers:
        r.registry.gate = None
    won = [x for x in results if isinstance(x, Experiment)]
    lost = [x for x in results if isinstance(x, LooplineError)]
    assert len(won) + len(lost) == len(routers), results
    return won, lost


def test_two_routers_cannot_both_start_an_experiment_on_one_model(redis_url: str) -> None:
    async def body() -> None:
        async with router(redis_url) as a, router(redis_url) as b:
            for round_ in range(5):

                def make(i: int, n: int = round_) -> Experiment:
                    return draft(name=f"r{n}-{i}")

                won, lost = await race([a, b], make)
                assert len(won) == 1
                assert isinstance(lost[0], FailedPrecondition)
                assert won[0].id in lost[0].message
                await a.experiments.stop(won[0].id)
            running = await a.experiments.list(status=Status.RUNNING)
            assert running.experiments == []

    run(body)


def test_two_routers_cannot_both_take_one_name(redis_url: str) -> None:
    async def body() -> None:
        async with router(redis_url) as a, router(redis_url) as b:
            won, lost = await race([a, b], lambda i: draft(name="same", model=f"model-{i}"))
            assert len(won) == 1
            assert isinstance(lost[0], AlreadyExists)

    run(body)


def test_concurrent_weight_updates_all_land_on_a_valid_allocation(redis_url: str) -> None:
    async def body() -> None:
        async with router(redis_url) as a, router(redis_url) as b:
            created = await a.experiments.create(draft())
            splits = [{"control": 100 - w, "candidate": w} for w in (20, 30, 40, 50, 60, 70)]
            routers = [a, b] * 3
            await asyncio.gather(
                *(
                    r.experiments.update(created.id, weights=s)
                    for r, s in zip(routers, splits, strict=True)
                )
            )
            final = await b.experiments.get(created.id)
            assert final.allocation is not None
            assert final.allocation.counts() == {
                v.name: round(v.weight * 100) for v in final.variants
            }
            assert await a.store.version() == 1 + len(splits)

    run(body)


# --- the live cache --------------------------------------------------------------------------


def test_a_change_reaches_another_routers_cache_within_one_second(redis_url: str) -> None:
    async def body() -> None:
        async with router(redis_url) as a, router(redis_url) as b:
            cache = ExperimentCache(b.store, poll_interval=0.25)
            await cache.refresh()
            cache.start()
            try:
                created = await a.experiments.create(draft())
                took = await poll_until(
                    lambda: cache.running_for("sentiment", time.time()) is not None,
                    timeout=VISIBLE_WITHIN_S,
                )
                assert took < VISIBLE_WITHIN_S
                await a.experiments.update(created.id, status=Status.PAUSED)
                await poll_until(
                    lambda: (cache.get(created.id) or created).status is Status.PAUSED,
                    timeout=VISIBLE_WITHIN_S,
                )
                await a.experiments.stop(created.id)
                await poll_until(
                    lambda: cache.running_for("sentiment", time.time()) is None,
                    timeout=VISIBLE_WITHIN_S,
                )
            finally:
                await cache.stop()

    run(body)


def test_cache_serves_its_last_good_copy_while_redis_is_down_then_recovers(
    redis_server: RedisServer, redis_url: str
) -> None:
    async def body() -> None:
        async with router(redis_url) as a, router(redis_url) as b:
            cache = ExperimentCache(b.store, poll_interval=0.05)
            created = await a.experiments.create(draft())
            await cache.refresh()
            cache.start()
            try:
                await asyncio.to_thread(redis_server.stop)
                await poll_until(lambda: not cache.healthy, timeout=5)
                held = cache.running_for("sentiment", time.time())
                assert held is not None
                assert held.id == created.id
                await asyncio.to_thread(redis_server.start)
                # No persistence: Redis came back empty. The cache follows what Redis now holds.
                await poll_until(lambda: cache.healthy, timeout=5)
                await poll_until(lambda: cache.get(created.id) is None, timeout=VISIBLE_WITHIN_S)
                await wait_ready(a.client, timeout=5)  # drop a's connection from before
                fresh = await a.experiments.create(draft(name="after-restart"))
                await poll_until(
                    lambda: (
                        getattr(cache.running_for("sentiment", time.time()), "id", "") == fresh.id
                    ),
                    timeout=VISIBLE_WITHIN_S,
                )
            finally:
                await cache.stop()

    run(body)
