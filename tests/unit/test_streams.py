"""`loopline.streams.answered`, the mechanism behind ModelStreamInfer and ClassifyStream: what
ends a stream and what is still answered when it ends. The window and cancellation are tested
through both servicers (tests/unit/test_inference_stream.py, test_router_handlers.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from loopline.errors import InvalidInput
from loopline.streams import answered


async def _numbers(count: int, then: Exception | None = None) -> AsyncIterator[int]:
    for n in range(count):
        yield n
        await asyncio.sleep(0)
    if then is not None:
        raise then


async def _slowly_doubled(n: int) -> int:
    for _ in range(5 - n):  # the first read answers last
        await asyncio.sleep(0)
    return 2 * n


async def _collect(stream: AsyncIterator[int], into: list[int]) -> None:
    async for item in stream:
        into.append(item)


def test_answers_come_in_completion_order_and_all_of_them() -> None:
    async def scenario() -> list[int]:
        last_done = asyncio.Event()

        async def first_waits_for_the_last(n: int) -> int:
            if n == 0:
                await last_done.wait()
            if n == 3:
                last_done.set()
            return 2 * n

        got: list[int] = []
        await _collect(answered(_numbers(4), first_waits_for_the_last, 8), got)
        return got

    got = asyncio.run(scenario())
    assert sorted(got) == [0, 2, 4, 6]
    assert got[-1] == 0  # the first read was answered last; the others were not held for it


def test_a_request_stream_that_fails_ends_after_what_was_read_is_answered() -> None:
    got: list[int] = []
    bad = InvalidInput("message 3 does not parse")
    with pytest.raises(InvalidInput, match="does not parse"):
        asyncio.run(_collect(answered(_numbers(3, then=bad), _slowly_doubled, 8), got))
    assert sorted(got) == [0, 2, 4]


def test_an_answer_that_raises_ends_the_stream_with_it_instead_of_hanging() -> None:
    async def broken(n: int) -> int:
        if n == 1:
            raise RuntimeError("a bug")
        return n

    async def scenario() -> None:
        await asyncio.wait_for(_collect(answered(_numbers(3), broken, 8), []), timeout=10)

    with pytest.raises(RuntimeError, match="a bug"):
        asyncio.run(scenario())


def test_a_window_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        asyncio.run(_collect(answered(_numbers(1), _slowly_doubled, 0), []))
