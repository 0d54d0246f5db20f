"""Request streams answered concurrently: the worker's ModelStreamInfer and the router's
ClassifyStream.

`answered(requests, answer, window)` reads requests, runs `answer` on each as its own task (so
the batcher sees them together, as it sees separate calls) and yields the answers in completion
order. Each request takes one of `window` places before its answer starts and holds it until
the answer is written (the reader holds at most one more request, read and waiting for a place),
so a client that sends fast, or never reads, cannot queue unbounded work or answers in the
server: the stream stops reading and gRPC's flow control pushes back.

`answer` turns a request's own failure into an in-stream answer; what it raises anyway is a bug,
and ends the stream with it (INTERNAL through the error interceptor) rather than leave it hanging.
When the request stream fails (a message that does not parse), what was read before is still
answered, then the failure ends the response stream. When the call is cancelled (the client went
away, its deadline passed), the requests still running are cancelled: the batcher drops them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["answered"]

R = TypeVar("R")
A = TypeVar("A")


class _End:
    """The last item of the answer queue: the stream is over, with `error` if it failed."""

    __slots__ = ("error",)

    def __init__(self, error: Exception | None) -> None:
        self.error = error


class _Answers(Generic[A]):
    """What the reader hands the writer: answers, then one `_End`."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"a stream window must be >= 1, got {window}")
        self.queue: asyncio.Queue[A | _End] = asyncio.Queue()
        self.places = asyncio.Semaphore(window)


async def answered(
    requests: AsyncIterator[R], answer: Callable[[R], Awaitable[A]], window: int
) -> AsyncIterator[A]:
    """The answers to `requests`, in completion order (module docstring)."""
    answers: _Answers[A] = _Answers(window)
    reader = asyncio.get_running_loop().create_task(_read(requests, answer, answers))
    try:
        while not isinstance(item := await answers.queue.get(), _End):
            yield item
            answers.places.release()  # written: grpc asked for the next answer
        if item.error is not None:
            raise item.error
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def _read(
    requests: AsyncIterator[R], answer: Callable[[R], Awaitable[A]], answers: _Answers[A]
) -> None:
    running: set[asyncio.Task[None]] = set()

    async def one(request: R) -> None:
        try:
            result: A | _End = await answer(request)
        except Exception as err:  # a bug in `answer`: end the stream with it
            result = _End(err)
        await answers.queue.put(result)

    failure: Exception | None = None
    try:
        try:
            async for request in requests:
                await answers.places.acquire()
                task = asyncio.get_running_loop().create_task(one(request))
                running.add(task)
                task.add_done_callback(running.discard)
        except Exception as err:  # raised to the client once what was read is answered
            failure = err
        if running:
            await asyncio.gather(*list(running))
        await answers.queue.put(_End(failure))
    finally:
        for task in list(running):  # cancelled: drop what is still queued or running
            task.cancel()
