"""What one client can make the gateway spend, out of proportion to what it sends: each bound
is counted in work (messages handled, events replayed, tokens verified) between turns of the
loop, never in time. An in-process gateway serves real clients over loopback sockets."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from rtcore.event import Event
from rtcore.messages import CustomEventBody, encode
from rtserver import connection as connection_module
from rtserver.app import Gateway
from tests.test_churn import _cfg, _masked_text, _raw_upgrade, _token, _until
from tests.test_loop_stalls import LoopProbe


@pytest.fixture
async def gw(tmp_path) -> AsyncIterator[Gateway]:
    gateway = Gateway(_cfg(tmp_path, RT_HISTORY_EVENTS="1000", RT_MAX_CONNECTIONS_PER_SUBJECT="10"))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.shutdown()


class Drain:
    """Reads and discards what the server sends (a client that keeps up), counting bytes."""

    def __init__(self, s: socket.socket):
        self.s = s
        self.bytes = 0
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.s, 1 << 20)
            if not data:
                return
            self.bytes += len(data)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.s.close()


def _pong_bytes(gw: Gateway, n: int) -> int:
    """The bytes of the pongs to pings with ids 0..n-1 (each carries the stream position,
    fixed while nothing is published)."""
    history = gw.hub.workspace("w1").history
    seq = max(history.last_seq, history.floor)
    return sum(2 + len(json.dumps({"type": "pong", "id": i, "seq": seq}, separators=(",", ":"))) for i in range(n))


async def _authed(gw: Gateway) -> tuple[socket.socket, Drain]:
    s = await _raw_upgrade(gw.port, "w1", _token(["w1"], "amp"))
    await _until(lambda: any(c.identity is not None for c in gw.connections), what="auth")
    return s, Drain(s)


def _count_handled(monkeypatch) -> list[int]:
    """Counts Connection._dispatch calls: messages handled, not merely received."""
    count = [0]
    original = connection_module.Connection._dispatch

    def counting(self, data: bytes) -> None:
        count[0] += 1
        original(self, data)

    monkeypatch.setattr(connection_module.Connection, "_dispatch", counting)
    return count


async def test_pipelined_messages_are_handled_a_turn_at_a_time(gw, monkeypatch):
    """picows hands a listener every frame of a read at once, and its read buffer grows with
    the peer's backlog: before, one client's 100,000 pings in one 3 MB read held the loop
    1.4 s (measured). Now at most _PER_TURN messages of a connection are handled per turn;
    the rest wait in order (before: 1,336 of the 3,000 here between two turns)."""
    count = _count_handled(monkeypatch)
    s, drain = await _authed(gw)
    try:
        n = 3000
        data = b"".join(_masked_text(json.dumps({"type": "ping", "id": i}).encode()) for i in range(n))
        base = count[0]
        async with LoopProbe(lambda: count[0]) as probe:
            await asyncio.get_running_loop().sock_sendall(s, data)
            await _until(lambda: count[0] - base == n, what="every ping handled")
        print(f"most messages handled between two turns: {probe.most_between}")
        # A turn's budget, and at most one more after the budget's reset within the same turn.
        assert probe.most_between <= 2 * connection_module._PER_TURN, probe.most_between
        await _until(lambda: drain.bytes >= _pong_bytes(gw, n), what="pongs")
        assert len(gw.connections) == 1
    finally:
        await drain.close()


def _event(i: int) -> Event:
    payload = {"i": i, "pad": "x" * 100}
    body = encode(CustomEventBody(channel="events:t", operation="PUBLISH", topic="t", payload=payload,
                                  timestamp="2024-01-01T00:00:00.000Z", correlationId=f"c{i}"))
    return Event(workspace="w1", source="events", entity="t", operation="PUBLISH", record=payload, body=body)


async def test_pipelined_replays_run_one_per_turn(gw, monkeypatch):
    """Each `subscribe` with `since` replays the history: a 62-byte message, a frame per
    retained event. Pipelined, they all ran before the first write: 100 of them on a
    10,000-event history held the loop 1.6 s and queued 400 MB (measured). Now a replay is a
    turn's work: the next message waits for the next turn, after the flush (before: all 5
    replays, 5,000 events, between two turns)."""
    s, drain = await _authed(gw)
    try:
        for i in range(1000):
            gw.hub.deliver(_event(i))
        k = 5
        # Each subscribe after an unsubscribe: one replacing the subscription would leave out
        # what the one it replaces had just replayed (an event reaches a connection once).
        msg = b"".join(_masked_text(json.dumps(m).encode()) for m in (
            {"type": "subscribe", "channel": "events:t", "since": 0},
            {"type": "unsubscribe", "channel": "events:t"},
        ))
        base = gw.metrics.replayed
        async with LoopProbe(lambda: gw.metrics.replayed) as probe:
            await asyncio.get_running_loop().sock_sendall(s, msg * k)
            await _until(lambda: gw.metrics.replayed - base == k * 1000, what="every replay")
        print(f"most events replayed between two turns: {probe.most_between}")
        assert probe.most_between <= 1000, probe.most_between
    finally:
        await drain.close()


async def test_a_message_behind_a_short_replay_is_handled_in_the_same_turn(gw, monkeypatch):
    """Only a long replay spends the turn: a subscribe with `since` over a few events and the
    unsubscribe right behind it (one read) are handled together, so a publish arriving in the
    meantime cannot reach the subscription the client has already let go (a resume followed by
    a re-sent unsubscribe, as the JS client does)."""
    count = _count_handled(monkeypatch)
    s, drain = await _authed(gw)
    try:
        for i in range(10):
            gw.hub.deliver(_event(i))
        since = gw.hub.workspaces["w1"].history.oldest() - 1
        data = b"".join(_masked_text(json.dumps(m).encode()) for m in (
            {"type": "subscribe", "channel": "events:t", "since": since},
            {"type": "unsubscribe", "channel": "events:t"},
        ))
        base = count[0]
        async with LoopProbe(lambda: count[0]) as probe:
            await asyncio.get_running_loop().sock_sendall(s, data)
            await _until(lambda: count[0] - base == 2, what="both handled")
        assert probe.most_between == 2, probe.most_between
        assert gw.metrics.replayed >= 10
    finally:
        await drain.close()


async def test_long_replays_are_paid_over_the_turns_after_them(tmp_path, monkeypatch):
    """A `subscribe` with `since` whose filter matches nothing still reads the whole history:
    ~16 ms for 10,000 events, for a 100-byte message and nothing sent back. Counted as one
    message per 32 entries read, such a scan is 312 messages, and what exceeds the turn's 32
    is taken from the turns after it: scans sent back to back run one every ~10 turns, the
    connection's share of the loop, where each turn ran one before (measured: 1 turn apart)."""
    gateway = Gateway(_cfg(tmp_path, RT_HISTORY_EVENTS="10000", RT_MAX_CONNECTIONS_PER_SUBJECT="10"))
    await gateway.start()
    turns_at: list[int] = []
    probe = LoopProbe()
    original = connection_module.Connection._dispatch

    def recording(self, data: bytes) -> None:
        turns_at.append(probe.turns)
        original(self, data)

    try:
        s, drain = await _authed(gateway)
        try:
            for i in range(10_000):
                gateway.hub.deliver(_event(i))
            monkeypatch.setattr(connection_module.Connection, "_dispatch", recording)
            k = 4
            data = b"".join(_masked_text(json.dumps(
                {"type": "subscribe", "channel": "events:t", "since": 0, "filter": {"predicates": {"i": -1 - j}}}
            ).encode()) for j in range(k))  # each one changes the filter: a scan each
            async with probe:
                await asyncio.get_running_loop().sock_sendall(s, data)
                await _until(lambda: len(turns_at) == k, what="every subscribe handled")
            gaps = [b - a for a, b in zip(turns_at, turns_at[1:], strict=False)]
            print(f"turns between the scans: {gaps}")
            per_scan = 10_000 // connection_module._REPLAY_ENTRIES_PER_MESSAGE
            assert min(gaps) >= per_scan // connection_module._PER_TURN - 1, gaps
        finally:
            await drain.close()
    finally:
        await gateway.shutdown()


async def test_a_burst_leaves_no_read_buffer_behind(gw):
    """picows doubles a connection's read buffer whenever one read fills it past 90% and never
    shrinks it: a client that sent a burst once kept a buffer the size of the burst for the
    life of its connection (135 KB of pings: 128 KiB kept, measured). Reads are offered half of
    the free buffer (http._HalfReadWSProtocol), so small frames never grow it."""
    s, drain = await _authed(gw)
    try:
        n = 4000
        data = b"".join(_masked_text(json.dumps({"type": "ping", "id": i}).encode()) for i in range(n))
        pongs = _pong_bytes(gw, n)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await asyncio.get_running_loop().sock_sendall(s, data)
            await _until(lambda: drain.bytes >= pongs, what="every pong")
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        print(f"a {len(data):,}-byte burst: {kept:,} bytes kept")
        assert kept < 32 * 1024, kept
        # A frame larger than the free buffer still grows it, as much as it needs.
        big = json.dumps({"type": "ping", "id": "x" * 60_000}).encode()
        got = drain.bytes
        await asyncio.get_running_loop().sock_sendall(s, _masked_text(big))
        await _until(lambda: drain.bytes - got >= 60_000, what="the pong of a 60 KB ping")
        assert len(gw.connections) == 1
    finally:
        await drain.close()


async def test_token_refreshes_are_paced(tmp_path, monkeypatch):
    """A refresh is a signature check and an audit record (~190 us each: one connection
    refreshing in a loop took a core and wrote 5,000 audit records a second, measured). One
    per limits.min_refresh_interval is handled; a sooner one waits, with the messages behind
    it (before: all three refreshes and the ping handled at once)."""
    from tests.harness.wsclient import ws_connect
    from tests.test_churn import Addr

    gateway = Gateway(_cfg(tmp_path, RT_MIN_REFRESH_INTERVAL="3600"))
    await gateway.start()
    verified = [0]
    authenticate = gateway.auth.authenticate

    async def counting(token: str, workspace: str):
        verified[0] += 1
        return await authenticate(token, workspace)

    monkeypatch.setattr(gateway.auth, "authenticate", counting)
    try:
        token = _token(["w1"], "amp")
        async with ws_connect(Addr(gateway), "w1", token) as client:
            assert verified[0] == 1
            base = gateway.metrics.messages_in
            for _ in range(3):
                await client.send({"type": "auth", "token": token})
            await client.send({"type": "ping", "id": "after"})
            assert (await client.recv_type("auth_ok"))["resumed"] is False  # the first refresh: at once
            await _until(lambda: gateway.metrics.messages_in - base == 4, what="the messages to arrive")
            for _ in range(200):
                await asyncio.sleep(0)
            assert verified[0] == 2, f"{verified[0] - 1} refreshes verified"
            (conn,) = gateway.connections
            assert conn._busy and len(conn._queue) == 2  # the third refresh and the ping wait in order
    finally:
        await gateway.shutdown()


async def test_a_resume_replay_tries_only_the_subscriptions_of_each_events_entity(gw, monkeypatch):
    """A resume replays the history for every subscription of the session: each event was
    tried on each of them, so 100 subscriptions on other topics made a 10,000-event replay
    cost 118 ms for no frame at all (measured), at the price of a reconnect. Now each event
    meets only the subscriptions of its entity (before: 51 tries per event here, 10,200 in all)."""
    from rtserver.hub import Subscription
    from tests.harness.wsclient import ws_connect
    from tests.test_churn import Addr

    token = _token(["w1"], "amp")
    async with ws_connect(Addr(gw), "w1", token) as client:
        for i in range(50):
            await client.subscribe(f"events:other{i}")
        await client.subscribe("events:t")
        (conn,) = gw.connections
        session_id = conn.session.id
    await _until(lambda: not gw.connections, what="the connection to end")
    since = gw.hub.workspaces["w1"].history.floor  # no gap: every event after it is retained
    for i in range(200):
        gw.hub.deliver(_event(i))

    tries = [0]
    view = Subscription.view

    def counting(self, event):
        tries[0] += 1
        return view(self, event)

    monkeypatch.setattr(Subscription, "view", counting)
    async with ws_connect(Addr(gw), "w1") as client:
        await client.send({"type": "auth", "token": token, "resume": session_id, "since": since})
        assert (await client.recv_type("auth_ok"))["resumed"] is True
        seqs = [(await client.recv_event())["seq"] for _ in range(200)]
    assert seqs == sorted(seqs)
    assert tries[0] == 200, f"{tries[0]} tries for 200 events"


async def test_a_paced_replay_to_a_client_that_takes_nothing_backs_off(tmp_path):
    """A replay larger than a piece waits for the client to take each one, looking at the send
    buffer every 2 ms. A client that subscribed with `since` to a large history and then read
    nothing (a ping frame now and then keeps it from the idle timeout, and the pacing keeps its
    buffer below the 1013 bound) was looked at 500 times a second for as long as it stayed:
    a subject's thousand connections so made were 500,000 wake-ups a second of the loop. While
    the client takes nothing, the wait between looks now doubles, up to _REPLAY_POLL_MAX; once
    it reads, the replay goes on and ends as before."""
    gw = Gateway(_cfg(tmp_path, RT_SEND_BUFFER_BYTES="65536", RT_HISTORY_EVENTS="10000",
                      RT_MAX_CONNECTIONS_PER_SUBJECT="10"))
    await gw.start()
    s = drain = None
    try:
        for i in range(3000):
            gw.hub.deliver(_event(i))
        since = gw.hub.workspaces["w1"].history.floor
        s = await _raw_upgrade(gw.port, "w1", _token(["w1"], "amp"), rcvbuf=4096)
        await _until(lambda: any(c.identity is not None for c in gw.connections), what="auth")
        (conn,) = gw.connections
        # A network path rather than loopback's large buffers: what the client has not read
        # stays in the gateway's send buffer.
        conn._raw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        subscribe = {"type": "subscribe", "channel": "events:t", "since": since}
        await asyncio.get_running_loop().sock_sendall(s, _masked_text(json.dumps(subscribe).encode()))
        cap = connection_module._REPLAY_POLL_MAX
        await _until(lambda: conn._replay_wait == cap, what="the wait between looks to reach its cap")
        index = gw.hub.workspaces["w1"].index
        assert len(index) == 0  # the replay is under way: the subscription waits for its end
        drain = Drain(s)
        await _until(lambda: len(index) == 1, what="the replay to end once the client reads")
        assert not conn.closed
    finally:
        if drain is not None:
            await drain.close()
        elif s is not None:
            s.close()
        await gw.shutdown()
