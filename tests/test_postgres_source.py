"""PostgresSource against the real PostgreSQL of the harness, with a collecting EventSink."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import urllib.parse

import asyncpg
import psycopg
import pytest

from rtserver.bus_kafka import RemoteSource
from rtserver.sources import postgres as postgres_source
from rtserver.sources.base import ChannelUnavailable
from rtserver.sources.pg_catalog import SetupError, check_version, slot_name
from rtserver.sources.pg_state import PositionFile
from rtserver.sources.postgres import PostgresSource
from tests.harness.fixtures_postgres import drop_database

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
            kw.pop("dsn", pg_database), schemas=kw.pop("schemas", ["public"]), instance=kw.pop("instance", "rttest"),
            state_dir=str(tmp_path / "state"), sink=sink, workspaces=lambda: list(workspaces),
            maintenance_interval=kw.pop("maintenance_interval", 0.3), **kw,
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


def test_slot_names_follow_docs_postgres_md():
    """docs/postgres.md, Names: <instance>_<database>; another database name is lower-cased,
    its other characters made _, 8 hex digits of its hash appended, within 63 characters."""
    assert slot_name("rtserver", "app") == "rtserver_app"
    named = slot_name("rtserver", "My-App")
    assert named.startswith("rtserver_my_app_") and len(named) == len("rtserver_my_app_") + 8
    assert slot_name("rtserver", "my_app") != named  # not the slot of another database
    long = slot_name("rtserver", "d" * 80)
    assert len(long) <= 63 and long.startswith("rtserver_ddd")


def test_a_server_older_than_14_is_refused_with_its_version():
    # No PostgreSQL 13 can be installed here: the check the set-up runs on server_version_num
    # is tried alone (a real 15 passes it in every other test of this file).
    with pytest.raises(SetupError, match=r"PostgreSQL 13\.16 \(Debian 13\.16-1\) is too old: .* 14 or later"):
        check_version(130016, "13.16 (Debian 13.16-1)")
    check_version(140000, "14.0")
    check_version(180001, "18.1")


async def test_a_subscribe_to_what_cannot_stream_says_why(db, make_source, pg_database):
    """A view (materialized or not) or a foreign table has no changes to stream, and a table
    outside postgres.schemas is not read: each gets a 4010 saying so, here and on a Kafka-bus
    node (which accepted all of them, to wait for ever), and so do the tables the publication
    leaves out; before, a view got 'table is not published (schemas ['public'])'."""
    await db.execute("CREATE TABLE base (id int PRIMARY KEY); CREATE VIEW v AS SELECT * FROM base; "
                     "CREATE MATERIALIZED VIEW mv AS SELECT * FROM base; "
                     "CREATE SCHEMA other; CREATE TABLE other.hidden (id int PRIMARY KEY); "
                     "CREATE TABLE nokey (v text); "
                     "CREATE TABLE parted (id int, PRIMARY KEY (id)) PARTITION BY RANGE (id); "
                     "CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100)")
    src, _ = await make_source()
    node = RemoteSource("postgres", pg_database, ["public"], [])
    try:
        for source in (src, node):
            assert await source.check_channel("w1", "base") == "base"
            for entity, why in (("v", "it is a view: PostgreSQL streams the changes of tables only"),
                                ("mv", "it is a materialized view: PostgreSQL streams"),
                                ("nosuch", "table does not exist"),
                                ("other.hidden", r"its schema other is not among postgres.schemas \(public\)"),
                                # what the publication leaves out: a single gateway and a node alike
                                ("nokey", "table is not published: it has no primary key"),
                                ("parted_1", "table is not published: it is a partition of parted")):
                with pytest.raises(ChannelUnavailable, match=f"postgres:{entity}: .*{why}"):
                    await source.check_channel("w1", entity)
    finally:
        await node.stop()


async def test_a_name_outside_the_configuration_gets_one_answer_whether_it_exists_or_not(db, make_source,
                                                                                         pg_database):
    """A subscribe to a table outside postgres.schemas / postgres.tables was looked up first:
    "table does not exist" for a name that is none, "its schema ... is not among
    postgres.schemas" for one that is, so any client of the workspace could list the tables,
    views and schemas of a database beyond what the gateway is configured to publish (another
    application's schema, pg_catalog's tables) by the 4010 messages. Such a name now gets one
    answer, without a query, on a single gateway and on a Kafka-bus node alike."""
    await db.execute("CREATE SCHEMA other; CREATE TABLE other.hidden (id int PRIMARY KEY); "
                     "CREATE VIEW other.v AS SELECT 1 AS one")
    src, _ = await make_source()
    node = RemoteSource("postgres", pg_database, ["public"], [])
    try:
        for source in (src, node):
            answers = {}
            for entity in ("other.hidden", "other.v", "other.nosuch"):
                with pytest.raises(ChannelUnavailable) as refused:
                    await source.check_channel("w1", entity)
                answers[entity] = str(refused.value).removeprefix(f"postgres:{entity}: ")
            (answer,) = set(answers.values())  # one answer for all three
            assert answer.endswith("its schema other is not among postgres.schemas (public)"), answers
            for entity in ("pg_catalog.pg_authid", "pg_catalog.nosuch"):
                with pytest.raises(ChannelUnavailable, match=f"postgres:{entity}: .*its schema pg_catalog is not among"):
                    await source.check_channel("w1", entity)
    finally:
        await node.stop()


async def test_the_catalog_session_does_not_jit_compile_its_queries(db, make_source):
    """PostgreSQL JIT-compiles a query estimated above jit_above_cost, and the catalog's query
    of the configured tables (desired_tables) passes it in a database of a few hundred tables:
    ~340 ms of compilation for ~1 ms of work (measured, 200 tables). The maintenance sync ran it
    every 2 s holding the catalog connection (unchanged TOAST values wait on it), and any client
    could have it run back to back: a subscribe to a table the publication leaves out (no
    primary key) syncs the publication again. The catalog's session runs without JIT."""
    await db.execute("CREATE TABLE nokey (v text)")
    src, _ = await make_source(maintenance_interval=3600)
    assert src.catalog is not None
    (row,) = await src.catalog.fetch("SELECT current_setting('jit') AS jit")
    assert row["jit"] == "off"
    with pytest.raises(ChannelUnavailable, match="no primary key"):
        await src.check_channel("w1", "nokey")


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


async def test_a_url_with_parameters_only_libpq_reads_streams(db, make_source, pg_database):
    """libpq parameters a client alone reads (connect_timeout, keepalives_idle, client_encoding)
    passed the configuration check, then the catalog connection (asyncpg) sent them to the
    server as settings: 'unrecognized configuration parameter "connect_timeout"' at every
    attempt, the source never started. And a host without its port in a list (h1,h2:port: the
    default port for h1, which libpq reads as the port ",port") failed asyncpg's int("").
    Both stream now (h1 on 5432 refuses; both drivers go on to h2)."""
    from rtserver.config import _check_postgres_url

    parts = urllib.parse.urlsplit(pg_database)
    url = (f"postgresql://{parts.username}@{parts.hostname},{parts.hostname}:{parts.port}{parts.path}"
           "?connect_timeout=10&keepalives_idle=30&client_encoding=LATIN1&fallback_application_name=x")
    _check_postgres_url("postgres.url", url)  # accepted, as before
    await db.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    src, sink = await make_source(dsn=url)
    await db.execute("INSERT INTO t VALUES (1, 'é')")
    events = await sink.wait_for(1)
    assert json.loads(events[0].body)["record"] == {"id": 1, "v": "é"}
    assert src.ready()


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


async def test_generated_columns_are_absent_from_record_and_old_record(db, make_source):
    """docs/postgres.md: PostgreSQL before 18 does not send stored generated columns, and the
    gateway does not fetch them: absent from record and oldRecord (not null)."""
    if int(await db.fetchval("SHOW server_version_num")) >= 180000:
        pytest.skip("PostgreSQL 18 can send generated columns")
    await db.execute("CREATE TABLE gen (id int PRIMARY KEY, n int, twice int GENERATED ALWAYS AS (n * 2) STORED); "
                     "ALTER TABLE gen REPLICA IDENTITY FULL")
    src, sink = await make_source()
    await db.execute("INSERT INTO gen (id, n) VALUES (1, 1)")
    await db.execute("UPDATE gen SET n = 2 WHERE id = 1")
    events = await sink.wait_for(2)
    bodies = [json.loads(e.body) for e in events]
    assert [b["record"] for b in bodies] == [{"id": 1, "n": 1}, {"id": 1, "n": 2}]
    assert bodies[1]["oldRecord"] == {"id": 1, "n": 1} and bodies[1]["changedColumns"] == ["n"]


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


async def test_tables_without_a_usable_replica_identity_are_left_out_with_the_reason(db, make_source):
    """REPLICA IDENTITY USING INDEX whose index was dropped acts as NOTHING: once published,
    PostgreSQL refused the application's UPDATEs on it ("does not have a replica identity and
    publishes updates"). It is left out like a table without a key; and a table with a primary
    key but REPLICA IDENTITY NOTHING is not said to lack a primary key."""
    await db.execute("CREATE TABLE gone (id int NOT NULL, v text); CREATE UNIQUE INDEX gone_id ON gone (id); "
                     "ALTER TABLE gone REPLICA IDENTITY USING INDEX gone_id; DROP INDEX gone_id")
    await db.execute("CREATE TABLE nothing (id int PRIMARY KEY, v text); ALTER TABLE nothing REPLICA IDENTITY NOTHING")
    await db.execute("CREATE TABLE byindex (id int NOT NULL, v text); CREATE UNIQUE INDEX byindex_id ON byindex (id); "
                     "ALTER TABLE byindex REPLICA IDENTITY USING INDEX byindex_id")
    src, sink = await make_source()
    await db.execute("INSERT INTO gone VALUES (1, 'a'); INSERT INTO nothing VALUES (1, 'a')")
    await db.execute("UPDATE gone SET v = 'still writable'; UPDATE nothing SET v = 'still writable'")
    await db.execute("INSERT INTO byindex VALUES (1, 'a'); UPDATE byindex SET id = 2; DELETE FROM byindex")
    events = await sink.wait_for(3)
    assert [(e.entity, e.operation) for e in events] == [("byindex", "INSERT"), ("byindex", "UPDATE"), ("byindex", "DELETE")]
    assert json.loads(events[1].body)["oldRecord"] == {"id": 1}
    with pytest.raises(ChannelUnavailable, match="index .*was dropped"):
        await src.check_channel("w1", "gone")
    with pytest.raises(ChannelUnavailable, match="REPLICA IDENTITY is NOTHING") as exc:
        await src.check_channel("w1", "nothing")
    assert "no primary key" not in str(exc.value)


async def test_a_latin1_database_streams_its_text_as_utf8(pg_cluster, tmp_path):
    """pgoutput sends text in the replication connection's client encoding, which defaulted to the
    database's: in a LATIN1 database every non-ASCII value arrived as invalid UTF-8 (sent as
    U+FFFD with an error and a history_gap per transaction), and a non-ASCII table name stopped
    the whole feed (the Relation message did not decode: a crash, again at each reconnect)."""
    name = f"rt_test_latin1_{os.getpid()}"
    dsn = pg_cluster.dsn_for(name)
    admin = await asyncpg.connect(pg_cluster.dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f"""CREATE DATABASE "{name}" ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'""")
    finally:
        await admin.close()
    db = await asyncpg.connect(dsn)
    sink = CollectingSink()
    src = PostgresSource(dsn, instance="rttest", state_dir=str(tmp_path / "state"), sink=sink,
                         workspaces=lambda: ["w1"], maintenance_interval=0.3)
    try:
        await db.execute('CREATE TABLE "thé" (id int PRIMARY KEY, "prénom" text, long text)')
        await src.start()
        await src.wait_streaming()
        await db.execute("""INSERT INTO "thé" VALUES (1, 'José', repeat('é', 5000))""")
        await db.execute("""UPDATE "thé" SET "prénom" = 'Zoë'""")  # long: unchanged TOAST, fetched
        events = await sink.wait_for(2)
        assert [(e.entity, e.record["prénom"], e.record["long"]) for e in events] == [
            ("thé", "José", "é" * 5000), ("thé", "Zoë", "é" * 5000)]
        assert sink.gaps == [] and src.status()["last_error"] == ""
    finally:
        await src.stop()
        await db.close()
        drop_database(pg_cluster, name)


async def test_a_client_encoding_from_the_environment_does_not_change_the_stream(db, make_source, monkeypatch):
    """libpq takes PGCLIENTENCODING from the gateway's environment: the stream's text came in it,
    not in the UTF-8 the decoder reads (U+FFFD, an error and a history_gap per transaction)."""
    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    await db.execute("CREATE TABLE enc (id int PRIMARY KEY, s text)")
    src, sink = await make_source()
    await db.execute("INSERT INTO enc VALUES (1, 'hé')")
    (event,) = await sink.wait_for(1)
    assert event.record == {"id": 1, "s": "hé"} and sink.gaps == []


async def test_date_and_time_zone_from_the_environment_do_not_change_the_stream(db, make_source, monkeypatch):
    """libpq sends PGDATESTYLE and PGTZ from the gateway's environment after the connection's
    options, so they won over the stream's DateStyle=ISO and TimeZone=UTC: dates arrived as
    "15.01.2024", timestamps as "15.01.2024T10:00:00" and timestamptz in the zone's form."""
    monkeypatch.setenv("PGDATESTYLE", "German")
    monkeypatch.setenv("PGTZ", "Asia/Kolkata")
    await db.execute("CREATE TABLE dt (id int PRIMARY KEY, d date, ts timestamp, tz timestamptz)")
    src, sink = await make_source()
    await db.execute("INSERT INTO dt VALUES (1, '2024-01-15', '2024-01-15 10:00:00.5', '2024-01-15 12:00:00+02')")
    (event,) = await sink.wait_for(1)
    assert event.record == {"id": 1, "d": "2024-01-15", "ts": "2024-01-15T10:00:00.5", "tz": "2024-01-15T10:00:00Z"}


async def test_an_interval_style_of_the_database_does_not_change_the_stream(db, make_source, pg_database):
    """The session pins TimeZone and DateStyle, and IntervalStyle too: a database (or role) whose
    IntervalStyle is postgres_verbose sent "@ 1 day 2 hours", streamed and fetched (TOAST)."""
    name = pg_database.rsplit("/", 1)[1]
    await db.execute(f'ALTER DATABASE "{name}" SET intervalstyle = \'postgres_verbose\'')
    await db.execute("CREATE TABLE iv (id int PRIMARY KEY, i interval, ia interval[], n int, big text); "
                     "ALTER TABLE iv ALTER big SET STORAGE EXTERNAL")
    src, sink = await make_source()
    big = "x" * 20000  # TOASTed: the UPDATE below leaves it unchanged, fetched by the catalog connection
    await db.execute("INSERT INTO iv VALUES (1, '1 day 2 hours', ARRAY['3 minutes'::interval], 0, $1)", big)
    await db.execute("UPDATE iv SET n = 1")
    events = await sink.wait_for(2)
    for e in events:
        assert (e.record["i"], e.record["ia"], e.record["big"]) == ("1 day 02:00:00", ["00:03:00"], big), e.record


async def test_a_configured_table_the_database_lacks_is_logged_once(db, make_source, caplog):
    """postgres.tables naming a table that does not exist (a typo) left it out without a word."""
    await db.execute("CREATE TABLE listed (id int PRIMARY KEY)")
    with caplog.at_level(logging.WARNING, logger="rtserver.postgres"):
        src, sink = await make_source(tables=["listed", "public.lsited"])
        await asyncio.sleep(1.0)  # periodic syncs: logged once, not at each
    said = [r.getMessage() for r in caplog.records if "no table of this database" in r.getMessage()]
    assert len(said) == 1 and "public.lsited" in said[0], said
    await db.execute("INSERT INTO listed VALUES (1)")
    (event,) = await sink.wait_for(1)
    assert event.entity == "listed"


async def test_a_table_whose_name_holds_a_dot_is_not_published_under_another_tables_channel(db, make_source):
    """Channels are postgres:schema.table: public."sales.orders" streamed on postgres:sales.orders,
    so subscribers of the table orders of schema sales got its rows as theirs. A name the channels
    cannot carry is left out, with the reason in the log."""
    await db.execute('CREATE SCHEMA sales; CREATE TABLE sales.orders (id int PRIMARY KEY, who text); '
                     'CREATE TABLE "sales.orders" (id int PRIMARY KEY, who text)')
    src, sink = await make_source(schemas=["public", "sales"])
    await db.execute("""INSERT INTO "sales.orders" VALUES (1, 'other table')""")
    await db.execute("INSERT INTO sales.orders VALUES (2, 'sales.orders')")
    (event,) = await sink.wait_for(1)
    assert (event.entity, event.record) == ("sales.orders", {"id": 2, "who": "sales.orders"})
    assert "channel" in src.catalog.skipped[("public", "sales.orders")]


async def test_a_table_moved_or_renamed_out_of_the_publication_streams_nothing_meanwhile(db, make_source):
    """The publication holds a table by OID and the slot decodes each change with the publication
    as of that change: a published table moved to a schema outside postgres.schemas, or renamed
    to a name the channels cannot carry, kept streaming under its new name until the next sync
    took it out (2 s; for the whole downtime when moved while the gateway was down): rows of a
    schema the operator never published reached postgres:* subscribers, and public."sales.orders"
    streamed on the channel of table orders of schema sales. Such changes are withheld now."""
    await db.execute("CREATE SCHEMA private; CREATE SCHEMA sales; CREATE TABLE sales.orders (id int PRIMARY KEY); "
                     "CREATE TABLE moved (id int PRIMARY KEY, secret text); CREATE TABLE renamed (id int PRIMARY KEY); "
                     "CREATE TABLE marker (id int PRIMARY KEY)")
    src, sink = await make_source(schemas=["public", "sales"], maintenance_interval=3600)
    await db.execute("INSERT INTO moved VALUES (1, 'published')")
    await sink.wait_for(1)
    async with db.transaction():
        await db.execute("ALTER TABLE moved SET SCHEMA private")
        await db.execute("INSERT INTO private.moved VALUES (2, 'never published')")
    await db.execute('ALTER TABLE renamed RENAME TO "sales.orders"')
    await db.execute('INSERT INTO "sales.orders" VALUES (3)')
    await db.execute("TRUNCATE private.moved, \"sales.orders\"")
    await db.execute("INSERT INTO sales.orders VALUES (4)")
    await db.execute("INSERT INTO marker VALUES (5)")
    events = await sink.wait_for(3)
    assert [(e.entity, e.operation, e.record) for e in events] == [
        ("moved", "INSERT", {"id": 1, "secret": "published"}),
        ("sales.orders", "INSERT", {"id": 4}),
        ("marker", "INSERT", {"id": 5}),
    ]
    assert src.ready() and src.status()["last_error"] == ""


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


async def test_a_correlation_id_is_kept_to_its_first_256_characters(db, make_source):
    """docs/postgres.md: the id a transaction sets is kept to its first 256 characters; an
    empty one leaves the default pg-<xid>-<commit LSN>."""
    await db.execute("CREATE TABLE cl (id int PRIMARY KEY)")
    src, sink = await make_source()
    async with db.transaction():
        await db.execute("SELECT pg_logical_emit_message(true, 'rt.correlation', $1)", "é" * 300)
        await db.execute("INSERT INTO cl VALUES (1)")
    async with db.transaction():
        await db.execute("SELECT pg_logical_emit_message(true, 'rt.correlation', '')")
        await db.execute("INSERT INTO cl VALUES (2)")
    events = await sink.wait_for(2)
    ids = [json.loads(e.body)["correlationId"] for e in events]
    assert ids[0] == "é" * 256
    assert ids[1].startswith("pg-"), ids


async def test_changes_waiting_for_a_correlation_id_are_bounded_in_bytes(db, make_source, monkeypatch):
    """A transaction's changes wait for its correlation id up to 10,000 of them, and up to
    MAX_PENDING_BYTES of them on the wire: 10,000 rows of megabytes each were gigabytes held.
    Past the bound they go out with what is known (here: before the message, so pg-<xid>-<lsn>)."""
    monkeypatch.setattr(postgres_source, "MAX_PENDING_BYTES", 100_000)
    await db.execute("CREATE TABLE wide (id int PRIMARY KEY, v text)")
    src, sink = await make_source()
    async with db.transaction():
        await db.execute("INSERT INTO wide SELECT g, repeat(md5(g::text), 320) FROM generate_series(1, 25) g")
        await db.execute("SELECT pg_logical_emit_message(true, 'rt.correlation', 'corr-late')")
    events = await sink.wait_for(25)
    assert [e.record["id"] for e in events] == list(range(1, 26))
    ids = [json.loads(e.body)["correlationId"] for e in events]
    # ~10 KiB a row: the bound is reached at rows 10 and 20, which leave without waiting; the last 5 get the id
    early = [i for i in ids if i != "corr-late"]
    assert len(early) == 20 and all(i.startswith("pg-") for i in early), ids
    assert ids[len(early):] == ["corr-late"] * 5, ids


async def test_frames_read_ahead_of_a_held_up_sink_are_bounded_in_bytes(db, make_source, monkeypatch):
    """While the sink holds the feed up, frames read from the server queue up to
    MAX_QUEUED_FRAMES and MAX_QUEUED_BYTES; then reading pauses (the server's socket buffer
    fills) and nothing is lost when the sink goes on."""
    monkeypatch.setattr(postgres_source, "MAX_QUEUED_BYTES", 64 << 10)
    gate = asyncio.Event()

    class HeldSink(CollectingSink):
        async def publish(self, event) -> int:
            await gate.wait()
            return await super().publish(event)

    await db.execute("CREATE TABLE wide (id int PRIMARY KEY, v text)")
    src, sink = await make_source(sink=HeldSink())
    for start in range(1, 400, 20):  # 20 transactions of 20 rows of ~10 KiB: 4 MB in all
        await db.execute("INSERT INTO wide SELECT g, repeat(md5(g::text), 320) FROM generate_series($1::int, $1 + 19) g",
                         start)
    peak, still = 0, 0
    while still < 10:  # until the queue has not grown for 10 polls of 50 ms
        await asyncio.sleep(0.05)
        queued = src.status()["queued_bytes"]
        still = still + 1 if queued <= peak else 0
        peak = max(peak, queued)
    # one socket read past the bound at most (libpq hands over what it has read)
    assert 64 << 10 <= peak < 1 << 20, peak
    gate.set()
    events = await sink.wait_for(400, timeout=60)
    assert [e.record["id"] for e in events] == list(range(1, 401))
    assert src.status()["queued_bytes"] == 0


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


class StallingSink(CollectingSink):
    """A sink whose first publish takes `stall` seconds, as a history or Kafka held up would."""

    def __init__(self, stall: float) -> None:
        super().__init__()
        self.stall = stall

    async def publish(self, event) -> int:
        if not self.events:
            await asyncio.sleep(self.stall)
        return await super().publish(event)


async def test_a_sink_held_up_longer_than_wal_sender_timeout_keeps_the_link(db, make_source, pg_database):
    """While the feed waited for its sink, nothing was sent to the server, which ends a walsender
    that hears nothing for wal_sender_timeout (60 s by default): a Kafka stall of a minute cost
    the connection, a not-ready spell and the resending of the transaction. Status updates go on
    while the feed waits."""
    name = pg_database.rsplit("/", 1)[1]
    await db.execute(f"ALTER DATABASE \"{name}\" SET wal_sender_timeout = '2s'")
    await db.execute("CREATE TABLE ka (id int PRIMARY KEY)")
    src, sink = await make_source(sink=StallingSink(5.0))
    await db.execute("INSERT INTO ka VALUES (1)")
    await db.execute("INSERT INTO ka VALUES (2)")
    events = await sink.wait_for(2, timeout=30)
    assert [e.record["id"] for e in events] == [1, 2]
    st = src.status()
    assert st["duplicates_dropped"] == 0 and st["last_error"] == "" and st["ready"]


async def test_slot_creation_held_up_by_a_running_transaction_says_so(db, pg_database, tmp_path):
    """Creating the slot waits for every transaction running at the time (an idle session left in
    a transaction holds it for ever): the source was not ready, with no error and no log line
    saying why. Its status and log now name the wait."""
    await db.execute("CREATE TABLE sw (id int PRIMARY KEY)")
    other = await asyncpg.connect(pg_database)
    tr = other.transaction()
    await tr.start()
    await other.execute("INSERT INTO sw VALUES (1)")  # holds an xid: the slot waits for its end
    sink = CollectingSink()
    src = PostgresSource(pg_database, instance="rtwait", state_dir=str(tmp_path / "state"), sink=sink,
                         workspaces=lambda: ["w1"], maintenance_interval=0.3)
    try:
        await src.start()
        for _ in range(150):
            if "waiting for the transactions" in src.status()["last_error"]:
                break
            await asyncio.sleep(0.1)
        assert not src.ready() and f"replication slot {src.slot}" in src.status()["last_error"]
        await tr.commit()
        await src.wait_streaming()
        assert src.ready() and src.status()["last_error"] == ""
    finally:
        await src.stop()
        await other.close()


async def _drop_slot_under(src, sink, pg_database: str) -> None:
    """Drop the source's slot while it streams (as an operator or a failover would), then wait
    for the source to re-create it and report the gap."""
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


async def test_lost_slot_is_recreated_with_history_gap(db, make_source, pg_database):
    await db.execute("CREATE TABLE ls (id int PRIMARY KEY)")
    src, sink = await make_source()
    await db.execute("INSERT INTO ls VALUES (1)")
    await sink.wait_for(1)
    await _drop_slot_under(src, sink, pg_database)
    assert sink.gaps and sink.gaps[0][:2] == ("w1", "postgres")
    assert src.status()["slot_recreations"] >= 1
    await db.execute("INSERT INTO ls VALUES (2)")
    events = await sink.wait_for(2)
    assert events[-1].record == {"id": 2}


# -- values the decoder cannot convert ---------------------------------------------------------


async def test_unconvertible_values_never_stop_the_feed(db, make_source):
    """numeric beyond a double and json msgspec cannot decode (PostgreSQL accepts both) stopped
    the feed for good (the same transaction failed on every reconnect); they arrive as text."""
    await db.execute("CREATE TABLE odd (id int PRIMARY KEY, n numeric, j json)")
    src, sink = await make_source()
    await db.execute("INSERT INTO odd VALUES (1, 1, '1')")
    await db.execute("INSERT INTO odd VALUES (2, 1e400, '1')")
    await db.execute("""INSERT INTO odd VALUES (3, 1, '{"x": 1e400}')""")
    await db.execute("""INSERT INTO odd VALUES (4, 1, '"\\ud800"')""")
    await db.execute("INSERT INTO odd VALUES (5, 2, '[2]')")
    events = await sink.wait_for(5)
    records = [json.loads(e.body)["record"] for e in events]
    assert records[0] == {"id": 1, "n": 1, "j": 1}
    assert records[1] == {"id": 2, "n": "1" + "0" * 400, "j": 1}
    assert records[2] == {"id": 3, "n": 1, "j": '{"x": 1e400}'}
    assert records[3] == {"id": 4, "n": 1, "j": '"\\ud800"'}
    assert records[4] == {"id": 5, "n": 2, "j": [2]}
    assert src.ready() and src.status()["last_error"] == "" and not sink.gaps


@pytest.fixture
def sql_ascii_database(pg_cluster):
    """A SQL_ASCII database: its text columns may hold bytes that are not UTF-8."""
    name = f"rt_ascii_{os.getpid()}"
    with psycopg.connect(pg_cluster.dsn, autocommit=True) as conn:
        drop_database(pg_cluster, name, conn)
        conn.execute(f"CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    yield pg_cluster.dsn_for(name)
    drop_database(pg_cluster, name)


async def test_value_failing_conversion_is_sent_as_text_with_error_and_gap(sql_ascii_database, tmp_path, caplog):
    conn = await asyncpg.connect(sql_ascii_database)
    sink = CollectingSink()
    src = PostgresSource(sql_ascii_database, instance="rtascii", state_dir=str(tmp_path / "state"), sink=sink,
                         workspaces=lambda: ["w1"], maintenance_interval=0.3)
    try:
        await conn.execute("CREATE TABLE latin (id int PRIMARY KEY, s text)")
        await src.start()
        await src.wait_streaming()
        with caplog.at_level(logging.ERROR, logger="rtserver.postgres"):
            await conn.execute("INSERT INTO latin VALUES (1, E'caf\\xe9')")
            await conn.execute("INSERT INTO latin VALUES (2, 'ok')")
            events = await sink.wait_for(2)
        assert [e.record for e in events] == [{"id": 1, "s": "caf\ufffd"}, {"id": 2, "s": "ok"}]
        assert len(sink.gaps) == 1 and sink.gaps[0][:2] == ("w1", "postgres")
        assert "public.latin column s" in sink.gaps[0][2]
        logged = [r for r in caplog.records if r.levelno == logging.ERROR and getattr(r, "fields", {}).get("column") == "s"]
        assert logged and logged[0].fields["table"] == "public.latin" and logged[0].fields["slot"] == src.slot
        assert src.ready()
    finally:
        await src.stop()
        await conn.close()


async def test_names_that_are_no_utf8_do_not_stop_the_feed(sql_ascii_database, tmp_path):
    """A SQL_ASCII database keeps a table or column name in any bytes. The decoders refused the
    Relation message of one that is no UTF-8, the source restarted and met the same message
    again: the whole feed stopped for good. Such a name is now taken with U+FFFD for the bytes,
    as values are."""
    conn = await asyncpg.connect(sql_ascii_database)
    sink = CollectingSink()
    src = PostgresSource(sql_ascii_database, instance="rtasciinames", state_dir=str(tmp_path / "state"), sink=sink,
                         workspaces=lambda: ["w1"], maintenance_interval=0.3)
    try:
        await conn.execute("CREATE TABLE latin (id int PRIMARY KEY)")
        # the column "n\xe9": its name's bytes as LATIN1 wrote them
        await conn.execute("DO $$BEGIN EXECUTE 'ALTER TABLE latin ADD COLUMN ' || "
                           "quote_ident(convert_from('\\x6ee9'::bytea, 'SQL_ASCII')) || ' text'; END$$")
        await conn.execute("CREATE TABLE plain (id int PRIMARY KEY)")
        await src.start()
        await src.wait_streaming()
        await conn.execute("INSERT INTO latin VALUES (1, 'x')")
        await conn.execute("INSERT INTO plain VALUES (2)")
        events = await sink.wait_for(2)
        assert [(e.entity, e.record) for e in events] == [("latin", {"id": 1, "n\ufffd": "x"}), ("plain", {"id": 2})]
        assert src.ready() and src.status()["last_error"] == ""
    finally:
        await src.stop()
        await conn.close()


# -- publication membership --------------------------------------------------------------------


async def test_partitioned_table_is_published_under_its_own_name(db, make_source):
    await db.execute("CREATE TABLE plain (id int PRIMARY KEY)")
    await db.execute("CREATE TABLE orders (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)")
    await db.execute("CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu')")
    # a publication made by an earlier version, without publish_via_partition_root
    await db.execute("CREATE PUBLICATION rttest_pub FOR TABLE plain")
    src, sink = await make_source()
    await asyncio.sleep(1.0)  # several periodic syncs: none may fail on the partitioned table
    assert src.ready() and src.status()["last_error"] == ""
    assert await src.check_channel("w1", "orders") == "orders"
    with pytest.raises(ChannelUnavailable, match="partition of"):
        await src.check_channel("w1", "orders_eu")
    await db.execute("CREATE TABLE later (id int PRIMARY KEY)")
    assert await src.check_channel("w1", "later") == "later"
    await db.execute("INSERT INTO orders VALUES (1, 'eu')")
    await db.execute("INSERT INTO plain VALUES (1)")
    await db.execute("INSERT INTO later VALUES (1)")
    events = await sink.wait_for(3)
    assert [(e.entity, e.record) for e in events] == [
        ("orders", {"id": 1, "region": "eu"}), ("plain", {"id": 1}), ("later", {"id": 1})]
    await src.stop()
    src2, _ = await make_source(sink=sink)  # a restart finds the publication as it left it
    assert src2.ready()
    await db.execute("INSERT INTO orders VALUES (2, 'eu')")
    events = await sink.wait_for(4)
    assert events[-1].entity == "orders"
    # docs/postgres.md: PostgreSQL sends nothing for TRUNCATE of a partition, only of the root
    await db.execute("TRUNCATE orders_eu")
    await db.execute("INSERT INTO orders VALUES (3, 'eu')")
    await db.execute("TRUNCATE orders")
    events = await sink.wait_for(6)
    assert [(e.operation, e.record) for e in events[4:]] == [("INSERT", {"id": 3, "region": "eu"}), ("TRUNCATE", {})]


async def test_rows_moving_between_partitions_or_partitions_coming_and_going_as_the_docs_say(db, make_source):
    """docs/postgres.md, Partitioned tables: an UPDATE of the partition key arrives as a DELETE
    of the old row and an INSERT of the new one, in one transaction, under the partitioned
    table's name; DETACH PARTITION and ATTACH PARTITION of a table holding rows send nothing."""
    await db.execute("CREATE TABLE porders (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)")
    await db.execute("CREATE TABLE porders_eu PARTITION OF porders FOR VALUES IN ('eu')")
    await db.execute("CREATE TABLE porders_us PARTITION OF porders FOR VALUES IN ('us')")
    await db.execute("CREATE TABLE porders_apac (id int, region text, PRIMARY KEY (id, region))")
    await db.execute("INSERT INTO porders_apac VALUES (9, 'apac')")  # not yet a partition
    src, sink = await make_source()
    await db.execute("INSERT INTO porders VALUES (1, 'eu')")
    await db.execute("UPDATE porders SET region = 'us' WHERE id = 1")
    await db.execute("ALTER TABLE porders DETACH PARTITION porders_us")
    await db.execute("ALTER TABLE porders ATTACH PARTITION porders_apac FOR VALUES IN ('apac')")
    await db.execute("INSERT INTO porders VALUES (2, 'eu')")
    events = await sink.wait_for(4)
    await asyncio.sleep(0.3)
    got = [(e.entity, e.operation, e.record) for e in sink.events]
    assert got == [("porders", "INSERT", {"id": 1, "region": "eu"}), ("porders", "DELETE", {"id": 1, "region": "eu"}),
                   ("porders", "INSERT", {"id": 1, "region": "us"}), ("porders", "INSERT", {"id": 2, "region": "eu"})]
    moved = [json.loads(e.body)["correlationId"] for e in events[1:3]]
    assert moved[0] == moved[1], moved  # one transaction


async def test_partitioned_table_is_published_only_when_its_partitions_have_a_replica_identity(db, make_source):
    """PostgreSQL checks each partition's own replica identity: a partitioned table with
    REPLICA IDENTITY FULL (the gateway's advice for one without a primary key) whose partitions
    had none was published, and from then on the application's UPDATE and DELETE on it failed."""
    await db.execute("CREATE TABLE ev (id int, y int) PARTITION BY RANGE (y)")
    await db.execute("CREATE TABLE ev1 PARTITION OF ev FOR VALUES FROM (0) TO (10)")
    await db.execute("ALTER TABLE ev REPLICA IDENTITY FULL")
    src, sink = await make_source()
    await db.execute("INSERT INTO ev VALUES (1, 1)")
    await db.execute("UPDATE ev SET id = 2 WHERE id = 1")  # still writable
    with pytest.raises(ChannelUnavailable, match="partition public.ev1 has no replica identity"):
        await src.check_channel("w1", "ev")
    await db.execute("ALTER TABLE ev1 REPLICA IDENTITY FULL")
    assert await src.check_channel("w1", "ev") == "ev"
    await db.execute("UPDATE ev SET id = 3 WHERE id = 2")
    (event,) = await sink.wait_for(1)
    assert (event.entity, event.operation, event.record, event.old_record) == (
        "ev", "UPDATE", {"id": 3, "y": 1}, {"id": 2, "y": 1})


async def test_full_identity_on_a_partitioned_table_alone_is_warned_about(db, make_source, caplog):
    """PostgreSQL takes the old row from the identity of the partition the row is in: with FULL on
    the partitioned table only, events said "whole old row" and carried the key with nulls
    (oldRecord {"s": null}, DELETE records without their values), silently. It is still published
    (its partitions have a key), with a warning naming the partitions to set FULL on."""
    await db.execute("CREATE TABLE pf (id int, y int, s text, PRIMARY KEY (id, y)) PARTITION BY RANGE (y)")
    await db.execute("CREATE TABLE pf1 PARTITION OF pf FOR VALUES FROM (0) TO (10)")
    await db.execute("CREATE TABLE pf2 PARTITION OF pf FOR VALUES FROM (10) TO (20)")
    await db.execute("ALTER TABLE pf REPLICA IDENTITY FULL; ALTER TABLE pf2 REPLICA IDENTITY FULL")
    with caplog.at_level(logging.WARNING, logger="rtserver.postgres"):
        src, sink = await make_source()
    assert await src.check_channel("w1", "pf") == "pf"
    warned = [r.getMessage() for r in caplog.records if getattr(r, "fields", {}).get("table") == "public.pf"]
    assert len(warned) == 1 and "public.pf1" in warned[0] and "public.pf2" not in warned[0]
    assert "REPLICA IDENTITY FULL" in warned[0]


_ROLES = itertools.count()


@pytest.fixture
async def gateway_role(pg_database):
    """A role with REPLICATION and CREATE but not superuser: it can add only the tables it owns."""
    # A name per use, not per process: roles belong to the cluster, not the database, so one a
    # failed teardown left behind made the next test's CREATE ROLE fail.
    name = pg_database.rsplit("/", 1)[1]
    role = f"rt_gw_{os.getpid()}_{next(_ROLES)}"
    admin = await asyncpg.connect(pg_database)
    await admin.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    await admin.execute(f'GRANT CREATE ON DATABASE "{name}" TO {role}; GRANT USAGE, CREATE ON SCHEMA public TO {role}')
    yield role, pg_database.replace("//postgres@", f"//{role}@")
    await admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
    await admin.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
    await admin.close()


async def test_table_the_role_cannot_add_does_not_block_the_others(db, gateway_role, tmp_path, caplog):
    role, dsn = gateway_role
    await db.execute("CREATE TABLE not_mine (id int PRIMARY KEY)")  # owned by postgres
    await db.execute(f"CREATE TABLE mine (id int PRIMARY KEY); ALTER TABLE mine OWNER TO {role}")
    sink = CollectingSink()
    src = PostgresSource(dsn, instance="rtrole", state_dir=str(tmp_path / "state"), sink=sink,
                         workspaces=lambda: ["w1"], maintenance_interval=0.3)
    try:
        with caplog.at_level(logging.ERROR, logger="rtserver.postgres"):
            await src.start()
            await src.wait_streaming(timeout=10)
        assert src.ready()
        assert any(getattr(r, "fields", {}).get("table") == "public.not_mine" for r in caplog.records)
        with pytest.raises(ChannelUnavailable, match="does not own it"):
            await src.check_channel("w1", "not_mine")
        await db.execute(f"CREATE TABLE mine2 (id int PRIMARY KEY); ALTER TABLE mine2 OWNER TO {role}")
        assert await src.check_channel("w1", "mine2") == "mine2"  # the periodic and on-demand syncs go on
        await db.execute("INSERT INTO not_mine VALUES (1); INSERT INTO mine VALUES (2); INSERT INTO mine2 VALUES (3)")
        await sink.wait_for(2)
        await asyncio.sleep(0.3)
        assert [(e.entity, e.record) for e in sink.events] == [("mine", {"id": 2}), ("mine2", {"id": 3})]
    finally:
        await src.stop()


async def test_an_unchanged_toast_value_the_role_may_not_select_is_left_out_and_logged(db, gateway_role, tmp_path,
                                                                                         caplog):
    """docs/postgres.md: the role needs SELECT on the published tables to fetch unchanged TOAST
    values. Without it the fetch fails: the column is left out of `record` (never null), as when
    the row is gone, with a warning naming the table, and the feed goes on."""
    role, dsn = gateway_role
    await db.execute(f"CREATE TABLE secret_docs (id int PRIMARY KEY, n int, big text); ALTER TABLE secret_docs "
                     f"ALTER big SET STORAGE EXTERNAL; ALTER TABLE secret_docs OWNER TO {role}; "
                     f"REVOKE SELECT ON secret_docs FROM {role}")
    sink = CollectingSink()
    src = PostgresSource(dsn, instance="rtnosel", state_dir=str(tmp_path / "state"), sink=sink,
                         workspaces=lambda: ["w1"], maintenance_interval=0.3)
    big = "".join(f"{i:06d}" for i in range(3000))  # 18 KB, TOASTed
    try:
        with caplog.at_level(logging.WARNING, logger="rtserver.postgres"):
            await src.start()
            await src.wait_streaming(timeout=10)
            await db.execute("INSERT INTO secret_docs VALUES (1, 0, $1)", big)
            await db.execute("UPDATE secret_docs SET n = 1 WHERE id = 1")
            await db.execute("UPDATE secret_docs SET n = 2 WHERE id = 1")
            events = await sink.wait_for(3)
        assert events[0].record == {"id": 1, "n": 0, "big": big}
        assert [e.record for e in events[1:]] == [{"id": 1, "n": 1}, {"id": 1, "n": 2}]
        assert any(getattr(r, "fields", {}).get("table") == "public.secret_docs" and "permission denied" in r.getMessage()
                   for r in caplog.records), caplog.text
    finally:
        await src.stop()


async def test_a_publication_a_dba_made_and_gave_the_role_streams_tables_it_does_not_own(db, gateway_role, tmp_path):
    """docs/postgres.md, Privileges: instead of owning the tables, the role may own a
    publication a DBA created with them; tables already in it need no ownership."""
    role, dsn = gateway_role
    await db.execute("CREATE TABLE dba_t (id int PRIMARY KEY)")  # owned by postgres
    await db.execute(f"GRANT SELECT ON dba_t TO {role}")
    await db.execute(f"CREATE PUBLICATION rtdba_pub FOR TABLE dba_t; ALTER PUBLICATION rtdba_pub OWNER TO {role}")
    sink = CollectingSink()
    src = PostgresSource(dsn, instance="rtdba", state_dir=str(tmp_path / "state"), sink=sink,
                         workspaces=lambda: ["w1"], maintenance_interval=0.3)
    try:
        await src.start()
        await src.wait_streaming(timeout=10)
        assert await src.check_channel("w1", "dba_t") == "dba_t"
        await db.execute("INSERT INTO dba_t VALUES (1)")
        events = await sink.wait_for(1)
        assert [(e.entity, e.record) for e in events] == [("dba_t", {"id": 1})]
        await asyncio.sleep(1.0)  # periodic syncs: they leave the DBA's table in and fail on nothing
        assert src.ready() and src.status()["last_error"] == ""
        tables = await db.fetch("SELECT tablename FROM pg_publication_tables WHERE pubname = 'rtdba_pub'")
        assert [r["tablename"] for r in tables] == ["dba_t"]
    finally:
        await src.stop()


async def test_table_written_before_it_is_published_gets_a_history_gap(db, make_source):
    await db.execute("CREATE TABLE early (id int PRIMARY KEY)")
    src, sink = await make_source(maintenance_interval=3600)  # only on-demand syncs here
    await db.execute("CREATE TABLE fresh (id int PRIMARY KEY)")
    await db.execute("INSERT INTO fresh VALUES (1)")  # before the publication holds it: not captured
    await db.execute("CREATE TABLE empty_new (id int PRIMARY KEY)")
    assert await src.check_channel("w1", "fresh") == "fresh"  # the sync adds both new tables
    assert len(sink.gaps) == 1 and "public.fresh" in sink.gaps[0][2]  # empty_new lost nothing
    await db.execute("INSERT INTO fresh VALUES (2)")
    await sink.wait_for(1)
    await asyncio.sleep(0.3)
    assert [e.record for e in sink.events] == [{"id": 2}]


async def test_a_new_empty_table_the_role_may_not_select_gives_no_gap(db, gateway_role, tmp_path):
    """Whether a table added late had rows was asked with a SELECT, and a role without SELECT on
    it (needed only for TOAST values) got a history_gap for every new table, empty or not. Its
    size says it was never written to; one that was is still a gap."""
    role, dsn = gateway_role
    sink = CollectingSink()
    src = PostgresSource(dsn, instance="rtnoselgap", state_dir=str(tmp_path / "state"), sink=sink,
                         workspaces=lambda: ["w1"], maintenance_interval=3600)
    try:
        await src.start()
        await src.wait_streaming(timeout=10)
        for name in ("blind_empty", "blind_written"):
            await db.execute(f"CREATE TABLE {name} (id int PRIMARY KEY); ALTER TABLE {name} OWNER TO {role}; "
                             f"REVOKE SELECT ON {name} FROM {role}")
        await db.execute("INSERT INTO blind_written VALUES (1)")  # before the publication holds it
        assert await src.check_channel("w1", "blind_empty") == "blind_empty"
        assert len(sink.gaps) == 1 and "public.blind_written" in sink.gaps[0][2], sink.gaps
    finally:
        await src.stop()


# -- slot (re)creation ---------------------------------------------------------------------------


async def test_new_slot_resets_a_saved_position_from_another_server(db, make_source, pg_database, tmp_path):
    """The state directory holds a position from another server (a restore or a failover to a
    standby behind it: higher LSNs than this one's). Changes of the new slot are not duplicates."""
    await db.execute("CREATE TABLE rp (id int PRIMARY KEY)")
    slot = slot_name("rttest", pg_database.rsplit("/", 1)[1])
    pos = await PositionFile.open(str(tmp_path / "state" / f"postgres-{slot}.pos"))
    pos.record(0xFFFF_0000_0000, -1)
    await pos.close()
    src, sink = await make_source()
    await db.execute("INSERT INTO rp VALUES (1)")
    events = await sink.wait_for(1)
    assert events[0].record == {"id": 1} and src.status()["duplicates_dropped"] == 0
    assert sink.gaps and "dropped" in sink.gaps[0][2]  # the slot it had streamed from is gone


async def _as_an_earlier_version_left_it(make_source, db) -> tuple[int, str]:
    """A source that published a change, stopped, its position file renamed as earlier versions
    named it (the slot alone): its published LSN and that file's path."""
    await db.execute("CREATE TABLE up (id int PRIMARY KEY)")
    src, sink = await make_source()
    await db.execute("INSERT INTO up VALUES (1)")
    await sink.wait_for(1)
    await src.stop()
    lsn = src.published_lsn
    assert lsn and src.position_name.startswith(src.slot + "-")
    legacy = os.path.join(src.state_dir, f"postgres-{src.slot}.pos")
    os.replace(os.path.join(src.state_dir, f"postgres-{src.position_name}.pos"), legacy)
    return lsn, legacy


async def test_an_earlier_versions_position_file_is_taken_over(db, make_source):
    """Upgrading: the position file named by the slot alone is the source's (no other source
    is configured): it is renamed and its position kept, so nothing published is sent again."""
    lsn, legacy = await _as_an_earlier_version_left_it(make_source, db)
    src, _ = await make_source()
    assert src.published_lsn == lsn and src.legacy_position
    assert not os.path.exists(legacy) and os.path.exists(src._position.path)


async def test_an_earlier_versions_position_file_another_server_may_share_is_left(db, make_source, pg_database,
                                                                                   caplog):
    """Another configured source reads a database of the same name on another server: the file
    named by the slot alone may hold that server's position (which would drop this one's
    changes as already published). It is left unused, with a warning naming it."""
    lsn, legacy = await _as_an_earlier_version_left_it(make_source, db)
    elsewhere = pg_database.replace("@127.0.0.1:", "@127.0.0.2:")
    with caplog.at_level(logging.WARNING, logger="rtserver.postgres"):
        src, _ = await make_source(other_urls=[pg_database, elsewhere])
    assert src.published_lsn == 0 and not src.legacy_position and os.path.exists(legacy)
    assert any(legacy in r.getMessage() and "delivered again" in r.getMessage() for r in caplog.records)


async def test_slot_recreated_while_running_resets_the_position(db, make_source, pg_database):
    await db.execute("CREATE TABLE rr (id int PRIMARY KEY)")
    src, sink = await make_source()
    await db.execute("INSERT INTO rr VALUES (1)")
    await sink.wait_for(1)
    src._position.record(0xFFFF_0000_0000, -1)  # noqa: SLF001 - as if the server's LSNs went back
    await _drop_slot_under(src, sink, pg_database)
    assert sink.gaps and src.ready()
    await db.execute("INSERT INTO rr VALUES (2)")
    events = await sink.wait_for(2)
    assert events[-1].record == {"id": 2} and src.status()["duplicates_dropped"] == 0


async def test_publication_dropped_under_the_feed_is_recovered_with_a_gap(db, make_source):
    """PostgreSQL looks the publication up as of each change it decodes: once it was dropped (a
    DBA resetting it, a migration), the slot failed at the same change on every reconnect, even
    with the publication re-created, and the feed stayed down for good. The slot is re-created
    now, and subscribers get a history_gap for what was written meanwhile."""
    await db.execute("CREATE TABLE dp (id int PRIMARY KEY)")
    src, sink = await make_source()
    await db.execute("INSERT INTO dp VALUES (1)")
    await sink.wait_for(1)
    await db.execute(f"DROP PUBLICATION {src.publication}")
    await db.execute("INSERT INTO dp VALUES (2)")  # lost with the publication
    for _ in range(150):
        if sink.gaps and src.ready():
            break
        await asyncio.sleep(0.1)
    assert len(sink.gaps) == 1 and f"publication {src.publication} was dropped" in sink.gaps[0][2]
    await db.execute("INSERT INTO dp VALUES (3)")
    events = await sink.wait_for(2)
    assert [e.record for e in events] == [{"id": 1}, {"id": 3}] and src.ready()


# -- old rows, types, TOAST, changed columns -------------------------------------------------------


async def test_key_only_old_tuple_is_not_an_old_record(db, make_source):
    """REPLICA IDENTITY DEFAULT and a key change: the old tuple holds the key only. The wire shows
    it as oldRecord; transitions must not take it for the old row (a false "enter")."""
    await db.execute("CREATE TABLE kc (id int PRIMARY KEY, status text)")
    src, sink = await make_source()
    await db.execute("INSERT INTO kc VALUES (1, 'active')")
    await db.execute("UPDATE kc SET id = 10 WHERE id = 1")
    events = await sink.wait_for(2)
    body = json.loads(events[1].body)
    assert body["oldRecord"] == {"id": 1} and body["changedColumns"] == ["id"]
    assert events[1].old_record is None


async def test_domain_columns_keep_their_base_type(db, make_source):
    await db.execute(
        """CREATE DOMAIN posint AS int CHECK (VALUE > 0); CREATE DOMAIN small AS posint; CREATE DOMAIN jd AS jsonb;
           CREATE DOMAIN ints AS int[]; CREATE TYPE mood AS ENUM ('sad', 'happy'); CREATE DOMAIN moods AS mood[];
           CREATE DOMAIN price AS numeric(10,2)"""
    )
    await db.execute(
        "CREATE TABLE dom (id int PRIMARY KEY, pi posint, sm small, jd jd, pa posint[], ia ints, ma moods, p price)"
    )
    src, sink = await make_source()
    await db.execute(
        """INSERT INTO dom VALUES (1, 5, 2, '{"q": 1}', '{1,2}', '{3,NULL}', '{sad,happy}', 9.5)"""
    )
    (event,) = await sink.wait_for(1)
    assert json.loads(event.body)["record"] == {
        "id": 1, "pi": 5, "sm": 2, "jd": {"q": 1}, "pa": [1, 2], "ia": [3, None], "ma": ["sad", "happy"], "p": 9.5}


async def test_toast_fetch_has_the_streams_types_and_formats(db, make_source, pg_database):
    """Unchanged TOAST values fetched by key equal the streamed ones: arrays of user types are
    arrays, and the database's own DateStyle / bytea_output / TimeZone do not leak in."""
    name = pg_database.rsplit("/", 1)[1]
    await db.execute(
        f"""ALTER DATABASE "{name}" SET bytea_output = 'escape'; ALTER DATABASE "{name}" SET DateStyle = 'SQL, DMY';
            ALTER DATABASE "{name}" SET TimeZone = 'Asia/Tokyo'"""
    )
    await db.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
    await db.execute("CREATE TABLE tt (id int PRIMARY KEY, n int, ma mood[], by bytea, ts timestamp[], tz timestamptz[])")
    for col in ("ma", "by", "ts", "tz"):
        await db.execute(f"ALTER TABLE tt ALTER {col} SET STORAGE EXTERNAL")
    src, sink = await make_source()
    await db.execute(
        """INSERT INTO tt VALUES (1, 0, array_fill('happy'::mood, ARRAY[1000]), decode(repeat('00ff7f', 2000), 'hex'),
           array_fill('2024-01-15 10:00:00.5'::timestamp, ARRAY[400]),
           array_fill('2024-01-15 10:00:00+00'::timestamptz, ARRAY[400]))"""
    )
    await db.execute("UPDATE tt SET n = 1")
    events = await sink.wait_for(2)
    inserted, updated = (json.loads(e.body)["record"] for e in events)
    assert inserted["ma"][0] == "happy" and inserted["ts"][0] == "2024-01-15T10:00:00.5"
    for col in ("ma", "by", "ts", "tz"):
        assert updated[col] == inserted[col], col
    assert updated["n"] == 1


async def test_full_identity_unchanged_nan_is_not_a_changed_column(db, make_source):
    await db.execute("CREATE TABLE fn (id int PRIMARY KEY, x float8, xs float8[], n int); ALTER TABLE fn REPLICA IDENTITY FULL")
    src, sink = await make_source()
    await db.execute("INSERT INTO fn VALUES (1, 'NaN', '{NaN,Infinity,1}', 0)")
    await db.execute("UPDATE fn SET n = 1")
    await db.execute("UPDATE fn SET x = 2")
    await db.execute("UPDATE fn SET x = 'NaN'")
    events = await sink.wait_for(4)
    assert [json.loads(e.body)["changedColumns"] for e in events[1:]] == [["n"], ["x"], ["x"]]


async def test_full_identity_json_true_replacing_1_is_a_changed_column(db, make_source):
    """docs/postgres.md: under FULL, changedColumns is exactly the columns whose values differ.
    A jsonb value going from 1 to true (or [0] to [false]) is a change, which Python's True == 1
    hid; 1 and 1.0 stay equal, as PostgreSQL's jsonb and numeric say."""
    await db.execute("CREATE TABLE fj (id int PRIMARY KEY, j jsonb, a jsonb, f jsonb, n int); "
                     "ALTER TABLE fj REPLICA IDENTITY FULL")
    src, sink = await make_source()
    await db.execute("""INSERT INTO fj VALUES (1, '{"on": 1}', '[0, [1]]', '{"x": 1}', 0)""")
    await db.execute("""UPDATE fj SET j = '{"on": true}'""")
    await db.execute("""UPDATE fj SET a = '[0, [true]]'""")
    await db.execute("""UPDATE fj SET f = '{"x": 1.0}', n = 1""")
    events = await sink.wait_for(4)
    assert [json.loads(e.body)["changedColumns"] for e in events[1:]] == [["j"], ["a"], ["n"]]


async def test_json_nesting_deeper_than_the_feed_can_encode_arrives_as_text(db, make_source):
    """A jsonb nesting ~950 levels (PostgreSQL takes thousands) was decoded, then failed to
    encode as an event further down the stack (RecursionError): the feed failed at that
    transaction after every reconnect, for every table. Nesting beyond MAX_JSON_DEPTH (512)
    arrives as its JSON text, as other JSON this side cannot carry does; the feed goes on."""
    await db.execute("CREATE TABLE dj (id int PRIMARY KEY, j jsonb)")
    src, sink = await make_source()
    depths = [512, 513, *range(900, 1000, 4)]
    for depth in depths:
        await db.execute("INSERT INTO dj VALUES ($1, $2::text::jsonb)", depth, "[" * depth + "]" * depth)
    await db.execute("INSERT INTO dj VALUES (1, '[1]')")
    events = await sink.wait_for(len(depths) + 1)
    records = [json.loads(e.body)["record"] for e in events]
    assert [r["id"] for r in records] == [*depths, 1]
    assert isinstance(records[0]["j"], list)
    for record in records[1:-1]:
        assert record["j"] == "[" * record["id"] + "]" * record["id"]
    assert records[-1]["j"] == [1]
    assert src.ready() and src.status()["last_error"] == "" and not sink.gaps


async def test_full_identity_deeply_nested_json_does_not_stop_the_feed(db, make_source):
    """Under FULL, changedColumns compares old and new values, nested JSON too. The comparison
    recursed two Python frames per level: an UPDATE of a row holding a jsonb 450 levels deep
    (which PostgreSQL, the decoder and the encoder all take) raised RecursionError, and the feed
    failed at that transaction after every reconnect, for every table."""
    await db.execute("CREATE TABLE fd (id int PRIMARY KEY, j jsonb, n int); ALTER TABLE fd REPLICA IDENTITY FULL")
    src, sink = await make_source()
    deep = "[" * 450 + "]" * 450
    deeper = "[" * 450 + "1" + "]" * 450
    await db.execute("INSERT INTO fd VALUES (1, $1::text::jsonb, 0)", deep)
    await db.execute("UPDATE fd SET n = 1")
    await db.execute("UPDATE fd SET j = $1::text::jsonb", deeper)
    await db.execute("INSERT INTO fd VALUES (2, '[]', 0)")
    events = await sink.wait_for(4)
    bodies = [json.loads(e.body) for e in events]
    assert [b["changedColumns"] for b in bodies[1:3]] == [["n"], ["j"]]
    assert json.dumps(bodies[2]["record"]["j"], separators=(",", ":")) == deeper
    assert bodies[3]["record"] == {"id": 2, "j": [], "n": 0}
    assert src.ready() and src.status()["last_error"] == ""


async def test_builtin_arrays_outside_the_decoders_table_are_arrays(db, make_source):
    """docs/postgres.md: arrays -> arrays. Built-in array types the decoder has no entry for
    (interval[], inet[], money[], point[], tstzrange[]...) arrived as their literal text,
    e.g. "{\\"1 day\\",02:00:00}"; box[] (delimiter ';') stays text, as documented."""
    await db.execute(
        """CREATE TABLE ba (id int PRIMARY KEY, iv interval[], ip inet[], mac macaddr[], mo money[],
           bits bit(4)[], pt point[], r int4range[], x xml[], bx box[], n int)"""
    )
    await db.execute("ALTER TABLE ba ALTER iv SET STORAGE EXTERNAL")
    src, sink = await make_source()
    await db.execute(
        """INSERT INTO ba VALUES (1, '{"1 day","2 hours",NULL}', '{10.0.0.1,::1}', '{08:00:2b:01:02:03}',
           '{1.50}', '{1010}', '{"(1,2)"}', '{"[1,3)"}', '{<a/>}', '{(1,1),(0,0)}', 0)"""
    )
    await db.execute("UPDATE ba SET iv = array_fill('1 day'::interval, ARRAY[600])")
    await db.execute("UPDATE ba SET n = 1")  # iv unchanged TOAST: fetched, converted alike
    events = await sink.wait_for(3)
    r = json.loads(events[0].body)["record"]
    assert r == {
        "id": 1, "iv": ["1 day", "02:00:00", None], "ip": ["10.0.0.1", "::1"], "mac": ["08:00:2b:01:02:03"],
        "mo": ["$1.50"], "bits": ["1010"], "pt": ["(1,2)"], "r": ["[1,3)"], "x": ["<a/>"],
        "bx": "{(1,1),(0,0)}", "n": 0,
    }
    fetched = json.loads(events[2].body)["record"]["iv"]
    assert fetched == json.loads(events[1].body)["record"]["iv"] == ["1 day"] * 600


async def test_vector_types_in_the_array_category_stay_text(db, make_source):
    """int2vector and oidvector are in PostgreSQL's array category with ',' as delimiter, but
    print as "1 2": learnt as arrays, every value failed to parse, with an error log and a
    history_gap for each transaction writing the table. They are text, as other types."""
    await db.execute("CREATE TABLE vec (id int PRIMARY KEY, iv int2vector, ov oidvector, ivs int2vector[])")
    src, sink = await make_source()
    await db.execute("""INSERT INTO vec VALUES (1, '1 2', '3 4', ARRAY['5 6'::int2vector])""")
    (event,) = await sink.wait_for(1)
    assert event.record == {"id": 1, "iv": "1 2", "ov": "3 4", "ivs": ["5 6"]}
    await db.execute("INSERT INTO vec (id) VALUES (2)")
    await sink.wait_for(2)
    assert sink.gaps == []


async def test_toast_fetch_finds_rows_whatever_the_key_type(db, make_source):
    """The unchanged TOAST value is fetched by the key as the event carries it. Keys whose event
    form is not their PostgreSQL text were not found, and the column went missing from `record`
    although the row was there: bytea (base64), arrays, jsonb, char(n) and bit(n) (cast to
    char(1) / bit(1), the type without its length)."""
    keys = {
        "kby": ("bytea", "'\\x00ff10'"), "kia": ("int[]", "'{1,NULL,3}'"), "kta": ("text[]", """'{"a b","c\\"d",NULL}'"""),
        "kjb": ("jsonb", """'{"a": [1, "x"]}'"""), "kch": ("char(4)", "'ab'"), "kbit": ("bit(4)", "B'1010'"),
        "ktz": ("timestamptz", "'2024-01-15 12:00:00.5+02'"), "ku": ("uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"),
    }
    for t, (typ, _) in keys.items():
        await db.execute(f"CREATE TABLE {t} (k {typ} PRIMARY KEY, n int, big text); ALTER TABLE {t} ALTER big SET STORAGE EXTERNAL")
    src, sink = await make_source()
    big = "".join(f"{i:06d}" for i in range(3000))
    for t, (_, literal) in keys.items():
        await db.execute(f"INSERT INTO {t} VALUES ({literal}, 0, $1)", big)
        await db.execute(f"UPDATE {t} SET n = 1")
    events = await sink.wait_for(2 * len(keys))
    updates = {e.entity: e.record for e in events if e.operation == "UPDATE"}
    assert {t: r.get("big") == big for t, r in updates.items()} == dict.fromkeys(keys, True)


class _SlowSink(CollectingSink):
    """Records like the memory bus but yields now and then, as a backlogged hub makes it wait."""

    async def publish(self, event) -> int:
        if len(self.events) % 100 == 0:
            await asyncio.sleep(0.01)
        return await super().publish(event)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_stop_part_way_through_publishing_a_transaction_repeats_nothing(db, make_source, pg_database, streamed):
    """A source stopped while it publishes a transaction's events (a gateway shut down in the
    middle of a large transaction) recorded only the last 10,000-change checkpoint, so the
    events published after it were published again after the restart (2,000 duplicates here)."""
    rows = 25_000
    await db.execute("CREATE TABLE pw (id int PRIMARY KEY)")
    if streamed:  # sent while in progress: published at its Stream Commit
        await db.execute(f"""ALTER DATABASE "{pg_database.rsplit("/", 1)[1]}" SET logical_decoding_work_mem = '64kB'""")
    sink = _SlowSink()
    src, _ = await make_source(sink=sink)
    await db.execute(f"INSERT INTO pw SELECT generate_series(1, {rows})")
    await sink.wait_for(12_000, timeout=60)
    await src.stop()
    assert len(sink.events) < rows
    await make_source(sink=sink)
    await db.execute("INSERT INTO pw VALUES (0)")
    await sink.wait_for(rows + 1, timeout=60)
    await asyncio.sleep(0.3)
    assert [e.record["id"] for e in sink.events] == [*range(1, rows + 1), 0]


class _StallingSink(CollectingSink):
    """Stalls (as a backlogged hub makes a publish wait) on the first event of `workspace`
    whose record has id `stall_id`, until the source is stopped."""

    def __init__(self, workspace: str, stall_id: int) -> None:
        super().__init__()
        self.workspace, self.stall_id = workspace, stall_id
        self.stalled = asyncio.Event()

    async def publish(self, event) -> int:
        if event.workspace == self.workspace and event.record.get("id") == self.stall_id and not self.stalled.is_set():
            self.stalled.set()
            await asyncio.Event().wait()  # until cancelled by stop()
        return await super().publish(event)


async def test_stop_between_two_workspaces_of_one_change_repeats_it_to_none(db, make_source):
    """A shared feed hands each change to every workspace in turn; a stop landing between two
    of them (a publish waiting for a backlogged hub) recorded only the changes every workspace
    had, so after the restart the workspaces that had the change got it again."""
    await db.execute("CREATE TABLE sw (id int PRIMARY KEY)")
    workspaces = ("w1", "w2", "w3")
    sink = _StallingSink("w2", 2)
    src, _ = await make_source(sink=sink, workspaces=workspaces)
    await db.execute("INSERT INTO sw SELECT generate_series(1, 3)")  # one transaction
    await asyncio.wait_for(sink.stalled.wait(), 15)
    await src.stop()
    assert [(e.workspace, e.record["id"]) for e in sink.events] == [("w1", 1), ("w2", 1), ("w3", 1), ("w1", 2)]
    after = CollectingSink()
    src2, _ = await make_source(sink=after, workspaces=workspaces)
    await db.execute("INSERT INTO sw VALUES (4)")
    await after.wait_for(2 + 3 + 3)
    await asyncio.sleep(0.3)
    got = [(e.workspace, e.record["id"]) for e in after.events]
    assert got == [("w2", 2), ("w3", 2), *[(w, 3) for w in workspaces], *[(w, 4) for w in workspaces]]
    assert src2.status()["duplicates_dropped"] >= 1


async def test_stop_between_workspaces_then_a_new_workspace_repeats_rather_than_loses(db, make_source):
    """The workspaces that had a change count only for the same list: with a workspace added
    before the restart, the change goes to every one again (repeated, never skipped wrongly)."""
    await db.execute("CREATE TABLE sn (id int PRIMARY KEY)")
    sink = _StallingSink("w2", 1)
    src, _ = await make_source(sink=sink, workspaces=("w1", "w2"))
    await db.execute("INSERT INTO sn VALUES (1)")
    await asyncio.wait_for(sink.stalled.wait(), 15)
    await src.stop()
    assert [(e.workspace, e.record["id"]) for e in sink.events] == [("w1", 1)]
    after = CollectingSink()
    await make_source(sink=after, workspaces=("w0", "w1", "w2"))
    await after.wait_for(3)
    await asyncio.sleep(0.3)
    assert sorted((e.workspace, e.record["id"]) for e in after.events) == [("w0", 1), ("w1", 1), ("w2", 1)]


async def test_position_file_reads_its_earlier_format_and_refuses_a_torn_write(tmp_path):
    import struct

    path = str(tmp_path / "p.pos")
    pos = await PositionFile.open(path)
    assert pos.complete and pos.commit_lsn == 0
    pos.record(0x1234_5678, 7, 2, 0xABCDEF)
    await pos.close()
    pos = await PositionFile.open(path)
    assert (pos.commit_lsn, pos.partial_count, pos.partial_part, pos.partial_key) == (0x1234_5678, 7, 2, 0xABCDEF)
    await pos.close()
    # what versions before RTP2 wrote: 32 bytes, no workspaces part
    salt = 0x5A5A5A5A5A5A5A5A
    with open(path, "wb") as fh:
        fh.write(struct.pack("!4sQqQ", b"RTP1", 0x99, 5, 0x99 ^ 5 ^ salt))
    pos = await PositionFile.open(path)
    assert (pos.commit_lsn, pos.partial_count, pos.partial_part) == (0x99, 5, 0)
    await pos.close()
    with open(path, "r+b") as fh:  # a check that does not match: the start, not a wrong position
        fh.write(struct.pack("!4sQqQQQ", b"RTP2", 0x99, 5, 1, 2, 0))
    pos = await PositionFile.open(path)
    assert pos.commit_lsn == 0 and pos.complete
    await pos.close()


async def test_a_link_gone_silent_is_reopened_and_nothing_is_lost(db, pg_cluster, pg_database, tmp_path):
    """The link to the server dies without a reset (a partition, a dead NAT entry): writes
    still succeed, nothing arrives. The server answers the source's status update every second,
    so silence past receive_timeout means a dead link: the source must say so (not ready), reopen
    the stream and deliver what was written meanwhile, instead of waiting on the socket for as
    long as TCP takes to give up (minutes to hours)."""
    from tests.harness.tcpproxy import TcpProxy

    await db.execute("CREATE TABLE silent (id int PRIMARY KEY)")
    proxy = await TcpProxy(pg_cluster.port).start()
    sink = CollectingSink()
    src = PostgresSource(
        pg_database.replace(f":{pg_cluster.port}/", f":{proxy.port}/"), instance="rtsilent",
        state_dir=str(tmp_path / "state"), sink=sink, workspaces=lambda: ["w1"], maintenance_interval=0.3,
        receive_timeout=2.0,
    )
    try:
        await src.start()
        await src.wait_streaming()
        await db.execute("INSERT INTO silent VALUES (1)")
        await sink.wait_for(1)
        proxy.frozen = True
        await db.execute("INSERT INTO silent VALUES (2)")
        for _ in range(300):
            if not src.ready():
                break
            await asyncio.sleep(0.05)
        assert not src.ready()
        assert "no answer from the server" in src.status()["last_error"]
        proxy.frozen = False
        proxy.cut()  # the half-dead connections end for good (on a real link: the server's timeouts)
        await db.execute("INSERT INTO silent VALUES (3)")
        events = await sink.wait_for(3, timeout=30)
        assert [e.record["id"] for e in events] == [1, 2, 3]
    finally:
        await src.stop()
        await proxy.close()


async def test_catalog_queries_over_a_dead_link_end_with_a_timeout(db, pg_cluster, pg_database):
    """The catalog connection (publication, slot status, TOAST fetches) over a link gone silent:
    a query and a connect end with TimeoutError after the source's receive_timeout, instead of
    holding the catalog's lock (and every subscribe checking a table) until TCP gives up."""
    from rtserver.sources.pg_catalog import Catalog
    from tests.harness.tcpproxy import TcpProxy

    proxy = await TcpProxy(pg_cluster.port).start()
    catalog = Catalog(pg_database.replace(f":{pg_cluster.port}/", f":{proxy.port}/"), schemas=["public"], tables=[],
                      slot="", publication="rt_unused", timeout=1.0)
    try:
        assert await catalog.database() == pg_database.rsplit("/", 1)[1]
        proxy.frozen = True
        for attempt in ("query on the open connection", "connect and query"):
            query = asyncio.ensure_future(catalog.fetch("SELECT 1"))
            done, _ = await asyncio.wait({query}, timeout=60)
            assert query in done, f"{attempt}: hung on the dead link"
            assert isinstance(query.exception(), TimeoutError), (attempt, query.exception())
        proxy.frozen = False
        assert await catalog.database() == pg_database.rsplit("/", 1)[1]  # a new connection, working
    finally:
        await catalog.close()
        await proxy.close()


async def test_a_catalog_connection_the_server_ended_is_replaced_not_left_unusable(db, pg_cluster, pg_database):
    """The server ends the catalog connection (a restart, pg_terminate_backend): its last message
    (FATAL) arrives before its close. asyncpg, having read the one and not yet the other, refused
    every query with InternalClientError ("another operation is in progress"), which nobody
    took for a broken connection: a subscribe checking a table then closed its client with
    1011, and TOAST fetches and the maintenance's checks failed the same way. Nothing was sent
    on it: the query goes to a new connection."""
    from rtserver.sources.pg_catalog import Catalog
    from tests.harness.tcpproxy import TcpProxy

    proxy = await TcpProxy(pg_cluster.port).start()
    catalog = Catalog(pg_database.replace(f":{pg_cluster.port}/", f":{proxy.port}/"), schemas=["public"], tables=[],
                      slot="", publication="rt_unused", timeout=5.0)
    try:
        pid = (await catalog.fetch("SELECT pg_backend_pid() AS pid"))[0]["pid"]
        proxy.linger = True
        await db.execute("SELECT pg_terminate_backend($1)", pid)
        for _ in range(500):
            if proxy.target_closed:
                break
            await asyncio.sleep(0.01)
        assert proxy.target_closed == 1
        await asyncio.sleep(0.2)  # the FATAL message read by asyncpg
        rows = await catalog.fetch("SELECT pg_backend_pid() AS pid")
        assert rows[0]["pid"] != pid  # answered on a new connection
        await catalog.execute("SELECT 1")
    finally:
        await catalog.close()
        await proxy.close()


async def test_a_replication_stream_out_of_sync_is_reopened_at_once(db, pg_cluster, pg_database, tmp_path, caplog):
    """A corrupted replication stream (a message length no message can have): libpq loses
    synchronization and psycopg raises OperationalError from get_copy_data, where the reader
    expected -2. It escaped the socket callback ("Exception in callback" with a traceback) and
    the source learnt of it only when its next status update failed. It is now a stream error
    of the read: the source says why, reopens the stream and loses nothing."""
    from tests.harness.tcpproxy import TcpProxy

    await db.execute("CREATE TABLE garbled (id int PRIMARY KEY)")
    proxy = await TcpProxy(pg_cluster.port).start()
    sink = CollectingSink()
    src = PostgresSource(
        pg_database.replace(f":{pg_cluster.port}/", f":{proxy.port}/"), instance="rtgarbled",
        state_dir=str(tmp_path / "state"), sink=sink, workspaces=lambda: ["w1"], receive_timeout=120.0,
    )
    try:
        await src.start()
        await src.wait_streaming()
        await db.execute("INSERT INTO garbled VALUES (1)")
        await sink.wait_for(1)
        proxy.inject(b"d\x00\x00\x00\x02")  # CopyData whose length is shorter than the length itself
        for _ in range(400):
            if src.status()["last_error"]:
                break
            await asyncio.sleep(0.05)
        assert "replication stream unreadable" in (src.status()["last_error"] or ""), src.status()
        assert "lost synchronization" in src.status()["last_error"]
        await db.execute("INSERT INTO garbled VALUES (2)")
        events = await sink.wait_for(2, timeout=30)
        assert [e.record["id"] for e in events] == [1, 2]
        assert not [r for r in caplog.records if r.name == "asyncio"], "an exception escaped to the event loop"
    finally:
        await src.stop()
        await proxy.close()


async def test_a_failure_after_the_stream_worked_is_retried_at_the_first_backoff_step(db, make_source, caplog):
    """docs/postgres.md: the feed reconnects with backoff, 0.2 s doubling to 10 s. The backoff
    was never reset by a stream that then worked (it only ends by failing): each later outage
    started where the one before had left it, so after a few PostgreSQL restarts or failovers,
    days apart, every reconnect waited the full 10 s, the feed not ready meanwhile."""
    caplog.set_level("WARNING", logger="rtserver.postgres")

    def retries() -> list[float]:
        return [r.fields["retry_in_s"] for r in caplog.records
                if r.getMessage().startswith("postgres source:") and "retry_in_s" in getattr(r, "fields", {})]

    await db.execute("CREATE TABLE bo (id int PRIMARY KEY)")
    src, sink = await make_source()
    for i in range(1, 4):  # three outages, each after the stream had worked
        pid = await db.fetchval("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", src.slot)
        await db.execute("SELECT pg_terminate_backend($1)", pid)
        for _ in range(300):
            if len(retries()) == i:
                break
            await asyncio.sleep(0.02)
        await db.execute("INSERT INTO bo VALUES ($1)", i)
        await sink.wait_for(i, timeout=30)  # streaming again
    assert retries() == [0.2, 0.2, 0.2]
    assert [e.record["id"] for e in sink.events] == [1, 2, 3]
