"""What the monitor reads: predictions and failures (inference records) and labels (feedback),
parsed from raw stream fields.

The monitor never imports the inference or router services; the field layout below is the
contract of the two streams (`loopline:inference`, written by `InferenceRecord.to_fields`, and
`loopline:feedback`, written by the router's feedback store).

Parsing is tolerant in two steps. A record without what the monitor cannot do without (a
request id, a model, a version, a label) raises `MalformedRecordError`: the consumer counts it,
logs its kind once, and acknowledges it, so one bad producer never wedges the group. An optional
field that is missing is simply `None`; one that is present but unreadable is also `None`, and
its name is listed in `Prediction.problems` so that the producer's bug is reported without losing
the request.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SKETCH_DIM",
    "Failure",
    "Label",
    "MalformedRecordError",
    "Prediction",
    "entry_time",
    "is_failure",
    "parse_failure",
    "parse_label",
    "parse_prediction",
]

SKETCH_DIM = 16
# A compact JSON list of SKETCH_DIM finite numbers. Checking the shape with one regex is several
# times cheaper than converting 16 floats, and this runs for every record.
_NUMBER = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_COMPACT_SKETCH = re.compile(rf"\[(?:{_NUMBER},){{{SKETCH_DIM - 1}}}{_NUMBER}\]")
_TRUE = frozenset({"1", "true", "True", "yes"})

RawFields = Mapping[str, str] | Mapping[bytes, bytes] | Mapping[str, bytes] | Mapping[bytes, str]


class MalformedRecordError(ValueError):
    """A stream entry the monitor cannot fold; `kind` is a short, bounded label for metrics."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Prediction:
    """One classified text, as the monitor folds it (the served answer or a shadow's)."""

    request_id: str
    time: float  # unix seconds; the stream entry's time when the record has none
    model: str
    version: str
    label: str
    experiment: str = ""
    variant: str = ""
    shadow: bool = False
    confidence: float | None = None  # the top probability
    latency_ms: float | None = None  # queue_ms + compute_ms (the parts that are present)
    token_count: int | None = None
    unknown_share: float | None = None
    truncated: bool = False
    sketch: str | None = None  # the 16 sketch floats as "a,b,...": kept as text for the sample
    language: str = ""
    problems: tuple[str, ...] = ()  # optional fields present but unreadable


@dataclass(frozen=True, slots=True)
class Failure:
    """A text a worker accepted and could not answer (a record with an `error` field)."""

    request_id: str
    time: float
    model: str
    version: str
    error: str  # the failure's kind: overloaded, deadline, not_ready, internal
    experiment: str = ""
    variant: str = ""
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class Label:
    """A true label for a request, from feedback; it may arrive hours after the prediction."""

    request_id: str
    label: str
    time: float
    user_id: str = ""
    source: str = ""


def entry_time(entry_id: str) -> float:
    """Seconds since the epoch at which Redis appended `entry_id` ("<ms>-<seq>")."""
    return int(entry_id.split("-", 1)[0]) / 1000.0


def parse_prediction(entry_id: str, raw: RawFields) -> Prediction:
    """A `Prediction` from inference-record fields; raises `MalformedRecordError`."""
    f = _decoded(raw)
    problems: list[str] = []
    confidence = _confidence(f.get("probabilities"), problems)
    return Prediction(
        **_tags(f, entry_id, "inference", problems),
        label=_required(f, "label", "inference"),
        confidence=confidence,
        latency_ms=_latency(f.get("queue_ms"), f.get("compute_ms"), problems),
        token_count=_count(f.get("token_count"), "token_count", problems),
        unknown_share=_share(f.get("unknown_share"), problems),
        truncated=f.get("truncated", "0") in _TRUE,
        sketch=_sketch(f.get("sketch"), problems),
        language=f.get("language", ""),
        problems=tuple(problems),
    )


def is_failure(fields: Mapping[str, str]) -> bool:
    """Whether decoded inference-stream fields record a failure rather than an answer."""
    return bool(fields.get("error"))


def parse_failure(entry_id: str, raw: RawFields) -> Failure:
    """A `Failure` from the fields of a failed text's record; raises `MalformedRecordError`."""
    f = _decoded(raw)
    return Failure(**_tags(f, entry_id, "failure", []), error=_required(f, "error", "failure"))


def _tags(f: Mapping[str, str], entry_id: str, kind: str, problems: list[str]) -> dict[str, Any]:
    """The fields an answer's and a failure's record share (`TextTags` in the worker's
    records.py) that the monitor reads."""
    return {
        "request_id": _required(f, "request_id", kind),
        "time": _time(f.get("time"), entry_id, problems),
        "model": _required(f, "model", kind),
        "version": _required(f, "version", kind),
        "experiment": f.get("experiment", ""),
        "variant": f.get("variant", ""),
        "shadow": f.get("shadow", "0") in _TRUE,
    }


def parse_label(entry_id: str, raw: RawFields) -> Label:
    """A `Label` from feedback fields; raises `MalformedRecordError`."""
    f = _decoded(raw)
    problems: list[str] = []
    when = f.get("time") or f.get("received")
    return Label(
        request_id=_required(f, "request_id", "feedback"),
        label=_required(f, "label", "feedback"),
        time=_time(when, entry_id, problems),
        user_id=f.get("user_id", ""),
        source=f.get("source", ""),
    )


# ----- field readers (each appends the field's name to `problems` when it is unreadable)


def _decoded(raw: RawFields) -> Mapping[str, str]:
    types = set(map(type, raw.values()))
    types.update(map(type, raw))
    if types == {str}:  # what the consumer passes: no copy
        return raw  # type: ignore[return-value]
    out: dict[str, str] = {}
    for key, value in raw.items():
        k = key.decode() if isinstance(key, bytes) else key
        out[k] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return out


def _required(f: Mapping[str, str], name: str, stream: str) -> str:
    value = f.get(name, "")
    if not value:
        raise MalformedRecordError(f"{stream}.missing_{name}", f"no {name!r} field")
    return value


def _float(text: str | None, name: str, problems: list[str]) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        problems.append(name)
        return None
    if not math.isfinite(value):
        problems.append(name)
        return None
    return value


def _time(text: str | None, entry_id: str, problems: list[str]) -> float:
    value = _float(text, "time", problems)
    if value is not None and value > 0:
        return value
    try:
        return entry_time(entry_id)
    except ValueError as err:
        raise MalformedRecordError("bad_entry_id", f"entry id {entry_id!r}") from err


def _confidence(text: str | None, problems: list[str]) -> float | None:
    values = _floats(text)
    if values is None:
        if text:
            problems.append("probabilities")
        return None
    top = max(values)
    if not 0.0 <= top <= 1.0:
        problems.append("probabilities")
        return None
    return top


def _latency(queue: str | None, compute: str | None, problems: list[str]) -> float | None:
    parts = [_float(queue, "queue_ms", problems), _float(compute, "compute_ms", problems)]
    present = [p for p in parts if p is not None and p >= 0]
    return sum(present) if present else None


def _count(text: str | None, name: str, problems: list[str]) -> int | None:
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        problems.append(name)
        return None
    if value < 0:
        problems.append(name)
        return None
    return value


def _share(text: str | None, problems: list[str]) -> float | None:
    value = _float(text, "unknown_share", problems)
    if value is not None and not 0.0 <= value <= 1.0:
        problems.append("unknown_share")
        return None
    return value


def _sketch(text: str | None, problems: list[str]) -> str | None:
    if not text:
        return None
    if _COMPACT_SKETCH.fullmatch(text):  # what the producer writes: its body is the sample's CSV
        return text[1:-1]
    values = _floats(text)  # spaces, exponents without digits...: parse and write it anew
    if values is None or len(values) != SKETCH_DIM:
        problems.append("sketch")
        return None
    return ",".join(map(repr, values))


def _floats(text: str | None) -> list[float] | None:
    """A non-empty JSON list of finite numbers, or None.

    Split by hand rather than json.loads: the lists are flat, and this is the hot path (every
    record has two).
    """
    if not text:
        return None
    body = text.strip()
    if len(body) < 3 or body[0] != "[" or body[-1] != "]":
        return None
    try:
        values = [float(v) for v in body[1:-1].split(",")]
    except ValueError:
        return None
    return values if all(map(math.isfinite, values)) else None
