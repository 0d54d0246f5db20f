"""Collecting feedback examples from real streams in a private redis-server.

Inference records are written as workers write them (`InferenceRecord.to_fields`) and feedback as
the router writes it, with entry ids set to the millisecond each was received, so windows are
exact. The trainer module itself never imports those services; only this test does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pytest
import redis
from redis.typing import EncodableT, FieldT

from loopline.errors import ErrorKind, FailedPrecondition
from services.inference.records import FailureRecord, InferenceRecord
from services.trainer.feedback_data import (
    FEEDBACK_STREAM,
    INFERENCE_STREAM,
    FeedbackQuery,
    assemble,
    collect,
)

T0 = 1_750_000_000.0  # the window of most tests: [T0, T0 + 3600)
HOUR = 3600.0


def record(
    request_id: str,
    text: str | None,
    *,
    model: str = "sentiment",
    shadow: bool = False,
    version: str = "3",
) -> InferenceRecord:
    return InferenceRecord(
        request_id=request_id,
        time=0.0,  # set by Streams.served from the entry time
        model=model,
        version=version,
        experiment="",
        variant="",
        user_bucket="",
        label="pos",
        probabilities=[0.2, 0.8],
        labels=["neg", "pos"],
        token_count=7,
        unknown_share=0.0,
        truncated=False,
        queue_ms=1.5,
        compute_ms=4.0,
        batch_size=8,
        sketch=[0.1] * 16,
        text=text,
        shadow=shadow,
    )


def xfields(fields: Mapping[str, str]) -> dict[FieldT, EncodableT]:
    """Stream fields as redis-py's XADD types them."""
    return dict(fields.items())


@dataclass
class Streams:
    """Builds both streams, then writes each in id order (explicit ids must only grow)."""

    client: redis.Redis
    pending: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)

    def served(self, at: float, rec: InferenceRecord | FailureRecord) -> None:
        fields = rec.to_fields()
        fields["time"] = f"{at:.6f}"
        self._add(INFERENCE_STREAM, at, fields)

    def label(self, at: float, request_id: str, label: str, source: str = "app") -> None:
        self._add(
            FEEDBACK_STREAM,
            at,
            {
                "request_id": request_id,
                "label": label,
                "user_id": "u-1",
                "source": source,
                "metadata": json.dumps({"screen": "review"}, separators=(",", ":")),
                "time": f"{at:.6f}",
                "received": f"{at:.6f}",
            },
        )

    def _add(self, stream: str, at: float, fields: dict[str, str]) -> None:
        self.pending.setdefault(stream, []).append((round(at * 1000), fields))

    def write(self) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            for stream, entries in self.pending.items():
                entries.sort(key=lambda item: item[0])
                for seq, (ms, fields) in enumerate(entries):
                    pipe.xadd(stream, xfields(fields), id=f"{ms}-{seq}")  # seq keeps ids unique
            pipe.execute()
        self.pending.clear()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as connection:
        yield connection


@pytest.fixture
def streams(client: redis.Redis) -> Streams:
    return Streams(client)


def labelled(streams: Streams, n: int, *, start: int = 0, at: float = T0 + 60) -> None:
    """`n` requests served and labelled inside the window, alternating neg/pos."""
    for i in range(start, start + n):
        streams.served(at - 30 + i, record(f"r{i}", f"review number {i}"))
        streams.label(at + i, f"r{i}", "pos" if i % 2 else "neg")


def query(**fields: object) -> FeedbackQuery:
    return FeedbackQuery.model_validate(
        {"since": T0, "until": T0 + HOUR, "model": "sentiment", "min_examples": 1, **fields}
    )


def test_collects_joins_and_skips_what_cannot_be_used(
    client: redis.Redis, streams: Streams
) -> None:
    labelled(streams, 10)  # r0..r9: usable
    # A shadow copy of r0 with another text: it must not be what r0 is trained on.
    streams.served(T0 + 29, record("r0", "SHADOW copy", shadow=True, version="4"))
    # Only a shadow record exists for r20: nothing served, nothing to join.
    streams.served(T0 + 40, record("r20", "shadow only", shadow=True))
    streams.label(T0 + 200, "r20", "pos")
    # log_text off: joined but without text.
    streams.served(T0 + 41, record("r21", None))
    streams.label(T0 + 201, "r21", "neg")
    # Served by another model: its label is not for this model's training set.
    streams.served(T0 + 42, record("r22", "topic text", model="topics"))
    streams.label(T0 + 202, "r22", "pos")
    # Outside the window: before since, and exactly at until (excluded).
    streams.served(T0 - 100, record("r23", "too early"))
    streams.label(T0 - 1, "r23", "pos")
    streams.served(T0 + 43, record("r24", "too late"))
    streams.label(T0 + HOUR, "r24", "pos")
    streams.write()

    result = collect(client, query())

    assert sorted(e.request_id for e in result.examples) == sorted(f"r{i}" for i in range(10))
    r0 = next(e for e in result.examples if e.request_id == "r0")
    assert r0.text == "review number 0"
    counts = result.counts
    assert (counts.entries, counts.requests, counts.joined) == (13, 13, 11)
    assert (counts.without_text, counts.other_model, counts.not_found) == (1, 1, 1)
    assert counts.shadow_skipped == 2
    assert counts.usable == 10


def test_failure_records_are_never_taken_for_an_answer(
    client: redis.Redis, streams: Streams
) -> None:
    labelled(streams, 4)  # r0..r3
    # r0 also failed on another worker after it was answered (a retry that lost the race).
    streams.served(T0 + 35, FailureRecord("r0", 0.0, "sentiment", "3", "", "", "", "deadline"))
    # r9 only failed: there is no answer, hence no text, to train on.
    streams.served(T0 + 36, FailureRecord("r9", 0.0, "sentiment", "3", "", "", "", "internal"))
    streams.label(T0 + 90, "r9", "pos")
    streams.write()

    result = collect(client, query())

    assert sorted(e.request_id for e in result.examples) == ["r0", "r1", "r2", "r3"]
    assert next(e for e in result.examples if e.request_id == "r0").text == "review number 0"
    assert result.counts.not_found == 1


def test_examples_come_newest_first_and_are_cut_at_max_examples(
    client: redis.Redis, streams: Streams
) -> None:
    labelled(streams, 12)
    streams.write()

    result = collect(client, query(max_examples=5, min_examples=5))

    assert [e.request_id for e in result.examples] == ["r11", "r10", "r9", "r8", "r7"]
    assert [e.time for e in result.examples] == [T0 + 60 + i for i in (11, 10, 9, 8, 7)]
    assert (result.counts.usable, result.counts.cut) == (12, 7)


def test_a_correction_replaces_the_earlier_label(client: redis.Redis, streams: Streams) -> None:
    labelled(streams, 4)
    streams.label(T0 + 500, "r2", "pos")  # r2 was labelled neg at T0 + 62
    streams.write()

    result = collect(client, query())

    by_id = {e.request_id: e for e in result.examples}
    assert by_id["r2"].label == "pos"
    assert by_id["r2"].time == T0 + 500
    assert result.counts.corrections == 1
    assert len(result.examples) == 4


def test_identical_texts_keep_the_latest_label(client: redis.Redis, streams: Streams) -> None:
    labelled(streams, 4)
    streams.served(T0 + 10, record("a", "the same sentence"))
    streams.served(T0 + 11, record("b", "the same sentence"))
    streams.label(T0 + 300, "b", "neg")
    streams.label(T0 + 400, "a", "pos")
    streams.write()

    result = collect(client, query())

    same = [e for e in result.examples if e.text == "the same sentence"]
    assert [(e.request_id, e.label) for e in same] == [("a", "pos")]
    assert result.counts.duplicate_texts == 1


def test_sources_filter_keeps_only_the_named_sources(client: redis.Redis, streams: Streams) -> None:
    labelled(streams, 4)  # source "app"
    streams.served(T0 + 10, record("s1", "from a survey"))
    streams.label(T0 + 300, "s1", "pos", source="survey")
    streams.write()

    result = collect(client, query(sources=["survey"]))

    assert [e.request_id for e in result.examples] == ["s1"]
    assert result.counts.other_sources == 4


def test_records_older_than_the_look_back_are_not_searched(
    client: redis.Redis, streams: Streams
) -> None:
    labelled(streams, 4)
    streams.served(T0 - 2 * HOUR, record("old", "served long ago"))
    streams.label(T0 + 300, "old", "pos")
    streams.write()

    near = collect(client, query(), lookback_s=HOUR)
    far = collect(client, query(), lookback_s=3 * HOUR)

    assert "old" not in {e.request_id for e in near.examples}
    assert near.counts.not_found == 1
    assert "old" in {e.request_id for e in far.examples}


def test_a_record_written_after_its_label_still_joins(
    client: redis.Redis, streams: Streams
) -> None:
    # A worker that spooled through a Redis outage appends its records late.
    labelled(streams, 4)
    streams.label(T0 + 100, "late", "pos")
    streams.served(T0 + 2 * HOUR, record("late", "replayed from the spool"))
    streams.write()

    result = collect(client, query())

    assert "late" in {e.request_id for e in result.examples}


def test_pages_through_long_streams(client: redis.Redis, streams: Streams) -> None:
    # More entries than one XRANGE page (1000) in both streams.
    for i in range(1500):
        streams.served(T0 + i * 0.5, record(f"p{i}", f"paged text {i}"))
        if i % 3 == 0:
            streams.label(T0 + 1000 + i * 0.5, f"p{i}", "pos" if i % 2 else "neg")
    streams.write()

    result = collect(client, query())

    assert len(result.examples) == 500


def test_until_defaults_to_now_with_router_assigned_ids(client: redis.Redis) -> None:
    now = time.time()
    client.xadd(INFERENCE_STREAM, xfields(record("n1", "just served").to_fields()))
    client.xadd(
        FEEDBACK_STREAM,
        xfields({"request_id": "n1", "label": "pos", "source": "", "time": f"{now:.6f}"}),
    )

    result = collect(client, FeedbackQuery(since=now - 60, model="sentiment", min_examples=1))

    assert [e.request_id for e in result.examples] == ["n1"]
    assert result.since == now - 60
    assert result.until >= now


def test_too_few_examples_are_refused_with_the_figures(
    client: redis.Redis, streams: Streams
) -> None:
    labelled(streams, 12)
    streams.served(T0 + 41, record("quiet", None))
    streams.label(T0 + 201, "quiet", "neg")
    streams.write()

    with pytest.raises(FailedPrecondition) as caught:
        collect(client, query(min_examples=0))  # 0: the default, 50

    message = caught.value.message
    assert caught.value.kind is ErrorKind.FAILED_PRECONDITION
    assert message.startswith("only 12 labelled requests for model 'sentiment' between ")
    assert "2025-06-15T15:06:40Z and 2025-06-15T16:06:40Z; need 50" in message
    assert "1 without text (log_text off)" in message
    assert message.endswith("lower min_examples or widen the window")
    assert caught.value.details["usable"] == 12


def test_empty_streams_are_refused_not_crashed_on(client: redis.Redis) -> None:
    with pytest.raises(FailedPrecondition, match="only 0 labelled requests"):
        collect(client, query(min_examples=5))


def test_collected_feedback_assembles_with_base_data(client: redis.Redis, streams: Streams) -> None:
    labelled(streams, 20)
    streams.write()
    base = [(f"movie review {i}", "pos" if i % 2 else "neg") for i in range(100)]

    result = collect(client, query(min_examples=20))
    texts, labels, report = assemble(base, result, mix_ratio=0.25, seed=42)

    assert (report.feedback_used, report.base_used, report.size) == (20, 60, 80)
    assert report.feedback_found == 20
    assert set(labels) == {"neg", "pos"}
    assert len(set(texts)) == len(texts)


def test_single_class_feedback_alone_is_refused(client: redis.Redis, streams: Streams) -> None:
    for i in range(6):
        streams.served(T0 + i, record(f"q{i}", f"all positive {i}"))
        streams.label(T0 + 100 + i, f"q{i}", "pos")
    streams.write()

    result = collect(client, query(min_examples=5))

    with pytest.raises(FailedPrecondition, match=r"1 class\(es\): 'pos' \(6 examples\)"):
        assemble([], result, mix_ratio=0.0, seed=1)


def test_feedback_labels_unknown_to_the_base_are_refused(
    client: redis.Redis, streams: Streams
) -> None:
    labelled(streams, 6)
    streams.served(T0 + 10, record("m1", "it was fine"))
    streams.label(T0 + 300, "m1", "neutral")
    streams.write()
    base = [("loved it", "pos"), ("hated it", "neg")]

    result = collect(client, query())

    with pytest.raises(FailedPrecondition, match=r"not in the base data: 'neutral' \(1 examples\)"):
        assemble(base, result, mix_ratio=0.5, seed=1)
