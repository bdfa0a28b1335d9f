"""Buffers of the in-progress transactions PostgreSQL streams to the source (pgoutput protocol 2,
`streaming 'on'`): kept per top-level xid until Stream Commit (replayed, then published) or
Stream Abort (dropped), so clients never see uncommitted rows.

What is kept is each pgoutput message as received (its bytes, undecoded): the source decodes
them at commit with its live decoder, so Relation messages sent inside the stream update it
exactly when PostgreSQL assumes the consumer has seen them (after the commit), and TOAST
look-ups see the committed row.

Bounded: the in-memory messages of all open transactions together stay under `memory_limit`
bytes. Beyond it the largest in-memory transaction moves to a spill file in `spill_dir`, and its
later messages are appended there (through a write buffer of `WRITE_CHUNK` bytes). Files are
written and read in the default executor, never on the event loop, and removed at commit, abort
and when the replication connection ends (PostgreSQL streams an unfinished transaction again
from its start on the next connection). Disk use is bounded by the size of the transactions
themselves, as it is for PostgreSQL's own spill files.

Rolled-back subtransactions (Stream Abort with a subxid): their messages are dropped from
memory at once, and skipped when a spill file is read back (the set of aborted subxids is kept
per transaction: a few dozen bytes each).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
from collections.abc import AsyncIterator

WRITE_CHUNK = 1 << 20  # bytes gathered before one write to a spill file
READ_CHUNK = 1 << 20
_LEN = struct.Struct("!I")
_OVERHEAD = 48  # per buffered message: the bytes object and its list slot
_DATA_TAGS = frozenset(b"IUDTM")  # messages dropped with their (sub)transaction; R and Y are kept


def message_xid(msg: bytes) -> int:
    """The (sub)transaction xid a streamed data message carries right after its tag."""
    return int.from_bytes(msg[1:5], "big")


class StreamedTx:
    """One streamed top-level transaction not yet committed or aborted."""

    __slots__ = ("xid", "messages", "mem_bytes", "aborted", "path", "fd", "pending", "file_bytes", "count")

    def __init__(self, xid: int) -> None:
        self.xid = xid
        self.messages: list[bytes] = []
        self.mem_bytes = 0
        self.aborted: set[int] = set()
        self.path = ""
        self.fd = -1
        self.pending = bytearray()  # framed messages not yet written to the spill file
        self.file_bytes = 0
        self.count = 0

    @property
    def spilled(self) -> bool:
        return self.fd >= 0


class StreamBuffers:
    """The open streamed transactions of one replication connection."""

    def __init__(self, spill_dir: str, memory_limit: int) -> None:
        self.spill_dir = spill_dir
        self.memory_limit = max(memory_limit, 0)
        self.open: dict[int, StreamedTx] = {}
        self.mem_bytes = 0
        self._seq = 0

    # Gauges of what is on disk now: counted since start, they stayed up after the commits that
    # removed the files (exported as gauges, /metrics said a file was there that was not).
    @property
    def spill_files(self) -> int:
        """Spill files of the open transactions."""
        return sum(1 for tx in self.open.values() if tx.spilled)

    @property
    def spill_bytes(self) -> int:
        """Bytes written to the open transactions' spill files."""
        return sum(tx.file_bytes for tx in self.open.values() if tx.spilled)

    async def prepare(self) -> None:
        """Remove spill files a crashed process left (their transactions will be streamed again)."""
        await asyncio.get_running_loop().run_in_executor(None, _reset_dir, self.spill_dir)

    def start(self, xid: int, first_segment: bool) -> StreamedTx:
        tx = self.open.get(xid)
        if tx is not None and not first_segment:
            return tx
        if tx is not None:  # a first segment again: start over (should not happen on one connection)
            self._forget(tx)
            _close_quietly(tx)
        tx = self.open[xid] = StreamedTx(xid)
        return tx

    async def append(self, tx: StreamedTx, msg: bytes) -> None:
        tx.count += 1
        if tx.spilled:
            tx.pending += _LEN.pack(len(msg))
            tx.pending += msg
            if len(tx.pending) >= WRITE_CHUNK:
                await self._write_pending(tx)
            return
        size = len(msg) + _OVERHEAD
        tx.messages.append(msg)
        tx.mem_bytes += size
        self.mem_bytes += size
        while self.mem_bytes > self.memory_limit:
            # the largest one: fewest files for the memory freed
            largest = max(self.open.values(), key=lambda t: t.mem_bytes)
            if not largest.mem_bytes:
                break
            await self._spill(largest)

    def abort_subtransaction(self, tx: StreamedTx, subxid: int) -> None:
        tx.aborted.add(subxid)
        if not tx.messages:
            return
        kept = [m for m in tx.messages if not (m[0] in _DATA_TAGS and message_xid(m) == subxid)]
        freed = sum(len(m) + _OVERHEAD for m in tx.messages) - sum(len(m) + _OVERHEAD for m in kept)
        tx.messages = kept
        tx.mem_bytes -= freed
        self.mem_bytes -= freed

    def pop(self, xid: int) -> StreamedTx | None:
        """Take a transaction out (commit or abort); `release` it when done."""
        tx = self.open.pop(xid, None)
        if tx is not None:
            self.mem_bytes -= tx.mem_bytes
        return tx

    async def replay(self, tx: StreamedTx) -> AsyncIterator[bytes]:
        """The transaction's messages in arrival order, without those of aborted subtransactions."""
        aborted = tx.aborted
        if tx.spilled:
            await self._write_pending(tx)
            loop = asyncio.get_running_loop()
            offset, carry = 0, b""
            while offset < tx.file_bytes:
                chunk = await loop.run_in_executor(None, os.pread, tx.fd, READ_CHUNK, offset)
                if not chunk:
                    raise OSError(f"spill file {tx.path} is shorter than written ({offset} < {tx.file_bytes})")
                offset += len(chunk)
                data = carry + chunk if carry else chunk
                pos, end = 0, len(data)
                while pos + 4 <= end:
                    (length,) = _LEN.unpack_from(data, pos)
                    if pos + 4 + length > end:
                        break
                    msg = data[pos + 4: pos + 4 + length]
                    pos += 4 + length
                    if aborted and msg[0] in _DATA_TAGS and message_xid(msg) in aborted:
                        continue
                    yield msg
                carry = data[pos:]
            return
        for msg in tx.messages:
            if aborted and msg[0] in _DATA_TAGS and message_xid(msg) in aborted:
                continue
            yield msg

    async def release(self, tx: StreamedTx | None) -> None:
        """Free a popped transaction's memory and remove its spill file."""
        if tx is None:
            return
        tx.messages = []
        tx.pending = bytearray()
        if tx.spilled:
            await asyncio.get_running_loop().run_in_executor(None, _close_quietly, tx)

    async def close(self) -> None:
        """Drop every open transaction (the connection ended)."""
        txs = list(self.open.values())
        self.open.clear()
        self.mem_bytes = 0
        spilled = [tx for tx in txs if tx.spilled]
        if spilled:
            await asyncio.get_running_loop().run_in_executor(None, lambda: [_close_quietly(t) for t in spilled])

    # -- spilling ---------------------------------------------------------------------------

    async def _spill(self, tx: StreamedTx) -> None:
        self._seq += 1
        tx.path = os.path.join(self.spill_dir, f"xid-{tx.xid}-{self._seq}.spill")
        loop = asyncio.get_running_loop()
        tx.fd = await loop.run_in_executor(None, _create, tx.path)
        buf = bytearray()
        for msg in tx.messages:
            buf += _LEN.pack(len(msg))
            buf += msg
        self.mem_bytes -= tx.mem_bytes
        tx.messages = []
        tx.mem_bytes = 0
        tx.pending = buf
        await self._write_pending(tx)

    async def _write_pending(self, tx: StreamedTx) -> None:
        data, tx.pending = bytes(tx.pending), bytearray()
        if not data:
            return
        await asyncio.get_running_loop().run_in_executor(None, _write_all, tx.fd, data)
        tx.file_bytes += len(data)

    def _forget(self, tx: StreamedTx) -> None:
        self.mem_bytes -= tx.mem_bytes
        tx.mem_bytes = 0
        tx.messages = []


def _reset_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700, exist_ok=True)


def _create(path: str) -> int:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _close_quietly(tx: StreamedTx) -> None:
    if tx.fd >= 0:
        try:
            os.close(tx.fd)
        except OSError:
            pass
        tx.fd = -1
    if tx.path:
        try:
            os.unlink(tx.path)
        except OSError:
            pass
