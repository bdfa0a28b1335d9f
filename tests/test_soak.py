"""Soak: a real `rtserver serve` subprocess, fed by PostgreSQL, MongoDB and the publish API,
driven over real sockets through many cycles of everything a client does, then checked for
what the cycles left behind in the process: open file descriptors, its own gauges (connections,
subscriptions, suspended sessions, sockets, queues), threads. RSS is reported, not asserted
(the allocator keeps what it took).

Two equal phases follow a warm-up (lazily created objects, pools, the histories filling up);
after each the gateway is let settle (every client gone, sessions past resume_ttl) and the
second phase must end where the first did, within a margin far below one descriptor per
cycle. Knobs for a longer run by hand:

    RT_SOAK_CYCLES=200 RT_SOAK_PARALLEL=4 python -m pytest -q -p no:cacheprovider tests/test_soak.py -s

RT_SOAK_CYCLES: cycles per phase (default 12); RT_SOAK_PARALLEL: cycles run at once (default 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time

import asyncpg
import pytest
from pymongo import AsyncMongoClient

from tests.harness.prometheus import parse_exposition
from tests.harness.wsclient import Client, ws_connect
from tests.test_churn import _masked_text, _raw_upgrade, _reset
from tests.test_scaleout import cluster  # noqa: F401 - the Kafka soak's fixture

# A longer run by hand gets a longer timeout (pytest-timeout's default is 120 s).
pytestmark = [pytest.mark.postgres]

CYCLES = int(os.environ.get("RT_SOAK_CYCLES", "12"))
PARALLEL = int(os.environ.get("RT_SOAK_PARALLEL", "2"))
RESUME_TTL = 1.0
QUOTA = 3  # connections per subject (a cycle's subjects are its own: _cycle's slot)
pytestmark.append(pytest.mark.timeout(max(120, 6 * CYCLES // max(1, PARALLEL // 2) + 60)))
# Gauges that must be back at these values once every client has left (the scrape reading them
# is itself one HTTP connection).
SETTLED = {
    "rt_connections": 0, "rt_subscriptions": 0, "rt_suspended_sessions": 0, "rt_http_connections": 1,
    "rt_closing_connections": 0, "rt_write_queue_frames": 0, "rt_write_backlog": 0,
    "rt_pipelined_publish_bytes": 0, "rt_pipelined_publish_paused_connections": 0,
    "rt_audit_backlog": 0, "rt_source_streamed_open": 0,
}


@pytest.fixture
async def soak_gateway(gateway_factory, pg_database, mongo_server):
    # A pool: cycles run at once, and one connection takes one statement at a time.
    db = await asyncpg.create_pool(pg_database, min_size=1, max_size=PARALLEL)
    await db.execute("CREATE TABLE items (id serial PRIMARY KEY, kind text, n int)")
    mongo = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    await mongo["w1"].orders.insert_one({"_id": "seed"})
    gw = await gateway_factory(env={
        "RT_POSTGRES_URL": pg_database, "RT_MONGO_URL": mongo_server.url, "RT_INSTANCE": "soak",
        "RT_RESUME_TTL": str(RESUME_TTL), "RT_AUTH_TIMEOUT": "0.5", "RT_MIN_REFRESH_INTERVAL": "0",
        "RT_SEND_BUFFER_BYTES": "65536", "RT_HISTORY_EVENTS": "64", "RT_MAX_PUBLISH_BYTES": "65536",
        "RT_MAX_CONNECTIONS_PER_SUBJECT": str(QUOTA),
        "RT_LOG_LEVEL": "warning",
    })
    await gw.wait_ready()
    try:
        yield gw, db, mongo["w1"]
    finally:
        await db.close()
        await mongo.close()


async def _metrics(gw) -> dict[str, float]:
    status, body = await gw.get("/metrics")
    assert status == 200, body
    return parse_exposition(body.decode())


def _gauge(samples: dict[str, float], name: str) -> float:
    """The sum of a family's samples (labelled or not)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def _proc(gw) -> dict[str, int]:
    pid = gw.proc.pid
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(status["Threads"]),
            "rss_kib": int(status["VmRSS"].split()[0])}


async def _settled(gw, timeout: float = 60) -> dict[str, float]:
    """The gauges once every client has left and every session expired: fails naming those
    that did not return to SETTLED within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await _metrics(gw)
        off = {k: _gauge(samples, k) for k, want in SETTLED.items() if _gauge(samples, k) != want}
        if not off:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"gauges not back at rest after {timeout} s: {off}")
        await asyncio.sleep(0.2)


async def _raw_publish(port: int, request: bytes) -> bytes:
    """One HTTP/1.1 request on a connection of its own; the answer's status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return head.split(b"\r\n", 1)[0]
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _post(workspace: str, topic: str, body: bytes, token: str | None, length: int | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST /workspaces/{workspace}/realtime/events/{topic} HTTP/1.1\r\nHost: t\r\n{auth}"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


async def _until(cond, timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _recv_until(c: Client, pred, timeout: float = 20) -> dict:
    """The first message `pred` accepts; other events in between (another cycle's) are skipped."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await c.recv(timeout=max(0.1, deadline - time.monotonic()))
        if pred(msg):
            return msg


_TOKENS: dict[tuple, str] = {}


def _token(gw, workspace: str, sub: str, **claims) -> str:
    """A token per subject, made once: the gateway remembers verified tokens (a bounded LRU of
    4096), and a token per cycle would fill it, as growth of RSS the cycles do not leave."""
    key = (gw.port, workspace, sub, tuple(sorted(claims.items())))
    if key not in _TOKENS:
        _TOKENS[key] = gw.token(workspace, sub=sub, **claims)
    return _TOKENS[key]


async def _cycle(gw, db, mongo, tag: str, slot: int) -> None:
    """One cycle; every connection it opens has ended when it returns. `slot` names its
    subjects (a few, reused by later cycles: _token)."""
    sub = f"soak-{slot}"
    token = _token(gw, "w1", sub)
    pub_token = _token(gw, "w1", f"pub-{slot}", publish=True)
    port = gw.port

    async with ws_connect(gw, "w1", token=token) as c:
        await c.subscribe("postgres:items", {"operations": ["INSERT"], "predicates": {"kind": tag}})
        await c.subscribe("mongo:orders", {"predicates": {"tag": tag}})
        await c.subscribe("events:orders", {"predicates": {"tag": tag}})
        await c.subscribe("events:*", {"operations": ["PUBLISH"], "entity": "other"})
        await db.execute("INSERT INTO items (kind, n) VALUES ($1, 1)", tag)
        await mongo.orders.insert_one({"tag": tag, "n": 1})
        seq = (await gw.publish("w1", "orders", {"tag": tag}, token=pub_token))["seq"]
        got = set()
        while len(got) < 3:
            ev = await _recv_until(c, lambda m: m.get("type") == "event")
            got.add(ev["channel"])
        assert got == {"postgres:items", "mongo:orders", "events:orders"}, got
        await c.send({"type": "unsubscribe", "channel": "events:*"})
        await _recv_until(c, lambda m: m.get("type") == "unsubscribed")
        await c.subscribe("events:*", {"entity": "other", "predicates": {"tag": tag}})  # resubscribe
        await c.subscribe("events:orders", {"predicates": {"tag": {"$in": [tag, "x"]}}})  # replaces
        await c.send({"type": "auth", "token": token})  # refresh
        session = (await _recv_until(c, lambda m: m.get("type") == "auth_ok"))["sessionId"]
        # Abrupt: half a frame, then the connection is cut under the client.
        c.ws.transport.write(_masked_text(b'{"type":"ping","id":"cut"}')[:9])
        c.ws.transport.abort()

    # Resume with `since` (the missed event replayed), then without.
    async def resumable() -> bool:
        return _gauge(await _metrics(gw), "rt_suspended_sessions") >= 1
    await _until(resumable, what="the cut session to be suspended")
    seq2 = (await gw.publish("w1", "orders", {"tag": tag, "missed": True}, token=pub_token))["seq"]
    async with ws_connect(gw, "w1") as c:
        ok = await c.auth(token, resume=session, since=seq)
        assert ok["resumed"] is True and ok["sessionId"] == session
        ev = await _recv_until(c, lambda m: m.get("type") == "event" and m.get("seq") == seq2)
        assert ev["payload"]["missed"] is True
        await c.send({"type": "ping"})
        await _recv_until(c, lambda m: m.get("type") == "pong")
    async with ws_connect(gw, "w1") as c:
        ok = await c.auth(token, resume=session)
        assert ok["resumed"] is True
        await c.send({"type": "unsubscribe", "channel": "mongo:orders"})
        await _recv_until(c, lambda m: m.get("type") == "unsubscribed")
    # A session left to expire (resume_ttl), header auth.
    async with ws_connect(gw, "w1", token=token, header_auth=True) as c:
        await c.recv_type("auth_ok")
        await c.subscribe("events:orders")

    # Closed during auth, during a subscribe (a database check of the table), during a replay.
    s = await _raw_upgrade(port, "w1")
    await asyncio.get_running_loop().sock_sendall(s, _masked_text(json.dumps({"type": "auth", "token": token}).encode()))
    _reset(s)
    s = await _raw_upgrade(port, "w1", token)
    await asyncio.get_running_loop().sock_sendall(
        s, _masked_text(json.dumps({"type": "subscribe", "channel": "postgres:items"}).encode()))
    _reset(s)
    s = await _raw_upgrade(port, "w1", token)
    await asyncio.get_running_loop().sock_sendall(
        s, _masked_text(json.dumps({"type": "subscribe", "channel": "events:*", "since": 0}).encode()))
    _reset(s)

    # Failed auth: a bad signature, another workspace, no auth in time.
    async with ws_connect(gw, "w1") as c:
        await c.send({"type": "auth", "token": _token(gw, "w1", sub, secret="another-secret-0123456789abcdef01")})
        assert (await c.expect_close())[0] == 4002
    async with ws_connect(gw, "w1") as c:
        await c.send({"type": "auth", "token": _token(gw, "w9", sub)})
        assert (await c.expect_close())[0] == 4003
    async with ws_connect(gw, "w1") as c:
        assert (await c.expect_close())[0] == 4002

    # Closed by the gateway: at the token's exp (4001), for invalid messages (1008), for a
    # message too big (1009), over the subject's connections (4008).
    async with ws_connect(gw, "w1", token=gw.token("w1", sub=f"exp-{slot}", ttl=2)) as c:
        await c.subscribe("events:orders")
        assert (await c.expect_close(timeout=10))[0] == 4001
    async with ws_connect(gw, "w1", token=token) as c:
        for _ in range(20):
            await c.send("not json")
        assert (await c.expect_close())[0] == 1008
    async with ws_connect(gw, "w1", token=token) as c:
        # The header of a 2 MiB frame: refused unread. Sent whole, the close could come while
        # the client was still writing it, and a reset discard it.
        c.ws.transport.write(bytes([0x81, 0xFF]) + (2 << 20).to_bytes(8, "big") + b"mask" + b"x" * 16)
        assert (await c.expect_close())[0] == 1009
    async with contextlib.AsyncExitStack() as stack:
        quota = _token(gw, "w1", f"quota-{slot}")
        for _ in range(QUOTA):
            await stack.enter_async_context(ws_connect(gw, "w1", token=quota))
        async with ws_connect(gw, "w1") as c:
            await c.send({"type": "auth", "token": quota})
            assert (await c.expect_close())[0] == 4008

    # Publish over HTTP: good and bad requests, each on a connection of its own.
    body = json.dumps({"tag": tag}).encode()
    assert (await _raw_publish(port, _post("w1", "orders", body, pub_token))).startswith(b"HTTP/1.1 202")
    assert b" 400 " in await _raw_publish(port, _post("w1", "orders", b"{not json", pub_token))
    assert b" 400 " in await _raw_publish(port, _post("w1", "bad topic!", body, pub_token))
    assert b" 401 " in await _raw_publish(port, _post("w1", "orders", body, None))
    assert b" 401 " in await _raw_publish(port, _post("w1", "orders", body, "not.a.token"))
    assert b" 403 " in await _raw_publish(port, _post("w1", "orders", body, token))  # no publish claim
    assert b" 413 " in await _raw_publish(port, _post("w1", "orders", b"", pub_token, length=1 << 20))
    # A request cut in the middle of its body.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_post("w1", "orders", b'{"tag"', pub_token, length=100))
    await writer.drain()
    writer.transport.abort()

    # A slow reader (a small receive buffer, never read) is closed with 1013: one at a time, so
    # that the drop counted is this one's.
    async with _SLOW:
        await _slow_reader(gw, tag, slot, pub_token)


_SLOW = asyncio.Lock()


async def _slow_reader(gw, tag: str, slot: int, pub_token: str) -> None:
    port = gw.port
    slow = await _raw_upgrade(port, "w1", _token(gw, "w1", f"slow-{slot}"), rcvbuf=4096)
    try:
        await asyncio.get_running_loop().sock_sendall(
            slow, _masked_text(json.dumps({"type": "subscribe", "channel": f"events:big-{tag}"}).encode()))
        drops = _gauge(await _metrics(gw), "rt_drops_total")
        for i in range(400):
            await gw.publish("w1", f"big-{tag}", {"blob": "x" * 30000, "i": i}, token=pub_token)
            if i % 4 == 3 and _gauge(await _metrics(gw), "rt_drops_total") > drops:
                break
        else:
            raise AssertionError("the slow reader was never closed")
    finally:
        _reset(slow)


async def _phase(gw, db, mongo, name: str, cycles: int) -> None:
    sem = asyncio.Semaphore(PARALLEL)

    async def one(i: int) -> None:
        async with sem:
            await _cycle(gw, db, mongo, f"{name}{i}", i % (2 * PARALLEL))

    await asyncio.gather(*(one(i) for i in range(cycles)))


async def test_soak_leaves_no_descriptors_or_gauges_behind(soak_gateway):
    gw, db, mongo = soak_gateway
    await _phase(gw, db, mongo, "warm", max(2, CYCLES // 2))
    await _settled(gw)
    start, start_m = _proc(gw), await _settled(gw)
    await _phase(gw, db, mongo, "a", CYCLES)
    await _settled(gw)
    mid = _proc(gw)
    await _phase(gw, db, mongo, "b", CYCLES)
    end_m = await _settled(gw)
    end = _proc(gw)
    print(f"soak: {CYCLES} cycles a phase, {PARALLEL} at once; start {start}, after a {mid}, after b {end};"
          f" RSS growth over b {end['rss_kib'] - mid['rss_kib']} KiB", file=sys.stderr)
    # A descriptor a cycle is a leak; a couple either way is a pool (PyMongo's, asyncpg's) or a
    # socket the kernel has not finished closing.
    margin = 3 + CYCLES // 20
    assert end["fds"] - start["fds"] <= margin, (start, mid, end)
    assert end["fds"] - mid["fds"] <= margin, (mid, end)
    assert end["threads"] <= start["threads"] + 2, (start, end)
    assert _gauge(end_m, "rt_workspaces") == _gauge(start_m, "rt_workspaces")
    assert _gauge(end_m, "rt_drops_total") >= 2 * CYCLES
    # Nothing asserted on rt_audit_*: audit records are logged (no Kafka), written on a thread.



async def _kafka_cycle(gw, db, tag: str, slot: int, first_seq: int) -> None:
    """One cycle against a node on the Kafka bus: reads back from Kafka (the node remembers two
    events), and leaves during a read-back."""
    token = _token(gw, "w1", f"k-{slot}")
    pub_token = _token(gw, "w1", f"kpub-{slot}", publish=True)
    async with ws_connect(gw, "w1", token=token) as c:
        await c.subscribe("postgres:orders", {"predicates": {"note": tag}})
        await c.subscribe("events:x", {"predicates": {"tag": tag}})
        await db.execute("INSERT INTO orders (note) VALUES ($1)", tag)
        seq = (await gw.publish("w1", "x", {"tag": tag}, token=pub_token))["seq"]
        unseen = (await gw.publish("w1", "y", {"tag": tag}, token=pub_token))["seq"]
        got = set()
        while len(got) < 2:
            got.add((await _recv_until(c, lambda m: m.get("type") == "event"))["channel"])
        # Read back from Kafka (older than the node's memory) what events:x did not show.
        await c.send({"type": "subscribe", "channel": "events:*", "since": first_seq,
                      "filter": {"predicates": {"tag": tag}}})
        await _recv_until(c, lambda m: m.get("type") == "event" and m.get("seq") == unseen)
        session = (await c.auth(token))["sessionId"]
        c.ws.transport.abort()
    async def resumable() -> bool:
        return _gauge(await _metrics(gw), "rt_suspended_sessions") >= 1
    await _until(resumable, what="the cut session to be suspended")
    async with ws_connect(gw, "w1") as c:
        assert (await c.auth(token, resume=session, since=first_seq))["resumed"] is True
        await _recv_until(c, lambda m: m.get("type") == "event" and m.get("seq") == seq)
    # Gone during a read-back.
    s = await _raw_upgrade(gw.port, "w1", token)
    await asyncio.get_running_loop().sock_sendall(
        s, _masked_text(json.dumps({"type": "subscribe", "channel": "events:*", "since": first_seq}).encode()))
    _reset(s)
    assert b" 400 " in await _raw_publish(gw.port, _post("w1", "x", b"{not json", pub_token))
    assert b" 401 " in await _raw_publish(gw.port, _post("w1", "x", b"{}", None))


@pytest.mark.kafka
async def test_soak_kafka_node_and_ingest_leave_nothing_behind(cluster):  # noqa: F811
    from tests.test_scaleout import wait_ready

    await cluster.db.execute("DROP TABLE orders")
    await cluster.db.execute("CREATE TABLE orders (id serial PRIMARY KEY, note text)")
    ingest = await cluster.ingest()
    await ingest.wait_active()
    gw = await cluster.node(RT_HISTORY_EVENTS="2", RT_RESUME_TTL=str(RESUME_TTL), RT_LOG_LEVEL="warning")
    await wait_ready(gw)
    first_seq = (await gw.publish("w1", "x", {"tag": "first"}))["seq"] - 1
    db = cluster.db
    lock = asyncio.Lock()  # one asyncpg connection: one statement at a time

    class Serialized:
        async def execute(self, *args):
            async with lock:
                return await db.execute(*args)

    async def phase(name: str, cycles: int) -> None:
        sem = asyncio.Semaphore(PARALLEL)

        async def one(i: int) -> None:
            async with sem:
                await _kafka_cycle(gw, Serialized(), f"{name}{i}", i % (2 * PARALLEL), first_seq)

        await asyncio.gather(*(one(i) for i in range(cycles)))

    def ingest_fds() -> int:
        return len(os.listdir(f"/proc/{ingest.proc.pid}/fd"))

    settled = {k: v for k, v in SETTLED.items() if k != "rt_source_streamed_open"}

    async def at_rest() -> dict[str, int]:
        deadline = time.monotonic() + 60
        while True:
            samples = await _metrics(gw)
            off = {k: _gauge(samples, k) for k, want in settled.items() if _gauge(samples, k) != want}
            if not off:
                return {**_proc(gw), "ingest_fds": ingest_fds()}
            assert time.monotonic() < deadline, f"gauges not back at rest: {off}"
            await asyncio.sleep(0.2)

    await phase("warm", max(2, CYCLES // 2))
    start = await at_rest()
    await phase("a", CYCLES)
    mid = await at_rest()
    await phase("b", CYCLES)
    end = await at_rest()
    print(f"kafka soak: start {start}, after a {mid}, after b {end}", file=sys.stderr)
    margin = 3 + CYCLES // 20
    for key in ("fds", "ingest_fds"):
        assert end[key] - start[key] <= margin and end[key] - mid[key] <= margin, (key, start, mid, end)
    assert end["threads"] <= start["threads"] + 2, (start, end)
