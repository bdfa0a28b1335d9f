"""Timestamps on the wire (rtcore.timefmt): RFC 3339, UTC, milliseconds, `Z`; iso_ms formats
the date and time once per second, so consecutive calls must still each be exact."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from rtcore.timefmt import iso_datetime, iso_ms, iso_ms_civil


def _expected(epoch_ms: int) -> str:
    t = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=epoch_ms)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def test_fixed_points():
    assert iso_ms(1705312800123) == "2024-01-15T10:00:00.123Z"
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_ms(-1) == "1969-12-31T23:59:59.999Z"
    assert iso_ms(1705312800999) == "2024-01-15T10:00:00.999Z"
    assert iso_ms(1705312801000) == "2024-01-15T10:00:01.000Z"
    # Years outside RFC 3339's four digits: expanded, as JavaScript's toISOString writes them.
    assert iso_ms(-30610224000001) == "0999-12-31T23:59:59.999Z"  # strftime would not pad it
    assert iso_ms(-62167219200000) == "0000-01-01T00:00:00.000Z"
    assert iso_ms(-62167219200001) == "-000001-12-31T23:59:59.999Z"
    assert iso_ms(253402300800000) == "+010000-01-01T00:00:00.000Z"
    assert iso_ms(8640000000000000) == "+275760-09-13T00:00:00.000Z"
    assert iso_ms(-8640000000000000) == "-271821-04-20T00:00:00.000Z"


@given(st.integers(-62135596800000, 253402300799999))
def test_civil_formatter_agrees_with_datetime_over_its_range(value):
    # years 1..9999, where datetime can check it
    t = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=value)
    expected = f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}." \
               f"{t.microsecond // 1000:03d}Z"
    assert iso_ms(value) == iso_ms_civil(value) == expected


@given(st.lists(st.integers(-10**12, 4 * 10**12), min_size=1, max_size=20))
def test_any_sequence_of_calls_gives_each_its_own_second(values):
    # the once-per-second cache must never lend one second's text to another
    for value in values + sorted(values) + [v + 1 for v in values]:
        assert iso_ms(value) == _expected(value)


def test_now_and_datetimes():
    now = time.time_ns() // 1_000_000
    assert iso_ms(now) == _expected(now)
    aware = datetime(2024, 1, 15, 12, 0, 0, 250_000, tzinfo=timezone(timedelta(hours=2)))
    assert iso_datetime(aware) == "2024-01-15T10:00:00.250Z"
