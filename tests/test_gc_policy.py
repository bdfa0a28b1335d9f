"""Garbage-collector behaviour the gateway relies on: survivors of full passes are frozen
(rtserver.gc_policy), a finished connection's front protocol is freed without the cyclic
collector, and /metrics reports collections and pauses."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import uvloop

from rtserver import config, http
from rtserver.gc_policy import FreezeSurvivors
from rtserver.metrics import Metrics
from tests.harness.wsclient import ws_connect
from tests.test_http_pipelining import RecordingTransport, make_gateway, publish_request


class Survivor:
    """A tracked object (instances of Python classes are)."""


async def test_survivors_of_a_full_pass_are_frozen_and_stop_unfreezes():
    policy = FreezeSurvivors()
    try:
        policy.start()
        frozen_at_start = gc.get_freeze_count()
        assert frozen_at_start > 0 and policy.freezes == 1
        # counted as they are frozen, without walking the permanent generation (give or take
        # the few temporaries the count itself makes)
        assert abs(policy.frozen - frozen_at_start) < 50
        keep = [Survivor() for _ in range(1000)]
        gc.collect(1)  # a young pass: nothing is frozen after it
        await asyncio.sleep(0)
        assert policy.freezes == 1 and gc.get_freeze_count() <= frozen_at_start
        gc.collect(2)
        await asyncio.sleep(0)  # the freeze runs on the loop right after the pass
        assert policy.freezes == 2
        assert gc.get_freeze_count() >= frozen_at_start + len(keep)
        assert abs(policy.frozen - gc.get_freeze_count()) < 50
    finally:
        policy.stop()
    assert gc.get_freeze_count() == 0 and policy._on_gc not in gc.callbacks


async def test_a_finished_connection_needs_no_cyclic_collection(tmp_path):
    """The httptools parser holds bound methods of its protocol; the protocol drops it (and
    its transport) when the connection ends, so reference counting frees all three."""
    gw = make_gateway(tmp_path)
    gc.disable()
    try:
        proto = http.FrontProtocol(gw)
        transport = RecordingTransport()
        proto.connection_made(transport)
        proto.data_received(publish_request(0))
        assert b"HTTP/1.1 202" in transport.data
        gone = weakref.ref(proto)
        proto.connection_lost(None)
        del proto
        assert gone() is None
    finally:
        gc.enable()


async def test_gc_collections_and_pauses_are_counted():
    m = Metrics()
    m.watch_gc()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        m.unwatch_gc()
    gc.collect(2)  # not counted once unwatched
    assert m.gc_collections[0] >= 1 and m.gc_collections[2] == 1
    assert m.gc_seconds[2] > 0
    text = m.render().decode()
    assert 'rt_gc_collections_total{generation="2"} 1' in text
    assert 'rt_gc_pause_seconds_total{generation="2"}' in text


async def test_the_gateway_freezes_by_default_and_not_when_told(gateway_factory):
    """rt_gc_frozen_objects (counted by the policy as it freezes): the start-up objects at
    least with the policy, none without."""
    for env, expect_frozen in (({}, True), ({"RT_GC_FREEZE": "false"}, False)):
        gw = await gateway_factory(env=env)
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
            await c.subscribe("events:x")
            _, body = await gw.get("/metrics")
        frozen = [ln for ln in body.decode().splitlines() if ln.startswith("rt_gc_frozen_objects ")]
        assert frozen, body
        value = float(frozen[0].split()[1])
        assert (value > 1000) if expect_frozen else (value == 0), (env, value)


def test_the_setting():
    assert config.load(environ={}).server.gc_freeze is True
    assert config.load(environ={"RT_GC_FREEZE": "false"}).server.gc_freeze is False


_CLIENTS = """
import asyncio, json, sys
import websockets

async def main(url, token, n):
    loop = asyncio.get_running_loop()
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "connect":
        clients = []
        for i in range(n):
            ws = await websockets.connect(url, additional_headers={"Authorization": "Bearer " + token})
            await ws.send(json.dumps({"type": "subscribe", "channel": "events:t", "filter": {"predicates": {"g": i}}}))
            while json.loads(await ws.recv())["type"] != "subscribed":
                pass
            clients.append(ws)
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        for ws in clients:
            await ws.close()
        print("closed", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.fixture
def uvloop_policy():
    """The gateway's own event loop (rtserver serve runs uvloop). asyncio's selector transport
    leaves a reference cycle per closed socket; uvloop's does not."""
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    yield
    asyncio.set_event_loop_policy(policy)


def test_connections_that_come_and_go_leave_nothing_frozen_behind(tmp_path, uvloop_policy):
    asyncio.run(_come_and_go(tmp_path))


async def _come_and_go(tmp_path) -> None:
    """With the policy on, a full pass while clients are connected freezes their objects; once
    they have gone (and their sessions expired) the frozen set is back where it was: nothing
    of a finished connection depends on the cyclic collector, which no longer sees it. The
    clients run in another process, so that only the gateway's objects are counted."""
    import sys

    import jwt

    from rtserver.app import Gateway

    secret = "churn-test-secret-0123456789abcdef"
    cfg = config.load(environ={"RT_AUTH_HS256_SECRET": secret, "RT_STATE_DIR": str(tmp_path), "RT_PORT": "0",
                               "RT_RESUME_TTL": "0.2", "RT_MAX_CONNECTIONS_PER_SUBJECT": "1000"})
    gw = Gateway(cfg)
    await gw.start()
    token = jwt.encode({"sub": "u", "workspaces": ["w1"], "exp": 4102444800}, secret, algorithm="HS256")
    url = f"ws://127.0.0.1:{gw.port}/workspaces/w1/realtime/connect"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CLIENTS, url, token, "100",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        counts = await _freeze_counts(proc, 100, lambda: not gw.connections and len(gw.sessions) == 0,
                                      opened=lambda: len(gw.connections) == 100)
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 30)
        # the first round leaves lazily created objects (measured: ~60); then it is flat
        assert counts[2] - counts[1] <= 20 and counts[1] - counts[0] <= 200, counts
    finally:
        await gw.shutdown()


async def _freeze_counts(proc, connections: int, at_rest, opened=lambda: True, settle: float = 0.0,
                         after=lambda: None) -> list[int]:
    """gc's frozen count after each of three rounds of `proc` (a client script answering
    "connect" with "ready" and "close" with "closed"): each round's open connections must be
    frozen (about 20 objects each), and all must end (`at_rest()`) before the count is taken."""
    counts = []
    for _ in range(3):
        proc.stdin.write(b"connect\n")
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
        assert opened()
        before_pass = gc.get_freeze_count()
        gc.collect()
        await asyncio.sleep(0)
        assert gc.get_freeze_count() > before_pass + connections * 20  # the open connections were frozen
        proc.stdin.write(b"close\n")
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"closed\n"
        for _ in range(200):
            await asyncio.sleep(0.05)
            if at_rest():
                break
        assert at_rest()
        await asyncio.sleep(settle)
        after()
        counts.append(gc.get_freeze_count())
    return counts


_PATHS = """
import asyncio, json, socket, sys, time
import jwt, websockets

URL, PORT, SECRET = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def token(sub, ttl=3600, **claims):
    return jwt.encode({"sub": sub, "workspaces": ["w1"], "exp": int(time.time() + ttl), **claims}, SECRET,
                      algorithm="HS256")

PUB = token("pub", realtime_publish=True)

async def publish(topic, payload):
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
    body = json.dumps(payload).encode()
    writer.write(f"POST /workspaces/w1/realtime/events/{topic} HTTP/1.1\\r\\nHost: t\\r\\n"
                 f"Authorization: Bearer {PUB}\\r\\nContent-Length: {len(body)}\\r\\n\\r\\n".encode() + body)
    head = await reader.readuntil(b"\\r\\n\\r\\n")
    assert head.startswith(b"HTTP/1.1 202"), head
    writer.close()

async def drops():
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
    writer.write(b"GET /metrics HTTP/1.1\\r\\nHost: t\\r\\nConnection: close\\r\\n\\r\\n")
    text = (await reader.read()).decode()
    writer.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("rt_drops_total"))

async def until(ws, type_):
    while True:
        msg = json.loads(await ws.recv())
        if msg["type"] == type_:
            return msg

def masked(payload):
    n = len(payload)
    return bytes([0x81, 0x80 | n]) + b"\\0\\0\\0\\0" + payload

async def raw(sub, rcvbuf=None):
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await loop.sock_connect(s, ("127.0.0.1", PORT))
    auth = f"Authorization: Bearer {token(sub)}\\r\\n" if sub else ""
    await loop.sock_sendall(s, (f"GET /workspaces/w1/realtime/connect HTTP/1.1\\r\\nHost: t\\r\\nUpgrade: websocket\\r\\n"
        f"Connection: Upgrade\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\nSec-WebSocket-Version: 13\\r\\n"
        f"{auth}\\r\\n").encode())
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        head += await loop.sock_recv(s, 1)
    return s

def reset(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\x01\\0\\0\\0\\0\\0\\0\\0")
    s.close()

async def main():
    loop = asyncio.get_running_loop()
    r = 0
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "connect":
        r += 1
        for i in range(5):
            await publish("t", {"g": i})
        plain, cut, expiring, raws = [], [], [], []
        for i in range(10):
            # subscribed, filters replaced, unsubscribed, refreshed, a replay with since
            ws = await websockets.connect(URL)
            await ws.send(json.dumps({"type": "auth", "token": token(f"u{i}")}))
            session = (await until(ws, "auth_ok"))["sessionId"]
            await ws.send(json.dumps({"type": "subscribe", "channel": "events:t", "filter": {"predicates": {"g": i}}}))
            await until(ws, "subscribed")
            await ws.send(json.dumps({"type": "subscribe", "channel": "events:*", "since": 0}))
            await until(ws, "subscribed")
            await ws.send(json.dumps({"type": "subscribe", "channel": "events:t", "filter": {"predicates": {"g": -i}}}))
            await until(ws, "subscribed")
            await ws.send(json.dumps({"type": "unsubscribe", "channel": "events:*"}))
            await until(ws, "unsubscribed")
            await ws.send(json.dumps({"type": "auth", "token": token(f"u{i}")}))
            await until(ws, "auth_ok")
            await ws.close()
            # the session resumed, with a replay
            ws = await websockets.connect(URL)
            await ws.send(json.dumps({"type": "auth", "token": token(f"u{i}"), "resume": session, "since": 0}))
            assert (await until(ws, "auth_ok"))["resumed"]
            plain.append(ws)
            # header auth, left to be cut
            ws = await websockets.connect(URL, additional_headers={"Authorization": "Bearer " + token(f"c{i}")})
            await until(ws, "auth_ok")
            await ws.send(json.dumps({"type": "subscribe", "channel": "events:*"}))
            await until(ws, "subscribed")
            cut.append(ws)
            # closed by the gateway at exp
            ws = await websockets.connect(URL)
            await ws.send(json.dumps({"type": "auth", "token": token(f"e{i}", ttl=4)}))
            await until(ws, "auth_ok")
            expiring.append(ws)
            # not authenticated yet; and a slow reader
            raws.append(await raw(None))
            s = await raw(f"s{i}", rcvbuf=4096)
            await loop.sock_sendall(s, masked(json.dumps({"type": "subscribe", "channel": "events:big"}).encode()))
            raws.append(s)
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        for ws in plain:
            await ws.close()
        for ws in cut:
            ws.transport.abort()
        for i in range(2000):  # until the slow readers are closed with 1013
            await publish("big", {"blob": "x" * 30000, "i": i})
            if i % 10 == 9 and await drops() >= 10 * r:
                break
        for ws in expiring:
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as exc:
                assert exc.rcvd.code == 4001, exc
        for s in raws:
            reset(s)
        print("closed", flush=True)

asyncio.run(main())
"""


def test_every_way_a_connection_ends_leaves_nothing_frozen_behind(tmp_path, uvloop_policy):
    asyncio.run(_every_way(tmp_path))


async def _every_way(tmp_path) -> None:
    """As _come_and_go, through more of a connection's life: filters replaced, an unsubscribe,
    a token refresh, a replay with `since`, a resumed session, header auth, a cut connection,
    a close at the token's exp (4001), one never authenticated, a slow reader closed with 1013,
    and publishers' HTTP connections. Each round freezes what is open; once it has all ended
    (and the sessions expired) the frozen set is back where it was."""
    import sys

    from rtserver.app import Gateway

    secret = "churn-test-secret-0123456789abcdef"
    cfg = config.load(environ={"RT_AUTH_HS256_SECRET": secret, "RT_STATE_DIR": str(tmp_path), "RT_PORT": "0",
                               "RT_RESUME_TTL": "0.2", "RT_SEND_BUFFER_BYTES": "65536", "RT_HISTORY_EVENTS": "16",
                               "RT_MIN_REFRESH_INTERVAL": "0", "RT_AUTH_TIMEOUT": "60"})
    gw = Gateway(cfg)
    await gw.start()
    url = f"ws://127.0.0.1:{gw.port}/workspaces/w1/realtime/connect"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PATHS, url, str(gw.port), secret,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        def forget_tokens() -> None:
            # The verified tokens are remembered (a bounded LRU), each round's anew: not counted.
            gw.auth._verified.clear()
            gw.auth._verified_bytes = 0

        counts = await _freeze_counts(
            proc, 30,
            lambda: not gw.connections and len(gw.sessions) == 0 and not gw.closing_sockets and not gw.http_sockets,
            settle=0.2, after=forget_tokens)
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 30)
        assert gw.metrics.drops_slow_reader == 30, gw.metrics.drops_slow_reader
        # the first round leaves lazily created objects (measured: ~60); then it is flat
        assert counts[2] - counts[1] <= 20 and counts[1] - counts[0] <= 200, counts
    finally:
        await gw.shutdown()
