"""Delivery under subscription churn: subscribes, filter replacements and unsubscribes
pipelined between a burst of publishes, checked against a model of what each client must get.

A real `rtserver serve` subprocess; clients are the `websockets` library, the publisher a
keep-alive HTTP connection. The model reads each client's stream in order: an `event` must
match a subscription the client holds at that point of its stream (its replies come in order
with its events), arrive once, in seq order, and every event between two positions the stream
reports (a `subscribed` or `pong` seq) that matches what the client held throughout is there.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from typing import Any

from tests.harness.wsclient import ws_connect

TOPICS = ("a", "b", "c")
MAX_SUBSCRIPTIONS = 2  # of the three channels the clients churn: some subscribes get 4008


class Publisher:
    """A keep-alive HTTP connection to the publish API; answers (seq, topic, payload)."""

    def __init__(self, gw: Any, workspace: str):
        self.gw = gw
        self.workspace = workspace
        self.token = gw.token(workspace, sub="publisher", publish=True)
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.published: list[tuple[int, str, Any]] = []

    async def publish(self, topic: str, payload: Any) -> int:
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.gw.port)
        reader, writer = self.streams
        body = json.dumps(payload).encode()
        writer.write(
            f"POST /workspaces/{self.workspace}/realtime/events/{topic} HTTP/1.1\r\nHost: t\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answer = json.loads(await reader.readexactly(length))
        assert head.startswith(b"HTTP/1.1 202"), (head, answer)
        self.published.append((answer["seq"], topic, payload))
        return answer["seq"]

    async def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


def _random_subscribe(rng: random.Random) -> dict[str, Any]:
    channel = rng.choice(("events:*", "events:a", "events:b"))
    flt: dict[str, Any] = {}
    kind = rng.randrange(5)
    if kind == 1:
        flt["predicates"] = {"k": rng.randrange(3)}
    elif kind == 2:
        flt["predicates"] = {"k": {"$in": rng.sample(range(3), 2)}}
    elif kind == 3:
        flt["predicates"] = {"k": {"$ne": rng.randrange(3)}}
    elif kind == 4:
        flt["operations"] = [rng.choice(("PUBLISH", "INSERT"))]
    if channel == "events:*" and rng.random() < 0.3:
        flt["entity"] = rng.choice(TOPICS)
    msg: dict[str, Any] = {"type": "subscribe", "channel": channel}
    if flt:
        msg["filter"] = flt
    return msg


def _matches(sub: dict[str, Any], topic: str, payload: dict[str, Any]) -> bool:
    entity = sub["channel"].split(":", 1)[1]
    flt = sub.get("filter", {})
    entity = flt.get("entity", entity)
    if entity != "*" and entity != topic:
        return False
    if "PUBLISH" not in flt.get("operations", ["PUBLISH"]):
        return False
    pred = flt.get("predicates", {}).get("k")
    if pred is None:
        return True
    k = payload["k"]
    if isinstance(pred, int):
        return k == pred
    if "$in" in pred:
        return k in pred["$in"]
    return k != pred["$ne"]


def _check(
    stream: list[dict[str, Any]], sent: dict[Any, dict[str, Any]], published: list[tuple[int, str, Any]], who: str
) -> int:
    """Checks one client's stream against the model (`sent`: its messages by id); returns the
    events it received."""
    events = {seq: (topic, payload) for seq, topic, payload in published}
    held: dict[str, dict[str, Any]] = {}
    last_seq = 0
    mark: int | None = None  # the last position the stream reported
    since_mark: list[dict[str, dict[str, Any]]] = []  # what was held at each point since `mark`
    got: set[int] = set()
    received = 0
    for msg in stream:
        kind = msg["type"]
        if kind == "event":
            seq = msg["seq"]
            assert seq > last_seq, f"{who}: event {seq} after {last_seq} (duplicate or out of order)"
            last_seq = seq
            topic, payload = events[seq]
            assert any(_matches(s, topic, payload) for s in held.values()), (
                f"{who}: event {seq} {topic} {payload} matches none of {list(held.values())}"
            )
            got.add(seq)
            received += 1
            continue
        if kind == "subscribed":
            assert msg["channel"] in held or len(held) < MAX_SUBSCRIPTIONS, f"{who}: over the quota: {msg}"
            held[msg["channel"]] = sent[msg["id"]]
        elif kind == "error":
            assert msg["code"] == 4008, f"{who}: {msg}"
            assert msg["channel"] not in held and len(held) >= MAX_SUBSCRIPTIONS, f"{who}: {msg} with {held}"
        elif kind == "unsubscribed":
            held.pop(msg["channel"], None)
        since_mark.append(dict(held))
        if kind in ("subscribed", "pong"):
            position = msg["seq"]
            if mark is not None:
                # Every event in (mark, position] matching what was held throughout arrived.
                for seq, (topic, payload) in events.items():
                    if mark < seq <= position and all(
                        any(_matches(s, topic, payload) for s in state.values()) for state in since_mark
                    ):
                        assert seq in got, f"{who}: event {seq} {topic} {payload} missing (held {since_mark})"
            mark = position
            since_mark = [dict(held)]
    return received


async def _client(
    gw: Any, workspace: str, rng: random.Random, stop: asyncio.Event
) -> tuple[list[dict[str, Any]], dict[Any, dict[str, Any]]]:
    """Pipelines random subscribe/unsubscribe messages (each followed by a ping) until the
    publishers are done, then reads until a last pong; returns the stream and what was sent."""
    stream: list[dict[str, Any]] = []
    sent: dict[Any, dict[str, Any]] = {}
    async with ws_connect(gw, workspace, token=gw.token(workspace, sub=f"c-{rng.randrange(10**9)}")) as c:

        async def reader() -> None:
            while True:
                msg = await c.recv(timeout=10)
                stream.append(msg)
                if msg["type"] == "pong" and msg.get("id") == "end":
                    return

        task = asyncio.create_task(reader())
        i = 0
        while not stop.is_set():
            i += 1
            if rng.random() < 0.6:
                msg = _random_subscribe(rng)
            else:
                msg = {"type": "unsubscribe", "channel": rng.choice(("events:*", "events:a", "events:b"))}
            msg["id"] = i
            sent[i] = msg
            await c.send(msg)
            await c.send({"type": "ping"})
            if rng.random() < 0.5:
                await asyncio.sleep(0.001 * rng.randrange(3))
        await c.send({"type": "ping", "id": "end"})
        await task
    return stream, sent


async def _victim(gw: Any, workspace: str, rng: random.Random, stop: asyncio.Event) -> None:
    """A client that subscribes to everything, reads a little, and vanishes (a TCP reset)
    in the middle of the burst, while the others are being written to."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", gw.port))
    token = gw.token(workspace, sub=f"v-{rng.randrange(10**9)}")
    await loop.sock_sendall(sock, (
        f"GET /workspaces/{workspace}/realtime/connect HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode())
    for channel in ("events:*", "events:a"):
        payload = json.dumps({"type": "subscribe", "channel": channel}).encode()
        await loop.sock_sendall(sock, bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
    await asyncio.sleep(rng.random() * 0.05)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


async def _run(gateway: Any, seed: int) -> None:
    rng = random.Random(seed)
    pubs = {w: [Publisher(gateway, w) for _ in range(2)] for w in ("w1", "w2")}
    stop = asyncio.Event()

    async def publishing(pub: Publisher, n: int) -> None:
        for i in range(n):
            await pub.publish(rng.choice(TOPICS), {"n": i, "k": rng.randrange(3)})
            if rng.random() < 0.3:
                await asyncio.sleep(0)

    async def victims() -> None:
        while not stop.is_set():
            await _victim(gateway, rng.choice(("w1", "w2")), rng, stop)

    workspaces = ("w1",) * 8 + ("w2",) * 3
    clients = [asyncio.create_task(_client(gateway, w, random.Random(rng.random()), stop)) for w in workspaces]
    churn = [asyncio.create_task(victims()) for _ in range(3)]
    await asyncio.sleep(0.05)
    await asyncio.gather(*(publishing(p, 200) for ps in pubs.values() for p in ps))
    stop.set()
    results = await asyncio.gather(*clients)
    await asyncio.gather(*churn)
    total = 0
    for n, (w, (stream, sent)) in enumerate(zip(workspaces, results, strict=True)):
        published = sorted(e for p in pubs[w] for e in p.published)
        total += _check(stream, sent, published, f"client {n} ({w})")
    for ps in pubs.values():
        for p in ps:
            await p.close()
    assert total > 0


async def test_churned_subscriptions_get_exactly_the_matching_events(gateway_factory):
    """Clients in two workspaces churn their subscriptions while both publish and other
    clients vanish mid-burst: each gets exactly the events of its workspace that its
    subscriptions matched at the time, once, in order; 4008 exactly when a new channel would
    pass the quota."""
    gateway = await gateway_factory(env={"RT_MAX_SUBSCRIPTIONS": str(MAX_SUBSCRIPTIONS)})
    for seed in range(3):
        await _run(gateway, seed)
    logs = gateway.logs()
    assert "Traceback" not in logs and '"level":"error"' not in logs.lower(), logs[-3000:]


async def test_paced_replays_beside_live_channels_during_a_burst(gateway_factory):
    """Subscribes with `since` whose replays leave in pieces (over _REPLAY_SCAN entries) while
    a burst is published, beside a live `events:*` with another filter and filter replacements
    pipelined behind them: every event of the window that the connection's subscriptions show
    arrives exactly once, and the live events after each replay in seq order."""
    gw = await gateway_factory(env={"RT_SEND_BUFFER_BYTES": "65536"})
    pub = Publisher(gw, "w1")
    rng = random.Random(7)
    for i in range(600):
        await pub.publish(rng.choice(TOPICS), {"n": i, "k": rng.randrange(3), "pad": "x" * 200})
    stop = asyncio.Event()

    async def burst() -> None:
        for i in range(600, 1400):
            await pub.publish(rng.choice(TOPICS), {"n": i, "k": rng.randrange(3), "pad": "x" * 200})
        stop.set()

    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        live_from = (await c.subscribe("events:*", {"predicates": {"k": 0}}))["seq"]
        task = asyncio.create_task(burst())
        await asyncio.sleep(0.02)
        plan = [
            {"type": "subscribe", "channel": "events:a", "since": 0, "id": 1},
            {"type": "subscribe", "channel": "events:b", "filter": {"predicates": {"k": 1}}, "since": 0, "id": 2},
            {"type": "ping", "id": "p"},
        ]
        for msg in plan:
            await c.send(msg)
        await stop.wait()
        await c.send({"type": "ping", "id": "end"})
        seen: list[int] = []
        while True:
            msg = await c.recv(timeout=10)
            if msg["type"] == "event":
                seen.append(msg["seq"])
            elif msg["type"] == "pong" and msg["id"] == "end":
                end = msg["seq"]
                break
        await task
    dupes = [s for s in set(seen) if seen.count(s) > 1]
    assert not dupes, f"{len(dupes)} events twice, e.g. {sorted(dupes)[:5]}"
    want = {
        seq for seq, topic, payload in pub.published if seq <= end and (
            (payload["k"] == 0 and seq > live_from) or topic == "a" or (topic == "b" and payload["k"] == 1)
        )
    }
    got = set(seen)
    assert got - want == set(), f"not matching: {sorted(got - want)[:5]}"
    assert want - got == set(), f"missing {len(want - got)}: {sorted(want - got)[:5]}"
    await pub.close()


async def test_resumes_during_a_burst_miss_nothing_and_repeat_nothing(gateway):
    """Clients drop their link mid-burst (frames in flight lost) and resume with their last
    seq while the burst goes on, churning a subscription right after: across both links each
    gets every event its subscriptions matched exactly once, and the resumed link starts
    after the last event seen."""
    pub = Publisher(gateway, "w1")
    rng = random.Random(11)
    stop = asyncio.Event()

    async def burst() -> None:
        for i in range(1500):
            await pub.publish(rng.choice(TOPICS), {"n": i, "k": rng.randrange(3)})
            if i % 50 == 0:
                await asyncio.sleep(0.001)
        stop.set()

    async def one(n: int) -> None:
        token = gateway.token("w1", sub=f"r-{n}")
        seen: list[int] = []
        async with ws_connect(gateway, "w1", token=token) as c:
            await c.send({"type": "auth", "token": token})  # a refresh: its auth_ok names the session
            session = (await c.recv_type("auth_ok"))["sessionId"]
            s1 = (await c.subscribe("events:*", {"predicates": {"k": 0}}))["seq"]
            await c.send({"type": "subscribe", "channel": "events:a"})
            while (msg := await c.recv())["type"] == "event":  # events:* is live meanwhile
                seen.append(msg["seq"])
            assert msg["type"] == "subscribed", msg
            s2 = msg["seq"]
            for _ in range(rng.randrange(5, 40)):
                msg = await c.recv()
                assert msg["type"] == "event", msg
                seen.append(msg["seq"])
            c.ws.transport.abort()  # a vanished link: what was in flight is lost
        since = seen[-1]
        async with ws_connect(gateway, "w1") as c:
            assert (await c.auth(token, resume=session, since=since))["resumed"] is True
            await c.send({"type": "unsubscribe", "channel": "events:a"})
            while True:
                msg = await c.recv()
                if msg["type"] == "unsubscribed":
                    break
                assert msg["type"] == "event", msg
                seen.append(msg["seq"])
            await stop.wait()
            await c.send({"type": "ping", "id": "end"})
            while True:
                msg = await c.recv()
                if msg["type"] == "pong":
                    end = msg["seq"]
                    break
                assert msg["type"] == "event", msg
                seen.append(msg["seq"])
        assert len(seen) == len(set(seen)), f"client {n}: duplicates"
        assert seen == sorted(seen), f"client {n}: out of order"
        for seq, topic, payload in pub.published:
            if seq <= end and seq > min(s1, s2) and (
                (payload["k"] == 0 and seq > s1) or (topic == "a" and seq > s2 and seq <= since)
            ):
                assert seq in seen, f"client {n}: {seq} {topic} {payload} missing"

    task = asyncio.create_task(burst())
    await asyncio.sleep(0.02)
    await asyncio.gather(*(one(n) for n in range(6)))
    await task
    await pub.close()
