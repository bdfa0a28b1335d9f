"""Before/after of the fan-out hot loop, in one process: `python -m benchmarks.fanout.microbench`.

Three versions of "queue one frame on 1000 connections, then write each connection's pending
frames", over real loopback TCP connections (uvloop transports):
  before    the gateway's loop before issue 8: a Python method call per delivery
            (`sub.conn.push(frame)` -> `hub.schedule`) and per connection (`conn.flush()`,
            which read the limit through the config object each time)
  python    rtcore/fanout_ref.py: one Python function per event / per flush over outboxes
  compiled  rtcore/fanout.pyx, as the hub runs now: the same loops over extension-type
            outboxes whose fields are C struct members
Reported per delivery, one event at a time (one frame per connection per write): the queueing
alone (no system call), the write, and both.
"""

from __future__ import annotations

import asyncio
import time

import uvloop

from rtcore import fanout, fanout_ref

N = 1000
ROUNDS = 200


class _Limits:
    send_buffer_bytes = 4 << 20


class _Cfg:
    @property
    def limits(self) -> _Limits:  # the real Config builds a section object per access
        return _Limits()


class Hub:
    def __init__(self) -> None:
        self.dirty: list = []
        self.cfg = _Cfg()

    def schedule(self, conn) -> None:
        self.dirty.append(conn)


class Conn:
    """Attributes of rtserver's Connection that the loops touch; `push`/`flush` are the
    pre-issue-8 methods, verbatim apart from the metrics object."""

    def __init__(self, hub: Hub, raw) -> None:
        self.hub = hub
        self._raw = raw
        self.pending = None
        self.closed = False
        self.writes = 0
        self.frames_out = 0

    def push(self, frame: bytes) -> None:
        pending = self.pending
        if pending is None:
            if self.closed:
                return
            self.pending = [frame]
            self.hub.schedule(self)
        elif pending[-1] is not frame:
            pending.append(frame)

    def flush(self) -> None:
        frames = self.pending
        self.pending = None
        if frames is None or self.closed:
            return
        raw = self._raw
        if len(frames) == 1:
            raw.write(frames[0])
        else:
            raw.write(b"".join(frames))
        self.writes += 1
        self.frames_out += len(frames)
        if raw.get_write_buffer_size() > self.hub.cfg.limits.send_buffer_bytes:
            self._slow_reader()

    def _slow_reader(self) -> None:
        raise RuntimeError("the reader side of the micro-benchmark fell behind")


class Sub:
    __slots__ = ("conn",)

    def __init__(self, conn: Conn) -> None:
        self.conn = conn


class Drain(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Drain, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hub = Hub()
    conns = []
    for _ in range(N):
        raw, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        conns.append(Conn(hub, raw))
    subs = [Sub(c) for c in conns]
    frame = b"\x81\x7e\x00\xcf" + b"x" * 207

    def before() -> tuple[int, int]:
        t0 = time.perf_counter_ns()
        for sub in subs:
            sub.conn.push(frame)
        dirty, hub.dirty = hub.dirty, []
        t1 = time.perf_counter_ns()
        for conn in dirty:
            conn.flush()
        return t1 - t0, time.perf_counter_ns() - t1

    def make(impl):
        outs = []
        for c in conns:
            out = impl.Outbox()
            out.write = c._raw.write
            outs.append(out)
        keys = [impl.SubKey(o) for o in outs]

        def run() -> tuple[int, int]:
            dirty: list = []
            t0 = time.perf_counter_ns()
            impl.push_all(keys, frame, dirty)
            t1 = time.perf_counter_ns()
            impl.flush_all(dirty)
            return t1 - t0, time.perf_counter_ns() - t1
        return run

    variants = {"before": before, "python": make(fanout_ref), "compiled": make(fanout)}
    best = {name: [float("inf"), float("inf")] for name in variants}
    for _ in range(7):  # interleaved, so load elsewhere on the machine hits every variant alike
        for name, fn in variants.items():
            q = w = 0
            for _ in range(ROUNDS):
                dq, dw = fn()
                q += dq
                w += dw
                await asyncio.sleep(0)  # the reader side drains (not timed)
            best[name][0] = min(best[name][0], q / (ROUNDS * N))
            best[name][1] = min(best[name][1], w / (ROUNDS * N))
    print(f"{N} connections, {ROUNDS} events x 7 interleaved rounds; ns per delivery, best round")
    print(f"{'variant':10s} {'queue':>7s} {'write':>7s} {'total':>7s}")
    for name, (q, w) in best.items():
        print(f"{name:10s} {q:7.0f} {w:7.0f} {q + w:7.0f}")
    for c in conns:
        c._raw.close()
    server.close()


if __name__ == "__main__":
    import argparse

    # No options: --help says what it does instead of starting it.
    argparse.ArgumentParser(prog="python -m benchmarks.fanout.microbench", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    uvloop.run(main())
