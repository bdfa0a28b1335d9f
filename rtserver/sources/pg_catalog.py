"""Catalog side of the PostgreSQL source (asyncpg): checks, publication and slot management,
table lookups for `check_channel`, slot health, and fetching unchanged TOAST values by key."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from typing import Any

import asyncpg

log = logging.getLogger("rtserver.postgres")

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")

PRIVILEGES_HELP = (
    "the gateway's PostgreSQL role needs: the REPLICATION attribute (ALTER ROLE <role> REPLICATION), "
    "CREATE on the database (to create its publication) and ownership of the published tables "
    "(or superuser), and SELECT on them; see docs/postgres.md"
)


class SetupError(Exception):
    """The database is not usable as a change feed (wal_level, privileges): not retried quickly."""


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def valid_identifier(name: str) -> bool:
    return bool(_IDENT_RE.match(name))


def slot_name(instance: str, database: str) -> str:
    """Replication slot names are cluster-wide: instance + database, [a-z0-9_], at most 63."""
    db = re.sub(r"[^a-z0-9_]", "_", database.lower())
    name = f"{instance}_{db}"
    if len(name) > 63 or db != database:
        digest = hashlib.sha1(database.encode()).hexdigest()[:8]
        name = f"{instance}_{db[: 63 - len(instance) - 10]}_{digest}"
    return name[:63]


def publication_name(instance: str) -> str:
    return f"{instance}_pub"


class Catalog:
    """One asyncpg connection (re-opened when broken), queries serialized by a lock."""

    def __init__(self, dsn: str, *, schemas: list[str], tables: list[str], slot: str, publication: str):
        self.dsn = dsn
        self.schemas = list(schemas)
        self.tables = list(tables)
        self.slot = slot
        self.publication = publication
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self.published: set[tuple[str, str]] = set()
        self.skipped: dict[tuple[str, str], str] = {}  # table -> why it is not published
        self._key_types: dict[tuple[str, str], dict[str, str]] = {}

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn, server_settings={"application_name": "rtserver-catalog"})
        return self._conn

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self._lock:
            conn = await self._connection()
            try:
                return await conn.fetch(sql, *args)
            except (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, OSError):
                await self._drop()
                raise

    async def execute(self, sql: str, *args: Any) -> None:
        async with self._lock:
            conn = await self._connection()
            try:
                await conn.execute(sql, *args)
            except (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, OSError):
                await self._drop()
                raise

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:  # noqa: BLE001 - closing a broken connection
                conn.terminate()

    # -- set-up ---------------------------------------------------------------------------

    async def database(self) -> str:
        rows = await self.fetch("SELECT current_database() AS db")
        return rows[0]["db"]

    async def check_server(self) -> None:
        rows = await self.fetch(
            "SELECT current_setting('wal_level') AS wal_level, r.rolreplication OR r.rolsuper AS repl "
            "FROM pg_roles r WHERE r.rolname = current_user"
        )
        row = rows[0]
        if row["wal_level"] != "logical":
            raise SetupError(
                f"PostgreSQL wal_level is {row['wal_level']!r}; logical replication needs wal_level=logical "
                "(ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL)"
            )
        if not row["repl"]:
            raise SetupError(f"the role lacks the REPLICATION attribute: {PRIVILEGES_HELP}")

    async def desired_tables(self) -> dict[tuple[str, str], str]:
        """(schema, table) -> replica identity ('d','f','i','n') + has-key flag, for every
        table the configuration asks for that exists."""
        rows = await self.fetch(
            """
            SELECT n.nspname AS schema, c.relname AS name, c.relreplident::text AS ident,
                   EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) AS has_pk
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
              AND (n.nspname = ANY($1::text[])
                   OR (n.nspname || '.' || c.relname) = ANY($2::text[]))
            """,
            [] if self.tables else self.schemas,
            [t if "." in t else f"public.{t}" for t in self.tables],
        )
        out = {}
        for r in rows:
            usable = r["ident"] == "f" or (r["ident"] == "d" and r["has_pk"]) or r["ident"] == "i"
            out[(r["schema"], r["name"])] = "ok" if usable else "no-key"
        return out

    async def sync_publication(self) -> set[tuple[str, str]]:
        """Create the publication or bring its table list up to date; returns what it publishes.

        A table without a primary key (and without REPLICA IDENTITY FULL) is left out: once
        published, PostgreSQL would refuse writers' UPDATE and DELETE on it."""
        desired = await self.desired_tables()
        wanted = {t for t, state in desired.items() if state == "ok"}
        skipped = {t: "it has no primary key; set REPLICA IDENTITY FULL to publish it" for t, s in desired.items() if s != "ok"}
        for t in skipped.keys() - self.skipped.keys():
            log.warning(
                "postgres table %s.%s not published: %s", t[0], t[1], skipped[t],
                extra={"fields": {"source": "postgres", "table": f"{t[0]}.{t[1]}"}},
            )
        self.skipped = skipped
        exists = await self.fetch("SELECT 1 FROM pg_publication WHERE pubname = $1", self.publication)
        try:
            if not exists:
                tables = ", ".join(f"{quote_ident(s)}.{quote_ident(n)}" for s, n in sorted(wanted))
                sql = f"CREATE PUBLICATION {quote_ident(self.publication)}"
                if tables:
                    sql += f" FOR TABLE {tables}"
                await self.execute(sql)
                current = set(wanted)
            else:
                rows = await self.fetch(
                    "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1", self.publication
                )
                current = {(r["schemaname"], r["tablename"]) for r in rows}
                add = wanted - current
                drop = current - wanted
                if add:
                    names = ", ".join(f"{quote_ident(s)}.{quote_ident(n)}" for s, n in sorted(add))
                    await self.execute(f"ALTER PUBLICATION {quote_ident(self.publication)} ADD TABLE {names}")
                if drop:
                    names = ", ".join(f"{quote_ident(s)}.{quote_ident(n)}" for s, n in sorted(drop))
                    await self.execute(f"ALTER PUBLICATION {quote_ident(self.publication)} DROP TABLE {names}")
                current = (current | add) - drop
        except asyncpg.InsufficientPrivilegeError as exc:
            raise SetupError(f"cannot create or alter publication {self.publication}: {exc}; {PRIVILEGES_HELP}") from exc
        self.published = current
        return current

    async def ensure_slot(self) -> bool:
        """Create the permanent slot when missing; True when it was created now."""
        rows = await self.fetch("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", self.slot)
        if rows:
            return False
        try:
            await self.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", self.slot)
        except asyncpg.DuplicateObjectError:
            return False
        except asyncpg.InsufficientPrivilegeError as exc:
            raise SetupError(f"cannot create replication slot {self.slot}: {exc}; {PRIVILEGES_HELP}") from exc
        return True

    async def drop_slot(self) -> None:
        rows = await self.fetch("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", self.slot)
        if rows and rows[0]["active_pid"] is not None:
            await self.execute("SELECT pg_terminate_backend($1)", rows[0]["active_pid"])
            await asyncio.sleep(0.2)
        if rows:
            await self.execute("SELECT pg_drop_replication_slot($1)", self.slot)

    async def slot_status(self) -> dict[str, Any] | None:
        rows = await self.fetch(
            """
            SELECT wal_status, confirmed_flush_lsn::text AS confirmed,
                   pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS lag_bytes,
                   safe_wal_size
            FROM pg_replication_slots WHERE slot_name = $1
            """,
            self.slot,
        )
        if not rows:
            return None
        return dict(rows[0])

    async def array_elements(self, oids: list[int]) -> dict[int, int]:
        """Element type of each array type among `oids` (for non-built-in array types)."""
        rows = await self.fetch(
            "SELECT oid::int8 AS oid, typelem::int8 AS elem FROM pg_type WHERE oid = ANY($1::oid[]) AND typcategory = 'A'",
            oids,
        )
        return {r["oid"]: r["elem"] for r in rows}

    async def table_exists(self, schema: str, name: str) -> bool:
        rows = await self.fetch(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
            schema, name,
        )
        return bool(rows)

    async def fetch_columns(self, schema: str, name: str, key: dict[str, Any], columns: list[str]) -> dict[str, str | None] | None:
        """Current text values of `columns` of the row whose key is `key` (None: no such row)."""
        types = self._key_types.get((schema, name))
        if types is None:
            rows = await self.fetch(
                "SELECT a.attname AS col, format_type(a.atttypid, NULL) AS typ FROM pg_attribute a "
                "WHERE a.attrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                schema, name,
            )
            types = {r["col"]: r["typ"] for r in rows}
            self._key_types[(schema, name)] = types
        where = " AND ".join(f"{quote_ident(k)} = ${i + 1}::text::{types.get(k, 'text')}" for i, k in enumerate(key))
        cols = ", ".join(f"{quote_ident(c)}::text" for c in columns)
        sql = f"SELECT {cols} FROM {quote_ident(schema)}.{quote_ident(name)} WHERE {where}"
        args = [v if isinstance(v, str) else _text_of(v) for v in key.values()]
        rows = await self.fetch(sql, *args)
        if not rows:
            return None
        return {c: rows[0][i] for i, c in enumerate(columns)}

    def forget_types(self, schema: str, name: str) -> None:
        self._key_types.pop((schema, name), None)


def _text_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
