"""Audit trail (PROTOCOL.md §9) against a real Kafka broker, read back with a real aiokafka consumer."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import resource
import uuid
from collections import Counter

import pytest

from rtserver import config
from rtserver.audit import EVENTS, KafkaAudit, LogAudit, create_audit
from rtserver.audit_spool import Spool, SpoolError
from rtserver.logs import JsonFormatter
from tests.harness.kafka import TopicReader, create_topics
from tests.harness.ports import free_port
from tests.harness.wsclient import ws_connect

pytestmark = pytest.mark.kafka

DOCUMENTED = {"id", "event", "workspaceId", "subject", "sessionId", "code", "reason", "remoteAddr", "node", "timestamp"}
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def unique_prefix() -> str:
    # Every test writes to its own topics on the shared session broker.
    return f"t{uuid.uuid4().hex[:10]}.console.realtime."


async def topics_for(bootstrap: str, prefix: str) -> list[str]:
    topics = [prefix + e for e in EVENTS]
    await create_topics(bootstrap, topics)
    return topics


def make_audit(bootstrap: str, prefix: str, spool_dir, **kw) -> KafkaAudit:
    kw.setdefault("close_timeout", 5.0)
    return KafkaAudit(node="node-a", bootstrap=bootstrap, spool_dir=str(spool_dir), topic_prefix=prefix, **kw)


def values(messages) -> list[dict]:
    return [json.loads(m.value) for m in messages]


def assert_exactly_once_in_order(messages, expected_ids_by_topic: dict[str, list[str]]) -> None:
    got_by_topic: dict[str, list[str]] = {}
    for m in messages:
        got_by_topic.setdefault(m.topic, []).append(json.loads(m.value)["id"])
    for topic, expected in expected_ids_by_topic.items():
        got = got_by_topic.get(topic, [])
        dupes = [i for i, n in Counter(got).items() if n > 1]
        assert not dupes, f"{topic}: {len(dupes)} ids arrived more than once"
        assert got == expected, f"{topic}: {len(got)} arrived, {len(expected)} expected, or out of order"


async def test_each_event_arrives_on_its_topic_with_documented_fields(kafka_broker, tmp_path):
    prefix = unique_prefix()
    topics = await topics_for(kafka_broker.bootstrap, prefix)
    audit = make_audit(kafka_broker.bootstrap, prefix, tmp_path / "spool")
    await audit.start()
    try:
        audit.emit("auth-granted", workspace_id="w1", subject="user-1", session_id="s1",
                   remote_addr="127.0.0.1:5000", refresh=False)
        audit.emit("auth-denied", workspace_id="w2", subject="user-2", code=4003,
                   reason="workspace not granted", remote_addr="10.0.0.7:4242")
        audit.emit("session-suspended", workspace_id="w1", subject="user-1", session_id="s1",
                   code=1013, reason="slow reader", remote_addr="127.0.0.1:5000")
        audit.emit("session-resumed", workspace_id="w1", subject="user-1", session_id="s1",
                   remote_addr="127.0.0.1:5001")
        async with TopicReader(kafka_broker.bootstrap, topics) as reader:
            await reader.wait_for(lambda ms: len(ms) >= 4)
            await reader.count_for(0.5)
        by_event = {}
        for m in reader.messages:
            v = json.loads(m.value)
            assert m.topic == prefix + v["event"]
            assert m.key == v["workspaceId"].encode()
            assert DOCUMENTED <= set(v), f"missing fields: {DOCUMENTED - set(v)}"
            assert TIMESTAMP_RE.match(v["timestamp"]), v["timestamp"]
            assert v["node"] == "node-a"
            by_event[v["event"]] = v
        assert len(reader.messages) == 4 and set(by_event) == set(EVENTS)
        assert len({v["id"] for v in by_event.values()}) == 4
        g = by_event["auth-granted"]
        assert (g["workspaceId"], g["subject"], g["sessionId"], g["remoteAddr"], g["refresh"]) == (
            "w1", "user-1", "s1", "127.0.0.1:5000", False)
        d = by_event["auth-denied"]
        assert (d["workspaceId"], d["subject"], d["code"], d["reason"], d["sessionId"], d["remoteAddr"]) == (
            "w2", "user-2", 4003, "workspace not granted", None, "10.0.0.7:4242")
        s = by_event["session-suspended"]
        assert (s["sessionId"], s["code"], s["reason"]) == ("s1", 1013, "slow reader")
        r = by_event["session-resumed"]
        assert (r["sessionId"], r["remoteAddr"], r["code"]) == ("s1", "127.0.0.1:5001", None)
        st = audit.status()
        assert st["connected"] is True
        assert (st["backlog"], st["delivered"], st["lost"]) == (0, 4, 0)
    finally:
        await audit.close()
    # Nothing was left over for the spool.
    assert not list((tmp_path / "spool").glob("*.jsonl"))


async def test_outage_records_arrive_in_order_exactly_once(kafka_broker, tmp_path):
    prefix = unique_prefix()
    topics = await topics_for(kafka_broker.bootstrap, prefix)
    # A small queue so the outage spills to the on-disk spool.
    audit = make_audit(kafka_broker.bootstrap, prefix, tmp_path / "spool", queue_size=20)
    await audit.start()
    expected: dict[str, list[str]] = {t: [] for t in topics}

    def emit(i: int) -> None:
        event = ("auth-denied", "session-suspended")[i % 2]
        audit.emit(event, workspace_id="w-outage", subject=f"user-{i}", code=4001 if i % 2 == 0 else 1006,
                   reason="test", seq=i)

    try:
        async with TopicReader(kafka_broker.bootstrap, topics) as reader:
            for i in range(10):
                emit(i)
            await reader.wait_for(lambda ms: len(ms) >= 10)
            await kafka_broker.astop()
            # ~30 s of outage with a steady trickle of records; emit() returns at once throughout.
            saw_disconnected = False
            saw_spooled = False
            for i in range(10, 310):
                emit(i)
                await asyncio.sleep(0.1)
                st = audit.status()
                saw_disconnected |= not st["connected"]
                saw_spooled |= st["spooled"] > 0
            st = audit.status()
            assert saw_disconnected, "status() never reported Kafka as down"
            assert saw_spooled, "the outage never reached the on-disk spool"
            assert st["lost"] == 0 and st["backlog"] > 0
            await kafka_broker.astart()
            await reader.wait_for(lambda ms: len(ms) >= 310, timeout=60)
            await reader.count_for(2.0)  # late duplicates would show up here
        for m in reader.messages:
            v = json.loads(m.value)
            expected_topic = prefix + v["event"]
            assert m.topic == expected_topic
        # Ids in emit order, per topic, from the seq each record carries.
        ordered = sorted(values(reader.messages), key=lambda v: v["seq"])
        assert [v["seq"] for v in ordered] == list(range(310))
        for v in ordered:
            expected[prefix + v["event"]].append(v["id"])
        assert_exactly_once_in_order(reader.messages, expected)
        st = audit.status()
        assert (st["backlog"], st["lost"], st["delivered"], st["connected"]) == (0, 0, 310, True)
    finally:
        await audit.close()
    assert not list((tmp_path / "spool").glob("*.jsonl"))


async def test_connected_turns_false_before_the_reason_is_found(kafka_broker, tmp_path, monkeypatch, caplog):
    """When acks stop coming, status()["connected"] (/readyz, rt_audit_connected) turns false at
    once; the warning follows with its reason. The reason comes from a probe of the bootstrap
    servers that can take up to 10 s, and the flag used to wait for it: Kafka was shown
    connected for 5-14 s of an outage. Here the probe does not end until the test lets it."""
    from rtserver import kafka_diagnosis

    probing = asyncio.Event()
    release = asyncio.Event()

    async def slow_explain(*args, **kwargs) -> str:
        probing.set()
        await release.wait()
        return "the probe's finding"

    monkeypatch.setattr(kafka_diagnosis, "explain", slow_explain)
    prefix = unique_prefix()
    topics = await topics_for(kafka_broker.bootstrap, prefix)
    audit = make_audit(kafka_broker.bootstrap, prefix, tmp_path / "spool")
    await audit.start()
    try:
        async with TopicReader(kafka_broker.bootstrap, topics) as reader:
            audit.emit("auth-denied", workspace_id="w-flag", code=4002, reason="first")
            await reader.wait_for(lambda ms: len(ms) >= 1)
        assert audit.status()["connected"] is True
        await kafka_broker.astop()
        try:
            audit.emit("auth-denied", workspace_id="w-flag", code=4002, reason="in the outage")
            await asyncio.wait_for(probing.wait(), 60)
            assert audit.status()["connected"] is False  # while the probe still runs
            assert "cannot deliver to Kafka" not in caplog.text
            release.set()
            for _ in range(100):
                if "the probe's finding" in caplog.text:
                    break
                await asyncio.sleep(0.05)
            assert "cannot deliver to Kafka" in caplog.text and "the probe's finding" in caplog.text
        finally:
            release.set()
            await kafka_broker.astart()
    finally:
        await audit.close()


async def test_restart_with_nonempty_spool_delivers_it(kafka_broker, tmp_path):
    prefix = unique_prefix()
    topics = await topics_for(kafka_broker.bootstrap, prefix)
    spool_dir = tmp_path / "spool"
    first = make_audit(kafka_broker.bootstrap, prefix, spool_dir, queue_size=10, close_timeout=2.0)
    await first.start()
    for i in range(5):
        first.emit("auth-granted", workspace_id="w-spool", subject="u", seq=i)
    async with TopicReader(kafka_broker.bootstrap, topics) as reader:
        await reader.wait_for(lambda ms: len(ms) >= 5)
        await kafka_broker.astop()
        # Some of these sit in the producer when the gateway stops; the rest in memory and spool.
        for i in range(5, 60):
            first.emit("auth-granted" if i % 3 else "session-resumed", workspace_id="w-spool", subject="u", seq=i)
            if i % 10 == 0:
                await asyncio.sleep(0.2)
        await first.close()
        st = first.status()
        assert st["lost"] == 0 and st["delivered"] == 5
        assert list(spool_dir.glob("*.jsonl")), "nothing was spooled at shutdown"

        await kafka_broker.astart()
        second = make_audit(kafka_broker.bootstrap, prefix, spool_dir)
        await second.start()
        try:
            assert second.status()["backlog"] == 55
            second.emit("session-resumed", workspace_id="w-spool", subject="u", seq=60)
            await reader.wait_for(lambda ms: len(ms) >= 61, timeout=60)
            await reader.count_for(1.0)
            st = second.status()
            assert (st["backlog"], st["lost"], st["delivered"]) == (0, 0, 56)
        finally:
            await second.close()
    ordered = sorted(values(reader.messages), key=lambda v: v["seq"])
    assert [v["seq"] for v in ordered] == list(range(61))
    expected: dict[str, list[str]] = {t: [] for t in topics}
    for v in ordered:
        expected[prefix + v["event"]].append(v["id"])
    assert_exactly_once_in_order(reader.messages, expected)
    assert not list(spool_dir.glob("*.jsonl"))


async def test_spool_bound_counts_lost_and_delivers_the_rest(kafka_broker, tmp_path):
    prefix = unique_prefix()
    topics = await topics_for(kafka_broker.bootstrap, prefix)
    spool_dir = tmp_path / "spool"
    # Kafka unreachable: a port nothing listens on.
    dead = f"127.0.0.1:{free_port()}"
    audit = make_audit(dead, prefix, spool_dir, queue_size=10, spool_max_bytes=8192, close_timeout=1.0)
    await audit.start()
    for i in range(200):
        audit.emit("auth-denied", workspace_id="w-bound", code=4001, reason="invalid token", seq=i)
        if i % 20 == 0:
            await asyncio.sleep(0.05)  # let the spool writer run
    for _ in range(100):
        if audit.status()["lost"]:
            break
        await asyncio.sleep(0.05)
    st = audit.status()
    assert st["lost"] > 0, st
    assert st["spool_bytes"] <= 8192
    assert st["backlog"] + st["lost"] == 200
    await audit.close()
    st = audit.status()
    assert st["backlog"] + st["lost"] == 200
    kept = 200 - st["lost"]

    again = make_audit(kafka_broker.bootstrap, prefix, spool_dir)
    await again.start()
    try:
        async with TopicReader(kafka_broker.bootstrap, topics) as reader:
            await reader.wait_for(lambda ms: len(ms) >= kept, timeout=30)
            await reader.count_for(1.0)
    finally:
        await again.close()
    got = values(reader.messages)
    assert len(got) == kept
    assert len({v["id"] for v in got}) == kept
    seqs = [v["seq"] for v in got]
    assert seqs == sorted(seqs)  # what survived arrives in emit order


async def test_a_topic_kafka_will_not_take_is_named_and_not_connected(kafka_broker, tmp_path, caplog):
    """Records for a topic the cluster does not have (not created, no auto-creation; here a name
    Kafka refuses, which takes the same path) are not delivered: the warning names the topic,
    and `connected` stays false though the broker answers (a new producer starts fine)."""
    prefix = f"t{uuid.uuid4().hex[:10]} no such topic."
    audit = make_audit(kafka_broker.bootstrap, prefix, tmp_path / "spool", request_timeout_ms=2000)
    await audit.start()
    try:
        with caplog.at_level(logging.INFO, logger="rtserver.audit.kafka"):
            audit.emit("auth-denied", workspace_id="w1", code=4002, reason="test")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not any("cannot deliver" in r.getMessage() for r in caplog.records):
                assert loop.time() < deadline, "the failure was never reported"
                await asyncio.sleep(0.05)
            failed = audit._producer
            while audit._producer is None or audit._producer is failed:  # the next attempt's producer
                assert loop.time() < deadline, "no new producer after the failure"
                await asyncio.sleep(0.02)
            st = audit.status()
        warning = next(r.getMessage() for r in caplog.records if "cannot deliver" in r.getMessage())
        assert f"topic {prefix}auth-denied: " in warning, warning
        assert not any("reachable" in r.getMessage() for r in caplog.records), "no record was delivered"
        assert (st["connected"], st["delivered"], st["backlog"]) == (False, 0, 1)
    finally:
        await audit.close()


async def test_spool_keeps_order_across_reopen_and_refuses_a_second_owner(tmp_path):
    d = str(tmp_path / "spool")
    spool = Spool(d, max_bytes=10_000, segment_bytes=1024)
    spool.open()
    with pytest.raises(SpoolError, match="in use"):
        Spool(d, 10_000).open()
    lines = [json.dumps({"n": i, "pad": "x" * 40}).encode() for i in range(100)]
    assert spool.append(lines) == 100
    assert spool.records == 100 and spool.bytes == sum(len(x) + 1 for x in lines)
    sid, first = spool.read_oldest()
    spool.replace(sid, first[3:])  # three of the oldest segment delivered
    assert spool.prepend([b'{"n":-1}']) == 1
    spool.close()

    reopened = Spool(d, max_bytes=10_000, segment_bytes=1024)
    reopened.open()
    assert reopened.records == 98
    out = []
    while (got := reopened.read_oldest()) is not None:
        out.extend(json.loads(x)["n"] for x in got[1])
        reopened.delete(got[0])
    assert out == [-1] + list(range(3, 100))
    assert reopened.records == 0 and reopened.bytes == 0
    # The byte bound: what does not fit is refused, not written.
    assert reopened.append([b"y" * 6000, b"z" * 6000]) == 1
    reopened.close()


def test_a_full_spool_keeps_the_oldest_records_put_back_at_shutdown(tmp_path):
    """At shutdown the records in flight when Kafka went (the oldest of the outage) go in front
    of the spool. With the spool full they were the ones lost, while newer spooled records
    stayed: the trail had a hole at its start. The newest make room instead."""
    spool = Spool(str(tmp_path / "spool"), max_bytes=2_000, segment_bytes=1024)
    spool.open()
    line = lambda n: json.dumps({"n": n, "pad": "x" * 30}).encode()  # noqa: E731 - 48 bytes a line
    spooled = [line(n) for n in range(10, 60)]
    kept = spool.append(spooled)
    assert 0 < kept < len(spooled) and spool.bytes + len(line(0)) + 1 > spool.max_bytes  # full
    head = [line(n) for n in range(3)]
    assert spool.drop_newest(sum(len(x) + 1 for x in head)) == 3
    assert spool.prepend(head) == 3 and spool.bytes <= spool.max_bytes
    out = []
    while (got := spool.read_oldest()) is not None:
        out.extend(json.loads(x)["n"] for x in got[1])
        spool.delete(got[0])
    assert out == [0, 1, 2] + list(range(10, 10 + kept - 3))  # the oldest, whole; the newest dropped
    spool.close()


def test_create_audit_picks_the_backend(tmp_path):
    env = {"RT_STATE_DIR": str(tmp_path)}
    audit = create_audit(config.load(environ=env), "node-x")
    assert isinstance(audit, LogAudit)
    env |= {"RT_KAFKA_BOOTSTRAP": "127.0.0.1:9", "RT_AUDIT_QUEUE_SIZE": "7", "RT_AUDIT_TOPIC_PREFIX": "p."}
    audit = create_audit(config.load(environ=env), "node-x")
    assert isinstance(audit, KafkaAudit)
    assert (audit.queue_size, audit.topic_prefix, audit.node) == (7, "p.", "node-x")
    assert audit._spool.directory == str(tmp_path / "audit-spool")


def test_log_audit_writes_one_json_line_per_record(caplog):
    audit = LogAudit("node-l")
    with caplog.at_level(logging.INFO, logger="rtserver.audit"):
        audit.emit("auth-denied", workspace_id="w1", code=4001, reason="invalid token", remote_addr="1.2.3.4:5")
        audit.emit("bogus-event", workspace_id="w1")  # refused, counted, never raised
    lines = [r for r in caplog.records if r.name == "rtserver.audit"]
    assert len(lines) == 1
    # One JSON object a line: the formatter merges the record's members into the line.
    line = json.loads(JsonFormatter().format(lines[0]))
    record = lines[0].fields
    assert line["msg"] == "audit auth-denied" and line["workspaceId"] == "w1"
    assert DOCUMENTED <= set(record)
    assert (record["event"], record["code"], record["remoteAddr"], record["node"]) == (
        "auth-denied", 4001, "1.2.3.4:5", "node-l")
    st = audit.status()
    assert (st["emitted"], st["delivered"], st["lost"]) == (1, 1, 1)  # the refused one never counted delivered



async def test_a_disk_that_refuses_a_spool_write_loses_that_batch_only(kafka_broker, tmp_path):
    """The disk refuses a spool write (full; here the file size limit, EFBIG, which takes the
    same path as ENOSPC): that batch is lost, counted, and nothing else. The bytes the disk did
    not take stayed buffered in the open segment: every later read of the spool tried to write
    them first and failed, so the sender stalled (a traceback a second) and records emitted
    while Kafka was reachable were not delivered; once the disk took them, records already
    counted lost were delivered after all."""
    prefix = unique_prefix()
    topics = await topics_for(kafka_broker.bootstrap, prefix)
    spool_dir = tmp_path / "spool"
    audit = make_audit(kafka_broker.bootstrap, prefix, spool_dir, queue_size=10)
    await audit.start()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    pad = "x" * 200
    try:
        async with TopicReader(kafka_broker.bootstrap, topics) as reader:
            # No file of this process may grow past 64 KiB (Python ignores SIGXFSZ: EFBIG).
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
            for i in range(400):  # one burst, larger than the queue: most of it spills at once
                audit.emit("auth-denied", workspace_id="w-full", code=4001, reason="test", seq=i, pad=pad)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not audit.status()["lost"]:
                assert loop.time() < deadline, "the refused spool write was never counted"
                await asyncio.sleep(0.05)
            # The disk is still full; Kafka is reachable: a new record gets through.
            audit.emit("auth-granted", workspace_id="w-full", subject="u", seq=400)
            await reader.wait_for(lambda ms: any(json.loads(m.value)["seq"] == 400 for m in ms), timeout=30)
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            await reader.count_for(2.0)  # records counted lost would show up here
        st = audit.status()
        got = values(reader.messages)
        assert (st["backlog"], st["delivered"] + st["lost"]) == (0, 401), st
        assert len(got) == st["delivered"] and len({v["id"] for v in got}) == len(got)
        seqs = [v["seq"] for v in got if v["event"] == "auth-denied"]  # in order on its topic
        assert seqs == sorted(seqs)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        await audit.close()
    assert not list(spool_dir.glob("*.jsonl"))


async def test_spool_segments_removed_from_under_the_gateway_do_not_stall_the_trail(kafka_broker, tmp_path):
    """Segments deleted while the gateway runs (an operator freeing disk space, a tmp cleaner)
    are counted lost, and delivery goes on: the sender failed to read the missing segment
    every second for good (a traceback each time), and nothing was delivered again."""
    from tests.harness.tcpproxy import TcpProxy

    prefix = unique_prefix()
    topics = await topics_for(kafka_broker.bootstrap, prefix)
    spool_dir = tmp_path / "spool"
    # Kafka is reached through a proxy that is not listening yet: unreachable until it is.
    audit = make_audit(kafka_broker.proxied_bootstrap, prefix, spool_dir, queue_size=10)
    await audit.start()
    proxy = None
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        # Two bursts: the sender takes the first one's segment to deliver (it waits for Kafka
        # with it); the second one's segment waits in the spool behind it.
        for i in range(100):
            audit.emit("auth-denied", workspace_id="w-rm", code=4001, reason="test", seq=i)
            if i == 49:
                while audit._pending_seg is None:
                    assert loop.time() < deadline, "the sender never took the spool"
                    await asyncio.sleep(0.05)
        while audit._spill or not audit._flush_task.done():  # the second burst on disk
            assert loop.time() < deadline, "the spool was never written"
            await asyncio.sleep(0.05)
        removed = audit.status()["spooled"]
        assert removed
        for path in spool_dir.glob("*.jsonl"):
            path.unlink()
        proxy = await TcpProxy(kafka_broker.proxied_port).start(port=kafka_broker.proxy_port)
        audit.emit("auth-granted", workspace_id="w-rm", subject="u", seq=100)
        async with TopicReader(kafka_broker.bootstrap, topics) as reader:
            await reader.wait_for(lambda ms: any(json.loads(m.value)["seq"] == 100 for m in ms), timeout=30)
            await reader.count_for(1.0)
        st = audit.status()
        got = values(reader.messages)
        # (The record emitted last spills the queue's older half into the open segment, whose
        # file is gone too: lost with the others.)
        assert (st["backlog"], st["lost"] + st["delivered"]) == (0, 101) and st["lost"] >= removed, st
        assert len(got) == st["delivered"] and len({v["id"] for v in got}) == len(got)
    finally:
        await audit.close()
        if proxy is not None:
            await proxy.close()


async def test_a_spool_write_refused_at_shutdown_loses_only_what_was_not_written(kafka_broker, tmp_path):
    """At shutdown with Kafka unreachable, the records in flight went to the spool and the
    memory queue behind them did not fit on the disk: every record was counted lost (those on
    disk too, delivered by the next start), and the spool was left locked, so the next
    KafkaAudit of the same process refused the directory as 'in use by another process'."""
    prefix = unique_prefix()
    topics = await topics_for(kafka_broker.bootstrap, prefix)
    spool_dir = tmp_path / "spool"
    dead = f"127.0.0.1:{free_port()}"
    first = make_audit(dead, prefix, spool_dir, queue_size=1000, close_timeout=1.0)
    await first.start()
    pad = "x" * 200
    for i in range(60):
        first.emit("auth-denied", workspace_id="w-shut", code=4001, reason="test", seq=i, pad=pad)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not first._inflight:  # the sender holds them, waiting for Kafka
        assert loop.time() < deadline, "the sender never took the records"
        await asyncio.sleep(0.05)
    for i in range(60, 160):
        first.emit("auth-denied", workspace_id="w-shut", code=4001, reason="test", seq=i, pad=pad)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Room for the 60 in flight (~25 KB), not for the 100 queued behind them (~41 KB).
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, limits[1]))
    try:
        await first.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert first.status()["lost"] == 100, first.status()

    second = make_audit(kafka_broker.bootstrap, prefix, spool_dir)
    await second.start()
    try:
        assert second.status()["backlog"] == 60
        async with TopicReader(kafka_broker.bootstrap, topics) as reader:
            await reader.wait_for(lambda ms: len(ms) >= 60, timeout=30)
            await reader.count_for(1.0)
    finally:
        await second.close()
    assert [v["seq"] for v in values(reader.messages)] == list(range(60))


async def test_a_spool_line_nesting_past_the_stack_is_lost_and_the_rest_delivered(kafka_broker, tmp_path, caplog):
    """A spool line nesting deeper than the decoder's stack (a damaged or hand-edited segment)
    made the decoder raise RecursionError, which was not among the errors of an unreadable
    line: the sender failed on the same segment every second ("audit sender failed;
    retrying", a traceback each time) and the audit trail stalled for good, the records behind
    it included. It is counted lost as any unreadable line is, and the rest is delivered."""
    prefix = unique_prefix()
    topics = await topics_for(kafka_broker.bootstrap, prefix)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()

    def record(seq: int) -> bytes:
        return json.dumps({"id": str(uuid.uuid4()), "event": "auth-granted", "workspaceId": "w-deep",
                           "subject": "u", "seq": seq}).encode()

    deep = b'{"event":"auth-granted","workspaceId":"w-deep","x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    (spool_dir / f"{10**15:020d}.jsonl").write_bytes(b"\n".join([record(0), deep, record(1)]) + b"\n")
    audit = make_audit(kafka_broker.bootstrap, prefix, spool_dir)
    with caplog.at_level(logging.ERROR):
        await audit.start()
        try:
            audit.emit("auth-granted", workspace_id="w-deep", subject="u", seq=2)
            async with TopicReader(kafka_broker.bootstrap, topics) as reader:
                await reader.wait_for(lambda ms: len(ms) >= 3, timeout=30)
                await reader.count_for(1.0)
            st = audit.status()
        finally:
            await audit.close()
    assert [v["seq"] for v in values(reader.messages)] == [0, 1, 2]
    assert (st["backlog"], st["lost"], st["delivered"]) == (0, 1, 3), st
    assert not [r for r in caplog.records if "audit sender failed" in r.getMessage()]
    assert [r for r in caplog.records if "unreadable line in spool segment" in r.getMessage()]


async def test_an_ipv6_clients_address_is_written_with_brackets(gateway_factory):
    """`remoteAddr` of a client over IPv6 was `::1:51234`, which no consumer can split into
    host and port; it is `[::1]:51234`, as in a URL."""
    gw = await gateway_factory(host="::1")
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        port = c.ws.local_address[1]
    granted = await gw.audit_records("auth-granted")
    assert [r["remoteAddr"] for r in granted] == [f"[::1]:{port}"]


async def test_a_subject_that_is_not_text_is_refused_and_leaves_the_trail_and_the_stop_whole(gateway_factory):
    """A signed token whose sub holds a lone surrogate ("\\ud83d": JavaScript's JSON.stringify
    writes one for a name cut in the middle of an emoji) was accepted: json.loads takes it, no
    UTF-8 carries it. Every audit record of that subject (granted, suspended, denied when
    expired or for another workspace) was dropped ('could not be built'), and at SIGTERM the
    suspended sessions could not be written: the shutdown ended there with an 'uncaught
    exception' and a plain-text traceback, no workspace's session saved, the audit not
    flushed. Such a token is malformed (4002, 401), as the gateway's JSON readers refuse such
    text in messages and bodies; its refusals are audited."""
    import signal

    import websockets

    gw = await gateway_factory()
    cut = "Zo\ud83d"  # "Zo😀" cut after its first UTF-16 unit
    for token in (gw.token("w1", sub=cut), gw.token("w1", sub=cut, ttl=-60), gw.token("w2", sub=cut)):
        async with websockets.connect(gw.ws_url("w1")) as ws:
            await ws.send(json.dumps({"type": "auth", "token": token}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert (reply["code"], reply["name"]) == (4002, "token_invalid"), reply
        assert "half a UTF-16 surrogate pair" in reply["message"], reply
    status, body = await gw.post("/workspaces/w1/realtime/events/t", b'{"a":1}',
                                 {"Authorization": f"Bearer {gw.token('w1', sub=cut, publish=True)}",
                                  "Content-Type": "application/json"})
    assert status == 401 and b"surrogate" in body, (status, body)
    assert len(await gw.audit_records("auth-denied", 4)) == 4
    async with ws_connect(gw, "w1", token=gw.token("w1")):
        pass  # a session suspended, for the stop to save
    assert await gw.stop(signal.SIGTERM) == 0, gw.logs()
    assert os.path.exists(os.path.join(gw.state_dir, "sessions.json")), gw.logs()
    lines = gw.logs().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines), gw.logs()
    assert not [line for line in lines if "dropped" in line or "uncaught" in line], gw.logs()
