"""The record spool (pure file I/O) and the record's stream-field round trip."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from services.inference.records import InferenceRecord, Pending, Spool


def rows(start: int, stop: int) -> list[dict[str, str]]:
    return [{"request_id": f"r{i}", "text": f"review number {i}"} for i in range(start, stop)]


def ids(records: list[dict[str, str]] | list[dict[str, object]]) -> list[object]:
    return [record["request_id"] for record in records]


def drain(spool: Spool, batch: int = 3) -> list[object]:
    seen: list[object] = []
    while not spool.empty:
        chunk = spool.read_batch(batch)
        seen += ids(chunk.records)
        spool.commit(chunk.end)
    return seen


def test_batches_come_back_in_append_order_and_the_file_goes_when_replayed(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "records.jsonl")
    assert spool.append(rows(0, 5)) == 0
    assert spool.append(rows(5, 8)) == 0
    assert not spool.empty

    assert drain(spool) == [f"r{i}" for i in range(8)]
    assert spool.empty
    assert not (tmp_path / "records.jsonl").exists()
    assert not (tmp_path / "records.jsonl.offset").exists()


def test_read_without_commit_reads_the_same_batch_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "records.jsonl")
    spool.append(rows(0, 4))
    first = spool.read_batch(2)
    assert ids(spool.read_batch(2).records) == ids(first.records) == ["r0", "r1"]
    assert ids(spool.read_batch(10, until=first.end).records) == ["r0", "r1"]


def test_the_cap_drops_the_newest_records_and_counts_them(tmp_path: Path) -> None:
    one_line = len(b'{"request_id":"r0","text":"review number 0"}\n')
    spool = Spool(tmp_path / "records.jsonl", max_bytes=3 * one_line)
    assert spool.append(rows(0, 2)) == 0
    assert spool.append(rows(2, 6)) == 3
    assert spool.size_bytes <= spool.max_bytes
    assert drain(spool) == ["r0", "r1", "r2"]
    assert spool.append(rows(6, 7)) == 0  # room again once replayed


def test_reopening_after_a_crash_continues_after_the_last_commit(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    spool = Spool(path)
    spool.append(rows(0, 6))
    spool.commit(spool.read_batch(2).end)
    uncommitted = spool.read_batch(2)  # "sent", then the process dies before commit
    spool.mark_pending(42, uncommitted.end)

    reopened = Spool(path)  # no close: the first object is simply abandoned
    assert reopened.pending == Pending(42, uncommitted.end)
    assert ids(reopened.read_batch(10, until=reopened.pending.end).records) == ["r2", "r3"]
    assert drain(reopened) == ["r2", "r3", "r4", "r5"]  # at least once: the pending batch again
    assert reopened.pending is None


def test_a_torn_last_line_is_cut_off_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "records.jsonl"
    Spool(path).append(rows(0, 3))
    with path.open("ab") as out:
        out.write(b'{"request_id":"r3","te')  # the write the crash interrupted

    with caplog.at_level(logging.WARNING):
        spool = Spool(path)
    assert "torn" in caplog.text
    spool.append(rows(4, 5))  # appends after the cut start on a clean line
    assert drain(spool) == ["r0", "r1", "r2", "r4"]


def test_a_corrupt_line_in_the_middle_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "records.jsonl"
    spool = Spool(path)
    spool.append(rows(0, 2))
    with path.open("ab") as out:
        out.write(b"\x00garbage\n")
    spool = Spool(path)
    spool.append(rows(2, 3))

    with caplog.at_level(logging.WARNING):
        assert drain(spool, batch=10) == ["r0", "r1", "r2"]
    assert "corrupt" in caplog.text


def test_a_stale_offset_without_its_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    (tmp_path / "records.jsonl.offset").write_text('{"offset": 999, "pending": [1, 999]}')
    spool = Spool(path)
    assert spool.pending is None
    spool.append(rows(0, 2))
    assert drain(spool) == ["r0", "r1"]


def record(text: str | None = "great film") -> InferenceRecord:
    return InferenceRecord(
        request_id="req-1",
        time=1718000000.123456,
        model="sentiment",
        version="3",
        experiment="exp-a",
        variant="treatment",
        user_bucket="",
        label="positive",
        probabilities=[0.1234567891, 0.8765432109],
        labels=["negative", "positive"],
        token_count=7,
        unknown_share=0.0,
        truncated=True,
        queue_ms=1.23456,
        compute_ms=3.5,
        batch_size=12,
        sketch=[i / 7 - 1 for i in range(16)],
        text=text,
        language="pt",
        shadow=True,
    )


@pytest.mark.parametrize("text", ["great film", None])
def test_record_fields_round_trip_as_bytes(text: str | None) -> None:
    original = record(text)
    fields = original.to_fields()
    assert all(isinstance(value, str) for value in fields.values())
    assert fields["truncated"] == "1"
    assert ("text" in fields) is (text is not None)

    back = InferenceRecord.from_fields({k.encode(): v.encode() for k, v in fields.items()})
    assert back.text == text
    assert back.probabilities == pytest.approx(original.probabilities, rel=1e-5)
    assert back.sketch == pytest.approx(original.sketch, rel=1e-5)
    assert back.time == pytest.approx(original.time, abs=1e-6)
    assert back.queue_ms == pytest.approx(original.queue_ms, abs=1e-3)
    exact = ("request_id", "model", "version", "variant", "user_bucket", "labels", "truncated")
    exact += ("language", "shadow")
    assert all(getattr(back, name) == getattr(original, name) for name in exact)
    assert (back.token_count, back.batch_size) == (7, 12)


def test_record_ids_follow_the_routers_list_when_it_fits() -> None:
    from loopline.per_text import request_ids

    assert request_ids({"request_ids": '["a", "b"]'}, "r", 2) == ["a", "b"]
    assert request_ids({"request_ids": '["a"]'}, "r", 2) == ["r:0", "r:1"]  # wrong length
    assert request_ids({"request_ids": "not json"}, "r", 1) == ["r"]
    assert request_ids({}, "r", 3) == ["r:0", "r:1", "r:2"]


def test_user_buckets_follow_the_list_when_it_fits() -> None:
    from loopline.per_text import user_buckets

    assert user_buckets({"user_buckets": '["1", "2"]', "user_bucket": "1"}, 2) == ["1", "2"]
    assert user_buckets({"user_buckets": '["1", 2]', "user_bucket": "7"}, 2) == ["7", "7"]
    assert user_buckets({}, 2) == ["", ""]
