"""The ingest's transactional writer (rtserver/bus_txn.py) against the harness's Kafka broker:
group commit, durability callbacks in order, fencing of a previous holder, and what a stopped,
failed or cut-off writer leaves on the topic for readers (nodes)."""

from __future__ import annotations

import asyncio
import gc
import time
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


async def _publisher(bootstrap: str, topic: str, partitions: int = 2) -> KafkaPublisher:
    cfg = config.load(environ={"RT_BUS": "kafka", "RT_BUS_KAFKA_BOOTSTRAP": bootstrap,
                               "RT_BUS_TOPIC": topic, "RT_BUS_PARTITIONS": str(partitions)})
    pub = KafkaPublisher(cfg, f"test-{uuid.uuid4().hex[:6]}")
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
    pub = await _publisher(kafka_broker.bootstrap, topic)
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
    pub = await _publisher(kafka_broker.bootstrap, topic)
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


async def test_a_writer_fenced_while_handing_records_over_logs_no_unretrieved_errors(kafka_broker):
    """A zombie ingest's case (test_scaleout's cut-off ingest, on a loaded machine): its Kafka
    link stalls while it hands a transaction's records to its producer, whose partition batch
    fills, so the next send waits; a newer holder fences it; when the link heals, that send
    raises ProducerFenced. The records handed over before it failed too, with nothing awaiting
    them: once the failed writer was dropped, the garbage collector logged each as an ERROR
    ("Future exception was never retrieved"), 14 lines in that run, where an operator looks for
    the one line saying the ingest was fenced."""
    from tests.harness.tcpproxy import TcpProxy

    loop = asyncio.get_running_loop()
    unhandled: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    proxy = await TcpProxy(kafka_broker.proxied_port).start(port=kafka_broker.proxy_port)
    topic = f"rt.txn.{uuid.uuid4().hex[:8]}"
    direct = await _publisher(kafka_broker.bootstrap, topic)
    cut = await _publisher(kafka_broker.proxied_bootstrap, topic)  # its Kafka traffic goes through the proxy
    first = TransactionalWriter(cut, f"{topic}.ingest", lambda exc: None)
    second = TransactionalWriter(direct, f"{topic}.ingest", lambda exc: None)
    try:
        await first.start()
        await (await first.enqueue("w1", encode_event(_event("w1", 1))))
        proxy.paused = True
        # 4 KB records: aiokafka's 16 KB batch of the partition is full after a few, and the
        # next send waits for the stalled sender.
        big = Event(workspace="w1", source="postgres", entity="orders", operation="INSERT", record={"id": 2},
                    body=b'{"type":"event","pad":"%s"}' % (b"x" * 4000))
        late = [await first.enqueue("w1", encode_event(big)) for _ in range(20)]
        await asyncio.sleep(0.5)
        await second.start()  # fences the first
        proxy.paused = False
        outcomes = await asyncio.wait_for(asyncio.gather(*late, return_exceptions=True), 30)
        assert all(isinstance(o, WriterFailed) for o in outcomes), outcomes
        assert "ProducerFenced" in first.problem()
    finally:
        await first.close()
        await second.close()
        await cut.close()
        await direct.close()
        await proxy.close()
    del first, late, outcomes  # the failed writer dropped, as the ingest drops it
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0.05)
    loop.set_exception_handler(None)
    assert not unhandled, [(c.get("message"), repr(c.get("exception"))) for c in unhandled]


async def test_closing_fails_what_is_not_committed(kafka_broker):
    topic = f"rt.txn.{uuid.uuid4().hex[:8]}"
    pub = await _publisher(kafka_broker.bootstrap, topic)
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


async def _committed_once_aborted(bootstrap: str, topic: str, timeout: float) -> list[int]:
    """The `n` of every record a read_committed reader gets from partition 0, read to its end
    once the partition has no open transaction left (its last stable offset, the end a
    read_committed reader sees, has reached the high watermark); AssertionError if a
    transaction is still open after `timeout` seconds."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tp = TopicPartition(topic, 0)
    committed = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                                 enable_auto_commit=False)
    uncommitted = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_uncommitted",
                                   enable_auto_commit=False)
    await committed.start()
    await uncommitted.start()
    ns: list[int] = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            stable, high = (await committed.end_offsets([tp]))[tp], (await uncommitted.end_offsets([tp]))[tp]
            if stable == high:
                break
            assert time.monotonic() < deadline, f"Kafka did not abort the transaction in {timeout} s ({stable} < {high})"
            await asyncio.sleep(0.2)
        committed.assign([tp])
        await committed.seek_to_beginning(tp)
        try:
            async with asyncio.timeout(timeout):
                while await committed.position(tp) < high:
                    for records in (await committed.getmany(timeout_ms=200)).values():
                        for r in records:
                            _rec, event = decode_record(r.key, r.value)
                            ns.append(event.record["id"])
        except TimeoutError:
            raise AssertionError(f"read {ns}, not to the end ({high}), in {timeout} s") from None
    finally:
        await committed.stop()
        await uncommitted.stop()
    return ns


async def _held_in_transaction(writer: TransactionalWriter, hold: asyncio.Event) -> asyncio.Future:
    """Record 1 committed, then record 2 sent in a transaction whose commit waits for `hold`:
    the future of record 2, once its records are in the log."""
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
    return pending


async def test_a_closed_writer_leaves_no_open_transaction_behind(kafka_broker):
    """The ingest stops (SIGTERM, or the lease lost) while a transaction has records in the
    log and is not committed yet: closing the writer must end that transaction, or every
    later record of its partitions (a node's custom events too) stays unreadable for
    read_committed readers until Kafka aborts it after the transaction timeout."""
    topic = f"rt.txn.{uuid.uuid4().hex[:8]}"
    pub = await _publisher(kafka_broker.bootstrap, topic, 1)
    writer = TransactionalWriter(pub, f"{topic}.ingest", lambda exc: None)
    await writer.start()
    node = await _publisher(kafka_broker.bootstrap, topic, 1)  # a gateway node's publisher
    hold = asyncio.Event()
    try:
        # the process is stopped between the send and the commit
        pending = await _held_in_transaction(writer, hold)
        await writer.close()
        assert pending.done() and pending.exception() is not None
        await node.send("w1", encode_event(_event("w1", 3)))  # a custom event after the stop
        # Within 10 s, well before Kafka would abort the transaction itself (its timeout is
        # 15 s): 3 readable by then is the writer's doing.
        ns = await _read_committed(kafka_broker.bootstrap, topic, lambda ns: 3 in ns, timeout=10)
        assert ns == [1, 3], f"read_committed reader got {ns} within 10 s (2 aborted, 3 readable)"
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
    pub = await _publisher(kafka_broker.bootstrap, topic, 1)
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
    pub = await _publisher(kafka_broker.proxied_bootstrap, topic, 1)
    failures: list[BaseException] = []
    writer = TransactionalWriter(pub, f"{topic}.ingest", failures.append)
    await writer.start()
    hold = asyncio.Event()
    try:
        pending = await _held_in_transaction(writer, hold)
        proxy.paused = True
        # The broker looks for timed-out transactions every second (tests/harness/kafka.py;
        # 10 s by default): wait until it has aborted this one, then read what is committed.
        ns = await _committed_once_aborted(kafka_broker.bootstrap, topic, timeout=15)
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
    pub = await _publisher(kafka_broker.bootstrap, topic, 1)
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
