"""The router's coalescer with a gated fake worker: which calls go at once, which merge, and that
every caller gets its own rows, its own error, or nothing when it went away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from loopline.errors import InvalidInput, NotReady
from services.router.coalesce import MAX_MERGED_CHARS, Coalescer
from services.router.domain import ModelRef
from services.router.oip import WorkerAnswer

REF = ModelRef("sentiment", alias="champion")


@dataclass
class Call:
    texts: list[str]
    params: dict[str, str]
    deadline: float | None
    gate: asyncio.Event = field(default_factory=asyncio.Event)


class FakeWorker:
    """Answers each text with itself as the label; holds every call until its gate opens.

    A text "bad" makes the call INVALID_ARGUMENT; `down` makes every call UNAVAILABLE."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.down = False

    async def __call__(
        self, ref: ModelRef, texts: list[str], params: dict[str, str], deadline: float | None
    ) -> WorkerAnswer:
        call = Call(list(texts), dict(params), deadline)
        self.calls.append(call)
        await call.gate.wait()
        if self.down:
            raise NotReady("no worker serves sentiment@champion")
        if "bad" in texts:
            raise InvalidInput(f"input 'text' element {texts.index('bad')} is bad")
        return WorkerAnswer(
            model=ref.name,
            version="3",
            probabilities=np.array([[len(t), 0.0] for t in texts], dtype=np.float32),
            labels=list(texts),
            truncated=[False] * len(texts),
            columns=("negative", "positive"),
        )

    async def wait_calls(self, count: int) -> None:
        for _ in range(1000):
            if len(self.calls) >= count:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"{len(self.calls)} worker calls, expected {count}")

    def open(self, index: int) -> None:
        self.calls[index].gate.set()


def params(request_id: str, **tags: str) -> dict[str, str]:
    return {"request_id": request_id, "variant": "a", **tags}


Scenario = Callable[[Coalescer, FakeWorker], Awaitable[None]]


def run(scenario: Scenario, *, workers: int = 1, per_worker: int = 1, max_texts: int = 64) -> None:
    async def main() -> None:
        fake = FakeWorker()
        coalescer = Coalescer(fake, lambda ref: workers, per_worker=per_worker, max_texts=max_texts)
        try:
            await asyncio.wait_for(scenario(coalescer, fake), timeout=10)
        finally:
            for call in fake.calls:
                call.gate.set()
            await coalescer.close()

    asyncio.run(main())


def forward(
    coalescer: Coalescer, text: str, request_id: str, deadline: float | None = 100.0, **tags: str
) -> asyncio.Task[WorkerAnswer]:
    return asyncio.ensure_future(coalescer(REF, [text], params(request_id, **tags), deadline))


async def behind_one(
    coalescer: Coalescer, fake: FakeWorker, queued: Callable[[], list[asyncio.Task[WorkerAnswer]]]
) -> list[asyncio.Task[WorkerAnswer]]:
    """One call in flight (the limit of these tests), then `queued()` forwards waiting behind
    it; the first call is answered, and the next worker call has gone out when this returns."""
    first = forward(coalescer, "x", "r0")
    await fake.wait_calls(1)
    tasks = queued()
    await asyncio.sleep(0)
    assert len(fake.calls) == 1  # the limit (1 worker x 1) is reached: they wait
    fake.open(0)
    await first
    await fake.wait_calls(2)
    return tasks


def test_a_lone_call_goes_at_once_unchanged() -> None:
    async def scenario(coalescer: Coalescer, fake: FakeWorker) -> None:
        task = forward(coalescer, "fine film", "r1")
        await fake.wait_calls(1)
        assert fake.calls[0].texts == ["fine film"]
        assert fake.calls[0].params == params("r1")  # no list added to a call of its own
        fake.open(0)
        assert (await task).labels == ["fine film"]

    run(scenario)


def test_calls_past_the_limit_wait_and_go_as_one() -> None:
    async def scenario(coalescer: Coalescer, fake: FakeWorker) -> None:
        waiting = await behind_one(
            coalescer, fake, lambda: [forward(coalescer, t, f"r{n}") for n, t in enumerate("ab", 1)]
        )
        merged = fake.calls[1]
        assert merged.texts == ["a", "b"]
        assert json.loads(merged.params["request_ids"]) == ["r1", "r2"]
        assert merged.params["variant"] == "a"
        fake.open(1)
        answers = await asyncio.gather(*waiting)
        assert [a.labels for a in answers] == [["a"], ["b"]]

    run(scenario)


def test_the_limit_grows_with_the_workers_serving_the_model() -> None:
    async def scenario(coalescer: Coalescer, fake: FakeWorker) -> None:
        tasks = [forward(coalescer, text, text) for text in ("a", "b", "c", "d", "e")]
        await fake.wait_calls(4)  # 2 workers x 2 per worker go at once
        await asyncio.sleep(0)
        assert len(fake.calls) == 4
        for index in range(4):
            fake.open(index)
        await fake.wait_calls(5)
        fake.open(4)
        assert [t.labels for t in await asyncio.gather(*tasks)] == [[x] for x in "abcde"]

    run(scenario, workers=2, per_worker=2)


def test_a_merged_call_holds_at_most_max_texts() -> None:
    async def scenario(coalescer: Coalescer, fake: FakeWorker) -> None:
        rest = await behind_one(
            coalescer, fake, lambda: [forward(coalescer, t, t) for t in ("a", "b", "c")]
        )
        assert fake.calls[1].texts == ["a", "b"]
        fake.open(1)
        await fake.wait_calls(3)
        assert fake.calls[2].texts == ["c"]
        fake.open(2)
        assert [t.labels for t in await asyncio.gather(*rest)] == [["a"], ["b"], ["c"]]

    run(scenario, max_texts=2)


def test_a_refused_text_fails_only_its_caller() -> None:
    async def scenario(coalescer: Coalescer, fake: FakeWorker) -> None:
        rest = await behind_one(
            coalescer, fake, lambda: [forward(coalescer, t, t) for t in ("a", "bad", "c")]
        )
        fake.open(1)  # the merged call is refused: each text is tried alone
        await fake.wait_calls(5)
        assert [call.texts for call in fake.calls[2:]] == [["a"], ["bad"], ["c"]]
        for index in (2, 3, 4):
            fake.open(index)
        answers = await asyncio.gather(*rest, return_exceptions=True)
        assert answers[0].labels == ["a"]  # type: ignore[union-attr]
        assert isinstance(answers[1], InvalidInput)
        assert answers[2].labels == ["c"]  # type: ignore[union-attr]

    run(scenario)


def test_a_failure_of_the_model_reaches_every_caller_once() -> None:
    async def scenario(coalescer: Coalescer, fake: FakeWorker) -> None:
        rest = await behind_one(coalescer, fake, lambda: [forward(coalescer, t, t) for t in "ab"])
        fake.down = True
        fake.open(1)
        for task in rest:
            with pytest.raises(NotReady):
                await task
        assert len(fake.calls) == 2  # not retried text by text

    run(scenario)


def test_a_caller_that_went_away_is_left_out() -> None:
    async def scenario(coalescer: Coalescer, fake: FakeWorker) -> None:
        def queued() -> list[asyncio.Task[WorkerAnswer]]:
            tasks = [forward(coalescer, t, t) for t in "abc"]
            tasks[1].cancel()
            return tasks

        rest = await behind_one(coalescer, fake, queued)
        assert fake.calls[1].texts == ["a", "c"]
        fake.open(1)
        assert (await rest[0]).labels == ["a"]
        assert (await rest[2]).labels == ["c"]

    run(scenario)


def test_different_tags_never_share_a_call() -> None:
    async def scenario(coalescer: Coalescer, fake: FakeWorker) -> None:
        tasks = [forward(coalescer, "a", "r1"), forward(coalescer, "b", "r2", variant="b")]
        await fake.wait_calls(2)  # one key each: each goes at once
        assert [call.params["variant"] for call in fake.calls] == ["a", "b"]
        fake.open(0)
        fake.open(1)
        await asyncio.gather(*tasks)

    run(scenario)


def test_a_merged_call_lists_buckets_and_takes_the_latest_deadline() -> None:
    async def scenario(coalescer: Coalescer, fake: FakeWorker) -> None:
        rest = await behind_one(
            coalescer,
            fake,
            lambda: [
                forward(coalescer, "a", "r1", deadline=50.0, user_bucket="17"),
                forward(coalescer, "b", "r2", deadline=70.0, user_bucket="4"),
                forward(coalescer, "c", "r3", deadline=60.0, user_bucket="17"),
            ],
        )
        merged = fake.calls[1]
        assert json.loads(merged.params["user_buckets"]) == ["17", "4", "17"]
        assert merged.params["user_bucket"] == "17"
        assert merged.deadline == 70.0
        fake.open(1)
        await asyncio.gather(*rest)

    run(scenario)


def test_a_merged_call_stays_within_the_character_budget() -> None:
    long = "x" * (MAX_MERGED_CHARS // 2)

    async def scenario(coalescer: Coalescer, fake: FakeWorker) -> None:
        rest = await behind_one(
            coalescer,
            fake,
            lambda: [forward(coalescer, t, str(n)) for n, t in enumerate([long] * 3)],
        )
        assert len(fake.calls[1].texts) == 2
        fake.open(1)
        await fake.wait_calls(3)
        assert len(fake.calls[2].texts) == 1
        fake.open(2)
        await asyncio.gather(*rest)

    run(scenario)


def test_only_answered_calls_are_counted_under_the_answering_model() -> None:
    counted: list[tuple[str, int]] = []

    async def main() -> None:
        fake = FakeWorker()
        coalescer = Coalescer(fake, lambda ref: 1, on_call=lambda m, n: counted.append((m, n)))
        fake.down = True
        failing = forward(coalescer, "x", "r1")
        await fake.wait_calls(1)
        fake.open(0)
        with pytest.raises(NotReady):
            await failing
        fake.down = False
        answered = forward(coalescer, "y", "r2")
        await fake.wait_calls(2)
        fake.open(1)
        await answered

    asyncio.run(main())
    assert counted == [("sentiment", 1)]  # the failed call named no model a worker served
