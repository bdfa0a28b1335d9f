"""PostgresSource with protocol 2 streaming of large in-progress transactions, against the real
PostgreSQL of the harness: the test database gets logical_decoding_work_mem = 64kB, so a few
thousand rows make the server stream a transaction before it commits."""

from __future__ import annotations

import asyncio
import json
import os

import asyncpg
import pytest

from rtserver.sources.postgres import PostgresSource
from tests.test_postgres_source import CollectingSink

pytestmark = pytest.mark.postgres

ROWS = 6000  # ~ 0.5 MB of reorder buffer: streamed in several segments at 64kB


@pytest.fixture
async def db(pg_database):
    conn = await asyncpg.connect(pg_database)
    # walsenders of this database stream any transaction beyond 64kB of decoded changes
    name = pg_database.rsplit("/", 1)[1]
    await conn.execute(f"ALTER DATABASE \"{name}\" SET logical_decoding_work_mem = '64kB'")
    yield conn
    await conn.close()


@pytest.fixture
async def make_source(pg_database, tmp_path):
    started = []

    async def make(sink=None, **kw):
        sink = sink or CollectingSink()
        src = PostgresSource(
            pg_database, instance=kw.pop("instance", "rtstream"), state_dir=str(tmp_path / "state"), sink=sink,
            workspaces=lambda: ["w1"], maintenance_interval=0.3, **kw,
        )
        await src.start()
        await src.wait_streaming()
        started.append(src)
        return src, sink

    yield make
    for src in started:
        await src.stop()


async def connect(pg_database) -> asyncpg.Connection:
    return await asyncpg.connect(pg_database)


async def until(predicate, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def spill_files(src: PostgresSource) -> list[str]:
    path = os.path.join(src.state_dir, f"postgres-{src.position_name}.streamed")
    return os.listdir(path) if os.path.isdir(path) else []


async def test_protocol_2_negotiated(db, make_source):
    src, _ = await make_source()
    assert src.status()["proto_version"] == 2  # the harness runs PostgreSQL 15
    src2, _ = await make_source(streaming=False, instance="rtstream_off")
    assert src2.status()["proto_version"] == 1


@pytest.mark.parametrize("memory", [32 << 20, 16 << 10], ids=["in-memory", "spilled"])
async def test_large_streamed_transaction_complete_in_commit_order(db, make_source, pg_database, memory):
    await db.execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
    src, sink = await make_source(stream_memory_bytes=memory)
    other = await connect(pg_database)
    try:
        tr = db.transaction()
        await tr.start()
        await db.execute(f"INSERT INTO big SELECT g, 'v' || g FROM generate_series(1, {ROWS}) g")
        await until(lambda: src.status()["streamed_open"] == 1)  # streaming started before commit
        if memory < 1 << 20:
            await until(lambda: src.status()["streamed_spill_files"] == 1)
            assert len(spill_files(src)) == 1
        # a small transaction committing meanwhile is delivered first: commit order
        await other.execute("INSERT INTO big VALUES (0, 'small')")
        await sink.wait_for(1)
        await db.execute(f"UPDATE big SET v = 'u' || id WHERE id BETWEEN 1 AND {ROWS // 2}")
        await db.execute("DELETE FROM big WHERE id = 1")
        await asyncio.sleep(0.2)
        assert len(sink.events) == 1  # never an uncommitted row
        await tr.commit()
    finally:
        await other.close()
    total = 1 + ROWS + ROWS // 2 + 1
    events = await sink.wait_for(total)
    await asyncio.sleep(0.2)
    assert len(sink.events) == total
    assert events[0].record == {"id": 0, "v": "small"}
    assert [(e.operation, e.record["id"]) for e in events[1:ROWS + 1]] == [("INSERT", i) for i in range(1, ROWS + 1)]
    assert [(e.operation, e.record) for e in events[ROWS + 1:-1]] == [
        ("UPDATE", {"id": i, "v": f"u{i}"}) for i in range(1, ROWS // 2 + 1)]
    assert (events[-1].operation, events[-1].record) == ("DELETE", {"id": 1})
    correlations = {json.loads(e.body)["correlationId"] for e in events[1:]}
    assert len(correlations) == 1  # one transaction, one correlation id
    st = src.status()
    assert st["streamed_transactions"] == 1 and st["streamed_open"] == 0 and st["streamed_memory_bytes"] == 0
    # Gauges of what is on disk: they stayed at the counts since start after the files went.
    assert (st["streamed_spill_files"], st["streamed_spill_bytes"]) == (0, 0), st
    assert spill_files(src) == []


async def test_streamed_transaction_rolled_back_delivers_nothing(db, make_source):
    await db.execute("CREATE TABLE rb (id int PRIMARY KEY)")
    src, sink = await make_source(stream_memory_bytes=16 << 10)
    tr = db.transaction()
    await tr.start()
    await db.execute(f"INSERT INTO rb SELECT generate_series(1, {ROWS})")
    await until(lambda: src.status()["streamed_open"] == 1)
    await tr.rollback()
    await db.execute("INSERT INTO rb VALUES (-1)")
    events = await sink.wait_for(1)
    await asyncio.sleep(0.2)
    assert [e.record for e in sink.events] == [{"id": -1}]
    assert events[0].record == {"id": -1}
    st = src.status()
    assert st["streamed_aborted"] == 1 and st["streamed_open"] == 0 and st["streamed_transactions"] == 0
    assert spill_files(src) == []


@pytest.mark.parametrize("memory", [32 << 20, 16 << 10], ids=["in-memory", "spilled"])
async def test_rolled_back_subtransactions_dropped(db, make_source, memory):
    await db.execute("CREATE TABLE sx (id int PRIMARY KEY, v text)")
    src, sink = await make_source(stream_memory_bytes=memory)
    n = 2000
    async with db.transaction():
        await db.execute(f"INSERT INTO sx SELECT g, 'keep' FROM generate_series(1, {n}) g")
        await db.execute("SAVEPOINT a")
        await db.execute(f"INSERT INTO sx SELECT g, 'drop' FROM generate_series({n + 1}, {2 * n}) g")
        await until(lambda: src.status()["streamed_open"] == 1)
        await db.execute("ROLLBACK TO SAVEPOINT a")
        # nested: b released into c, c rolled back: both go
        await db.execute("SAVEPOINT c")
        await db.execute(f"INSERT INTO sx SELECT g, 'drop' FROM generate_series({2 * n + 1}, {3 * n}) g")
        await db.execute("SAVEPOINT b")
        await db.execute(f"UPDATE sx SET v = 'drop' WHERE id <= {n}")
        await db.execute("RELEASE SAVEPOINT b")
        await db.execute("ROLLBACK TO SAVEPOINT c")
        # a committed subtransaction is kept
        await db.execute("SAVEPOINT d")
        await db.execute(f"INSERT INTO sx SELECT g, 'kept-sub' FROM generate_series({3 * n + 1}, {4 * n}) g")
        await db.execute("RELEASE SAVEPOINT d")
        await db.execute(f"INSERT INTO sx VALUES ({4 * n + 1}, 'last')")
    expected = [(i, "keep") for i in range(1, n + 1)] + [(i, "kept-sub") for i in range(3 * n + 1, 4 * n + 1)]
    expected.append((4 * n + 1, "last"))
    await sink.wait_for(len(expected))
    await db.execute("INSERT INTO sx VALUES (-1, 'marker')")
    events = await sink.wait_for(len(expected) + 1)
    assert [(e.operation, e.record["id"], e.record["v"]) for e in events[:-1]] == [("INSERT", *x) for x in expected]
    assert events[-1].record["id"] == -1
    st = src.status()
    # the server had streamed the rolled-back rows: a and c (and b, whose rows went with c)
    assert st["streamed_transactions"] == 1 and st["streamed_subtransactions_aborted"] >= 2
    assert spill_files(src) == []


async def test_two_interleaved_streamed_transactions(db, make_source, pg_database):
    await db.execute("CREATE TABLE il (id int PRIMARY KEY, who text)")
    src, sink = await make_source(stream_memory_bytes=64 << 10)
    a, b = await connect(pg_database), await connect(pg_database)
    try:
        ta, tb = a.transaction(), b.transaction()
        await ta.start()
        await tb.start()
        step = 1000
        for k in range(4):  # alternate batches: the server streams both, segment by segment
            await a.execute(f"INSERT INTO il SELECT g, 'a' FROM generate_series({k * step + 1}, {(k + 1) * step}) g")
            await b.execute(
                f"INSERT INTO il SELECT g, 'b' FROM generate_series({100000 + k * step + 1}, {100000 + (k + 1) * step}) g")
        await until(lambda: src.status()["streamed_open"] == 2)
        await tb.commit()  # b commits first, so b's rows come first
        await ta.commit()
    finally:
        await a.close()
        await b.close()
    events = await sink.wait_for(8 * step)
    await asyncio.sleep(0.2)
    assert len(sink.events) == 8 * step
    assert [e.record["id"] for e in events[:4 * step]] == list(range(100001, 100001 + 4 * step))
    assert [e.record["id"] for e in events[4 * step:]] == list(range(1, 4 * step + 1))
    assert {e.record["who"] for e in events[:4 * step]} == {"b"}
    st = src.status()
    assert st["streamed_transactions"] == 2 and st["streamed_open"] == 0
    assert spill_files(src) == []


async def test_restart_mid_stream_delivered_once(db, make_source, pg_database):
    await db.execute("CREATE TABLE rs (id int PRIMARY KEY)")
    sink = CollectingSink()
    src, _ = await make_source(sink=sink, stream_memory_bytes=16 << 10)
    await db.execute("INSERT INTO rs VALUES (0)")
    await sink.wait_for(1)
    tr = db.transaction()
    await tr.start()
    await db.execute(f"INSERT INTO rs SELECT generate_series(1, {ROWS})")
    await until(lambda: src.status()["streamed_open"] == 1 and src.status()["streamed_spill_files"] == 1)
    await src.stop()  # mid-stream: the buffered part (and its spill file) goes
    assert spill_files(src) == []
    await db.execute(f"INSERT INTO rs SELECT generate_series({ROWS + 1}, {2 * ROWS})")
    await tr.commit()
    src2, _ = await make_source(sink=sink, stream_memory_bytes=16 << 10)
    await db.execute("INSERT INTO rs VALUES (-1)")
    events = await sink.wait_for(2 * ROWS + 2, timeout=30)
    await asyncio.sleep(0.3)
    ids = [e.record["id"] for e in sink.events]
    assert ids == [0, *range(1, 2 * ROWS + 1), -1]
    assert len(events) == 2 * ROWS + 2
    # and once more: a restart after it was delivered does not repeat it
    await src2.stop()
    src3, _ = await make_source(sink=sink)
    await db.execute("INSERT INTO rs VALUES (-2)")
    await sink.wait_for(2 * ROWS + 3)
    await asyncio.sleep(0.3)
    assert [e.record["id"] for e in sink.events[-2:]] == [-1, -2] and len(sink.events) == 2 * ROWS + 3


async def test_databases_named_alike_on_two_servers_spill_apart(db, make_source, pg_database, tmp_path):
    """Two sources of one state directory read databases of one name on two servers: their
    slots are named alike, and the spill directory was named by the slot alone. Transactions of
    the same xid on both servers spilled to the same file (`xid-<xid>-1.spill`, truncated by
    the second and appended to by both): each workspace got rows of the other server's
    transaction. Each source spills under its own name (slot, server and database)."""
    from tests.harness.fixtures_postgres import create_database
    from tests.harness.pgcluster import PgCluster

    other = PgCluster()
    other.init()
    other.start()
    conns: list[asyncpg.Connection] = []
    try:
        name = pg_database.rsplit("/", 1)[1]
        db_b = await asyncpg.connect(create_database(other, name))
        conns.append(db_b)
        await db_b.execute(f"ALTER DATABASE \"{name}\" SET logical_decoding_work_mem = '64kB'")
        await db_b.close()
        db_b = await asyncpg.connect(other.dsn_for(name))
        conns.append(db_b)
        for conn in (db, db_b):
            await conn.execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
        src_a, sink_a = await make_source(stream_memory_bytes=16 << 10)
        sink_b = CollectingSink()
        src_b = PostgresSource(other.dsn_for(name), instance="rtstream", state_dir=src_a.state_dir, sink=sink_b,
                               workspaces=lambda: ["w1"], maintenance_interval=0.3, stream_memory_bytes=16 << 10,
                               other_urls=[pg_database])
        await src_b.start()
        try:
            await src_b.wait_streaming()
            assert src_b.slot == src_a.slot
            for _ in range(5):  # the same xid on both servers
                ahead = 1 + max([await conn.fetchval("SELECT txid_current()") for conn in (db, db_b)])
                for conn in (db, db_b):
                    while await conn.fetchval("SELECT txid_current()") < ahead:
                        pass
                trs = [conn.transaction() for conn in (db, db_b)]
                for tr in trs:
                    await tr.start()
                xids = {await conn.fetchval("SELECT txid_current()") for conn in (db, db_b)}
                if len(xids) == 1:
                    break
                for tr in trs:
                    await tr.rollback()
            assert len(xids) == 1
            for conn, tag in ((db, "a"), (db_b, "b")):
                await conn.execute(f"INSERT INTO big SELECT g, '{tag}' || g FROM generate_series(1, {ROWS}) g")
            await until(lambda: src_a.status()["streamed_spill_files"] == 1 and src_b.status()["streamed_spill_files"] == 1)
            for tr in trs:
                await tr.commit()
            for sink, tag in ((sink_a, "a"), (sink_b, "b")):
                events = await sink.wait_for(ROWS)
                assert [e.record for e in events] == [{"id": i, "v": f"{tag}{i}"} for i in range(1, ROWS + 1)]
        finally:
            await src_b.stop()
    finally:
        for conn in conns:
            await conn.close()
        other.destroy()


async def test_an_earlier_versions_spill_files_are_removed(pg_database, make_source, tmp_path):
    """Versions before 30 Nov 2026 spilled large streamed transactions into
    `postgres-<slot>.streamed` (this one into `postgres-<slot>-<hash>.streamed`, named as its
    position file). One killed mid-transaction left its spill files there, up to the size of
    that transaction, and after the upgrade no source ever removed them: the disk space was
    lost for good. The source that takes that slot's position over removes them."""
    from rtserver.sources.pg_catalog import slot_name

    database = pg_database.rsplit("/", 1)[1].split("?", 1)[0]
    earlier = tmp_path / "state" / f"postgres-{slot_name('rtstream', database)}.streamed"
    earlier.mkdir(parents=True)
    (earlier / "xid-812-1.spill").write_bytes(b"\0" * 4096)  # what a killed process left
    src, _ = await make_source()
    assert src.position_name != src.slot
    assert not earlier.exists()
