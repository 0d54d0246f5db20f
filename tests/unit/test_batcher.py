"""Component tests of `Batcher` with a fake engine held by a gate, asserting which futures are
done (Ray Serve's `tests/unit/test_batching.py` style). No timing assertions; the only sleeps are
short yields while waiting for the engine thread to reach the gate."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from loopline.errors import Cancelled, DeadlineExceeded, InternalError, NotReady, Overloaded
from loopline.runtime import softmax
from services.inference.batching import Batcher, BatchSettings, BatchStats, Result
from services.inference.engines.base import EngineOutput

PAD = 0
NO_WAIT = BatchSettings(max_batch_size=8, max_queue_delay=0.0)


class GatedEngine:
    """Logits [sum of ids, count of real tokens] per row, so each answer names its input.

    Holds every call at `gate` (open by default) and records the unpadded rows it was given.
    """

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[list[list[int]]] = []
        self.active = 0
        self.max_active = 0
        self.fail_calls: set[int] = set()  # call numbers that raise
        self.drop_a_row = False
        self._lock = threading.Lock()

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EngineOutput:
        with self._lock:
            number = len(self.calls)
            self.calls.append(
                [row[m == 1].tolist() for row, m in zip(input_ids, attention_mask, strict=True)]
            )
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            assert self.gate.wait(timeout=10), "test never opened the gate"
            if number in self.fail_calls:
                raise RuntimeError("boom: secret input text")
            return self._output(input_ids, attention_mask)
        finally:
            with self._lock:
                self.active -= 1

    def _output(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EngineOutput:
        sums = (input_ids * attention_mask).sum(axis=1)
        counts = attention_mask.sum(axis=1)
        logits = np.stack([sums, counts], axis=1).astype(np.float32)
        if self.drop_a_row:
            logits = logits[:-1]
        return EngineOutput(logits=logits, embedding=logits * 2)


Scenario = Callable[[Batcher, GatedEngine], Awaitable[None]]


def run(
    scenario: Scenario,
    settings: BatchSettings = NO_WAIT,
    engine: GatedEngine | None = None,
    stats: list[BatchStats] | None = None,
) -> GatedEngine:
    """Run `scenario` against a started batcher; always open the gate and stop at the end."""
    engine = engine or GatedEngine()
    on_batch = stats.append if stats is not None else None

    async def main() -> None:
        batcher = Batcher(engine, PAD, settings, executor=pool, name="fake", on_batch=on_batch)
        batcher.start()
        try:
            await scenario(batcher, engine)
        finally:
            engine.gate.set()
            await batcher.stop_now()

    with ThreadPoolExecutor(max_workers=4) as pool:
        asyncio.run(main())
    return engine


async def until(condition: Callable[[], bool]) -> None:
    """Yield until `condition` holds; the engine runs in a thread, so polling is unavoidable."""
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never became true")


async def results(futures: list[asyncio.Future[Result]]) -> list[Result]:
    return list(await asyncio.wait_for(asyncio.gather(*futures), timeout=10))


def test_results_map_to_their_callers() -> None:
    texts = [[5], [1, 2, 3], [7, 7, 7, 7, 7, 7, 7, 7, 7], [2, 2]]
    stats: list[BatchStats] = []

    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        answers = await results([batcher.submit(ids, None) for ids in texts])
        for ids, answer in zip(texts, answers, strict=True):
            expected = np.array([sum(ids), len(ids)], dtype=np.float32)
            np.testing.assert_allclose(answer.embedding, expected * 2)
            np.testing.assert_allclose(answer.probabilities, softmax(expected[None])[0], rtol=1e-6)
            assert answer.probabilities.dtype == np.float32
            assert answer.batch_size == 4
            assert answer.padded_length == 16  # 9 tokens round up to 16
            assert answer.queue_seconds >= 0
            assert answer.compute_seconds >= 0

    engine = run(scenario, stats=stats)

    assert len(engine.calls) == 1
    assert [(s.batch_size, s.padded_length, s.real_tokens, s.padded_tokens) for s in stats] == [
        (4, 16, 15, 64)
    ]


def test_batches_respect_max_batch_size() -> None:
    settings = BatchSettings(max_batch_size=2, max_queue_delay=0.0)

    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        futures = [batcher.submit([i + 1], None) for i in range(5)]
        await until(lambda: len(engine.calls) == 1)
        assert batcher.in_flight == 2
        assert batcher.queue_depth == 3
        assert not any(f.done() for f in futures)

        engine.gate.set()
        answers = await results(futures)
        assert [a.batch_size for a in answers] == [2, 2, 2, 2, 1]

    engine = run(scenario, settings)
    assert engine.calls == [[[1], [2]], [[3], [4]], [[5]]]


def test_requests_arriving_while_a_batch_runs_form_the_next_batch() -> None:
    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        first = [batcher.submit([1], None), batcher.submit([2], None)]
        await until(lambda: len(engine.calls) == 1)
        later = [batcher.submit([3], None), batcher.submit([4], None), batcher.submit([5], None)]
        await asyncio.sleep(0)
        assert batcher.queue_depth == 3
        assert not any(f.done() for f in first + later)

        engine.gate.set()
        await results(first + later)

    engine = run(scenario)
    assert engine.calls == [[[1], [2]], [[3], [4], [5]]]


def test_a_full_batch_does_not_wait_for_the_queue_delay() -> None:
    settings = BatchSettings(max_batch_size=2, max_queue_delay=60.0)

    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        alone = batcher.submit([1], None)
        for _ in range(5):
            await asyncio.sleep(0)
        assert engine.calls == []  # waiting for company
        company = batcher.submit([2], None)
        await results([alone, company])

    engine = run(scenario, settings)
    assert engine.calls == [[[1], [2]]]


@pytest.mark.parametrize("max_batch_size", [1, 8], ids=["prefetched", "queued"])
def test_a_caller_cancelled_before_compute_never_reaches_the_engine(max_batch_size: int) -> None:
    # With batches of 1 the cancelled entry is already formed (prefetched) when it goes away.
    settings = BatchSettings(max_batch_size=max_batch_size, max_queue_delay=0.0)

    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        running = batcher.submit([1], None)
        await until(lambda: len(engine.calls) == 1)
        gone = batcher.submit([2], None)
        kept = batcher.submit([3], None)
        await asyncio.sleep(0)
        gone.cancel()

        engine.gate.set()
        await results([running, kept])

    engine = run(scenario, settings)
    assert [2] not in [row for call in engine.calls for row in call]
    assert [row for call in engine.calls for row in call] == [[1], [3]]


def test_a_caller_cancelled_during_compute_does_not_break_the_loop() -> None:
    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        gone = batcher.submit([1], None)
        await until(lambda: len(engine.calls) == 1)
        gone.cancel()
        engine.gate.set()
        await until(lambda: batcher.in_flight == 0)

        (answer,) = await results([batcher.submit([4, 4], None)])
        assert answer.embedding[0] == 16

    run(scenario)


def test_an_expired_deadline_fails_before_compute() -> None:
    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        late = batcher.submit([1], deadline=time.monotonic() - 1.0)
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(late, timeout=10)
        await results([batcher.submit([2], deadline=time.monotonic() + 60.0)])

    engine = run(scenario)
    assert engine.calls == [[[2]]]


def test_engine_error_fails_exactly_that_batch_and_later_requests_succeed() -> None:
    engine = GatedEngine()
    engine.fail_calls = {0}

    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        failing = [batcher.submit([1], None), batcher.submit([2], None)]
        await until(lambda: len(engine.calls) == 1)
        next_batch = batcher.submit([3], None)

        engine.gate.set()
        for future in failing:
            with pytest.raises(InternalError) as caught:
                await asyncio.wait_for(future, timeout=10)
            assert "RuntimeError" in caught.value.message
            assert "secret" not in caught.value.message  # never echo the engine's message
        await results([next_batch, batcher.submit([4], None)])

    run(scenario, engine=engine)
    assert len(engine.calls) == 3


def test_wrong_row_count_fails_the_batch_with_internal_error() -> None:
    engine = GatedEngine()
    engine.drop_a_row = True

    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        futures = [batcher.submit([1], None), batcher.submit([2], None)]
        for future in futures:
            with pytest.raises(InternalError) as caught:
                await asyncio.wait_for(future, timeout=10)
            assert caught.value.details["expected"] == 2
            assert caught.value.details["logits_rows"] == 1

    run(scenario, engine=engine)


def test_full_queue_is_refused_at_once() -> None:
    settings = BatchSettings(max_batch_size=8, max_queue_delay=0.0, max_queue_size=2)

    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        batcher.submit([1], None)
        await until(lambda: len(engine.calls) == 1)  # in flight, no longer queued
        batcher.submit([2], None)
        batcher.submit([3], None)
        with pytest.raises(Overloaded) as caught:
            batcher.submit([4], None)
        assert caught.value.details == {"num_queued": 2, "max_queued": 2}

    run(scenario, settings)


def test_drain_and_stop_finishes_queued_work_then_refuses() -> None:
    settings = BatchSettings(max_batch_size=8, max_queue_delay=60.0)  # drain must not wait 60s

    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        running = [batcher.submit([1], None) for _ in range(8)]
        await until(lambda: len(engine.calls) == 1)
        queued = [batcher.submit([2], None), batcher.submit([3], None)]

        draining = asyncio.ensure_future(batcher.drain_and_stop())
        await asyncio.sleep(0)
        with pytest.raises(NotReady):
            batcher.submit([4], None)
        assert not draining.done()

        engine.gate.set()
        await asyncio.wait_for(draining, timeout=10)
        assert all(f.done() and f.exception() is None for f in running + queued)
        assert batcher.queue_depth == 0
        assert batcher.in_flight == 0

    engine = run(scenario, settings)
    assert engine.calls[1] == [[2], [3]]


def test_stop_now_fails_queued_and_running_entries() -> None:
    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        running = batcher.submit([1], None)
        await until(lambda: len(engine.calls) == 1)
        queued = batcher.submit([2], None)

        await batcher.stop_now()

        with pytest.raises(Cancelled):
            running.result()
        with pytest.raises(NotReady):
            queued.result()
        with pytest.raises(NotReady):
            batcher.submit([3], None)

    run(scenario)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_concurrency_bounds_batches_executing_at_once(concurrency: int) -> None:
    settings = BatchSettings(max_batch_size=1, max_queue_delay=0.0, concurrency=concurrency)

    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        futures = [batcher.submit([i + 1], None) for i in range(4)]
        await until(lambda: engine.active == concurrency)
        assert batcher.in_flight == concurrency
        engine.gate.set()
        await results(futures)

    engine = run(scenario, settings)
    assert engine.max_active == concurrency
    assert len(engine.calls) == 4


def test_submit_before_start_is_not_ready() -> None:
    async def scenario() -> None:
        batcher = Batcher(GatedEngine(), PAD, NO_WAIT)
        with pytest.raises(NotReady):
            batcher.submit([1], None)

    asyncio.run(scenario())


def test_memory_is_trimmed_after_a_quiet_interval_once_per_burst() -> None:
    from services.inference.main import TrimSchedule

    trim = TrimSchedule(0)
    assert not trim.due(0, busy=False)  # nothing ran yet: nothing to give back
    assert not trim.due(5, busy=False)  # batches ran during this interval: not quiet
    assert trim.due(5, busy=False)  # a whole interval without a batch: trim
    assert not trim.due(5, busy=False)  # already trimmed after this burst
    assert not trim.due(6, busy=False)  # light steady load: a batch in every interval
    assert not trim.due(7, busy=False)
    assert not trim.due(7, busy=True)  # quiet counter, but a batch is running right now
    assert trim.due(7, busy=False)


def test_a_lone_text_on_an_idle_model_is_dispatched_without_waiting_for_the_loop() -> None:
    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        engine.gate.clear()
        first = batcher.submit([1, 2], None, alone=True)
        # Dispatched inside submit: in flight before this coroutine yields even once.
        assert (batcher.in_flight, batcher.queue_depth) == (1, 0)
        # The only slot is taken now: the next lone text queues for the loop as usual.
        second = batcher.submit([3], None, alone=True)
        assert (batcher.in_flight, batcher.queue_depth) == (1, 1)
        # Texts sent together are left to the loop, which batches them.
        together = [batcher.submit([4], None), batcher.submit([5], None)]
        assert batcher.queue_depth == 3
        engine.gate.set()
        answers = await results([first, second, *together])
        assert [a.batch_size for a in answers] == [1, 3, 3, 3]

    run(scenario)


@pytest.mark.parametrize(("multiple", "width"), [(8, 16), (1, 9)])
def test_batches_are_padded_to_the_configured_multiple(multiple: int, width: int) -> None:
    settings = BatchSettings(max_queue_delay=0.0, pad_multiple=multiple)

    async def scenario(batcher: Batcher, engine: GatedEngine) -> None:
        answers = await results([batcher.submit([1] * n, None) for n in (5, 9)])
        assert [(a.batch_size, a.padded_length) for a in answers] == [(2, width), (2, width)]

    run(scenario, settings)


def test_the_pad_multiple_follows_the_device() -> None:
    from services.inference.main import default_pad_multiple

    assert default_pad_multiple(["CPUExecutionProvider"]) == 1
    assert default_pad_multiple(["CUDAExecutionProvider", "CPUExecutionProvider"]) == 8
    assert default_pad_multiple(["TensorrtExecutionProvider", "CUDAExecutionProvider"]) == 8


def test_each_slot_runs_on_its_own_thread() -> None:
    """Two batches at once run on two threads; batches one at a time afterwards all run on the
    first slot's thread (a shared pool would hand them to whichever thread waited longest)."""
    engine = GatedEngine()
    threads: list[str] = []
    output = engine._output

    def recording(input_ids: np.ndarray, attention_mask: np.ndarray) -> EngineOutput:
        threads.append(threading.current_thread().name)
        return output(input_ids, attention_mask)

    engine._output = recording  # type: ignore[method-assign]
    settings = BatchSettings(max_batch_size=1, max_queue_delay=0.0, concurrency=2)

    async def main() -> None:
        batcher = Batcher(engine, PAD, settings, name="slots")
        batcher.start()
        try:
            engine.gate.clear()
            together = [batcher.submit([1], None), batcher.submit([2], None)]
            await until(lambda: engine.active == 2)
            engine.gate.set()
            await results(together)
            for value in range(3, 9):
                await results([batcher.submit([value], None, alone=True)])
        finally:
            engine.gate.set()
            await batcher.stop_now()

    asyncio.run(main())
    assert len(set(threads[:2])) == 2
    assert len(set(threads[2:])) == 1
