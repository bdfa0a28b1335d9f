"""The fan-out hot loops: queue one event's frame on every matching connection, then write
each dirty connection's pending frames in one transport write.

Duck-typed on purpose (rtcore never imports rtserver): a subscription has `.conn`; a connection
has `.pending` (None, one frame as bytes, or a list of frames), `.closed` and `._raw` (an asyncio
transport). A connection learns that its reader falls behind from its transport (the
`pause_writing` callback at the buffer's high-water mark), not from a check per write here.

Plain Python on purpose. A Cython version of these loops was measured (issue 8,
benchmarks/fanout/microbench.py) and was slower at queueing (96-121 vs 64 ns per delivery):
Cython reads attributes of Python objects through the generic PyObject_GetAttr, while
CPython 3.11+ specializes them with inline caches. Both are dwarfed by the write system call
(about 5-6 µs per connection on this machine), which only coalescing removes. Compiling would
pay only if subscriptions pointed at a typed (cdef) outbox instead of a Python connection;
measured with such an outbox (1000 loopback connections, one process): queueing 30 vs 67 ns
for a connection's first frame, 5 vs 24 ns for each further one, the write unchanged
(~6.3 µs): about 2% of the server's time one event at a time, 4% at 26 frames per write.
"""

from __future__ import annotations


def push_all(subs: list, frame: bytes, dirty: list) -> int:
    """Queue `frame` on the connection of every subscription in `subs`.

    A connection's `pending` is None (nothing queued), one frame (bytes: the common case, no
    list allocated, so fan-out creates no garbage for the cyclic collector), or a list of
    frames. A connection that had nothing queued is appended to `dirty` (to be flushed this
    iteration); the same frame twice in a row (an event matching two channels of one
    connection) is queued once, and a closed connection gets nothing. Returns the number of
    frames queued (the hub's back-pressure counts them, so it must not count what it skipped).
    """
    queued = 0
    for sub in subs:
        conn = sub.conn
        pending = conn.pending
        if pending is None:
            if conn.closed:
                continue
            conn.pending = frame
            dirty.append(conn)
        elif pending is frame:
            continue
        elif type(pending) is list:
            if pending[-1] is frame:
                continue
            pending.append(frame)
        else:
            conn.pending = [pending, frame]
        queued += 1
    return queued


def flush_all(dirty: list) -> tuple[int, int]:
    """One transport write per connection of all its pending frames.
    Returns (writes, frames written)."""
    writes = frames_out = 0
    for conn in dirty:
        pending = conn.pending
        conn.pending = None
        if pending is None or conn.closed:
            continue
        if type(pending) is list:
            conn._raw.write(b"".join(pending))
            frames_out += len(pending)
        else:
            conn._raw.write(pending)
            frames_out += 1
        writes += 1
    return writes, frames_out
