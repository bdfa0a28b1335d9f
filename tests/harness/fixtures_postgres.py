"""pytest fixtures for PostgreSQL: one throwaway cluster per session, a fresh database per test.

`pg_cluster` (session): a running `PgCluster` (`.dsn`, `.port`, `.stop()/.start()/.restart()`,
`.dsn_for(db)`). `pg_database` (function): the DSN of a new, empty database; at the end of the
test its replication slots are dropped and the database with them, so tests never see each
other's slots or publications.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import sys
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import psycopg
import pytest

from tests.harness.fixtures_gateway import failed_call
from tests.harness.pgcluster import ClusterError, PgCluster

_db_counter = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    try:
        cluster = PgCluster()
    except ClusterError as exc:
        pytest.skip(f"PostgreSQL not available: {exc}")
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def _admin(cluster: PgCluster) -> psycopg.Connection:
    return psycopg.connect(cluster.dsn, autocommit=True)


def create_database(cluster: PgCluster, name: str) -> str:
    """Create database `name` on `cluster` (dropping a leftover first); returns its DSN."""
    if not cluster.running():
        cluster.start()
    with _admin(cluster) as conn:
        drop_database(cluster, name, conn)
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    return cluster.dsn_for(name)


def drop_database(cluster: PgCluster, name: str, conn: psycopg.Connection | None = None) -> None:
    """Drop `name` with its replication slots (a slot pins its database)."""
    own = conn is None
    conn = conn or _admin(cluster)
    try:
        # A gateway still running (fixtures are torn down before gateway_factory stops it)
        # reconnects its replication stream as soon as its walsender is terminated, and its
        # plain connection, left open, made the slot anew: the slot was active again when DROP
        # DATABASE came. New connections are refused, every backend of the database ended (the
        # plain ones too), and the drop retried until nothing holds a slot.
        with contextlib.suppress(psycopg.errors.InvalidCatalogName):
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        # A deadline, not a count of rounds: on a loaded machine a terminated walsender took
        # longer than 50 rounds of 0.1 s to let go of its slot.
        deadline = time.monotonic() + 30
        while True:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            for (slot,) in conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
            ).fetchall():
                try:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                except psycopg.errors.ObjectInUse:
                    pass  # its walsender is still exiting; retried on the next round
            try:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except psycopg.errors.ObjectInUse as exc:
                if time.monotonic() > deadline:
                    holders = conn.execute(
                        "SELECT s.slot_name, a.pid, a.backend_type, a.state, a.wait_event"
                        " FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid"
                        " WHERE s.database = %s",
                        (name,),
                    ).fetchall()
                    raise AssertionError(f"database {name} still held after 30 s: {holders}") from exc
            time.sleep(0.1)
    finally:
        if own:
            conn.close()


@pytest.fixture
def pg_database(pg_cluster: PgCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"rt_test_{os.getpid()}_{next(_db_counter)}"
    dsn = create_database(pg_cluster, name)
    try:
        yield dsn
    finally:
        if failed_call(request):
            # What the server said of the test's walsenders and sessions (the cluster serves
            # the whole run: its log outlives the test, but not the run).
            print(f"--- PostgreSQL server log (database {name}) ---\n{pg_cluster.log_tail(60)}", file=sys.stderr)
        if pg_cluster.running():
            drop_database(pg_cluster, name)


@contextlib.asynccontextmanager
async def databases_named_alike(
    cluster: PgCluster, config_dir: pathlib.Path
) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection, pathlib.Path]]:
    """A database of one name on `cluster` and on a second, throwaway server, each with a table
    t (id int PRIMARY KEY, v text): connections to both, and a config file giving workspace a
    the first and workspace b the second. Their sources' slots are named alike."""
    name = f"rt_alike_{os.getpid()}"
    other = PgCluster()
    other.init()
    other.start()
    conns: list[asyncpg.Connection] = []
    try:
        dsn_a, dsn_b = create_database(cluster, name), create_database(other, name)
        for dsn in (dsn_a, dsn_b):
            conns.append(await asyncpg.connect(dsn))
            await conns[-1].execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        config = config_dir / "rt.toml"
        config.write_text(f"[workspaces.a]\npostgres_url = '{dsn_a}'\n[workspaces.b]\npostgres_url = '{dsn_b}'\n")
        yield conns[0], conns[1], config
    finally:
        for conn in conns:
            await conn.close()
        drop_database(cluster, name)
        other.destroy()


async def put_wal_ahead(db: asyncpg.Connection) -> None:
    """Move `db`'s server's WAL far ahead (a new segment, twice) with changes to t: ids -1, -1,
    then 0. Positions of that server are then above the other's."""
    for _ in range(2):
        await db.execute("INSERT INTO t VALUES (-1, 'a') ON CONFLICT (id) DO UPDATE SET v = 'a'")
        await db.fetchval("SELECT pg_switch_wal()")
    await db.execute("INSERT INTO t VALUES (0, 'a, last')")
