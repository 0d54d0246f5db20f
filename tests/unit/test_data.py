"""Data checks: every failure names the file, row and column, before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopline.errors import ErrorKind
from services.trainer.data import (
    DataChecks,
    DataError,
    fingerprint,
    load_dataset,
    prepare,
    stratified_split,
)


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _balanced(n: int = 20) -> list[dict[str, str]]:
    return [{"text": f"sentence number {i}", "label": "pos" if i % 2 else "neg"} for i in range(n)]


def test_reads_jsonl_csv_and_parquet_to_the_same_examples(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _balanced()
    jsonl = _jsonl(tmp_path / "a.jsonl", rows)
    csv = tmp_path / "a.csv"
    csv.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    loaded = [load_dataset(p) for p in (jsonl, csv, parquet)]
    assert [d.texts for d in loaded] == [[r["text"] for r in rows]] * 3
    assert len({fingerprint([d]) for d in loaded}) == 1


def test_custom_columns(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"body": "fine", "y": 1}, {"body": "bad", "y": 0}])
    data = load_dataset(path, text_column="body", label_column="y")
    assert data.labels == ["1", "0"]


@pytest.mark.parametrize(
    ("rows", "row", "column", "phrase"),
    [
        ([{"text": "ok", "label": "a"}, {"txt": "x", "label": "b"}], 2, "text", "missing column"),
        ([{"text": "ok", "label": "a"}, {"text": "   ", "label": "b"}], 2, "text", "empty text"),
        ([{"text": "ok", "label": "a"}, {"text": 5, "label": "b"}], 2, "text", "expected text"),
        ([{"text": "ok", "label": None}], 1, "label", "expected a string or integer label"),
        ([{"text": "ok", "label": ""}], 1, "label", "empty label"),
    ],
)
def test_bad_rows_name_file_row_and_column(
    tmp_path: Path, rows: list[object], row: int, column: str, phrase: str
) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    message = caught.value.message
    assert str(path) in message
    assert f"row {row}" in message
    assert f"column '{column}'" in message
    assert phrase in message
    assert caught.value.kind is ErrorKind.INVALID_INPUT


def test_invalid_utf8_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(DataError, match=r"row 2: invalid UTF-8"):
        load_dataset(path)


def test_invalid_json_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"row 2: not valid JSON"):
        load_dataset(path)


def test_csv_rows_are_numbered_as_a_spreadsheet_shows_them(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("text,label\nfine,a\n,b\n")
    with pytest.raises(DataError, match=r"row 3, column 'text': empty text"):
        load_dataset(path)


def test_missing_file_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_dataset(tmp_path / "nope.jsonl")
    other = tmp_path / "a.txt"
    other.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_dataset(other)


def test_one_class_is_refused(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"text": f"t{i}", "label": "a"} for i in range(20)])
    with pytest.raises(DataError, match=r"found 1 class\(es\).*at least 2"):
        prepare(path)


def test_too_few_rows_per_class(tmp_path: Path) -> None:
    rows = [*_balanced(20), {"text": "lonely", "label": "rare"}]
    path = _jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError, match=r"'rare' has 1; at least 8"):
        prepare(path, checks=DataChecks(min_rows_per_class=8))


def test_validation_label_unseen_in_training(tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "train.jsonl", _balanced())
    val = _jsonl(
        tmp_path / "val.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "meh"}]
    )
    with pytest.raises(DataError) as caught:
        prepare(train, val)
    assert "row 2" in caught.value.message
    assert "'meh' does not occur in the training file" in caught.value.message


def test_stratified_split_is_seeded_disjoint_and_keeps_class_shares(tmp_path: Path) -> None:
    data = load_dataset(_jsonl(tmp_path / "a.jsonl", _balanced(100)))
    train, held = stratified_split(data, 0.2, seed=7)
    again, _ = stratified_split(data, 0.2, seed=7)
    other, _ = stratified_split(data, 0.2, seed=8)
    assert len(held.examples) == 20
    assert held.class_counts() == {"pos": 10, "neg": 10}
    assert {e.row for e in train.examples}.isdisjoint(e.row for e in held.examples)
    assert train.texts == again.texts
    assert train.texts != other.texts


def test_prepare_orders_labels_and_fingerprints_content(tmp_path: Path) -> None:
    first = prepare(_jsonl(tmp_path / "a.jsonl", _balanced()))
    rows = _balanced()
    rows[0]["text"] = "changed"
    second = prepare(_jsonl(tmp_path / "b.jsonl", rows))
    assert first.labels == ["neg", "pos"]
    assert len(first.fingerprint) == 64
    assert first.fingerprint != second.fingerprint
