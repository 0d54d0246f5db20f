"""Forwarding under load: concurrent calls for the same model and tags share one worker call.

Every ModelInfer costs the router and the worker a gRPC round trip each, whatever it carries
(about 0.3 ms of the router's CPU on the client side and 0.5 ms of the worker's event loop,
measured in docs/router.md), while the worker batches the texts anyway. So, per key (model
reference and routing tags, user bucket aside):

- while fewer than `per_worker` x (workers serving the model) calls are outstanding, a forward
  goes at once, exactly as without this layer: a lone request never waits;
- past that, forwards wait in one pending group, which goes as a single call (up to `max_texts`
  texts and `MAX_MERGED_CHARS` characters) when an outstanding one returns. The call lists every
  text's request id (`request_ids`) and, where they differ, its user bucket (`user_buckets`), so
  the worker's records stay one per caller. The worker queues each text on its own, so its
  length-aware batching sees the same texts as before;
- a merged call refused with INVALID_ARGUMENT is split and each forward tried alone, so only the
  caller whose text was refused sees the error. Any other failure (no worker, overloaded after
  the balancer's retry, deadline) concerns every text alike and reaches every caller.

The merged call carries the latest of its callers' deadlines; each caller's own deadline still
ends its wait (gRPC cancels the handler), and a caller that went away is left out of the group.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from loopline import per_text
from loopline.errors import ErrorKind, LooplineError
from services.router.domain import ModelRef
from services.router.oip import WorkerAnswer

__all__ = ["Coalescer", "Infer"]

Infer = Callable[[ModelRef, list[str], dict[str, str], float | None], Awaitable[WorkerAnswer]]

# Parameters that differ per text; everything else must match for two forwards to merge.
_PER_TEXT = frozenset({"request_id", "request_ids", "user_bucket", "user_buckets"})
# A merged call stops growing at this many characters, so that it stays well inside a worker's
# message limit (16 MiB by default; at most 4 UTF-8 bytes a character) whatever the texts' size.
MAX_MERGED_CHARS = 1_000_000


@dataclass(eq=False)
class _Forward:
    """One caller's forward waiting in a pending group."""

    texts: list[str]
    params: dict[str, str]
    deadline: float | None
    future: asyncio.Future[WorkerAnswer]


@dataclass
class _Key:
    """The calls in flight and the forwards waiting for one model reference and tag set."""

    outstanding: int = 0
    pending: list[_Forward] = field(default_factory=list)


class Coalescer:
    """An `Infer` in front of another: merges forwards under load (module docstring)."""

    def __init__(
        self,
        infer: Infer,
        workers: Callable[[ModelRef], int],
        *,
        per_worker: int = 2,
        max_texts: int = 64,
        on_call: Callable[[str, int], None] | None = None,
    ) -> None:
        if per_worker < 1 or max_texts < 1:
            raise ValueError(
                f"per_worker and max_texts must be >= 1, got {per_worker}, {max_texts}"
            )
        self._infer = infer
        self._workers = workers
        self._per_worker = per_worker
        self._max_texts = max_texts
        self._on_call = on_call  # (model, texts in an answered worker call), for metrics
        self._keys: dict[tuple[object, ...], _Key] = {}
        self._groups: set[asyncio.Task[None]] = set()

    async def __call__(
        self, ref: ModelRef, texts: list[str], params: dict[str, str], deadline: float | None
    ) -> WorkerAnswer:
        key = (ref, *sorted((k, v) for k, v in params.items() if k not in _PER_TEXT))
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
        if not state.pending and state.outstanding < self._limit(ref):
            state.outstanding += 1
            try:
                return await self._call(ref, texts, params, deadline)
            finally:
                self._release(key, state, ref)
        future: asyncio.Future[WorkerAnswer] = asyncio.get_running_loop().create_future()
        state.pending.append(_Forward(texts, params, deadline, future))
        return await future

    def _limit(self, ref: ModelRef) -> int:
        return self._per_worker * max(1, self._workers(ref))

    async def _call(
        self, ref: ModelRef, texts: list[str], params: dict[str, str], deadline: float | None
    ) -> WorkerAnswer:
        answer = await self._infer(ref, texts, params, deadline)
        if self._on_call is not None:
            # Counted under the model a worker answered for: never a name a caller made up.
            self._on_call(answer.model, len(texts))
        return answer

    def _release(self, key: tuple[object, ...], state: _Key, ref: ModelRef) -> None:
        """An outstanding call returned: send what waits, as far as the limit allows."""
        state.outstanding -= 1
        limit = self._limit(ref)
        while state.pending and state.outstanding < limit:
            group = self._take(state)
            if not group:
                break  # every waiting caller had gone
            state.outstanding += 1
            task = asyncio.get_running_loop().create_task(self._send(key, state, ref, group))
            self._groups.add(task)
            task.add_done_callback(self._groups.discard)
        if not state.outstanding and not state.pending:
            self._keys.pop(key, None)

    def _take(self, state: _Key) -> list[_Forward]:
        """The oldest waiting forwards up to `max_texts` texts and `MAX_MERGED_CHARS`
        characters (at least one forward)."""
        group: list[_Forward] = []
        count = chars = 0
        while state.pending:
            forward = state.pending[0]
            if forward.future.done():  # the caller went away (deadline, cancellation)
                state.pending.pop(0)
                continue
            size = sum(len(text) for text in forward.texts)
            if group and (
                count + len(forward.texts) > self._max_texts or chars + size > MAX_MERGED_CHARS
            ):
                break
            group.append(state.pending.pop(0))
            count += len(forward.texts)
            chars += size
        return group

    async def _send(
        self, key: tuple[object, ...], state: _Key, ref: ModelRef, group: list[_Forward]
    ) -> None:
        try:
            texts = [text for forward in group for text in forward.texts]
            try:
                answer = await self._call(ref, texts, merged(group), latest(group))
            except LooplineError as err:
                if err.kind is ErrorKind.INVALID_INPUT and len(group) > 1:
                    await asyncio.gather(*(self._alone(ref, forward) for forward in group))
                else:
                    _fail(group, err)
                return
            except asyncio.CancelledError:
                for forward in group:
                    forward.future.cancel()
                raise
            except Exception as err:  # a bug below: its callers fail with it, nobody hangs
                _fail(group, err)
                return
            offset = 0
            for forward in group:
                _answer(forward, rows(answer, offset, len(forward.texts)))
                offset += len(forward.texts)
        finally:
            self._release(key, state, ref)

    async def _alone(self, ref: ModelRef, forward: _Forward) -> None:
        try:
            answer = await self._call(ref, forward.texts, forward.params, forward.deadline)
        except Exception as err:
            _fail([forward], err)
        else:
            _answer(forward, answer)

    async def close(self) -> None:
        """Wait for merged calls in flight (their callers are answered or failed by then)."""
        if self._groups:
            await asyncio.gather(*self._groups, return_exceptions=True)


def merged(group: Sequence[_Forward]) -> dict[str, str]:
    """The parameters of one call for every text of `group` (same tags by construction)."""
    ids: list[str] = []
    buckets: list[str] = []
    for forward in group:
        count = len(forward.texts)
        ids += per_text.request_ids(forward.params, forward.params.get("request_id", ""), count)
        buckets += per_text.user_buckets(forward.params, count)
    params = {k: v for k, v in group[0].params.items() if k not in _PER_TEXT}
    params["request_id"] = ids[0]
    params["request_ids"] = json.dumps(ids)
    if buckets[0]:
        params["user_bucket"] = buckets[0]
    if len(set(buckets)) > 1:
        params["user_buckets"] = json.dumps(buckets)
    return params


def latest(group: Sequence[_Forward]) -> float | None:
    """The latest deadline of the group; None (the router's default) if any caller set none."""
    known = [forward.deadline for forward in group if forward.deadline is not None]
    return max(known) if len(known) == len(group) else None


def rows(answer: WorkerAnswer, start: int, count: int) -> WorkerAnswer:
    """The part of a merged answer that belongs to one forward."""
    end = start + count
    return WorkerAnswer(
        model=answer.model,
        version=answer.version,
        probabilities=answer.probabilities[start:end],
        labels=answer.labels[start:end],
        truncated=answer.truncated[start:end],
        parameters=answer.parameters,
        columns=answer.columns,
        endpoint=answer.endpoint,
    )


def _answer(forward: _Forward, answer: WorkerAnswer) -> None:
    if not forward.future.done():
        forward.future.set_result(answer)


def _fail(group: Sequence[_Forward], error: Exception) -> None:
    for forward in group:
        if not forward.future.done():
            forward.future.set_exception(error)
