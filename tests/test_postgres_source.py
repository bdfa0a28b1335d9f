"""PostgresSource against the real PostgreSQL of the harness, with a collecting EventSink."""

from __future__ import annotations

import asyncio
import base64
import json

import asyncpg
import pytest

from rtserver.sources.base import ChannelUnavailable
from rtserver.sources.postgres import PostgresSource

pytestmark = pytest.mark.postgres


class CollectingSink:
    """A real EventSink: numbers events like the history does and keeps them in a list."""

    def __init__(self) -> None:
        self.events = []
        self.gaps = []
        self._changed = asyncio.Event()

    async def publish(self, event) -> int:
        self.events.append(event)
        self._changed.set()
        return len(self.events)

    def history_gap(self, workspace: str, source: str, reason: str) -> None:
        self.gaps.append((workspace, source, reason))
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 15.0) -> list:
        async def loop():
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)
        return self.events

    def bodies(self) -> list[dict]:
        return [json.loads(e.body) for e in self.events]


@pytest.fixture
async def make_source(pg_database, tmp_path):
    started = []

    async def make(sink=None, workspaces=("w1",), **kw):
        sink = sink or CollectingSink()
        src = PostgresSource(
            pg_database, schemas=kw.pop("schemas", ["public"]), instance=kw.pop("instance", "rttest"),
            state_dir=str(tmp_path / "state"), sink=sink, workspaces=lambda: list(workspaces),
            maintenance_interval=0.3, **kw,
        )
        await src.start()
        await src.wait_streaming()
        started.append(src)
        return src, sink

    yield make
    for src in started:
        await src.stop()


@pytest.fixture
async def db(pg_database):
    conn = await asyncpg.connect(pg_database)
    yield conn
    await conn.close()


async def test_insert_update_delete_truncate(db, make_source):
    await db.execute("CREATE TABLE products (id int PRIMARY KEY, name text, price numeric(10,2))")
    src, sink = await make_source()
    assert src.ready()
    await db.execute("INSERT INTO products VALUES (1, 'a', 29.99)")
    await db.execute("UPDATE products SET price = 99.99 WHERE id = 1")
    await db.execute("DELETE FROM products WHERE id = 1")
    await db.execute("TRUNCATE products")
    events = await sink.wait_for(4)
    assert [e.operation for e in events] == ["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
    assert all(e.workspace == "w1" and e.source == "postgres" and e.entity == "products" for e in events)
    bodies = sink.bodies()
    assert bodies[0]["type"] == "event" and bodies[0]["channel"] == "postgres:products"
    assert bodies[0]["record"] == {"id": 1, "name": "a", "price": 29.99}
    assert bodies[0]["table"] == "products" and bodies[0]["schema"] == "public"
    assert bodies[0]["timestamp"].endswith("Z") and "seq" not in bodies[0]
    assert bodies[1]["record"]["price"] == 99.99
    # REPLICA IDENTITY DEFAULT: no old row; the key is the delete's record
    assert "oldRecord" not in bodies[1] and bodies[1]["changedColumns"] == []
    assert bodies[2]["record"] == {"id": 1}
    assert bodies[3]["record"] is None
    # one correlation id per transaction, stable form
    assert bodies[0]["correlationId"].startswith("pg-") and bodies[0]["correlationId"] != bodies[1]["correlationId"]


async def test_replica_identity_full_old_record_and_changed_columns(db, make_source):
    await db.execute("CREATE TABLE p (id int PRIMARY KEY, name text, price float8); ALTER TABLE p REPLICA IDENTITY FULL")
    src, sink = await make_source()
    await db.execute("INSERT INTO p VALUES (1, 'a', 79.99)")
    await db.execute("UPDATE p SET price = 99.99 WHERE id = 1")
    await db.execute("DELETE FROM p")
    await sink.wait_for(3)
    b = sink.bodies()
    assert b[1]["oldRecord"] == {"id": 1, "name": "a", "price": 79.99}
    assert b[1]["changedColumns"] == ["price"]
    assert sink.events[1].old_record == {"id": 1, "name": "a", "price": 79.99}
    assert b[2]["record"] == {"id": 1, "name": "a", "price": 99.99}


async def test_types_round_trip(db, make_source):
    await db.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
    await db.execute(
        """CREATE TABLE t (id int8 PRIMARY KEY, i2 int2, i4 int4, n numeric, nf numeric(8,3), f4 float4, f8 float8,
           b bool, tx text, vc varchar(5), bc char(3), u uuid, j json, jb jsonb, d date, tm time,
           ts timestamp, tz timestamptz, by bytea, ai int4[], at text[], an int4[][], m mood, am mood[],
           iv interval, nul text)"""
    )
    src, sink = await make_source()
    await db.execute(
        """INSERT INTO t VALUES (9007199254740993, -3, 7, 12345678901234, 1.5, 0.5, 2.25, true, 'hé "q"', 'vc',
           'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, {"b": null}]}', '{"k": "v"}', '2024-01-15',
           '10:00:01.25', '2024-01-15 10:00:00.123', '2024-01-15 12:00:00.5+02', '\\x00ff10',
           '{1,NULL,3}', '{"a b","c\\"d",NULL,"NULL"}', '{{1,2},{3,4}}', 'happy', '{sad,happy}', '1 day', NULL)"""
    )
    (event,) = await sink.wait_for(1)
    r = json.loads(event.body)["record"]
    assert r == {
        "id": 9007199254740993, "i2": -3, "i4": 7, "n": 12345678901234, "nf": 1.5, "f4": 0.5, "f8": 2.25,
        "b": True, "tx": 'hé "q"', "vc": "vc", "bc": "ab ", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "j": {"a": [1, {"b": None}]}, "jb": {"k": "v"}, "d": "2024-01-15", "tm": "10:00:01.25",
        "ts": "2024-01-15T10:00:00.123", "tz": "2024-01-15T10:00:00.5Z",
        "by": base64.b64encode(b"\x00\xff\x10").decode(), "ai": [1, None, 3], "at": ["a b", 'c"d', None, "NULL"],
        "an": [[1, 2], [3, 4]], "m": "happy", "am": ["sad", "happy"], "iv": "1 day", "nul": None,
    }


async def test_toast_unchanged_filled(db, make_source):
    await db.execute("CREATE TABLE docs (id int PRIMARY KEY, n int, big text); ALTER TABLE docs ALTER big SET STORAGE EXTERNAL")
    await db.execute("CREATE TABLE docsf (id int PRIMARY KEY, n int, big text); ALTER TABLE docsf REPLICA IDENTITY FULL")
    src, sink = await make_source()
    big = "".join(f"{i:06d}" for i in range(3000))  # 18 KB, incompressible enough to be TOASTed
    for t in ("docs", "docsf"):
        await db.execute(f"INSERT INTO {t} VALUES (1, 0, $1)", big)
        await db.execute(f"UPDATE {t} SET n = 1 WHERE id = 1")
    events = await sink.wait_for(4)
    updates = [json.loads(e.body) for e in events if e.operation == "UPDATE"]
    assert len(updates) == 2
    for u in updates:
        assert u["record"]["big"] == big and u["record"]["n"] == 1
    assert updates[1]["changedColumns"] == ["n"]


async def test_table_without_primary_key(db, make_source):
    await db.execute("CREATE TABLE logs (msg text, n int); ALTER TABLE logs REPLICA IDENTITY FULL")
    await db.execute("CREATE TABLE nokey (msg text)")  # left out: publishing it would break writers' UPDATEs
    src, sink = await make_source()
    await db.execute("INSERT INTO logs VALUES ('x', 1)")
    await db.execute("UPDATE logs SET n = 2")
    await db.execute("DELETE FROM logs")
    await db.execute("UPDATE nokey SET msg = 'still writable'")
    await sink.wait_for(3)
    assert [e.operation for e in sink.events] == ["INSERT", "UPDATE", "DELETE"]
    assert json.loads(sink.events[2].body)["record"] == {"msg": "x", "n": 2}
    with pytest.raises(ChannelUnavailable, match="primary key"):
        await src.check_channel("w1", "nokey")


async def test_two_schemas_same_table_and_check_channel(db, make_source):
    await db.execute("CREATE SCHEMA sales; CREATE TABLE orders (id int PRIMARY KEY); CREATE TABLE sales.orders (id int PRIMARY KEY)")
    await db.execute("CREATE SCHEMA other; CREATE TABLE other.hidden (id int PRIMARY KEY)")
    src, sink = await make_source(schemas=["public", "sales"], workspaces=("w1", "w2"))
    assert await src.check_channel("w1", "orders") == "orders"
    assert await src.check_channel("w1", "public.orders") == "orders"
    assert await src.check_channel("w1", "sales.orders") == "sales.orders"
    for bad in ("nosuch", "other.hidden", "bad name!"):
        with pytest.raises(ChannelUnavailable):
            await src.check_channel("w1", bad)
    await db.execute("INSERT INTO orders VALUES (1); INSERT INTO sales.orders VALUES (2)")
    events = await sink.wait_for(4)
    assert [(e.workspace, e.entity) for e in events] == [
        ("w1", "orders"), ("w2", "orders"), ("w1", "sales.orders"), ("w2", "sales.orders")]
    assert events[0].body is events[1].body  # encoded once, shared by the workspaces
    assert json.loads(events[2].body)["channel"] == "postgres:sales.orders"
    # a table created while streaming is published and delivered without restart
    await db.execute("CREATE TABLE newt (id int PRIMARY KEY)")
    assert await src.check_channel("w1", "newt") == "newt"
    await db.execute("INSERT INTO newt VALUES (5)")
    events = await sink.wait_for(6)
    assert events[-1].entity == "newt" and events[-1].record == {"id": 5}


async def test_correlation_message(db, make_source):
    await db.execute("CREATE TABLE c (id int PRIMARY KEY)")
    src, sink = await make_source()
    async with db.transaction():
        await db.execute("SELECT pg_logical_emit_message(true, 'rt.correlation', 'corr-abc-123')")
        await db.execute("INSERT INTO c VALUES (1), (2)")
    await db.execute("INSERT INTO c VALUES (3)")
    events = await sink.wait_for(3)
    ids = [json.loads(e.body)["correlationId"] for e in events]
    assert ids[:2] == ["corr-abc-123", "corr-abc-123"] and ids[2] != "corr-abc-123"


async def test_large_transaction(db, make_source):
    await db.execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
    src, sink = await make_source()
    await db.execute("INSERT INTO big SELECT g, 'v' || g FROM generate_series(1, 100000) g")
    events = await sink.wait_for(100000, timeout=90)
    assert len(events) == 100000
    assert [e.record["id"] for e in events[:3]] == [1, 2, 3] and events[-1].record["id"] == 100000


async def test_alter_table_while_streaming(db, make_source):
    await db.execute("CREATE TABLE a (id int PRIMARY KEY, x int)")
    src, sink = await make_source()
    await db.execute("INSERT INTO a VALUES (1, 1)")
    await sink.wait_for(1)
    await db.execute("ALTER TABLE a ADD COLUMN note text")
    await db.execute("INSERT INTO a VALUES (2, 2, 'n')")
    await db.execute("ALTER TABLE a DROP COLUMN x")
    await db.execute("INSERT INTO a VALUES (3, 'm')")
    events = await sink.wait_for(3)
    assert [e.record for e in events] == [{"id": 1, "x": 1}, {"id": 2, "x": 2, "note": "n"}, {"id": 3, "note": "m"}]


async def test_restart_source_nothing_lost_nothing_duplicated(db, make_source, pg_database, tmp_path):
    await db.execute("CREATE TABLE r (id int PRIMARY KEY)")
    sink = CollectingSink()
    src, _ = await make_source(sink=sink)
    await db.execute("INSERT INTO r SELECT generate_series(1, 50)")
    await sink.wait_for(50)
    await src.stop()
    # committed while the source is down
    for i in range(51, 61):
        await db.execute("INSERT INTO r VALUES ($1)", i)
    src2, _ = await make_source(sink=sink)
    await db.execute("INSERT INTO r VALUES (61)")
    await sink.wait_for(61)
    await asyncio.sleep(0.5)
    ids = [e.record["id"] for e in sink.events]
    assert ids == list(range(1, 62))


async def test_crash_without_ack_drops_redelivered_duplicates(db, make_source):
    """A source killed before it acknowledged gets the transactions again and drops them."""
    await db.execute("CREATE TABLE k (id int PRIMARY KEY)")
    sink = CollectingSink()
    src, _ = await make_source(sink=sink)
    src._acked_lsn = 0  # noqa: SLF001 - simulate a crash: nothing acknowledged upstream
    await db.execute("INSERT INTO k VALUES (1)")
    await sink.wait_for(1)
    task = src._task  # noqa: SLF001
    src._acked_lsn = 0  # noqa: SLF001
    src._stopping = True  # noqa: SLF001
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    src2, _ = await make_source(sink=sink)
    await db.execute("INSERT INTO k VALUES (2)")
    await sink.wait_for(2)
    await asyncio.sleep(0.3)
    assert [e.record["id"] for e in sink.events] == [1, 2]


async def test_postgres_restart_under_source(db, make_source, pg_cluster, pg_database):
    await db.execute("CREATE TABLE rs (id int PRIMARY KEY)")
    src, sink = await make_source()
    await db.execute("INSERT INTO rs VALUES (1)")
    await sink.wait_for(1)
    await asyncio.get_running_loop().run_in_executor(None, pg_cluster.restart)
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute("INSERT INTO rs VALUES (2)")
        events = await sink.wait_for(2, timeout=30)
    finally:
        await conn.close()
    assert [e.record["id"] for e in events] == [1, 2]
    for _ in range(100):
        if src.ready():
            break
        await asyncio.sleep(0.1)
    assert src.ready()
    st = src.status()
    assert st["wal_status"] in ("reserved", "extended") and st["slot"]


async def test_lost_slot_is_recreated_with_history_gap(db, make_source, pg_database):
    await db.execute("CREATE TABLE ls (id int PRIMARY KEY)")
    src, sink = await make_source()
    await db.execute("INSERT INTO ls VALUES (1)")
    await sink.wait_for(1)
    admin = await asyncpg.connect(pg_database)
    try:
        for _ in range(50):
            rows = await admin.fetch("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", src.slot)
            if rows and rows[0]["active_pid"]:
                await admin.execute("SELECT pg_terminate_backend($1)", rows[0]["active_pid"])
            try:
                await admin.execute("SELECT pg_drop_replication_slot($1)", src.slot)
                break
            except asyncpg.ObjectInUseError:
                await asyncio.sleep(0.05)
    finally:
        await admin.close()
    for _ in range(150):
        if sink.gaps and src.ready():
            break
        await asyncio.sleep(0.1)
    assert sink.gaps and sink.gaps[0][:2] == ("w1", "postgres")
    assert src.status()["slot_recreations"] >= 1
    await db.execute("INSERT INTO ls VALUES (2)")
    events = await sink.wait_for(2)
    assert events[-1].record == {"id": 2}
