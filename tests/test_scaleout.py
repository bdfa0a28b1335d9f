"""Scale-out through Kafka: `rtserver ingest` + several `rtserver serve` nodes (RT_BUS=kafka),
as real processes, against the harness's Kafka broker and PostgreSQL cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import string
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from tests.harness.fixtures_gateway import free_port
from tests.harness.http_wire import post_request, read_answer
from tests.harness.prometheus import family_types, parse_exposition
from tests.harness.wsclient import ws_connect

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


class IngestProcess:
    """`python -m rtserver ingest` with a health port and its own state directory."""

    def __init__(self, env: dict[str, str]):
        self.tmp = tempfile.TemporaryDirectory(prefix="rt-ingest-")
        self.port = free_port()
        self.env = {**env, "RT_STATE_DIR": self.tmp.name}
        self.log_path = os.path.join(self.tmp.name, "ingest.log")
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, *args: str) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rtserver", "ingest", "--health-port", str(self.port), *args,
            env=self.env, stdout=log, stderr=log,
        )
        log.close()

    async def status(self) -> dict:
        def get() -> dict:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                return json.loads(e.read())

        return await asyncio.to_thread(get)

    async def wait_active(self, timeout: float = 30) -> float:
        """Seconds until this process holds the lease and its feeds stream."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(f"ingest exited {self.proc.returncode}:\n{self.logs()}")
            try:
                st = await self.status()
                if st["role"] == "active" and st["ready"]:
                    return time.monotonic() - t0
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"ingest not active after {timeout}s:\n{self.logs()}")

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    def logs(self) -> str:
        # All of it: the tests look for lines in it, and its last 8000 characters (what this
        # gave before) missed a fenced ingest's line behind 14 longer ones after it.
        with open(self.log_path, errors="replace") as fh:
            return fh.read()


@pytest.fixture
async def cluster(kafka_broker, pg_database, gateway_factory):
    """Environment of one scale-out deployment, with helpers to start its processes."""
    db = await asyncpg.connect(pg_database)
    await db.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
    env = {
        "RT_BUS": "kafka",
        "RT_BUS_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
        "RT_BUS_TOPIC": f"rt.events.{uuid.uuid4().hex[:8]}",
        "RT_BUS_PARTITIONS": "3",
        "RT_BUS_WORKSPACES": "w1",
        "RT_POSTGRES_URL": pg_database,
        "RT_INSTANCE": "scaleout",
        "RT_LOG_LEVEL": "info",
    }
    ingests: list[IngestProcess] = []

    class Cluster:
        def __init__(self) -> None:
            self.env = env
            self.db = db

        async def ingest(self, *args: str, **extra: str) -> IngestProcess:
            base = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
            p = IngestProcess({**base, **env, **extra})
            ingests.append(p)
            await p.start(*args)
            return p

        async def node(self, **extra: str):
            gw = await gateway_factory(env={**env, **extra})
            await wait_ready(gw)
            return gw

    yield Cluster()
    for p in ingests:
        await p.stop(signal.SIGKILL)
        p.tmp.cleanup()
    await db.close()


def _bus_event(n: int) -> bytes:
    """The bus record of a custom event of w1 on events:x with payload {"n": n}, as a node's
    publish writes it (for tests writing to the topic themselves)."""
    from rtcore.event import Event
    from rtserver.bus_kafka import encode_event

    body = json.dumps({"type": "event", "channel": "events:x", "operation": "PUBLISH", "topic": "x",
                       "payload": {"n": n}}).encode()
    return encode_event(Event("w1", "events", "x", "PUBLISH", None, body))


async def wait_ready(gw, timeout: float = 30) -> dict:
    t0 = time.monotonic()
    while True:
        status, body = await gw.get("/readyz")
        if status == 200:
            return json.loads(body)
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"node not ready: {body!r}\n{gw.logs()}")
        await asyncio.sleep(0.1)


async def wait_delivered(gw, count: int, timeout: float = 30) -> dict:
    """Wait until node `gw` has delivered `count` records from the bus; its /readyz bus status."""
    t0 = time.monotonic()
    while True:
        bus = json.loads((await gw.get("/readyz"))[1])["bus"]
        if bus["delivered"] >= count:
            return bus
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{bus['delivered']} of {count} records delivered after {timeout} s: {bus}\n{gw.logs()}")
        await asyncio.sleep(0.1)


async def events(c, n: int, timeout: float = 20) -> list[dict]:
    out = []
    while len(out) < n:
        try:
            msg = await c.recv(timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"{len(out)} of {n} events within {timeout} s of each other; "
                                 f"the last: {[key(e) for e in out[-5:]]}") from None
        assert msg["type"] == "event", msg
        out.append(msg)
    return out


def incompressible(size: int) -> str:
    """Text Kafka's compression does not shrink: a record about this large."""
    return "".join(random.choices(string.ascii_letters, k=size))


def topic_record_limit(cluster):
    """`await limit(size)` sets the events topic's max.message.bytes (an operator lowering or
    raising it under a running feed)."""
    return topic_limit(cluster.env["RT_BUS_KAFKA_BOOTSTRAP"], cluster.env["RT_BUS_TOPIC"])


@contextlib.asynccontextmanager
async def topic_limit(bootstrap: str, topic: str):
    """topic_record_limit of `topic` on the broker at `bootstrap`."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()

    async def limit(size: int) -> None:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                                  configs={"max.message.bytes": str(size)})])

    try:
        yield limit
    finally:
        await admin.close()


def key(ev: dict):
    """What identifies an event across nodes: its seq, channel and row id / payload."""
    return ev["seq"], ev["channel"], ev.get("record", {}).get("id") if "record" in ev else ev["payload"]["n"]


async def subscribed_client(stack, gw, *channels, since=None):
    c = await stack.enter_async_context(ws_connect(gw, "w1", token=gw.token("w1")))
    for ch in channels:
        extra = {} if since is None else {"since": since}
        await c.subscribe(ch, **extra)
    return c


async def test_two_nodes_same_events_same_order_same_seq(cluster):
    from contextlib import AsyncExitStack

    ingest = await cluster.ingest()
    await ingest.wait_active()
    a, b = await cluster.node(), await cluster.node()
    async with AsyncExitStack() as stack:
        ca = await subscribed_client(stack, a, "postgres:orders", "events:x")
        cb = await subscribed_client(stack, b, "postgres:orders", "events:x")
        for i in range(1, 7):
            await cluster.db.execute("INSERT INTO orders VALUES ($1, 'n')", i)
            await (a if i % 2 else b).publish("w1", "x", {"n": i})
        got_a, got_b = await events(ca, 12), await events(cb, 12)
    assert [key(e) for e in got_a] == [key(e) for e in got_b]
    seqs = [e["seq"] for e in got_a]
    assert seqs == sorted(seqs) and len(set(seqs)) == 12
    assert sorted(e["record"]["id"] for e in got_a if e["channel"] == "postgres:orders") == list(range(1, 7))
    assert sorted(e["payload"]["n"] for e in got_a if e["channel"] == "events:x") == list(range(1, 7))
    # The bus is visible in health and metrics.
    ready = await wait_ready(a)
    assert ready["bus"]["kind"] == "kafka" and ready["bus"]["lag"] == 0
    status, metrics = await a.get("/metrics")
    assert status == 200 and b'rt_bus_consumer_lag{topic="' in metrics and b'partition="2"' in metrics, metrics.decode()
    types = family_types(metrics.decode())
    assert types["rt_bus_delivered"] == "counter" and types["rt_bus_consumer_lag"] == "gauge"
    # The ingest's /metrics is the text format too, with its content type (Prometheus 3 needs it).
    with urllib.request.urlopen(f"http://127.0.0.1:{ingest.port}/metrics", timeout=10) as r:
        ctype, text = r.headers.get("Content-Type", ""), r.read().decode()
    assert ctype.startswith("text/plain; version=0.0.4"), ctype
    samples = parse_exposition(text)
    assert samples["rt_ingest_active"] == 1 and samples["rt_ingest_bus_connected"] == 1
    assert samples["rt_ingest_published_total"] >= 6
    assert samples["rt_ingest_writer_failures_total"] == 0
    # The feed's own series (docs/postgres.md: alert on the slot's lag): with a Kafka bus no
    # gateway node reads the slot, so only the ingest can show them.
    ready_feeds = {k: v for k, v in samples.items() if k.startswith("rt_source_ready{")}
    assert len(ready_feeds) == 1 and 'source="postgres"' in next(iter(ready_feeds)), text
    assert list(ready_feeds.values()) == [1]
    assert any(k.startswith("rt_source_lag_bytes{") for k in samples), text
    assert family_types(text)["rt_source_events"] == "counter"


async def test_ingest_killed_mid_stream_nothing_lost_or_duplicated(cluster):
    first = await cluster.ingest()
    await first.wait_active()
    node = await cluster.node()
    total = 120
    async with ws_connect(node, "w1", token=node.token("w1")) as c:
        await c.subscribe("postgres:orders")

        async def writer() -> None:
            for i in range(1, total + 1, 2):  # two-row transactions: a takeover may split none
                async with cluster.db.transaction():
                    await cluster.db.execute("INSERT INTO orders VALUES ($1, 'a')", i)
                    await cluster.db.execute("INSERT INTO orders VALUES ($1, 'b')", i + 1)
                await asyncio.sleep(0.03)

        task = asyncio.create_task(writer())
        got = await events(c, 20)
        await first.stop(signal.SIGKILL)  # mid-stream: the writer goes on
        second = await cluster.ingest()
        took = await second.wait_active(timeout=40)
        await task
        got += await events(c, total - 20, timeout=30)
        await c.no_message(1.0)
    ids = [e["record"]["id"] for e in got]
    assert ids == list(range(1, total + 1)), f"takeover after {took:.1f}s; ids {ids}"
    # The slot redelivered what the killed ingest had published but not yet acknowledged;
    # the new one dropped it (position from the topic's tail), which is why nothing repeats.
    (feed,) = (await second.status())["feeds"].values()
    assert feed["duplicates_dropped"] + feed["takeover_skipped"] > 0, feed
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(set(seqs))


async def pipelined_posts(port: int, token: str, path: str, payloads: list, timeout: float = 20) -> list[tuple[int, dict]]:
    """POST each of `payloads` to `path`, all written at once on one connection (pipelined);
    the answers (status, JSON body) in the order they came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(post_request(path, token, payload) for payload in payloads))
        answers = []
        while len(answers) < len(payloads):
            status, _, body = await read_answer(reader, timeout)
            answers.append((status, json.loads(body)))
        return answers
    finally:
        writer.close()


async def test_a_batch_on_a_kafka_node_is_one_run_of_records_or_none(kafka_broker, tmp_path):
    """A batch on a Kafka node: its events go to Kafka in order and are answered once Kafka
    has them all, with consecutive seqs (one partition), every node's subscribers getting
    them in that order. An event too large for the topic refuses the whole batch before any
    record is sent (413 naming it)."""
    from tests.test_churn import SECRET, Addr, _token

    gw = await _node_in_process(kafka_broker, tmp_path, RT_BUS_MAX_RECORD_BYTES="65536")
    token = _token(["w1"], "publisher", publish=True, secret=SECRET)
    batch_path = "/workspaces/w1/realtime/events"
    try:
        async with ws_connect(Addr(gw), "w1", token=_token(["w1"], "u")) as c:
            await c.send({"type": "subscribe", "channel": "events:*"})
            await c.recv_type("subscribed")
            items = [{"topic": "a" if i % 2 else "b", "payload": {"i": i}} for i in range(25)]
            [(status, out)] = await pipelined_posts(gw.port, token, batch_path, [{"events": items}])
            assert status == 202, out
            seqs = [a["seq"] for a in out["events"]]
            assert seqs == list(range(seqs[0], seqs[0] + 25)), seqs
            got = [await c.recv_event(10) for _ in items]
            assert [(e["seq"], e["topic"], e["payload"]) for e in got] == [
                (s, item["topic"], item["payload"]) for s, item in zip(seqs, items, strict=True)]

            sent = gw.bus.publisher.published
            too_large = [items[0], {"topic": "a", "payload": "x" * 70000}, items[1]]
            [(status, out)] = await pipelined_posts(gw.port, token, batch_path, [{"events": too_large}])
            assert status == 413 and out["error"].startswith("events[1]: payload too large for the event bus"), out
            assert "no event of the batch was published" in out["error"], out
            assert gw.bus.publisher.published == sent
            await c.no_message(0.5)
    finally:
        await gw.shutdown()


async def test_kafka_outage_readiness_publish_answers_and_exactly_once_delivery(cluster, kafka_broker):
    """Kafka stops mid-stream for 25 s and comes back: the ingest and the nodes say so in
    /readyz and recover by themselves; a publish answers instead of waiting for the outage
    (503: not sent; 504: sent, outcome unknown, written at most once);
    new WebSocket connections are refused; a node stopped meanwhile stops cleanly; every row
    (a 300-row transaction among them) and every accepted event reaches both nodes once, in
    order, with the same seq."""
    from contextlib import AsyncExitStack

    import websockets

    cluster.env["RT_BUS_PUBLISH_TIMEOUT"] = "2"
    PIPELINED = range(200, 205)  # noqa: N806 - a constant of this test
    BATCHED = range(210, 213)  # noqa: N806 - a constant of this test
    ingest = await cluster.ingest()
    await ingest.wait_active()
    a, b, gone = await cluster.node(), await cluster.node(), await cluster.node()

    def post(gw, n: int):
        return gw.post("/workspaces/w1/realtime/events/x", json.dumps({"n": n}).encode(),
                       {"Authorization": f"Bearer {gw.token('w1', publish=True)}"})

    def post_batch(gw, numbers: range):
        return gw.post("/workspaces/w1/realtime/events",
                       json.dumps({"events": [{"topic": "x", "payload": {"n": n}} for n in numbers]}).encode(),
                       {"Authorization": f"Bearer {gw.token('w1', publish=True)}"})

    async with AsyncExitStack() as stack:
        clients = [await subscribed_client(stack, gw, "postgres:orders", "events:x") for gw in (a, b)]
        for i in range(1, 4):
            await cluster.db.execute("INSERT INTO orders VALUES ($1, 'before')", i)
            await (a if i % 2 else b).publish("w1", "x", {"n": i})

        await kafka_broker.astop()
        down = time.monotonic()
        racing = asyncio.create_task(post(a, 100))  # sent before the node can know: 503 or 504
        # And a pipeline of five: answered in request order, each 503 or 504 on its own.
        racing_pipeline = asyncio.create_task(pipelined_posts(
            b.port, b.token("w1", publish=True), "/workspaces/w1/realtime/events/x",
            [{"n": n} for n in PIPELINED]))
        # And a batch: each event's outcome in the answer (504 sent, unknown; 503 not sent).
        racing_batch = asyncio.create_task(post_batch(a, BATCHED))
        # First (the ingest waits for Kafka after each transaction): more than the producer
        # batches for one partition, so it waits for room for the whole outage.
        async with cluster.db.transaction():
            await cluster.db.executemany("INSERT INTO orders VALUES ($1, 'during, one transaction')",
                                         [(i,) for i in range(4, 304)])
        for i in range(304, 307):
            await cluster.db.execute("INSERT INTO orders VALUES ($1, 'during')", i)
        while True:
            said = [await ingest.status(), *[json.loads((await gw.get("/readyz"))[1]) for gw in (a, b, gone)]]
            if not any(s["ready"] or s["bus"]["connected"] for s in said):
                break
            assert time.monotonic() - down < 20, f"still ready with Kafka down: {said}"
            await asyncio.sleep(0.2)
        status, body = await post(b, 101)  # a hang fails here (the harness waits 10 s)
        assert status == 503 and b"event bus unavailable" in body, (status, body)
        status, body = await post_batch(b, range(220, 223))
        assert status == 503 and b"event bus unavailable" in body, (status, body)
        assert b"no event of the batch was published" in body, body
        try:
            async with ws_connect(a, "w1", token=a.token("w1")):
                raise AssertionError("a new connection was accepted while the node cannot get events")
        except websockets.InvalidStatus as exc:
            assert exc.response.status_code == 503, exc.response
        raced, raced_body = await racing
        assert raced in (503, 504), (raced, raced_body)
        pipeline = await racing_pipeline
        assert all(status in (503, 504) and "w1" in body["error"] for status, body in pipeline), pipeline
        batch_status, batch_body = await racing_batch
        batch_answer = json.loads(batch_body)
        assert batch_status in (503, 504), (batch_status, batch_answer)
        # Refused before any was sent (no per-event outcomes), or each event's own.
        outcomes = [item["status"] for item in batch_answer.get("events", [])]
        assert len(outcomes) in (0, len(BATCHED)) and set(outcomes) <= {503, 504}, batch_answer
        assert batch_status == (504 if 504 in outcomes else 503), batch_answer
        assert await gone.stop() == 0 and "uncaught exception" not in gone.logs(), gone.logs()
        await asyncio.sleep(max(0.0, 25 - (time.monotonic() - down)))
        await kafka_broker.astart()

        await ingest.wait_active(timeout=60)
        for gw in (a, b):
            await wait_ready(gw, timeout=60)
        await b.publish("w1", "x", {"n": 101})  # retrying after a 503 is safe
        for i in range(307, 309):
            await cluster.db.execute("INSERT INTO orders VALUES ($1, 'after')", i)
            await (a if i % 2 else b).publish("w1", "x", {"n": i})
        customs = [1, 2, 3, 101, 307, 308]
        got = [await events(c, 308 + len(customs), timeout=30) for c in clients]
        for c in clients:
            # Those answered 504 may have been written: they came among the others, so as many
            # more are read (at most six).
            mine = got[clients.index(c)]
            extra = sum(1 for e in mine if e["channel"] == "events:x" and (
                e["payload"]["n"] == 100 or e["payload"]["n"] in PIPELINED or e["payload"]["n"] in BATCHED))
            if extra:
                mine += await events(c, extra, timeout=30)
            await c.no_message(0.5)
    assert [key(e) for e in got[0]] == [key(e) for e in got[1]]
    seqs = [e["seq"] for e in got[0]]
    assert seqs == sorted(set(seqs))
    assert [e["record"]["id"] for e in got[0] if e["channel"] == "postgres:orders"] == list(range(1, 309))
    # The 504'd event's outcome is unknown to its publisher: written once, or (an outage longer
    # than the producer's request timeout, with no partition leader at first) not at all.
    published = [e["payload"]["n"] for e in got[0] if e["channel"] == "events:x"]
    from_pipeline = [n for n in published if n in PIPELINED]
    answered_504 = [200 + k for k, (status, _) in enumerate(pipeline) if status == 504]
    # the pipeline's events: only those answered 504, each at most once, in request order
    assert from_pipeline == sorted(set(from_pipeline)) and set(from_pipeline) <= set(answered_504), (published, pipeline)
    from_batch = [n for n in published if n in BATCHED]
    batch_504 = [210 + k for k, status in enumerate(outcomes) if status == 504]
    assert from_batch == sorted(set(from_batch)) and set(from_batch) <= set(batch_504), (published, batch_answer)
    published = [n for n in published if n not in PIPELINED and n not in BATCHED]
    assert published in (customs, [1, 2, 3, 100, 101, 307, 308]) and (100 not in published or raced == 504), published


async def test_resume_on_another_node_gets_exactly_the_missed_events(cluster):
    ingest = await cluster.ingest()
    await ingest.wait_active()
    # Node B remembers only 2 events per workspace: the missed ones come back from Kafka.
    a, b = await cluster.node(), await cluster.node(RT_HISTORY_EVENTS="2")
    async with ws_connect(a, "w1", token=a.token("w1")) as c:
        await c.subscribe("postgres:orders")
        await c.subscribe("events:x")
        await cluster.db.execute("INSERT INTO orders VALUES (1, 'seen')")
        await a.publish("w1", "x", {"n": 1})
        seen = await events(c, 2)
    last = seen[-1]["seq"]
    for i in range(2, 6):
        await cluster.db.execute("INSERT INTO orders VALUES ($1, 'missed')", i)
        await a.publish("w1", "x", {"n": i})
        await a.publish("w1", "other", {"n": i})  # not subscribed: must not be replayed
    # Node B's memory moved past `last`: it has delivered the 14 records (0.5 s of sleep was
    # too short for a slow ingest, and rows then came live after the replay).
    await wait_delivered(b, 14)
    async with ws_connect(b, "w1", token=b.token("w1")) as c:
        await c.send({"type": "subscribe", "channel": "postgres:orders", "since": last})
        await c.send({"type": "subscribe", "channel": "events:x", "since": last})
        got = [await c.recv(timeout=20) for _ in range(10)]
        await b.publish("w1", "x", {"n": 99})
        live = await events(c, 1)
        await c.no_message(0.5)
    assert [m["type"] for m in got] == ["subscribed"] + ["event"] * 4 + ["subscribed"] + ["event"] * 4, got
    rows, customs = got[1:5], got[6:10]
    assert [e["record"]["id"] for e in rows] == [2, 3, 4, 5]
    assert [e["payload"]["n"] for e in customs] == [2, 3, 4, 5]
    for stream in (rows, customs + live):
        seqs = [e["seq"] for e in stream]
        assert seqs == sorted(set(seqs)) and seqs[0] > last
    assert live[0]["payload"] == {"n": 99}
    status, metrics = await b.get("/metrics")
    assert b"rt_replayed_total 8" in metrics


async def test_gateway_node_killed_clients_resume_elsewhere(cluster):
    from contextlib import AsyncExitStack

    ingest = await cluster.ingest()
    await ingest.wait_active()
    a, b = await cluster.node(), await cluster.node()
    received: dict[int, list[int]] = {0: [], 1: []}
    last: dict[int, int] = {}
    async with AsyncExitStack() as stack:
        clients = [await subscribed_client(stack, a, "postgres:orders", "events:x") for _ in range(2)]
        await cluster.db.execute("INSERT INTO orders VALUES (1, 'before the kill')")
        for n, c in enumerate(clients):
            got = await events(c, 1)
            received[n] += [e["record"]["id"] for e in got]
            last[n] = got[-1]["seq"]
        await a.stop(signal.SIGKILL)
        for i in range(2, 5):
            await cluster.db.execute("INSERT INTO orders VALUES ($1, 'while reconnecting')", i)
    async with AsyncExitStack() as stack:
        clients = [await subscribed_client(stack, b, "postgres:orders", since=last[n]) for n in range(2)]
        await cluster.db.execute("INSERT INTO orders VALUES (5, 'after')")
        for n, c in enumerate(clients):
            received[n] += [e["record"]["id"] for e in await events(c, 4)]
            await c.no_message(0.3)
    assert received == {0: [1, 2, 3, 4, 5], 1: [1, 2, 3, 4, 5]}


async def test_mongo_ingest_killed_takeover_on_another_machine(cluster, mongo_server):
    """The standby has its own (empty) state dir, as on another machine: it learns the resume
    token from the topic's tail, so no change is lost or repeated. Two workspaces read one
    database, so each change fans out to two events (on different partitions)."""
    from pymongo import AsyncMongoClient

    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    db = client["shop"]
    await db.orders.insert_one({"_id": 0})
    cluster.env.update({"RT_MONGO_URL": mongo_server.url.replace("/?", "/shop?"), "RT_BUS_WORKSPACES": "w1,w2"})
    first = await cluster.ingest()
    await first.wait_active()
    node = await cluster.node()
    total = 150
    try:
        async with ws_connect(node, "w1", token=node.token("w1")) as c1, \
                ws_connect(node, "w2", token=node.token("w2")) as c2:
            await c1.subscribe("mongo:orders")
            await c2.subscribe("mongo:orders")

            async def writer() -> None:
                for i in range(1, total + 1):
                    await db.orders.insert_one({"_id": i})
                    await asyncio.sleep(0.02)

            task = asyncio.create_task(writer())
            got = {1: await events(c1, 20), 2: []}
            await first.stop(signal.SIGKILL)  # mid-stream: the writer goes on
            second = await cluster.ingest()
            assert second.tmp.name != first.tmp.name
            took = await second.wait_active(timeout=40)
            await task
            got[1] += await events(c1, total - 20, timeout=30)
            got[2] = await events(c2, total, timeout=30)
            await c1.no_message(1.0)
            await c2.no_message(0.2)
    finally:
        await client.close()
    for ws, evs in got.items():
        ids = [e["document"]["_id"] for e in evs]
        assert ids == list(range(1, total + 1)), f"w{ws}: takeover after {took:.1f}s; ids {ids}"
        seqs = [e["seq"] for e in evs]
        assert seqs == sorted(set(seqs))
    assert "resumes after the token Kafka has" in second.logs(), second.logs()


async def _topic_ids(bootstrap: str, topic: str, partitions: int, total: int,
                     timeout: float = 20, linger: float = 2) -> dict[str, list[int]]:
    """The MongoDB `_id` of every event record of `topic`, per workspace, in topic order (read
    committed, GAP records skipped): read until every workspace has all of 1..total, then
    `linger` seconds more for records arriving late."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from rtserver.bus_kafka import GAP, decode_record

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    ids: dict[str, list[int]] = {}
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        t0 = time.monotonic()
        complete_at = None
        while time.monotonic() - t0 < timeout and (complete_at is None or time.monotonic() - complete_at < linger):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    rec, event = decode_record(r.key, r.value)
                    if rec.operation != GAP:
                        ids.setdefault(event.workspace, []).append(json.loads(rec.body)["document"]["_id"])
            if complete_at is None and ids and all(set(range(1, total + 1)) <= set(v) for v in ids.values()):
                complete_at = time.monotonic()
    finally:
        await consumer.stop()
    return ids


def _runs(ids: list[int]) -> str:
    """`ids` as ascending runs: "1..41, 21..160, 161..209"."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}..{b}" if a != b else str(a) for a, b in runs)


def _repeats(ids: list[int]) -> list[int]:
    """The ids seen more than once, in the order of their second appearance."""
    seen: set[int] = set()
    out = []
    for i in ids:
        if i in seen:
            out.append(i)
        seen.add(i)
    return out


async def test_an_ingest_cut_off_from_kafka_alone_is_fenced_when_the_network_heals(cluster, kafka_broker,
                                                                                     mongo_server):
    """A zombie ingest: the active ingest loses Kafka alone (it still reads MongoDB) while a
    standby takes the lease over. The cut-off one had a change's records in its producer,
    sent into a stalled network (no reset, no timeout: its request timeout is 120 s); when the
    network heals they must not land on the topic after the new holder's, nor may the zombie
    publish anything more: every change once, in order, on the topic (read committed) and at a
    node's subscribers, and the healed ingest ends up standby.

    The zombie's Kafka traffic (producer, lease group, scans) goes through a TcpProxy on the
    broker's PROXIED listener (tests/harness/kafka.py); everyone else reaches the broker
    directly. The standby is started once the zombie is cut off: it joins the lease group and
    waits as a standby until the group expels the silent member (RT_BUS_LEASE_TIMEOUT). Started
    before, it would stay standby only if its member id sorted after the active one's (the lease
    consumer's round-robin assignor gives the one partition to the lowest member id,
    `rtserver-ingest-{RT_NODE}-{uuid}`), and then the healed zombie, rejoining under the same
    RT_NODE, would take the lease back (with equal RT_NODEs, host names, either may win). Here
    the standby's RT_NODE sorts first, so the healed zombie must end up standby."""
    from pymongo import AsyncMongoClient

    from tests.harness.tcpproxy import TcpProxy

    proxy = await TcpProxy(kafka_broker.proxied_port).start(port=kafka_broker.proxy_port)
    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    db = client["shop"]
    await db.orders.insert_one({"_id": 0})
    # MongoDB only: a PostgreSQL slot admits one walsender, a guard MongoDB does not have.
    cluster.env.pop("RT_POSTGRES_URL")
    cluster.env.update({"RT_MONGO_URL": mongo_server.url.replace("/?", "/shop?"), "RT_BUS_WORKSPACES": "w1,w2",
                        "RT_BUS_LEASE_TIMEOUT": "6"})
    topic, partitions = cluster.env["RT_BUS_TOPIC"], int(cluster.env["RT_BUS_PARTITIONS"])
    zombie = await cluster.ingest(RT_BUS_KAFKA_BOOTSTRAP=kafka_broker.proxied_bootstrap, RT_NODE="b-cut-off")
    await zombie.wait_active()
    node = await cluster.node()
    written = 0
    stop_writing = asyncio.Event()

    async def writer() -> None:
        nonlocal written
        while not stop_writing.is_set():  # bounded below: the test stops it
            await db.orders.insert_one({"_id": written + 1})
            written += 1
            await asyncio.sleep(0.05)

    timeline: list[str] = []
    t_start = time.monotonic()

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - t_start:5.1f}s {what}")

    got: dict[str, list[int]] = {"w1": [], "w2": []}
    try:
        async with ws_connect(node, "w1", token=node.token("w1")) as c1, \
                ws_connect(node, "w2", token=node.token("w2")) as c2:
            await c1.subscribe("mongo:orders")
            await c2.subscribe("mongo:orders")

            async def collect(c, ws: str) -> None:
                while True:
                    msg = await c.recv(timeout=120)
                    assert msg["type"] == "event", msg
                    got[ws].append(msg["document"]["_id"])

            collectors = [asyncio.create_task(collect(c1, "w1")), asyncio.create_task(collect(c2, "w2"))]
            task = asyncio.create_task(writer())
            try:
                while len(got["w1"]) < 20:  # streaming through the proxy
                    assert time.monotonic() - t_start < 20, f"{got} / {zombie.logs()}"
                    await asyncio.sleep(0.05)
                before = await zombie.status()
                note(f"pause: zombie handed {before['published']} records to its producer, {written} changes written")
                proxy.paused = True
                # The zombie goes on reading MongoDB and hands the next change to its producer,
                # whose request waits in the stalled network (its /readyz is not proxied).
                standby = await cluster.ingest(RT_NODE="a-standby")
                stalled = None
                t0 = time.monotonic()
                while time.monotonic() - t0 < 10:
                    st = await zombie.status()
                    if st["bus"]["waiting"] > 0 and not st["bus"]["connected"]:
                        stalled = st
                        break
                    await asyncio.sleep(0.2)
                assert stalled is not None, f"the zombie has no record waiting for Kafka: {st}\n{zombie.logs()}"
                note(f"zombie stalled: role {stalled['role']}, {stalled['bus']['waiting']} records waiting, "
                     f"{stalled['published']} handed to its producer")
                took = await standby.wait_active(timeout=30)
                note(f"standby active after {took:.1f}s")
                t0 = time.monotonic()
                while (await standby.status())["published"] < 20:  # the new holder publishes past the stall
                    assert time.monotonic() - t0 < 15, f"{await standby.status()}\n{standby.logs()}"
                    await asyncio.sleep(0.1)
                during = await zombie.status()
                note(f"heal: zombie role {during['role']}, {during['bus']['waiting']} records waiting; "
                     f"standby handed {(await standby.status())['published']} to its producer, {written} written")
                proxy.paused = False
                await asyncio.sleep(3)  # the writer goes on across the heal
            finally:
                stop_writing.set()
                await task
            note(f"writer stopped at {written}")
            t0 = time.monotonic()
            while min(len(set(v)) for v in got.values()) < written and time.monotonic() - t0 < 20:
                await asyncio.sleep(0.1)
            await asyncio.sleep(2)  # late repeats
            for t in collectors:
                t.cancel()
            for outcome in await asyncio.gather(*collectors, return_exceptions=True):
                if not isinstance(outcome, asyncio.CancelledError):
                    raise outcome  # a message that is not an event
        # Settled: the healed ingest noticed it lost the lease.
        t0 = time.monotonic()
        while ((await zombie.status())["role"], (await standby.status())["role"]) != ("standby", "active") \
                and time.monotonic() - t0 < 15:
            await asyncio.sleep(0.2)
        after = await zombie.status()
        note(f"end: zombie role {after['role']}, {after['published']} records handed to its producer "
             f"({stalled['published']} when it stalled)")
        on_topic = await _topic_ids(kafka_broker.bootstrap, topic, partitions, written)
    finally:
        await client.close()
        await proxy.close()
    story = "\n".join(timeline)
    expected = list(range(1, written + 1))
    for ws in ("w1", "w2"):
        ids = on_topic.get(ws, [])
        assert ids == expected, (f"{ws} on the topic (read committed): {len(ids)} records for {written} changes, "
                                 f"{len(_repeats(ids))} repeated, missing {sorted(set(expected) - set(ids))}; in topic order: "
                                 f"{_runs(ids)}\n{story}")
        assert got[ws] == expected, (f"{ws} at a node subscriber: {len(got[ws])} events for {written} changes, "
                                     f"{len(_repeats(got[ws]))} repeated, missing {sorted(set(expected) - set(got[ws]))}; "
                                     f"as received: {_runs(got[ws])}\n{story}")
    assert (after["role"], (await standby.status())["role"]) == ("standby", "active"), f"{after}\n{story}"
    # The healed ingest's first transaction was refused as fenced, and it gave up the lease.
    assert after["bus"]["writer_failures"] >= 1 and '"fenced":true' in zombie.logs(), zombie.logs()
    # Nothing the fencing failed was left for the garbage collector to report as an error.
    assert "never retrieved" not in zombie.logs(), zombie.logs()


async def test_a_change_too_large_for_the_topic_is_skipped_with_a_gap(cluster, mongo_server):
    """A record the topic would refuse on every retry must not stall the feed behind it."""
    from pymongo import AsyncMongoClient
    from pymongo.errors import CollectionInvalid, OperationFailure

    cluster.env.update({"RT_MONGO_URL": mongo_server.url.replace("/?", "/shop?"),
                        "RT_BUS_MAX_RECORD_BYTES": "65536"})
    ingest = await cluster.ingest()
    await ingest.wait_active()
    node = await cluster.node()
    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    try:
        with contextlib.suppress(CollectionInvalid, OperationFailure):  # there from an earlier test
            await client["shop"].create_collection("orders")  # a node refuses a missing one (4010)
        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.subscribe("mongo:orders")
            await client["shop"].orders.insert_one({"_id": 0, "blob": "small"})
            before = (await c.recv_event(timeout=20))["seq"]
            await client["shop"].orders.insert_one({"_id": 1, "blob": "x" * 100_000})
            await client["shop"].orders.insert_one({"_id": 2, "blob": "small"})
            got = [await c.recv(timeout=20), await c.recv(timeout=20)]
            await c.no_message(0.5)
        gap = next(m for m in got if m["type"] == "error")
        assert gap["code"] == 4011 and "max_record_bytes" in gap["message"] and gap["channel"] == "mongo:orders"
        assert [m["document"]["_id"] for m in got if m["type"] == "event"] == [2]
        # A reader coming back from before the loss hears of it too: from this node's memory,
        # and from a node started afterwards, which reads the gap record back from the topic.
        later = await cluster.node()
        for gw in (node, later):
            async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
                await c.send({"type": "subscribe", "channel": "mongo:orders", "since": before})
                await c.recv_type("subscribed", timeout=20)
                again = await c.recv(timeout=20)
                assert again["type"] == "error" and again["code"] == 4011 and again["channel"] == "mongo:orders"
                assert (await c.recv_event(timeout=20))["document"]["_id"] == 2
                await c.no_message(0.3)
    finally:
        await client.close()
    status = await ingest.status()
    assert {k: f["oversized_skipped"] for k, f in status["feeds"].items() if k.startswith("mongo")} == {"mongo:shop": 1}
    assert "change too large for the events topic" in ingest.logs()


async def test_node_behind_the_topic_refuses_new_connections_until_caught_up(cluster):
    """Beyond RT_BUS_MAX_LAG a node answers new WebSocket upgrades and /readyz with 503 (a load
    balancer sends clients elsewhere); its open connections go on, and it accepts again once it
    has caught up."""
    import websockets
    from aiokafka import AIOKafkaProducer

    from rtcore.event import Event
    from rtserver.bus_kafka import encode_event

    node = await cluster.node(RT_BUS_MAX_LAG="1000")
    burst = 300_000
    value = encode_event(Event("w1", "events", "burst", "PUBLISH", {"n": 0}, b'{"channel":"events:burst"}'))
    producer = AIOKafkaProducer(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"], linger_ms=20,
                                max_batch_size=1 << 20)
    await producer.start()
    try:
        async with ws_connect(node, "w1", token=node.token("w1")) as open_client:
            await open_client.subscribe("events:x")
            # Frozen while the burst lands, the node wakes up far behind the topic.
            os.kill(node.proc.pid, signal.SIGSTOP)
            try:
                for _ in range(burst):
                    await producer.send(cluster.env["RT_BUS_TOPIC"], value, key=b"w1")
                await producer.flush()
            finally:
                os.kill(node.proc.pid, signal.SIGCONT)
            refused = None
            t0 = time.monotonic()
            while refused is None and time.monotonic() - t0 < 20:
                status, body = await node.get("/readyz")
                bus = json.loads(body)["bus"]
                if status == 503 and bus["lag"] > 1000:
                    try:
                        async with ws_connect(node, "w1", token=node.token("w1")):
                            pass
                    except websockets.InvalidStatus as exc:
                        refused = exc.response
                    else:  # it caught up between the two requests: say so, not a pass
                        _, after = await node.get("/readyz")
                        raise AssertionError(f"new connection accepted while /readyz said {bus}; now {after}")
                await asyncio.sleep(0.01)
            assert refused is not None, "the node never reported a lag above the bound"
            assert refused.status_code == 503 and b"behind the event stream" in refused.body, refused
            ready = await wait_ready(node, timeout=60)
            assert ready["bus"]["lag"] <= 1000
            # Ready means back within the bound, not caught up: the rest of the burst follows.
            t0 = time.monotonic()
            while ready["bus"]["delivered"] < burst and time.monotonic() - t0 < 30:
                await asyncio.sleep(0.05)
                ready = json.loads((await node.get("/readyz"))[1])
            assert ready["bus"]["delivered"] >= burst, ready["bus"]
            # The connection opened before kept working, and new ones are welcome again.
            async with ws_connect(node, "w1", token=node.token("w1")) as late:
                await late.subscribe("events:x")
                await node.publish("w1", "x", {"n": 1})
                for c in (open_client, late):
                    (ev,) = await events(c, 1)
                    assert ev["payload"] == {"n": 1}
    finally:
        await producer.stop()


async def _node_in_process(kafka_broker, tmp_path, **env: str):
    """A Kafka-bus gateway node in this process, on a topic of its own with one partition,
    started, and its bus ready (waited for up to 30 s)."""
    from rtserver.app import Gateway
    from tests.test_churn import _cfg

    gw = Gateway(_cfg(tmp_path, RT_BUS="kafka", RT_BUS_KAFKA_BOOTSTRAP=kafka_broker.bootstrap,
                      RT_BUS_TOPIC=f"rt.events.{uuid.uuid4().hex[:8]}", RT_BUS_PARTITIONS="1", **env))
    await gw.start()
    for _ in range(300):
        if gw.bus.ready():
            break
        await asyncio.sleep(0.1)
    return gw


async def test_a_topic_limit_raised_back_is_taken_again(kafka_broker, tmp_path, monkeypatch):
    """Kafka refused an event for its size (the topic's max.message.bytes lowered under the
    node): the node reads the limit again and refuses larger events itself, 413 before sending
    them, and its next producer batches under the limit; raised back, the limit is read again
    (every 30 s while lower than at start; 0.3 s here), such events are published again, and
    the producer batches as much as before (it kept the lowered batch size)."""
    from rtserver import bus_kafka
    from tests.test_churn import SECRET, _token

    monkeypatch.setattr(bus_kafka, "_LIMIT_RECHECK", 0.3)
    gw = await _node_in_process(kafka_broker, tmp_path)
    token = _token(["w1"], "publisher", publish=True, secret=SECRET)
    path = "/workspaces/w1/realtime/events/x"
    big = {"blob": "x" * 8000}
    pub = gw.bus.publisher

    def producer_batch() -> int:  # aiokafka's own: what the running producer sends together
        return pub._producer._message_accumulator._batch_size

    try:
        async with topic_limit(kafka_broker.bootstrap, gw.cfg.bus.topic) as limit:
            await limit(4096)
            [(status, out)] = await pipelined_posts(gw.port, token, path, [big])
            assert status == 413 and "MessageSizeTooLarge" in out["error"], out
            [(status, out)] = await pipelined_posts(gw.port, token, path, [big])
            assert status == 413 and "the events topic takes 3072" in out["error"], out
            [(status, out)] = await pipelined_posts(gw.port, token, path, [{"n": 1}])  # by a new producer
            assert status == 202, out
            assert producer_batch() == 4096
            await limit(1_048_576)
            larger = {"blob": "x" * 100_000}  # over what the node took when the limit was lowered
            for _ in range(100):
                [(status, out)] = await pipelined_posts(gw.port, token, path, [larger])
                if status != 413:
                    break
                await asyncio.sleep(0.1)
            assert status == 202, out
            assert producer_batch() == bus_kafka._BATCH_BYTES
    finally:
        await gw.shutdown()


async def test_the_ingest_batches_as_much_again_once_a_lowered_limit_is_raised(kafka_broker, tmp_path, monkeypatch):
    """The ingest's publisher (follow_limit False: it never lowers max_record) lowered its
    batch size after a size refusal; the limit raised back, it reads the limit again and
    batches 16 KiB again. Before, it read the limit again only while max_record was lowered,
    and its transactions went out in batches of the lowered size until a restart."""
    from rtserver import bus_kafka
    from rtserver.bus_kafka import KafkaPublisher
    from tests.test_churn import _cfg

    monkeypatch.setattr(bus_kafka, "_LIMIT_RECHECK", 0.3)
    topic = f"rt.events.{uuid.uuid4().hex[:8]}"
    pub = KafkaPublisher(_cfg(tmp_path, RT_BUS="kafka", RT_BUS_KAFKA_BOOTSTRAP=kafka_broker.bootstrap,
                              RT_BUS_TOPIC=topic, RT_BUS_PARTITIONS="1"), "test-ingest")
    pub.follow_limit = False
    await pub.start()
    try:
        async with topic_limit(kafka_broker.bootstrap, topic) as limit:
            await limit(4096)
            assert await pub.check_limit()  # as the ingest's _writer_failed after a size refusal
            assert (pub.batch_bytes, pub.max_record) == (4096, pub.cfg.bus.max_record_bytes)
            await limit(1_048_576)
            for _ in range(100):
                if pub.batch_bytes == bus_kafka._BATCH_BYTES:
                    break
                await asyncio.sleep(0.1)
            assert pub.batch_bytes == bus_kafka._BATCH_BYTES
    finally:
        await pub.close()


async def test_events_refused_together_for_their_size_are_not_told_one_was_too_large(kafka_broker, tmp_path):
    """The limit lowered under a node whose producer still batches 16 KiB: events that each
    fit, sent together over the limit, are refused 503 (a retry is safe), and the answer says
    the records sent together were too large, not that one of them was (none was)."""
    from tests.test_churn import SECRET, _token

    gw = await _node_in_process(kafka_broker, tmp_path)
    token = _token(["w1"], "publisher", publish=True, secret=SECRET)
    try:
        async with topic_limit(kafka_broker.bootstrap, gw.cfg.bus.topic) as limit:
            [(status, out)] = await pipelined_posts(gw.port, token, "/workspaces/w1/realtime/events/x", [{"n": -1}])
            assert status == 202, out
            await limit(4096)
            items = [{"topic": "x", "payload": {"n": n, "blob": "b" * 1000}} for n in range(6)]
            for _ in range(5):
                # The producer sends as soon as it can (linger 0): on a busy machine it may take
                # the first records before the others join them, each batch then under the limit
                # and accepted (202, nothing refused, the producer unchanged): sent again.
                [(status, out)] = await pipelined_posts(gw.port, token, "/workspaces/w1/realtime/events",
                                                        [{"events": items}])
                if status != 202:
                    break
            answers = out["events"]
            assert status == 503 and all("seq" not in a and a["status"] == 503 for a in answers), answers
            assert all("the records sent together over it" in a["error"] and "a retry is safe" in a["error"]
                       for a in answers), answers
    finally:
        await gw.shutdown()


async def test_a_read_back_larger_than_the_send_buffer_reaches_a_reader_that_keeps_up(kafka_broker, tmp_path):
    """A node's read-back from Kafka waits for the client to take what it emitted before
    fetching more: one larger than limits.send_buffer_bytes, emitted at once, closed a client
    that read at full speed with 1013 (in process, so the gateway's socket can be given a
    network path's send buffer rather than loopback's large receive window)."""
    from tests.test_churn import Addr, Publisher, _token

    gw = await _node_in_process(kafka_broker, tmp_path, RT_HISTORY_EVENTS="2", RT_SEND_BUFFER_BYTES="262144",
                                RT_MAX_CONNECTIONS_PER_SUBJECT="10")
    pub = Publisher(gw.port)
    try:
        published = [await pub.publish("w1", "big", {"i": i, "blob": "x" * 20000}) for i in range(300)]
        async with ws_connect(Addr(gw), "w1", token=_token(["w1"], "u")) as c:
            for conn in gw.connections:
                conn._raw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            await c.send({"type": "subscribe", "channel": "events:big", "since": published[0] - 1})
            assert (await c.recv_type("subscribed"))["channel"] == "events:big"
            got = [(await c.recv_event(20))["seq"] for _ in range(300)]
            live = await pub.publish("w1", "big", {"i": "live"})
            assert (await c.recv_event(10))["seq"] == live
        assert got == published and gw.metrics.drops_slow_reader == 0
    finally:
        await pub.close()
        await gw.shutdown()


async def test_readers_that_stop_reading_during_a_read_back_do_not_hold_up_other_resumes(kafka_broker, tmp_path):
    """A read-back from Kafka waits for its reader to take what it was sent; the node runs a
    few read-backs at a time (each holds a Kafka consumer). Clients that stopped reading in
    the middle of theirs (a hung tab, a peer gone without a FIN) held those places for as long
    as their connections lived, so every other client resuming on the node from before its
    memory waited, its subscriptions held back from the live stream too. Only the client that
    reads is waited for; the stalled ones get the rest of their read-back, in order, once they
    read again."""
    from rtserver.bus_kafka import _MAX_CONCURRENT_READ_BACKS
    from tests.test_churn import Addr, Publisher, _raw_upgrade, _token
    from tests.test_http_pipelining import masked_text_frame

    gw = await _node_in_process(kafka_broker, tmp_path, RT_HISTORY_EVENTS="2", RT_SEND_BUFFER_BYTES="262144",
                                RT_MAX_CONNECTIONS_PER_SUBJECT="20", RT_IDLE_TIMEOUT="600")
    pub = Publisher(gw.port)
    loop = asyncio.get_running_loop()
    stalled: list[socket.socket] = []
    try:
        published = [await pub.publish("w1", "big", {"i": i, "blob": "x" * 20000}) for i in range(150)]
        subscribe = json.dumps({"type": "subscribe", "channel": "events:big", "since": published[0] - 1}).encode()
        for _ in range(_MAX_CONCURRENT_READ_BACKS):
            known = set(gw.connections)
            s = await _raw_upgrade(gw.port, "w1", token=_token(["w1"], "u"), rcvbuf=65536)
            stalled.append(s)
            for _ in range(100):
                if set(gw.connections) - known:
                    break
                await asyncio.sleep(0.05)
            (conn,) = set(gw.connections) - known
            conn._raw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            await loop.sock_sendall(s, masked_text_frame(subscribe))
        # Each stalled read-back has sent what the client's and the gateway's buffers take.
        for _ in range(200):
            if all(c._raw.get_write_buffer_size() > 65536 for c in gw.connections):
                break
            await asyncio.sleep(0.05)
        async with ws_connect(Addr(gw), "w1", token=_token(["w1"], "v")) as c:
            await c.send({"type": "subscribe", "channel": "events:big", "since": published[-6]})
            assert (await c.recv_type("subscribed", 20))["channel"] == "events:big"
            assert [(await c.recv_event(20))["seq"] for _ in range(5)] == published[-5:]
            live = await pub.publish("w1", "big", {"i": "live"})
            assert (await c.recv_event(10))["seq"] == live
        # A stalled client reading again gets all of its read-back, in order, then the live one.
        reader, writer = await asyncio.open_connection(sock=stalled.pop(0))
        try:
            seqs = []
            while len(seqs) < len(published) + 1:
                first = await asyncio.wait_for(reader.readexactly(2), 20)
                size = first[1] & 0x7F
                if size == 126:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                elif size == 127:
                    size = int.from_bytes(await reader.readexactly(8), "big")
                msg = json.loads(await asyncio.wait_for(reader.readexactly(size), 20))
                if msg["type"] == "event":
                    seqs.append(msg["seq"])
            assert seqs == [*published, live]
        finally:
            writer.close()
        assert gw.metrics.drops_slow_reader == 0
    finally:
        for s in stalled:
            s.close()
        await pub.close()
        await gw.shutdown()


async def test_two_subscriptions_read_back_with_the_same_since_send_each_event_once(kafka_broker, tmp_path):
    """`events:*` and `events:orders` subscribed with one `since` older than the node's
    memory: the second read-back from Kafka leaves out what the first sent (before, every
    `orders` event it read back came twice)."""
    from tests.test_churn import Addr, Publisher, _token

    gw = await _node_in_process(kafka_broker, tmp_path, RT_HISTORY_EVENTS="2")
    pub = Publisher(gw.port)
    try:
        last = await pub.publish("w1", "orders", {"i": -1})
        missed = [await pub.publish("w1", topic, {"i": i}) for i, topic in enumerate(["orders", "other"] * 4)]
        async with ws_connect(Addr(gw), "w1", token=_token(["w1"], "u")) as c:
            await c.send({"type": "subscribe", "channel": "events:*", "since": last})
            await c.recv_type("subscribed")
            assert [(await c.recv_event(10))["seq"] for _ in missed] == missed
            await c.send({"type": "subscribe", "channel": "events:orders", "since": last})
            await c.recv_type("subscribed")
            await c.no_message()
            live = await pub.publish("w1", "orders", {"i": "live"})
            assert (await c.recv_event(10))["seq"] == live
            await c.no_message()
    finally:
        await pub.close()
        await gw.shutdown()


async def test_a_publish_nesting_too_deeply_for_the_bus_is_400_not_500(cluster):
    """The publish API decodes the body, and a body nesting deeper than the stack allows is 400
    ("JSON nests too deeply"). On the Kafka bus the event is then encoded (msgpack) a few calls
    further down the stack: a body nesting just under the decoder's limit decoded but could not
    be encoded, and the publisher got 500 "internal error", its connection closed, and the log
    an ERROR traceback, at will. It is 400 now, nothing is sent, and the node publishes on."""
    gw = await cluster.node()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    token = gw.token("w1", publish=True)
    statuses = {}
    try:
        for depth in range(960, 1000):
            body = b"[" * depth + b"]" * depth  # json.dumps would itself run out of stack
            writer.write(b"POST /workspaces/w1/realtime/events/deep HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (token.encode(), len(body), body))
            status, _, body = await read_answer(reader)
            statuses[depth] = status
            if status == 400:
                assert b"nests too deeply" in body, body
        assert set(statuses.values()) == {202, 400}, statuses
        writer.write(post_request("/workspaces/w1/realtime/events/after", token, {"ok": True}))
        assert (await read_answer(reader))[0] == 202
    finally:
        writer.close()
    assert '"level":"error"' not in gw.logs()


async def test_pipelined_publishes_travel_to_kafka_together_and_are_answered_in_order(kafka_broker, tmp_path):
    """A publisher's pipelined requests on a Kafka node: every record goes to the producer
    before the first is acknowledged (not one Kafka round trip each), the answers leave in
    request order with consecutive seqs, and subscribers get the events in that order."""
    from rtserver import http
    from tests.test_churn import SECRET, Addr, _token
    from tests.test_http_pipelining import RecordingTransport

    gw = await _node_in_process(kafka_broker, tmp_path, RT_HISTORY_EVENTS="1000")
    token = _token(["w1"], "publisher", publish=True, secret=SECRET)

    def request(i: int) -> bytes:
        return post_request("/workspaces/w1/realtime/events/t", token, {"i": i})

    try:
        async with ws_connect(Addr(gw), "w1", token=_token(["w1"], "u")) as c:
            await c.send({"type": "subscribe", "channel": "events:t"})
            await c.recv_type("subscribed")
            proto = http.FrontProtocol(gw)
            transport = RecordingTransport()
            proto.connection_made(transport)
            before = gw.bus.publisher.published
            proto.data_received(b"".join(request(i) for i in range(40)))
            assert gw.bus.publisher.published - before == 40 and transport.responses() == []
            for _ in range(200):
                if len(transport.responses()) == 40:
                    break
                await asyncio.sleep(0.05)
            got = transport.responses()
            assert [s for s, _ in got] == [202] * 40, got
            seqs = [b["seq"] for _, b in got]
            assert seqs == list(range(seqs[0], seqs[0] + 40))  # one partition: consecutive offsets
            assert transport.writes < 40  # answers of one acknowledgement leave together
            events = [await c.recv_event(10) for _ in range(40)]
            assert [e["seq"] for e in events] == seqs
            assert [e["payload"]["i"] for e in events] == list(range(40))

            # the same over a real socket: 300 requests written at once, answered in order
            answers = await pipelined_posts(gw.port, token, "/workspaces/w1/realtime/events/t",
                                            [{"i": i} for i in range(40, 340)])
            assert [s for s, _ in answers] == [202] * 300
            more = [b["seq"] for _, b in answers]
            assert more == list(range(seqs[-1] + 1, seqs[-1] + 301))
            events = [await c.recv_event(10) for _ in range(300)]
            assert [(e["seq"], e["payload"]["i"]) for e in events] == list(zip(more, range(40, 340), strict=True))
    finally:
        await gw.shutdown()


async def test_foreign_records_on_the_topic_are_skipped_with_a_log(cluster):
    """Records rtserver did not write (another producer on the topic, a damaged record) are
    skipped with a log naming where they are; before, a key that was not UTF-8 ended the node's
    consumer (no event reached its clients any more, /readyz still 200) and a body that was not
    a JSON object went to the clients as broken JSON. A node started later reads them back at
    start and in a resume the same way."""
    import msgspec
    from aiokafka import AIOKafkaProducer

    node = await cluster.node()
    topic = cluster.env["RT_BUS_TOPIC"]
    foreign = [
        (b"\xff\xfe", b"\x00not ours"),  # key not UTF-8
        (b"w1", b"\x00not msgpack"),
        (b"w1", msgspec.msgpack.encode(["events", "x", "PUBLISH", None, None, b"not json"])),
        (b"w1", msgspec.msgpack.encode(["events", "x", "PUBLISH", None, None, b"{}"])),  # was sent as {,"seq":…}
        (None, b"no key"),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"])
    await producer.start()
    try:
        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.subscribe("events:x")
            await node.publish("w1", "x", {"n": 1})
            (first,) = await events(c, 1)
            for k, v in foreign:
                await producer.send_and_wait(topic, v, key=k)
            await node.publish("w1", "x", {"n": 2})
            (second,) = await events(c, 1)
            assert second["payload"] == {"n": 2}
            await c.no_message(0.3)
    finally:
        await producer.stop()
    skipped = await logged(node, "bus record skipped", len(foreign))
    assert all(s["topic"] == topic and isinstance(s["offset"], int) for s in skipped), skipped
    assert json.loads((await node.get("/readyz"))[1])["ready"]
    # A node started afterwards remembers only the last event: the resume reads the rest back.
    late = await cluster.node(RT_HISTORY_EVENTS="1")
    async with ws_connect(late, "w1", token=late.token("w1")) as c:
        await c.send({"type": "subscribe", "channel": "events:x", "since": first["seq"]})
        await c.recv_type("subscribed", timeout=20)
        got = await events(c, 1)
        await c.no_message(0.5)
    assert [(e["seq"], e["payload"]) for e in got] == [(second["seq"], {"n": 2})]


async def test_a_foreign_record_nesting_past_the_stack_does_not_stop_the_consumer(cluster):
    """A record of another producer (or damaged) whose value is MessagePack nesting deeper than
    the stack allows made the decoder raise RecursionError, not a decode error: it was no
    ForeignRecord, it ended the node's consumer loop ("bus consumer stopped"), and the node
    delivered no event any more, as every node reading the topic past it would, restarts
    included. It is skipped with a log as the other foreign records are."""
    import msgspec
    from aiokafka import AIOKafkaProducer

    node = await cluster.node()
    topic = cluster.env["RT_BUS_TOPIC"]
    head = b"\x96" + b"".join(msgspec.msgpack.encode(s) for s in ("events", "x", "PUBLISH"))
    deep = head + b"\x91" * 5000 + b"\xc0" + b"\xc0" + msgspec.msgpack.encode(b"{}")  # record: [[[...nil...]]]
    producer = AIOKafkaProducer(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"])
    await producer.start()
    try:
        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.subscribe("events:x")
            await producer.send_and_wait(topic, deep, key=b"w1")
            await node.publish("w1", "x", {"n": 1})
            (event,) = await events(c, 1)
            assert event["payload"] == {"n": 1}
    finally:
        await producer.stop()
    (skipped,) = await logged(node, "bus record skipped", 1)
    assert "nests too deeply" in skipped["msg"], skipped
    assert "bus consumer stopped" not in node.logs()


async def logged(proc, text: str, count: int, timeout: float = 10) -> list[dict]:
    """The log lines of `proc` holding `text`, once there are `count` of them: a process logs
    from a thread of its own (rtserver.logs.LineWriter), so a line may reach the file after
    the event that followed it reached a client. More than `count` fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in proc.logs().splitlines() if text in line]
        if len(lines) >= count:
            assert len(lines) == count, proc.logs()
            return lines
        assert time.monotonic() < deadline, f"{len(lines)} of {count} lines {text!r} logged:\n{proc.logs()}"
        await asyncio.sleep(0.05)


async def test_records_deleted_before_a_node_read_them_are_a_history_gap(cluster):
    """A node behind the topic (frozen here) whose next records retention deleted meanwhile
    (here DeleteRecords) lost them: its subscribers get history_gap before the events that
    follow, and a resume from before the loss gets one too. Before, Kafka's consumer went on
    from the oldest record kept (auto_offset_reset) without a word: a silent loss."""
    from aiokafka import AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

    from rtserver.bus_kafka import partition_for

    node = await cluster.node()
    topic, bootstrap = cluster.env["RT_BUS_TOPIC"], cluster.env["RT_BUS_KAFKA_BOOTSTRAP"]

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await producer.start()
    await admin.start()
    try:
        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.subscribe("events:x")
            await producer.send_and_wait(topic, _bus_event(0), key=b"w1")
            (first,) = await events(c, 1)
            os.kill(node.proc.pid, signal.SIGSTOP)
            try:
                offsets = [(await producer.send_and_wait(topic, _bus_event(n), key=b"w1")).offset for n in range(1, 41)]
                # n = 1..34 deleted before the node reads them (the fetch it had sent may get a few)
                tp = TopicPartition(topic, partition_for("w1", 3))
                await admin.delete_records({tp: RecordsToDelete(offsets[34])})
            finally:
                os.kill(node.proc.pid, signal.SIGCONT)
            got = []
            while not got or got[-1].get("payload") != {"n": 40}:
                got.append(await c.recv(timeout=20))
            await c.no_message(0.3)
        gaps = [m for m in got if m["type"] == "error"]
        assert [(m["code"], m["channel"], m["oldest"]) for m in gaps] == [(4011, "events:x", offsets[34] + 1)], got
        assert [m["payload"]["n"] for m in got[got.index(gaps[0]) + 1:]] == list(range(35, 41)), got
        before = [m["seq"] for m in got[:got.index(gaps[0])]]
        assert before == list(range(first["seq"] + 1, first["seq"] + 1 + len(before))), got  # no hole before it
        # A reader from before the loss hears of it too.
        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.send({"type": "subscribe", "channel": "events:x", "since": first["seq"]})
            await c.recv_type("subscribed", timeout=20)
            gap = await c.recv(timeout=20)
            assert gap["type"] == "error" and gap["code"] == 4011 and gap["oldest"] == offsets[34] + 1, gap
            assert [e["payload"]["n"] for e in await events(c, 6)] == list(range(35, 41))
            await c.no_message(0.3)
    finally:
        await producer.stop()
        await admin.close()
    assert "events lost to this node" in node.logs()
    assert json.loads((await node.get("/readyz"))[1])["ready"]


async def test_takeover_skips_per_partition_what_the_dead_ingest_published(cluster):
    """A row of a database feeding two workspaces is two events on two partitions (two broker
    leaders in a real cluster): a killed ingest may leave the later one in Kafka and not the
    earlier. The topic is left here as such a kill leaves it (the second event of a transaction
    written, the first not); the new holder must publish the first and not the second. Before,
    it skipped as many events as the newest position header named on any partition: w1's
    row was lost."""
    from contextlib import AsyncExitStack

    from aiokafka import AIOKafkaProducer

    from rtcore.event import Event
    from rtcore.pgoutput_ref import parse_lsn
    from rtserver.bus_kafka import encode_event, partition_for
    from rtserver.ingest import POSITION_HEADER

    assert partition_for("w1", 3) != partition_for("w2", 3)
    cluster.env["RT_BUS_WORKSPACES"] = "w1,w2"  # each row: event 1 for w1, event 2 for w2
    first = await cluster.ingest()
    await first.wait_active()
    node = await cluster.node()
    async with AsyncExitStack() as stack:
        c1 = await stack.enter_async_context(ws_connect(node, "w1", token=node.token("w1")))
        c2 = await stack.enter_async_context(ws_connect(node, "w2", token=node.token("w2")))
        for c in (c1, c2):
            await c.subscribe("postgres:orders")
        await cluster.db.execute("INSERT INTO orders VALUES (1, 'before')")
        (one,) = await events(c2, 1)
        await events(c1, 1)
        (feed,) = (await first.status())["feeds"].values()
        slot, lsn = feed["slot"], parse_lsn(feed["published_lsn"])
        await first.stop()  # the slot is acknowledged up to row 1's transaction
        await cluster.db.execute("INSERT INTO orders VALUES (2, 'in flight when the ingest died')")
        # What the killed ingest left in Kafka: row 2's event for w2 (the 2nd after `lsn`) only.
        # Its correlation id is the application's (not pg-<xid>-<commit LSN>, which would say
        # the transaction: test_a_clean_handover_from_an_earlier_version_loses_nothing).
        body = json.dumps({**{k: v for k, v in one.items() if k != "seq"}, "record": {"id": 2, "note": "w2 copy"},
                           "correlationId": "set by the application"})
        value = encode_event(Event("w2", "postgres", "orders", "INSERT", {"id": 2}, body.encode()))
        producer = AIOKafkaProducer(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"])
        await producer.start()
        try:
            await producer.send_and_wait(cluster.env["RT_BUS_TOPIC"], value, key=b"w2",
                                         headers=[(POSITION_HEADER, f"{slot}|{lsn}|2".encode())])
        finally:
            await producer.stop()
        second = await cluster.ingest()
        await second.wait_active()
        got1, got2 = await events(c1, 1), await events(c2, 1)
        await cluster.db.execute("INSERT INTO orders VALUES (3, 'after')")
        got1 += await events(c1, 1)
        got2 += await events(c2, 1)
        for c in (c1, c2):
            await c.no_message(0.5)
    assert [e["record"]["id"] for e in got1] == [2, 3]
    assert [(e["record"]["id"], e["record"].get("note")) for e in got2] == [(2, "w2 copy"), (3, "after")]
    (feed,) = (await second.status())["feeds"].values()
    assert feed["takeover_skipped"] == 1, feed


async def test_a_clean_handover_loses_nothing(cluster):
    """The active ingest stops cleanly (SIGTERM: a rolling upgrade) and a standby on another
    machine takes over: the rows written afterwards all arrive. The stopped ingest had
    acknowledged its last transaction to the slot, so the slot does not deliver it again; the
    new holder's first transaction follows the same published LSN, and was taken for the one
    the position header named: its first events were dropped as already published."""
    first = await cluster.ingest()
    await first.wait_active()
    node = await cluster.node()
    async with ws_connect(node, "w1", token=node.token("w1")) as c:
        await c.subscribe("postgres:orders")
        await cluster.db.execute("INSERT INTO orders VALUES (1, 'before')")
        got = await events(c, 1)
        await first.stop()
        second = await cluster.ingest()
        await second.wait_active()
        for i in (2, 3):
            await cluster.db.execute("INSERT INTO orders VALUES ($1, 'after')", i)
        got += await events(c, 2)
        await c.no_message(0.5)
    assert [e["record"]["id"] for e in got] == [1, 2, 3]
    (feed,) = (await second.status())["feeds"].values()
    assert feed["takeover_skipped"] == 0, feed


async def test_a_record_kafka_refused_is_read_again_not_lost(cluster):
    """The ingest's feed records its position only for records Kafka committed. Kafka refuses
    a record here (the topic's max.message.bytes lowered under the change; the operator raises
    it again): the Kafka transaction fails, the ingest gives up the lease and joins again
    (backing off while it fails again), and the refused transaction and the one after it are
    read again and published once each, without a restart of the process. Before, the drain the
    feed ran before recording a partial position found nothing left to wait for and recorded
    the refused records as published: the feed dropped them as duplicates, and the next row
    with them, and acknowledged them to the slot (lost for every later ingest too)."""
    from rtserver.bus_kafka import RECORD_OVERHEAD

    ingest = await cluster.ingest()
    await ingest.wait_active()
    node = await cluster.node()
    async with topic_record_limit(cluster) as limit:
        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.subscribe("postgres:orders")
            await cluster.db.execute("INSERT INTO orders VALUES (1, 'small')")
            got = await events(c, 1)
            await limit(1_000_000)
            big = incompressible(1_500_000)
            await cluster.db.execute("INSERT INTO orders VALUES (2, $1)", big)
            await cluster.db.execute("INSERT INTO orders VALUES (3, 'small')")
            # Two failed attempts: the first refused the record, the second read the transaction
            # again (before, it was then dropped as already published and acknowledged).
            while ingest.logs().count('"msg":"ingest: a Kafka transaction failed') < 2:
                await asyncio.sleep(0.2)
            assert "MessageSizeTooLargeError" in ingest.logs()
            assert (await ingest.status())["bus"]["writer_failures"] >= 2
            await limit(4 * 1024 * 1024 + RECORD_OVERHEAD)
            got += await events(c, 2, timeout=30)  # the feed retries, backing off up to 10 s
            await c.no_message(0.5)
    assert [e["record"]["id"] for e in got] == [1, 2, 3]
    assert len(got[1]["record"]["note"]) == len(big)


async def test_a_record_kafka_refused_does_not_block_its_partition(cluster):
    """Kafka refuses a publish (larger than the topic's max.message.bytes, lowered here):
    413, not published (it was 503, which tells a publisher a retry is safe: each retry was
    refused alike); the next publishes to that workspace go through. Before, aiokafka's
    idempotent producer kept the refused batch's sequence numbers, and Kafka refused every
    later record of the partition (OutOfOrderSequenceNumber) until the node restarted; the
    ingest's feed likewise stalled behind a refused record after the operator had raised the
    limit again."""
    node = await cluster.node()
    async with topic_record_limit(cluster) as limit:
        await limit(4096)

        def post(payload: dict):
            return node.post("/workspaces/w1/realtime/events/x", json.dumps(payload).encode(),
                             {"Authorization": f"Bearer {node.token('w1', publish=True)}"})

        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.subscribe("events:x")
            assert (await post({"n": 0}))[0] == 202  # Kafka knows this producer on the partition
            status, body = await post({"n": 1, "blob": "x" * 3000})
            assert status == 413 and b"MessageSizeTooLarge" in body, (status, body)
            for n in (2, 3):
                status, body = await post({"n": n})
                assert status == 202, (status, body)
            got = await events(c, 3)
            await c.no_message(0.3)
    assert [e["payload"]["n"] for e in got] == [0, 2, 3]


async def test_small_events_sent_together_fit_a_topic_with_a_small_record_limit(cluster):
    """A topic whose max.message.bytes (4096 here) is under the producer's batch size (16 KiB):
    the node batches a partition's records up to the topic's limit. Before, small events sent
    together left in one Kafka batch over the limit, which Kafka refused whole: each was
    answered 413 "payload too large" though every one fits."""
    await cluster.node()  # creates the topic
    async with topic_record_limit(cluster) as limit:
        await limit(4096)
    node = await cluster.node()  # reads the limit at start
    items = [{"topic": "x", "payload": {"n": n, "pad": "p" * 200}} for n in range(60)]
    async with ws_connect(node, "w1", token=node.token("w1")) as c:
        await c.subscribe("events:x")
        status, out = await node.post("/workspaces/w1/realtime/events", json.dumps({"events": items}).encode(),
                                      {"Authorization": f"Bearer {node.token('w1', publish=True)}"})
        assert status == 202, out
        got = await events(c, len(items))
    assert [e["payload"]["n"] for e in got] == list(range(60))


async def test_small_events_sent_with_one_too_large_are_told_to_retry(cluster):
    """The topic's max.message.bytes lowered under a running node, which checks records
    against the limit it read at start: Kafka refuses the whole request that carries the one
    record now too large. That one is answered 413 (the node reads the limit again to tell);
    the small events sent with it were answered 413 as well, and a publisher dropped them.
    They are now refused 503 (not published, a retry is safe), and published when retried."""
    node = await cluster.node()
    async with topic_record_limit(cluster) as limit:
        await limit(4096)
        items = ([{"topic": "x", "payload": {"n": 0}}, {"topic": "x", "payload": {"n": 1, "blob": "x" * 3000}}]
                 + [{"topic": "x", "payload": {"n": n}} for n in range(2, 21)])
        auth = {"Authorization": f"Bearer {node.token('w1', publish=True)}"}
        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.subscribe("events:x")
            status, out = await node.post("/workspaces/w1/realtime/events", json.dumps({"events": items}).encode(),
                                          auth)
            answers = json.loads(out)["events"]
            published = [n for n, a in enumerate(answers) if "seq" in a]
            first_failure = next(a for a in answers if "seq" not in a)
            assert status == first_failure["status"] and answers[1]["status"] == 413, (status, answers)
            assert "MessageSizeTooLarge" in answers[1]["error"], answers[1]
            refused = [n for n, a in enumerate(answers) if "seq" not in a and n != 1]
            assert all(answers[n]["status"] == 503 and "a retry is safe" in answers[n]["error"] for n in refused), answers
            assert sorted(published + refused + [1]) == list(range(21)), answers
            retry = [items[n] for n in refused]
            status, out = await node.post("/workspaces/w1/realtime/events", json.dumps({"events": retry}).encode(), auth)
            assert status == 202, out
            got = await events(c, len(published) + len(refused))
            await c.no_message(0.3)
            # The limit now read: a record over it is refused before it is sent.
            status, out = await node.post("/workspaces/w1/realtime/events/x", json.dumps({"blob": "x" * 8000}).encode(),
                                          auth)
            assert status == 413 and b"events topic takes" in out, (status, out)
    assert sorted(e["payload"]["n"] for e in got) == published + refused


async def test_small_changes_written_together_fit_a_topic_limit_lowered_under_the_ingest(cluster):
    """The topic's max.message.bytes lowered under a running ingest to 4096, under the
    producer's batch size (16 KiB): the first transaction of many small rows, each record of
    which fits, leaves in one batch over the limit and Kafka refuses it. The ingest reads the
    limit again, and its next writer batches under it: every row arrives, once. Before, each
    attempt was refused alike and the feed stalled until the limit was raised again."""
    ingest = await cluster.ingest()
    await ingest.wait_active()
    node = await cluster.node()
    async with topic_record_limit(cluster) as limit:
        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.subscribe("postgres:orders")
            await limit(4096)
            await cluster.db.execute("INSERT INTO orders SELECT g, repeat('n', 150) FROM generate_series(1, 40) g")
            got = await events(c, 40, timeout=30)  # the feed retries after a back-off
            await c.no_message(0.5)
    assert [e["record"]["id"] for e in got] == list(range(1, 41))
    assert "MessageSizeTooLargeError" in ingest.logs()
    (feed,) = (await ingest.status())["feeds"].values()
    assert feed["oversized_skipped"] == 0, feed


async def test_a_topic_created_beforehand_with_a_smaller_record_limit(cluster):
    """The events topic was created beforehand with the broker's default max.message.bytes
    (1 MiB, below RT_BUS_MAX_RECORD_BYTES): a change between the two is skipped with a
    history_gap and the feed goes on. Before, Kafka refused it on every retry and the feed
    stalled behind it (the rows after it never came)."""
    from tests.harness.kafka import create_topics

    await create_topics(cluster.env["RT_BUS_KAFKA_BOOTSTRAP"], [cluster.env["RT_BUS_TOPIC"]], partitions=3)
    ingest = await cluster.ingest()
    await ingest.wait_active()
    node = await cluster.node()
    async with ws_connect(node, "w1", token=node.token("w1")) as c:
        await c.subscribe("postgres:orders")
        await cluster.db.execute("INSERT INTO orders VALUES (1, 'small')")
        got = [await c.recv(timeout=20)]
        big = incompressible(1_500_000)
        await cluster.db.execute("INSERT INTO orders VALUES (2, $1)", big)
        await cluster.db.execute("INSERT INTO orders VALUES (3, 'small')")
        got += [await c.recv(timeout=20), await c.recv(timeout=20)]
        await c.no_message(0.5)
    assert [m.get("record", {}).get("id") for m in got if m["type"] == "event"] == [1, 3], got
    (gap,) = [m for m in got if m["type"] == "error"]
    assert gap["code"] == 4011 and gap["channel"] == "postgres:orders" and "max.message.bytes" in gap["message"], gap
    (feed,) = (await ingest.status())["feeds"].values()
    assert feed["oversized_skipped"] == 1, feed
    assert "takes records up to" in ingest.logs()


async def test_a_node_started_after_a_gap_record_reports_it(cluster):
    """A node whose start-up window begins with a source's gap record, before any event of
    that workspace, still tells a reader from before the loss: history_gap, then the events
    after it. Before, the gap record of a workspace the node did not hold yet was dropped, the
    workspace's history then started at the window's start, and the resume from just before
    it got the events with no word of the loss."""
    import msgspec
    from aiokafka import AIOKafkaProducer

    from rtcore.event import Event
    from rtserver.bus_kafka import GAP, BusRecord, encode_event

    def row(n: int) -> bytes:
        body = json.dumps({"type": "event", "channel": "postgres:orders", "operation": "INSERT", "table": "orders",
                           "schema": "public", "record": {"id": n}}).encode()
        return encode_event(Event("w1", "postgres", "orders", "INSERT", {"id": n}, body))

    topic = cluster.env["RT_BUS_TOPIC"]
    first = await cluster.node()  # creates the topic
    producer = AIOKafkaProducer(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"])
    await producer.start()
    try:
        before = (await producer.send_and_wait(topic, row(1), key=b"w1")).offset + 1
        gap = BusRecord("postgres", "", GAP, None, None, b"replication slot was lost")  # as publish_gap writes it
        await producer.send_and_wait(topic, msgspec.msgpack.encode(gap), key=b"w1")
        await producer.send_and_wait(topic, row(2), key=b"w1")
    finally:
        await producer.stop()
    late = await cluster.node(RT_HISTORY_EVENTS="2")  # its window: the gap record and row 2
    for gw in (first, late):
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
            await c.send({"type": "subscribe", "channel": "postgres:orders", "since": before})
            await c.recv_type("subscribed", timeout=20)
            notice = await c.recv(timeout=20)
            assert (notice["type"], notice.get("code"), notice["channel"]) == ("error", 4011, "postgres:orders"), notice
            assert [e["record"]["id"] for e in await events(c, 1)] == [2]
            await c.no_message(0.3)


async def test_partitions_added_to_the_live_topic_move_no_workspace(cluster):
    """An operator adds partitions to the live events topic (the docs say never): running
    processes keep every workspace on its partition, so the events still reach the nodes with
    seq going up, and each says loudly what a restart would do. Before, the producer hashed over
    the new count: most workspaces' events went to partitions no node reads (lost, the publish
    answered 202 with a seq that went back)."""
    from contextlib import AsyncExitStack

    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

    node = await cluster.node()
    workspaces = [f"w{i}" for i in range(1, 9)]
    first = {w: (await node.publish(w, "x", {"n": 0}))["seq"] for w in workspaces}
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"])
    await admin.start()
    try:
        await admin.create_partitions({cluster.env["RT_BUS_TOPIC"]: NewPartitions(total_count=12)})
    finally:
        await admin.close()
    while json.loads((await node.get("/readyz"))[1])["bus"]["partitions_added"] != 9:
        await asyncio.sleep(0.2)  # the node's metadata watch has seen them
    async with AsyncExitStack() as stack:
        clients = {w: await stack.enter_async_context(ws_connect(node, w, token=node.token(w))) for w in workspaces}
        for c in clients.values():
            await c.subscribe("events:x")
        second = {w: (await node.publish(w, "x", {"n": 1}))["seq"] for w in workspaces}
        for w, c in clients.items():
            (ev,) = await events(c, 1)
            assert (ev["payload"], ev["seq"]) == ({"n": 1}, second[w]), w
            await c.no_message(0.1)
    assert all(second[w] > first[w] for w in workspaces), (first, second)
    assert "now has 12 partitions, 3 when this process started" in node.logs()


async def test_resume_on_a_node_behind_the_client_sends_nothing_twice(cluster):
    """A client that saw events on node A subscribes with `since` on node B, which has not read
    that far yet (frozen here behind a burst in the same partition): B sends only what follows
    `since`, seq going up. Before, the subscription went live at once and B then delivered the
    events the client had already seen, seq going back."""
    from aiokafka import AIOKafkaProducer

    from rtcore.event import Event
    from rtserver.bus_kafka import encode_event, partition_for

    assert partition_for("w3", 3) == partition_for("w1", 3)
    a, b = await cluster.node(), await cluster.node(RT_BUS_MAX_LAG="1000000")
    burst = encode_event(Event("w3", "events", "burst", "PUBLISH", None, b'{"channel":"events:burst"}'))
    producer = AIOKafkaProducer(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"], linger_ms=20,
                                max_batch_size=1 << 20)
    await producer.start()
    try:
        async with ws_connect(a, "w1", token=a.token("w1")) as ca, ws_connect(b, "w1", token=b.token("w1")) as cb:
            await ca.subscribe("events:x")
            os.kill(b.proc.pid, signal.SIGSTOP)
            try:
                for _ in range(50_000):  # w1's events below come after it in their partition
                    await producer.send(cluster.env["RT_BUS_TOPIC"], burst, key=b"w3")
                await producer.flush()
                for n in (1, 2, 3):
                    await a.publish("w1", "x", {"n": n})
                seen = await events(ca, 3)
                await cb.send({"type": "subscribe", "channel": "events:x", "since": seen[-1]["seq"]})
            finally:
                os.kill(b.proc.pid, signal.SIGCONT)
            await cb.recv_type("subscribed", timeout=20)
            await a.publish("w1", "x", {"n": 4})
            got = await events(cb, 1, timeout=30)
            await cb.no_message(0.5)
    finally:
        await producer.stop()
    assert [(e["payload"]["n"], e["seq"] > seen[-1]["seq"]) for e in got] == [(4, True)], got


async def test_a_gap_announced_while_kafka_is_down_survives_an_ingest_restart(cluster, kafka_broker):
    """A change the ingest must skip (too large for the topic) while Kafka is down: its gap
    record waits for Kafka, and so does the feed's position, so an ingest stopped meanwhile
    leaves the change to be read (and announced) again. Before, the feed acknowledged the
    skipped change at once (nothing of it waited for Kafka), the gap record was lost with the
    stopped ingest, and the subscribers never heard of the loss. The stop says so in a warning
    (it was an error with a traceback: "ingest did not close cleanly")."""
    cluster.env["RT_BUS_MAX_RECORD_BYTES"] = "65536"
    first = await cluster.ingest()
    await first.wait_active()
    node = await cluster.node()
    async with ws_connect(node, "w1", token=node.token("w1")) as c:
        await c.subscribe("postgres:orders")
        await cluster.db.execute("INSERT INTO orders VALUES (1, 'small')")
        got = await events(c, 1)
        await kafka_broker.astop()
        try:
            await cluster.db.execute("INSERT INTO orders VALUES (2, $1)", "x" * 100_000)
            while not any(f["oversized_skipped"] for f in (await first.status())["feeds"].values()):
                await asyncio.sleep(0.1)
            await first.stop()
            assert first.proc.returncode == 0, first.logs()
            # Kafka away at the stop is no error (docs/scale-out.md): a warning, no traceback.
            assert "ingest stopped before Kafka took its last records" in first.logs(), first.logs()
            assert "did not close cleanly" not in first.logs() and "Traceback" not in first.logs(), first.logs()
        finally:
            await kafka_broker.astart()
        second = await cluster.ingest()
        await second.wait_active(timeout=60)
        await cluster.db.execute("INSERT INTO orders VALUES (3, 'small')")
        while got[-1].get("record", {}).get("id") != 3:
            got.append(await c.recv(timeout=30))
        await c.no_message(0.5)
    assert [(m["type"], m.get("code"), m.get("record", {}).get("id")) for m in got] == [
        ("event", None, 1), ("error", 4011, None), ("event", None, 3)], got


async def test_a_takeover_after_a_transaction_was_read_again_skips_only_what_kafka_has(cluster):
    """A feed reads a transaction again after Kafka refused one of its records (each attempt
    publishing its first row again); the ingest is killed, the limit raised, a standby takes
    over. The position headers number each event within its transaction, the same on every
    attempt, so the new holder skips the first row (in Kafka) and publishes the second. Before,
    the count went on across attempts (the second attempt's first row was the 3rd), and the new
    holder skipped the never-written second row as well: lost."""
    from rtserver.bus_kafka import RECORD_OVERHEAD

    first = await cluster.ingest()
    await first.wait_active()
    node = await cluster.node()
    async with topic_record_limit(cluster) as limit:
        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.subscribe("postgres:orders")
            await cluster.db.execute("INSERT INTO orders VALUES (0, 'small')")
            got = await events(c, 1)
            await limit(1_000_000)
            big = incompressible(1_500_000)
            async with cluster.db.transaction():
                await cluster.db.execute("INSERT INTO orders VALUES (1, 'small')")
                await cluster.db.execute("INSERT INTO orders VALUES (2, $1)", big)
            while first.logs().count('"msg":"ingest: a Kafka transaction failed') < 2:  # two attempts refused
                await asyncio.sleep(0.2)
            await first.stop(signal.SIGKILL)
            await limit(4 * 1024 * 1024 + RECORD_OVERHEAD)
            second = await cluster.ingest()
            await second.wait_active()
            await cluster.db.execute("INSERT INTO orders VALUES (3, 'small')")
            while got[-1]["record"]["id"] != 3:
                got += await events(c, 1)
            await c.no_message(0.5)
    ids = [e["record"]["id"] for e in got]
    # row 1 at least once, at most once per attempt: an attempt whose row 1 shared the refused
    # row's Kafka transaction (the feed did not yield to the loop between them) left nothing
    assert ids[0] == 0 and ids[-2:] == [2, 3] and set(ids[1:-2]) == {1}, ids


async def test_a_workspace_forgotten_in_retirement_resumes_without_a_silent_loss(kafka_broker, tmp_path, monkeypatch):
    """A node keeps the position of at most MAX_RETIRED retired workspaces (1 here, 1,000,000
    in production); a workspace whose position it forgot starts a new history. On a Kafka node
    that history started at the partition position the node started from: a reader who saw
    the workspace's first event and missed its second got nothing, no history_gap. Now a
    forgotten position raises the floor of later histories of its partition: the resume reads
    the missed event back from Kafka (in process: the test waits on the hub's retirements)."""
    from rtserver import hub as hub_module
    from tests.test_churn import Addr, Publisher, _token

    monkeypatch.setattr(hub_module, "MAX_RETIRED", 1)
    gw = await _node_in_process(kafka_broker, tmp_path, RT_HISTORY_SECONDS="0.5")
    pub = Publisher(gw.port)

    async def until(condition) -> None:
        while not condition():
            await asyncio.sleep(0.05)

    try:
        await until(gw.bus.ready)
        seen = await pub.publish("w1", "x", {"n": 0})
        missed = await pub.publish("w1", "x", {"n": 1})
        await until(lambda: gw.bus.status()["delivered"] == 2)
        await until(lambda: gw.hub.workspaces.get("w1") is None)  # retired (idle, history expired)
        await pub.publish("w2", "x", {"n": 0})
        await until(lambda: gw.bus.status()["delivered"] == 3)
        await until(lambda: gw.hub.workspaces.get("w2") is None)  # retired: w1's position forgotten
        async with ws_connect(Addr(gw), "w1", token=_token(["w1"], "u")) as c:
            await c.send({"type": "subscribe", "channel": "events:x", "since": seen})
            await c.recv_type("subscribed", timeout=20)
            got = await c.recv_event(20)
            await c.no_message(0.3)
        assert (got["seq"], got["payload"]) == (missed, {"n": 1})
    finally:
        await pub.close()
        await gw.shutdown()


async def test_the_ingest_health_port_listens_on_the_address_given(cluster):
    """`rtserver ingest --health-port P` listens on server.host, 127.0.0.1 by default: an
    orchestrator's probe or a Prometheus on another machine could reach it only through
    RT_HOST, which nothing said, as `rtserver serve --host` has no `ingest` counterpart. The
    ingest takes --host too."""
    ingest = await cluster.ingest("--host", "127.0.0.2")  # another loopback address
    deadline = time.monotonic() + 30
    while True:
        assert ingest.proc.returncode is None, ingest.logs()
        try:
            with urllib.request.urlopen(f"http://127.0.0.2:{ingest.port}/healthz", timeout=2) as r:
                assert r.status == 200
                break
        except OSError:
            assert time.monotonic() < deadline, ingest.logs()
            await asyncio.sleep(0.1)
    with pytest.raises(OSError):  # not on the default address
        urllib.request.urlopen(f"http://127.0.0.1:{ingest.port}/healthz", timeout=2)


async def test_the_ingest_readiness_names_each_feed_even_before_it_streams(cluster, tmp_path):
    """Two PostgreSQL feeds that never reached their database (no slot name yet) were both
    "postgres:" in the ingest's /readyz: one hid the other, whose error an operator never saw.
    Each has its entry, by its URL without the password."""
    config = tmp_path / "rt.toml"
    config.write_text("[workspaces.w2]\npostgres_url = 'postgresql://rt:s3cret@127.0.0.1:1/a'\n"
                      "[workspaces.w3]\npostgres_url = 'postgresql://rt:s3cret@127.0.0.1:2/b'\n")
    ingest = await cluster.ingest("--config", str(config))
    deadline = time.monotonic() + 30
    while True:
        assert ingest.proc.returncode is None, ingest.logs()
        try:
            status = await ingest.status()
            if status["role"] == "active" and len(status["feeds"]) == 3 and all(
                    f["last_error"] for k, f in status["feeds"].items() if "127.0.0.1:" in k):
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, (status, ingest.logs())
        await asyncio.sleep(0.1)
    assert {k for k in status["feeds"] if "127.0.0.1:" in k} == {
        "postgres:postgresql://***@127.0.0.1:1/a", "postgres:postgresql://***@127.0.0.1:2/b"}
    assert "s3cret" not in json.dumps(status)


async def test_the_ingest_health_endpoints_take_a_query_string_and_head(cluster):
    """The ingest read the request target whole: `/readyz?verbose=1` or a scrape with params
    (Prometheus `params:`) got 404, where the gateway answers them; HEAD got the body too."""
    ingest = await cluster.ingest()
    await ingest.wait_active()

    async def ask(method: str, target: str) -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", ingest.port)
        writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 10)  # the ingest closes after each answer
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        return head, body

    for path in ("/healthz", "/readyz", "/metrics"):
        head, body = await ask("GET", path + "?x=1")
        assert head.startswith(b"HTTP/1.1 200 ") and body, (path, head)
        head, body = await ask("HEAD", path)
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"", (path, head, body)
    assert parse_exposition((await ask("GET", "/metrics?x=1"))[1].decode())["rt_ingest_active"] == 1
    # Other methods are 405 naming GET and HEAD, as the gateway answers (a POST was answered as a GET).
    for method, path in (("POST", "/metrics"), ("DELETE", "/readyz"), ("PUT", "/healthz")):
        head, _ = await ask(method, path)
        assert head.startswith(b"HTTP/1.1 405 ") and b"\r\nAllow: GET, HEAD" in head, (method, path, head)
    assert (await ask("POST", "/nosuch"))[0].startswith(b"HTTP/1.1 404 ")


async def _ingest_and_node(cluster, gateway_factory, config):
    """An active ingest and a ready gateway node, both of the configuration file `config`."""
    first = await cluster.ingest("--config", str(config))
    await first.wait_active()
    node = await gateway_factory(env=cluster.env, args=["--config", str(config)])
    await wait_ready(node)
    return first, node


async def test_a_takeover_keeps_apart_the_positions_of_databases_named_alike(cluster, gateway_factory, pg_cluster,
                                                                             tmp_path):
    """Two feeds of one ingest read databases of one name on two servers: their slots are named
    alike (each on its server), and the position headers named the slot alone. A new holder
    took the newest of both servers' LSNs for both feeds and wrote it into one position file:
    feed b dropped its next changes as already published (b's subscriber got nothing). Each
    feed's headers and file now name its server and database too."""
    from tests.harness.fixtures_postgres import databases_named_alike, put_wal_ahead

    async with databases_named_alike(pg_cluster, tmp_path) as (db_a, db_b, config):
        first, node = await _ingest_and_node(cluster, gateway_factory, config)
        async with ws_connect(node, "a", token=node.token("a")) as ca, ws_connect(node, "b", token=node.token("b")) as cb:
            await ca.subscribe("postgres:t")
            await cb.subscribe("postgres:t")
            await db_b.execute("INSERT INTO t VALUES (1, 'b')")
            assert [e["record"]["id"] for e in await events(cb, 1)] == [1]
            await put_wal_ahead(db_a)  # server a's positions above server b's
            assert [e["record"]["id"] for e in await events(ca, 3)] == [-1, -1, 0]
            assert (await db_a.fetchval("SELECT pg_current_wal_lsn()")
                    > await db_b.fetchval("SELECT pg_current_wal_lsn()"))
            await first.stop(signal.SIGKILL)
            second = await cluster.ingest("--config", str(config))
            await second.wait_active(timeout=40)
            await db_b.execute("INSERT INTO t VALUES (2, 'b, after the takeover')")
            await db_a.execute("INSERT INTO t VALUES (3, 'a, after the takeover')")
            assert [e["record"]["id"] for e in await events(cb, 1)] == [2]
            assert [e["record"]["id"] for e in await events(ca, 1)] == [3]
            for c in (ca, cb):
                await c.no_message(0.5)


async def test_a_mongo_takeover_keeps_apart_databases_named_alike_on_two_deployments(cluster, gateway_factory,
                                                                                     tmp_path):
    """Two feeds of one ingest read a database `shop` each, on two MongoDB deployments. The
    rt-mongo headers named the database alone, so a new holder (another machine: no tokens of
    its own) seeded both feeds with the newest token of either deployment: feed b resumed
    after deployment a's token, and b's change written while no ingest ran never arrived.
    Each header names its feed (deployment and database) too."""
    from pymongo import AsyncMongoClient

    from tests.mongo_server import ThreadedMongoTestServer

    servers = [ThreadedMongoTestServer().start(), ThreadedMongoTestServer().start()]
    clients = [AsyncMongoClient(s.url, serverSelectionTimeoutMS=5000) for s in servers]
    try:
        shop_a, shop_b = (c["shop"] for c in clients)
        for shop in (shop_a, shop_b):
            await shop.orders.insert_one({"_id": 0})
        url_a, url_b = (s.url.replace("/?", "/shop?") for s in servers)
        config = tmp_path / "rt.toml"
        config.write_text(f"[workspaces.a]\nmongo_url = '{url_a}'\n[workspaces.b]\nmongo_url = '{url_b}'\n")
        first, node = await _ingest_and_node(cluster, gateway_factory, config)
        async with ws_connect(node, "a", token=node.token("a")) as ca, ws_connect(node, "b", token=node.token("b")) as cb:
            await ca.subscribe("mongo:orders")
            await cb.subscribe("mongo:orders")
            await shop_b.orders.insert_one({"_id": 1})
            assert [e["document"]["_id"] for e in await events(cb, 1)] == [1]
            for i in range(2, 12):  # deployment a's tokens newer than b's
                await shop_a.orders.insert_one({"_id": i})
            assert [e["document"]["_id"] for e in await events(ca, 10)] == list(range(2, 12))
            await first.stop(signal.SIGKILL)
            await shop_b.orders.insert_one({"_id": 2})  # while no ingest reads the feeds
            second = await cluster.ingest("--config", str(config))
            assert second.tmp.name != first.tmp.name
            await second.wait_active(timeout=40)
            await shop_b.orders.insert_one({"_id": 3})
            await shop_a.orders.insert_one({"_id": 12})
            assert [e["document"]["_id"] for e in await events(cb, 2)] == [2, 3]
            assert [e["document"]["_id"] for e in await events(ca, 1)] == [12]
            for c in (ca, cb):
                await c.no_message(0.5)
    finally:
        for client in clients:
            await client.close()
        for server in servers:
            server.stop()


async def _records_of_a_killed_mongo_holder(cluster, db, headed: int = 1) -> list:
    """The bus topic's records once an ingest has fed a change of `db` into it (up to `headed`
    records with the rt-mongo header, its resume token); that ingest is then killed."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from rtserver.ingest import MONGO_HEADER

    first = await cluster.ingest()
    await first.wait_active()
    await db.orders.insert_one({"_id": 1})
    consumer = AIOKafkaConsumer(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"],
                                isolation_level="read_committed", enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    records: list = []
    try:
        consumer.assign([TopicPartition(cluster.env["RT_BUS_TOPIC"], p) for p in range(3)])
        while sum(1 for r in records for name, _ in r.headers if name == MONGO_HEADER) < headed:
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                records += batch
    finally:
        await consumer.stop()
    await first.stop(signal.SIGKILL)
    return records


async def _republish(cluster, records: list, headers: Callable[[Any], list], timestamp_ms: int | None = None,
                     read_by=None) -> None:
    """`records` written again, each to its partition, into the cluster's bus topic (as set now),
    with the headers `headers` gives each; with `read_by` (a node), returns once that node has
    read them: a client subscribing sooner got them as live events (seen on a loaded machine)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"])
    await producer.start()
    try:
        for r in records:
            await producer.send_and_wait(cluster.env["RT_BUS_TOPIC"], r.value, key=r.key, partition=r.partition,
                                         headers=headers(r), timestamp_ms=timestamp_ms)
    finally:
        await producer.stop()
    if read_by is not None:
        # An event published after them to the same partition (w1's), seen live: the node's
        # consumer has passed them.
        async with ws_connect(read_by, "w1", token=read_by.token("w1")) as c:
            await c.subscribe("events:read-by")
            mark = await read_by.publish("w1", "read-by", {})
            assert [e["seq"] for e in await events(c, 1)] == [mark["seq"]]


async def test_a_mongo_takeover_reads_the_headers_of_an_earlier_version(cluster, mongo_server):
    """Upgrading: the topic's tail holds rt-mongo headers without rt-mongo-feed (an earlier
    version wrote them). The only feed of that database resumes after their token, on another
    machine, and drops the change already in Kafka: nothing lost, nothing repeated."""
    from pymongo import AsyncMongoClient

    from rtserver.ingest import MONGO_FEED_HEADER

    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    db = client["shop"]
    await db.orders.insert_one({"_id": 0})
    cluster.env["RT_MONGO_URL"] = mongo_server.url.replace("/?", "/shop?")
    old_topic = cluster.env["RT_BUS_TOPIC"]
    try:
        records = await _records_of_a_killed_mongo_holder(cluster, db)
        # The same records in a topic of their own, as an earlier version wrote them.
        cluster.env["RT_BUS_TOPIC"] = f"{old_topic}.earlier"
        node = await cluster.node()
        await _republish(cluster, records, lambda r: [(n, v) for n, v in r.headers if n != MONGO_FEED_HEADER],
                         read_by=node)
        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.subscribe("mongo:orders")
            await db.orders.insert_one({"_id": 2})  # while no ingest reads the feed
            second = await cluster.ingest()
            await second.wait_active(timeout=40)
            await db.orders.insert_one({"_id": 3})
            assert [e["document"]["_id"] for e in await events(c, 2)] == [2, 3]
            await c.no_message(0.5)
        feed = (await second.status())["feeds"]["mongo:shop"]
        assert feed["takeover_skipped"] == 1, feed
    finally:
        await client.close()


async def test_a_mongo_takeover_after_an_option_was_added_to_the_url(cluster, mongo_server):
    """The new holder's mongo_url has an option more (connectTimeoutMS): the feed's digest, in
    its rt-mongo-feed headers, differs from the dead holder's. It is still the only feed of
    that database: it resumes after the token Kafka has, and the change written while no
    ingest ran is not lost (a fresh stream would start after it)."""
    from pymongo import AsyncMongoClient

    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    db = client["shop"]
    await db.orders.insert_one({"_id": 0})
    url = mongo_server.url.replace("/?", "/shop?")
    cluster.env["RT_MONGO_URL"] = url
    try:
        first = await cluster.ingest()
        await first.wait_active()
        node = await cluster.node()
        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.subscribe("mongo:orders")
            await db.orders.insert_one({"_id": 1})
            assert [e["document"]["_id"] for e in await events(c, 1)] == [1]
            await first.stop(signal.SIGKILL)
            await db.orders.insert_one({"_id": 2})  # while no ingest reads the feed
            second = await cluster.ingest(RT_MONGO_URL=url + "&connectTimeoutMS=20000")
            await second.wait_active(timeout=40)
            await db.orders.insert_one({"_id": 3})
            assert [e["document"]["_id"] for e in await events(c, 2)] == [2, 3]
            await c.no_message(0.5)
    finally:
        await client.close()


def test_a_mongo_takeover_of_databases_named_alike_reads_an_earlier_versions_feed_headers():
    """Of two feeds of database `shop` (two deployments), each takes only the headers naming
    it. Earlier versions named a feed by digest of the whole URL, now by deployment and
    database: a holder upgraded while feeds ran takes the headers under either name of its own
    (the newer token of the two), never the other deployment's."""
    from types import SimpleNamespace

    from bson import encode

    from rtserver.ingest import Ingest
    from rtserver.sources.mongo import MongoSource

    urls = ["mongodb://m1/shop?replicaSet=rs0", "mongodb://m2/shop?replicaSet=rs0"]
    plan = [{"kind": "mongo", "database": "shop", "url": url} for url in urls]
    a, b = (MongoSource(url, database="shop", state_dir="/nonexistent", sink=None, workspaces=list) for url in urls)
    token = {n: encode({"_data": f"82{n:016X}"}) for n in range(4)}
    holder = SimpleNamespace(plan=plan)
    mongo_done = {("shop", a.legacy_feed_id): (token[2], {}), ("shop", b.feed_id): (token[3], {})}
    assert Ingest._mongo_position(holder, plan[0], a, mongo_done) == (token[2], {})
    assert Ingest._mongo_position(holder, plan[1], b, mongo_done) == (token[3], {})
    mongo_done[("shop", a.feed_id)] = (token[1], {})  # older than its legacy header's
    assert Ingest._mongo_position(holder, plan[0], a, mongo_done) == (token[2], {})
    del mongo_done[("shop", b.feed_id)]
    assert Ingest._mongo_position(holder, plan[1], b, mongo_done) is None


async def test_an_ingest_stopped_with_mongodb_unreachable_closes_in_time(cluster, mongo_server, tmp_path):
    """SIGTERM while the link to MongoDB is dead (bytes go nowhere, no reset), with several
    databases: the ingest stopped its feeds one after the other, each client's close waiting
    for MongoDB up to its own timeout, so its close overran server.shutdown_timeout and was
    cut short (`ingest did not close cleanly`): the lease was never left, and a standby waited
    for the session timeout to take over. The feeds stop together now: the close completes."""
    from tests.harness.tcpproxy import TcpProxy

    proxy = await TcpProxy(mongo_server.port).start()
    try:
        url = mongo_server.url.replace(f":{mongo_server.port}", f":{proxy.port}")
        config = tmp_path / "rt.toml"
        config.write_text("".join(f"[workspaces.m{i}]\nmongo_url = '{url}'\n" for i in range(16)))
        ingest = await cluster.ingest("--config", str(config))
        await ingest.wait_active()
        proxy.frozen = True
        await ingest.stop()
        assert ingest.proc.returncode == 0, ingest.logs()
        assert "did not close cleanly" not in ingest.logs(), ingest.logs()
        assert '"lease released"' in ingest.logs()
    finally:
        await proxy.close()


async def test_an_ingest_that_cannot_listen_leaves_the_active_one_alone(cluster):
    """A second ingest started with its health port taken stops at start (one line, exit 2).
    It joined the lease group before it tried the port, so the active ingest had the lease
    taken away (its feeds stopped) by the rebalance of a process about to die. It tries the
    port first now: the active ingest never lets go."""
    active = await cluster.ingest()
    await active.wait_active()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        late = await cluster.ingest("--health-port", str(port))
        assert await asyncio.wait_for(late.proc.wait(), 60) == 2, late.logs()
    assert f"cannot listen on 127.0.0.1:{port} (bus.ingest_port): " in late.logs(), late.logs()
    assert "(bus.ingest_port from option --health-port)" in late.logs(), late.logs()
    await asyncio.sleep(6)  # bus.lease_timeout: a join would have taken the lease by now
    assert '"lease released"' not in active.logs(), active.logs()
    assert (await active.status())["role"] == "active"


async def test_integers_beyond_64_bits_travel_through_the_bus(cluster):
    """The bus carries an event's record as msgpack, which has no integer beyond 64 bits: a
    jsonb value such as {"n": 123456789012345678901234} made the ingest fail on that row at
    every retry, so one row stalled its database's whole feed, and a custom event carrying one
    got 500. Such a record travels as JSON inside the record now (a msgpack extension); filters
    on the nodes see the same number."""
    await cluster.db.execute("ALTER TABLE orders ADD COLUMN doc jsonb")
    ingest = await cluster.ingest()
    await ingest.wait_active()
    node = await cluster.node()
    big = 123456789012345678901234
    async with ws_connect(node, "w1", token=node.token("w1")) as c:
        await c.subscribe("postgres:orders", {"predicates": {"doc.n": {"$gt": 2**64}}})
        await c.subscribe("events:big")
        for i, n in ((1, big), (2, 5), (3, big + 1)):  # the second filtered out
            await cluster.db.execute("INSERT INTO orders VALUES ($1, 'n', $2::jsonb)", i, json.dumps({"n": n}))
        status, body = await node.post("/workspaces/w1/realtime/events/big", json.dumps({"n": -big}).encode(),
                                       {"Authorization": f"Bearer {node.token('w1', publish=True)}"})
        assert status == 202, body
        got = await events(c, 3)
    assert [e["record"]["doc"]["n"] for e in got if e["channel"] == "postgres:orders"] == [big, big + 1]
    assert [e["payload"]["n"] for e in got if e["channel"] == "events:big"] == [-big]


async def test_a_row_with_an_integer_beyond_64_bits_keeps_its_infinities_for_filters(cluster):
    """A record holding an integer beyond 64 bits travelled as JSON on the bus, and JSON has no
    NaN or Infinity: a float8 `Infinity` of the same row became null for the nodes' filters,
    so `{"score": {"$gt": 100}}` (which on a single gateway matches Infinity, docs/protocol.md)
    dropped the row on a Kafka node. Only the big integer travels as JSON now."""
    await cluster.db.execute("ALTER TABLE orders ADD COLUMN score float8, ADD COLUMN doc jsonb")
    ingest = await cluster.ingest()
    await ingest.wait_active()
    node = await cluster.node()
    big = json.dumps({"n": 2**70})
    async with ws_connect(node, "w1", token=node.token("w1")) as c:
        await c.subscribe("postgres:orders", {"predicates": {"score": {"$gt": 100}}})
        rows = ((1, "Infinity", big), (2, "5", big), (3, "Infinity", '{"n": 1}'))  # the second filtered out
        for i, score, doc in rows:
            await cluster.db.execute("INSERT INTO orders VALUES ($1, 'n', $2::float8, $3::jsonb)", i, float(score), doc)
        got = await events(c, 2)
    assert [(e["record"]["id"], e["record"]["score"], e["record"]["doc"]["n"]) for e in got] == [
        (1, None, 2**70), (3, None, 1)]


async def test_a_mongo_takeover_after_a_quiet_spell_resumes_after_the_token_kafka_has(cluster, mongo_server):
    """The feed's last change reached Kafka more than the takeover scan's time window ago
    (_SCAN_SECONDS: its records are copied into a topic of their own with timestamps 11 minutes
    old). The new holder, on another machine (no token of its own), still resumes after the
    token Kafka has: the change written while no ingest ran is delivered, once. Before, the scan
    read only the last 10 minutes of the topic, found no header, and the new holder opened a
    fresh stream: that change was lost (and a holder with an old token of its own from an
    earlier stint resumed from it, publishing every change since then again)."""
    from pymongo import AsyncMongoClient

    from rtserver.ingest import _SCAN_SECONDS

    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    db = client["shop"]
    await db.orders.insert_one({"_id": 0})
    cluster.env["RT_MONGO_URL"] = mongo_server.url.replace("/?", "/shop?")
    old_topic = cluster.env["RT_BUS_TOPIC"]
    try:
        records = await _records_of_a_killed_mongo_holder(cluster, db)
        # The same records, as written when the feed last changed: before the scan's window.
        cluster.env["RT_BUS_TOPIC"] = f"{old_topic}.quiet"
        node = await cluster.node()
        then = int((time.time() - _SCAN_SECONDS - 60) * 1000)
        await _republish(cluster, records, lambda r: list(r.headers), timestamp_ms=then, read_by=node)
        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.subscribe("mongo:orders")
            await db.orders.insert_one({"_id": 2})  # while no ingest reads the feed
            second = await cluster.ingest()
            await second.wait_active(timeout=40)
            await db.orders.insert_one({"_id": 3})
            got = []
            while 3 not in got:
                got += [e["document"]["_id"] for e in await events(c, 1)]
            await c.no_message(0.5)
        assert got == [2, 3]
        assert "resumes after the token Kafka has" in second.logs(), second.logs()
    finally:
        await client.close()


async def test_a_publish_too_large_for_the_topic_is_413_not_503(cluster):
    """The events topic was created beforehand with a smaller max.message.bytes (the node
    reads it at start): a payload within limits.max_publish_bytes whose record the topic cannot
    take is answered 413, as a payload too large is, and nothing is sent. Before, it was 503
    (`event bus refused the event`: retry-safe, the bus counted as unavailable), which a
    retrying publisher repeated forever, each refusal starting a new Kafka producer."""
    from tests.harness.kafka import create_topics

    await create_topics(cluster.env["RT_BUS_KAFKA_BOOTSTRAP"], [cluster.env["RT_BUS_TOPIC"]], partitions=3)
    async with topic_record_limit(cluster) as limit:
        await limit(100_000)
    node = await cluster.node()

    def post(payload: dict):
        return node.post("/workspaces/w1/realtime/events/x", json.dumps(payload).encode(),
                         {"Authorization": f"Bearer {node.token('w1', publish=True)}"})

    async with ws_connect(node, "w1", token=node.token("w1")) as c:
        await c.subscribe("events:x")
        assert (await post({"n": 0}))[0] == 202
        for size in (60_000, 150_000):  # refused by Kafka; by the client library
            status, body = await post({"n": 1, "blob": "x" * size})
            assert status == 413 and b"max.message.bytes" in body, (status, body)
        assert (await post({"n": 2}))[0] == 202
        got = await events(c, 2)
        await c.no_message(0.3)
    assert [e["payload"]["n"] for e in got] == [0, 2]
    assert "starting a new producer" not in node.logs()


@pytest.mark.parametrize("codec", ["lz4", "zstd", "snappy"])
async def test_a_topic_created_beforehand_with_compression_is_read(cluster, codec):
    """The events topic was created beforehand with a compression.type (a platform's usual
    setting): the broker stores every batch compressed so, and the nodes read them. Before,
    aiokafka had no library for the codec: the nodes' consumers failed on every fetch
    (UnsupportedCodecError), never became ready and delivered nothing, while publishes were
    answered 202."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"])
    await admin.start()
    try:
        await admin.create_topics([NewTopic(cluster.env["RT_BUS_TOPIC"], num_partitions=3, replication_factor=1,
                                            topic_configs={"compression.type": codec})])
    finally:
        await admin.close()
    first = await cluster.node()
    async with ws_connect(first, "w1", token=first.token("w1")) as c:
        await c.subscribe("events:x")
        status, body = await first.post("/workspaces/w1/realtime/events/x", json.dumps({"n": 1}).encode(),
                                        {"Authorization": f"Bearer {first.token('w1', publish=True)}"})
        assert status == 202, (status, body)
        assert [e["payload"]["n"] for e in await events(c, 1)] == [1]
    late = await cluster.node()  # reads the record back at start
    async with ws_connect(late, "w1", token=late.token("w1")) as c:
        await c.send({"type": "subscribe", "channel": "events:x", "since": 0})
        await c.recv_type("subscribed", timeout=20)
        assert [e["payload"]["n"] for e in await events(c, 1)] == [1]


@pytest.mark.parametrize("policy", ["compact", "compact,delete"])
async def test_a_compacted_events_topic_is_refused_at_start(cluster, policy):
    """An events topic created beforehand with cleanup.policy=compact (a platform's template
    for keyed topics) keeps only each key's last record: a node starting, or a resume from
    before its memory, read back what was left without a history_gap for the rest. The node
    refuses it at start, saying what to set."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"])
    await admin.start()
    try:
        await admin.create_topics([NewTopic(cluster.env["RT_BUS_TOPIC"], num_partitions=3, replication_factor=1,
                                            topic_configs={"cleanup.policy": policy})])
    finally:
        await admin.close()
    with pytest.raises(RuntimeError, match="exited with 2") as refused:
        await cluster.node()
    assert f"cleanup.policy={policy}" in str(refused.value) and "cleanup.policy=delete" in str(refused.value)


async def test_a_topic_kafka_refuses_to_create_is_said_at_start_not_auto_created(cluster):
    """Kafka answers a CreateTopics request it refuses (an invalid setting, a topic policy, no
    CREATE right) with an error code in its response, not an error: the node logged "created
    topic" all the same, and its next look at the topic made a broker with auto-creation on
    (Apache Kafka's default) create it with its own defaults: one partition instead of
    bus.partitions, every process after it on that one partition, nothing said. Here 100,000
    partitions, more than a KRaft controller creates in one request, is POLICY_VIOLATION: the
    node refuses to start, saying so, and the topic is not created. (A max.message.bytes past
    Kafka's 32-bit range, INVALID_CONFIG, is refused by the configuration check now.)"""
    from aiokafka.admin import AIOKafkaAdminClient

    topic = cluster.env["RT_BUS_TOPIC"]
    with pytest.raises(RuntimeError, match="exited with 2") as refused:
        await cluster.node(RT_BUS_PARTITIONS="100000")
    assert f"topic {topic}" in str(refused.value) and "POLICY_VIOLATION" in str(refused.value), refused.value
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"])
    await admin.start()
    try:
        assert topic not in await admin.list_topics()
    finally:
        await admin.close()


async def _lease_group_members(cluster) -> tuple[str, int]:
    """The lease group's state and member count, as its coordinator says."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"])
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([f"{cluster.env['RT_BUS_TOPIC']}.ingest"])
        _error, _group, state, *_rest, members = response.groups[0][:6]
        return state, len(members)
    finally:
        await admin.close()


async def test_a_standby_joining_leaves_the_lease_with_the_active_ingest(cluster):
    """A standby started (or restarted) while an ingest is active stays the standby: the lease
    moves only when its holder dies or leaves. Before, every rebalance gave the lease to the
    member whose id sorts first (its client id names the host), so starting a standby on a host
    named before the active one's moved every feed to it (a takeover at each of its restarts,
    and a standby unable to reach the databases held the lease with no feed streaming)."""
    active = await cluster.ingest(RT_NODE="ingest-b")
    await active.wait_active()
    standby = await cluster.ingest(RT_NODE="ingest-a")  # sorts first
    deadline = time.monotonic() + 60
    while (members := await _lease_group_members(cluster)) != ("Stable", 2):
        assert time.monotonic() < deadline, f"lease group never stable with both ingests: {members}"
        await asyncio.sleep(0.2)
    while True:
        roles = [(await p.status())["role"] for p in (active, standby)]
        if "active" in roles:
            break
        assert time.monotonic() < deadline, f"no ingest became active: {roles}"
        await asyncio.sleep(0.1)
    assert roles == ["active", "standby"], roles
    await active.wait_active()
    await cluster.db.execute("INSERT INTO orders VALUES (1, 'after the standby joined')")
    node = await cluster.node()
    async with ws_connect(node, "w1", token=node.token("w1")) as c:
        await c.send({"type": "subscribe", "channel": "postgres:orders", "since": 0})
        await c.recv_type("subscribed", timeout=20)
        assert [e["record"]["id"] for e in await events(c, 1)] == [1]


async def test_records_held_back_by_an_open_transaction_leave_the_nodes_ready(cluster):
    """A transaction left open on the events topic (an ingest killed mid-transaction: Kafka
    holds back the later records of its partitions from every node until the next holder or
    its timeout aborts it) holds every node back alike: the nodes stay ready, their lag still
    counts the records held back, and the events come once the transaction ends. Before,
    readiness counted those records as this node's lag: custom events published meanwhile
    beyond RT_BUS_MAX_LAG turned every node's /readyz and WebSocket upgrades to 503 at once."""
    from aiokafka import AIOKafkaProducer

    from rtcore.event import Event
    from rtserver.bus_kafka import encode_event, partition_for

    node = await cluster.node(RT_BUS_MAX_LAG="5")
    body = json.dumps({"type": "event", "channel": "postgres:orders", "operation": "INSERT", "table": "orders",
                       "schema": "public", "record": {"id": 1}}).encode()
    producer = AIOKafkaProducer(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"],
                                transactional_id=f"{cluster.env['RT_BUS_TOPIC']}.ingest")
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send_and_wait(cluster.env["RT_BUS_TOPIC"],
                                     encode_event(Event("w1", "postgres", "orders", "INSERT", {"id": 1}, body)),
                                     key=b"w1", partition=partition_for("w1", 3))
        async with ws_connect(node, "w1", token=node.token("w1")) as c:
            await c.subscribe("postgres:orders")
            await c.subscribe("events:x")
            for n in range(8):
                status, answer = await node.post("/workspaces/w1/realtime/events/x", json.dumps({"n": n}).encode(),
                                                 {"Authorization": f"Bearer {node.token('w1', publish=True)}"})
                assert status == 202, (status, answer)
            deadline = time.monotonic() + 30
            while True:
                status, answer = await node.get("/readyz")
                if json.loads(answer)["bus"]["lag"] >= 9:  # the node has seen them held back
                    break
                assert time.monotonic() < deadline, f"the node never saw the held-back records: {answer!r}"
                await asyncio.sleep(0.1)
            assert status == 200, answer
            await c.no_message(0.3)
            await producer.commit_transaction()
            got = await events(c, 9)
    finally:
        await producer.stop()
    assert [e.get("record", {}).get("id", "row") if "record" in e else e["payload"]["n"] for e in got] == \
        [1, *range(8)]
    assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)


async def test_a_read_back_from_before_the_retained_records_sends_history_gap_first(cluster):
    """A resume whose `since` is older than both the node's memory and what the topic still
    holds: history_gap (oldest = the first record kept) comes first, then the records read
    back from Kafka, then the memory's, as PROTOCOL.md §7 says. Before, the records read back
    came first and the history_gap after them, in the middle of the replay: a client that
    reloads on history_gap dropped or re-fetched what it had just been sent."""
    from aiokafka import AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

    from rtserver.bus_kafka import partition_for

    await cluster.node()  # creates the topic
    topic, bootstrap = cluster.env["RT_BUS_TOPIC"], cluster.env["RT_BUS_KAFKA_BOOTSTRAP"]

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await producer.start()
    await admin.start()
    try:
        offsets = [(await producer.send_and_wait(topic, _bus_event(n), key=b"w1")).offset for n in range(10)]
        await admin.delete_records({TopicPartition(topic, partition_for("w1", 3)): RecordsToDelete(offsets[5])})
    finally:
        await producer.stop()
        await admin.close()
    late = await cluster.node(RT_HISTORY_EVENTS="2")  # its memory: n = 8, 9
    async with ws_connect(late, "w1", token=late.token("w1")) as c:
        await c.send({"type": "subscribe", "channel": "events:x", "since": offsets[1] + 1})
        await c.recv_type("subscribed", timeout=20)
        got = [await c.recv(timeout=20) for _ in range(6)]
        await c.no_message(0.3)
    assert [(m["code"], m["oldest"]) if m["type"] == "error" else m["payload"]["n"] for m in got] == \
        [(4011, offsets[5] + 1), 5, 6, 7, 8, 9], got


async def test_a_read_back_ahead_of_the_live_consumer_sends_nothing_twice(cluster, kafka_broker):
    """A resume read back from Kafka while the node's own consumer is behind the topic (here
    throttled by a Kafka quota on its client id, as an overloaded broker or node would hold it):
    each event reaches the client once, in order. Before, the read-back emitted every record of
    its last fetch, also those the node had not delivered yet, then put the subscription live:
    the node's consumer delivered those records to it again, seq going back.

    The node reaches Kafka through a TcpProxy, cut once the quota is lifted: the throttle the
    quota left held the node's fetch until it timed out (40 s); cut, it reconnects at once."""
    from aiokafka import AIOKafkaProducer

    from tests.harness.tcpproxy import TcpProxy


    topic, bootstrap = cluster.env["RT_BUS_TOPIC"], cluster.env["RT_BUS_KAFKA_BOOTSTRAP"]
    proxy = await TcpProxy(kafka_broker.proxied_port).start(port=kafka_broker.proxy_port)
    node = await cluster.node(RT_NODE="readback-ahead", RT_HISTORY_EVENTS="2", RT_BUS_MAX_LAG="1000000",
                              RT_BUS_KAFKA_BOOTSTRAP=kafka_broker.proxied_bootstrap)

    throttled = []

    async def quota(rate: str) -> None:
        if not rate and not throttled:
            return
        throttled[:] = [rate] if rate else []
        change = ["--add-config", f"consumer_byte_rate={rate}"] if rate else ["--delete-config", "consumer_byte_rate"]
        await asyncio.to_thread(kafka_broker._java, "kafka.admin.ConfigCommand", "--bootstrap-server", bootstrap,
                                "--alter", *change, "--entity-type", "clients", "--entity-name",
                                "rtserver-node-readback-ahead")

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        async with ws_connect(node, "w1", token=node.token("w1")) as live:
            await live.subscribe("events:x")
            seqs = [(await producer.send_and_wait(topic, _bus_event(n), key=b"w1")).offset + 1 for n in range(5)]
            await events(live, 5)
            delivered = json.loads((await node.get("/readyz"))[1])["bus"]["delivered"]
            await quota("1")
            try:
                for n in (5, 6, 7):  # held back from the node's consumer
                    await producer.send_and_wait(topic, _bus_event(n), key=b"w1")
                async with ws_connect(node, "w1", token=node.token("w1")) as c:
                    await c.send({"type": "subscribe", "channel": "events:x", "since": seqs[0]})
                    await c.recv_type("subscribed", timeout=20)
                    got = await events(c, 4)  # n = 1..4: up to the node's consumer position
                    # the case in hand: the node's consumer has not delivered 5..7 yet
                    assert json.loads((await node.get("/readyz"))[1])["bus"]["delivered"] == delivered
                    await quota("")
                    proxy.cut()
                    while json.loads((await node.get("/readyz"))[1])["bus"]["delivered"] < delivered + 3:
                        await asyncio.sleep(0.2)  # until the node's consumer has delivered 5..7
                    while got[-1]["payload"]["n"] != 7:
                        got += await events(c, 1, timeout=30)
                    await c.no_message(0.5)
            finally:
                await quota("")
    finally:
        await producer.stop()
        await proxy.close()
    assert [e["payload"]["n"] for e in got] == list(range(1, 8)), [e["payload"]["n"] for e in got]


async def test_a_lease_topic_created_with_several_partitions_still_has_one_holder(cluster):
    """The lease topic was created beforehand with three partitions (a platform creating every
    topic with its default count): still exactly one ingest reads the feeds. Before, each
    member assigned any partition of it took the lease: two active ingests read every feed,
    each fencing the other's Kafka transactions in turn."""
    from tests.harness.kafka import create_topics

    await create_topics(cluster.env["RT_BUS_KAFKA_BOOTSTRAP"], [f"{cluster.env['RT_BUS_TOPIC']}.lease"], partitions=3)
    first = await cluster.ingest(RT_NODE="ingest-b")
    await first.wait_active()
    second = await cluster.ingest(RT_NODE="ingest-a")
    deadline = time.monotonic() + 60
    while (members := await _lease_group_members(cluster)) != ("Stable", 2):
        assert time.monotonic() < deadline, f"lease group never stable with both ingests: {members}"
        await asyncio.sleep(0.2)
    while True:
        roles = sorted([(await p.status())["role"] for p in (first, second)])
        if "active" in roles:
            break
        assert time.monotonic() < deadline, f"no ingest became active: {roles}"
        await asyncio.sleep(0.1)
    assert roles == ["active", "standby"], roles


async def test_a_loss_reported_while_a_resume_waits_for_the_node_is_told_once(cluster, kafka_broker):
    """A client that saw events on node A subscribes with `since` on node B, which has not
    read that far yet (its link to Kafka stalled: B reaches the broker through a TcpProxy,
    paused); a source's gap record follows in the topic. B tells the client of the loss once,
    then sends what follows. Before, the gap record reached the waiting subscription at once
    (history_gap) and the replay that followed the wait announced the same loss again: the
    client reloaded twice. (A Kafka quota held B back until 1 Dec 2026: the throttle it left
    behind, and a JVM per quota change, took 40-50 s of a loaded CI run.)"""
    import msgspec
    from aiokafka import AIOKafkaProducer

    from rtserver.bus_kafka import GAP, BusRecord
    from tests.harness.tcpproxy import TcpProxy

    topic, bootstrap = cluster.env["RT_BUS_TOPIC"], cluster.env["RT_BUS_KAFKA_BOOTSTRAP"]
    proxy = await TcpProxy(kafka_broker.proxied_port).start(port=kafka_broker.proxy_port)
    a = await cluster.node()
    b = await cluster.node(RT_NODE="behind", RT_BUS_MAX_LAG="1000000",
                           RT_BUS_KAFKA_BOOTSTRAP=kafka_broker.proxied_bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        async with ws_connect(a, "w1", token=a.token("w1")) as ca:
            await ca.subscribe("events:x")
            await producer.send_and_wait(topic, _bus_event(1), key=b"w1")
            await events(ca, 1)
            await wait_delivered(b, 1)
            proxy.paused = True
            await producer.send_and_wait(topic, _bus_event(2), key=b"w1")
            (seen,) = await events(ca, 1)
            gap = BusRecord("events", "", GAP, None, None, b"the publisher's buffer was lost")
            await producer.send_and_wait(topic, msgspec.msgpack.encode(gap), key=b"w1")
            await producer.send_and_wait(topic, _bus_event(3), key=b"w1")
            async with ws_connect(b, "w1", token=b.token("w1")) as cb:
                await cb.send({"type": "subscribe", "channel": "events:x", "since": seen["seq"]})
                await cb.recv_type("subscribed", timeout=20)
                assert json.loads((await b.get("/readyz"))[1])["bus"]["delivered"] == 1  # B is behind
                proxy.paused = False
                await wait_delivered(b, 3)
                got = [await cb.recv(timeout=20)]
                while got[-1]["type"] != "event":
                    got.append(await cb.recv(timeout=20))
                await cb.no_message(0.5)
    finally:
        await producer.stop()
        await proxy.close()
    assert [m.get("code") if m["type"] == "error" else m["payload"]["n"] for m in got] == [4011, 3], got


async def test_a_position_header_without_a_value_does_not_stop_a_takeover(cluster):
    """Kafka allows a header with no value (null): another producer or a tool may write one
    named as the ingest's position headers into the events topic. The takeover's scan read
    each value as bytes: AttributeError, not a malformed header, so the scan failed and was
    retried for as long as the record was in the scanned tail, and the new holder never
    streamed. Such a header is not ours to trust: skipped with a log, the takeover proceeds."""
    from aiokafka import AIOKafkaProducer

    from rtserver.ingest import MONGO_FEED_HEADER, MONGO_HEADER, POSITION_HEADER

    first = await cluster.ingest()
    await first.wait_active()
    node = await cluster.node()
    async with ws_connect(node, "w1", token=node.token("w1")) as c:
        await c.subscribe("postgres:orders")
        await cluster.db.execute("INSERT INTO orders VALUES (1, 'before')")
        got = await events(c, 1)
        await first.stop()
        producer = AIOKafkaProducer(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"])
        await producer.start()
        try:
            for headers in ([(POSITION_HEADER, None)], [(MONGO_HEADER, None)],
                            [(MONGO_HEADER, b"shop|AAAA|1"), (MONGO_FEED_HEADER, None)]):
                await producer.send_and_wait(cluster.env["RT_BUS_TOPIC"], b"\x00not ours", key=b"w1",
                                             headers=headers)
        finally:
            await producer.stop()
        second = await cluster.ingest()
        await second.wait_active()
        await cluster.db.execute("INSERT INTO orders VALUES (2, 'after')")
        got += await events(c, 1)
        await c.no_message(0.5)
    assert [e["record"]["id"] for e in got] == [1, 2]
    malformed = [line for line in second.logs().splitlines() if "malformed" in line]
    assert len(malformed) == 3, second.logs()


async def test_a_quiet_workspace_keeps_its_position_current_for_a_move_to_another_node(cluster):
    """docs/protocol.md (ping): a client that pings keeps its last seen position current even
    when its subscriptions get no events. On a node, seq is an offset of the workspace's
    partition, shared with other workspaces: the position of a workspace with no event of its
    own must follow what the node has read of that partition, or a client moving to another node
    asks `since` where the first node started, and gets a read-back of every other workspace's
    records since then, or a history_gap past RT_BUS_MAX_REPLAY, though it missed nothing."""
    from contextlib import AsyncExitStack

    from rtserver.bus_kafka import partition_for

    partitions = int(cluster.env["RT_BUS_PARTITIONS"])
    assert partition_for("w3", partitions) == partition_for("w1", partitions)  # neighbours
    a = await cluster.node()
    async with AsyncExitStack() as stack:
        quiet = await subscribed_client(stack, a, "events:x")
        busy = await stack.enter_async_context(ws_connect(a, "w3", token=a.token("w3")))
        await busy.subscribe("events:x")
        for n in range(30):
            last = (await a.publish("w3", "x", {"n": n}))["seq"]
        await events(busy, 30)  # node A has read them
        await quiet.send({"type": "ping"})
        pong = await quiet.recv_type("pong")
    assert pong["seq"] >= last, (pong, last)
    # The client moves to node B, which remembers little and reads back little.
    b = await cluster.node(RT_HISTORY_EVENTS="2", RT_BUS_MAX_REPLAY="10")
    async with ws_connect(b, "w1", token=b.token("w1")) as c:
        await c.subscribe("events:x", since=pong["seq"])
        await b.publish("w1", "x", {"n": 99})
        (live,) = await events(c, 1)  # no history_gap first: nothing was missed
        await c.no_message(0.3)
    assert live["payload"] == {"n": 99}


async def test_a_takeover_by_an_ingest_feeding_other_workspaces_skips_only_what_kafka_has(cluster):
    """The standby's configuration feeds the database to other workspaces than the dead
    holder's did (RT_BUS_WORKSPACES changed, one machine restarted with it first): the events
    of a transaction are numbered over another list of workspaces. The topic is left as a
    killed ingest of this version leaves it, feeding w1 and w2, mid-transaction: rows 2 and 3
    for w1, row 2 for w2 (its events 1 to 3 of the transaction). The new holder feeds w1 alone:
    it must publish row 4 and not rows 2 and 3. Before, it compared its own numbering (row 4 is
    its 3rd event) with the dead holder's (w1's partition held its 3rd): row 4 was lost."""
    from contextlib import AsyncExitStack

    from aiokafka import AIOKafkaProducer

    from rtcore.event import Event
    from rtcore.pgoutput_ref import parse_lsn
    from rtserver.bus_kafka import encode_event, partition_for
    from rtserver.ingest import POSITION_HEADER

    assert partition_for("w1", 3) != partition_for("w2", 3)
    first = await cluster.ingest(RT_BUS_WORKSPACES="w1,w2")
    await first.wait_active()
    node = await cluster.node()
    async with AsyncExitStack() as stack:
        c1 = await stack.enter_async_context(ws_connect(node, "w1", token=node.token("w1")))
        await c1.subscribe("postgres:orders")
        await cluster.db.execute("INSERT INTO orders VALUES (1, 'before')")
        (one,) = await events(c1, 1)
        (feed,) = (await first.status())["feeds"].values()
        slot, lsn = feed["slot"], parse_lsn(feed["published_lsn"])
        await first.stop()  # the slot is acknowledged up to row 1's transaction
        async with cluster.db.transaction():
            for i in (2, 3, 4):
                await cluster.db.execute("INSERT INTO orders VALUES ($1, 'in flight when the ingest died')", i)
        producer = AIOKafkaProducer(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"])
        await producer.start()
        try:
            # feed|published LSN|n-th event of the transaction|its commit LSN (-1: not said)|its change
            for workspace, row, n in (("w1", 2, 1), ("w2", 2, 2), ("w1", 3, 3)):
                body = json.dumps({**{k: v for k, v in one.items() if k != "seq"},
                                   "record": {"id": row, "note": "written by the dead holder"}})
                value = encode_event(Event(workspace, "postgres", "orders", "INSERT", {"id": row}, body.encode()))
                await producer.send_and_wait(cluster.env["RT_BUS_TOPIC"], value, key=workspace.encode(),
                                             headers=[(POSITION_HEADER, f"{slot}|{lsn}|{n}|-1|{row - 1}".encode())])
        finally:
            await producer.stop()
        second = await cluster.ingest(RT_BUS_WORKSPACES="w1")
        await second.wait_active()
        got = await events(c1, 3)
        await cluster.db.execute("INSERT INTO orders VALUES (5, 'after')")
        got += await events(c1, 1)
        await c1.no_message(0.5)
    assert [(e["record"]["id"], e["record"]["note"]) for e in got] == [
        (2, "written by the dead holder"), (3, "written by the dead holder"),
        (4, "in flight when the ingest died"), (5, "after")]
    (feed,) = (await second.status())["feeds"].values()
    assert feed["takeover_skipped"] == 2, feed


async def test_a_mongo_takeover_by_an_ingest_feeding_other_workspaces_repeats_nothing(cluster, mongo_server):
    """The dead holder fed database shop to w1 and w2 and was killed once both events of a
    change were in Kafka, before it saved the token after it. The standby feeds w3 too, listed
    first (RT_BUS_WORKSPACES changed): its events of that change are numbered 2 (w1) and 3
    (w2) where the dead holder's were 1 and 2. It must publish the change to w3 only. Before,
    it compared the numbers partition by partition: w1 and w2 got the change twice, under two
    seqs, and w3 (on w1's partition) not at all."""
    from contextlib import AsyncExitStack

    from pymongo import AsyncMongoClient

    from rtserver.bus_kafka import partition_for

    assert partition_for("w3", 3) == partition_for("w1", 3) != partition_for("w2", 3)
    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    db = client["shop"]
    await db.orders.insert_one({"_id": 0})
    cluster.env.update({"RT_MONGO_URL": mongo_server.url.replace("/?", "/shop?"), "RT_BUS_WORKSPACES": "w1,w2"})
    old_topic = cluster.env["RT_BUS_TOPIC"]
    try:
        records = await _records_of_a_killed_mongo_holder(cluster, db, headed=2)  # both events of change 1
        # The topic as the killed holder left it, before its token after change 1 was saved
        # (in a topic of its own: the killed ingest may have saved it in its state directory,
        # which the standby, on another machine, does not have).
        cluster.env["RT_BUS_TOPIC"] = f"{old_topic}.other"
        node = await cluster.node(RT_BUS_WORKSPACES="w1,w2,w3")  # a node listing w1,w2 only would refuse w3
        async with AsyncExitStack() as stack:
            subscribers = {}
            for wid in ("w1", "w2", "w3"):
                subscribers[wid] = await stack.enter_async_context(ws_connect(node, wid, token=node.token(wid)))
                await subscribers[wid].subscribe("mongo:orders")
            await _republish(cluster, records, lambda r: list(r.headers))
            second = await cluster.ingest(RT_BUS_WORKSPACES="w3,w1,w2")
            await second.wait_active(timeout=40)
            await db.orders.insert_one({"_id": 2})
            got = {}
            for wid, c in subscribers.items():
                got[wid] = [e["document"]["_id"] for e in await events(c, 2)]
                await c.no_message(0.5)
        assert got == {"w1": [1, 2], "w2": [1, 2], "w3": [1, 2]}, got
    finally:
        await client.close()


async def _records_of(cluster, count: int) -> list:
    """The first `count` records of the cluster's bus topic (as set now), read committed."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=cluster.env["RT_BUS_KAFKA_BOOTSTRAP"],
                                isolation_level="read_committed", enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    records: list = []
    try:
        consumer.assign([TopicPartition(cluster.env["RT_BUS_TOPIC"], p) for p in range(3)])
        while len(records) < count:
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                records += batch
    finally:
        await consumer.stop()
    return records


def _earlier_rt_pos(r: Any) -> list:
    """A record's headers as an ingest of 29 Nov 2026 (and earlier) wrote them: rt-pos named the
    bare slot and said only `slot|published LSN|n-th event after it`."""
    from rtserver.ingest import POSITION_HEADER

    out = []
    for name, value in r.headers:
        if name == POSITION_HEADER:
            feed, lsn, n, *_ = value.decode().split("|")
            value = f"{feed.rsplit('-', 1)[0]}|{lsn}|{n}".encode()
        out.append((name, value))
    return out


async def test_a_clean_handover_from_an_earlier_version_loses_nothing(cluster):
    """A rolling upgrade: the active ingest of an earlier version (rt-pos `slot|LSN|n`, no
    transaction LSN) stops cleanly, acknowledging its last transaction to the slot, and a
    standby of this version takes over. The rows written afterwards all arrive. Before, the new
    holder took its first transaction, which follows the same published LSN, for the one the
    earlier version's headers named and dropped its first events as already published (lost)."""
    first = await cluster.ingest()
    await first.wait_active()
    await cluster.db.execute("INSERT INTO orders VALUES (1, 'before')")
    records = await _records_of(cluster, 1)
    await first.stop()  # the slot is acknowledged up to row 1's transaction
    # The same records in a topic of their own, as the earlier version wrote them.
    cluster.env["RT_BUS_TOPIC"] = f"{cluster.env['RT_BUS_TOPIC']}.earlier"
    node = await cluster.node()
    await _republish(cluster, records, _earlier_rt_pos, read_by=node)
    async with ws_connect(node, "w1", token=node.token("w1")) as c:
        await c.subscribe("postgres:orders")
        second = await cluster.ingest()
        await second.wait_active()
        for i in (2, 3):
            await cluster.db.execute("INSERT INTO orders VALUES ($1, 'after')", i)
        got = await events(c, 2)
        await c.no_message(0.5)
    assert [e["record"]["id"] for e in got] == [2, 3]
    (feed,) = (await second.status())["feeds"].values()
    assert feed["takeover_skipped"] == 0, feed


async def test_a_workspace_the_ingest_does_not_feed_is_refused_its_database_channels(cluster):
    """The ingest feeds the default database to the workspaces bus.workspaces lists. A node
    given that list answers a subscribe to a database channel of any other workspace 4010,
    saying so (it answered `subscribed`, and no event ever came); its own [workspaces.W]
    sections and custom events are unaffected. A node given no list cannot tell, and takes
    the subscribe as before."""
    node = await cluster.node()  # RT_BUS_WORKSPACES=w1, as the ingest's
    async with ws_connect(node, "w2", token=node.token("w2")) as c:
        for channel in ("postgres:orders", "postgres:*"):
            await c.send({"type": "subscribe", "channel": channel})
            reply = await c.recv(timeout=15)
            assert reply["type"] == "error" and reply["code"] == 4010, reply
            assert "postgres changes of workspace w2 are not fed to the event stream" in reply["message"], reply
            assert "RT_BUS_WORKSPACES" in reply["message"], reply
        assert (await c.subscribe("events:x"))["type"] == "subscribed"
    async with ws_connect(node, "w1", token=node.token("w1")) as c:
        assert (await c.subscribe("postgres:orders"))["type"] == "subscribed"
    unlisted = await cluster.node(RT_BUS_WORKSPACES="")
    async with ws_connect(unlisted, "w2", token=unlisted.token("w2")) as c:
        assert (await c.subscribe("postgres:orders"))["type"] == "subscribed"


async def test_a_batch_cut_short_by_a_node_stopping_says_so(cluster):
    """SIGTERM on a Kafka node while a batch is sent: the events its producer took before
    closing are published (every node's subscribers get them), the rest are answered 503 'not
    published: the gateway is shutting down', not 'event bus unavailable (ProducerClosed)',
    which sent the publisher looking at Kafka."""
    from contextlib import AsyncExitStack

    a, b = await cluster.node(), await cluster.node()
    count = 6000
    body = json.dumps({"events": [{"topic": "x", "payload": {"n": k}} for k in range(count)]}).encode()
    async with AsyncExitStack() as stack:
        cb = await subscribed_client(stack, b, "events:x")
        task = asyncio.create_task(a.post("/workspaces/w1/realtime/events", body,
                                          {"Authorization": f"Bearer {a.token('w1', publish=True)}"}))
        got = [await cb.recv_event(timeout=20)]
        a.proc.send_signal(signal.SIGTERM)
        status, out = await asyncio.wait_for(task, 30)
        answer = json.loads(out)
        published = [e for e in answer.get("events", []) if "seq" in e]
        got += [await cb.recv_event(timeout=10) for _ in range(len(published) - 1)]
        await cb.no_message(1)
    assert status == 503, answer
    refused = answer["events"][len(published):]
    assert refused and len(published) + len(refused) == count, answer["error"]
    assert refused[0]["error"].startswith("not published: the gateway is shutting down"), refused[0]
    assert "ProducerClosed" not in out.decode() and "event bus unavailable" not in out.decode(), refused[0]
    assert [e["seq"] for e in published] == [e["seq"] for e in got]
    assert await asyncio.wait_for(a.proc.wait(), 20) == 0, a.logs()


async def test_an_ingest_whose_kafka_cannot_make_its_transaction_log_says_so(tmp_path, monkeypatch, caplog):
    """A one-broker Kafka left with the defaults transaction.state.log.replication.factor 3 and
    min.isr 2 never has a transaction coordinator: the ingest took the lease and waited for its
    transactional producer for ever, logging nothing, /readyz and /metrics showing no error, no
    standby able to take over (black-box audit). The wait is bounded: each attempt fails with
    an error naming the settings, which /readyz shows as the bus's error."""
    import logging

    import rtserver.ingest as ingest_module
    from rtserver.config import load
    from tests.harness.kafka import KafkaBroker, ensure_jars

    monkeypatch.setattr(ingest_module, "WRITER_START_TIMEOUT", 2.0, raising=False)
    broker = KafkaBroker(ensure_jars(), overrides={"transaction.state.log.replication.factor": "3",
                                                   "transaction.state.log.min.isr": "2"})
    await asyncio.to_thread(broker.start)
    ingest = None
    try:
        cfg = load(environ={"RT_BUS": "kafka", "RT_BUS_KAFKA_BOOTSTRAP": broker.bootstrap, "RT_STATE_DIR": str(tmp_path),
                            "RT_POSTGRES_URL": "postgresql://rt@127.0.0.1:9/app", "RT_BUS_WORKSPACES": "w1"})
        ingest = ingest_module.Ingest(cfg)
        with caplog.at_level(logging.ERROR, logger="rtserver.ingest"):
            await ingest.start()
            for _ in range(300):
                ready, status = ingest.status()
                if status["bus"]["error"]:
                    break
                await asyncio.sleep(0.1)
        assert (ready, status["role"], status["feeds"]) == (False, "active", {}), status
        assert status["bus"]["error"].startswith("no transaction coordinator answered within 2 s"), status
        assert "transaction.state.log.replication.factor" in status["bus"]["error"]
        assert any("starting the transactional producer failed" in r.getMessage() for r in caplog.records)
    finally:
        if ingest is not None:
            await ingest.close()
        await asyncio.to_thread(broker.destroy)


async def test_a_standby_that_cannot_reach_a_feed_says_so_before_a_takeover(cluster):
    """A standby whose database URL is wrong (or that may not reach the database) answered
    /readyz 200, `standby, ready`; when the active ingest stopped it took the lease and held it
    reading nothing, while the healthy ingest, restarted, stood by (black-box audit). A standby
    now reaches each feed's database as the feed would (a replication connection) every 30 s:
    one it cannot reach is logged and makes its /readyz 503 naming the feed and why."""
    active = await cluster.ingest()
    await active.wait_active()
    bad = await cluster.ingest(RT_POSTGRES_URL="postgresql://rt:pw@127.0.0.1:9/app")
    good = await cluster.ingest()
    status: dict = {}
    for _ in range(200):
        with contextlib.suppress(OSError):  # listening once it has joined the lease group
            status = await bad.status()
        if status.get("feeds"):
            break
        await asyncio.sleep(0.1)
    assert (status["role"], status["ready"]) == ("standby", False), status
    assert list(status["feeds"]) == ["postgres:postgresql://***@127.0.0.1:9/app"], status
    feed = status["feeds"]["postgres:postgresql://***@127.0.0.1:9/app"]
    assert feed["ready"] is False and "port 9 failed" in feed["probe_error"] and "pw" not in json.dumps(status), feed
    for _ in range(100):  # the log's own thread writes it (within 5 ms of the line, under load later)
        if "a feed it would take over cannot be reached" in bad.logs():
            break
        await asyncio.sleep(0.05)
    assert "a feed it would take over cannot be reached" in bad.logs(), bad.logs()
    for _ in range(100):
        with contextlib.suppress(OSError):
            if (await good.status()).get("role") == "standby":
                break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)  # its first probe done
    assert await good.status() == {**await good.status(), "role": "standby", "ready": True, "feeds": {}}
    assert (await active.status())["ready"] is True
