"""The PostgreSQL change feed: a pgoutput logical replication stream turned into Events.

One `PostgresSource` per database (a database may feed several workspaces). The stream is read
by `pg_stream.ReplicationStream` (psycopg 3 pgconn, non-blocking), decoded by the compiled
`rtcore.pgoutput` decoder, and every committed change becomes one `rtcore.event.Event` per
target workspace, handed to the `EventSink`. A transaction's commit LSN is acknowledged to
PostgreSQL only after all its events were published, so a crash loses nothing: the slot
redelivers unacknowledged transactions and duplicates are dropped by the commit LSN persisted
in `state_dir` (see `pg_state`).

On PostgreSQL 14+ the stream uses protocol 2 with `streaming 'on'`: a transaction larger than
the server's logical_decoding_work_mem arrives while still in progress. Its messages are
buffered per top-level xid (`pg_streamed`, bounded, spilling to `state_dir`), and decoded and
published only when its Stream Commit arrives, in commit order like any other transaction;
aborted transactions and rolled-back subtransactions are dropped. Clients never see
uncommitted rows.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from typing import Any

import asyncpg
import psycopg

from rtcore import messages, timefmt
from rtcore.event import Event
from rtserver.channels import valid_table_name
from rtserver.redact import redact
from rtserver.sources.base import (
    YIELD_EVERY,
    ChannelUnavailable,
    EventSink,
    NoSuchChannel,
    announce_gap,
    when_durable,
)
from rtserver.sources.pg_catalog import (
    Catalog,
    SetupError,
    named_database,
    position_name,
    publication_name,
    server_digest,
    slot_name,
    unavailable,
)
from rtserver.sources.pg_state import PositionFile, targets_key
from rtserver.sources.pg_stream import ReplicationStream, StreamError
from rtserver.sources.pg_streamed import StreamBuffers, StreamedTx
from rtserver.tasks import cancel_and_wait

try:  # the compiled decoder; the reference one keeps a source tree without build usable
    from rtcore import pgoutput as _pgoutput
except ImportError:  # pragma: no cover - said at start (App: reference_modules)
    from rtcore import pgoutput_ref as _pgoutput

from rtcore.pgoutput_ref import (
    ARRAY_ELEMENTS,
    PG_EPOCH_OFFSET_US,
    SCALAR_CONVERTERS,
    UNCHANGED,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    convert_value,
    format_lsn,
)

# The message classes of the decoder in use: the compiled one has its own native per-row classes.
Begin = _pgoutput.Begin
Commit = _pgoutput.Commit
Delete = _pgoutput.Delete
Insert = _pgoutput.Insert
Keepalive = _pgoutput.Keepalive
LogicalMessage = _pgoutput.LogicalMessage
Relation = _pgoutput.Relation
Truncate = _pgoutput.Truncate
Update = _pgoutput.Update

log = logging.getLogger("rtserver.postgres")

CORRELATION_PREFIX = "rt.correlation"
STATUS_INTERVAL = 1.0  # seconds between standby status updates
# The sources of this process by what they stream: (cluster, database OID, slot) -> source. One
# database named by two URLs the configuration check cannot tell apart (`localhost` and
# `127.0.0.1`, a host alias) made two sources on one slot and one publication: the second never
# streamed, its workspace's subscribes were accepted and got nothing, and each source's
# publication sync dropped the other's tables, so changes of the first workspace's tables
# written meanwhile were never sent (a workspace's configuration cost another its events).
_STREAMING: dict[tuple[int, int, str], PostgresSource] = {}
# Seconds a status update asking for a reply (sent every STATUS_INTERVAL when idle) may go
# without a byte from the server before the link counts as dead: the server answers at once,
# so silence means the link died without a reset, which TCP may take hours to notice.
# PostgreSQL's own subscribers give up after wal_receiver_timeout, 60 s by default, as here.
RECEIVE_TIMEOUT = 60.0
MAX_QUEUED_FRAMES = 10_000  # CopyData frames read but not processed: beyond it reading pauses
# ... and their bytes: 10,000 frames of rows holding megabytes of jsonb would be gigabytes
MAX_QUEUED_BYTES = 32 << 20
MAX_PENDING_CHANGES = 10_000  # changes of one transaction held back waiting for its correlation id
MAX_PENDING_BYTES = 32 << 20  # ... and their size on the wire (decoded, they take a few times more)
BACKOFF_MIN, BACKOFF_MAX = 0.2, 10.0
STREAM_MEMORY_BYTES = 32 << 20  # streamed in-progress transactions held in memory, all together
UNDEFINED_OBJECT = "42704"  # SQLSTATE of "publication ... does not exist"
_STREAM_CONTROL_TAGS = frozenset(b"SEcA")  # inside a segment everything else is buffered undecoded


class SlotLost(Exception):
    """The replication slot is gone or invalidated (max_slot_wal_keep_size exceeded)."""


class _Change:
    """old_kind: "O" when `old` is the whole old row (REPLICA IDENTITY FULL), "K" when it holds
    only the old key columns, "" without an old tuple."""

    __slots__ = ("operation", "relation", "record", "old", "changed", "old_kind")

    def __init__(self, operation: str, relation: Relation, record: Any, old: Any, changed: list[str] | None,
                 old_kind: str = ""):
        self.operation = operation
        self.relation = relation
        self.record = record
        self.old = old
        self.changed = changed
        self.old_kind = old_kind


def _same(a: Any, b: Any) -> bool:
    """Equal values, NaN equal to NaN (also inside arrays): an unchanged NaN column is unchanged.
    A bool is never equal to a number, also inside JSON: Python's True == 1 would hide a jsonb
    value turning from 1 into true (1 and 1.0 stay equal, as numeric and jsonb compare them).
    Nested values are walked with a list, not recursion: a jsonb a few hundred levels deep
    would raise RecursionError, at the same transaction after every reconnect."""
    pending = [(a, b)]
    while pending:
        a, b = pending.pop()
        if isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                return False
            pending.extend(zip(a, b, strict=True))
        elif isinstance(a, dict) and isinstance(b, dict):
            if a.keys() != b.keys():
                return False
            pending.extend((v, b[k]) for k, v in a.items())
        elif not _same_scalar(a, b):
            return False
    return True


def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, bool) is not isinstance(b, bool):
        return False
    if a == b:
        return True
    return isinstance(a, float) and isinstance(b, float) and a != a and b != b


def entity_of(schema: str, table: str) -> str:
    return table if schema == "public" else f"{schema}.{table}"


class PostgresSource:
    """Streams one PostgreSQL database's changes to the workspaces it feeds."""

    kind = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        schemas: Iterable[str] = ("public",),
        tables: Iterable[str] = (),
        instance: str = "rtserver",
        state_dir: str,
        sink: EventSink,
        workspaces: Callable[[], Iterable[str]],
        maintenance_interval: float = 2.0,
        streaming: bool = True,
        stream_memory_bytes: int = STREAM_MEMORY_BYTES,
        receive_timeout: float = RECEIVE_TIMEOUT,
        other_urls: Iterable[str] = (),
    ) -> None:
        self.dsn = dsn
        # The process's other PostgreSQL sources: whether the position file of earlier versions,
        # named by the slot alone, may be this source's (_open_position).
        self.other_urls = [url for url in other_urls if url != dsn]
        # In each log line: several workspaces' databases fail alike, and before the first
        # connection there is no slot name to tell them apart.
        self._shown_url = redact(dsn)
        self.schemas = list(schemas)
        self.tables = list(tables)
        self.instance = instance
        self.state_dir = state_dir
        self.sink = sink
        self.workspaces = workspaces
        self.maintenance_interval = maintenance_interval
        self.streaming = streaming
        self.stream_memory_bytes = stream_memory_bytes
        self.receive_timeout = receive_timeout
        self.slot = ""
        self.position_name = ""  # of the files under state_dir: the slot and a digest of server and database
        self._identity: tuple[int, int] | None = None  # (cluster, database OID): _claim_database
        self.legacy_position = False  # its position file was an earlier version's (_open_position)
        self.publication = publication_name(instance)
        self.catalog: Catalog | None = None
        self._position: PositionFile | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._ready = False
        self._streamed = False  # the stream worked since the last failure (_retry_delay)
        self._last_error = ""
        self._slot_info: dict[str, Any] = {}
        self._acked_lsn = 0
        self._published_lsn = 0
        # Commits handed to the sink whose durability callback has not run yet (_durable), and
        # the generation those callbacks belong to (a recreated slot or a stop ends it).
        self._undurable = 0
        self._generation = 0
        self._publishing_lsn = 0
        self._publishing_event = 0
        self._publishing_change = 0
        self._events = 0
        self._transactions = 0
        self._duplicates = 0
        self._slot_recreations = 0
        self._slot_seen = False
        self._started = asyncio.Event()
        self.positioned = asyncio.Event()  # the slot exists (Source.positioned)
        self._decoder: Any = None  # the decoder of the current connection (its learnt types)
        self._proto_version = 0
        self._streams: StreamBuffers | None = None
        self._inbox: _Inbox | None = None  # of the current connection
        self._streamed_transactions = 0
        self._streamed_aborts = 0
        self._streamed_sub_aborts = 0
        # relid -> why the changes of that relation are withheld (_withhold), per connection
        self._withheld: dict[int, str] = {}
        self._withheld_logged: set[tuple[str, str]] = set()

    # -- Source protocol ------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve names and begin streaming in the background (errors surface in status())."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"postgres-source:{self.instance}")

    async def wait_streaming(self, timeout: float = 30.0) -> None:
        """Wait until the first replication connection streams (tests, start-up ordering)."""
        await asyncio.wait_for(self._started.wait(), timeout)

    async def stop(self) -> None:
        self._stopping = True
        self._release_database()
        self._generation += 1  # callbacks still due would write a closed position file
        task, self._task = self._task, None
        while task is not None and not task.done():
            # again until it ends: a cancellation swallowed by a library (Python 3.11's wait_for()
            # drops one arriving as its awaitable completes) must not leave the feed running
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if task is not None and not task.cancelled():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        if self.catalog is not None:
            await self.catalog.close()
        if self._position is not None:
            await self._position.close()
        self._ready = False

    async def check_channel(self, workspace: str, entity: str) -> str:
        if entity == "*":
            return "*"
        schema, _, name = entity.rpartition(".")
        schema = schema or "public"
        if not (valid_table_name(schema) and valid_table_name(name)):
            raise ChannelUnavailable(f"postgres:{entity}: malformed table name (workspace {workspace})")
        canonical = entity_of(schema, name)
        if self.catalog is None and self._task is not None:
            # a subscribe right after start(): give the first connection a moment
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._started.wait(), 5.0)
        catalog = self.catalog
        if catalog is None:
            raise ChannelUnavailable(f"postgres:{entity}: the PostgreSQL source is not started (workspace {workspace})")
        if (schema, name) in catalog.published:
            return canonical
        # A name outside the configuration is refused without a lookup: answered "does not
        # exist" or "not among postgres.schemas" after one, it told any client which tables,
        # views and schemas a database holds beyond what the gateway publishes.
        unconfigured = catalog.unconfigured(schema, name)
        if unconfigured:
            raise ChannelUnavailable(f"postgres:{canonical}: table is not published: {unconfigured}")
        try:
            # A name that is no table costs one lookup, not a publication sync (several catalog
            # queries under the lock every such subscribe waits on): 4010 is no invalid
            # message, so a client could repeat it at will.
            why = await catalog.not_a_table(schema, name)
            if why:
                raise NoSuchChannel(f"postgres:{canonical}: {why}")
            await self._sync_publication()  # a table created since the last sync
            if (schema, name) in catalog.published:
                return canonical
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, SetupError) as exc:
            raise ChannelUnavailable(unavailable(canonical, exc)) from exc
        why = catalog.skipped.get((schema, name)) or "the gateway's publication does not hold it"
        raise ChannelUnavailable(f"postgres:{canonical}: table is not published: {why}")

    def ready(self) -> bool:
        return self._ready

    @property
    def published_lsn(self) -> int:
        """Commit LSN of the last transaction whose events were all handed to the sink."""
        return self._published_lsn

    @property
    def publishing_lsn(self) -> int:
        """Commit LSN of the transaction whose events are being handed to the sink."""
        return self._publishing_lsn

    @property
    def publishing_event(self) -> int:
        """1-based index, within its transaction, of the event being handed to the sink: the
        same each time the transaction is read (change index x targets), however often the
        feed started over."""
        return self._publishing_event

    @property
    def publishing_change(self) -> int:
        """1-based index, within its transaction, of the change whose event is being handed to
        the sink: the same each time the transaction is read, whatever workspaces it feeds
        (publishing_event counts over the workspaces of this reading)."""
        return self._publishing_change

    def status(self) -> dict[str, Any]:
        streams = self._streams
        return {
            "kind": "postgres",
            "ready": self._ready,
            "slot": self.slot,
            "publication": self.publication,
            "wal_status": self._slot_info.get("wal_status"),
            "lag_bytes": self._slot_info.get("lag_bytes"),
            "safe_wal_size": self._slot_info.get("safe_wal_size"),
            "acked_lsn": format_lsn(self._acked_lsn),
            "published_lsn": format_lsn(self._published_lsn),
            "events": self._events,
            "transactions": self._transactions,
            "duplicates_dropped": self._duplicates,
            "slot_recreations": self._slot_recreations,
            "proto_version": self._proto_version,
            "streamed_transactions": self._streamed_transactions,
            "streamed_aborted": self._streamed_aborts,
            "streamed_subtransactions_aborted": self._streamed_sub_aborts,
            "streamed_open": len(streams.open) if streams is not None else 0,
            "streamed_memory_bytes": streams.mem_bytes if streams is not None else 0,
            "streamed_spill_files": streams.spill_files if streams is not None else 0,
            "streamed_spill_bytes": streams.spill_bytes if streams is not None else 0,
            # read from the server, not yet handled (reading pauses at MAX_QUEUED_FRAMES/_BYTES)
            "queued_frames": len(self._inbox.frames) if self._inbox is not None else 0,
            "queued_bytes": self._inbox.bytes if self._inbox is not None else 0,
            "last_error": self._last_error,
        }

    # -- connection loop ------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stopping:
            try:
                await self._setup()
                await self._stream()
                backoff = BACKOFF_MIN
            except asyncio.CancelledError:
                raise
            except SlotLost as exc:
                await self._recreate_slot(str(exc))
                continue
            except SetupError as exc:
                self._streamed = False  # a setup error waits BACKOFF_MAX, whether the stream worked or not
                backoff = BACKOFF_MAX
                self._fail(str(exc), loud=True, retry_in=backoff)
            except (OSError, StreamError, psycopg.Error, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                backoff = self._retry_delay(backoff)
                self._fail(f"{type(exc).__name__}: {exc}", retry_in=backoff)
            except Exception as exc:  # noqa: BLE001 - keep the feed alive, but say what broke
                log.exception("postgres source crashed; restarting", extra={"fields": self._log_fields()})
                backoff = self._retry_delay(backoff)
                self._fail(f"{type(exc).__name__}: {exc}", retry_in=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _retry_delay(self, backoff: float) -> float:
        """The pause before the next attempt: `backoff`, or the first step when the stream
        worked since the last failure. A stream only ends by failing, so without this each
        outage went on from the delay the one before had reached: after a few PostgreSQL
        restarts, days apart, every reconnect waited BACKOFF_MAX."""
        streamed, self._streamed = self._streamed, False
        return BACKOFF_MIN if streamed else backoff

    def _fail(self, message: str, loud: bool = False, retry_in: float | None = None) -> None:
        """Not ready, with `message` as last_error and in the log (with the seconds until the
        next attempt, when the feed is retried after a pause)."""
        self._ready = False
        self._last_error = message
        fields = {**self._log_fields(), "error": message}
        if retry_in is not None:
            fields["retry_in_s"] = retry_in
        (log.error if loud else log.warning)("postgres source: %s", message, extra={"fields": fields})

    def _log_fields(self) -> dict[str, Any]:
        return {"source": "postgres", "slot": self.slot, "publication": self.publication, "url": self._shown_url}

    async def _setup(self) -> None:
        if self.catalog is None:
            probe = self._new_catalog(slot="")  # the database name, which the slot's name holds
            try:
                database = await probe.database()
            finally:
                await probe.close()
            self.slot = slot_name(self.instance, database)
            self.position_name = position_name(self.slot, self.dsn, database)
            self.catalog = self._new_catalog(self.slot)
        await self._claim_database()
        if self._position is None:
            self._position = await self._open_position()
            self._published_lsn = self._position.commit_lsn
        catalog = self.catalog
        await catalog.check_server()
        await self._sync_publication()
        info = await catalog.slot_status()
        if info is not None and info["wal_status"] == "lost":
            raise SlotLost(f"replication slot {self.slot} was invalidated (wal_status lost)")
        if await catalog.ensure_slot(self._creating_slot):
            log.info("created replication slot %s", self.slot, extra={"fields": self._log_fields()})
            if self._slot_seen or self._position.commit_lsn:
                # we streamed from this slot before: it was dropped under us, changes are lost
                self._slot_recreations += 1
                self._fail(f"replication slot {self.slot} had disappeared; re-created it", loud=True)
                await self._announce_gap(f"replication slot {self.slot} was dropped")
            await self._reset_position()
            await self._warn_stray_slots()
        self._slot_seen = True
        self.positioned.set()  # the slot keeps every change from here on
        self._slot_info = (await catalog.slot_status()) or {}

    async def _claim_database(self) -> None:
        """Be the only source of this process on this database's slot, before the publication
        is touched; SetupError when another source holds it (see _STREAMING)."""
        if self._identity is None:
            assert self.catalog is not None
            self._identity = await self.catalog.identity()
            if self._identity is None:
                return  # not readable by this role: the slot's own "is active" error says it
        key = (*self._identity, self.slot)
        holder = _STREAMING.setdefault(key, self)
        if holder is not self and (holder._stopping or holder._task is None or holder._task.done()):
            holder = _STREAMING[key] = self  # stopped, or ended without stop(): not streaming any more
        if holder is not self:
            raise SetupError(
                f"this database is the source of {holder._shown_url} already, which names it by another URL "
                f"({self._shown_url}): one database is one source with one replication slot ({self.slot}); "
                "give every section naming it the same postgres_url (and the same schemas and tables)")

    def _release_database(self) -> None:
        if self._identity is not None and _STREAMING.get((*self._identity, self.slot)) is self:
            del _STREAMING[(*self._identity, self.slot)]

    async def _open_position(self) -> PositionFile:
        """The position file `postgres-{position_name}.pos`. Earlier versions named it by the slot
        alone, which databases of one name on two servers share: that file is taken over (it is
        renamed, so one found later is newer: an earlier version ran since, or an ingest wrote
        there what an earlier version's headers say Kafka has) only when no other configured
        source may have written to it. Left unused, it costs duplicates, never a loss: the slot
        is acknowledged only past what was published, so without that position it redelivers at
        most what was published but not yet acknowledged; another server's position, though,
        would drop this one's changes as already published."""
        path = os.path.join(self.state_dir, f"postgres-{self.position_name}.pos")
        legacy = os.path.join(self.state_dir, f"postgres-{self.slot}.pos")
        if os.path.exists(legacy):
            sharing = self._legacy_sharers()
            if sharing:
                log.warning(
                    "postgres position file %s of an earlier version left unused: other configured sources may have "
                    "written to it; changes published before the restart and not yet acknowledged may be delivered again",
                    legacy, extra={"fields": {**self._log_fields(), "file": legacy,
                                              "other_urls": [redact(url) for url in sharing]}})
            else:
                os.replace(legacy, path)
                self.legacy_position = True
                log.info("postgres position file %s of an earlier version renamed to %s", legacy, path,
                         extra={"fields": {**self._log_fields(), "file": path}})
        await self._remove_legacy_spill()
        return await PositionFile.open(path)

    async def _remove_legacy_spill(self) -> None:
        """Remove an earlier version's spill directory, `postgres-{slot}.streamed`: one killed
        in a large streamed transaction left its spill files there (up to that transaction's
        size), and no source of this version, whose directory is named as its position file,
        would ever have removed them. Nothing in it is needed: a new connection streams an
        unfinished transaction again from its start."""
        spill = os.path.join(self.state_dir, f"postgres-{self.slot}.streamed")
        if self.position_name == self.slot or not os.path.isdir(spill):
            return
        await asyncio.get_running_loop().run_in_executor(None, functools.partial(shutil.rmtree, spill, ignore_errors=True))
        log.info("postgres spill directory %s of an earlier version removed", spill,
                 extra={"fields": {**self._log_fields(), "file": spill}})

    def _legacy_sharers(self) -> list[str]:
        """The other configured URLs whose source earlier versions gave this slot's position
        file: a database of the same name on another server, or one only the server knows."""
        mine = self.position_name.rsplit("-", 1)[1]  # its server_digest
        sharing = []
        for url in self.other_urls:
            database = named_database(url)
            if database is None or (slot_name(self.instance, database) == self.slot
                                    and server_digest(url, database) != mine):
                sharing.append(url)
        return sharing

    async def _warn_stray_slots(self) -> None:
        """A new slot was made: an error for each inactive slot of this database that is named
        as this instance's slot of another database (the database was renamed), which nobody
        reads and which holds the server's WAL for ever."""
        assert self.catalog is not None
        for stray in await self.catalog.stray_slots(self.instance):
            log.error(
                "postgres replication slot %s of this database is not %s's: was the database renamed? Nobody reads it "
                "and it holds the server's WAL (the changes it kept were not delivered); drop it: "
                "SELECT pg_drop_replication_slot('%s')", stray, self.slot, stray,
                extra={"fields": {**self._log_fields(), "stray_slot": stray}},
            )

    def _creating_slot(self) -> None:
        """Said before the slot's creation, which waits for every transaction running at the time
        (an idle session left in a transaction, a prepared transaction: for as long as they last)."""
        message = (f"creating replication slot {self.slot}: waiting for the transactions running on the database "
                   "to end (a session idle in a transaction, a prepared transaction, hold it up)")
        self._ready = False
        self._last_error = message  # /readyz says why it is not ready yet; cleared once streaming
        log.info("postgres source: %s", message, extra={"fields": self._log_fields()})

    def _new_catalog(self, slot: str) -> Catalog:
        return Catalog(self.dsn, schemas=self.schemas, tables=self.tables, slot=slot, publication=self.publication,
                       timeout=self.receive_timeout)

    async def _recreate_slot(self, reason: str) -> None:
        self._ready = False
        self._slot_recreations += 1
        self._fail(f"{reason}: changes were lost; re-creating the slot", loud=True)
        try:
            assert self.catalog is not None
            await self.catalog.drop_slot()
            # a new slot decodes from its creation on, looking the publication up as of each
            # change: it must exist first (it may be what was lost)
            await self._sync_publication()
            await self.catalog.ensure_slot(self._creating_slot)
            self._slot_seen = True
            await self._reset_position()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, SetupError) as exc:
            self._fail(f"re-creating slot {self.slot} failed: {exc}", loud=True)
            await asyncio.sleep(BACKOFF_MIN)
            return
        await self._announce_gap(f"replication slot {self.slot} was lost: {reason}")

    async def _reset_position(self) -> None:
        """A new slot starts a new LSN history: on a restored or failed-over server it may be
        lower than the saved position, and every change below it would be dropped as already
        published. Nothing of the new slot was published yet: start from zero."""
        position = self._position
        assert position is not None
        self._generation += 1  # commits of the old slot still in flight: not to be recorded
        if position.commit_lsn or self._acked_lsn:
            log.warning(
                "postgres position reset for the new slot %s (was %s)", self.slot, format_lsn(position.commit_lsn),
                extra={"fields": {**self._log_fields(), "old_position": format_lsn(position.commit_lsn)}},
            )
        position.record(0, -1)
        await position.sync()
        self._published_lsn = 0
        self._acked_lsn = 0  # never confirm the old server's LSNs to the new slot

    async def _announce_gap(self, reason: str) -> None:
        await announce_gap(self.sink, list(self.workspaces()), "postgres", reason)

    async def _sync_publication(self) -> None:
        """Publication up to date; a table added to it after rows were written to it (created
        between two syncs, or while the gateway was down), a publish option that left
        operations out (a DBA's ALTER PUBLICATION), or a published table dropped, replaced or
        left out since, means changes were never captured: a history_gap says so."""
        assert self.catalog is not None
        late = await self.catalog.sync_publication()
        losses, self.catalog.losses = self.catalog.losses, []
        for reason in losses:
            await self._announce_gap(reason)
        for schema, name in late:
            table = f"{schema}.{name}"
            log.warning(
                "postgres table %s was added to publication %s after rows were written to it; their changes were "
                "not captured", table, self.publication, extra={"fields": {**self._log_fields(), "table": table}},
            )
            await self._announce_gap(f"table {table} was published only after rows were written to it")

    # -- streaming ------------------------------------------------------------------------

    async def _stream(self) -> None:
        assert self.catalog is not None and self._position is not None
        # Transactions of the last connection still in flight: recorded (or failed) before the
        # slot delivers them again, or they would be published twice.
        with contextlib.suppress(Exception):
            await self._drain()
        stream = ReplicationStream(self.dsn, self.slot, self.publication, streaming=self.streaming,
                                   application_name=f"rtserver-{self.instance}", connect_timeout=self.receive_timeout)
        inbox = self._inbox = _Inbox(stream)
        try:
            try:
                await stream.connect(0)  # 0: continue from the slot's confirmed position
            except StreamError as exc:
                text = str(exc)
                if "does not exist" in text or "can no longer get changes" in text or "invalidated" in text:
                    raise SlotLost(text) from exc
                raise
            self._proto_version = stream.negotiated_proto
            # a new connection streams unfinished transactions again from their start; the
            # directory is the source's own (a slot of that name may be another server's source's)
            self._streams = StreamBuffers(
                os.path.join(self.state_dir, f"postgres-{self.position_name}.streamed"), self.stream_memory_bytes
            )
            await self._streams.prepare()
            inbox.resume()
            self._ready = True
            self._streamed = True
            self._last_error = ""
            self._started.set()
            log.info("postgres streaming slot %s", self.slot, extra={"fields": self._log_fields()})
            maintenance = asyncio.create_task(self._maintenance(inbox))
            alive = asyncio.create_task(self._keep_alive(stream))
            try:
                await self._consume(stream, inbox)
            except StreamError as exc:
                if exc.sqlstate == UNDEFINED_OBJECT and f'"{self.publication}"' in str(exc):
                    # pgoutput looks the publication up as of each change it decodes: the slot
                    # fails at the same change on every reconnect, re-created publication or not
                    raise SlotLost(f"publication {self.publication} was dropped; replication slot {self.slot} "
                                   "cannot decode past that point") from exc
                raise
            finally:
                await cancel_and_wait(maintenance, alive, quiet=True)
        finally:
            self._ready = False
            if self._streams is not None:
                await self._streams.close()
            if self._acked_lsn:
                with contextlib.suppress(StreamError, psycopg.Error):
                    stream.send_status(self._acked_lsn)
            await stream.close()

    async def _consume(self, stream: ReplicationStream, inbox: _Inbox) -> None:
        decoder = self._decoder = _pgoutput.Decoder()
        self._withheld = {}  # the new connection describes each relation again
        withheld = self._withheld
        catalog = self.catalog
        position = self._position
        streams = self._streams
        assert catalog is not None and position is not None and streams is not None
        frames = inbox.frames
        last_status = 0.0
        asked_at = 0.0  # the first reply request that nothing was heard after (0: none)
        tx: _Tx | None = None
        segment: StreamedTx | None = None  # the streamed transaction whose segment is open
        while True:
            if not frames:
                if inbox.failure:
                    raise inbox.failure[0]
                if inbox.paused:
                    inbox.resume()
                now = time.monotonic()
                if inbox.heard_at >= asked_at:
                    asked_at = 0.0
                elif now - asked_at > self.receive_timeout:
                    raise StreamError(f"no answer from the server for {self.receive_timeout:g} s "
                                      "(postgres.receive_timeout): the link is presumed dead")
                if now - last_status >= STATUS_INTERVAL:
                    await position.sync()
                    stream.send_status(self._acked_lsn, reply=True)
                    last_status = now
                    asked_at = asked_at or now
                inbox.wake.clear()
                # asyncio.timeout, not wait_for: Python 3.11's wait_for() loses a cancellation
                # that arrives as the event fires, and stop() would wait for ever
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STATUS_INTERVAL):
                        await inbox.wake.wait()
                continue
            frame = frames.popleft()
            inbox.bytes -= len(frame)
            if segment is not None and frame[0] == 0x77 and frame[25] not in _STREAM_CONTROL_TAGS:
                # a change (or Relation, Type, message) of an in-progress transaction: decoded
                # and published at its Stream Commit, dropped at its Stream Abort
                await streams.append(segment, frame[25:])
                continue
            msg = decoder.decode_copy(frame)
            if isinstance(msg, Keepalive):
                if (tx is None and not streams.open and not frames and not self._undurable
                        and msg.wal_end > self._acked_lsn):
                    # idle: everything before wal_end was sent and handled; let the WAL go
                    self._acked_lsn = msg.wal_end
                if msg.reply_requested:
                    await position.sync()
                    stream.send_status(self._acked_lsn)
                    last_status = time.monotonic()
                continue
            m = msg.message
            if isinstance(m, Insert | Update | Delete):
                if decoder.errors:
                    self._conversion_failed(decoder, tx)
                if tx is None or tx.skip_all or m.relation.relid in withheld:
                    continue
                tx.changes.append(await self._change(m, catalog, tx))
                tx.bytes += len(frame)
                if len(tx.changes) >= MAX_PENDING_CHANGES or tx.bytes >= MAX_PENDING_BYTES:
                    await self._flush(tx, final=False)
            elif isinstance(m, Begin):
                tx = _Tx(m)
                if m.final_lsn < position.commit_lsn or (m.final_lsn == position.commit_lsn and position.complete):
                    tx.skip_all = True  # published before a restart, not yet acknowledged then
                    self._duplicates += 1
                elif m.final_lsn == position.commit_lsn:
                    tx.resume_after(position)
            elif isinstance(m, Commit | StreamCommit):
                if isinstance(m, StreamCommit):
                    await self._commit_streamed(m, decoder, catalog)
                elif tx is not None and not tx.skip_all:
                    await self._flush(tx, final=True)
                    self._transactions += 1
                    self._published_lsn = m.commit_lsn
                    self._durable(self._record_commit, m.commit_lsn)
                tx = None
                self._durable(self._ack, m.end_lsn)
                now = time.monotonic()
                if now - last_status >= STATUS_INTERVAL:
                    await position.sync()
                    stream.send_status(self._acked_lsn, reply=False)
                    last_status = now
            elif isinstance(m, StreamStart):
                segment = streams.start(m.xid, m.first_segment)
            elif isinstance(m, StreamStop):
                segment = None
            elif isinstance(m, StreamAbort):
                await self._abort_streamed(m)
            else:
                await self._apply(m, tx, decoder, catalog)

    async def _apply(self, m: Any, tx: _Tx | None, decoder: Any, catalog: Catalog, size: int = 0) -> None:
        """One message of a transaction, `size` bytes on the wire (the live path inlines
        Insert/Update/Delete; a streamed transaction's messages all come through here when it is
        replayed at its commit)."""
        if isinstance(m, Insert | Update | Delete):
            if decoder.errors:
                self._conversion_failed(decoder, tx)
            if tx is None or tx.skip_all or m.relation.relid in self._withheld:
                return
            tx.changes.append(await self._change(m, catalog, tx))
            tx.bytes += size
            if len(tx.changes) >= MAX_PENDING_CHANGES or tx.bytes >= MAX_PENDING_BYTES:
                await self._flush(tx, final=False)
        elif isinstance(m, Relation):
            catalog.forget_types(m.schema, m.name)
            self._withhold(m, catalog)
            await self._learn_types(m.type_oids, decoder, catalog)
        elif isinstance(m, Truncate):
            if tx is None or tx.skip_all:
                return
            for rel in m.relations:
                if rel.relid not in self._withheld:
                    tx.changes.append(_Change("TRUNCATE", rel, None, None, None))
        elif isinstance(m, LogicalMessage):
            if tx is not None and m.transactional and m.prefix == CORRELATION_PREFIX:
                tx.correlation = m.content.decode("utf-8", "replace")[:256]
        # TypeInfo: enums and other user types are decoded as text; arrays learnt above

    def _withhold(self, rel: Relation, catalog: Catalog) -> None:
        """Withhold the changes of `rel`, or stop withholding them, as its name says now: the
        publication holds a table by OID, and the slot decodes each change with the publication
        as of that change, so a published table
        moved to a schema outside the configuration, or renamed to a name no channel can carry,
        streams under its new name until the sync takes it out (at once for a restart, whose
        slot still decodes what was written while the gateway was down): rows of a schema never
        published would reach postgres:* subscribers, and public."sales.orders" the
        subscribers of table orders of schema sales."""
        if not (valid_table_name(rel.schema) and valid_table_name(rel.name)):
            why = "its name holds '.', '\"' or a control character, which a channel name cannot carry"
        else:
            why = catalog.unconfigured(rel.schema, rel.name)
        if not why:
            self._withheld.pop(rel.relid, None)
            return
        self._withheld[rel.relid] = why
        table = (rel.schema, rel.name)
        if table not in self._withheld_logged:
            self._withheld_logged.add(table)
            log.warning(
                "postgres table %s.%s was in publication %s when changes the slot sends were written (it was moved "
                "or renamed since it was added): they are not delivered: %s", rel.schema, rel.name, self.publication, why,
                extra={"fields": {**self._log_fields(), "table": f"{rel.schema}.{rel.name}"}},
            )

    async def _learn_types(self, oids: Iterable[int], decoder: Any, catalog: Catalog) -> None:
        """Teach the decoder the types of a table that its built-in tables do not cover: arrays
        (of enums, of domains, and built-in ones such as interval[], inet[], money[]) and
        domains (converted as their base type). The catalog is asked once per type."""
        def unknown(oid: int) -> bool:
            # every type without a converter entry, built-in ones too: a built-in array type
            # missing from ARRAY_ELEMENTS (interval[], inet[]...) would otherwise stay text
            return (oid not in SCALAR_CONVERTERS and oid not in ARRAY_ELEMENTS
                    and oid not in decoder.arrays and oid not in decoder.domains)

        pending = {oid for oid in oids if unknown(oid)}
        for _ in range(3):  # the types, then the element types of their arrays (domains, enums)
            if not pending:
                return
            found = await catalog.resolve_types(sorted(pending))
            elements = set()
            for oid in pending:
                base, elem = found.get(oid, (oid, 0))
                if base != oid:
                    decoder.register_domain(oid, base)
                    if unknown(base):
                        decoder.register_array(base, elem)  # a domain over an array of a user type
                else:
                    decoder.register_array(oid, elem)  # an element of 0 marks "known, not an array"
                elements.add(elem)
            pending = {oid for oid in elements if unknown(oid)}

    def _conversion_failed(self, decoder: Any, tx: _Tx | None) -> None:
        """Values the decoder sent as their text because converting them failed: logged as errors
        and, after the transaction's events, a history_gap (the clients' rows may be off)."""
        errors, decoder.errors = decoder.errors, []
        if tx is None or tx.skip_all:
            return
        for schema, table, column, error in errors:
            self._value_problem(tx, f"{schema}.{table}", column, error)

    def _value_problem(self, tx: _Tx, table: str, column: str, error: str) -> None:
        key = f"{table}.{column}"
        if key in tx.problems:
            return  # once per column and transaction
        log.error(
            "postgres value of %s column %s could not be converted; sent as its text: %s", table, column, error,
            extra={"fields": {**self._log_fields(), "table": table, "column": column, "error": error,
                              "commit_lsn": format_lsn(tx.begin.final_lsn)}},
        )
        tx.problems[key] = f"a value of {table} column {column} could not be converted and was sent as text ({error})"

    async def _commit_streamed(self, m: StreamCommit, decoder: Any, catalog: Catalog) -> None:
        """Publish a streamed transaction at its commit: its buffered messages are decoded now,
        with the same duplicate rules (by commit LSN) as a transaction sent whole."""
        streams, position = self._streams, self._position
        assert streams is not None and position is not None
        buffered = streams.pop(m.xid)
        try:
            if m.commit_lsn < position.commit_lsn or (m.commit_lsn == position.commit_lsn and position.complete):
                self._duplicates += 1  # published before a restart, not yet acknowledged then
                return
            # final_lsn of a whole transaction's Begin is its commit LSN: positions, correlation
            # ids and partial counts mean the same whichever way the transaction came
            tx = _Tx(Begin(m.commit_lsn, m.commit_time, m.xid))
            if m.commit_lsn == position.commit_lsn:
                tx.resume_after(position)
            if buffered is not None:
                # the messages carry their (sub)transaction xid: the decoder reads them as streamed
                decoder.in_stream = True
                try:
                    async for raw in streams.replay(buffered):
                        await self._apply(decoder.decode(raw), tx, decoder, catalog, len(raw))
                finally:
                    decoder.in_stream = False
            await self._flush(tx, final=True)
            self._transactions += 1
            self._streamed_transactions += 1
            self._published_lsn = m.commit_lsn
            self._durable(self._record_commit, m.commit_lsn)
        finally:
            await streams.release(buffered)

    async def _abort_streamed(self, m: StreamAbort) -> None:
        """xid == subxid: the whole transaction rolled back; else one subtransaction did."""
        streams = self._streams
        assert streams is not None
        if m.xid == m.subxid:
            self._streamed_aborts += 1
            await streams.release(streams.pop(m.xid))
            return
        buffered = streams.open.get(m.xid)
        self._streamed_sub_aborts += 1
        if buffered is not None:
            streams.abort_subtransaction(buffered, m.subxid)

    async def _change(self, m: Insert | Update | Delete, catalog: Catalog, tx: _Tx) -> _Change:
        rel = m.relation
        if isinstance(m, Insert):
            return _Change("INSERT", rel, m.new, None, None)
        if isinstance(m, Delete):
            return _Change("DELETE", rel, m.old, None, None)
        new, old = m.new, m.old
        missing = [c for c, v in new.items() if v is UNCHANGED]
        if missing:
            await self._fill_unchanged(rel, new, old, missing, catalog, tx)
        if m.old_kind == "O":
            changed = [c for c in rel.columns if c in new and not _same(new.get(c), old.get(c))]
        elif m.old_kind == "K":
            changed = [c for c in rel.key_columns if not _same(old.get(c), new.get(c))]
        else:
            changed = []
        return _Change("UPDATE", rel, new, old, changed, m.old_kind)

    async def _fill_unchanged(
        self, rel: Relation, new: dict, old: dict | None, missing: list[str], catalog: Catalog, tx: _Tx
    ) -> None:
        """Unchanged TOASTed values are never sent as null: from the old row (REPLICA IDENTITY
        FULL), else fetched by primary key (the current value, which an UPDATE that did not
        touch the column left as it was)."""
        fetch = []
        for col in missing:
            if old is not None and col in old and old[col] is not UNCHANGED:
                new[col] = old[col]
            else:
                fetch.append(col)
        if not fetch:
            return
        key = {k: new[k] for k in rel.key_columns if k in new and new[k] is not UNCHANGED}
        values = None
        if key and len(key) == len(rel.key_columns):
            try:
                values = await catalog.fetch_columns(rel.schema, rel.name, key, fetch)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("fetching unchanged TOAST columns of %s.%s failed: %s", rel.schema, rel.name, exc,
                            extra={"fields": {**self._log_fields(), "table": f"{rel.schema}.{rel.name}"}})
        oids = dict(zip(rel.columns, rel.type_oids, strict=False))
        decoder = self._decoder
        for col in fetch:
            text = values.get(col) if values is not None else None
            if values is None:
                del new[col]  # the row is gone: leave the column out rather than send null
            elif text is None:
                new[col] = None
            else:
                try:  # with the types the decoder learnt: arrays of enums, domains
                    new[col] = convert_value(oids[col], text, decoder.arrays, decoder.domains)
                except Exception as exc:  # noqa: BLE001 - as in the decoder: the text, reported
                    new[col] = text
                    self._value_problem(tx, f"{rel.schema}.{rel.name}", col, f"{type(exc).__name__}: {exc}")

    async def _drain(self) -> None:
        drain = getattr(self.sink, "drain", None)  # test sinks record in publish() already
        if drain is not None:
            await drain()

    def _durable(self, then: Callable[..., None], *args: Any) -> None:
        """`then(*args)` once everything handed to the sink so far is durable: at once for a
        sink that has it when publish() returns; for the ingest's, once the Kafka transaction
        carrying it committed. The feed does not wait for that (one commit per transaction
        would bound it to a few hundred transactions a second); the position, and the LSN
        acknowledged to the slot, follow in order."""
        generation = self._generation
        self._undurable += 1

        def durable() -> None:
            self._undurable -= 1
            if generation == self._generation:
                then(*args)

        when_durable(self.sink, durable)

    def _ack(self, lsn: int) -> None:
        self._acked_lsn = max(self._acked_lsn, lsn)

    def _record_commit(self, lsn: int) -> None:
        """The transaction at `lsn` published whole, unless the position is already further: a
        later transaction's part recorded after a drain may come before this (deferred) call."""
        position = self._position
        assert position is not None
        if lsn > position.commit_lsn or (lsn == position.commit_lsn and not position.complete):
            position.record(lsn, -1)

    async def _flush(self, tx: _Tx, final: bool) -> None:
        changes, tx.changes, tx.bytes = tx.changes, [], 0
        if not changes:
            return
        begin = tx.begin
        position = self._position
        assert position is not None
        timestamp = timefmt.iso_ms((begin.commit_time + PG_EPOCH_OFFSET_US) // 1000)
        correlation = tx.correlation or f"pg-{begin.xid}-{format_lsn(begin.final_lsn)}"
        targets = list(self.workspaces())
        self._publishing_lsn = begin.final_lsn
        try:
            await self._publish_changes(tx, changes, targets, timestamp, correlation)
            # Everything handed to the sink is recorded before the position says so: here for
            # a part of a transaction, through _durable for a whole one when the sink can say.
            if not final or not hasattr(self.sink, "after_durable"):
                await self._drain()
        except (Exception, asyncio.CancelledError):
            # Stopped (or failed) part-way: the changes already handed over are recorded, so a
            # restart skips exactly those instead of publishing them again from the last
            # checkpoint (up to MAX_PENDING_CHANGES duplicates).
            await self._record_part(tx)
            raise
        problems, tx.problems = tx.problems, {}
        for reason in problems.values():
            await self._announce_gap(reason)
        if not final:
            position.record(begin.final_lsn, tx.index, *tx.partial())
            tx.recorded = tx.index

    async def _record_part(self, tx: _Tx) -> None:
        """Position after the first tx.published changes of `tx` (and the workspaces that have
        the next one), when some were handed over since the last record (drained first; a
        second cancellation leaves it as it was)."""
        position = self._position
        assert position is not None
        floor = max(tx.skip_first, tx.recorded)
        if tx.published < floor or (tx.published == floor and not tx.part):
            return
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self._drain()
            position.record(tx.begin.final_lsn, tx.published, *tx.partial())
            tx.recorded = tx.published

    async def _publish_changes(
        self, tx: _Tx, changes: list[_Change], targets: list[str], timestamp: str, correlation: str
    ) -> None:
        """Hand each change to every workspace; tx.published counts the changes that are, and
        tx.part the workspaces that have the one being handed."""
        for change in changes:
            tx.index += 1
            if tx.index <= tx.skip_first:
                self._duplicates += 1
                tx.published = tx.index
                continue
            # The workspaces that had it before a restart, when it goes to the same list again
            # (the list's key made only then, and when a part is recorded: not per transaction).
            had = 0
            if tx.index == tx.skip_first + 1 and tx.skip_part and targets_key(targets) == tx.skip_key:
                had = tx.skip_part
                self._duplicates += 1
            tx.part, tx.part_targets = 0, targets
            rel = change.relation
            entity = entity_of(rel.schema, rel.name)
            body = messages.encode(
                messages.PostgresEventBody(
                    channel=f"postgres:{entity}",
                    operation=change.operation,
                    table=rel.name,
                    schema=rel.schema,
                    record=change.record,
                    timestamp=timestamp,
                    correlationId=correlation,
                    oldRecord=change.old if change.operation == "UPDATE" else None,
                    changedColumns=change.changed if change.operation == "UPDATE" else None,
                )
            )
            record = change.record if change.record is not None else {}
            # transitions evaluate the filter on the old row: only a whole old row is one (a
            # key-only old tuple would look like a row that did not match)
            old = change.old if change.operation == "UPDATE" and change.old_kind == "O" else None
            turn = False
            first = (tx.index - 1) * len(targets)
            self._publishing_change = tx.index
            for i, ws in enumerate(targets, 1):
                self._publishing_event = first + i
                if i > had:
                    await self.sink.publish(Event(ws, "postgres", entity, change.operation, record, body, old))
                    self._events += 1
                    turn = turn or self._events % YIELD_EVERY == 0
                tx.part = i
            tx.published = tx.index
            tx.part = 0
            if turn:
                await asyncio.sleep(0)  # a turn for the clients (sources.base.YIELD_EVERY)

    async def _keep_alive(self, stream: ReplicationStream) -> None:
        """A status update every STATUS_INTERVAL whatever the feed is waiting for (a sink held up,
        a large flush): the server ends a walsender that hears nothing for wal_sender_timeout
        (60 s by default). It repeats the last acknowledged LSN: acknowledging more is the feed's
        own, after the position is synced."""
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            if time.monotonic() - stream.sent_at >= STATUS_INTERVAL:
                try:
                    stream.send_status(stream.sent_lsn)
                except (StreamError, psycopg.Error):
                    return  # the feed notices the broken link on its own

    async def _maintenance(self, inbox: _Inbox) -> None:
        """Publication kept up to date (new tables), slot health polled."""
        catalog = self.catalog
        assert catalog is not None
        while True:
            await asyncio.sleep(self.maintenance_interval)
            try:
                await self._sync_publication()
                info = await catalog.slot_status()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, SetupError) as exc:
                log.warning("postgres maintenance failed: %s", exc, extra={"fields": self._log_fields()})
                continue
            if info is None or info.get("wal_status") == "lost":
                self._slot_info = info or {}
                inbox.fail(SlotLost(f"replication slot {self.slot} is {'gone' if info is None else 'invalidated (wal_status lost)'}"))
                return
            self._slot_info = info


class _Inbox:
    """CopyData frames read from the socket and not yet processed (bounded: at
    MAX_QUEUED_FRAMES or MAX_QUEUED_BYTES reading pauses, so the server's socket buffer fills and
    nothing is lost)."""

    def __init__(self, stream: ReplicationStream) -> None:
        self.stream = stream
        self.frames: collections.deque[bytes] = collections.deque()
        self.bytes = 0  # of the frames
        self.wake = asyncio.Event()
        self.failure: list[BaseException] = []
        self.paused = True
        self.heard_at = time.monotonic()  # when the socket last had something (or reading resumed)

    def on_readable(self) -> None:
        self.heard_at = time.monotonic()
        try:
            self.stream.read_available(self._take)
        except StreamError as exc:
            self.fail(exc)
            return
        if len(self.frames) >= MAX_QUEUED_FRAMES or self.bytes >= MAX_QUEUED_BYTES:
            self.paused = True
            self.stream.remove_reader()
        self.wake.set()

    def _take(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.bytes += len(frame)

    def resume(self) -> None:
        if self.paused and not self.failure:
            self.paused = False
            self.heard_at = time.monotonic()  # a paused reader heard nothing: not the server's silence
            self.stream.add_reader(self.on_readable)
            self.on_readable()  # libpq may hold buffered frames the socket no longer signals

    def fail(self, exc: BaseException) -> None:
        self.failure.append(exc)
        self.paused = True
        self.stream.remove_reader()
        self.wake.set()


class _Tx:
    __slots__ = ("begin", "changes", "bytes", "correlation", "skip_all", "skip_first", "skip_part", "skip_key", "index",
                 "published", "part", "part_targets", "recorded", "problems")

    def __init__(self, begin: Begin) -> None:
        self.begin = begin
        self.changes: list[_Change] = []
        self.bytes = 0  # the changes' size on the wire
        self.correlation = ""
        self.skip_all = False
        self.skip_first = 0
        # of change skip_first + 1, the workspaces that had it before a restart (of the list of
        # skip_key): a stop can land between two workspaces of one change
        self.skip_part = 0
        self.skip_key = 0
        self.index = 0
        self.published = 0  # changes handed to every workspace (index of the last one)
        self.part = 0  # of change published + 1, the first workspaces of part_targets that have it
        self.part_targets: list[str] = []
        self.recorded = 0  # changes the position file says are published
        self.problems: dict[str, str] = {}  # column -> history_gap reason, announced after the events

    def resume_after(self, position: PositionFile) -> None:
        """This transaction is the position's: skip what it says was handed over."""
        self.skip_first = position.partial_count
        self.skip_part, self.skip_key = position.partial_part, position.partial_key

    def partial(self) -> tuple[int, int]:
        """(workspaces, key of their list) that have the change after the published ones."""
        if self.part:
            return self.part, targets_key(self.part_targets)
        if self.published == self.skip_first:
            return self.skip_part, self.skip_key
        return 0, 0
