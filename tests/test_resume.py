"""Resumable sessions and replay (PROTOCOL.md §3 `since`, §5 `seq`, §7): nothing lost across
reconnects, nothing duplicated at the seam, and gaps reported, never silent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import websockets

from rtserver.app import Gateway
from tests.harness.http_wire import post_request, read_answer
from tests.harness.wsclient import ws_connect
from tests.test_churn import Addr, Publisher, _cfg, _token, _until


async def _session_id(c, token: str) -> str:
    """The session of an authenticated connection (an in-band refresh answers with its id)."""
    await c.send({"type": "auth", "token": token})
    return (await c.recv_type("auth_ok"))["sessionId"]


async def _drain_events(c, n: int, timeout: float = 5) -> list[dict]:
    return [await c.recv_event(timeout) for _ in range(n)]



async def publish_until(port: int, token: str, stop: asyncio.Event, published: list[int],
                        payload: Callable[[int], Any]) -> None:
    """Publish payload(0), payload(1), ... to events:seam of w1, one request at a time on one
    connection, until `stop` is set; each answer's seq is appended to `published`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while not stop.is_set():
            writer.write(post_request("/workspaces/w1/realtime/events/seam", token, payload(i)))
            _, _, body = await read_answer(reader)
            published.append(json.loads(body)["seq"])
            i += 1
    finally:
        writer.close()

async def test_resume_replays_exactly_the_missed_matching_events(gateway):
    token = gateway.token("w1")
    async with ws_connect(gateway, "w1", token=token) as c:
        await c.subscribe("events:orders", {"predicates": {"keep": True}})
        await c.subscribe("events:audit")
        session = None
        session = await _session_id(c, token)
        out = await gateway.publish("w1", "orders", {"keep": True, "n": 0})
        last = (await c.recv_event())["seq"]
        assert last == out["seq"]
    # disconnected: publish on several channels, some not matching
    expected = []
    for i in range(1, 13):
        topic = ("orders", "audit", "other")[i % 3]
        payload = {"keep": i % 2 == 0, "n": i}
        out = await gateway.publish("w1", topic, payload)
        if topic == "audit" or (topic == "orders" and payload["keep"]):
            expected.append((out["seq"], i))
    async with ws_connect(gateway, "w1") as c:
        ok = await c.auth(token, resume=session, since=last)
        assert ok["resumed"] is True and ok["sessionId"] == session
        got = await _drain_events(c, len(expected))
        assert [(e["seq"], e["payload"]["n"]) for e in got] == expected
        await c.no_message()
        # subscriptions were restored: live events flow
        out = await gateway.publish("w1", "audit", {"n": 99})
        assert (await c.recv_event())["seq"] == out["seq"]


async def test_subscribe_with_since_replays_then_live(gateway):
    token = gateway.token("w1")
    seqs = [(await gateway.publish("w1", "t", {"i": i}))["seq"] for i in range(5)]
    async with ws_connect(gateway, "w1", token=token) as c:
        await c.send({"type": "subscribe", "channel": "events:t", "since": seqs[1]})
        assert (await c.recv())["type"] == "subscribed"
        got = await _drain_events(c, 3)
        assert [e["seq"] for e in got] == seqs[2:]
        live = await gateway.publish("w1", "t", {"i": 5})
        assert (await c.recv_event())["seq"] == live["seq"]


async def test_a_replay_leaves_out_what_another_subscription_delivered(gateway):
    """An event reaches a connection once, whatever number of its subscriptions match (§3),
    a replay included: subscribing to `events:orders` with `since` beside a live `events:*`
    replays the events `events:*` has not delivered (those before it began), not those it
    did. Before, those came again, after later ones (seq going back)."""
    token = gateway.token("w1")
    before = [(await gateway.publish("w1", "orders", {"i": i}))["seq"] for i in range(2)]
    async with ws_connect(gateway, "w1", token=token) as c:
        await c.subscribe("events:*")
        during = [(await gateway.publish("w1", "orders", {"i": i}))["seq"] for i in range(2, 4)]
        during.append((await gateway.publish("w1", "other", {"i": 4}))["seq"])
        assert [(await c.recv_event())["seq"] for _ in during] == during
        await c.send({"type": "subscribe", "channel": "events:orders", "since": before[0] - 1})
        await c.recv_type("subscribed")
        assert [(await c.recv_event())["seq"] for _ in before] == before
        await c.no_message()
        live = (await gateway.publish("w1", "orders", {"i": 5}))["seq"]
        assert (await c.recv_event())["seq"] == live
        await c.no_message()


async def test_two_subscriptions_with_the_same_since_replay_each_event_once(gateway):
    """A client with a fresh session subscribes again to its channels with its last `seq`
    (docs §7, the bundled clients): `events:*` and `events:orders`, both `since` it. The
    second replay must leave out what the first one sent: before, every `orders` event of the
    window came twice, the copies after later events (seq going back)."""
    token = gateway.token("w1")
    last = (await gateway.publish("w1", "orders", {"i": -1}))["seq"]
    missed = [(await gateway.publish("w1", topic, {"i": i}))["seq"]
              for i, topic in enumerate(["orders", "other", "orders"])]
    async with ws_connect(gateway, "w1", token=token) as c:
        await c.send({"type": "subscribe", "channel": "events:*", "since": last})
        await c.recv_type("subscribed")
        assert [(await c.recv_event())["seq"] for _ in missed] == missed
        await c.send({"type": "subscribe", "channel": "events:orders", "since": last})
        await c.recv_type("subscribed")
        await c.no_message()
        live = (await gateway.publish("w1", "orders", {"i": 3}))["seq"]
        assert (await c.recv_event())["seq"] == live
        await c.no_message()


async def test_a_paced_replay_beside_a_live_subscription_sends_each_event_once(gateway_factory):
    """The same while a publisher runs flat out and the replay leaves in pieces: the events
    published meanwhile reach the client through `events:*` and are left out of the replay's
    tail (before: hundreds of them came twice)."""
    gw = await gateway_factory(env={"RT_SEND_BUFFER_BYTES": "65536", "RT_HISTORY_EVENTS": "10000"})
    pub_token = gw.token("w1", publish=True)
    pad = "x" * 500  # 300 of these are many pieces of 16 KiB
    before = [(await gw.publish("w1", "seam", {"i": i, "pad": pad}, token=pub_token))["seq"] for i in range(300)]
    published: list[int] = []
    stop = asyncio.Event()

    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("events:*")
        task = asyncio.create_task(publish_until(gw.port, pub_token, stop, published, lambda i: {"pad": pad}))
        while len(published) < 50:
            await asyncio.sleep(0.01)
        await c.send({"type": "subscribe", "channel": "events:seam", "since": before[0] - 1})
        while len(published) < 500:
            await asyncio.sleep(0.01)
        stop.set()
        await task
        got: list[int] = []
        while len(got) < len(before) + len(published):
            msg = await c.recv()
            if msg["type"] == "event":
                got.append(msg["seq"])
        await c.no_message()
    assert sorted(got) == before + published


async def test_seam_is_exact_under_continuous_publishing(gateway):
    """Resume while a publisher runs flat out: each event exactly once, in order."""
    token = gateway.token("w1")
    pub_token = gateway.token("w1", publish=True)
    for _round in range(5):
        async with ws_connect(gateway, "w1", token=token) as c:
            await c.subscribe("events:seam")
            session = None
            session = await _session_id(c, token)
            first = await gateway.publish("w1", "seam", {"i": -1}, token=pub_token)
            last = (await c.recv_event())["seq"]
            assert last == first["seq"]
        published: list[int] = []
        stop = asyncio.Event()

        task = asyncio.create_task(publish_until(gateway.port, pub_token, stop, published, lambda i: {"i": i}))
        await asyncio.sleep(0.05)
        async with ws_connect(gateway, "w1") as c:
            ok = await c.auth(token, resume=session, since=last)
            assert ok["resumed"] is True
            await asyncio.sleep(0.1)
            stop.set()
            await task
            got = [e["seq"] for e in await _drain_events(c, len(published))]
            await c.no_message(0.2)
        assert got == published, (len(got), len(published))


async def test_history_overflow_reports_gap_with_oldest(gateway_factory):
    gw = await gateway_factory(env={"RT_HISTORY_EVENTS": "5"})
    token = gw.token("w1")
    seqs = [(await gw.publish("w1", "t", {"i": i}))["seq"] for i in range(8)]
    async with ws_connect(gw, "w1", token=token) as c:
        await c.send({"type": "subscribe", "channel": "events:t", "since": seqs[0]})
        assert (await c.recv())["type"] == "subscribed"
        gap = await c.recv_type("error")
        assert (gap["code"], gap["name"], gap["channel"]) == (4011, "history_gap", "events:t")
        assert gap["oldest"] == seqs[3]
        got = await _drain_events(c, 5)
        assert [e["seq"] for e in got] == seqs[3:]
    async with ws_connect(gw, "w1", token=token) as c:
        # within the history: no gap
        await c.send({"type": "subscribe", "channel": "events:t", "since": seqs[3]})
        assert (await c.recv())["type"] == "subscribed"
        assert [e["seq"] for e in await _drain_events(c, 4)] == seqs[4:]
        await c.no_message()


async def test_slow_reader_closed_1013_resumes_without_loss(gateway_factory):
    gw = await gateway_factory(env={"RT_SEND_BUFFER_BYTES": "262144"})
    token = gw.token("w1")
    slow = await websockets.connect(gw.ws_url("w1"), max_size=None, max_queue=1)
    await slow.send(json.dumps({"type": "auth", "token": token}))
    session = json.loads(await slow.recv())["sessionId"]
    await slow.send(json.dumps({"type": "subscribe", "channel": "events:big"}))
    await slow.recv()
    slow.transport.pause_reading()
    published = [(await gw.publish("w1", "big", {"i": i, "blob": "x" * 60000}))["seq"] for i in range(150)]
    slow.transport.resume_reading()
    seen: list[int] = []
    try:
        while True:
            msg = json.loads(await asyncio.wait_for(slow.recv(), 10))
            if msg["type"] == "event":
                seen.append(msg["seq"])
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 1013
    assert seen == published[: len(seen)] and len(seen) < len(published)
    async with ws_connect(gw, "w1") as c:
        ok = await c.auth(token, resume=session, since=seen[-1] if seen else 0)
        assert ok["resumed"] is True
        rest = [e["seq"] for e in await _drain_events(c, len(published) - len(seen), timeout=10)]
    assert seen + rest == published


async def test_a_replay_larger_than_the_send_buffer_reaches_a_reader_that_keeps_up(tmp_path):
    """A replay leaves in pieces as the client takes them: written at once, one larger than
    limits.send_buffer_bytes closed the connection with 1013 however fast the client read,
    and again at every reconnect. Events published while it is under way follow it, once
    each, in order; a resumed session's replay is paced the same way."""
    # The session must outlive 300 publishes of 20 KB (test_churn's 0.3 s did not on a busy machine).
    gw = Gateway(_cfg(tmp_path, RT_SEND_BUFFER_BYTES="262144", RT_HISTORY_EVENTS="10000",
                      RT_MAX_CONNECTIONS_PER_SUBJECT="10", RT_RESUME_TTL="60"))
    await gw.start()
    pub = Publisher(gw.port)
    token = _token(["w1"], "u")

    def narrow_send_buffer() -> None:
        # A network path rather than loopback's large receive window: the kernel takes 64 KB
        # at a time, so what the client has not read yet stays in the gateway's buffer.
        for conn in gw.connections:
            conn._raw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)

    try:
        published = [await pub.publish("w1", "big", {"i": i, "blob": "x" * 20000}) for i in range(300)]
        async with ws_connect(Addr(gw), "w1", token=token) as c:
            session = await _session_id(c, token)
            narrow_send_buffer()
            await c.send({"type": "subscribe", "channel": "events:big", "since": published[0] - 1})
            assert (await c.recv_type("subscribed"))["channel"] == "events:big"

            async def publish_meanwhile() -> list[int]:
                return [await pub.publish("w1", "big", {"i": f"m{i}", "blob": "y" * 20000}) for i in range(40)]

            meanwhile = asyncio.ensure_future(publish_meanwhile())
            got = [(await c.recv_event(10))["seq"] for _ in range(340)]
            published += await meanwhile
            assert got == published
            live = await pub.publish("w1", "big", {"i": "live"})
            assert (await c.recv_event(10))["seq"] == live
            await c.no_message()
        # The server sees the close a little after the client's side of it (a loaded machine).
        await _until(lambda: len(gw.sessions) == 1, what="the session suspended")
        missed = [await pub.publish("w1", "big", {"i": f"r{i}", "blob": "z" * 20000}) for i in range(300)]
        async with ws_connect(Addr(gw), "w1") as c:
            narrow_send_buffer()
            assert (await c.auth(token, resume=session, since=live))["resumed"] is True
            assert [(await c.recv_event(10))["seq"] for _ in range(300)] == missed
            await c.no_message()
        assert gw.metrics.drops_slow_reader == 0
    finally:
        await pub.close()
        await gw.shutdown()


async def test_resume_by_another_subject_gives_fresh_session(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1", sub="alice")) as c:
        await c.subscribe("events:private")
        await c.send({"type": "auth", "token": gateway.token("w1", sub="alice")})
        session = (await c.recv_type("auth_ok"))["sessionId"]
    await gateway.publish("w1", "private", {"secret": 1})
    async with ws_connect(gateway, "w1") as c:
        ok = await c.auth(gateway.token("w1", sub="mallory"), resume=session, since=0)
        assert ok["resumed"] is False and ok["sessionId"] != session
        await c.no_message(0.5)
    # alice can still resume it afterwards
    async with ws_connect(gateway, "w1") as c:
        ok = await c.auth(gateway.token("w1", sub="alice"), resume=session)
        assert ok["resumed"] is True


async def test_a_session_resumes_only_in_its_own_workspace(gateway):
    """A session belongs to one workspace (§7): its id presented on another workspace's URL, by
    the same subject with a token granting both, gives a fresh session there, with none of the
    session's subscriptions and none of its workspace's events; the session stays resumable
    where it was made."""
    both = gateway.token(["w1", "w2"], sub="alice")
    async with ws_connect(gateway, "w2", token=both) as c:
        since = (await c.subscribe("events:*"))["seq"]
        session = await _session_id(c, both)
    await gateway.publish("w2", "private", {"secret": 1})
    async with ws_connect(gateway, "w1") as c:
        ok = await c.auth(both, resume=session, since=since)
        assert ok["resumed"] is False and ok["sessionId"] != session
        await gateway.publish("w2", "private", {"secret": 2})
        await c.no_message(0.5)
    async with ws_connect(gateway, "w2") as c:
        ok = await c.auth(both, resume=session, since=since)
        assert ok["resumed"] is True
        assert [(await c.recv_event())["payload"] for _ in range(2)] == [{"secret": 1}, {"secret": 2}]


async def test_unknown_or_expired_session_gives_fresh_session(gateway_factory):
    gw = await gateway_factory(env={"RT_RESUME_TTL": "1"})
    token = gw.token("w1")
    async with ws_connect(gw, "w1") as c:
        ok = await c.auth(token, resume="no-such-session", since=1)
        assert ok["resumed"] is False
    async with ws_connect(gw, "w1", token=token) as c:
        session = await _session_id(c, token)
    await asyncio.sleep(2.5)
    async with ws_connect(gw, "w1") as c:
        ok = await c.auth(token, resume=session)
        assert ok["resumed"] is False


async def test_gateway_restart_gives_history_gap_never_silent_loss(gateway):
    token = gateway.token("w1")
    async with ws_connect(gateway, "w1", token=token) as c:
        await c.subscribe("events:t")
        out = await gateway.publish("w1", "t", {"before": True})
        last = (await c.recv_event())["seq"]
        assert last == out["seq"]
    await gateway.restart()
    after = await gateway.publish("w1", "t", {"after": True})
    assert after["seq"] > last, "seq must keep increasing across restarts"
    async with ws_connect(gateway, "w1", token=token) as c:
        await c.send({"type": "subscribe", "channel": "events:t", "since": last})
        assert (await c.recv())["type"] == "subscribed"
        gap = await c.recv_type("error")
        assert gap["code"] == 4011 and gap["oldest"] == after["seq"]
        ev = await c.recv_event()
        assert ev["seq"] == after["seq"]


async def test_resume_without_since_on_a_quiet_workspace_reports_no_gap(gateway):
    token = gateway.token("w1")
    async with ws_connect(gateway, "w1", token=token) as c:
        await c.subscribe("events:q")
        session = await _session_id(c, token)
    async with ws_connect(gateway, "w1") as c:
        assert (await c.auth(token, resume=session))["resumed"] is True
        await c.no_message(0.5)  # nothing was published: nothing missed, no history_gap
        live = await gateway.publish("w1", "q", {"n": 1})
        assert (await c.recv_event())["seq"] == live["seq"]


async def test_sessions_survive_a_drained_restart(gateway):
    """A drained shutdown keeps suspended sessions for the next start (state dir), so a client
    resumes its session, filters included, across a restart: gap report, then live."""
    token = gateway.token("w1")
    async with ws_connect(gateway, "w1", token=token) as early:
        await early.subscribe("events:a")
        early_session = await _session_id(early, token)
    async with ws_connect(gateway, "w1", token=token) as c:
        await c.subscribe("events:t", {"predicates": {"keep": True}})
        session = await _session_id(c, token)
        out = await gateway.publish("w1", "t", {"keep": True})
        last = (await c.recv_event())["seq"]
        assert last == out["seq"]
        await gateway.restart()  # SIGTERM: drained, closes this connection with 1001
        assert c.close_code == 1001 or await c.expect_close() == (1001, "going_away")
    causes = [(r["sessionId"], r["code"], r["reason"]) for r in await gateway.audit_records("session-suspended", 2)]
    assert causes == [(early_session, 1000, "client_close"), (session, 1001, "shutdown")]
    dump = os.path.join(gateway.state_dir, "sessions.json")
    assert not os.path.exists(dump), "the dump is consumed at start"
    await gateway.publish("w1", "t", {"keep": False})
    after = await gateway.publish("w1", "t", {"keep": True})
    async with ws_connect(gateway, "w1") as c:
        ok = await c.auth(token, resume=session, since=last)
        assert ok["resumed"] is True and ok["sessionId"] == session
        gap = await c.recv_type("error")
        assert (gap["code"], gap["channel"]) == (4011, "events:t")
        assert (await c.recv_event())["seq"] == after["seq"]  # the filter came back too
        await c.no_message()
    async with ws_connect(gateway, "w1") as c:
        assert (await c.auth(token, resume=early_session))["resumed"] is True
        # Without `since`, the replay starts where the session left: before the restart.
        assert (await c.recv_type("error"))["code"] == 4011
        live = await gateway.publish("w1", "a", {"n": 1})
        assert (await c.recv_event())["seq"] == live["seq"]


async def test_a_hard_kill_leaves_no_resumable_session_but_loses_nothing(gateway):
    token = gateway.token("w1")
    async with ws_connect(gateway, "w1", token=token) as c:
        await c.subscribe("events:t")
        session = await _session_id(c, token)
        await gateway.publish("w1", "t", {})
        last = (await c.recv_event())["seq"]
    await gateway.restart(signal.SIGKILL)
    after = await gateway.publish("w1", "t", {"after": True})
    async with ws_connect(gateway, "w1") as c:
        ok = await c.auth(token, resume=session, since=last)
        assert ok["resumed"] is False  # nothing was saved: subscribe again with since
        await c.send({"type": "subscribe", "channel": "events:t", "since": last})
        assert (await c.recv())["type"] == "subscribed"
        assert (await c.recv_type("error"))["code"] == 4011
        assert (await c.recv_event())["seq"] == after["seq"]


async def test_metrics_show_history_and_suspended_sessions(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe("events:t")
    await gateway.publish("w1", "t", {"x": 1})
    _, body = await gateway.get("/metrics")
    text = body.decode()
    assert "rt_suspended_sessions 1" in text
    assert 'rt_history_events{workspace="w1"} 1' in text


async def test_a_token_just_past_exp_at_connect_gets_4001_and_no_event(gateway):
    """The leeway lets a token a second or two past `exp` through when it is presented, but the
    session ends exactly at `exp`, before it began: the connection got auth_ok, a resumed
    session's missed events and the replay of a `subscribe` with `since` sent behind the auth,
    and only then 4001. A token past its exp read the workspace's retained events. It is
    refused at connect (4001, as a refresh with it is), nothing delivered."""
    token = gateway.token("w1", sub="alice")
    async with ws_connect(gateway, "w1", token=token) as c:
        await c.subscribe("events:orders")
        session = await _session_id(c, token)
    for i in range(3):
        await gateway.publish("w1", "orders", {"n": i})
    late = gateway.token("w1", sub="alice", ttl=-2)
    async with ws_connect(gateway, "w1") as c:
        await c.send({"type": "auth", "token": late, "resume": session, "since": 0, "id": "a"})
        await c.send({"type": "subscribe", "channel": "events:*", "since": 0, "id": "s"})
        err = await c.recv_type("error")
        assert (err["code"], err["name"], err["id"]) == (4001, "token_expired", "a"), err
        assert await c.expect_close() == (4001, "token_expired")
    async with ws_connect(gateway, "w1", token=late, header_auth=True) as c:
        assert (await c.recv_type("error"))["code"] == 4001
        assert await c.expect_close() == (4001, "token_expired")
    # The session was not taken: a valid token still resumes it.
    async with ws_connect(gateway, "w1") as c:
        ok = await c.auth(token, resume=session)
        assert ok["resumed"] is True
        assert [e["payload"]["n"] for e in [await c.recv_event() for _ in range(3)]] == [0, 1, 2]


async def test_a_resume_without_since_after_a_cut_replay_loses_nothing(tmp_path):
    """A connection that dropped during a replay paced to its reading (here: 8 MB of history,
    read a few events at a time) left its session at the workspace's position, as if the rest
    of the replay had been delivered: a resume without `since` (which replays from the
    session's position) then skipped every event the replay had not sent. The session now
    keeps the start of a replay still running, so the resume replays from there: events the
    client had may come again (drop them by seq), none is lost."""
    gw = Gateway(_cfg(tmp_path, RT_HISTORY_EVENTS="5000", RT_SEND_BUFFER_BYTES="65536", RT_RESUME_TTL="60"))
    await gw.start()
    pub = Publisher(gw.port)
    token = _token(["w1"], "reader")
    try:
        seqs = [await pub.publish("w1", "t", {"i": i, "pad": "p" * 4000}) for i in range(2000)]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", gw.port))
        got: set[int] = set()
        async with ws_connect(Addr(gw), "w1", sock=sock) as c:
            sid = (await c.auth(token))["sessionId"]
            await c.send({"type": "subscribe", "channel": "events:t", "since": seqs[0] - 1})
            await c.recv_type("subscribed")
            for _ in range(20):
                got.add((await c.recv_event())["seq"])
            c.ws.transport.abort()  # cut: the replay is far from done
        await _until(lambda: len(gw.sessions) == 1, what="the session suspended")
        async with ws_connect(Addr(gw), "w1") as c:
            assert (await c.auth(token, resume=sid))["resumed"] is True
            while not set(seqs) <= got:
                event = await c.recv_event(timeout=10)
                got.add(event["seq"])
        assert set(seqs) <= got
    finally:
        await pub.close()
        await gw.shutdown()


async def test_a_resumed_subscription_whose_source_is_gone_is_refused(gateway_factory, mongo_server):
    """A session suspended by a drained restart keeps its channels; one whose source the new
    configuration no longer has is unavailable (§4: 4010), as a subscribe to it is. It was
    restored without a word: the client took it for subscribed and waited for events that
    could never come."""
    gw = await gateway_factory(env={"RT_MONGO_URL": mongo_server.url})
    token = gw.token("w1")
    async with ws_connect(gw, "w1", token=token) as c:
        await c.subscribe("mongo:*")
        await c.subscribe("events:t")
        session = await _session_id(c, token)
    del gw.env["RT_MONGO_URL"]
    await gw.restart()
    async with ws_connect(gw, "w1") as c:
        assert (await c.auth(token, resume=session))["resumed"] is True
        refused = await c.recv_type("error")
        assert (refused["code"], refused["channel"]) == (4010, "mongo:*")
        assert (await c.recv_type("error"))["code"] == 4011  # events:t: from before the restart
        live = await gw.publish("w1", "t", {"n": 1})
        assert (await c.recv_event())["seq"] == live["seq"]
    async with ws_connect(gw, "w1") as c:
        # Dropped from the session: the next resume neither restores nor refuses it again.
        assert (await c.auth(token, resume=session, since=live["seq"]))["resumed"] is True
        await c.no_message(0.5)


async def test_a_restored_filter_the_index_refuses_is_dropped_not_a_failed_resume(tmp_path):
    """A suspended session saved by a version that took a filter this one's index refuses
    (here an operator it does not know): the resume failed with 1011, which suspended the
    session again as it was, so every resume failed alike until it expired and the client's
    other subscriptions were lost with it. That subscription alone is dropped now, with the
    error 4000 a subscribe with that filter gets."""
    from rtserver import channels
    from rtserver.sessions import Sessions, encode_dump, write_dump

    saved = Sessions(ttl=60, max_suspended=10)
    session = saved.new("u", "w1")
    for channel, filter_ in (("events:a", None), ("events:b", {"predicates": {"x": {"$near": [1, 2]}}})):
        spec = channels.parse(channel, filter_)
        session.specs[spec.channel] = spec
    saved.suspend(session, 0)
    write_dump(str(tmp_path / "sessions.json"), encode_dump(saved.snapshot()))
    gw = Gateway(_cfg(tmp_path, RT_RESUME_TTL="60"))  # the restored session outlives a slow start
    await gw.start()
    pub = Publisher(gw.port)
    try:
        async with ws_connect(Addr(gw), "w1") as c:
            assert (await c.auth(_token(["w1"], "u"), resume=session.id))["resumed"] is True
            refused = await c.recv_type("error")
            assert (refused["code"], refused["channel"]) == (4000, "events:b"), refused
            assert "$near" in refused["message"]
            assert (await c.recv_type("error"))["code"] == 4011  # events:a: saved before this history
            seq = await pub.publish("w1", "a", {"n": 1})
            event = await c.recv_event()
            assert (event["channel"], event["seq"]) == ("events:a", seq)
    finally:
        await pub.close()
        await gw.shutdown()


async def test_a_source_loss_during_a_paced_replay_is_told_once(tmp_path):
    """A source's loss reported while a subscription's replay was paced to its reader reached
    it twice: at once (every subscription of the source was told, the replaying one too), and
    again from the replay, which found the loss in the history at its next piece. The replay
    alone tells it now, in the order of what it sends."""
    gw = Gateway(_cfg(tmp_path, RT_SEND_BUFFER_BYTES="262144", RT_HISTORY_EVENTS="10000"))
    await gw.start()
    pub = Publisher(gw.port)
    token = _token(["w1"], "u")
    try:
        published = [await pub.publish("w1", "big", {"i": i, "blob": "x" * 20000}) for i in range(300)]
        async with ws_connect(Addr(gw), "w1", token=token) as c:
            (conn,) = gw.connections
            conn._raw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            await c.send({"type": "subscribe", "channel": "events:big", "since": published[0] - 1})
            assert (await c.recv_type("subscribed"))["channel"] == "events:big"
            assert conn._replays, "the replay should still be under way, waiting for the reader"
            gw.hub.history_gap("w1", "events", "lost for the test")
            live = await pub.publish("w1", "big", {"i": "live"})
            got: list[int] = []
            gaps = []
            while not got or got[-1] != live:
                msg = await c.recv(10)
                if msg["type"] == "event":
                    got.append(msg["seq"])
                else:
                    assert (msg["type"], msg["code"], msg["channel"]) == ("error", 4011, "events:big"), msg
                    gaps.append(msg)
            assert got == [*published, live]
            assert len(gaps) == 1, gaps
            await c.no_message()
    finally:
        await pub.close()
        await gw.shutdown()


async def test_replacing_a_filter_with_since_leaves_out_what_the_old_filter_delivered(gateway):
    """Subscribing again to a channel replaces its filter (§3); with `since`, the replay must
    leave out the events the replaced filter already sent (an event reaches a connection
    once, a replay included). Before, an event in flight on the old filter when the client
    sent its last seen `seq` came again after the `subscribed` reply (seq going back), and a
    resumed session whose client re-sent a filter it changed while disconnected (the bundled
    clients do, `since` their last seen event) got every event both filters show twice."""
    token = gateway.token("w1")
    async with ws_connect(gateway, "w1", token=token) as c:
        await c.subscribe("events:t", {"predicates": {"k": True}})
        last = (await gateway.publish("w1", "t", {"k": True, "i": 0}))["seq"]
        assert (await c.recv_event())["seq"] == last
        session = await _session_id(c, token)
        in_flight = (await gateway.publish("w1", "t", {"k": True, "i": 1}))["seq"]
        other = (await gateway.publish("w1", "t", {"k": False, "i": 2}))["seq"]
        await c.send({"type": "subscribe", "channel": "events:t", "since": last})  # widened, not read yet
        assert (await c.recv_event())["seq"] == in_flight
        await c.recv_type("subscribed")
        assert (await c.recv_event())["seq"] == other
        await c.no_message()
        await c.send({"type": "subscribe", "channel": "events:t", "filter": {"predicates": {"k": True}}})
        await c.recv_type("subscribed")
        last = (await gateway.publish("w1", "t", {"k": True, "i": 3}))["seq"]
        assert (await c.recv_event())["seq"] == last
    missed = [(await gateway.publish("w1", "t", {"k": i % 2 == 0, "i": i}))["seq"] for i in range(4, 8)]
    async with ws_connect(gateway, "w1") as c:
        assert (await c.auth(token, resume=session, since=last))["resumed"] is True
        # The restored filter replays what it shows; the client then widens it, since the same.
        assert [(await c.recv_event())["seq"] for _ in range(2)] == missed[0::2]
        await c.send({"type": "subscribe", "channel": "events:t", "since": last})
        await c.recv_type("subscribed")
        assert [(await c.recv_event())["seq"] for _ in range(2)] == missed[1::2]
        await c.no_message()


async def test_after_a_source_loss_a_resume_from_the_last_seq_received_reports_it_no_more(tmp_path):
    """A source's loss is told as history_gap with `oldest` the history's first event, which
    precedes the loss (and here the reader's `since`): a resume from `oldest - 1`, which the
    docs advised after any gap, reported the loss again and replayed what the client had
    (docs §7 now say so). From the last `seq` received after the loss, no gap."""
    gw = Gateway(_cfg(tmp_path, RT_RESUME_TTL="60", RT_HISTORY_EVENTS="100"))
    await gw.start()
    pub = Publisher(gw.port)
    token = _token(["w1"], "u")
    try:
        seqs = [await pub.publish("w1", "t", {"i": i}) for i in range(2)]
        gw.hub.history_gap("w1", "events", "lost for the test")
        after = await pub.publish("w1", "t", {"i": 2})
        async with ws_connect(Addr(gw), "w1", token=token) as c:
            session = await _session_id(c, token)
            await c.send({"type": "subscribe", "channel": "events:t", "since": seqs[1]})
            await c.recv_type("subscribed")
            gap = await c.recv_type("error")
            assert (gap["code"], gap["oldest"]) == (4011, seqs[0]) and "loss" in gap["message"]
            assert (await c.recv_event())["seq"] == after
        async with ws_connect(Addr(gw), "w1") as c:
            assert (await c.auth(token, resume=session, since=gap["oldest"] - 1))["resumed"] is True
            assert (await c.recv_type("error"))["code"] == 4011  # told again, and replayed from there
            assert [(await c.recv_event())["seq"] for _ in range(3)] == [*seqs, after]
        async with ws_connect(Addr(gw), "w1") as c:
            assert (await c.auth(token, resume=session, since=after))["resumed"] is True
            await c.no_message()
    finally:
        await pub.close()
        await gw.shutdown()
