"""Positions stay increasing across restarts, even when the wall clock has stepped back.

With the memory bus, `seq` comes from a hybrid logical clock (rtserver.history): the wall
clock in microseconds, or one more than the last. A process restarted after the clock stepped
back (a VM restored, NTP correcting a clock that ran ahead) would start below positions it
had already handed out: a client resuming from one of those would be told of no gap and be
sent nothing until the clock caught up (PROTOCOL.md §5: seq increases across restarts).

So the gateway reserves positions ahead (30 s of clock) and keeps the reservation in
`<state_dir>/seq-reservation`: written before the first position is handed out, renewed off
the event loop well before the clock (or the highest position handed out) reaches it, and a
new process starts every history above it. A clean stop replaces it with the highest position
the run handed out (close()): a restart within 30 s would otherwise start that far ahead of the
clock, and warn of a clock behind positions that were only reserved.
"""

from __future__ import annotations

import asyncio
import logging
import os

from rtserver.atomic_file import replace_file

log = logging.getLogger("rtserver.seq_reservation")

AHEAD_US = 30_000_000  # how far ahead of the clock positions are reserved
RENEW_US = 20_000_000  # renewed when the clock is less than this from the reservation


class SeqReservation:
    def __init__(self, path: str):
        self.path = path
        self.reserved = 0  # no position beyond this has been handed out (this run or before)
        self.floor = 0  # every position of this run is above this one (start()'s answer)
        self._writing: asyncio.Future | None = None

    async def start(self, now_us: int) -> int:
        """Before the first position is handed out: read the previous run's reservation and
        reserve past it, durably. Returns the position every history must start above."""
        loop = asyncio.get_running_loop()
        previous = await loop.run_in_executor(None, self._read)
        base = max(now_us, previous)
        if previous > now_us:
            log.warning("the clock is behind positions handed out before: positions continue from there",
                        extra={"fields": {"behind_s": round((previous - now_us) / 1e6, 3), "path": self.path}})
        await loop.run_in_executor(None, self._write, base + AHEAD_US)
        self.reserved = base + AHEAD_US
        self.floor = base
        return base

    def _read(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                return int(fh.read().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            log.warning("unreadable seq reservation ignored", extra={"fields": {"path": self.path}})
            return 0

    def renew(self, high_us: int) -> None:
        """Reserve AHEAD_US past `high_us` (the clock, or the highest position handed out if
        that is ahead) when it comes within RENEW_US of the reservation; the sweeper calls this
        every second. The file is written off the loop."""
        if high_us + RENEW_US <= self.reserved or (self._writing is not None and not self._writing.done()):
            return
        value = high_us + AHEAD_US
        self._writing = asyncio.get_running_loop().run_in_executor(None, self._write, value)
        self._writing.add_done_callback(lambda fut: self._written(fut, value))

    async def close(self, high_us: int) -> None:
        """At a clean stop, once no position is handed out any more: leave `high_us` (at least
        the highest one handed out), or the previous run's positions if this one stayed below
        them (nothing published while the clock was behind), instead of the reservation."""
        if self._writing is not None and not self._writing.done():
            await asyncio.wait({self._writing})  # a renewal must not land after this
        value = max(high_us, self.floor)
        await asyncio.get_running_loop().run_in_executor(None, self._write, value)
        self.reserved = value

    def _write(self, value: int) -> None:
        replace_file(self.path, b"%d\n" % value)

    def _written(self, fut: asyncio.Future, value: int) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.error("seq reservation not saved: %s", exc, extra={"fields": {"path": self.path}})
            return
        self.reserved = max(self.reserved, value)


def reservation_path(state_dir: str) -> str:
    return os.path.join(state_dir, "seq-reservation")
