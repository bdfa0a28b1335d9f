"""Timestamps on the wire: UTC, RFC 3339, millisecond precision, `Z` suffix.

RFC 3339 has four-digit years. A stored date outside 0000-9999 (MongoDB keeps any int64 of
milliseconds) is written as JavaScript's `toISOString` writes it, ISO 8601's expanded years:
a sign and six digits (`+010000-01-01T00:00:00.000Z`, `-000001-...`), which `new Date()` reads.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

# (second, its formatted date and time): one tuple, so that a thread reading it never pairs
# one second with another's text.
_last: tuple[int | None, str] = (None, "")
# ".000Z" ... ".999Z": appending one is several times cheaper than formatting it.
_MILLIS = tuple(f".{i:03d}Z" for i in range(1000))


# strftime's %Y pads only from year 1000 on (glibc): earlier or later dates take iso_ms_civil.
_STRFTIME_MIN_MS = -30610224000000  # 1000-01-01T00:00:00.000Z
MAX_RFC3339_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
MIN_RFC3339_MS = -62167219200000  # 0000-01-01T00:00:00.000Z


def iso_ms(epoch_ms: int) -> str:
    """2024-01-15T10:00:00.000Z for milliseconds since the Unix epoch."""
    global _last
    epoch_ms = int(epoch_ms)
    if not _STRFTIME_MIN_MS <= epoch_ms <= MAX_RFC3339_MS:
        return iso_ms_civil(epoch_ms)
    seconds, ms = divmod(epoch_ms, 1000)
    last = _last
    # Events come many per second: format the date and time once per second.
    if last[0] != seconds:
        last = _last = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return last[1] + _MILLIS[ms]


def iso_ms_civil(epoch_ms: int) -> str:
    """iso_ms for any int64 of milliseconds (proleptic Gregorian calendar, Howard Hinnant's
    days-to-civil), with expanded years outside 0000-9999."""
    seconds, ms = divmod(int(epoch_ms), 1000)
    days, sod = divmod(seconds, 86400)
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    text = f"{year:04d}" if 0 <= year <= 9999 else f"{'+' if year > 0 else '-'}{abs(year):06d}"
    return f"{text}-{month:02d}-{day:02d}T{sod // 3600:02d}:{sod % 3600 // 60:02d}:{sod % 60:02d}.{ms:03d}Z"


def iso_datetime(value: datetime) -> str:
    """RFC 3339 with milliseconds and Z for an aware or naive-UTC datetime."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def now_ms() -> int:
    return time.time_ns() // 1_000_000
