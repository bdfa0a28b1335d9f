"""The PostgreSQL source's persisted position: the commit LSN of the last transaction whose
events were all published (and, for a large transaction published in parts, how many of its
changes were), so the changes the slot redelivers after a restart are dropped, not repeated.

Writes are a 32-byte `pwrite` at offset 0 of an open file, done on the event loop: it lands in
the page cache without waiting for the device, and survives a crash of the process. `sync()`
fsyncs in an executor; the source calls it before acknowledging an LSN to PostgreSQL, so an
acknowledged position is on disk (a power loss cannot make us drop what we never published).
"""

from __future__ import annotations

import asyncio
import os
import struct

_FORMAT = struct.Struct("!4sQqQ")  # magic, commit_lsn, partial count (-1 = complete), check
_MAGIC = b"RTP1"


class PositionFile:
    def __init__(self, path: str, fd: int, commit_lsn: int, count: int) -> None:
        self.path = path
        self._fd = fd
        self.commit_lsn = commit_lsn
        self._count = count
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
        lsn, count = 0, -1
        if len(data) == _FORMAT.size:
            magic, lsn_, count_, check = _FORMAT.unpack(data)
            if magic == _MAGIC and check == (lsn_ ^ (count_ & 0xFFFFFFFFFFFFFFFF) ^ 0x5A5A5A5A5A5A5A5A):
                lsn, count = lsn_, count_
        return cls(path, fd, lsn, count)

    @property
    def complete(self) -> bool:
        return self._count < 0

    @property
    def partial_count(self) -> int:
        return max(self._count, 0)

    def record(self, commit_lsn: int, count: int) -> None:
        """Remember that `count` changes (-1: all) of the transaction at `commit_lsn` are published."""
        self.commit_lsn = commit_lsn
        self._count = count
        check = commit_lsn ^ (count & 0xFFFFFFFFFFFFFFFF) ^ 0x5A5A5A5A5A5A5A5A
        os.pwrite(self._fd, _FORMAT.pack(_MAGIC, commit_lsn, count, check), 0)
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
