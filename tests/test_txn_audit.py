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



async def test_a_writer_that_never_wrote_closes_cleanly(kafka_broker):
    """An idle ingest (no change since it took the lease) stopped, or losing the lease: its
    writer never began a transaction. Closing it raised AttributeError (aiokafka has no
    transaction waiter yet), which skipped stopping its producer (leaked at every such lease
    loss) and, on a SIGTERM, the lease consumer's LeaveGroup (the standby then waited out
    the lease timeout instead of taking over at once)."""
    topic = f"rt.txn.{uuid.uuid4().hex[:8]}"
    pub = await _publisher(kafka_broker.bootstrap, topic)
    writer = TransactionalWriter(pub, f"{topic}.ingest", lambda exc: None)
    await writer.start()
    producer = writer._producer
    try:
        await writer.close()
        assert producer._closed
    finally:
        await pub.close()


async def test_a_transaction_kafka_aborted_on_its_timeout_fails_the_writer(kafka_broker, monkeypatch):
    """Kafka unreachable for longer than the transaction timeout while a transaction has
    records in the log: Kafka aborts it; once the network heals the writer must fail (the
    ingest then rejoins and its feeds read those changes again), not hang nor commit."""
    from rtserver import bus_txn
    from tests.harness.tcpproxy import TcpProxy

    monkeypatch.setattr(bus_txn, "TRANSACTION_TIMEOUT_MS", 2000)
    proxy = await TcpProxy(kafka_broker.proxied_port).start(port=kafka_broker.proxy_port)
    topic = f"rt.txn.{uuid.uuid4().hex[:8]}"
    pub = await _publisher(kafka_broker.proxied_bootstrap, topic)
    failures: list[BaseException] = []
    writer = TransactionalWriter(pub, f"{topic}.ingest", failures.append)
    await writer.start()
    hold = asyncio.Event()
    try:
        await (await writer.enqueue("w1", encode_event(_event("w1", 1))))
        commit = writer._producer.commit_transaction
        sent = asyncio.Event()

        async def held_commit() -> None:
            sent.set()
            await hold.wait()
            await commit()

        writer._producer.commit_transaction = held_commit
        pending = await writer.enqueue("w1", encode_event(_event("w1", 2)))
        await asyncio.wait_for(sent.wait(), 10)
        proxy.paused = True
        # the broker looks for timed-out transactions every 10 s
        ns = await _read_committed(kafka_broker.bootstrap, topic, lambda ns: False, timeout=13)
        assert ns == [1]
        hold.set()
        proxy.paused = False
        done, _ = await asyncio.wait({pending}, timeout=20)
        assert done, f"the writer neither committed nor failed 20 s after the network healed: {writer.problem()}"
        assert pending.exception() is not None, "committed a transaction Kafka had aborted"
        assert len(failures) == 1, failures
    finally:
        hold.set()
        await writer.close()
        await pub.close()
        await proxy.close()



async def test_the_mongo_feed_hands_a_burst_of_changes_over_in_few_transactions(kafka_broker, mongo_server, tmp_path):
    """Group commit for MongoDB too: a burst of changes goes to Kafka in a few transactions.
    A feed that waits for each change's commit before it reads the next (drain per change)
    pays a whole Kafka transaction per change: ~150 changes/s on the test broker instead of
    ~3,000 with the plain producer before, so a busier database leaves the ingest behind for
    good. The token is saved once the transaction carrying its change committed, as a
    PostgreSQL feed records its LSN."""
    from pymongo import AsyncMongoClient

    from rtserver.ingest import SourceSink
    from rtserver.sources.mongo import MongoSource

    topic = f"rt.txn.{uuid.uuid4().hex[:8]}"
    pub = await _publisher(kafka_broker.bootstrap, topic)
    writer = TransactionalWriter(pub, f"{topic}.ingest", lambda exc: None)
    await writer.start()
    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    sink = SourceSink(writer, "mongo", {}, {})
    src = MongoSource(mongo_server.url, database="shop", state_dir=str(tmp_path), sink=sink,
                      workspaces=lambda: ("w1",), max_await_ms=100)
    sink.source = src
    total = 300
    try:
        await client["shop"].orders.insert_one({"_id": -1})
        await src.start()
        t0 = time.monotonic()
        while src.status()["events"] < 1:  # the stream opens from "now": insert until it reads one
            assert time.monotonic() - t0 < 15, src.status()
            if src.ready():
                await client["shop"].orders.insert_one({"_id": -2 - int(time.monotonic() * 1000)})
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        ready_events = src.status()["events"]
        before = writer.committed
        await client["shop"].orders.insert_many([{"_id": i} for i in range(1, total + 1)])
        t0 = time.monotonic()
        while src.status()["events"] < ready_events + total or writer.waiting:
            assert time.monotonic() - t0 < 30, (src.status(), writer.waiting)
            await asyncio.sleep(0.05)
        transactions = writer.committed - before
        assert transactions <= total // 5, f"{total} changes took {transactions} Kafka transactions"
        # the token saved is the last change's, once Kafka has it
        await src.stop()
        stored, _ = await src._tokens.load()
        assert stored is not None and bson_raw(stored) == src.published_token
    finally:
        await src.stop()
        await client.close()
        await writer.close()
        await pub.close()


def bson_raw(token) -> bytes:
    import bson
    from bson.raw_bson import RawBSONDocument

    return token.raw if isinstance(token, RawBSONDocument) else bson.encode(token)
