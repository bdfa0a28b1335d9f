"""The ingest's transactional writer (rtserver/bus_txn.py) against the harness's Kafka broker:
group commit, durability callbacks in order, and fencing of a previous holder."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from rtcore.event import Event
from rtserver import config
from rtserver.bus_kafka import KafkaPublisher, decode_record, encode_event
from rtserver.bus_txn import TransactionalWriter, WriterFailed

pytestmark = [pytest.mark.kafka]


def _event(workspace: str, n: int) -> Event:
    return Event(workspace=workspace, source="postgres", entity="orders", operation="INSERT",
                 record={"id": n}, body=b'{"type":"event","n":%d}' % n)


async def _publisher(kafka_broker, topic: str) -> KafkaPublisher:
    cfg = config.load(environ={"RT_BUS": "kafka", "RT_BUS_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
                               "RT_BUS_TOPIC": topic, "RT_BUS_PARTITIONS": "2"})
    pub = KafkaPublisher(cfg, "test-writer")
    await pub.start()
    return pub


async def _committed(kafka_broker, topic: str, expect: int, partitions: int = 2) -> list[tuple[str, int]]:
    """(workspace, n) of the records a read_committed reader gets, in offset order per
    partition: read until `expect` came (Kafka writes a transaction's commit markers just after
    the commit returns: until then the records are not readable), then to the end."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, isolation_level="read_committed",
                                enable_auto_commit=False)
    await consumer.start()
    out: list[tuple[str, int]] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for _ in range(100):
            for records in (await consumer.getmany(timeout_ms=100)).values():
                for r in records:
                    _rec, event = decode_record(r.key, r.value)
                    out.append((event.workspace, event.record["id"]))
            if len(out) >= expect:
                end = await consumer.end_offsets(tps)
                if all([await consumer.position(tp) >= end[tp] for tp in tps]):
                    break
    finally:
        await consumer.stop()
    return out


async def test_records_commit_in_groups_and_callbacks_follow_in_order(kafka_broker):
    topic = f"rt.txn.{uuid.uuid4().hex[:8]}"
    pub = await _publisher(kafka_broker, topic)
    failures: list[BaseException] = []
    writer = TransactionalWriter(pub, f"{topic}.ingest", failures.append)
    await writer.start()
    try:
        order: list[str] = []
        futures = []
        for n in range(200):
            futures.append(await writer.enqueue("w1" if n % 2 else "w2", encode_event(_event("w1" if n % 2 else "w2", n))))
            if n % 50 == 49:
                writer.after(lambda n=n: order.append(f"after {n}"))
        metas = await asyncio.gather(*futures)
        await asyncio.sleep(0)
        assert order == ["after 49", "after 99", "after 149", "after 199"]
        # group commit: far fewer transactions than records
        assert 1 <= writer.committed < 200, writer.committed
        assert all(m.offset >= 0 for m in metas)
        ran: list[int] = []
        writer.after(lambda: ran.append(1))  # nothing waiting: at once
        assert ran == [1]
        got = await _committed(kafka_broker, topic, 200)
        assert sorted(n for _, n in got) == list(range(200))
        for ws in ("w1", "w2"):
            ns = [n for w, n in got if w == ws]
            assert ns == sorted(ns), ws  # each workspace in its order
        assert failures == [] and writer.problem() == ""
    finally:
        await writer.close()
        await pub.close()


async def test_a_newer_holder_fences_the_writer_before_it(kafka_broker):
    """The second writer's start fences the first: the first's records not yet committed fail
    (its durability callbacks never run) and a read_committed reader never sees them; the
    first reports the failure once, so the ingest can give up its lease."""
    from aiokafka.errors import ProducerFenced

    topic = f"rt.txn.{uuid.uuid4().hex[:8]}"
    pub = await _publisher(kafka_broker, topic)
    failed_first: list[BaseException] = []
    first = TransactionalWriter(pub, f"{topic}.ingest", failed_first.append)
    await first.start()
    second = TransactionalWriter(pub, f"{topic}.ingest", lambda exc: None)
    try:
        await (await first.enqueue("w1", encode_event(_event("w1", 1))))  # committed before the fence
        await second.start()
        late = await first.enqueue("w1", encode_event(_event("w1", 2)))
        ran: list[int] = []
        first.after(lambda: ran.append(2))
        with pytest.raises(WriterFailed):
            await asyncio.wait_for(late, 30)
        assert len(failed_first) == 1 and isinstance(failed_first[0], ProducerFenced), failed_first
        assert ran == []
        with pytest.raises(WriterFailed, match="transaction failed"):
            await first.enqueue("w1", encode_event(_event("w1", 3)))
        assert "ProducerFenced" in first.problem()
        await (await second.enqueue("w1", encode_event(_event("w1", 4))))
        assert [n for _, n in await _committed(kafka_broker, topic, 2)] == [1, 4]
    finally:
        await first.close()
        await second.close()
        await pub.close()


async def test_closing_fails_what_is_not_committed(kafka_broker):
    topic = f"rt.txn.{uuid.uuid4().hex[:8]}"
    pub = await _publisher(kafka_broker, topic)
    writer = TransactionalWriter(pub, f"{topic}.ingest", lambda exc: None)
    await writer.start()
    try:
        await (await writer.enqueue("w1", encode_event(_event("w1", 1))))
        pending = [await writer.enqueue("w1", encode_event(_event("w1", n))) for n in range(2, 50)]
        await writer.close()
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
        # some may have committed before the close; the rest failed, none left hanging
        assert all(isinstance(o, WriterFailed) or o.offset >= 0 for o in outcomes), outcomes
        with pytest.raises(WriterFailed):
            await writer.enqueue("w1", b"x")
    finally:
        await writer.close()
        await pub.close()
