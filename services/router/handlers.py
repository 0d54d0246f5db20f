"""What the router does with a text, without protobuf: route, forward, answer, mirror.

For one text:
1. validate it (non-empty, under the character cap, metadata within bounds);
2. a model named with a version or alias goes there directly; a bare name is first routed by
   detected language (when that model has language routes), then through the experiment running
   on the resulting name (sticky assignment, shadows), else to its `champion` alias;
3. forward to a worker (balancer: least outstanding, retry once elsewhere, deadline propagated);
4. answer; shadow copies are sent after the answer is ready and never delay or fail it.

A ClassifyBatch groups items bound for the same model and routing tags into one worker call,
carrying one request id per text (`request_ids`), so the worker batches them together and its
records keep each caller's id.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from loopline.errors import InvalidInput, LooplineError
from loopline.logging import get_logger
from services.router.assignment import assign, shadows_for
from services.router.domain import CHAMPION, ModelRef
from services.router.experiments import Experiment
from services.router.metrics import RouterMetrics
from services.router.oip import WorkerAnswer

__all__ = ["Classification", "ClassifyCall", "Infer", "Limits", "Route", "Router"]

log = get_logger(__name__)

MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 256


@dataclass
class ClassifyCall:
    """One text to classify, as the caller sent it."""

    text: str
    model: ModelRef | None = None  # None or name "" = the router's default model
    user_id: str = ""
    request_id: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """Where one text goes and the tags its record carries."""

    ref: ModelRef  # what the worker is asked for (version or alias)
    experiment: str = ""
    variant: str = ""
    user_bucket: str = ""
    language: str = ""
    shadows: tuple[tuple[str, ModelRef], ...] = ()  # (shadow name, model)

    def group_key(self) -> tuple[str, ...]:
        """Items with the same key can share one worker call (and its tags)."""
        ref = self.ref
        return (ref.name, ref.version, ref.alias, self.experiment, self.variant, self.language)


@dataclass(frozen=True)
class Classification:
    """The answer for one text."""

    label: str
    scores: list[tuple[str, float]]  # every label, in the model's order
    model: ModelRef  # name, the concrete version that answered, the alias resolved through
    experiment: str
    variant: str
    request_id: str
    truncated: bool
    language: str
    total_seconds: float
    queue_seconds: float
    inference_seconds: float


@dataclass(frozen=True)
class Limits:
    """Input bounds the router enforces before any forwarding."""

    max_text_chars: int = 20_000
    max_batch_texts: int = 256


# balancer.infer(ref, texts, parameters, deadline): tests may pass any coroutine function.
Infer = Callable[[ModelRef, list[str], dict[str, str], float | None], Awaitable[WorkerAnswer]]
Running = Callable[[str, float], Experiment | None]
LanguageRoute = Callable[[str, str], tuple[str, str]]


class Router:
    """Routes and forwards classifications; transport-free, so tests drive it directly."""

    def __init__(
        self,
        infer: Infer,
        running: Running,
        language_route: LanguageRoute,
        *,
        default_model: str,
        limits: Limits,
        metrics: RouterMetrics | None = None,
        shadow_max_in_flight: int = 256,
        rng: random.Random | None = None,
    ) -> None:
        self._infer = infer
        self._running = running
        self._language_route = language_route
        self._default_model = default_model
        self.limits = limits
        self._metrics = metrics
        self._shadow_max = shadow_max_in_flight
        self._shadows: set[asyncio.Task[None]] = set()
        self._rng = rng or random.Random()

    # ----- validation -----

    def validate(self, call: ClassifyCall, index: int | None = None) -> None:
        """Refuse what no worker should see, naming the item in a batch."""
        where = "" if index is None else f"item {index}: "
        if not call.text.strip():
            raise InvalidInput(f"{where}text is empty", field="text", index=index)
        if len(call.text) > self.limits.max_text_chars:
            raise InvalidInput(
                f"{where}text has {len(call.text)} characters; the limit is "
                f"{self.limits.max_text_chars} (LOOPLINE_ROUTER_MAX_TEXT_CHARS)",
                field="text",
                index=index,
            )
        _check_metadata(call.metadata, where)

    # ----- routing -----

    def route(self, call: ClassifyCall, now: float | None = None) -> Route:
        """Pick the model version and the experiment tags for one call."""
        requested = call.model or ModelRef("")
        name = requested.name or self._default_model
        if requested.pinned:
            return Route(ModelRef(name, requested.version, requested.alias))
        name, language = self._language_route(name, call.text)
        experiment = self._running(name, time.time() if now is None else now)
        if experiment is None:
            return Route(ModelRef(name, alias=CHAMPION), language=language)
        variant, bucket = assign(experiment, call.user_id or None, self._rng)
        shadows = tuple((s.name, s.model) for s in shadows_for(experiment, self._rng))
        return Route(
            variant.model,
            experiment=experiment.id,
            variant=variant.name,
            user_bucket="" if bucket is None or bucket < 0 else str(bucket),
            language=language,
            shadows=shadows,
        )

    # ----- classification -----

    async def classify(self, call: ClassifyCall, deadline: float | None) -> Classification:
        """Validate, route, forward and answer one text."""
        return (await self.classify_many([call], deadline))[0]

    async def classify_many(
        self, calls: Sequence[ClassifyCall], deadline: float | None
    ) -> list[Classification]:
        """Answer every call, in order; one failure fails the whole call."""
        started = time.perf_counter()
        if not calls:
            raise InvalidInput("the batch holds no requests", items=0)
        if len(calls) > self.limits.max_batch_texts:
            raise InvalidInput(
                f"{len(calls)} items in one batch; the limit is {self.limits.max_batch_texts} "
                "(LOOPLINE_ROUTER_MAX_BATCH_TEXTS): split the batch",
                items=len(calls),
            )
        for index, call in enumerate(calls):
            self.validate(call, index if len(calls) > 1 else None)
            call.request_id = call.request_id or str(uuid.uuid4())
        routes = [self.route(call) for call in calls]
        groups: dict[tuple[str, ...], list[int]] = {}
        for index, route in enumerate(routes):
            groups.setdefault(route.group_key(), []).append(index)
        answers: list[Classification | None] = [None] * len(calls)
        if len(groups) == 1:
            # The common case (one Classify, or a batch for one model): no task to schedule.
            (members,) = groups.values()
            await self._forward_group(calls, routes, members, answers, deadline, started)
        else:
            await asyncio.gather(
                *(
                    self._forward_group(calls, routes, members, answers, deadline, started)
                    for members in groups.values()
                )
            )
        return [a for a in answers if a is not None]

    async def _forward_group(
        self,
        calls: Sequence[ClassifyCall],
        routes: Sequence[Route],
        members: list[int],
        answers: list[Classification | None],
        deadline: float | None,
        started: float,
    ) -> None:
        route = routes[members[0]]
        texts = [calls[i].text for i in members]
        ids = [calls[i].request_id for i in members]
        buckets = [routes[i].user_bucket for i in members]
        label = route.ref.name
        upstream_started = time.perf_counter()
        try:
            answer = await self._infer(route.ref, texts, _parameters(route, ids, buckets), deadline)
        except LooplineError as err:
            self._count(label, route.variant, err.kind.name, len(members))
            raise
        upstream = time.perf_counter() - upstream_started
        total = time.perf_counter() - started
        for row, index in enumerate(members):
            answers[index] = _classification(answer, row, route, ids[row], total)
        self._count(label, route.variant, "OK", len(members))
        if self._metrics is not None:
            self._metrics.latency.labels(label).observe(total)
            self._metrics.upstream.labels(label).observe(upstream)
        for name, shadow in route.shadows:
            self._mirror(name, shadow, route, texts, ids, buckets, deadline)

    def _count(self, model: str, variant: str, code: str, n: int) -> None:
        if self._metrics is not None:
            self._metrics.requests.labels(model, variant, code).inc(n)

    # ----- shadows -----

    def _mirror(
        self,
        name: str,
        shadow: ModelRef,
        route: Route,
        texts: list[str],
        ids: list[str],
        buckets: list[str],
        deadline: float | None,
    ) -> None:
        """Send a copy after the answer; its outcome is counted and never reaches the caller.

        The copy's record names the shadow as its variant (the monitor reports each shadow arm
        under its own name) and carries the served request's id, so one label scores both."""
        if len(self._shadows) >= self._shadow_max:
            self._shadow_outcome(shadow, "skipped")
            return
        tags = Route(
            shadow,
            experiment=route.experiment,
            variant=name,
            user_bucket=route.user_bucket,
            language=route.language,
        )
        params = _parameters(tags, ids, buckets) | {"shadow": "1"}
        task = asyncio.get_running_loop().create_task(
            self._shadow_call(shadow, texts, params, deadline)
        )
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow_call(
        self, shadow: ModelRef, texts: list[str], params: dict[str, str], deadline: float | None
    ) -> None:
        try:
            await self._infer(shadow, texts, params, deadline)
        except Exception as err:  # a failing shadow never fails anyone: count and log it
            log.warning("shadow call failed", extra={"model": str(shadow), "error": repr(err)})
            self._shadow_outcome(shadow, "failed")
        else:
            self._shadow_outcome(shadow, "ok")

    def _shadow_outcome(self, shadow: ModelRef, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.shadows.labels(shadow.name, outcome).inc()

    async def drain_shadows(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for shadow copies in flight; used on shutdown and in tests."""
        if self._shadows:
            await asyncio.wait(set(self._shadows), timeout=timeout)


def _check_metadata(metadata: Mapping[str, str], where: str) -> None:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidInput(
            f"{where}metadata has {len(metadata)} entries; at most {MAX_METADATA_ENTRIES}",
            field="metadata",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise InvalidInput(
                f"{where}metadata entry {key[:MAX_METADATA_KEY]!r} is too long: keys up to "
                f"{MAX_METADATA_KEY} and values up to {MAX_METADATA_VALUE} characters",
                field="metadata",
            )


def _parameters(route: Route, ids: list[str], buckets: list[str]) -> dict[str, str]:
    """A worker call's tags: `route`'s, with one request id (and, where the group's users fall in
    different buckets, one user bucket) per text (loopline/per_text.py)."""
    params = {"request_id": ids[0]}
    if len(ids) > 1:
        params["request_ids"] = json.dumps(ids)
    for key in ("experiment", "variant", "user_bucket", "language"):
        value = getattr(route, key)
        if value:
            params[key] = value
    if len(set(buckets)) > 1:
        params["user_buckets"] = json.dumps(buckets)
    return params


def _classification(
    answer: WorkerAnswer, row: int, route: Route, request_id: str, total: float
) -> Classification:
    probabilities = np.asarray(answer.probabilities[row], dtype=np.float32)
    columns = answer.columns
    return Classification(
        label=answer.labels[row],
        scores=[(columns[i], float(p)) for i, p in enumerate(probabilities)],
        model=ModelRef(answer.model, answer.version, "" if route.ref.version else route.ref.alias),
        experiment=route.experiment,
        variant=route.variant,
        request_id=request_id,
        truncated=bool(answer.truncated[row]),
        language=route.language,
        total_seconds=total,
        queue_seconds=answer.queue_seconds,
        inference_seconds=answer.compute_seconds,
    )
