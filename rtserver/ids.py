"""Random ids (audit record ids, session ids), from os.urandom taken a block at a time.

os.urandom releases the interpreter lock around its getrandom() call. On the event loop's thread
that hands the lock to whichever thread waits for it (the log writer, woken by the line before),
and taking it back waits for that thread: in a connection storm the three ids of a connection
(two audit records, a session) cost ~9 µs each that way, against 0.3 µs for the call itself
(measured). Here one call fills a block that serves ~80 connections.

The bytes are the same secrets-grade bytes (os.urandom is what the `secrets` module reads), each
handed out once; a forked child starts with an empty block, so it never repeats its parent's.
"""

from __future__ import annotations

import base64
import os
import threading

_BLOCK = 4096

_lock = threading.Lock()
_block = b""
_pos = 0


def _reset() -> None:
    global _lock, _block, _pos
    _lock = threading.Lock()
    _block, _pos = b"", 0


os.register_at_fork(after_in_child=_reset)


def token_bytes(n: int) -> bytes:
    """`n` random bytes, as secrets.token_bytes(n)."""
    global _block, _pos
    if n > _BLOCK:
        return os.urandom(n)
    with _lock:
        start = _pos
        end = start + n
        if end > len(_block):
            _block = os.urandom(_BLOCK)
            start, end = 0, n
        _pos = end
        return _block[start:end]


def token_urlsafe(nbytes: int) -> str:
    """As secrets.token_urlsafe(nbytes): `nbytes` random bytes, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(token_bytes(nbytes)).rstrip(b"=").decode("ascii")


def uuid4() -> str:
    """A random (version 4) UUID, as str(uuid.uuid4()) writes it."""
    n = int.from_bytes(token_bytes(16), "big")
    n = (n & ~(0xC000 << 48)) | (0x8000 << 48)  # variant RFC 4122
    n = (n & ~(0xF000 << 64)) | (4 << 76)  # version 4
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
