"""Catalog side of the PostgreSQL source (asyncpg): checks, publication and slot management,
table lookups for `check_channel`, slot health, and fetching unchanged TOAST values by key."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

import asyncpg
import psycopg.conninfo

from rtserver.channels import qualified_tables, unconfigured_table, valid_table_name
from rtserver.config import LIBPQ_CLIENT_ONLY
from rtserver.redact import redact
from rtserver.sources.pg_stream import SESSION_SETTINGS

log = logging.getLogger("rtserver.postgres")

# What the publication must publish (its `publish` option): every change a channel carries.
PUBLISHED_OPERATIONS = ("insert", "update", "delete", "truncate")
MIN_SERVER_VERSION = 140000  # server_version_num of PostgreSQL 14 (docs/postgres.md, "Requirements")
PRIVILEGES_HELP = (
    "the gateway's PostgreSQL role needs: the REPLICATION attribute (ALTER ROLE <role> REPLICATION), "
    "CREATE on the database (to create its publication) and ownership of the published tables "
    "(or superuser), and SELECT on them; see docs/postgres.md"
)


# No JIT: the query of the configured tables (desired_tables) is estimated above
# jit_above_cost in a database of a few hundred tables, and compiling it took ~340 ms for
# ~1 ms of work (200 tables, measured), under the lock every catalog query takes, at every
# maintenance sync (2 s) and at each subscribe to a table the publication leaves out.
CATALOG_SETTINGS = {"jit": "off"}


class TableState(NamedTuple):
    why: str  # why the table is not published; "" when it is (or should be)
    owned: bool  # the gateway's role owns it (or is a member of its owner): it may add it
    owner: str
    warning: str = ""  # what a published table's events lack, for the log
    oid: int = 0  # its pg_class OID: a table dropped and created anew under its name has another
    partitioned: bool = False  # a partitioned table (its changes come via the partition root)


class SetupError(Exception):
    """The database is not usable as a change feed (wal_level, privileges): not retried quickly."""


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def slot_name(instance: str, database: str) -> str:
    """Replication slot names are cluster-wide: instance + database, [a-z0-9_], at most 63."""
    db = re.sub(r"[^a-z0-9_]", "_", database.lower())
    name = f"{instance}_{db}"
    if len(name) > 63 or db != database:
        digest = hashlib.sha1(database.encode()).hexdigest()[:8]
        name = f"{instance}_{db[: 63 - len(instance) - 10]}_{digest}"
    return name[:63]


def server_digest(dsn: str, database: str) -> str:
    """12 hex digits naming the server (host and port as `dsn` gives them) and the database: the
    slot's name holds the database's only, and two servers may each have a database so named."""
    host, port = _server(dsn)
    return hashlib.sha256(f"{host}|{port}|{database}".encode()).hexdigest()[:12]


def _server(dsn: str) -> tuple[str, str]:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    return str(params.get("host") or params.get("hostaddr") or "").lower(), str(params.get("port") or "5432")


def database_location(dsn: str) -> tuple[str, str, str] | None:
    """(host, port, database) as `dsn` gives them, whatever its options and user: None when
    only the server or the environment knows the database (see named_database)."""
    database = named_database(dsn)
    return None if database is None else (*_server(dsn), database)


def position_name(slot: str, dsn: str, database: str) -> str:
    """The name of a source's files under state_dir: `slot-digest` (slots hold no '-')."""
    return f"{slot}-{server_digest(dsn, database)}"


def named_database(dsn: str) -> str | None:
    """The database `dsn` names without asking the server (libpq takes the user's name when it
    names none); None when only the server or the environment knows (a service file, PGDATABASE)."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    if "service" in params:
        return None
    return str(params.get("dbname") or params.get("user") or "") or None


def unavailable(channel_table: str, exc: BaseException) -> str:
    """A client's 4010 for a database the gateway could not ask: the kind of error only. The
    driver's text names hosts, ports, roles and databases, the operator's business (the
    source's log and /readyz say it), not any client's of the workspace."""
    return f"postgres:{channel_table}: database unavailable ({type(exc).__name__})"


def publication_name(instance: str) -> str:
    return f"{instance}_pub"


def asyncpg_dsn(dsn: str) -> str:
    """`dsn` as libpq reads it (the replication stream, the start-up check), handed to asyncpg
    as query parameters. asyncpg parses a URL with urllib, which ends the user info at a '#' or
    '?' that libpq takes as part of the password (and then quoted the password in its error:
    "invalid literal for int() with base 10: 's3cret'"), and refuses keyword/value strings.
    Without the parameters only libpq reads (config.LIBPQ_CLIENT_ONLY)."""
    params = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items() if k not in LIBPQ_CLIENT_ONLY}
    if "port" in params:  # "h1,h2" is the port ",": libpq's default (5432) for each, int("") to asyncpg
        params["port"] = ",".join(p or "5432" for p in params["port"].split(","))
    return "postgresql://?" + urllib.parse.urlencode(params)


class Catalog:
    """One asyncpg connection (re-opened when broken), queries serialized by a lock."""

    def __init__(self, dsn: str, *, schemas: list[str], tables: list[str], slot: str, publication: str,
                 timeout: float | None = None):
        self.dsn = dsn
        # Bounds the connect and each query: a link that died without a reset would otherwise
        # hold a query, and the lock behind it, until TCP gives up (the slot's creation, which
        # waits for running transactions, is the one query left unbounded).
        self.timeout = timeout
        self.schemas = list(schemas)
        self.tables = list(tables)
        self.slot = slot
        self.publication = publication
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self.published: set[tuple[str, str]] = set()
        self.skipped: dict[tuple[str, str], str] = {}  # table -> why it is not published
        self._warned: dict[tuple[str, str], str] = {}  # published table -> what its events lack
        self._missing: set[str] = set()  # tables postgres.tables names that the database lacks (logged)
        self._key_types: dict[tuple[str, str], dict[str, str]] = {}
        self._sync_lock = asyncio.Lock()  # the periodic sync and a subscribe's must not interleave
        # Why changes were lost, found by the syncs since the source last took them: the publish
        # option left operations out (_ensure_publication), a published table is no more
        # (_no_longer_published). The source takes them to announce history_gap.
        self.losses: list[str] = []
        self._published_oids: dict[tuple[str, str], int] = {}  # of the tables published, by the last sync
        self.partitioned = False  # the configured tables include a partitioned one (last sync)

    def _log_fields(self) -> dict[str, Any]:
        return {"source": "postgres", "slot": self.slot, "publication": self.publication, "url": redact(self.dsn)}

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            # the stream's session settings: values fetched here (unchanged TOAST columns) must
            # have the text formats of the values the stream sends
            self._conn = await asyncpg.connect(
                asyncpg_dsn(self.dsn),
                server_settings={"application_name": "rtserver-catalog", **SESSION_SETTINGS, **CATALOG_SETTINGS},
                timeout=self.timeout or 60,
            )
        return self._conn

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._run(lambda conn: conn.fetch(sql, *args, timeout=self.timeout))

    async def execute(self, sql: str, *args: Any, bounded: bool = True) -> None:
        await self._run(lambda conn: conn.execute(sql, *args, timeout=self.timeout if bounded else None))

    async def _run(self, query: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        """`query` on the connection, under the lock."""
        async with self._lock:
            try:
                return await self._once(query)
            except asyncpg.InternalClientError:
                # The server ended the connection (a restart, pg_terminate_backend): its FATAL
                # message was read, its close not yet, and asyncpg refuses any query before
                # sending it. Once more, on a new connection.
                pass
            try:
                return await self._once(query)
            except asyncpg.InternalClientError as exc:  # no error the callers expect: the broken link it is
                raise ConnectionResetError(f"PostgreSQL catalog connection unusable: {exc}") from exc

    async def _once(self, query: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        """`query` on the connection; a broken one is dropped (the next query opens another)."""
        conn = await self._connection()
        try:
            return await query(conn)
        except (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                OSError):  # OSError: timeouts too
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

    async def identity(self) -> tuple[int, int] | None:
        """(the cluster's system identifier, the database's OID): the same whichever host name
        or address reaches it; None when the role may not read the cluster's control data."""
        try:
            rows = await self.fetch(
                "SELECT (SELECT system_identifier FROM pg_control_system()) AS sysid, "
                "(SELECT oid FROM pg_database WHERE datname = current_database()) AS db")
        except asyncpg.InsufficientPrivilegeError:
            return None
        return int(rows[0]["sysid"]), int(rows[0]["db"])

    async def check_server(self) -> None:
        rows = await self.fetch(
            "SELECT current_setting('wal_level') AS wal_level, r.rolreplication OR r.rolsuper AS repl, "
            "current_setting('server_version_num')::int AS version, current_setting('server_version') AS shown "
            "FROM pg_roles r WHERE r.rolname = current_user"
        )
        row = rows[0]
        check_version(row["version"], row["shown"])
        if row["wal_level"] != "logical":
            raise SetupError(
                f"PostgreSQL wal_level is {row['wal_level']!r}; logical replication needs wal_level=logical "
                "(ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL)"
            )
        if not row["repl"]:
            raise SetupError(f"the role lacks the REPLICATION attribute: {PRIVILEGES_HELP}")

    def configured(self, schema: str, name: str) -> bool:
        """Whether the configuration asks for this table (the scope of desired_tables)."""
        return not self.unconfigured(schema, name)

    def unconfigured(self, schema: str, name: str) -> str:
        """Why the configuration leaves schema.name out ("" when it asks for it)."""
        return unconfigured_table(self.schemas, self.tables, schema, name)

    async def desired_tables(self) -> dict[tuple[str, str], TableState]:
        """(schema, table) -> its TableState, for every table the configuration asks for that exists."""
        # A partitioned table is published as a whole (publish_via_partition_root): its partitions
        # are not published themselves. PostgreSQL checks the replica identity of the partition a
        # row is in, not its root's ...
        bare = f"CASE WHEN c.relkind = 'p' THEN {_partitions_where('NOT ' + _has_identity('p'))} END"
        # ... and takes the old row from it: FULL on the partitioned table alone gives key columns
        not_full = "CASE WHEN c.relkind = 'p' AND c.relreplident = 'f' THEN " + _partitions_where("p.relreplident <> 'f'") + " END"
        rows = await self.fetch(
            f"""
            SELECT n.nspname AS schema, c.relname AS name, c.relreplident::text AS ident,
                   c.relkind::text AS kind, c.relispartition AS partition, c.oid::int8 AS oid,
                   CASE WHEN c.relispartition THEN pg_partition_root(c.oid)::regclass::text END AS root,
                   pg_has_role(c.relowner, 'USAGE') AS owned, pg_get_userbyid(c.relowner) AS owner,
                   EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) AS has_pk,
                   EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident) AS has_ident_index,
                   {bare} AS bare_partitions, {not_full} AS not_full_partitions
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p')
              AND (n.nspname = ANY($1::text[])
                   OR (n.nspname || '.' || c.relname) = ANY($2::text[]))
            """,
            [] if self.tables else self.schemas,
            sorted(qualified_tables(self.tables)),
        )
        out = {}
        for r in rows:
            out[(r["schema"], r["name"])] = TableState(self._unpublishable(r), r["owned"], r["owner"],
                                                       _not_full_partitions(r["not_full_partitions"] or []), r["oid"],
                                                       r["kind"] == "p")
        return out

    def _unpublishable(self, r: asyncpg.Record) -> str:
        """Why the table of catalog row `r` is not published ("": it is)."""
        if not (valid_table_name(r["schema"]) and valid_table_name(r["name"])):
            # public."a.b" would stream on postgres:a.b, the channel of table b of schema a
            return ("its name holds '.', '\"' or a control character, which a channel name "
                    "(postgres:schema.table) cannot carry: rename it to publish it")
        if r["partition"]:
            return f"it is a partition of {r['root']}: its changes are published under that table"
        # without a replica identity PostgreSQL refuses every writer's UPDATE and DELETE once published
        ident = r["ident"]
        if ident == "f" or (ident == "d" and r["has_pk"]) or (ident == "i" and r["has_ident_index"]):
            return _bare_partitions(r["bare_partitions"] or [])
        if ident == "n":
            return ("its REPLICA IDENTITY is NOTHING; set REPLICA IDENTITY DEFAULT (with a primary key) or FULL "
                    "to publish it")
        if ident == "i":
            # PostgreSQL keeps relreplident 'i' when the index goes, and then treats it as NOTHING
            return ("the index of its REPLICA IDENTITY USING INDEX was dropped; set REPLICA IDENTITY DEFAULT "
                    "(with a primary key), USING INDEX another one or FULL to publish it")
        return "it has no primary key; set REPLICA IDENTITY FULL to publish it"

    async def sync_publication(self) -> list[tuple[str, str]]:
        """Create the publication or bring its table list up to date, one table at a time, so a
        table that cannot be added (not owned by the gateway's role) does not hold back the others.

        A table without a replica identity (no primary key under DEFAULT, NOTHING, or USING INDEX
        whose index was dropped) is left out: once published, PostgreSQL would refuse writers'
        UPDATE and DELETE on it. Returns the tables added to an already existing publication that
        hold rows: what was written to them before was not captured (pgoutput publishes a table's
        changes from its addition on)."""
        async with self._sync_lock:
            return await self._sync_publication()

    async def _sync_publication(self) -> list[tuple[str, str]]:
        desired = await self.desired_tables()
        self.partitioned = any(state.partitioned for state in desired.values())
        self._log_missing(desired)
        wanted = {t for t, state in desired.items() if not state.why}
        skipped = {t: state.why for t, state in desired.items() if state.why}
        try:
            created = await self._ensure_publication()
        except asyncpg.InsufficientPrivilegeError as exc:
            raise SetupError(f"cannot create or alter publication {self.publication}: {exc}; {PRIVILEGES_HELP}") from exc
        explicit, listed, narrowed = await self._members()
        current = explicit | (listed & desired.keys())  # also what a FOR ALL TABLES / TABLES IN SCHEMA covers
        for t in sorted(narrowed & wanted):
            await self._widen_table(t)
        late = []
        for t in sorted(wanted - current):
            why = await self._add_table(t, desired[t])
            if why:
                skipped[t] = why
                continue
            current.add(t)
            if not created and await self._has_rows(t):
                late.append(t)
        for t in sorted(explicit - wanted):
            if await self._drop_table(t):
                current.discard(t)
        self._log_skipped(skipped)
        self.skipped = skipped
        self._log_warnings({t: state.warning for t, state in desired.items() if state.warning and not state.why})
        self.published = current & wanted
        self._no_longer_published(desired)
        return late

    def _no_longer_published(self, desired: Mapping[tuple[str, str], TableState]) -> None:
        """A table the last sync published that is gone (dropped, renamed), was replaced by a new
        one of its name (another OID) or is left out now (it lost its replica identity): logical
        replication sends nothing for that, and its subscribers kept its rows, never to hear of
        them again. A loss each (self.losses), so clients reload."""
        for t, oid in sorted(self._published_oids.items()):
            state = desired.get(t)
            table = f"{t[0]}.{t[1]}"
            if state is None:
                why = f"table {table} was dropped or renamed"
            elif state.oid != oid:
                why = f"table {table} was dropped and created anew"
            elif state.why:
                why = f"table {table} is no longer published: {state.why}"
            else:
                continue
            self.losses.append(f"{why}: subscribers may hold rows it no longer has")
            log.warning("postgres %s", why, extra={"fields": {**self._log_fields(), "table": table}})
        self._published_oids = {t: desired[t].oid for t in self.published}

    async def _ensure_publication(self) -> bool:
        """Create the (empty) publication when missing; True when it was created now."""
        rows = await self.fetch(
            "SELECT pubviaroot, pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
            self.publication)
        name = quote_ident(self.publication)
        if not rows:
            await self.execute(f"CREATE PUBLICATION {name} WITH (publish_via_partition_root = true)")
            return True
        if not rows[0]["pubviaroot"]:
            # a publication made before, or altered by a DBA: partitioned tables' changes must come
            # under their own name; those of partitions sent meanwhile missed its subscribers
            await self.execute(f"ALTER PUBLICATION {name} SET (publish_via_partition_root = true)")
            if self.partitioned:
                lost = (f"publication {self.publication} did not publish via the partition root: changes to "
                        "partitions came under the partitions' names, not their partitioned table's "
                        "(publish_via_partition_root is restored)")
                self.losses.append(lost)
                log.error("postgres %s", lost, extra={"fields": self._log_fields()})
        left_out = [op for op in PUBLISHED_OPERATIONS if not rows[0][f"pub{op}"]]
        if left_out:
            # narrowed by a DBA (ALTER PUBLICATION ... SET (publish = 'insert')), or made so: those
            # changes were never sent, and would never be
            await self.execute(f"ALTER PUBLICATION {name} SET (publish = '{', '.join(PUBLISHED_OPERATIONS)}')")
            lost = (f"publication {self.publication} did not publish {', '.join(left_out)}: those changes "
                    "were not captured (its publish option is restored)")
            self.losses.append(lost)
            log.error("postgres %s", lost, extra={"fields": self._log_fields()})
        return False

    async def _members(self) -> tuple[set[tuple[str, str]], set[tuple[str, str]], set[tuple[str, str]]]:
        """(the tables added to the publication by name, every table it publishes, those of the
        first with a row filter or a column list)."""
        # prqual and prattrs came in PostgreSQL 15: read through to_jsonb, absent (null) on 14
        rows = await self.fetch(
            "SELECT n.nspname AS schema, c.relname AS name, "
            "(to_jsonb(pr) ->> 'prqual') IS NOT NULL OR (to_jsonb(pr) ->> 'prattrs') IS NOT NULL AS narrowed "
            "FROM pg_publication_rel pr "
            "JOIN pg_publication p ON p.oid = pr.prpubid JOIN pg_class c ON c.oid = pr.prrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = $1",
            self.publication,
        )
        explicit = {(r["schema"], r["name"]) for r in rows}
        narrowed = {(r["schema"], r["name"]) for r in rows if r["narrowed"]}
        rows = await self.fetch(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1", self.publication
        )
        return explicit, {(r["schemaname"], r["tablename"]) for r in rows}, narrowed

    async def _widen_table(self, t: tuple[str, str]) -> None:
        """Take the row filter or column list a DBA gave table `t` in the publication away (it
        is dropped and added again in one transaction): rows it filtered out never reached
        subscribers, and columns it left out were missing from their events. A loss
        (self.losses), so clients reload."""
        table = f"{t[0]}.{t[1]}"
        name = quote_ident(self.publication)
        try:
            await self.execute(f"ALTER PUBLICATION {name} DROP TABLE {_qualified(t)}; "
                               f"ALTER PUBLICATION {name} ADD TABLE {_qualified(t)}")
        except asyncpg.PostgresError as exc:
            log.error(
                "postgres table %s has a row filter or column list in publication %s that could not be taken away: "
                "%s", table, self.publication, exc, extra={"fields": {**self._log_fields(), "table": table}})
            return
        lost = (f"table {table} had a row filter or a column list in publication {self.publication}: rows or "
                "columns it left out were not captured (it is published whole again)")
        self.losses.append(lost)
        log.error("postgres %s", lost, extra={"fields": {**self._log_fields(), "table": table}})

    async def _add_table(self, t: tuple[str, str], state: TableState) -> str:
        """ALTER PUBLICATION ... ADD TABLE t; returns why it could not be added ("" when it was)."""
        if not state.owned:
            # checked first: a failing statement every sync would fill the server's log
            return (
                f"the gateway's role does not own it (its owner is {state.owner}) and PostgreSQL lets only a "
                f"table's owner add it to a publication: GRANT {quote_ident(state.owner)} TO the gateway's role, "
                f"or have a superuser run ALTER PUBLICATION {quote_ident(self.publication)} ADD TABLE {_qualified(t)}"
            )
        try:
            await self.execute(f"ALTER PUBLICATION {quote_ident(self.publication)} ADD TABLE {_qualified(t)}")
        except asyncpg.DuplicateObjectError:
            return ""  # added meanwhile (another statement, a concurrent sync)
        except asyncpg.UndefinedTableError:
            return "it was dropped while being added"
        except (asyncpg.InsufficientPrivilegeError, asyncpg.ObjectNotInPrerequisiteStateError,
                asyncpg.FeatureNotSupportedError, asyncpg.WrongObjectTypeError) as exc:
            return f"it cannot be added to publication {self.publication}: {exc}"
        return ""

    async def _drop_table(self, t: tuple[str, str]) -> bool:
        try:
            await self.execute(f"ALTER PUBLICATION {quote_ident(self.publication)} DROP TABLE {_qualified(t)}")
        except (asyncpg.UndefinedObjectError, asyncpg.UndefinedTableError):
            return True  # not a member any more
        except asyncpg.PostgresError as exc:
            log.warning(
                "postgres table %s.%s could not be removed from publication %s: %s", t[0], t[1], self.publication, exc,
                extra={"fields": {**self._log_fields(), "table": f"{t[0]}.{t[1]}"}},
            )
            return False
        return True

    async def _has_rows(self, t: tuple[str, str]) -> bool:
        try:
            rows = await self.fetch(f"SELECT EXISTS (SELECT 1 FROM {_qualified(t)}) AS any")
        except asyncpg.PostgresError:
            pass  # no SELECT privilege (the role needs it for TOAST values only)
        else:
            return bool(rows[0]["any"])
        try:
            # Its files and its partitions' have no page yet (which needs no privilege): never
            # written to. Every new table of a role without SELECT gave a history_gap for nothing.
            rows = await self.fetch(
                "SELECT pg_relation_size($1::regclass) + COALESCE(sum(pg_relation_size(relid)), 0) AS size "
                "FROM pg_partition_tree($1::regclass)",
                _qualified(t))
        except asyncpg.PostgresError:
            return True  # cannot tell: assume changes were missed
        return rows[0]["size"] > 0

    def _log_skipped(self, skipped: dict[tuple[str, str], str]) -> None:
        """Each table left out is logged once (and again when the reason changes)."""
        for t, why in skipped.items():
            if self.skipped.get(t) == why or why.startswith("it is a partition"):
                continue
            # a table the configuration names that cannot be added is an error; no key, a warning
            level = logging.WARNING if "REPLICA IDENTITY" in why else logging.ERROR
            log.log(
                level, "postgres table %s.%s not published: %s", t[0], t[1], why,
                extra={"fields": {**self._log_fields(), "table": f"{t[0]}.{t[1]}"}},
            )

    def _log_missing(self, found: Mapping[tuple[str, str], Any]) -> None:
        """A table postgres.tables names that is no table of the database (a typo, or one not
        created yet) is logged once, when it goes missing: it was left out without a word."""
        if not self.tables:
            return
        missing = qualified_tables(self.tables) - {f"{schema}.{name}" for schema, name in found}
        for t in sorted(missing - self._missing):
            log.warning(
                "postgres.tables names %s, which is no table of this database: nothing is published for it "
                "until it is created", t, extra={"fields": {**self._log_fields(), "table": t}},
            )
        self._missing = missing

    def _log_warnings(self, warnings: dict[tuple[str, str], str]) -> None:
        """What a published table's events lack, logged once (and again when it changes)."""
        for t, warning in warnings.items():
            if self._warned.get(t) != warning:
                log.warning(
                    "postgres table %s.%s: %s", t[0], t[1], warning,
                    extra={"fields": {**self._log_fields(), "table": f"{t[0]}.{t[1]}"}},
                )
        self._warned = warnings

    async def ensure_slot(self, creating: Callable[[], None] | None = None) -> bool:
        """Create the permanent slot when missing; True when it was created now. `creating` is
        called first: the creation may wait long (see below), and the caller says so."""
        rows = await self.fetch("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", self.slot)
        if rows:
            return False
        if creating is not None:
            creating()
        try:
            # waits for every transaction running at the time to end, however long they take
            await self.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", self.slot, bounded=False)
        except asyncpg.DuplicateObjectError:
            return False
        except asyncpg.InsufficientPrivilegeError as exc:
            raise SetupError(f"cannot create replication slot {self.slot}: {exc}; {PRIVILEGES_HELP}") from exc
        return True

    async def stray_slots(self, instance: str) -> list[str]:
        """Inactive pgoutput slots of this database whose name is this instance's but for another
        database name: the slot of a database renamed since (slots are named after the database,
        so the gateway pointed at its new name made a new one). Nobody reads them, and each holds
        the server's WAL until it is dropped."""
        rows = await self.fetch(
            "SELECT slot_name FROM pg_replication_slots WHERE database = current_database() AND plugin = 'pgoutput' "
            "AND NOT active AND slot_type = 'logical' AND slot_name <> $1 AND starts_with(slot_name, $2) "
            "ORDER BY slot_name",
            self.slot, f"{instance}_",
        )
        return [r["slot_name"] for r in rows]

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

    async def resolve_types(self, oids: list[int]) -> dict[int, tuple[int, int]]:
        """type OID -> (its base type: itself unless a domain, else the domain's base type, through
        domains of domains; the element type when that base is an array type, else 0; also 0
        for an array whose elements are separated by another delimiter than ',', e.g. of a
        domain over box: the array parser does not know it, such arrays stay text)."""
        rows = await self.fetch(
            """
            WITH RECURSIVE chain(oid, cur, depth) AS (
                SELECT t.oid, t.oid, 0 FROM pg_type t WHERE t.oid = ANY($1::oid[])
                UNION ALL
                SELECT c.oid, t.typbasetype, c.depth + 1 FROM chain c JOIN pg_type t ON t.oid = c.cur
                WHERE t.typtype = 'd' AND c.depth < 32
            )
            SELECT DISTINCT ON (c.oid) c.oid::int8 AS oid, c.cur::int8 AS base,
                   CASE WHEN b.typcategory = 'A' AND e.typdelim = ',' THEN b.typelem ELSE 0 END::int8 AS elem
            FROM chain c JOIN pg_type b ON b.oid = c.cur LEFT JOIN pg_type e ON e.oid = b.typelem
            ORDER BY c.oid, c.depth DESC
            """,
            oids,
        )
        return {r["oid"]: (r["base"], r["elem"]) for r in rows}

    async def not_a_table(self, schema: str, name: str) -> str:
        """Why schema.name can have no changes to stream ("" when it is a table): there is no
        such relation, or it is a view, a materialized view or a foreign table, whose changes
        logical replication does not carry (a subscribe to one would wait for ever)."""
        rows = await self.fetch(
            "SELECT c.relkind::text AS kind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
            schema, name,
        )
        if not rows:
            return "table does not exist"
        what = _NOT_TABLES.get(rows[0]["kind"])
        return f"it is a {what}: PostgreSQL streams the changes of tables only" if what else ""

    async def fetch_columns(self, schema: str, name: str, key: dict[str, Any], columns: list[str]) -> dict[str, str | None] | None:
        """Current text values of `columns` of the row whose key is `key` (None: no such row).

        `key` holds the key as the event carries it (converted values), so each is turned back
        into something PostgreSQL compares with the column: base64 is decoded for bytea, lists
        become array literals, JSON is serialized, and the column's type keeps its modifier
        (char(4), bit(4): without it the cast would cut the value to one character)."""
        types = self._key_types.get((schema, name))
        if types is None:
            rows = await self.fetch(
                "SELECT a.attname AS col, format_type(a.atttypid, a.atttypmod) AS typ, "
                "CASE WHEN b.typname = 'bytea' THEN 'bytea' WHEN b.typname IN ('json', 'jsonb') THEN 'json' "
                "WHEN b.typcategory = 'A' THEN 'array' ELSE '' END AS form "
                "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                "JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END "
                "WHERE a.attrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                schema, name,
            )
            types = {r["col"]: (r["typ"], r["form"]) for r in rows}
            self._key_types[(schema, name)] = types
        conditions, args = [], []
        for i, (k, value) in enumerate(key.items()):
            typ, form = types.get(k, ("text", ""))
            param = f"${i + 1}::text"
            if form == "bytea" and isinstance(value, str):
                param = f"decode({param}, 'base64')"  # the event carries bytea as base64
            conditions.append(f"{quote_ident(k)} = {param}::{typ}")
            args.append(_key_text(value, form))
        cols = ", ".join(f"{quote_ident(c)}::text" for c in columns)
        sql = f"SELECT {cols} FROM {quote_ident(schema)}.{quote_ident(name)} WHERE {' AND '.join(conditions)}"
        rows = await self.fetch(sql, *args)
        if not rows:
            return None
        return {c: rows[0][i] for i, c in enumerate(columns)}

    def forget_types(self, schema: str, name: str) -> None:
        self._key_types.pop((schema, name), None)


_NOT_TABLES = {"v": "view", "m": "materialized view", "f": "foreign table"}


def check_version(version_num: int, shown: str) -> None:
    """Refuse a server older than MIN_SERVER_VERSION: it would refuse the stream's options
    (pgoutput's `messages` came in 14) and the catalog queries (pg_replication_slots.wal_status
    in 13) with errors that do not say the version is the matter."""
    if version_num < MIN_SERVER_VERSION:
        raise SetupError(f"PostgreSQL {shown} is too old: the gateway needs PostgreSQL 14 or later")


def _partitions_where(condition: str) -> str:
    """SQL: the names (schema.name, sorted) of the leaf partitions `p` of the partitioned table
    `c` for which `condition` holds."""
    return f"""ARRAY(
                   SELECT pn.nspname || '.' || p.relname FROM pg_partition_tree(c.oid) t
                   JOIN pg_class p ON p.oid = t.relid JOIN pg_namespace pn ON pn.oid = p.relnamespace
                   WHERE p.relkind = 'r' AND {condition} ORDER BY 1)"""


def _some(names: list[str]) -> str:
    """The first three of `names`, and how many more."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _has_identity(alias: str) -> str:
    """SQL: the pg_class row `alias` has a replica identity (what _unpublishable asks of a table)."""
    return (
        f"({alias}.relreplident = 'f' OR ({alias}.relreplident = 'd' AND EXISTS "
        f"(SELECT 1 FROM pg_index i WHERE i.indrelid = {alias}.oid AND i.indisprimary)) "
        f"OR ({alias}.relreplident = 'i' AND EXISTS "
        f"(SELECT 1 FROM pg_index i WHERE i.indrelid = {alias}.oid AND i.indisreplident)))"
    )


def _bare_partitions(names: list[str]) -> str:
    """Why a partitioned table is not published when some of its partitions lack a replica
    identity ("" when none does): PostgreSQL would refuse UPDATE and DELETE on those."""
    if not names:
        return ""
    listed = _some(names)
    which = f"its partition {listed} has" if len(names) == 1 else f"its partitions {listed} have"
    return (f"{which} no replica identity (PostgreSQL checks each partition's own); give "
            f"{'it' if len(names) == 1 else 'them'} a primary key or REPLICA IDENTITY FULL to publish it")


def _not_full_partitions(names: list[str]) -> str:
    """What the events of a partitioned table with REPLICA IDENTITY FULL lack when some of its
    partitions do not have it ("" when all do): PostgreSQL logs the old row of the partition's
    own identity, so theirs arrive as key columns only, the other columns null."""
    if not names:
        return ""
    listed = _some(names)
    return (f"it has REPLICA IDENTITY FULL but its partition{'s' if len(names) > 1 else ''} {listed} "
            f"{'do' if len(names) > 1 else 'does'} not: PostgreSQL takes the old row from the partition's "
            "identity, so for their rows oldRecord and DELETE records hold the key columns and nulls, and "
            f"changedColumns misses columns; ALTER TABLE ... REPLICA IDENTITY FULL on {'them' if len(names) > 1 else 'it'} too")


def _qualified(t: tuple[str, str]) -> str:
    return f"{quote_ident(t[0])}.{quote_ident(t[1])}"


def _key_text(value: Any, form: str) -> str:
    """A key value of an event as text PostgreSQL casts back to the column's type."""
    if form == "json":
        return json.dumps(value, ensure_ascii=False)
    if form == "array" and isinstance(value, list):
        return _array_literal(value)
    return _text_of(value)


def _array_literal(items: list) -> str:
    """'{...}' for a (nested) list of converted values: elements quoted, None as NULL."""
    out = []
    for v in items:
        if v is None:
            out.append("NULL")
        elif isinstance(v, list):
            out.append(_array_literal(v))
        else:
            text = json.dumps(v) if isinstance(v, dict) else _text_of(v)
            out.append('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(out) + "}"


def _text_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
