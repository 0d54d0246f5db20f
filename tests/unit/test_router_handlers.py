"""The router's transport-free core with a fake upstream: routing order, grouping of batch items,
shadow isolation, validation. Real workers and gRPC are in tests/integration/test_router.py."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from loopline.errors import InvalidInput, NotReady
from services.router.domain import ModelRef
from services.router.experiments import Experiment, Shadow, Status, Variant
from services.router.handlers import ClassifyCall, Limits, Router
from services.router.metrics import RouterMetrics
from services.router.oip import WorkerAnswer

COLUMNS = ("negative", "positive")


@dataclass
class FakeUpstream:
    """Answers every text as positive; remembers each call; fails for names in `failing`."""

    calls: list[tuple[ModelRef, list[str], dict[str, str]]] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)

    async def infer(
        self, ref: ModelRef, texts: list[str], params: dict[str, str], deadline: float | None
    ) -> WorkerAnswer:
        self.calls.append((ref, list(texts), dict(params)))
        if ref.name in self.failing:
            raise NotReady(f"no worker serves {ref}")
        rows = np.tile(np.array([[0.2, 0.8]], dtype=np.float32), (len(texts), 1))
        return WorkerAnswer(
            model=ref.name,
            version=ref.version or "7",
            probabilities=rows,
            labels=["positive"] * len(texts),
            truncated=[False] * len(texts),
            parameters={},
            columns=COLUMNS,
        )


def experiment(**changes: object) -> Experiment:
    fields: dict[str, object] = {
        "id": "exp-1",
        "name": "ab",
        "model": "sentiment",
        "variants": (
            Variant("control", ModelRef("sentiment", "1"), 50),
            Variant("candidate", ModelRef("sentiment", "2"), 50),
        ),
        "status": Status.RUNNING,
        "start_time": 0.0,
    }
    fields.update(changes)
    return Experiment(**fields)  # type: ignore[arg-type]


def make_router(
    upstream: FakeUpstream,
    running: Mapping[str, Experiment] | None = None,
    routes: Mapping[str, str] | None = None,
    metrics: RouterMetrics | None = None,
) -> Router:
    experiments = dict(running or {})
    by_language = dict(routes or {})

    def language_route(model: str, text: str) -> tuple[str, str]:
        if model != "sentiment" or not by_language:
            return model, ""
        language = "pt" if "filme" in text else "en"
        return by_language.get(language, model), language

    return Router(
        upstream.infer,
        lambda model, now: experiments.get(model),
        language_route,
        default_model="sentiment",
        limits=Limits(max_text_chars=100, max_batch_texts=4),
        metrics=metrics,
        rng=random.Random(1),
    )


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_bare_name_goes_to_the_champion_and_a_pinned_one_bypasses_routing() -> None:
    upstream = FakeUpstream()
    router = make_router(upstream, {"sentiment": experiment()}, {"pt": "sentiment-pt"})
    answer = run(router.classify(ClassifyCall("great", ModelRef("other")), None))
    assert upstream.calls[-1][0] == ModelRef("other", alias="champion")
    assert answer.model == ModelRef("other", "7", "champion")  # type: ignore[attr-defined]

    run(router.classify(ClassifyCall("o filme", ModelRef("sentiment", alias="beta")), None))
    assert upstream.calls[-1][0] == ModelRef("sentiment", alias="beta")
    assert "experiment" not in upstream.calls[-1][2]


def test_language_routes_before_experiments_apply() -> None:
    upstream = FakeUpstream()
    router = make_router(upstream, {"sentiment": experiment()}, {"pt": "sentiment-pt"})
    answer = run(router.classify(ClassifyCall("o filme é bom", user_id="u1"), None))
    assert upstream.calls[-1][0] == ModelRef("sentiment-pt", alias="champion")
    assert (answer.language, answer.experiment) == ("pt", "")  # type: ignore[attr-defined]

    answer = run(router.classify(ClassifyCall("a good film", user_id="u1"), None))
    assert answer.experiment == "exp-1"  # type: ignore[attr-defined]
    params = upstream.calls[-1][2]
    assert params["language"] == "en"
    assert params["variant"] == answer.variant  # type: ignore[attr-defined]
    assert params["user_bucket"].isdigit()


def test_batch_items_for_one_target_share_a_worker_call_with_their_own_ids() -> None:
    upstream = FakeUpstream()
    router = make_router(upstream)
    calls = [
        ClassifyCall("one", request_id="a"),
        ClassifyCall("two", ModelRef("other"), request_id="b"),
        ClassifyCall("three", request_id="c"),
    ]
    answers = run(router.classify_many(calls, None))
    assert [a.request_id for a in answers] == ["a", "b", "c"]  # type: ignore[attr-defined]
    assert sorted(len(texts) for _, texts, _ in upstream.calls) == [1, 2]
    grouped = next(params for _, texts, params in upstream.calls if len(texts) == 2)
    assert json.loads(grouped["request_ids"]) == ["a", "c"]


def test_batch_items_of_different_users_list_each_users_bucket() -> None:
    upstream = FakeUpstream()
    everyone = (
        Variant("control", ModelRef("sentiment", "1"), 100),
        Variant("candidate", ModelRef("sentiment", "2"), 0),
    )
    router = make_router(upstream, {"sentiment": experiment(variants=everyone)})
    calls = [ClassifyCall("one", user_id="u1"), ClassifyCall("two", user_id="u2")]
    run(router.classify_many(calls, None))
    ((_, texts, params),) = upstream.calls
    buckets = json.loads(params["user_buckets"])
    assert len(texts) == len(buckets) == 2
    assert buckets[0] != buckets[1]
    assert all(b.isdigit() for b in buckets)
    assert params["user_bucket"] == buckets[0]


def test_a_failing_shadow_never_fails_the_caller_and_is_counted() -> None:
    upstream = FakeUpstream(failing={"broken"})
    shadows = (Shadow("mirror", ModelRef("broken", "3")),)
    metrics = RouterMetrics(CollectorRegistry())
    router = make_router(upstream, {"sentiment": experiment(shadows=shadows)}, metrics=metrics)

    async def scenario() -> object:
        answer = await router.classify(ClassifyCall("a good film", request_id="r1"), None)
        await router.drain_shadows()
        return answer

    answer = run(scenario())
    assert answer.label == "positive"  # type: ignore[attr-defined]
    shadow_call = upstream.calls[-1]
    assert shadow_call[0] == ModelRef("broken", "3")
    assert (shadow_call[2]["shadow"], shadow_call[2]["request_id"]) == ("1", "r1")
    # Recorded under the shadow's own name, so the experiment report has a row for it.
    assert shadow_call[2]["variant"] == "mirror"
    failed = metrics.shadows.labels("broken", "failed")._value.get()
    assert failed == 1


def test_a_failure_upstream_fails_the_call_with_its_kind() -> None:
    router = make_router(FakeUpstream(failing={"sentiment"}))
    with pytest.raises(NotReady):
        run(router.classify(ClassifyCall("fine"), None))


@pytest.mark.parametrize(
    ("calls", "phrase"),
    [
        ([ClassifyCall("  ")], "empty"),
        ([ClassifyCall("x" * 101)], "limit is 100"),
        ([ClassifyCall("ok", metadata={f"k{i}": "v" for i in range(17)})], "at most 16"),
        ([ClassifyCall("ok", metadata={"k": "v" * 300})], "too long"),
        ([ClassifyCall("ok")] * 5, "limit is 4"),
        ([], "no requests"),
        ([ClassifyCall("ok"), ClassifyCall("")], "item 1"),
    ],
)
def test_bad_input_is_refused_before_any_forwarding(calls: list[ClassifyCall], phrase: str) -> None:
    upstream = FakeUpstream()
    with pytest.raises(InvalidInput, match=phrase):
        run(make_router(upstream).classify_many(calls, None))
    assert upstream.calls == []


def test_a_version_and_an_alias_together_are_refused() -> None:
    with pytest.raises(InvalidInput, match="not both"):
        ModelRef.requested("sentiment", "1", "champion")


def test_a_stream_holds_a_window_of_items_until_their_answers_are_written() -> None:
    """ClassifyStream reads ahead only as far as answers go out: a client that sends without
    reading gets `stream_window` items classified, not its whole backlog."""
    from loopline.v1 import router_pb2 as pb
    from services.router.servicer import RouterServicer

    upstream = FakeUpstream()
    servicer = RouterServicer(
        make_router(upstream),
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        default_timeout=10.0,
        stream_window=3,
    )

    class Context:
        def time_remaining(self) -> float:
            return 10.0

    async def requests() -> object:
        for n in range(7):
            yield pb.ClassifyRequest(text=f"film {n}", request_id=f"s-{n}")

    async def scenario() -> None:
        stream = servicer.ClassifyStream(requests(), Context())  # type: ignore[arg-type]
        first = await anext(stream)
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(upstream.calls) == 3  # one answer out, two waiting to be written
        rest = [answer async for answer in stream]
        assert sorted(a.request_id for a in [first, *rest]) == [f"s-{n}" for n in range(7)]
        assert len(upstream.calls) == 7

    asyncio.run(scenario())
