"""PROTOCOL.md §5: seq increases per workspace, also across restarts. With the memory bus seq
is a clock reading; a restart after the wall clock stepped back must not hand out positions
below those of the previous run (rtserver/seq_reservation.py)."""

from __future__ import annotations

import os

from rtserver.app import Gateway
from rtserver.history import now_us
from rtserver.seq_reservation import AHEAD_US
from tests.harness.wsclient import ws_connect
from tests.test_churn import Addr, Publisher, _cfg, _token


async def test_positions_stay_above_the_previous_run_when_the_clock_stepped_back(tmp_path):
    # What the state directory looks like when the previous run handed out positions an hour
    # ahead of this clock (the clock was stepped back an hour between the runs).
    previous = now_us() + 3600 * 10**6
    (tmp_path / "seq-reservation").write_text(f"{previous}\n")
    gw = Gateway(_cfg(tmp_path))
    await gw.start()
    pub = Publisher(gw.port)

    addr = Addr(gw)

    try:
        # Reserved durably before the first position: a crash now still restarts above it.
        assert int((tmp_path / "seq-reservation").read_text()) >= previous + AHEAD_US
        first = await pub.publish("w1", "t", {"i": 0})
        second = await pub.publish("w1", "t", {"i": 1})
        assert previous < first < second
        async with ws_connect(addr, "w1", token=_token(["w1"], "u")) as c:
            # A reader of the previous run (its last position just below `previous`) may have
            # missed events: history_gap, then what this run holds. Before, with no gap and
            # every new seq below its `since`, it was sent nothing.
            await c.send({"type": "subscribe", "channel": "events:t", "since": previous - 1})
            await c.recv_type("subscribed")
            gap = await c.recv_type("error")
            assert gap["code"] == 4011
            assert [(await c.recv_event())["seq"] for _ in range(2)] == [first, second]
        # The sweeper renews the reservation past the highest position handed out (here still
        # ahead of the clock) once it comes near.
        gw._seq.reserved = second  # as if positions had run up to the reservation
        await gw._sweep_once()
        await gw._seq._writing
        assert int((tmp_path / "seq-reservation").read_text()) == gw._seq.reserved >= second + AHEAD_US
    finally:
        await pub.close()
        await gw.shutdown()
    # The next run starts above this one's positions too.
    again = Gateway(_cfg(tmp_path))
    await again.start()
    pub = Publisher(again.port)
    try:
        assert await pub.publish("w1", "t", {"i": 2}) > second
    finally:
        await pub.close()
        await again.shutdown()
    assert oct(os.stat(tmp_path / "seq-reservation").st_mode & 0o777) == "0o600"


async def test_a_quick_clean_restart_neither_warns_nor_runs_ahead_of_the_clock(tmp_path, caplog):
    """The file held the reservation (30 s ahead of the clock) after a clean stop too: every
    restart within 30 s logged the WARNING "the clock is behind positions handed out before"
    (only reserved, never handed out) and started its positions up to 30 s ahead of the clock,
    each quick restart further ahead. A clean stop now leaves the highest position it handed
    out; only a crash leaves the reservation."""
    gw = Gateway(_cfg(tmp_path))
    await gw.start()
    pub = Publisher(gw.port)
    try:
        last = await pub.publish("w1", "t", {"i": 0})
    finally:
        await pub.close()
        await gw.shutdown()
    assert last <= int((tmp_path / "seq-reservation").read_text()) <= now_us()
    caplog.clear()
    again = Gateway(_cfg(tmp_path))
    await again.start()
    pub = Publisher(again.port)
    try:
        seq = await pub.publish("w1", "t", {"i": 1})
        assert last < seq <= now_us()
    finally:
        await pub.close()
        await again.shutdown()
    assert not [r for r in caplog.records if "clock is behind" in r.getMessage()]


async def test_a_clean_stop_without_positions_keeps_the_previous_runs_floor(tmp_path):
    """A run started while the clock was behind the previous run's positions, and stopped
    before handing out one of its own, replaced the file with the clock's reading: the next run
    then started below positions clients had been given (a reader resuming from one was told
    of no gap and sent nothing until the clock caught up). The stop now leaves the floor."""
    previous = now_us() + 3600 * 10**6  # the clock stepped back an hour since the previous run
    (tmp_path / "seq-reservation").write_text(f"{previous}\n")
    gw = Gateway(_cfg(tmp_path))
    await gw.start()
    await gw.shutdown()
    assert int((tmp_path / "seq-reservation").read_text()) >= previous
    again = Gateway(_cfg(tmp_path))
    await again.start()
    pub = Publisher(again.port)
    try:
        assert await pub.publish("w1", "t", {"i": 0}) > previous
    finally:
        await pub.close()
        await again.shutdown()


async def test_a_position_shown_before_any_event_stays_below_the_next_runs_seqs(tmp_path):
    """A run whose histories start above the clock (the previous run crashed with its 30 s
    reservation, or the clock stepped back) shows clients that position in `subscribed` and
    `pong` before any event. Its clean stop left the highest *event* position (or the clock)
    instead: with no event, a value below what clients had seen, so the next run handed out
    seqs below it and a client resuming from its last position (since) got neither the events
    nor a history_gap."""
    ahead = now_us() + 3600 * 10**6
    (tmp_path / "seq-reservation").write_text(f"{ahead}\n")
    # The session must outlive a stop and a start (test_churn's 0.3 s did not on a busy machine).
    gw = Gateway(_cfg(tmp_path, RT_RESUME_TTL="60"))
    await gw.start()
    token = _token(["w1"], "u")
    try:
        async with ws_connect(Addr(gw), "w1", token=token) as c:
            shown = (await c.subscribe("events:t"))["seq"]  # the stream position: no event yet
            assert shown >= ahead
            await c.send({"type": "ping"})
            assert (await c.recv_type("pong"))["seq"] == shown
            await c.send({"type": "auth", "token": token})
            session = (await c.recv_type("auth_ok"))["sessionId"]
    finally:
        await gw.shutdown()
    again = Gateway(_cfg(tmp_path, RT_RESUME_TTL="60"))
    await again.start()
    pub = Publisher(again.port)
    try:
        seq = await pub.publish("w1", "t", {"after": "restart"})
        assert seq > shown, "seq must stay above every position a client was shown"
        async with ws_connect(Addr(again), "w1") as c:
            ok = await c.auth(token, resume=session, since=shown)
            assert ok["resumed"] is True
            assert (await c.recv_event())["seq"] == seq
    finally:
        await pub.close()
        await again.shutdown()
