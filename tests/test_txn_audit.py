"""Audit of the ingest's Kafka transactions (bus_txn): what a stopped, failed or cut-off writer
leaves on the topic, and what readers (nodes) then see."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from rtcore.event import Event
from rtserver import config
from rtserver.bus_kafka import KafkaPublisher, decode_record, encode_event
from rtserver.bus_txn import TransactionalWriter

pytestmark = [pytest.mark.kafka]


def _event(workspace: str, n: int) -> Event:
    return Event(workspace=workspace, source="postgres", entity="orders", operation="INSERT",
                 record={"id": n}, body=b'{"type":"event","n":%d}' % n)


async def _publisher(bootstrap: str, topic: str, partitions: int = 1) -> KafkaPublisher:
    cfg = config.load(environ={"RT_BUS": "kafka", "RT_BUS_KAFKA_BOOTSTRAP": bootstrap,
                               "RT_BUS_TOPIC": topic, "RT_BUS_PARTITIONS": str(partitions)})
    pub = KafkaPublisher(cfg, f"test-{uuid.uuid4().hex[:6]}")
    await pub.start()
    return pub


async def _read_committed(bootstrap: str, topic: str, until, timeout: float) -> list[int]:
    """The `n` of every record a read_committed reader gets from partition 0, until `until(ns)`
    or `timeout` seconds."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                                enable_auto_commit=False)
    await consumer.start()
    ns: list[int] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout and not until(ns):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    _rec, event = decode_record(r.key, r.value)
                    ns.append(event.record["id"])
    finally:
        await consumer.stop()
    return ns


async def test_a_closed_writer_leaves_no_open_transaction_behind(kafka_broker):
    """The ingest stops (SIGTERM, or the lease lost) while a transaction has records in the
    log and is not committed yet: closing the writer must end that transaction, or every
    later record of its partitions (a node's custom events too) stays unreadable for
    read_committed readers until Kafka aborts it after the 60 s transaction timeout."""
    topic = f"rt.txn.{uuid.uuid4().hex[:8]}"
    pub = await _publisher(kafka_broker.bootstrap, topic)
    writer = TransactionalWriter(pub, f"{topic}.ingest", lambda exc: None)
    await writer.start()
    node = await _publisher(kafka_broker.bootstrap, topic)  # a gateway node's publisher
    hold = asyncio.Event()
    try:
        await (await writer.enqueue("w1", encode_event(_event("w1", 1))))
        commit = writer._producer.commit_transaction
        sent = asyncio.Event()

        async def held_commit() -> None:  # the process is stopped between the send and the commit
            sent.set()
            await hold.wait()
            await commit()

        writer._producer.commit_transaction = held_commit
        pending = await writer.enqueue("w1", encode_event(_event("w1", 2)))
        await asyncio.wait_for(sent.wait(), 10)
        await writer.close()
        assert pending.done() and pending.exception() is not None
        await node.send("w1", encode_event(_event("w1", 3)))  # a custom event after the stop
        ns = await _read_committed(kafka_broker.bootstrap, topic, lambda ns: 3 in ns, timeout=15)
        assert ns == [1, 3], f"read_committed reader got {ns} within 15 s (2 aborted, 3 readable)"
    finally:
        hold.set()
        await writer.close()
        await node.close()
        await pub.close()
