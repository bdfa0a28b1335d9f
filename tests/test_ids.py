"""Random ids (rtserver/ids.py): audit record ids and session ids keep the form and the
randomness of uuid.uuid4() and secrets.token_urlsafe(), each value handed out once, also
across a fork."""

from __future__ import annotations

import base64
import os
import re
import threading
import uuid

import pytest

from rtserver import ids
from rtserver.sessions import Sessions


def test_uuid4_is_what_str_of_uuid4_gives_for_the_same_bytes(monkeypatch):
    for raw in (bytes(16), b"\xff" * 16, os.urandom(16), os.urandom(16)):
        monkeypatch.setattr(ids, "token_bytes", lambda n, raw=raw: raw)
        assert ids.uuid4() == str(uuid.UUID(bytes=raw, version=4))


def test_uuid4_values_are_version_4_and_distinct():
    values = [ids.uuid4() for _ in range(3 * ids._BLOCK // 16)]  # across several blocks
    assert len(set(values)) == len(values)
    for v in values[:50]:
        u = uuid.UUID(v)
        assert (u.version, u.variant, str(u)) == (4, uuid.RFC_4122, v)


def test_token_urlsafe_is_what_secrets_gives_for_the_same_bytes(monkeypatch):
    raw = os.urandom(18)
    monkeypatch.setattr(ids, "token_bytes", lambda n: raw[:n])
    assert ids.token_urlsafe(18) == base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_session_ids_are_144_random_bits_url_safe_and_distinct():
    sessions = Sessions(ttl=60, max_suspended=10)
    sids = [sessions.new("alice", "w1").id for _ in range(2000)]
    assert len(set(sids)) == len(sids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{24}", sid) for sid in sids)


def test_token_bytes_are_never_handed_out_twice():
    seen: list[bytes] = []
    lock = threading.Lock()

    def take() -> None:
        mine = [ids.token_bytes(16) for _ in range(2000)]
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == len(seen) == 8000
    big = ids.token_bytes(ids._BLOCK + 1)  # larger than a block: straight from os.urandom
    assert len(big) == ids._BLOCK + 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_repeat_its_parents_ids():
    ids.token_bytes(1)  # a block is in use
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        os.write(w, ids.token_bytes(32))
        os._exit(0)
    os.close(w)
    child = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    parent = ids.token_bytes(32)
    assert len(child) == 32 and child != parent
