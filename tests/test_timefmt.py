"""Timestamps on the wire (rtcore.timefmt): RFC 3339, UTC, milliseconds, `Z`; iso_ms formats
the date and time once per second, so consecutive calls must still each be exact."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from rtcore.timefmt import iso_datetime, iso_ms


def _expected(epoch_ms: int) -> str:
    t = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=epoch_ms)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def test_fixed_points():
    assert iso_ms(1705312800123) == "2024-01-15T10:00:00.123Z"
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_ms(-1) == "1969-12-31T23:59:59.999Z"
    assert iso_ms(1705312800999) == "2024-01-15T10:00:00.999Z"
    assert iso_ms(1705312801000) == "2024-01-15T10:00:01.000Z"


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
