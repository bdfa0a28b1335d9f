"""Pure-Python reference of rtcore/fanout.pyx (same API and effects; tests compare them).

The fan-out hot loops: queue one event's frame on the outbox of every matching subscription,
then write each dirty outbox's pending frames in one transport write.

An `Outbox` is what a connection exposes to fan-out: `pending` (None, one frame as bytes, or a
list of frames), `closed`, and `write` (its transport's write). A subscription key (`SubKey`)
points at its connection's outbox as `out`. rtcore never imports rtserver: the server's
Connection owns an Outbox, and its Subscription is a SubKey.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class Outbox:
    __slots__ = ("pending", "closed", "write", "big", "on_big")

    def __init__(self) -> None:
        self.pending: bytes | list[bytes] | None = None
        self.closed = False
        self.write: Callable[[bytes], object] | None = None
        # a write holding a frame larger than `big` calls on_big(its size) first (fanout.pyx)
        self.big = sys.maxsize
        self.on_big: Callable[[int], object] | None = None


class SubKey:
    __slots__ = ("out",)

    def __init__(self, out: Outbox | None = None) -> None:
        self.out = out


def _queue(out: Outbox, frame: bytes) -> bool | None:
    """Queue `frame` on `out`: None when nothing was queued (closed, or this frame is already
    the last one), True when `out` had nothing pending (it must be scheduled), else False."""
    pending = out.pending
    if pending is None:
        if out.closed:
            return None
        out.pending = frame
        return True
    if pending is frame:
        return None
    if type(pending) is list:
        if pending[-1] is frame:
            return None
        pending.append(frame)
    else:
        out.pending = [pending, frame]
    return False


def queue_one(out: Outbox, frame: bytes) -> bool:
    """Queue `frame` on `out`; True when `out` had nothing queued (the caller schedules it)."""
    return _queue(out, frame) is True


def push_all(subs: list, frame: bytes, dirty: list) -> int:
    """Queue `frame` on the outbox of every subscription key in `subs`.

    One frame is held as bytes (the common case: no list allocated, so fan-out creates no
    garbage for the cyclic collector), several as a list. An outbox that had nothing queued is
    appended to `dirty` (to be flushed this iteration); the same frame twice in a row (an
    event matching two channels of one connection) is queued once, and a closed outbox, or a
    key without one, gets nothing. Returns the number of frames queued (the hub's
    back-pressure counts them, so it must not count what it skipped).
    """
    queued = 0
    for sub in subs:
        out = sub.out
        if out is None:
            continue  # a key not attached to a connection (yet)
        first = _queue(out, frame)
        if first:
            dirty.append(out)
        if first is not None:
            queued += 1
    return queued


def flush_all(dirty: list) -> tuple[int, int]:
    """One write per outbox of all its pending frames. Returns (writes, frames written)."""
    writes = frames_out = 0
    for out in dirty:
        pending = out.pending
        out.pending = None
        if pending is None or out.closed or out.write is None:
            continue
        largest = max(map(len, pending)) if type(pending) is list else len(pending)
        if largest > out.big and out.on_big is not None:
            out.on_big(largest)
        if type(pending) is list:
            out.write(b"".join(pending))
            frames_out += len(pending)
        else:
            out.write(pending)
            frames_out += 1
        writes += 1
    return writes, frames_out
