"""The replication connection of the PostgreSQL source: START_REPLICATION with pgoutput, read
CopyData frames without blocking the event loop, write standby status updates.

Why psycopg 3's low-level `pgconn` and not psycopg2's LogicalReplicationConnection: both were
measured equally fast here, but psycopg 3 is already a dependency of the project (psycopg2 would
be a second libpq binding), its `pgconn` exposes exactly the libpq calls we need
(`consume_input`, `get_copy_data(async_=1)`, `put_copy_data`, `flush`) with non-blocking mode,
and its `AsyncConnection.connect` does the connect (DNS, TLS, auth) without blocking the loop.
asyncpg cannot do it: START_REPLICATION hangs there (it has no COPY BOTH support).
We frame XLogData / keepalive / standby status ourselves (rtcore.pgoutput).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import psycopg
from psycopg import pq

from rtcore.pgoutput_ref import PG_EPOCH_OFFSET_US, format_lsn

# The session settings whose text formats the decoder relies on: TimeZone=UTC makes timestamptz
# text end in "+00" (the decoder's fast path); ISO dates, hex bytea and the float digits fix the
# others. The replication connection runs with them, and so does the catalog connection that
# fetches unchanged TOAST values, so fetched and streamed values look the same.
SESSION_SETTINGS = {"TimeZone": "UTC", "DateStyle": "ISO", "IntervalStyle": "postgres", "bytea_output": "hex",
                    "extra_float_digits": "1"}


class StreamError(Exception):
    """The replication connection failed or was closed by the server; `sqlstate` is the error
    code the server sent with it ("" when none)."""

    def __init__(self, message: str, sqlstate: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _session_sql(pgconn: pq.abc.PGconn) -> str:
    """SET statements for SESSION_SETTINGS, run once connected: as startup options they lost to
    PGDATESTYLE and PGTZ, which libpq sends from the environment after them. pgoutput sends names
    and values in the client encoding, by default the database's (or PGCLIENTENCODING's), so
    UTF-8 too, except for SQL_ASCII, which PostgreSQL does not convert but would then check,
    ending the stream at the first byte that is no UTF-8 (the decoder reports such a value)."""
    settings = dict(SESSION_SETTINGS)
    if pgconn.parameter_status(b"server_encoding") != b"SQL_ASCII":
        settings["client_encoding"] = "UTF8"
    return "; ".join(f"SET {name} TO '{value}'" for name, value in settings.items())


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _now_us() -> int:
    return time.time_ns() // 1000


class ReplicationStream:
    """One `replication=database` connection streaming a logical slot.

    `frames()` hands each CopyData payload to `on_frame` synchronously, in order, from the
    socket's reader callback; the callback must not block (the source queues the work).
    """

    def __init__(self, dsn: str, slot: str, publication: str, *, proto_version: int | None = None,
                 streaming: bool = True, messages: bool = True, application_name: str = "rtserver",
                 connect_timeout: float | None = None) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        # None: the newest this source speaks that the server supports (see connect())
        self.proto_version = proto_version
        self.streaming = streaming
        self.negotiated_proto = 0
        self.server_version = 0
        self.messages = messages
        self.application_name = application_name
        self.connect_timeout = connect_timeout
        self._conn: psycopg.AsyncConnection | None = None
        self._pgconn: pq.abc.PGconn | None = None
        self._fd = -1
        self._closed = False
        self._writer_armed = False
        self.sent_lsn = 0  # the LSN the last status update acknowledged
        self.sent_at = 0.0  # when it was sent (time.monotonic())

    async def connect(self, start_lsn: int) -> None:
        """Connect and start streaming; bounded by connect_timeout as a whole (a dead link would
        otherwise hold the connect, or the wait for START_REPLICATION's answer, indefinitely)."""
        if self.connect_timeout is None:
            await self._connect(start_lsn)
            return
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._connect(start_lsn)
        except TimeoutError as exc:
            await self.close()
            raise StreamError(f"no answer from the server within {self.connect_timeout:g} s") from exc

    async def _connect(self, start_lsn: int) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self.dsn,
            autocommit=True,
            replication="database",
            application_name=self.application_name,
        )
        self._conn = conn
        pgconn = conn.pgconn
        self.server_version = pgconn.server_version
        await conn.execute(_session_sql(pgconn))  # no parameters: the simple query protocol
        # Protocol 2 with streaming 'on' (PostgreSQL 14+): transactions larger than the server's
        # logical_decoding_work_mem are sent while in progress (Stream Start/Stop/Commit/Abort)
        # instead of being spilled on the server until they commit.
        proto = self.proto_version
        if proto is None:
            proto = 2 if self.streaming and self.server_version >= 140000 else 1
        self.negotiated_proto = proto
        opts = [f"proto_version '{proto}'", f"publication_names '{self.publication}'"]
        if self.messages:
            opts.append("messages 'true'")
        if proto >= 2 and self.streaming:
            opts.append("streaming 'on'")
        cmd = f"START_REPLICATION SLOT \"{self.slot}\" LOGICAL {format_lsn(start_lsn)} ({', '.join(opts)})"
        pgconn.nonblocking = 1
        try:
            pgconn.send_query(cmd.encode())
        except psycopg.OperationalError as exc:
            raise StreamError(f"START_REPLICATION failed: {exc}") from exc
        self._pgconn = pgconn
        self._fd = pgconn.socket
        loop = asyncio.get_running_loop()
        await self._flush_async()
        # wait for the COPY_BOTH result without blocking the loop
        while True:
            pgconn.consume_input()
            if not pgconn.is_busy():
                res = pgconn.get_result()
                if res is None:
                    raise StreamError("START_REPLICATION returned no result")
                if res.status == pq.ExecStatus.COPY_BOTH:
                    return
                raise StreamError(
                    f"START_REPLICATION failed: {res.get_error_message() or pgconn.get_error_message()}"
                )
            fut = loop.create_future()
            loop.add_reader(self._fd, _wake, fut)
            try:
                await fut
            finally:
                loop.remove_reader(self._fd)

    def read_available(self, on_frame: Callable[[bytes], None]) -> None:
        """Consume what the socket holds and pass every complete CopyData payload to `on_frame`.
        Raises StreamError when the stream ended or failed."""
        pgconn = self._pgconn
        if pgconn is None:
            raise StreamError("not connected")
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as exc:
            raise StreamError(f"replication connection lost: {exc}") from exc
        while True:
            try:
                nbytes, data = pgconn.get_copy_data(1)
            except psycopg.OperationalError as exc:
                # libpq's -2 (a stream it cannot read: lost synchronization), which psycopg
                # raises instead of returning: it escaped the socket callback as a traceback.
                raise StreamError(f"replication stream unreadable: {exc}") from exc
            if nbytes > 0:
                on_frame(bytes(data))
                continue
            if nbytes == 0:
                return
            # -1: COPY done (server ended the stream)
            res = pgconn.get_result()
            msg = res.get_error_message() if res is not None else ""
            code = (res.error_field(pq.DiagnosticField.SQLSTATE) if res is not None else None) or b""
            raise StreamError(f"replication stream ended: {msg or pgconn.get_error_message() or 'closed by server'}",
                              code.decode("ascii", "replace"))

    def add_reader(self, callback: Callable[[], None]) -> None:
        asyncio.get_running_loop().add_reader(self._fd, callback)

    def remove_reader(self) -> None:
        if self._fd >= 0:
            try:
                asyncio.get_running_loop().remove_reader(self._fd)
            except (ValueError, OSError):
                pass

    def send_status(self, lsn: int, reply: bool = False) -> None:
        """Standby status update acknowledging `lsn` as written, flushed and applied."""
        pgconn = self._pgconn
        if pgconn is None:
            return
        frame = b"r" + (lsn).to_bytes(8, "big") * 3 + (_now_us() - PG_EPOCH_OFFSET_US).to_bytes(8, "big", signed=True) + (b"\x01" if reply else b"\x00")
        try:
            pgconn.put_copy_data(frame)
        except psycopg.OperationalError as exc:
            raise StreamError(f"standby status update failed: {exc}") from exc
        self.sent_lsn, self.sent_at = lsn, time.monotonic()
        self._flush_nowait()

    def _flush_nowait(self) -> None:
        pgconn = self._pgconn
        if pgconn is None:
            return
        if pgconn.flush() == 1 and not self._writer_armed:
            # kernel buffer full (rare: the frames are 34 bytes); finish when writable
            loop = asyncio.get_running_loop()
            self._writer_armed = True

            def writable() -> None:
                if self._pgconn is None or self._pgconn.flush() == 0:
                    loop.remove_writer(self._fd)
                    self._writer_armed = False

            loop.add_writer(self._fd, writable)

    async def _flush_async(self) -> None:
        pgconn = self._pgconn
        loop = asyncio.get_running_loop()
        while pgconn is not None and pgconn.flush() == 1:
            fut = loop.create_future()
            loop.add_writer(self._fd, _wake, fut)
            try:
                await fut
            finally:
                loop.remove_writer(self._fd)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.remove_reader()
        if self._writer_armed and self._fd >= 0:
            try:
                asyncio.get_running_loop().remove_writer(self._fd)
            except (ValueError, OSError):
                pass
        self._pgconn = None
        if self._conn is not None:
            try:
                # closing the socket ends the walsender; CopyDone would wait for the server
                await self._conn.close()
            except Exception:  # noqa: BLE001 - the connection may already be broken
                pass
