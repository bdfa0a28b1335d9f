"""pytest fixtures for PostgreSQL: one throwaway cluster per session, a fresh database per test.

`pg_cluster` (session): a running `PgCluster` (`.dsn`, `.port`, `.stop()/.start()/.restart()`,
`.dsn_for(db)`). `pg_database` (function): the DSN of a new, empty database; at the end of the
test its replication slots are dropped and the database with them, so tests never see each
other's slots or publications.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import psycopg
import pytest

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
        for _ in range(50):
            rows = conn.execute(
                "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s", (name,)
            ).fetchall()
            if not rows:
                break
            for slot, pid in rows:
                if pid is not None:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                try:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                except psycopg.errors.ObjectInUse:
                    pass  # the walsender is still exiting; retried on the next round
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        if own:
            conn.close()


@pytest.fixture
def pg_database(pg_cluster: PgCluster) -> Iterator[str]:
    name = f"rt_test_{os.getpid()}_{next(_db_counter)}"
    dsn = create_database(pg_cluster, name)
    try:
        yield dsn
    finally:
        if pg_cluster.running():
            drop_database(pg_cluster, name)
