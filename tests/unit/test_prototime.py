"""Times from requests: out-of-range protobuf values are the caller's error, naming the field."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from loopline import prototime
from loopline.errors import InvalidInput


def test_valid_values_convert() -> None:
    stamp = Timestamp(seconds=1_700_000_000, nanos=500_000_000)
    assert prototime.seconds(stamp, "t") == 1.7e9 + 0.5
    assert prototime.seconds(Duration(seconds=-3, nanos=-250_000_000), "d") == -3.25
    assert prototime.utc(Timestamp(seconds=0), "t") == datetime(1970, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "value",
    [
        Timestamp(seconds=2**40),  # past the year 9999
        Timestamp(seconds=-62135596801),  # before the year 1
        Duration(seconds=1, nanos=-1),  # signs disagree
        Duration(seconds=400_000_000_000),  # over 10,000 years
    ],
)
def test_out_of_range_values_are_invalid_input_naming_the_field(
    value: Timestamp | Duration,
) -> None:
    with pytest.raises(InvalidInput) as caught:
        prototime.seconds(value, "window.last")
    assert caught.value.message.startswith("window.last: ")
    assert caught.value.details == {"field": "window.last"}
    if isinstance(value, Timestamp):
        with pytest.raises(InvalidInput):
            prototime.utc(value, "since")


def test_an_optional_field_is_none_when_unset_and_checked_when_set() -> None:
    from loopline.v1 import common_pb2 as common

    window = common.TimeWindow()
    assert prototime.optional_seconds(window, "start_time", "window.start_time") is None
    window.start_time.seconds = 60
    assert prototime.optional_seconds(window, "start_time", "window.start_time") == 60.0
    window.last.seconds, window.last.nanos = 1, -1
    with pytest.raises(InvalidInput, match=r"^window\.last: "):
        prototime.optional_seconds(window, "last", "window.last")
