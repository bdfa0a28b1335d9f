"""Sessions.dump / restore (rtserver/sessions.py): what a drained shutdown hands to the next
start. The end-to-end case is tests/test_resume.py::test_sessions_survive_a_drained_restart."""

from __future__ import annotations

import os
import stat
import time

import msgspec

from rtserver import channels
from rtserver.sessions import Sessions, take_dump, write_dump


def _suspended(sessions: Sessions, sid: str, channel: str, filter_: dict | None, last_seq: int) -> None:
    s = sessions.new("alice", "w1")
    s.id = sid
    spec = channels.parse(channel, filter_)
    s.specs[spec.channel] = spec
    sessions.suspend(s, last_seq)


def test_dump_and_restore_keep_subscriptions_order_and_remaining_time():
    before = Sessions(ttl=100, max_suspended=10)
    _suspended(before, "old", "events:a", None, 5)
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
    left = new.suspended_at + after.ttl - time.monotonic()
    assert 99 < left <= 100
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


def test_dump_file_is_private_and_taken_once(tmp_path):
    path = os.path.join(tmp_path, "state", "sessions.json")
    write_dump(path, b"{}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert take_dump(path) == b"{}"
    assert take_dump(path) is None
