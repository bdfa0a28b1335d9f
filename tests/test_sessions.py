"""Sessions (rtserver/sessions.py): the bound on suspended sessions shared by the workspaces, and
dump / restore, what a drained shutdown hands to the next start (end to end:
tests/test_resume.py::test_sessions_survive_a_drained_restart)."""

from __future__ import annotations

import asyncio
import os
import stat
import time

import msgspec

from rtserver import channels
from rtserver.sessions import Sessions, drop_dump, read_dump, write_dump


def _suspended(sessions: Sessions, sid: str, channel: str, filter_: dict | None, last_seq: int) -> None:
    s = sessions.new("alice", "w1")
    s.id = sid
    spec = channels.parse(channel, filter_)
    s.specs[spec.channel] = spec
    sessions.suspend(s, last_seq)


def test_dump_and_restore_keep_subscriptions_order_and_remaining_time():
    before = Sessions(ttl=100, max_suspended=10)
    _suspended(before, "old", "events:a", None, 5)
    suspended = time.monotonic()
    _suspended(before, "new", "postgres:products", {"predicates": {"price": {"$gte": 10}}}, 7)
    before._suspended["old"].suspended_at -= 60  # 40 s left
    data = before.dump()

    after = Sessions(ttl=100, max_suspended=10)
    assert after.restore(data) == 2
    assert list(after._suspended) == ["old", "new"]  # oldest first, as sweep expects
    old = after.take("old", "alice", "w1")
    assert old is not None and old.last_seq == 5 and list(old.specs) == ["events:a"]
    new = after._suspended["new"]
    assert new.specs["postgres:products"].predicates == {"price": {"$gte": 10}}
    # Less than 1 s lost, beyond the time since it was suspended (a loaded machine's pause
    # in between made a fixed 99 s bound fail).
    elapsed = time.monotonic() - suspended
    left = new.suspended_at + after.ttl - time.monotonic()
    assert 99 - elapsed < left <= 100, (left, elapsed)
    assert after.take("new", "mallory", "w1") is None  # still only its subject's


def test_restore_skips_expired_and_clamps_to_the_new_ttl():
    before = Sessions(ttl=100, max_suspended=10)
    _suspended(before, "gone", "events:a", None, 1)
    _suspended(before, "kept", "events:b", None, 2)
    before._suspended["gone"].suspended_at -= 101
    doc = msgspec.json.decode(before.dump())
    assert [r["id"] for r in doc["sessions"]] == ["kept"]  # dump sweeps first
    doc["sessions"].append({**doc["sessions"][0], "id": "late", "expiresAt": time.time() - 1})
    after = Sessions(ttl=10, max_suspended=10)  # restarted with a shorter resume_ttl
    assert after.restore(msgspec.json.encode(doc)) == 1
    kept = after._suspended["kept"]
    assert kept.suspended_at + after.ttl - time.monotonic() <= 10


def test_unreadable_dump_restores_nothing():
    sessions = Sessions(ttl=100, max_suspended=10)
    for data in (b"not json", b'{"version": 99, "sessions": []}', b'{"version": 1}',
                 b'{"version":1,"sessions":[{"id":"x"}]}'):
        assert sessions.restore(data) == 0
    assert len(sessions) == 0


def test_a_session_this_version_cannot_read_is_left_out_alone(caplog):
    """One session whose channel this version refuses (a dump of an older version with looser
    rules, a file edited by hand) made the whole restore log "not restored" and return 0,
    while the sessions before it in the file had been taken back: the log and the count were
    wrong, and the ones after it were lost. Only that session is left out now."""
    before = Sessions(ttl=100, max_suspended=10)
    for sid in ("a", "b", "c"):
        _suspended(before, sid, f"events:{sid}", None, 1)
    doc = msgspec.json.decode(before.dump())
    doc["sessions"][1]["subscriptions"][0]["channel"] = "bogus:b"  # a kind this version has not
    after = Sessions(ttl=100, max_suspended=10)
    assert after.restore(msgspec.json.encode(doc)) == 2
    assert sorted(after._suspended) == ["a", "c"]
    (rec,) = [r for r in caplog.records if "not restored" in r.getMessage()]
    assert (rec.fields["sessions"], rec.fields["restored"]) == (1, 2)


def test_dump_file_is_private_and_taken_once(tmp_path):
    path = os.path.join(tmp_path, "state", "sessions.json")
    write_dump(path, b"{}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_dump(path) == b"{}"
    drop_dump(path)  # the gateway drops it once restored and listening
    assert read_dump(path) is None


def test_the_bound_drops_sessions_of_the_workspace_holding_the_most():
    """Past max_suspended the workspace holding the most suspended sessions loses its oldest,
    not the node's oldest session: a workspace under its share keeps every session. Taking and
    expiring sessions keeps the per-workspace counts right."""
    sessions = Sessions(ttl=100, max_suspended=10)
    quiet = [sessions.new("q", "quiet") for _ in range(3)]
    for s in quiet:
        sessions.suspend(s, 1)
    busy = [sessions.new("b", "busy") for _ in range(50)]
    for s in busy:
        sessions.suspend(s, 1)
    assert len(sessions) == 10 and sessions.expired == 43
    assert sessions.take(quiet[0].id, "q", "quiet") is quiet[0]  # oldest of the node, kept
    assert [s.id for s in sessions.snapshot().sessions] == [quiet[1].id, quiet[2].id] + [s.id for s in busy[-7:]]
    other = [sessions.new("o", "other") for _ in range(6)]
    for s in other:  # busy (7) > other: busy gives way until both hold 4 (quiet keeps its 2)
        sessions.suspend(s, 1)
    held = {w: sum(1 for s in sessions.snapshot().sessions if s.workspace == w) for w in ("quiet", "busy", "other")}
    assert held == {"quiet": 2, "busy": 4, "other": 4}, held
    assert sessions._most == 4 and sessions._holding == {2: {"quiet"}, 4: {"busy", "other"}}
    sessions.ttl = 0
    sessions.sweep()
    assert len(sessions) == 0 and sessions._most == 0 and not sessions._holding and not sessions._by_workspace


async def test_a_workspace_churning_connections_does_not_push_out_other_workspaces_sessions(tmp_path):
    """Real sockets: w2 disconnects two clients (their sessions suspended), then w1 opens and
    closes 30 connections against a node bound of 10 suspended sessions. w2's clients still
    resume (before: both sessions dropped after w1's tenth disconnect, resumed false)."""
    from rtserver.app import Gateway
    from tests.harness.wsclient import ws_connect
    from tests.test_churn import Addr, _cfg, _token

    gw = Gateway(_cfg(tmp_path, RT_MAX_SUSPENDED_SESSIONS="10", RT_RESUME_TTL="60",
                      RT_MAX_CONNECTIONS_PER_SUBJECT="100"))
    await gw.start()
    addr = Addr(gw)
    try:
        quiet = _token(["w2"], "q")
        ids = []
        for _ in range(2):
            async with ws_connect(addr, "w2", token=None) as c:
                ids.append((await c.auth(quiet))["sessionId"])
                await c.subscribe("events:t")
        busy = _token(["w1"], "b")
        for _ in range(30):
            async with ws_connect(addr, "w1", token=busy) as c:
                await c.subscribe("events:t")
        for _ in range(1000):  # the last closes are seen by the server shortly after (10 s: a loaded machine)
            if len(gw.sessions) == 10 and gw.sessions.expired == 22:
                break
            await asyncio.sleep(0.01)
        assert len(gw.sessions) == 10 and gw.sessions.expired == 22
        for sid in ids:
            async with ws_connect(addr, "w2", token=None) as c:
                assert (await c.auth(quiet, resume=sid))["resumed"] is True
    finally:
        await gw.shutdown()


async def test_suspended_sessions_are_bounded_by_the_bytes_of_their_filters(tmp_path):
    """Real sockets: a client that churns connections, each with large filters, leaves a
    suspended session holding them for resume_ttl; bounded by count alone (100,000), that was
    gigabytes. Past history.max_suspended_filter_bytes the workspace whose sessions hold the
    most loses its oldest: here w1's churn ends its own sessions, not w2's."""
    import json

    from rtserver.app import Gateway
    from tests.harness.wsclient import ws_connect
    from tests.test_churn import Addr, _cfg, _token

    # Two of w1's sessions fit beside w2's two, each filter counted as held decoded (its JSON and
    # 64 bytes per `,` `:` `[`): 2 x (8136 + 8 + 64) + 2 x (150 + 8 + 64) bytes.
    gw = Gateway(_cfg(tmp_path, RT_MAX_SUSPENDED_FILTER_BYTES="17000", RT_RESUME_TTL="60",
                      RT_MAX_CONNECTIONS_PER_SUBJECT="100"))
    await gw.start()
    addr = Addr(gw)
    big = {"predicates": {"k": {"$in": list(range(118))}}}
    assert 390 < len(json.dumps(big, separators=(",", ":"))) < 400
    try:
        quiet = _token(["w2"], "q")
        quiet_ids = []
        for _ in range(2):
            async with ws_connect(addr, "w2", token=None) as c:
                quiet_ids.append((await c.auth(quiet))["sessionId"])
                await c.subscribe("events:t", {"predicates": {"k": 1}})
        busy = _token(["w1"], "b")
        busy_ids = []
        for _ in range(20):
            async with ws_connect(addr, "w1", token=None) as c:
                busy_ids.append((await c.auth(busy))["sessionId"])
                await c.subscribe("events:t", big)
        for _ in range(1000):  # the last closes are seen by the server shortly after (10 s: a loaded machine)
            if gw.sessions.expired == 18 and len(gw.sessions) == 4:
                break
            await asyncio.sleep(0.01)
        assert (gw.sessions.expired, len(gw.sessions)) == (18, 4)
        async with ws_connect(addr, "w1", token=None) as c:
            assert (await c.auth(busy, resume=busy_ids[0]))["resumed"] is False
        async with ws_connect(addr, "w1", token=None) as c:
            assert (await c.auth(busy, resume=busy_ids[-1]))["resumed"] is True
        for sid in quiet_ids:
            async with ws_connect(addr, "w2", token=None) as c:
                assert (await c.auth(quiet, resume=sid))["resumed"] is True
    finally:
        await gw.shutdown()


async def test_unfiltered_subscriptions_of_suspended_sessions_count_against_the_bound(tmp_path):
    """The bound counted filters' JSON alone: a session of many unfiltered subscriptions (long
    topic names) weighed nothing and held ~600 bytes each, so a client churning connections
    could hold max_suspended_sessions of them (gigabytes at the defaults). Each subscription
    now counts its channel's name and 64 bytes too."""
    from rtserver.app import Gateway
    from tests.harness.wsclient import ws_connect
    from tests.test_churn import Addr, _cfg, _token

    channels = [f"events:{'t' * 100}{i}" for i in range(10)]  # 10 x (108 + 64) = 1720 bytes a session
    gw = Gateway(_cfg(tmp_path, RT_MAX_SUSPENDED_FILTER_BYTES="4000", RT_RESUME_TTL="60",
                      RT_MAX_CONNECTIONS_PER_SUBJECT="100"))
    await gw.start()
    addr = Addr(gw)
    try:
        token = _token(["w1"], "b")
        ids = []
        for _ in range(10):
            async with ws_connect(addr, "w1", token=None) as c:
                ids.append((await c.auth(token))["sessionId"])
                for channel in channels:
                    await c.subscribe(channel)
        for _ in range(1000):  # the last closes are seen by the server shortly after (10 s: a loaded machine)
            if gw.sessions.expired == 8 and len(gw.sessions) == 2:
                break
            await asyncio.sleep(0.01)
        assert (gw.sessions.expired, len(gw.sessions), gw.sessions.bytes) == (8, 2, 2 * 1720)
        async with ws_connect(addr, "w1", token=None) as c:
            assert (await c.auth(token, resume=ids[0]))["resumed"] is False
        async with ws_connect(addr, "w1", token=None) as c:
            assert (await c.auth(token, resume=ids[-1]))["resumed"] is True
    finally:
        await gw.shutdown()
