"""The monitor's fold against a real (private) Redis: windows, histograms, feedback joins in both
orders, shadow agreement, drift samples and idempotency; plus the record parsers and the
histogram read-back, which need no Redis."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest

from loopline.redis import connect
from services.inference.records import FailureRecord, InferenceRecord
from services.monitor.events import (
    Failure,
    Label,
    MalformedRecordError,
    Prediction,
    is_failure,
    parse_failure,
    parse_label,
    parse_prediction,
)
from services.monitor.state import (
    CONFIDENCE_EDGES,
    LATENCY_EDGES_MS,
    FoldResult,
    State,
    StateConfig,
    Totals,
    histogram_quantile,
)

T = TypeVar("T")
W = 60  # window length used throughout
T0 = 1_700_000_040.0  # a window start (multiple of 60)


def record(
    request_id: str,
    *,
    at: float = T0 + 1,
    label: str = "positive",
    version: str = "1",
    experiment: str = "",
    variant: str = "",
    shadow: bool = False,
    confidence: float = 0.8,
    queue_ms: float = 1.0,
    compute_ms: float = 4.0,
    tokens: int = 12,
    truncated: bool = False,
    sketch: list[float] | None = None,
) -> InferenceRecord:
    other = "negative" if label == "positive" else "positive"
    return InferenceRecord(
        request_id=request_id,
        time=at,
        model="sentiment",
        version=version,
        experiment=experiment,
        variant=variant,
        user_bucket="3",
        label=label,
        probabilities=[confidence, 1 - confidence],
        labels=[label, other],
        token_count=tokens,
        unknown_share=0.25,
        truncated=truncated,
        queue_ms=queue_ms,
        compute_ms=compute_ms,
        batch_size=4,
        sketch=sketch if sketch is not None else [0.5] * 16,
        text="a review",
        shadow=shadow,
    )


def prediction(request_id: str, **kwargs: Any) -> Prediction:
    return parse_prediction("1-0", record(request_id, **kwargs).to_fields())


def feedback(request_id: str, label: str) -> Label:
    return parse_label("1-0", {"request_id": request_id, "label": label})


def run_with_state(
    url: str, body: Callable[[State], Awaitable[T]], config: StateConfig | None = None
) -> T:
    """Run `body` with a State on `url` (a fresh client, closed afterwards)."""

    async def go() -> T:
        client = connect(url)
        try:
            return await body(State(client, config or StateConfig(), rng=random.Random(7)))
        finally:
            await client.aclose()

    return asyncio.run(go())


# ----- parsing (no Redis)


def test_a_full_inference_record_parses_from_str_or_bytes() -> None:
    fields = record("r1", experiment="exp", variant="b", shadow=True, tokens=40).to_fields()
    as_bytes = {k.encode(): v.encode() for k, v in fields.items()}
    for raw in (fields, as_bytes):
        p = parse_prediction("1700000000000-0", raw)
        assert (p.request_id, p.model, p.version, p.label) == ("r1", "sentiment", "1", "positive")
        assert (p.experiment, p.variant, p.shadow) == ("exp", "b", True)
        assert p.confidence == pytest.approx(0.8)
        assert p.latency_ms == pytest.approx(5.0)
        assert (p.token_count, p.unknown_share, p.truncated) == (40, 0.25, False)
        assert p.sketch is not None
        assert [float(x) for x in p.sketch.split(",")] == [0.5] * 16
        assert p.problems == ()


def test_missing_optional_fields_are_none_and_time_comes_from_the_entry_id() -> None:
    p = parse_prediction(
        "1700000000123-4", {"request_id": "r", "model": "m", "version": "2", "label": "x"}
    )
    assert p.time == pytest.approx(1_700_000_000.123)
    assert (p.confidence, p.latency_ms, p.token_count, p.unknown_share, p.sketch) == (None,) * 5
    assert (p.experiment, p.variant, p.shadow, p.problems) == ("", "", False, ())


def test_unreadable_optional_fields_are_dropped_and_reported() -> None:
    fields = record("r").to_fields() | {
        "probabilities": "[0.2,",
        "sketch": "[1,2]",
        "token_count": "many",
        "unknown_share": "1.5",
    }
    p = parse_prediction("1-0", fields)
    assert (p.confidence, p.sketch, p.token_count, p.unknown_share) == (None, None, None, None)
    assert set(p.problems) == {"probabilities", "sketch", "token_count", "unknown_share"}
    assert p.latency_ms == pytest.approx(5.0)


@pytest.mark.parametrize("missing", ["request_id", "model", "version", "label"])
def test_a_record_without_a_required_field_is_malformed(missing: str) -> None:
    fields = record("r").to_fields()
    del fields[missing]
    with pytest.raises(MalformedRecordError) as caught:
        parse_prediction("1-0", fields)
    assert caught.value.kind == f"inference.missing_{missing}"


def test_feedback_parses_and_needs_a_request_id_and_a_label() -> None:
    label = parse_label(
        "1-0", {b"request_id": b"r", b"label": b"neg", b"time": b"12.5", b"source": b"ui"}
    )
    assert (label.request_id, label.label, label.time, label.source) == ("r", "neg", 12.5, "ui")
    with pytest.raises(MalformedRecordError, match=r"feedback\.missing_label"):
        parse_label("1-0", {"request_id": "r"})


# ----- histogram read-back (no Redis)


def test_histogram_quantile_interpolates_inside_the_bin() -> None:
    edges = [10.0, 20.0, 30.0]
    counts = [0, 10, 10, 0]  # 10 values in [10, 20), 10 in [20, 30)
    assert histogram_quantile(counts, edges, 0.5) == pytest.approx(20.0)
    assert histogram_quantile(counts, edges, 0.25) == pytest.approx(15.0)
    assert histogram_quantile(counts, edges, 1.0) == pytest.approx(30.0)
    assert math.isnan(histogram_quantile([0, 0, 0, 0], edges, 0.5))
    assert histogram_quantile([0, 0, 0, 5], edges, 0.99) == 30.0  # open-ended last bin


def test_totals_helpers_divide_safely() -> None:
    empty = Totals()
    assert math.isnan(empty.accuracy())
    assert math.isnan(empty.mean_confidence())
    assert math.isnan(empty.latency_percentile(0.5))
    assert empty.label_shares() == {}
    t = Totals(requests=4, label_counts={"a": 3, "b": 1}, labelled=2, correct=1)
    t.confidence_counts[60] = 2  # [0.60, 0.61)
    t.confidence_counts[90] = 2  # [0.90, 0.91)
    assert t.label_shares() == {"a": 0.75, "b": 0.25}
    assert t.accuracy() == 0.5
    assert t.coverage() == 0.5
    assert t.confidence_share_below(0.7) == pytest.approx(0.5)
    assert t.confidence_share_below(0.605) == pytest.approx(0.25)


# ----- folding (real Redis)


def test_windows_histograms_and_since_deploy_totals(redis_url: str) -> None:
    rng = np.random.default_rng(3)
    latencies = rng.lognormal(mean=2.0, sigma=0.6, size=300)  # ms
    confidences = rng.uniform(0.5, 1.0, size=300)
    preds = [
        prediction(
            f"r{i}",
            at=T0 + i,  # 300 s: windows T0, T0+60, ..., T0+240
            label="positive" if i % 3 else "negative",
            confidence=float(confidences[i]),
            queue_ms=0.0,
            compute_ms=float(latencies[i]),
            tokens=5 + i % 50,
            truncated=i % 10 == 0,
        )
        for i in range(300)
    ]

    async def body(state: State) -> None:
        assert await state.fold(preds) == FoldResult(predictions=300)
        series = await state.window_series("sentiment", "1", T0, T0 + 300)
        assert [(w, t.requests) for w, t in series] == [(int(T0) + k * W, 60) for k in range(5)]
        middle = await state.window_totals("sentiment", "1", T0 + 61, T0 + 179)  # 2 windows
        assert middle.requests == 120
        assert (middle.first, middle.last) == (T0 + 60, T0 + 180)
        total = await state.window_totals("sentiment")
        assert total.requests == 300
        assert total.label_counts == {"positive": 200, "negative": 100}
        assert total.truncated == 30
        assert total.mean_confidence() == pytest.approx(confidences.mean())
        assert total.mean_latency_ms() == pytest.approx(latencies.mean(), rel=1e-6)
        for q in (0.5, 0.95, 0.99):
            assert total.latency_percentile(q) == pytest.approx(np.quantile(latencies, q), rel=0.1)
        assert total.confidence_percentile(0.5) == pytest.approx(np.median(confidences), abs=0.01)
        assert total.mean_tokens() == pytest.approx(np.mean([5 + i % 50 for i in range(300)]))
        assert total.mean_unknown_share() == pytest.approx(0.25)
        assert (total.first, total.last) == (T0, T0 + 299)
        assert sum(total.latency_counts) == 300
        assert len(total.latency_counts) == len(LATENCY_EDGES_MS) + 1
        assert len(total.confidence_counts) == len(CONFIDENCE_EDGES) + 1

    run_with_state(redis_url, body)


def test_versions_are_kept_apart_and_added_up_on_request(redis_url: str) -> None:
    preds = [prediction(f"a{i}", version="1") for i in range(3)]
    preds += [prediction(f"b{i}", version="2") for i in range(5)]

    async def body(state: State) -> None:
        await state.fold(preds)
        assert await state.models() == {"sentiment": ["1", "2"]}
        assert (await state.window_totals("sentiment", "2", T0, T0 + W)).requests == 5
        assert (await state.window_totals("sentiment", None, T0, T0 + W)).requests == 8
        assert (await state.window_totals("sentiment", "1")).requests == 3

    run_with_state(redis_url, body)


def test_feedback_joins_its_prediction_in_either_order(redis_url: str) -> None:
    async def body(state: State) -> None:
        # Prediction first, label later (in a later batch).
        await state.fold([prediction("early", label="positive", at=T0 + 5)])
        result = await state.fold([], [feedback("early", "positive")])
        assert result.joins == 1
        # Label first: pending until its prediction arrives, then counted once.
        result = await state.fold([], [feedback("late", "positive")])
        assert result.joins == 0
        assert (await state.window_totals("sentiment")).labelled == 1
        await state.fold([prediction("late", label="negative", at=T0 + W + 5)])
        # A label for a request never predicted stays pending and counts nowhere.
        await state.fold([], [feedback("orphan", "positive")])

        total = await state.window_totals("sentiment")
        assert (total.requests, total.labelled, total.correct) == (2, 2, 1)
        # Each label is credited to the window of its prediction, whenever it arrived.
        first, second = await state.window_series("sentiment", "1", T0, T0 + 2 * W)
        assert (first[1].labelled, first[1].correct) == (1, 1)
        assert (second[1].labelled, second[1].correct) == (1, 0)

    run_with_state(redis_url, body)


def test_a_request_is_labelled_once_the_first_label_wins(redis_url: str) -> None:
    async def body(state: State) -> None:
        await state.fold([prediction("r", label="positive")], [feedback("r", "positive")])
        result = await state.fold([], [feedback("r", "negative")])
        assert result == FoldResult(duplicate_labels=1)
        total = await state.window_totals("sentiment")
        assert (total.labelled, total.correct) == (1, 1)

    run_with_state(redis_url, body)


def test_shadow_agreement_and_variant_totals_in_either_order(redis_url: str) -> None:
    served = {"q1": "positive", "q2": "negative", "q3": "positive"}
    shadow = {"q1": "positive", "q2": "positive", "q3": "positive"}

    def live(rid: str) -> Prediction:
        return prediction(rid, label=served[rid], experiment="e1", variant="control")

    def mirror(rid: str) -> Prediction:
        return prediction(
            rid, label=shadow[rid], version="2", experiment="e1", variant="shadow", shadow=True
        )

    async def body(state: State) -> None:
        await state.fold([live("q1"), mirror("q1")])  # served first, same batch
        await state.fold([mirror("q2")])  # shadow first ...
        await state.fold([live("q2"), live("q3")])  # ... served later
        await state.fold([mirror("q3")], [feedback("q1", "positive"), feedback("q2", "negative")])

        variants = await state.variant_totals("e1")
        assert set(variants) == {"control", "shadow"}
        control, mirrored = variants["control"], variants["shadow"]
        assert (control.shadow, control.model, control.version) == (False, "sentiment", "1")
        assert (mirrored.shadow, mirrored.model, mirrored.version) == (True, "sentiment", "2")
        assert control.totals.requests == 3
        assert mirrored.totals.requests == 3
        # The shadow shares request ids with the served answers but is counted on its own.
        assert (mirrored.totals.shadow_compared, mirrored.totals.shadow_agreed) == (3, 2)
        assert mirrored.totals.agreement() == pytest.approx(2 / 3)
        assert control.totals.shadow_compared == 0
        # Feedback is credited to every prediction of the request: served and shadow.
        assert (control.totals.labelled, control.totals.correct) == (2, 2)
        assert (mirrored.totals.labelled, mirrored.totals.correct) == (2, 1)
        windowed = await state.variant_totals("e1", T0, T0 + W)
        assert windowed["shadow"].totals.shadow_agreed == 2
        assert await state.experiments() == ["e1"]

    run_with_state(redis_url, body)


def test_refolding_counts_nothing_twice(redis_url: str) -> None:
    preds = [prediction(f"r{i}", label="positive" if i % 2 else "negative") for i in range(20)]
    preds.append(prediction("r3", shadow=True, experiment="e", variant="s"))
    labels = [feedback(f"r{i}", "positive") for i in range(0, 20, 3)]  # r3: served + shadow
    config = StateConfig(fold_chunk=7)  # several script calls per fold

    async def body(state: State) -> tuple[FoldResult, FoldResult, Totals]:
        first = await state.fold(preds, labels)
        again = await state.fold(preds + preds[:5], labels + labels[:2])  # also repeats inside
        return first, again, await state.window_totals("sentiment")

    first, again, total = run_with_state(redis_url, body, config)
    assert (first.predictions, first.labels, first.duplicate_predictions) == (21, 7, 0)
    assert (again.predictions, again.labels) == (0, 0)
    assert (again.duplicate_predictions, again.duplicate_labels) == (26, 9)

    # A new State on a new connection (a restarted monitor) reads the same figures.
    async def reread(state: State) -> Totals:
        return await state.window_totals("sentiment")

    assert run_with_state(redis_url, reread, config) == total
    # Labelled: 7 served + the shadow of r3; correct: odd ids (r3, r9, r15) and r3's shadow.
    assert (total.requests, total.labelled, total.correct) == (21, 8, 4)


def failure(request_id: str, *, at: float = T0 + 2, **tags: Any) -> Failure:
    fields = FailureRecord(
        request_id=request_id,
        time=at,
        model="sentiment",
        version=tags.pop("version", "1"),
        experiment=tags.pop("experiment", ""),
        variant=tags.pop("variant", ""),
        user_bucket="3",
        error="overloaded",
        **tags,
    ).to_fields()
    assert is_failure(fields)
    return parse_failure("1-0", fields)


def test_a_failure_record_parses_and_an_answer_is_not_one() -> None:
    parsed = failure("f1", experiment="e1", variant="control", shadow=True)
    assert (parsed.request_id, parsed.model, parsed.version, parsed.error) == (
        "f1",
        "sentiment",
        "1",
        "overloaded",
    )
    assert (parsed.experiment, parsed.variant, parsed.shadow, parsed.time) == (
        "e1",
        "control",
        True,
        T0 + 2,
    )
    assert not is_failure(record("r1").to_fields())
    with pytest.raises(MalformedRecordError, match=r"failure\.missing_model"):
        parse_failure("1-0", {"request_id": "f", "version": "1", "error": "internal"})


def test_failures_count_once_apart_from_answers(redis_url: str) -> None:
    async def body(state: State) -> tuple[FoldResult, FoldResult, Totals, Totals, Any]:
        first = await state.fold(
            [prediction("ok1"), prediction("ok2", experiment="e1", variant="control")],
            [feedback("f1", "positive")],
            [failure("f1"), failure("f2", experiment="e1", variant="control"), failure("f3")],
        )
        again = await state.fold([], [], [failure("f1"), failure("f3")])
        since_deploy = await state.window_totals("sentiment")
        window = await state.window_totals("sentiment", "1", T0, T0 + W)
        return first, again, since_deploy, window, await state.variant_totals("e1")

    first, again, since_deploy, window, variants = run_with_state(redis_url, body)
    assert (first.failures, first.predictions, first.joins) == (3, 2, 0)
    assert (again.failures, again.duplicate_failures) == (0, 2)
    assert (since_deploy.requests, since_deploy.errors) == (2, 3)
    assert (window.requests, window.errors) == (2, 3)
    assert since_deploy.labelled == 0  # the failed request's label waits for an answer
    assert (variants["control"].totals.requests, variants["control"].totals.errors) == (1, 1)


def test_a_window_with_only_failures_has_its_span(redis_url: str) -> None:
    async def body(state: State) -> Totals:
        await state.fold([], [], [failure("f", at=T0 + 3 * W + 7)])
        return await state.window_totals("sentiment")

    totals = run_with_state(redis_url, body)
    assert (totals.requests, totals.errors) == (0, 1)
    assert totals.first == totals.last == T0 + 3 * W + 7


def test_drift_samples_are_bounded_per_window(redis_url: str) -> None:
    config = StateConfig(sample_size=20)
    preds = [prediction(f"a{i}", confidence=0.6 + (i % 4) / 10, tokens=i) for i in range(200)]
    preds += [prediction(f"b{i}", at=T0 + W + 1, sketch=[float(i)] * 16) for i in range(5)]
    no_sketch = {
        "request_id": "c",
        "model": "sentiment",
        "version": "1",
        "label": "negative",
        "time": str(T0 + W + 2),
    }
    preds.append(parse_prediction("1-0", no_sketch))

    async def body(state: State) -> None:
        await state.fold(preds)
        first = await state.drift_samples("sentiment", "1", T0, T0 + W)
        assert len(first) == 20
        assert set(first.confidence.round(2)) <= {0.6, 0.7, 0.8, 0.9}
        assert first.sketch.shape == (20, 16)
        assert first.windows == [int(T0)]
        # Reservoir sampling: not just the first 20 of the window.
        assert first.token_count.max() >= 20
        second = await state.drift_samples("sentiment", "1", T0 + W, T0 + 2 * W)
        assert len(second) == 6
        assert sorted(second.labels) == ["negative"] + ["positive"] * 5
        assert int(np.isnan(second.sketch).all(axis=1).sum()) == 1
        assert np.isnan(second.confidence).sum() == 1
        both = await state.drift_samples("sentiment", "1", None, None, limit=10)
        assert len(both) == 10
        assert both.windows == [int(T0), int(T0) + W]

    run_with_state(redis_url, body, config)


def test_the_prediction_index_and_windows_expire(redis_url: str) -> None:
    config = StateConfig(prefix="t", prediction_ttl_s=3600, window_ttl_s=7200, sample_ttl_s=600)

    async def body(state: State) -> list[int]:
        await state.fold([prediction("r")], [feedback("pending", "positive")])
        client = connect(redis_url)
        try:
            keys = ("t:req:r", "t:req:pending", f"t:win:60:mv:sentiment:1:{int(T0)}")
            ttls = [await client.ttl(k) for k in keys]
            ttls.append(await client.ttl(f"t:smp:60:sentiment:1:{int(T0)}"))
            ttls.append(await client.ttl("t:tot:mv:sentiment:1"))
            return ttls
        finally:
            await client.aclose()

    req, pending, window, sample, total = run_with_state(redis_url, body, config)
    assert 3590 <= req <= 3600
    assert 3590 <= pending <= 3600
    assert 7190 <= window <= 7200
    assert 590 <= sample <= 600
    assert total == -1  # since-deploy totals are kept
