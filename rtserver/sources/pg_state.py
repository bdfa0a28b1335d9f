"""The PostgreSQL source's persisted position: the commit LSN of the last transaction whose
events were all published (and, for a large transaction published in parts, how many of its
changes were, and to how many workspaces the next one was), so the changes the slot
redelivers after a restart are dropped, not repeated.

Writes are a 48-byte `pwrite` at offset 0 of an open file, done on the event loop: it lands in
the page cache, and survives a crash of the process. `sync()` fsyncs in an executor; the source
calls it before acknowledging an LSN to PostgreSQL, so an acknowledged position is on disk (a
power loss cannot make us drop what we never published).

The write stays on the loop on purpose, though a saturated disk can make it wait (a page under
writeback on a device that needs stable pages, dirty-page throttling, a full journal): `record()`
runs in the same step of the loop as the publish of the transaction's last event, and the hub
writes frames to clients only in a later callback (Hub.flush), so a transaction published
within one step (fewer events than sources.base.YIELD_EVERY, the sink not holding it up) is in
the file before any client sees it: a process killed at any moment had recorded it (the
restart drops it) or had shown it to nobody (the restart publishes it, once) ("drops what it
had already published", docs/postgres.md;
test_gateway_killed_mid_stream_nothing_lost_nothing_duplicated). Written from an executor, or
batched, it would land after the frames left: a kill in between would publish the transaction
again after the restart, to clients that had it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct

# magic, commit_lsn, partial count (-1 = complete), check: what versions before RTP2 wrote
_FORMAT_1 = struct.Struct("!4sQqQ")
_MAGIC_1 = b"RTP1"
# RTP2 adds: of the change after the counted ones, how many workspaces had it, and a key of the
# workspace list it went to (they count only for the same list: workspaces come and go).
_FORMAT = struct.Struct("!4sQqQQQ")
_MAGIC = b"RTP2"
_SALT = 0x5A5A5A5A5A5A5A5A
_U64 = 0xFFFFFFFFFFFFFFFF


def targets_key(targets: list[str]) -> int:
    """A key of a workspace list, the same in every process (str hashes are not)."""
    digest = hashlib.blake2b("\0".join(targets).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class PositionFile:
    def __init__(self, path: str, fd: int, commit_lsn: int, count: int, part: int = 0, key: int = 0) -> None:
        self.path = path
        self._fd = fd
        self.commit_lsn = commit_lsn
        self._count = count
        self._part = part
        self._key = key
        self._dirty = False
        self.synced_lsn = commit_lsn

    @classmethod
    async def open(cls, path: str) -> PositionFile:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, cls._open_sync, path)

    @classmethod
    def _open_sync(cls, path: str) -> PositionFile:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        data = os.pread(fd, _FORMAT.size, 0)
        if data[:4] == _MAGIC and len(data) == _FORMAT.size:
            _, lsn, count, part, key, check = _FORMAT.unpack(data)
            if check == lsn ^ (count & _U64) ^ part ^ key ^ _SALT:
                return cls(path, fd, lsn, count, part, key)
        elif data[:4] == _MAGIC_1 and len(data) >= _FORMAT_1.size:
            _, lsn, count, check = _FORMAT_1.unpack(data[:_FORMAT_1.size])
            if check == lsn ^ (count & _U64) ^ _SALT:
                return cls(path, fd, lsn, count)
        return cls(path, fd, 0, -1)

    @property
    def complete(self) -> bool:
        return self._count < 0

    @property
    def partial_count(self) -> int:
        return max(self._count, 0)

    @property
    def partial_part(self) -> int:
        """How many workspaces of the list of partial_key had the change after the counted ones."""
        return 0 if self.complete else self._part

    @property
    def partial_key(self) -> int:
        return self._key

    def record(self, commit_lsn: int, count: int, part: int = 0, key: int = 0) -> None:
        """Remember that `count` changes (-1: all) of the transaction at `commit_lsn` are
        published, and the next one to the first `part` workspaces of the list of `key`."""
        self.commit_lsn = commit_lsn
        self._count = count
        self._part, self._key = part, key
        check = commit_lsn ^ (count & _U64) ^ part ^ key ^ _SALT
        os.pwrite(self._fd, _FORMAT.pack(_MAGIC, commit_lsn, count, part, key, check), 0)
        self._dirty = True

    async def sync(self) -> None:
        if not self._dirty or self._fd < 0:
            return
        self._dirty = False
        lsn = self.commit_lsn
        await asyncio.get_running_loop().run_in_executor(None, os.fsync, self._fd)
        self.synced_lsn = lsn

    async def close(self) -> None:
        if self._fd >= 0:
            await self.sync()
            os.close(self._fd)
            self._fd = -1
