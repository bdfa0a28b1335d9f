"""Shifts this process's wall clock by TEST_GATEWAY_CLOCK_OFFSET seconds (a test gateway's).

A gateway started with this folder on its PYTHONPATH (tests.harness.fixtures_gateway
`clock_offset`) reads `time.time()` and `datetime.now()` that many seconds off; its monotonic
clock is untouched. With the gateway and the token issuer 400 s behind, the clients under test
see the world as a device whose own clock is 400 s fast sees it: the tokens the gateway accepts
look expired to them. Loaded at interpreter start-up, before any module binds the clock.
"""

import datetime as _datetime
import os
import time as _time

_OFFSET = float(os.environ.get("TEST_GATEWAY_CLOCK_OFFSET") or 0)

if _OFFSET:
    _real_time = _time.time
    _real_time_ns = _time.time_ns

    def _time_shifted() -> float:
        return _real_time() + _OFFSET

    def _time_ns_shifted() -> int:
        return _real_time_ns() + int(_OFFSET * 1e9)

    _time.time = _time_shifted
    _time.time_ns = _time_ns_shifted

    class _ShiftedDatetime(_datetime.datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206 - the signature of datetime.now
            return cls.fromtimestamp(_time_shifted(), tz)

        @classmethod
        def utcnow(cls):  # noqa: ANN206
            return cls.now(_datetime.UTC).replace(tzinfo=None)

    _datetime.datetime = _ShiftedDatetime  # `from datetime import datetime` (PyJWT) gets this one
