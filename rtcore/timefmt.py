"""Timestamps on the wire: UTC, RFC 3339, millisecond precision, `Z` suffix."""

from __future__ import annotations

import time
from datetime import UTC, datetime

# (second, its formatted date and time): one tuple, so that a thread reading it never pairs
# one second with another's text.
_last: tuple[int | None, str] = (None, "")
# ".000Z" ... ".999Z": appending one is several times cheaper than formatting it.
_MILLIS = tuple(f".{i:03d}Z" for i in range(1000))


def iso_ms(epoch_ms: int) -> str:
    """2024-01-15T10:00:00.000Z for milliseconds since the Unix epoch."""
    global _last
    seconds, ms = divmod(int(epoch_ms), 1000)
    last = _last
    # Events come many per second: format the date and time once per second.
    if last[0] != seconds:
        last = _last = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return last[1] + _MILLIS[ms]


def iso_datetime(value: datetime) -> str:
    """RFC 3339 with milliseconds and Z for an aware or naive-UTC datetime."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def now_ms() -> int:
    return time.time_ns() // 1_000_000
