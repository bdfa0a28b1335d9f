"""The real gateway (`rtserver serve` subprocess) writing its audit trail to a real Kafka broker."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import time
import uuid
from collections import Counter

import pytest

from rtserver.audit import EVENTS
from tests.harness.kafka import TopicReader, create_topics
from tests.harness.wsclient import ws_connect

pytestmark = pytest.mark.kafka

DOCUMENTED = {"id", "event", "workspaceId", "subject", "sessionId", "code", "reason", "remoteAddr", "node", "timestamp"}


async def audited_gateway(gateway_factory, kafka_broker, **env):
    prefix = f"e{uuid.uuid4().hex[:10]}.console.realtime."
    topics = [prefix + e for e in EVENTS]
    await create_topics(kafka_broker.bootstrap, topics)
    gw = await gateway_factory(env={
        "RT_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
        "RT_AUDIT_TOPIC_PREFIX": prefix,
        "RT_NODE": "gw-node-1",
        **env,
    })
    return gw, prefix, topics


async def denied(gw, token: str, workspace: str = "w1") -> int:
    """Connect, send `token`, return the close code the gateway answers with."""
    async with ws_connect(gw, workspace) as c:
        await c.send({"type": "auth", "token": token})
        code, _ = await c.expect_close()
    return code


def by_event(reader: TopicReader, prefix: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {e: [] for e in EVENTS}
    for m in reader.messages:
        v = json.loads(m.value)
        assert m.topic == prefix + v["event"]
        assert m.key == v["workspaceId"].encode()
        assert DOCUMENTED <= set(v), DOCUMENTED - set(v)
        out[v["event"]].append(v)
    return out


async def test_gateway_audits_auth_and_sessions(gateway_factory, kafka_broker):
    gw, prefix, topics = await audited_gateway(gateway_factory, kafka_broker)
    async with TopicReader(kafka_broker.bootstrap, topics) as reader:
        async with ws_connect(gw, "w1", token=gw.token("w1", sub="alice")) as c:
            await c.send({"type": "auth", "token": gw.token("w1", sub="alice", ttl=7200)})
            ok = await c.recv_type("auth_ok")
            session = ok["sessionId"]
        # A client close leaves the session resumable (session-suspended); resuming it is audited too.
        async with ws_connect(gw, "w1") as c:
            await c.send({"type": "auth", "token": gw.token("w1", sub="alice"), "resume": session})
            assert (await c.recv_type("auth_ok"))["resumed"] is True
        forged = gw.token("w1", sub="mallory", secret="not-the-secret-0123456789abcdef012345")
        assert await denied(gw, forged) == 4002
        ungranted = gw.token("w2", sub="bob")
        assert await denied(gw, ungranted, workspace="w1") == 4003

        def complete(ms):
            c = Counter(json.loads(m.value)["event"] for m in ms)
            return c["auth-granted"] >= 3 and c["auth-denied"] >= 2 and c["session-suspended"] >= 2 \
                and c["session-resumed"] >= 1
        await reader.wait_for(complete, timeout=30)
        await reader.count_for(0.5)

    ev = by_event(reader, prefix)
    granted = ev["auth-granted"]
    assert [g["refresh"] for g in granted] == [False, True, False]
    assert all(g["subject"] == "alice" and g["workspaceId"] == "w1" and g["sessionId"] == session for g in granted)
    assert all(g["remoteAddr"] and g["node"] == "gw-node-1" for g in granted)
    resumed = ev["session-resumed"]
    assert len(resumed) == 1 and resumed[0]["sessionId"] == session and resumed[0]["subject"] == "alice"
    suspended = ev["session-suspended"]
    assert len(suspended) == 2 and all(s["sessionId"] == session and s["reason"] for s in suspended)
    codes = {d["code"]: d for d in ev["auth-denied"]}
    assert set(codes) == {4002, 4003}
    assert codes[4003]["subject"] == "bob" and codes[4003]["workspaceId"] == "w1"
    assert codes[4002]["reason"] and codes[4002]["remoteAddr"]
    # Never the token itself.
    raw = b"".join(m.value for m in reader.messages)
    for token in (forged, ungranted):
        assert token.encode() not in raw and token.split(".")[2].encode() not in raw
    assert len({m.value for m in reader.messages}) == len(reader.messages)


async def test_gateway_outage_and_restart_deliver_every_record_once(gateway_factory, kafka_broker, record_property):
    gw, prefix, topics = await audited_gateway(gateway_factory, kafka_broker)
    attempts = 0

    async def attempt(i: int) -> float:
        """One client: granted (then closed) on even i, refused with 4003 on odd i; returns seconds taken."""
        start = time.perf_counter()
        if i % 2 == 0:
            async with ws_connect(gw, "w1", token=gw.token("w1", sub=f"user-{i:04d}")):
                pass
        else:
            assert await denied(gw, gw.token("w9", sub=f"user-{i:04d}")) == 4003
        return time.perf_counter() - start

    async with TopicReader(kafka_broker.bootstrap, topics) as reader:
        with_kafka = [await attempt(i) for i in range(6)]
        attempts = 6
        await reader.wait_for(lambda ms: len(ms) >= 9)  # 3 granted + 3 suspended + 3 denied

        await kafka_broker.astop()
        outage_started = time.monotonic()
        without_kafka = []
        restarted = False
        # ~30 s without Kafka: clients keep connecting and failing to authenticate.
        while time.monotonic() - outage_started < 30:
            without_kafka.append(await attempt(attempts))
            attempts += 1
            if not restarted and time.monotonic() - outage_started > 12:
                # A gateway restart while Kafka is down: the backlog goes to the spool and back.
                await gw.restart()
                restarted = True
                spooled = glob.glob(os.path.join(gw.state_dir, "audit-spool", "*.jsonl"))
                assert spooled, "the restarted gateway found no spool"
            await asyncio.sleep(0.2)
        status, body = await gw.get("/readyz")
        audit = json.loads(body)["audit"]
        assert audit["backlog"] > 0 and audit["lost"] == 0, audit

        await kafka_broker.astart()
        granted = (attempts + 1) // 2
        total = granted * 2 + attempts // 2
        await reader.wait_for(lambda ms: len(ms) >= total, timeout=60)
        await reader.count_for(2.0)

    record_property("connect_auth_seconds_with_kafka", sorted(with_kafka)[len(with_kafka) // 2])
    record_property("connect_auth_seconds_without_kafka", sorted(without_kafka)[len(without_kafka) // 2])
    print(f"median connect+auth: {sorted(with_kafka)[len(with_kafka) // 2] * 1000:.1f} ms with Kafka, "
          f"{sorted(without_kafka)[len(without_kafka) // 2] * 1000:.1f} ms during the outage")

    ids = [json.loads(m.value)["id"] for m in reader.messages]
    assert not [i for i, n in Counter(ids).items() if n > 1], "an audit record arrived twice"
    assert len(reader.messages) == total
    ev = by_event(reader, prefix)
    # Per topic, in the order the clients came (subjects are numbered by attempt).
    want_granted = [f"user-{i:04d}" for i in range(0, attempts, 2)]
    assert [g["subject"] for g in ev["auth-granted"]] == want_granted
    assert [s["subject"] for s in ev["session-suspended"]] == want_granted
    assert [d["subject"] for d in ev["auth-denied"]] == [f"user-{i:04d}" for i in range(1, attempts, 2)]
    assert all(d["code"] == 4003 for d in ev["auth-denied"])
    # Polled: the broker's acks of the last records may reach the gateway after the reader saw them.
    deadline = time.monotonic() + 30
    while True:
        status, body = await gw.get("/readyz")
        audit = json.loads(body)["audit"]
        if audit["backlog"] == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert audit["backlog"] == 0 and audit["lost"] == 0 and audit["connected"] is True, audit
