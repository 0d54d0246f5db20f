"""Assembling a training set from feedback and base data: mix ratio, de-duplication, fingerprint.

Pure: no Redis. `collect` is tested against a real Redis in
tests/integration/test_feedback_data_redis.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from loopline.errors import ErrorKind, FailedPrecondition, InvalidInput
from services.trainer.data import load_dataset
from services.trainer.feedback_data import (
    DEFAULT_MIN_EXAMPLES,
    CollectCounts,
    Example,
    FeedbackQuery,
    FeedbackSet,
    assemble,
    fingerprint_pairs,
    write_jsonl,
)

T0 = 1_750_000_000.0


def feedback(
    n: int, *, prefix: str = "fb", labels: tuple[str, ...] = ("neg", "pos")
) -> list[Example]:
    """`n` examples, newest first, labels alternating."""
    examples = [
        Example(f"{prefix} text {i}", labels[i % len(labels)], f"req-{prefix}-{i}", T0 + i)
        for i in range(n)
    ]
    return examples[::-1]


def base(n: int, *, prefix: str = "base") -> list[tuple[str, str]]:
    return [(f"{prefix} text {i}", "pos" if i % 2 else "neg") for i in range(n)]


# --------------------------------------------------------------------------- mix ratio


def test_base_is_sampled_down_so_feedback_makes_up_the_ratio() -> None:
    texts, labels, report = assemble(base(200), feedback(30), mix_ratio=0.3, seed=1)

    assert report.feedback_used == 30
    assert report.base_used == 70  # 30 / (30 + 70) = 0.3
    assert report.size == len(texts) == len(labels) == 100
    assert report.feedback_share == pytest.approx(0.3)
    assert texts[:30] == [e.text for e in feedback(30)]  # feedback first, newest first


def test_feedback_is_sampled_down_when_the_base_is_too_small() -> None:
    texts, _, report = assemble(base(10), feedback(100), mix_ratio=0.5, seed=1)

    assert (report.feedback_used, report.base_used) == (10, 10)
    assert report.feedback_usable == 100
    assert sum(t.startswith("fb ") for t in texts) == 10


def test_ratio_zero_concatenates_everything_and_ratio_one_uses_feedback_only() -> None:
    _, _, concat = assemble(base(40), feedback(10), mix_ratio=0.0, seed=1)
    _, _, only = assemble(base(40), feedback(10), mix_ratio=1.0, seed=1)

    assert (concat.feedback_used, concat.base_used, concat.size) == (10, 40, 50)
    assert (only.feedback_used, only.base_used, only.size) == (10, 0, 10)


def test_without_base_data_all_the_feedback_is_used_whatever_the_ratio() -> None:
    _, _, report = assemble([], feedback(12), mix_ratio=0.3, seed=1)

    assert (report.feedback_used, report.base_used, report.size) == (12, 0, 12)


def test_sampling_is_deterministic_by_seed() -> None:
    first = assemble(base(200), feedback(30), mix_ratio=0.3, seed=7)
    again = assemble(base(200), feedback(30), mix_ratio=0.3, seed=7)
    other = assemble(base(200), feedback(30), mix_ratio=0.3, seed=8)

    assert first[:2] == again[:2]
    assert first[2].fingerprint == again[2].fingerprint
    assert first[2].fingerprint != other[2].fingerprint


def test_sampled_base_keeps_file_order() -> None:
    texts, _, _ = assemble(base(200), feedback(30), mix_ratio=0.3, seed=3)

    numbers = [int(t.rsplit(" ", 1)[1]) for t in texts[30:]]
    assert numbers == sorted(numbers)


# --------------------------------------------------------------------------- de-duplication


def test_a_text_in_both_keeps_the_feedback_label() -> None:
    fb = [Example("great food", "pos", "r1", T0), Example("slow service", "neg", "r2", T0 - 1)]
    base_pairs = [("great food", "neg"), ("cold soup", "neg"), ("nice staff", "pos")]

    texts, labels, report = assemble(base_pairs, fb, mix_ratio=0.0, seed=1)

    assert dict(zip(texts, labels, strict=True)) == {
        "great food": "pos",
        "slow service": "neg",
        "cold soup": "neg",
        "nice staff": "pos",
    }
    assert report.base_duplicates == 1


def test_repeated_base_texts_are_kept_once() -> None:
    base_pairs = [("a", "neg"), ("b", "pos"), ("a", "neg"), ("c", "pos")]

    texts, _, report = assemble(base_pairs, [], mix_ratio=0.0, seed=1)

    assert texts == ["a", "b", "c"]
    assert report.base_duplicates == 1


def test_repeated_feedback_texts_keep_the_latest_label() -> None:
    fb = [
        Example("same words", "neg", "r1", T0),
        Example("same words", "pos", "r2", T0 + 5),
        Example("other words", "neg", "r3", T0 + 1),
    ]

    texts, labels, report = assemble([], fb, mix_ratio=0.0, seed=1)

    assert list(zip(texts, labels, strict=True)) == [("same words", "pos"), ("other words", "neg")]
    assert report.feedback_duplicates == 1


def test_the_feedback_sets_own_counts_are_not_changed_by_assembling() -> None:
    counts = CollectCounts(entries=5, requests=4, corrections=1, joined=4, usable=3)
    fb_set = FeedbackSet(feedback(3), counts, "sentiment", T0, T0 + 60)

    _, _, report = assemble(base(20), fb_set, mix_ratio=0.5, seed=1)

    assert fb_set.counts == CollectCounts(entries=5, requests=4, corrections=1, joined=4, usable=3)
    assert (report.feedback_found, report.feedback_joined, report.feedback_duplicates) == (5, 4, 1)


# --------------------------------------------------------------------------- refusals


def test_feedback_labels_missing_from_the_base_are_refused_by_name() -> None:
    fb = feedback(9, labels=("neg", "pos", "neutral"))

    with pytest.raises(FailedPrecondition, match=r"'neutral' \(3 examples\)") as caught:
        assemble(base(20), fb, mix_ratio=0.5, seed=1)

    assert caught.value.kind is ErrorKind.FAILED_PRECONDITION
    assert caught.value.details["unknown_labels"] == ["neutral"]
    assert "neg, pos" in caught.value.message


def test_a_single_class_is_refused_with_the_figures() -> None:
    fb = feedback(12, labels=("pos",))

    with pytest.raises(FailedPrecondition, match=r"1 class\(es\): 'pos' \(12 examples\)"):
        assemble([], fb, mix_ratio=0.0, seed=1)


def test_a_mix_ratio_outside_zero_to_one_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="mix_ratio"):
        assemble(base(10), feedback(10), mix_ratio=1.5, seed=1)


# --------------------------------------------------------------------------- the report


def test_fingerprint_ignores_order_and_sees_labels() -> None:
    texts, labels = ["b", "a", "c"], ["pos", "neg", "pos"]
    flipped = ["neg", "neg", "pos"]

    assert fingerprint_pairs(texts, labels) == fingerprint_pairs(texts[::-1], labels[::-1])
    assert fingerprint_pairs(texts, labels) != fingerprint_pairs(texts, flipped)


def test_fingerprint_is_stable_across_releases() -> None:
    # Pinned: recorded fingerprints must keep meaning the same data after a code change.
    # It is sha256(b"bad\x1fneg\x1egood\x1fpos\x1e"): pairs sorted, unit/record separators.
    value = fingerprint_pairs(["good", "bad"], ["pos", "neg"])

    assert value == "31a68e32d94800e851c5d44b5ed4216656e24703ad1629b07c79651d97eedf4a"


def test_report_holds_counts_shares_size_and_serialises() -> None:
    _, labels, report = assemble(base(200), feedback(30), mix_ratio=0.3, seed=1)

    assert sum(report.label_shares.values()) == pytest.approx(1.0)
    assert report.label_shares["pos"] == pytest.approx(labels.count("pos") / len(labels))
    flat = report.to_dict()
    assert json.loads(json.dumps(flat)) == flat
    assert flat["size"] == 100
    assert flat["feedback_share"] == pytest.approx(0.3)
    assert "collect_without_text" in flat


def test_assembled_set_written_as_jsonl_loads_in_the_file_pipeline(tmp_path: Path) -> None:
    texts, labels, _ = assemble(base(20), feedback(10), mix_ratio=0.5, seed=1)

    path = write_jsonl(tmp_path / "sub" / "train.jsonl", texts, labels)

    dataset = load_dataset(path)
    assert dataset.texts == texts
    assert dataset.labels == labels


def test_a_loaded_dataset_can_be_the_base(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "base.jsonl", *zip(*base(40), strict=True))

    _, _, report = assemble(load_dataset(path), feedback(10), mix_ratio=0.5, seed=1)

    assert (report.base_total, report.base_used, report.feedback_used) == (40, 10, 10)


# --------------------------------------------------------------------------- the query


def test_query_takes_datetimes_and_resolves_the_default_minimum() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)

    query = FeedbackQuery(since=since, model="sentiment", min_examples=0)

    assert query.since == since.timestamp()
    assert query.min_examples == DEFAULT_MIN_EXAMPLES


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"since": T0, "until": T0}, "until must be after since"),
        ({"max_examples": 10, "min_examples": 20}, "below min_examples"),
        ({"mix_ratio": 1.2}, "mix_ratio"),
        ({"model": ""}, "model"),
    ],
)
def test_query_refuses_inconsistent_fields(fields: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        FeedbackQuery.model_validate({"model": "sentiment", **fields})
