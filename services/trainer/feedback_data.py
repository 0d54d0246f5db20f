"""The `feedback` data source: production texts labelled by users, ready to train on.

Two steps, each testable on its own:

`collect` reads the feedback stream (`loopline:feedback`) over a time window and joins every label
with the inference record of the same request id (`loopline:inference`), which holds the text when
the worker logs text. The rules, in the order they apply:

1. Window: a feedback entry belongs to the window when its stream id, the millisecond at which the
   router received it, lies in [since, until). `sources`, when set, keeps only those sources.
2. Corrections: several labels for one request id keep the one received last (highest entry id).
3. Join: a request joins the served inference record with the same request id whose `model` is
   the query's model. Shadow records ("1": a mirrored copy that no caller saw) never join; the
   served copy of the same request does. Requests whose record is gone (trimmed, or older than the
   look-back), served under another model, or logged without text (log_text off) are counted and
   skipped.
4. Identical texts (the same sentence sent under several request ids) keep one example: the one
   whose label was received last. Texts compare exactly, as the file loader keeps them.
5. Newest first (by receipt of the label), cut at `max_examples`; fewer than `min_examples` left
   refuses the job with the figures.

`assemble` mixes those examples with the base data set (the job's files):

1. Every feedback label must occur in the base data (when there is base data): a label the base
   set never had is a mismatch of label sets, not a new class to learn on the side.
2. A base text equal to a feedback text is dropped (the production label wins); a base text seen
   before in the base is dropped too, so every text appears once.
3. Mix: with `mix_ratio` r in (0, 1), feedback makes up r of the result. The base is sampled down
   to round(F * (1 - r) / r) examples; when the base has fewer than that, all of it is kept and the
   feedback is sampled down to round(B * r / (1 - r)) instead. r = 1 uses feedback only, r = 0
   concatenates everything, and no base at all uses all the feedback whatever r is. Samples are
   drawn with `random.Random(seed)` and keep their original order, so the same inputs and seed give
   the same set.
4. A single class in the result refuses the job.

The report records the counts of every step, the label shares, the size and a fingerprint (sha256
over the sorted (text, label) pairs, so the order of the set does not change it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loopline.errors import FailedPrecondition, InvalidInput
from loopline.logging import get_logger
from services.trainer.data import Dataset

__all__ = [
    "DEFAULT_LOOKBACK_S",
    "DEFAULT_MIN_EXAMPLES",
    "FEEDBACK_STREAM",
    "INFERENCE_STREAM",
    "AssemblyReport",
    "CollectCounts",
    "Example",
    "FeedbackQuery",
    "FeedbackSet",
    "assemble",
    "collect",
    "fingerprint_pairs",
    "write_jsonl",
]

log = get_logger(__name__)

INFERENCE_STREAM = "loopline:inference"
FEEDBACK_STREAM = "loopline:feedback"
DEFAULT_MIN_EXAMPLES = 50
# A label arrives after its prediction, sometimes days after; records older than this before
# `since` are not searched. The inference stream's own retention bounds it anyway.
DEFAULT_LOOKBACK_S = 7 * 24 * 3600.0
_PAGE = 1000  # entries per XRANGE round trip: bounded replies, few round trips


# --------------------------------------------------------------------------- the query


class FeedbackQuery(BaseModel):
    """Which feedback to collect; mirrors `loopline.v1.FeedbackSource` with times as unix seconds.

    `since`/`until` also take datetimes (a spec's timestamps); a naive datetime is read as UTC.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    since: float | None = Field(None, ge=0, description="feedback received at or after; None: all")
    until: float | None = Field(None, ge=0, description="feedback received before; None: now")
    model: str = Field(min_length=1, description="public model name the requests were served as")
    sources: tuple[str, ...] = Field((), description="feedback sources to keep; empty: all")
    max_examples: int = Field(0, ge=0, description="newest examples kept; 0: no limit")
    mix_ratio: float = Field(0.0, ge=0, le=1, description="feedback share of the set; 0: concat")
    min_examples: int = Field(
        DEFAULT_MIN_EXAMPLES, ge=0, description="fewer usable examples fail the job; 0: default"
    )

    @field_validator("since", "until", mode="before")
    @classmethod
    def _unix_seconds(cls, value: Any) -> Any:
        if isinstance(value, datetime):
            aware = value if value.tzinfo else value.replace(tzinfo=UTC)
            return aware.timestamp()
        return value

    @field_validator("min_examples")
    @classmethod
    def _default_min(cls, value: int) -> int:
        # The proto's 0 means "the trainer default"; resolve it here so no caller forgets.
        return value or DEFAULT_MIN_EXAMPLES

    @model_validator(mode="after")
    def _consistent(self) -> FeedbackQuery:
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ValueError("until must be after since")
        if self.max_examples and self.max_examples < self.min_examples:
            # Such a job could never pass; say so now rather than after reading the streams.
            raise ValueError(
                f"max_examples ({self.max_examples}) is below min_examples ({self.min_examples})"
            )
        return self


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Example:
    """One usable production example; `time` is when its label was received (unix seconds)."""

    text: str
    label: str
    request_id: str
    time: float


@dataclass
class CollectCounts:
    """What `collect` saw at each step (see the module docstring for the rules)."""

    entries: int = 0  # feedback entries in the window, after the source filter
    other_sources: int = 0  # entries in the window dropped by the source filter
    malformed: int = 0  # entries without a request id or label, or not UTF-8
    requests: int = 0  # distinct labelled request ids
    corrections: int = 0  # labels replaced by a later label for the same request
    not_found: int = 0  # requests without a served inference record in the scanned range
    other_model: int = 0  # requests served under another model name
    shadow_skipped: int = 0  # shadow records seen for labelled requests (never joined)
    joined: int = 0  # requests joined with a served record of the model
    without_text: int = 0  # joined, but the record carries no text (log_text off)
    duplicate_texts: int = 0  # joined with text, but the same text has a later label
    usable: int = 0  # after joining and de-duplication
    cut: int = 0  # usable examples beyond max_examples (the oldest)

    @property
    def duplicates(self) -> int:
        """Every label dropped by de-duplication: corrections and repeated texts."""
        return self.corrections + self.duplicate_texts


@dataclass
class FeedbackSet:
    """The collected examples (newest first), the counts, and the window they came from."""

    examples: list[Example]
    counts: CollectCounts
    model: str
    since: float | None
    until: float


@dataclass
class AssemblyReport:
    """Everything worth recording about an assembled training set."""

    size: int
    fingerprint: str
    label_shares: dict[str, float]
    mix_ratio: float
    seed: int
    feedback_found: int  # feedback entries in the window
    feedback_joined: int  # requests joined with a served record
    feedback_without_text: int
    feedback_duplicates: int  # corrections and repeated texts within the feedback
    feedback_usable: int  # after de-duplication and max_examples: what the mix could use
    feedback_used: int
    base_total: int
    base_duplicates: int  # base texts dropped: also in the feedback, or repeated in the base
    base_used: int
    counts: CollectCounts = field(default_factory=CollectCounts)

    @property
    def feedback_share(self) -> float:
        """The share of the set that came from feedback (0 for an empty set)."""
        return self.feedback_used / self.size if self.size else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-able dict (collect counts prefixed `collect_`) for run logs and job state."""
        flat = asdict(self)
        counts = flat.pop("counts")
        flat.update({f"collect_{key}": value for key, value in counts.items()})
        flat["feedback_share"] = round(self.feedback_share, 6)
        return flat


# --------------------------------------------------------------------------- reading streams


@dataclass(frozen=True)
class _Label:
    """One feedback entry; `order` is its stream id as numbers, the receipt order."""

    request_id: str
    label: str
    order: tuple[int, int]

    @property
    def time(self) -> float:
        return self.order[0] / 1000


@dataclass(frozen=True)
class _Served:
    model: str
    text: str | None


Fields = dict[str, str]


def _decode(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")  # UnicodeDecodeError: the caller counts the entry malformed
    return "" if value is None else value


def _entries(client: redis.Redis, stream: str, start: str, end: str) -> Iterator[tuple[str, Any]]:
    """(entry id, raw fields) from `start` to `end` inclusive, oldest first, a page at a time."""
    while True:
        page = client.xrange(stream, min=start, max=end, count=_PAGE) or []
        for raw_id, raw_fields in page:
            yield _decode(raw_id), raw_fields or {}
        if len(page) < _PAGE:
            return
        start = "(" + _decode(page[-1][0])  # exclusive: the next page starts after this id


def _fields(raw: Mapping[Any, Any]) -> Fields:
    return {_decode(key): _decode(value) for key, value in raw.items()}


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _ms(seconds: float) -> int:
    """The first whole millisecond at or after `seconds` (rounded to µs against float noise)."""
    return math.ceil(round(seconds * 1000, 3))


def _window_ids(since: float | None, until: float) -> tuple[str, str]:
    start = "-" if since is None else f"{_ms(since)}-0"
    # "(" makes the bound exclusive: ids below <ms>-0 are exactly those received before `until`.
    return start, f"({_ms(until)}-0"


def _read_labels(
    client: redis.Redis, stream: str, query: FeedbackQuery, until: float, counts: CollectCounts
) -> dict[str, _Label]:
    """The last label received for each request id in the window (rule 2: corrections)."""
    latest: dict[str, _Label] = {}
    start, end = _window_ids(query.since, until)
    for entry_id, raw in _entries(client, stream, start, end):
        try:
            fields = _fields(raw)
        except UnicodeDecodeError:
            counts.malformed += 1
            continue
        if query.sources and fields.get("source", "") not in query.sources:
            counts.other_sources += 1
            continue
        counts.entries += 1
        request_id, label = fields.get("request_id", ""), fields.get("label", "").strip()
        if not request_id or not label:
            counts.malformed += 1
            continue
        if request_id in latest:
            counts.corrections += 1
        # Entries come oldest first, so the last one written for a request is the one kept.
        latest[request_id] = _Label(request_id, label, _order(entry_id))
    counts.requests = len(latest)
    if counts.malformed:
        log.warning("skipped malformed feedback entries", extra={"count": counts.malformed})
    return latest


def _read_served(
    client: redis.Redis, stream: str, wanted: set[str], start: str, counts: CollectCounts
) -> dict[str, list[_Served]]:
    """Non-shadow inference records of the wanted request ids, newest first per id."""
    found: dict[str, list[_Served]] = {}
    # Up to the stream's end, not `until`: a worker that spooled through a Redis outage appends
    # its records late, after the labels for them may already have arrived.
    for _, raw in _entries(client, stream, start, "+"):
        try:
            fields = _fields(raw)
        except UnicodeDecodeError:
            continue  # an undecodable record cannot give a text; its request counts as not found
        if fields.get("request_id", "") not in wanted or fields.get("error"):
            continue  # not asked for, or a failure record (no answer, no text)
        if fields.get("shadow", "0") == "1":
            counts.shadow_skipped += 1
            continue
        served = _Served(fields.get("model", ""), fields.get("text"))
        found.setdefault(fields["request_id"], []).insert(0, served)
    return found


def _inference_start(since: float | None, lookback_s: float) -> str:
    if since is None:
        return "-"
    return f"{_ms(max(since - lookback_s, 0.0))}-0"


# --------------------------------------------------------------------------- joining


def _text_for(records: list[_Served] | None, model: str, counts: CollectCounts) -> str | None:
    """The logged text of the request's served record under `model` (rule 3), or None."""
    if not records:
        counts.not_found += 1
        return None
    mine = [record for record in records if record.model == model]
    if not mine:
        counts.other_model += 1
        return None
    counts.joined += 1
    # A request normally has one served record; if a replay wrote two, any one with text will do.
    text = next((r.text for r in mine if r.text and r.text.strip()), None)
    if text is None:
        counts.without_text += 1
    return text


def _join(
    labels: Mapping[str, _Label],
    served: Mapping[str, list[_Served]],
    model: str,
    counts: CollectCounts,
) -> list[Example]:
    """One example per identical text, the latest label winning (rule 4); newest first."""
    by_text: dict[str, tuple[_Label, str]] = {}
    for label in sorted(labels.values(), key=lambda item: item.order):
        text = _text_for(served.get(label.request_id), model, counts)
        if text is None:
            continue
        if text in by_text:
            counts.duplicate_texts += 1
        by_text[text] = (label, text)  # ascending receipt order: the last write is the latest
    newest = sorted(by_text.values(), key=lambda pair: pair[0].order, reverse=True)
    return [Example(text, lab.label, lab.request_id, lab.time) for lab, text in newest]


# --------------------------------------------------------------------------- collect


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "the oldest retained feedback"
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _too_few(query: FeedbackQuery, until: float, counts: CollectCounts) -> FailedPrecondition:
    detail = (
        f"{counts.entries} feedback entries, {counts.requests} requests, {counts.joined} joined, "
        f"{counts.without_text} without text (log_text off), {counts.not_found} without a "
        f"served record, {counts.other_model} served by another model, "
        f"{counts.duplicate_texts} repeated texts"
    )
    return FailedPrecondition(
        f"only {counts.usable} labelled requests for model {query.model!r} between "
        f"{_when(query.since)} and {_when(until)}; need {query.min_examples} ({detail}): "
        "lower min_examples or widen the window",
        usable=counts.usable,
        min_examples=query.min_examples,
        counts=asdict(counts),
    )


def collect(
    client: redis.Redis,
    query: FeedbackQuery,
    inference_stream: str = INFERENCE_STREAM,
    feedback_stream: str = FEEDBACK_STREAM,
    *,
    lookback_s: float = DEFAULT_LOOKBACK_S,
    clock: Callable[[], float] = time.time,
) -> FeedbackSet:
    """Labelled production examples for `query` (module docstring: rules 1 to 5).

    `client` is a synchronous redis-py client (training runs in a child process, without a loop).
    Inference records are searched from `lookback_s` before `since` to the end of the stream.
    Raises `FailedPrecondition` when fewer than `query.min_examples` examples are usable.
    """
    if lookback_s < 0:
        raise InvalidInput(f"lookback_s must be >= 0, got {lookback_s}", field="lookback_s")
    until = query.until if query.until is not None else clock()
    counts = CollectCounts()
    labels = _read_labels(client, feedback_stream, query, until, counts)
    start = _inference_start(query.since, lookback_s)
    served = _read_served(client, inference_stream, set(labels), start, counts)
    examples = _join(labels, served, query.model, counts)
    counts.usable = len(examples)
    if counts.usable < query.min_examples:
        raise _too_few(query, until, counts)
    if query.max_examples and len(examples) > query.max_examples:
        counts.cut = len(examples) - query.max_examples
        examples = examples[: query.max_examples]
    return FeedbackSet(examples, counts, query.model, query.since, until)


# --------------------------------------------------------------------------- assemble

Pair = tuple[str, str]


def _base_pairs(base: Dataset | Iterable[Pair]) -> list[Pair]:
    if isinstance(base, Dataset):
        return [(example.text, example.label) for example in base.examples]
    return [(text, label) for text, label in base]


def _feedback_pairs(feedback: FeedbackSet | Sequence[Example]) -> tuple[list[Pair], CollectCounts]:
    """Feedback as (text, label), one per text (latest label), newest first, and its counts."""
    if isinstance(feedback, FeedbackSet):
        # Already one per text and newest first; a copy, so the set's counts stay what it saw.
        return [(e.text, e.label) for e in feedback.examples], replace(feedback.counts)
    examples = list(feedback)
    n = len(examples)  # a hand-made list: every example was found, joined and usable
    counts = CollectCounts(entries=n, requests=n, joined=n, usable=n)
    by_text: dict[str, Example] = {}
    # A hand-made list may repeat texts or be in any order: apply rule 4 and sort newest first.
    for example in sorted(examples, key=lambda e: (e.time, e.request_id)):
        by_text[example.text] = example
    newest = sorted(by_text.values(), key=lambda e: (e.time, e.request_id), reverse=True)
    counts.duplicate_texts = n - len(newest)
    counts.usable = len(newest)
    return [(e.text, e.label) for e in newest], counts


def _check_labels(base: Sequence[Pair], feedback: Sequence[Pair]) -> None:
    known = {label for _, label in base}
    if not known:
        return
    stray = Counter(label for _, label in feedback if label not in known)
    if stray:
        listed = ", ".join(f"{label!r} ({n} examples)" for label, n in sorted(stray.items()))
        raise FailedPrecondition(
            f"feedback labels not in the base data: {listed}; the base data has "
            f"{', '.join(sorted(known))}: add those classes to the base files or drop the feedback",
            unknown_labels=sorted(stray),
            base_labels=sorted(known),
        )


def _unique_base(base: Sequence[Pair], feedback_texts: set[str]) -> list[Pair]:
    """Base pairs whose text is new: not in the feedback (its label wins), not seen before."""
    seen = set(feedback_texts)
    kept: list[Pair] = []
    for text, label in base:
        if text not in seen:
            seen.add(text)
            kept.append((text, label))
    return kept


def _sample(pairs: list[Pair], k: int, rng: random.Random) -> list[Pair]:
    """`k` of `pairs` drawn with `rng`, in their original order."""
    if k >= len(pairs):
        return pairs
    return [pairs[i] for i in sorted(rng.sample(range(len(pairs)), k))]


def _mix(
    feedback: list[Pair], base: list[Pair], ratio: float, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """(feedback used, base used) so that feedback is `ratio` of the total (rule 3)."""
    if ratio == 0 or not base:
        return feedback, base
    if ratio == 1:
        return feedback, []
    rng = random.Random(seed)
    want_base = round(len(feedback) * (1 - ratio) / ratio)
    if want_base <= len(base):
        return feedback, _sample(base, want_base, rng)
    want_feedback = round(len(base) * ratio / (1 - ratio))
    return _sample(feedback, want_feedback, rng), base


def _check_classes(labels: Sequence[str], feedback_used: int, base_used: int) -> None:
    classes = Counter(labels)
    if len(classes) >= 2:
        return
    found = ", ".join(f"{label!r} ({n} examples)" for label, n in classes.items()) or "none"
    raise FailedPrecondition(
        f"the assembled training set has {len(classes)} class(es): {found} from {feedback_used} "
        f"feedback and {base_used} base examples; a classifier needs at least 2: widen the "
        "feedback window, change mix_ratio or add base data",
        classes=dict(classes),
    )


def fingerprint_pairs(texts: Sequence[str], labels: Sequence[str]) -> str:
    """sha256 over the sorted (text, label) pairs: the same set gives it in any order."""
    digest = hashlib.sha256()
    for text, label in sorted(zip(texts, labels, strict=True)):
        # Unit/record separators cannot be confused with the content of ordinary text.
        digest.update(text.encode("utf-8") + b"\x1f" + label.encode("utf-8") + b"\x1e")
    return digest.hexdigest()


def _shares(labels: Sequence[str]) -> dict[str, float]:
    counts = Counter(labels)
    return {label: round(counts[label] / len(labels), 6) for label in sorted(counts)}


def assemble(
    base: Dataset | Iterable[Pair],
    feedback: FeedbackSet | Sequence[Example],
    mix_ratio: float,
    seed: int,
) -> tuple[list[str], list[str], AssemblyReport]:
    """The training set from base data and feedback (module docstring, assemble rules 1 to 4).

    Returns texts and labels (the used feedback, newest first, then the used base in file order)
    and the report. Raises `FailedPrecondition` for labels the base lacks and for a single class.
    """
    if not 0 <= mix_ratio <= 1:
        raise InvalidInput(f"mix_ratio must lie in [0, 1], got {mix_ratio}", field="mix_ratio")
    base_all = _base_pairs(base)
    fb_pairs, counts = _feedback_pairs(feedback)
    _check_labels(base_all, fb_pairs)
    base_unique = _unique_base(base_all, {text for text, _ in fb_pairs})
    fb_used, base_used = _mix(fb_pairs, base_unique, mix_ratio, seed)
    texts = [text for text, _ in fb_used] + [text for text, _ in base_used]
    labels = [label for _, label in fb_used] + [label for _, label in base_used]
    _check_classes(labels, len(fb_used), len(base_used))
    report = AssemblyReport(
        size=len(texts),
        fingerprint=fingerprint_pairs(texts, labels),
        label_shares=_shares(labels),
        mix_ratio=mix_ratio,
        seed=seed,
        feedback_found=counts.entries,
        feedback_joined=counts.joined,
        feedback_without_text=counts.without_text,
        feedback_duplicates=counts.duplicates,
        feedback_usable=len(fb_pairs),
        feedback_used=len(fb_used),
        base_total=len(base_all),
        base_duplicates=len(base_all) - len(base_unique),
        base_used=len(base_used),
        counts=counts,
    )
    return texts, labels, report


def write_jsonl(path: Path | str, texts: Sequence[str], labels: Sequence[str]) -> Path:
    """Write {"text", "label"} lines for the file-based pipeline; atomic (a temp file renamed)."""
    path = Path(path)
    if len(texts) != len(labels):
        raise InvalidInput(f"{len(texts)} texts but {len(labels)} labels")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for text, label in zip(texts, labels, strict=True):
            out.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
