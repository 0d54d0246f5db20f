"""Labelled text tables: loading, checks that name file/row/column, stratified splits, fingerprints.

Every check runs before any model is touched, so a bad file costs seconds, not a training run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loopline.errors import InvalidInput

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(InvalidInput):
    """A data file cannot be used for training; the message names file, row and column."""

    def __init__(
        self, message: str, *, path: Path | str, row: int | None = None, column: str | None = None
    ) -> None:
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {message}", path=str(path), row=row, column=column)


@dataclass(frozen=True)
class Example:
    """One labelled text and the 1-based row it came from (for error messages)."""

    text: str
    label: str
    row: int


@dataclass
class Dataset:
    """Examples read from one file, with the file they came from."""

    path: Path
    examples: list[Example]
    text_column: str = "text"
    label_column: str = "label"

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]

    @property
    def labels(self) -> list[str]:
        return [e.label for e in self.examples]

    def class_counts(self) -> Counter[str]:
        return Counter(self.labels)


@dataclass(frozen=True)
class DataChecks:
    """Thresholds for the checks; defaults suit small fine-tuning sets."""

    min_rows_per_class: int = 8
    min_classes: int = 2
    max_text_chars: int = 100_000


@dataclass
class TrainingData:
    """Checked training and validation sets plus the label order used everywhere after."""

    train: Dataset
    validation: Dataset
    labels: list[str] = field(default_factory=list)
    fingerprint: str = ""


def _raw_rows(path: Path) -> Iterator[tuple[int, object]]:
    """Yield (1-based row, record) pairs; each format keeps its own row numbering."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _jsonl_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise DataError(
            f"unsupported file type '{suffix}'; use one of {', '.join(SUPPORTED_SUFFIXES)}",
            path=path,
        )


def _decode_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"invalid UTF-8 at byte {err.start} of the line; re-encode the file as UTF-8",
                    path=path,
                    row=number,
                ) from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    for number, line in _decode_lines(path):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"not valid JSON ({err.msg} at column {err.colno})", path=path, row=number
            ) from None


def _csv_rows(path: Path) -> Iterator[tuple[int, object]]:
    text = "".join(line for _, line in _decode_lines(path))
    reader = csv.DictReader(text.splitlines())
    # Row 1 is the header, so the first record is row 2, as a spreadsheet shows it.
    yield from enumerate(reader, start=2)


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:
        raise DataError(f"cannot read Parquet: {err}", path=path) from None
    yield from enumerate(table.to_pylist(), start=1)


def _read_example(
    path: Path, row: int, record: object, text_column: str, label_column: str, checks: DataChecks
) -> Example:
    if not isinstance(record, dict):
        raise DataError("expected an object with named fields", path=path, row=row)
    for column in (text_column, label_column):
        if column not in record:
            found = ", ".join(sorted(map(str, record))) or "none"
            raise DataError(
                f"missing column (found: {found}); set --text-column / --label-column",
                path=path,
                row=row,
                column=column,
            )
    text, label = record[text_column], record[label_column]
    if not isinstance(text, str):
        raise DataError(
            f"expected text, got {type(text).__name__}", path=path, row=row, column=text_column
        )
    if not text.strip():
        raise DataError("empty text", path=path, row=row, column=text_column)
    if len(text) > checks.max_text_chars:
        raise DataError(
            f"text of {len(text)} characters exceeds {checks.max_text_chars}",
            path=path,
            row=row,
            column=text_column,
        )
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise DataError(
            f"expected a string or integer label, got {type(label).__name__}",
            path=path,
            row=row,
            column=label_column,
        )
    label = str(label).strip()
    if not label:
        raise DataError("empty label", path=path, row=row, column=label_column)
    return Example(text=text, label=label, row=row)


def load_dataset(
    path: Path | str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    checks: DataChecks | None = None,
) -> Dataset:
    """Read and check every row of a JSONL, CSV or Parquet file."""
    path = Path(path)
    checks = checks or DataChecks()
    if not path.is_file():
        raise DataError("file not found", path=path)
    examples = [
        _read_example(path, row, record, text_column, label_column, checks)
        for row, record in _raw_rows(path)
    ]
    if not examples:
        raise DataError("no rows", path=path)
    return Dataset(path=path, examples=examples, text_column=text_column, label_column=label_column)


def check_classes(dataset: Dataset, checks: DataChecks) -> None:
    """Enough classes, and enough rows in each, to learn and to evaluate."""
    counts = dataset.class_counts()
    if len(counts) < checks.min_classes:
        raise DataError(
            f"found {len(counts)} class(es) ({', '.join(counts)}); at least "
            f"{checks.min_classes} are needed",
            path=dataset.path,
            column=dataset.label_column,
        )
    small = {label: n for label, n in counts.items() if n < checks.min_rows_per_class}
    if small:
        listed = ", ".join(f"'{k}' has {v}" for k, v in sorted(small.items()))
        raise DataError(
            f"too few rows per class ({listed}; at least {checks.min_rows_per_class} each)",
            path=dataset.path,
            column=dataset.label_column,
        )


def check_validation_labels(train: Dataset, validation: Dataset) -> None:
    """A validation label the model never saw in training cannot be predicted."""
    known = set(train.labels)
    for example in validation.examples:
        if example.label not in known:
            raise DataError(
                f"label '{example.label}' does not occur in the training file {train.path}",
                path=validation.path,
                row=example.row,
                column=validation.label_column,
            )


def stratified_split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split off `fraction` of every class, shuffled with `seed`."""
    if not 0.0 < fraction < 1.0:
        raise DataError(
            f"validation fraction must lie in (0, 1), got {fraction}", path=dataset.path
        )
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {}
    for example in dataset.examples:
        by_label.setdefault(example.label, []).append(example)
    train: list[Example] = []
    held: list[Example] = []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        cut = max(1, round(len(group) * fraction))
        held.extend(group[:cut])
        train.extend(group[cut:])
    train.sort(key=lambda e: e.row)
    held.sort(key=lambda e: e.row)
    return (
        Dataset(dataset.path, train, dataset.text_column, dataset.label_column),
        Dataset(dataset.path, held, dataset.text_column, dataset.label_column),
    )


def fingerprint(datasets: Sequence[Dataset]) -> str:
    """sha256 over the (text, label) pairs in order: same data, same fingerprint, any format."""
    digest = hashlib.sha256()
    for dataset in datasets:
        for example in dataset.examples:
            digest.update(example.text.encode("utf-8"))
            digest.update(b"\x1f")
            digest.update(example.label.encode("utf-8"))
            digest.update(b"\x1e")
        digest.update(b"\x1d")
    return digest.hexdigest()


def label_order(labels: Sequence[str]) -> list[str]:
    """Sorted label names: a stable output order every later part relies on."""
    return sorted(set(labels))


def prepare(
    train_path: Path | str,
    validation_path: Path | str | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    validation_fraction: float = 0.1,
    seed: int = 42,
    checks: DataChecks | None = None,
) -> TrainingData:
    """Load, check and split: everything that must pass before training starts."""
    checks = checks or DataChecks()
    train = load_dataset(
        train_path, text_column=text_column, label_column=label_column, checks=checks
    )
    check_classes(train, checks)
    if validation_path is None:
        train, validation = stratified_split(train, validation_fraction, seed)
    else:
        validation = load_dataset(
            validation_path, text_column=text_column, label_column=label_column, checks=checks
        )
        check_validation_labels(train, validation)
    return TrainingData(
        train=train,
        validation=validation,
        labels=label_order(train.labels),
        fingerprint=fingerprint([train, validation]),
    )
