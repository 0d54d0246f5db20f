"""Times and durations read from requests. A protobuf Timestamp or Duration outside its range
(a year past 9999, seconds and nanos of opposite signs) is the caller's mistake: InvalidInput
naming the field, where the protobuf conversion would raise ValueError and answer INTERNAL."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from loopline.errors import InvalidInput

_MAX_DURATION_SECONDS = 315_576_000_000  # the Duration type's range: 10,000 years either way


def seconds(value: Timestamp | Duration, field: str) -> float:
    """A Timestamp as seconds since the epoch, or a Duration in seconds."""
    if isinstance(value, Duration):
        # Duration's conversions do not check its range (Timestamp's do).
        s, n = value.seconds, value.nanos
        if abs(s) > _MAX_DURATION_SECONDS or abs(n) > 999_999_999 or s * n < 0:
            raise InvalidInput(
                f"{field}: not a valid Duration (seconds {s}, nanos {n}): at most 10,000 years, "
                "with seconds and nanos of the same sign",
                field=field,
            )
    try:
        return value.ToNanoseconds() / 1e9
    except ValueError as err:
        raise InvalidInput(f"{field}: {err}", field=field) from None


def optional_seconds(message: Message, name: str, field: str) -> float | None:
    """`message.<name>` (a Timestamp or Duration) in seconds, or None when it is not set;
    `field` names it in the error."""
    return seconds(getattr(message, name), field) if message.HasField(name) else None


def utc(stamp: Timestamp, field: str) -> datetime:
    """A Timestamp as an aware UTC datetime."""
    seconds(stamp, field)  # validates
    return stamp.ToDatetime(tzinfo=UTC)
