"""On-disk spool of audit records waiting for Kafka: size-bounded segment files of JSON lines.

Records are kept oldest first across numbered segment files (`<20 digits>.jsonl`, one record
per line). Appends go to the newest segment; the reader takes whole segments from the oldest
end and deletes (or rewrites) them once delivered, so a crash re-delivers at most one segment
(at-least-once; consumers dedupe by record id).

Every method does blocking file I/O: `KafkaAudit` calls them on its own single-thread executor,
never on the event loop, and that single thread keeps them in order. Counters (`records`,
`bytes`) are plain ints the event loop may read at any time.
"""

from __future__ import annotations

import os
import re

from rtserver.atomic_file import directory_problem, replace_file
from rtserver.file_lock import lock_exclusive

_SEGMENT_RE = re.compile(r"^(\d{20})\.jsonl$")
# Segment ids start high so records can be put back in front of all others (the batch that
# was in flight when the gateway stopped) without renaming anything.
_FIRST_SEGMENT = 10**15


class SpoolError(RuntimeError):
    """The spool directory cannot be used (unwritable, unreadable, or held by another process).

    A RuntimeError: `rtserver serve` reports those as a one-line start-up failure (exit 2)."""


class SpoolWriteError(OSError):
    """The disk refused an append (full, I/O error): `accepted` of its records were written
    before that; the rest are neither on disk nor counted."""

    def __init__(self, accepted: int, cause: OSError):
        super().__init__(cause.errno, cause.strerror)
        self.accepted = accepted


def accepted_before(exc: OSError) -> int:
    """How many records of the write that raised `exc` are on disk (none unless it says)."""
    return exc.accepted if isinstance(exc, SpoolWriteError) else 0


class Spool:
    """Segmented JSON-lines FIFO on disk, bounded by `max_bytes` in total."""

    def __init__(self, directory: str, max_bytes: int, segment_bytes: int = 1 << 20):
        self.directory = directory
        self.max_bytes = max_bytes
        # Small bounds (tests, tiny disks) still get several segments so delivered ones free space.
        self.segment_bytes = max(1024, min(segment_bytes, max_bytes // 8))
        self.records = 0
        self.bytes = 0
        self._segments: dict[int, list[int]] = {}  # id -> [records, bytes]
        self._write_id: int | None = None
        self._write_fh = None
        self._lock_fh = None

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory, take its lock and index the segments left by a previous run."""
        where = f"audit spool {self.directory} (audit.spool_dir)"
        problem = directory_problem(self.directory, where)  # a file in the way was "File exists"
        if problem is not None:
            raise SpoolError(problem)
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            self._lock_fh = lock_exclusive(os.path.join(self.directory, ".lock"))
        except OSError as exc:
            raise SpoolError(f"{where}: {exc.strerror or exc}") from None
        if self._lock_fh is None:
            raise SpoolError(f"{where}: in use by another process (give each node its own state_dir)")
        try:
            self._index()
        except OSError as exc:
            raise SpoolError(f"{where}: {exc.filename or self.directory}: {exc.strerror or exc}") from None

    def _index(self) -> None:
        """Count the segments a previous run left (records and bytes), drop its leftovers."""
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.endswith(".tmp"):
                os.unlink(path)  # an interrupted rewrite; the original segment is still there
                continue
            m = _SEGMENT_RE.match(name)
            if not m:
                continue
            with open(path, "rb") as fh:
                data = fh.read()
            if not data:
                os.unlink(path)
                continue
            count = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
            self._segments[int(m.group(1))] = [count, len(data)]
            self.records += count
            self.bytes += len(data)

    def close(self) -> None:
        """Sync and close the open segment and release the directory lock (released even when
        the sync fails: the next start, in this process too, must be able to take it)."""
        try:
            self.seal(sync=True)
        finally:
            if self._lock_fh is not None:
                self._lock_fh.close()
                self._lock_fh = None

    # -- writing -----------------------------------------------------------------------------

    def append(self, lines: list[bytes]) -> int:
        """Append records (JSON without newline) at the newest end; returns how many fit the
        bound. Raises SpoolWriteError when the disk refuses them."""
        accepted = 0
        chunk: list[bytes] = []
        try:
            for line in lines:
                size = len(line) + 1
                if self.bytes + size > self.max_bytes:
                    break
                if self._write_id is None or self._segments[self._write_id][1] + size > self.segment_bytes:
                    self._write(chunk)
                    accepted += len(chunk)
                    chunk = []
                    self._roll()
                chunk.append(line)
                seg = self._segments[self._write_id]
                seg[0] += 1
                seg[1] += size
                self.records += 1
                self.bytes += size
            self._write(chunk)
        except OSError as exc:
            raise SpoolWriteError(accepted, exc) from exc
        return accepted + len(chunk)

    def prepend(self, lines: list[bytes]) -> int:
        """Put records in front of every segment (oldest end); returns how many fit the bound."""
        keep: list[bytes] = []
        total = 0
        for line in lines:
            if self.bytes + total + len(line) + 1 > self.max_bytes:
                break
            keep.append(line)
            total += len(line) + 1
        if keep:
            sid = min(self._segments) - 1 if self._segments else _FIRST_SEGMENT
            self._write_file(sid, keep)
            self._segments[sid] = [len(keep), total]
            self.records += len(keep)
            self.bytes += total
        return len(keep)

    def drop_newest(self, nbytes: int) -> int:
        """Drop records from the newest end until `nbytes` more fit the bound (for records older
        than all of them, put in front at shutdown: the trail keeps its oldest part whole);
        returns how many were dropped."""
        dropped = 0
        while self._segments and self.bytes + nbytes > self.max_bytes:
            sid = max(self._segments)
            if sid == self._write_id:
                self.seal()
            count, size = self._segments[sid]
            excess = self.bytes + nbytes - self.max_bytes
            if size <= excess:
                self.delete(sid)
                dropped += count
                continue
            with open(self._path(sid), "rb") as fh:
                lines = [line for line in fh.read().split(b"\n") if line]
            kept, total = [], 0
            for line in lines:
                if total + len(line) + 1 > size - excess:
                    break
                kept.append(line)
                total += len(line) + 1
            dropped += len(lines) - len(kept)
            self.replace(sid, kept)
        return dropped

    def seal(self, sync: bool = False) -> None:
        """Close the segment being appended to; the next append starts a new one."""
        if self._write_fh is not None:
            self._write_fh.flush()
            if sync:
                os.fsync(self._write_fh.fileno())
            self._write_fh.close()
        self._write_fh = None
        self._write_id = None

    def _roll(self) -> None:
        self.seal()
        sid = max(self._segments) + 1 if self._segments else _FIRST_SEGMENT
        # Unbuffered: what the disk does not take must not wait in a buffer, to be written by
        # a later flush under records already counted lost (see _write).
        self._write_fh = open(self._path(sid), "ab", buffering=0)
        self._write_id = sid
        self._segments[sid] = [0, 0]

    def _write(self, chunk: list[bytes]) -> None:
        """Write `chunk` (already counted) at the end of the open segment. When the disk refuses
        it, the segment is cut back to the records before it, and the chunk uncounted: a partial
        line left there was read back as one more record lost."""
        if not chunk:
            return
        data = memoryview(b"\n".join(chunk) + b"\n")
        try:
            written = 0
            while written < len(data):
                written += self._write_fh.write(data[written:])
        except OSError:
            sid = self._write_id
            seg = self._segments[sid]
            seg[0] -= len(chunk)
            seg[1] -= len(data)
            self.records -= len(chunk)
            self.bytes -= len(data)
            try:
                os.ftruncate(self._write_fh.fileno(), seg[1])
            finally:
                self.seal()
                if not seg[0]:
                    self.delete(sid)
            raise

    # -- reading -----------------------------------------------------------------------------

    def read_oldest(self) -> tuple[int, list[bytes]] | None:
        """The oldest segment's id and lines (it stays on disk until `delete`/`replace`). A
        segment whose file was removed behind our back reads as no lines (`segment_records`
        still says how many it held)."""
        if not self._segments:
            return None
        sid = min(self._segments)
        if sid == self._write_id:
            self.seal()
        try:
            with open(self._path(sid), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return sid, []
        return sid, [line for line in data.split(b"\n") if line]

    def replace(self, sid: int, lines: list[bytes]) -> None:
        """Rewrite segment `sid` with only `lines` (its undelivered tail); delete it when empty."""
        if not lines:
            self.delete(sid)
            return
        self._write_file(sid, lines)
        old = self._segments.get(sid, [0, 0])
        new = [len(lines), sum(len(line) + 1 for line in lines)]
        self.records += new[0] - old[0]
        self.bytes += new[1] - old[1]
        self._segments[sid] = new

    def delete(self, sid: int) -> None:
        """Drop a delivered segment."""
        if sid == self._write_id:
            self.seal()
        try:
            os.unlink(self._path(sid))
        except FileNotFoundError:
            pass
        old = self._segments.pop(sid, None)
        if old is not None:
            self.records -= old[0]
            self.bytes -= old[1]

    def segment_records(self, sid: int) -> int:
        seg = self._segments.get(sid)
        return seg[0] if seg else 0

    # -- helpers -----------------------------------------------------------------------------

    def _path(self, sid: int) -> str:
        return os.path.join(self.directory, f"{sid:020d}.jsonl")

    def _write_file(self, sid: int, lines: list[bytes]) -> None:
        replace_file(self._path(sid), b"\n".join(lines) + b"\n")
