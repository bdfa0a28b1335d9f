"""PostgreSQL operations a DBA does under a running gateway, each done for real against a
gateway with a subscribed WebSocket client (audit "dbops")."""

from __future__ import annotations

import asyncio
import json
import os
import time

import asyncpg
import pytest

from tests.harness.pgcluster import PgCluster
from tests.harness.wsclient import ws_connect

pytestmark = pytest.mark.postgres


async def _collect(c, seconds: float) -> list[dict]:
    """Every message `c` gets within `seconds`."""
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(await c.recv(timeout=left))
        except TimeoutError:
            break
    return out


async def _subscribed_with_a_first_row(c, db) -> None:
    """`c` subscribed to postgres:t, and the row written next (id 1) reached it: the feed streams."""
    await c.subscribe("postgres:t")
    await db.execute("INSERT INTO t VALUES (1, 1, 'a')")
    assert (await c.recv_event(timeout=10))["record"]["id"] == 1


async def _readyz(gw) -> dict:
    _, body = await gw.get("/readyz")
    return json.loads(body)


def _standby_of(primary: PgCluster) -> PgCluster:
    """A physical standby of `primary` (pg_basebackup -R), started."""
    standby = PgCluster()
    standby.prepare_dirs()
    standby._run(os.path.join(standby.bindir, "pg_basebackup"), "-D", standby.data_dir, "-R", "-X", "stream",
                 "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres", "--no-sync", "-c", "fast")
    with open(os.path.join(standby.data_dir, "postgresql.auto.conf"), "a") as fh:
        fh.write(f"port = {standby.port}\nunix_socket_directories = '{standby.socket_dir}'\n")
    standby.start()
    return standby


@pytest.fixture
def primary_and_standby():
    primary = PgCluster()
    primary.init()
    primary.start()
    standby = None
    try:
        primary.psql("CREATE DATABASE app")
        primary.psql("CREATE TABLE t (id int PRIMARY KEY, v text)", database="app")
        standby = _standby_of(primary)
        yield primary, standby
    finally:
        if standby is not None:
            standby.destroy()
        primary.destroy()


async def test_failover_to_a_promoted_standby_recreates_the_slot_and_announces_the_gap(
        gateway_factory, primary_and_standby):
    primary, standby = primary_and_standby
    url = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/app"
           "?target_session_attrs=read-write")
    gw = await gateway_factory(env={"RT_POSTGRES_URL": url, "RT_INSTANCE": "fo"})
    await gw.wait_ready()
    db = await asyncpg.connect(primary.dsn_for("app"))
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("postgres:t")
        await db.execute("INSERT INTO t VALUES (1, 'before')")
        assert (await c.recv_event(timeout=10))["record"]["id"] == 1
        await db.close()
        # the standby has everything, then the primary dies and the standby is promoted
        for _ in range(100):
            if primary.psql("SELECT count(*) FROM pg_stat_replication WHERE replay_lsn = pg_current_wal_lsn()",
                            ).strip() == "1":
                break
            await asyncio.sleep(0.1)
        primary.stop("immediate")
        started = time.monotonic()
        standby._run(os.path.join(standby.bindir, "pg_ctl"), "-D", standby.data_dir, "-w", "promote")
        new = await asyncpg.connect(standby.dsn_for("app"))
        got, i = [], 100
        while time.monotonic() - started < 60:
            i += 1
            await new.execute("INSERT INTO t VALUES ($1, 'after')", i)
            got += await _collect(c, 0.5)
            if any(m.get("type") == "event" for m in got):
                break
        took = time.monotonic() - started
        await new.close()
        status = await _readyz(gw)
        print("failover took", took, "messages", got, "readyz", status)
        assert any(m.get("type") == "event" for m in got), (got, status, gw.logs()[-4000:])
        kinds = [(m["type"], m.get("code")) for m in got]
        assert ("error", 4011) in kinds, kinds
        assert kinds.index(("error", 4011)) < kinds.index(next(k for k in kinds if k[0] == "event"))


@pytest.fixture
def small_keep_cluster():
    """A cluster whose slots are invalidated past 1 MB of WAL (max_slot_wal_keep_size)."""
    cluster = PgCluster(settings={"max_slot_wal_keep_size": "1MB", "wal_keep_size": "0"})
    cluster.init()
    cluster.start()
    try:
        cluster.psql("CREATE DATABASE app")
        cluster.psql("CREATE TABLE t (id int PRIMARY KEY, v text)", database="app")
        yield cluster
    finally:
        cluster.destroy()


async def _past_the_keep_size(db: asyncpg.Connection, slot: str) -> None:
    """Write WAL segments and checkpoint until `slot` is invalidated."""
    for i in range(40):
        await db.execute("INSERT INTO t VALUES ($1, 'lost') ON CONFLICT (id) DO UPDATE SET v = 'lost'", -1 - i % 3)
        await db.fetchval("SELECT pg_switch_wal()")
        if i % 4 == 3:
            await db.execute("CHECKPOINT")
            status = await db.fetchval("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", slot)
            if status == "lost":
                return
    raise AssertionError("the slot was not invalidated")


async def test_slot_invalidated_by_max_slot_wal_keep_size_while_the_gateway_stalls(gateway_factory,
                                                                                  small_keep_cluster):
    import signal
    cluster = small_keep_cluster
    gw = await gateway_factory(env={"RT_POSTGRES_URL": cluster.dsn_for("app"), "RT_INSTANCE": "inv"})
    await gw.wait_ready()
    db = await asyncpg.connect(cluster.dsn_for("app"))
    try:
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
            await c.subscribe("postgres:t")
            await db.execute("INSERT INTO t VALUES (1, 'before')")
            assert (await c.recv_event(timeout=10))["record"]["id"] == 1
            gw.proc.send_signal(signal.SIGSTOP)
            try:
                await _past_the_keep_size(db, "inv_app")
            finally:
                gw.proc.send_signal(signal.SIGCONT)
            started = time.monotonic()
            got, i = [], 100
            while time.monotonic() - started < 60:
                i += 1
                await db.execute("INSERT INTO t VALUES ($1, 'after')", i)
                got += await _collect(c, 0.5)
                if any(m.get("type") == "event" and m["record"]["v"] == "after" for m in got):
                    break
            print("recovery took", time.monotonic() - started, [(m["type"], m.get("code"), m.get("record"), m.get("message")) for m in got])
            kinds = [(m["type"], m.get("code")) for m in got]
            assert ("error", 4011) in kinds, (kinds, gw.logs()[-4000:])
            assert any(m.get("type") == "event" and m["record"]["v"] == "after" for m in got), got
            status = await _readyz(gw)
            src = next(iter(status["sources"].values()))
            assert src["slot_recreations"] >= 1, src
    finally:
        await db.close()


async def test_slot_invalidated_while_the_gateway_is_stopped(gateway_factory, small_keep_cluster):
    cluster = small_keep_cluster
    gw = await gateway_factory(env={"RT_POSTGRES_URL": cluster.dsn_for("app"), "RT_INSTANCE": "inv"})
    await gw.wait_ready()
    db = await asyncpg.connect(cluster.dsn_for("app"))
    try:
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
            await c.subscribe("postgres:t")
            await db.execute("INSERT INTO t VALUES (1, 'before')")
            assert (await c.recv_event(timeout=10))["record"]["id"] == 1
        await gw.stop()
        await _past_the_keep_size(db, "inv_app")
        await gw.start()
        await gw.wait_ready(timeout=30)
        status = await _readyz(gw)
        src = next(iter(status["sources"].values()))
        print(src, gw.logs()[-3000:])
        assert src["slot_recreations"] == 1, src
        assert "invalidated" in gw.logs()
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
            await c.subscribe("postgres:t")
            await db.execute("INSERT INTO t VALUES (2, 'after')")
            assert (await c.recv_event(timeout=10))["record"]["id"] == 2
    finally:
        await db.close()


@pytest.fixture
async def gw_db(gateway_factory, pg_database):
    conn = await asyncpg.connect(pg_database)
    await conn.execute("CREATE TABLE t (id int PRIMARY KEY, n int, s text)")
    gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "ops"})
    await gw.wait_ready()
    yield gw, conn
    await conn.close()


async def test_alter_table_column_changes_mid_stream(gw_db):
    gw, db = gw_db
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("postgres:t")
        await db.execute("INSERT INTO t VALUES (1, 1, 'a')")
        assert (await c.recv_event(timeout=10))["record"] == {"id": 1, "n": 1, "s": "a"}
        await db.execute("ALTER TABLE t ALTER COLUMN n TYPE bigint")
        await db.execute("INSERT INTO t VALUES (2, 9007199254740000, 'b')")
        assert (await c.recv_event(timeout=10))["record"] == {"id": 2, "n": 9007199254740000, "s": "b"}
        await db.execute("ALTER TABLE t ALTER COLUMN s TYPE jsonb USING to_jsonb(s)")
        await db.execute("""INSERT INTO t VALUES (3, 3, '{"k": [1, 2]}')""")
        assert (await c.recv_event(timeout=10))["record"] == {"id": 3, "n": 3, "s": {"k": [1, 2]}}
        await db.execute("ALTER TABLE t RENAME COLUMN n TO m")
        await db.execute("UPDATE t SET m = 4 WHERE id = 3")
        ev = await c.recv_event(timeout=10)
        assert ev["record"] == {"id": 3, "m": 4, "s": {"k": [1, 2]}}, ev
        await db.execute("ALTER TABLE t ADD COLUMN big text, DROP COLUMN m")
        await db.execute("INSERT INTO t VALUES (5, '{}', repeat('x', 5000))")
        ev = await c.recv_event(timeout=10)
        assert ev["record"] == {"id": 5, "s": {}, "big": "x" * 5000}, ev
        await db.execute("UPDATE t SET s = '[1]' WHERE id = 5")  # big unchanged TOAST: fetched
        ev = await c.recv_event(timeout=10)
        assert ev["record"] == {"id": 5, "s": [1], "big": "x" * 5000}, ev
        # the primary key's type changes: the TOAST fetch by key must follow
        await db.execute("ALTER TABLE t ALTER COLUMN id TYPE text")
        await db.execute("UPDATE t SET s = '[2]' WHERE id = '5'")
        ev = await c.recv_event(timeout=10)
        assert ev["record"] == {"id": "5", "s": [2], "big": "x" * 5000}, ev
        await c.no_message(0.5)


async def test_table_without_a_key_gets_one(gw_db):
    gw, db = gw_db
    await db.execute("CREATE TABLE nk (id int, v text)")
    await db.execute("INSERT INTO nk VALUES (1, 'a')")
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.send({"type": "subscribe", "channel": "postgres:nk"})
        reply = await c.recv(timeout=10)
        assert reply["type"] == "error" and reply["code"] == 4010, reply
        await db.execute("ALTER TABLE nk ADD PRIMARY KEY (id)")
        await asyncio.sleep(3)
        await c.subscribe("postgres:nk")
        await db.execute("INSERT INTO nk VALUES (2, 'b')")
        ev = await c.recv_event(timeout=10)
        assert ev["record"] == {"id": 2, "v": "b"}
        # and back: FULL, then NOTHING
        await db.execute("ALTER TABLE nk REPLICA IDENTITY FULL")
        await db.execute("UPDATE nk SET v = 'c' WHERE id = 2")
        ev = await c.recv_event(timeout=10)
        assert ev["oldRecord"] == {"id": 2, "v": "b"}, ev
        print(await _collect(c, 1))


async def test_alter_publication_drop_table_under_the_feed(gw_db):
    gw, db = gw_db
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await _subscribed_with_a_first_row(c, db)
        await db.execute("ALTER PUBLICATION ops_pub DROP TABLE t")
        await db.execute("INSERT INTO t VALUES (2, 2, 'lost')")
        await asyncio.sleep(3)
        await db.execute("INSERT INTO t VALUES (3, 3, 'after')")
        got = await _collect(c, 3)
        print(got)
        kinds = [(m["type"], m.get("code")) for m in got]
        assert ("error", 4011) in kinds, got
        assert got[-1]["type"] == "event" and got[-1]["record"]["id"] == 3


@pytest.fixture
def tight_cluster():
    """A cluster with one replication slot and one WAL sender, both taken by a physical slot
    and a pg_receivewal-like stream of another consumer."""
    cluster = PgCluster(settings={"max_replication_slots": "1", "max_wal_senders": "1"})
    cluster.init()
    cluster.start()
    try:
        cluster.psql("CREATE DATABASE app")
        cluster.psql("CREATE TABLE t (id int PRIMARY KEY, v text)", database="app")
        yield cluster
    finally:
        cluster.destroy()


async def test_max_replication_slots_exhausted_at_start(gateway_factory, tight_cluster):
    cluster = tight_cluster
    cluster.psql("SELECT pg_create_physical_replication_slot('other')")
    gw = await gateway_factory(env={"RT_POSTGRES_URL": cluster.dsn_for("app"), "RT_INSTANCE": "ex"})
    await asyncio.sleep(3)
    status = await _readyz(gw)
    src = next(iter(status["sources"].values()))
    print(src)
    assert not src["ready"] and "replication slots" in src["last_error"], src
    cluster.psql("SELECT pg_drop_replication_slot('other')")
    await gw.wait_ready(timeout=30)


async def test_max_wal_senders_exhausted_at_start(gateway_factory, tight_cluster):
    import psycopg
    cluster = tight_cluster
    hog = psycopg.connect(cluster.dsn_for("app") + "?replication=database", autocommit=True)
    try:
        gw = await gateway_factory(env={"RT_POSTGRES_URL": cluster.dsn_for("app"), "RT_INSTANCE": "ex"})
        await asyncio.sleep(3)
        status = await _readyz(gw)
        src = next(iter(status["sources"].values()))
        print(src)
        assert not src["ready"] and "max_wal_senders" in src["last_error"], src
    finally:
        hog.close()
    await gw.wait_ready(timeout=30)


async def test_role_loses_replication_mid_stream(gateway_factory, pg_cluster, pg_database):
    admin = await asyncpg.connect(pg_database)
    role = f"rt_ops_{os.getpid()}"
    await admin.execute(f"DROP ROLE IF EXISTS {role}")
    await admin.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    await admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    await admin.execute(f"ALTER TABLE t OWNER TO {role}")
    await admin.execute(f"GRANT CREATE ON DATABASE \"{pg_database.rsplit('/', 1)[1]}\" TO {role}")
    url = pg_database.replace("postgres@", f"{role}@")
    try:
        gw = await gateway_factory(env={"RT_POSTGRES_URL": url, "RT_INSTANCE": "role"})
        await gw.wait_ready()
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
            await c.subscribe("postgres:t")
            await admin.execute("INSERT INTO t VALUES (1)")
            assert (await c.recv_event(timeout=10))["record"]["id"] == 1
            await admin.execute(f"ALTER ROLE {role} NOREPLICATION")
            await admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
            await asyncio.sleep(2)
            src = next(iter((await _readyz(gw))["sources"].values()))
            print(src)
            assert not src["ready"] and "REPLICATION" in src["last_error"], src
            await admin.execute("INSERT INTO t VALUES (2)")
            await admin.execute(f"ALTER ROLE {role} REPLICATION")
            await gw.wait_ready(timeout=30)
            got = await _collect(c, 2)
            print(got)
            assert [m["record"]["id"] for m in got if m["type"] == "event"] == [2]
    finally:
        await admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
        await admin.close()


@pytest.fixture
def streaming_cluster():
    """A cluster that streams transactions over 64 kB of decoded changes (protocol 2)."""
    cluster = PgCluster(settings={"logical_decoding_work_mem": "64kB"})
    cluster.init()
    cluster.start()
    try:
        cluster.psql("CREATE DATABASE app")
        cluster.psql("CREATE TABLE t (id int PRIMARY KEY, v text)", database="app")
        yield cluster
    finally:
        cluster.destroy()


@pytest.mark.parametrize("mode", ["immediate", "fast"])
async def test_postgres_restarted_mid_transaction_stream(gateway_factory, streaming_cluster, mode):
    cluster = streaming_cluster
    gw = await gateway_factory(env={"RT_POSTGRES_URL": cluster.dsn_for("app"), "RT_INSTANCE": "rs"})
    await gw.wait_ready()
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("postgres:t")
        db = await asyncpg.connect(cluster.dsn_for("app"))
        tr = db.transaction()
        await tr.start()
        await db.execute("INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1000, 6000) g")
        for _ in range(100):  # the open transaction was streamed to the gateway
            src = next(iter((await _readyz(gw))["sources"].values()))
            if src["streamed_open"]:
                break
            await asyncio.sleep(0.1)
        assert src["streamed_open"] == 1, src
        cluster.stop(mode)
        db.terminate()
        cluster.start()
        db = await asyncpg.connect(cluster.dsn_for("app"))
        # a committed large transaction right after the restart: delivered once, in order
        await db.execute("INSERT INTO t SELECT g, 'big' FROM generate_series(1, 3000) g")
        await db.execute("INSERT INTO t VALUES (0, 'last')")
        got = []
        while not got or got[-1].get("record", {}).get("v") != "last":
            got.append(await c.recv(timeout=30))
        await db.close()
        ids = [m["record"]["id"] for m in got if m["type"] == "event"]
        assert ids == [*range(1, 3001), 0], ([m for m in got if m["type"] != "event"], ids[:5], len(ids))
        # the transaction the crash ended: PostgreSQL says so (Stream Abort) once it decodes
        # a record of the running transactions (a checkpoint writes one)
        cluster.psql("CHECKPOINT")
        for _ in range(100):
            src = next(iter((await _readyz(gw))["sources"].values()))
            if src["streamed_open"] == 0:
                break
            await asyncio.sleep(0.2)
        assert src["streamed_open"] == 0 and src["streamed_spill_files"] == 0, src


async def test_a_transaction_lost_in_a_crash_does_not_hold_the_slot(gateway_factory, streaming_cluster):
    """A streamed transaction still open when PostgreSQL crashed never commits nor aborts (PG 15
    sends no Stream Abort for it): the gateway must not keep it open for ever, holding back
    the acknowledgement of an idle feed (and so the slot's WAL)."""
    cluster = streaming_cluster
    cluster.psql("CREATE TABLE other (id serial PRIMARY KEY)", database="postgres")
    gw = await gateway_factory(env={"RT_POSTGRES_URL": cluster.dsn_for("app"), "RT_INSTANCE": "rs"})
    await gw.wait_ready()
    db = await asyncpg.connect(cluster.dsn_for("app"))
    tr = db.transaction()
    await tr.start()
    await db.execute("INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1000, 6000) g")
    for _ in range(100):
        src = next(iter((await _readyz(gw))["sources"].values()))
        if src["streamed_open"]:
            break
        await asyncio.sleep(0.1)
    cluster.stop("immediate")
    db.terminate()
    cluster.start()
    other = await asyncpg.connect(cluster.dsn_for("postgres"))
    for i in range(40):  # WAL written by others (another database), checkpoints
        await other.execute("INSERT INTO other DEFAULT VALUES")
        if i % 10 == 9:
            await other.execute("CHECKPOINT")
            await other.fetchval("SELECT pg_switch_wal()")
        await asyncio.sleep(0.5)
    src = next(iter((await _readyz(gw))["sources"].values()))
    slot = await other.fetchrow("SELECT confirmed_flush_lsn::text, pg_current_wal_lsn()::text AS cur, "
                                "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) AS held FROM pg_replication_slots")
    await other.close()
    print(src, dict(slot))
    assert src["streamed_open"] == 0, (src, dict(slot))
    assert slot["held"] < 16 << 20, (src, dict(slot))


async def test_publication_publish_option_altered_under_the_feed(gw_db):
    """A DBA narrows what the publication publishes: UPDATE and DELETE would never stream again."""
    gw, db = gw_db
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await _subscribed_with_a_first_row(c, db)
        await db.execute("ALTER PUBLICATION ops_pub SET (publish = 'insert')")
        await db.execute("UPDATE t SET n = 2 WHERE id = 1")
        await asyncio.sleep(3)
        await db.execute("UPDATE t SET n = 3 WHERE id = 1")
        got = await _collect(c, 3)
        print(got)
        kinds = [(m["type"], m.get("code"), m.get("operation")) for m in got]
        assert kinds and kinds[-1] == ("event", None, "UPDATE"), kinds
        assert ("error", 4011, None) in kinds, kinds


async def test_table_dropped_and_recreated_under_a_subscriber(gw_db):
    """DROP TABLE sends nothing through logical replication: the subscriber of postgres:t kept
    rows of a table that was gone, never told; the recreated table is another one (new OID)."""
    gw, db = gw_db
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("postgres:t")
        await db.execute("INSERT INTO t VALUES (1, 1, 'old')")
        assert (await c.recv_event(timeout=10))["record"]["s"] == "old"
        await db.execute("DROP TABLE t")
        await db.execute("CREATE TABLE t (id int PRIMARY KEY, n int, s text)")
        await asyncio.sleep(3)  # the publication sync has added the new t (empty: no gap for it)
        await db.execute("INSERT INTO t VALUES (2, 2, 'new')")
        got = await _collect(c, 3)
        kinds = [(m["type"], m.get("code")) for m in got]
        assert kinds == [("error", 4011), ("event", None)], got
        assert "table public.t was dropped and created anew" in got[0]["message"]
        assert got[-1]["record"]["s"] == "new"
        # dropped for good: said too
        await db.execute("DROP TABLE t")
        got = [await c.recv(timeout=10)]  # at the next sync (2 s, or 4 s when one was under way)
        got += await _collect(c, 1)
        assert [(m["type"], m.get("code")) for m in got] == [("error", 4011)], got
        assert "table public.t was dropped or renamed" in got[0]["message"]


async def test_database_renamed_leaves_no_slot_behind_unsaid(gateway_factory, small_keep_cluster):
    """The DBA stops the gateway, renames its database and points the gateway at the new name:
    the slot is named after the database, so a new one is made; the old one stays, inactive,
    holding WAL (here until max_slot_wal_keep_size invalidates it; without it, for ever), and
    nothing said so."""
    cluster = small_keep_cluster
    gw = await gateway_factory(env={"RT_POSTGRES_URL": cluster.dsn_for("app"), "RT_INSTANCE": "rn"})
    await gw.wait_ready()
    await gw.stop()
    cluster.psql("ALTER DATABASE app RENAME TO app2")
    state = gw.state_dir
    gw2 = await gateway_factory(env={"RT_POSTGRES_URL": cluster.dsn_for("app2"), "RT_INSTANCE": "rn"},
                                state_dir=state)
    await gw2.wait_ready()
    slots = cluster.psql("SELECT slot_name || ':' || active FROM pg_replication_slots ORDER BY 1").split()
    assert slots == ["rn_app2:true", "rn_app:false"], slots
    errors = [json.loads(line) for line in gw2.logs().splitlines() if '"level":"error"' in line]
    assert [e.get("stray_slot") for e in errors] == ["rn_app"], errors
    assert "SELECT pg_drop_replication_slot('rn_app')" in errors[0]["msg"]


@pytest.mark.parametrize("narrowing", ["WHERE (n > 10)", "(id, n)"])
async def test_publication_row_filter_or_column_list_set_under_the_feed(gw_db, narrowing):
    """A DBA gives the gateway's table a row filter or a column list (PostgreSQL 15): rows it
    filtered out never reached subscribers, events lacked the columns it left out, and nothing
    said so (no log line, no history_gap). The publication is the gateway's: the table is
    published whole again, with a history_gap."""
    gw, db = gw_db
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await _subscribed_with_a_first_row(c, db)
        await db.execute(f"ALTER PUBLICATION ops_pub SET TABLE t {narrowing}")
        await asyncio.sleep(3)
        await db.execute("INSERT INTO t VALUES (2, 2, 'b')")
        got = await _collect(c, 3)
        kinds = [(m["type"], m.get("code")) for m in got]
        assert kinds == [("error", 4011), ("event", None)], got
        assert got[-1]["record"] == {"id": 2, "n": 2, "s": "b"}, got


async def test_failover_with_a_keyword_url_and_a_late_promotion(gateway_factory, primary_and_standby):
    """host=a,b without target_session_attrs: while the standby is not yet promoted the gateway
    reaches it (read-only, no logical decoding) and says why it is not ready; once promoted it
    streams again, with the gap."""
    primary, standby = primary_and_standby
    url = f"host=127.0.0.1,127.0.0.1 port={primary.port},{standby.port} dbname=app user=postgres"
    gw = await gateway_factory(env={"RT_POSTGRES_URL": url, "RT_INSTANCE": "fo"})
    await gw.wait_ready()
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("postgres:t")
        primary.psql("INSERT INTO t VALUES (1, 'before')", database="app")
        assert (await c.recv_event(timeout=10))["record"]["id"] == 1
        primary.stop("immediate")
        await asyncio.sleep(4)
        src = next(iter((await _readyz(gw))["sources"].values()))
        print("before promotion:", src["ready"], src["last_error"])
        assert not src["ready"] and src["last_error"], src
        standby._run(os.path.join(standby.bindir, "pg_ctl"), "-D", standby.data_dir, "-w", "promote")
        started = time.monotonic()
        new = await asyncpg.connect(standby.dsn_for("app"))
        got, i = [], 100
        while time.monotonic() - started < 40:
            i += 1
            await new.execute("INSERT INTO t VALUES ($1, 'after')", i)
            got += await _collect(c, 0.5)
            if any(m.get("type") == "event" for m in got):
                break
        await new.close()
        print("streaming again after", time.monotonic() - started, [(m["type"], m.get("code")) for m in got])
        kinds = [(m["type"], m.get("code")) for m in got]
        assert ("error", 4011) in kinds and kinds[-1] == ("event", None), kinds


async def test_password_changed_under_the_gateway(gateway_factory, small_keep_cluster):
    cluster = small_keep_cluster
    cluster.psql("CREATE ROLE rtpw LOGIN REPLICATION SUPERUSER PASSWORD 'first-s3cret'")
    hba = os.path.join(cluster.data_dir, "pg_hba.conf")
    with open(hba) as fh:
        rest = fh.read()
    with open(hba, "w") as fh:
        fh.write("host all rtpw 127.0.0.1/32 scram-sha-256\nhost replication rtpw 127.0.0.1/32 scram-sha-256\n" + rest)
    cluster.psql("SELECT pg_reload_conf()")
    url = f"postgresql://rtpw:first-s3cret@127.0.0.1:{cluster.port}/app"
    gw = await gateway_factory(env={"RT_POSTGRES_URL": url, "RT_INSTANCE": "pw"})
    await gw.wait_ready()
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("postgres:t")
        cluster.psql("INSERT INTO t VALUES (1, 'a')", database="app")
        assert (await c.recv_event(timeout=10))["record"]["id"] == 1
        cluster.psql("ALTER ROLE rtpw PASSWORD 'second-s3cret'")
        cluster.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'rtpw'")
        await asyncio.sleep(3)
        status = await _readyz(gw)
        src = next(iter(status["sources"].values()))
        print(src["last_error"])
        assert not src["ready"] and "password authentication failed" in src["last_error"], src
        assert "first-s3cret" not in json.dumps(status) and "first-s3cret" not in gw.logs()
        cluster.psql("INSERT INTO t VALUES (2, 'b')", database="app")
        cluster.psql("ALTER ROLE rtpw PASSWORD 'first-s3cret'")  # the DBA sets it back
        await gw.wait_ready(timeout=30)
        assert (await c.recv_event(timeout=10))["record"]["id"] == 2


async def test_slot_dropped_by_a_dba_while_streaming(gw_db, pg_database):
    gw, db = gw_db
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await _subscribed_with_a_first_row(c, db)
        for _ in range(100):
            pid = await db.fetchval("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'ops_' || current_database()")
            if pid:
                await db.execute("SELECT pg_terminate_backend($1)", pid)
            try:
                await db.execute("SELECT pg_drop_replication_slot('ops_' || current_database())")
                break
            except asyncpg.ObjectInUseError:
                await asyncio.sleep(0.02)
        await db.execute("INSERT INTO t VALUES (2, 2, 'maybe lost')")
        got = []
        started = time.monotonic()
        while time.monotonic() - started < 20:
            await db.execute("INSERT INTO t VALUES ($1, 3, 'after') ON CONFLICT DO NOTHING", 100 + len(got))
            got += await _collect(c, 0.5)
            if any(m["type"] == "event" and m["record"]["s"] == "after" for m in got):
                break
        kinds = [(m["type"], m.get("code")) for m in got]
        print(kinds)
        ids = [m["record"]["id"] for m in got if m["type"] == "event"]
        assert ("error", 4011) in kinds or ids[0] == 2, kinds  # row 2 delivered, or the gap says it may be lost
        assert len(ids) == len(set(ids)), ids


async def test_publish_via_partition_root_turned_off_under_the_feed(gw_db):
    """With publish_via_partition_root off, PostgreSQL sends a partition's changes under the
    partition's name: subscribers of the partitioned table's channel miss them."""
    gw, db = gw_db
    await db.execute("CREATE TABLE orders (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)")
    await db.execute("CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu')")
    await asyncio.sleep(3)
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("postgres:orders")
        await db.execute("INSERT INTO orders VALUES (1, 'eu')")
        assert (await c.recv_event(timeout=10))["record"]["id"] == 1
        await db.execute("ALTER PUBLICATION ops_pub SET (publish_via_partition_root = false)")
        await db.execute("INSERT INTO orders VALUES (2, 'eu')")
        await asyncio.sleep(3)
        await db.execute("INSERT INTO orders VALUES (3, 'eu')")
        got = await _collect(c, 3)
        kinds = [(m["type"], m.get("code"), (m.get("record") or {}).get("id")) for m in got]
        print(kinds)
        assert kinds[-1] == ("event", None, 3), kinds
        assert ("event", None, 2) in kinds or ("error", 4011, None) in kinds, kinds
