"""The fan-out benchmark harness keeps working (issue 8), and the fan-out loops are right.

`python -m benchmarks.fanout run --smoke` runs every scenario against the gateway and the
baselines at toy sizes; the test checks that each produced a result with the quantities the
report needs. It asserts nothing about timings. The fan-out loops (rtcore/fanout.py, which
the hub uses) are checked over real TCP connections.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from benchmarks.fanout import scenarios
from rtcore.fanout import flush_all, push_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.postgres  # the smoke set has one PostgreSQL-fed scenario (its own throwaway cluster)
def test_smoke_run_produces_every_result(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.fanout", "run", "--smoke", "--servers", "gateway,picows,websockets",
         "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "fanout-smoke.json").read_text())
    got = {(r["scenario"], r["server"]): r for r in data["results"]}
    for sc in scenarios.smoke():
        for server in sc.servers:
            r = got.get((sc.name, server))
            assert r is not None, f"no result for {sc.name} on {server}"
            assert "error" not in r, f"{sc.name} on {server}: {r['error']}"
            if sc.kind == "fanout":
                assert r["events"] > 0
                assert r["delivered"] == r["expected"] == r["events"] * sc.matches_per_event()
                assert r["latency_ms"]["samples"] == r["delivered"]
                assert set(r["latency_ms"]) >= {"p50", "p90", "p99", "p99.9", "max"}
                assert r["server_cpu_s"] >= 0 and r["server_rss_mib"] > 0
            elif sc.kind == "storm":
                assert r["connections"] == sc.total and r["failed"] == 0
            else:
                assert r["open_after_1s"] == sc.clients
                assert r["rss_after_mib"] > 0
    gw = got[("broadcast-100", "gateway")]
    assert gw["frames_per_write"] >= 1.0
    md = (tmp_path / "fanout-smoke.md").read_text()
    for sc in scenarios.smoke():
        assert sc.name in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "fanout-smoke-deliveries-vs-clients.png").stat().st_size > 0
        assert (tmp_path / "fanout-smoke-latency-vs-rate.png").stat().st_size > 0


class _Sub:
    def __init__(self, conn):
        self.conn = conn


class _Conn:
    """The duck type the loops expect of rtserver's Connection, over a real transport."""

    def __init__(self, raw):
        self._raw = raw
        self.pending = None
        self.closed = False


async def test_fanout_loops_write_each_connection_once():
    received: dict[int, bytearray] = {}

    class Sink(asyncio.Protocol):
        def connection_made(self, transport):
            self.key = len(received)
            received[self.key] = bytearray()

        def data_received(self, data):
            received[self.key] += data

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conns = []
    for _ in range(3):
        raw, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        conns.append(_Conn(raw))
    conns[2].closed = True
    subs = [_Sub(c) for c in conns]
    a, b = b"frame-a;", b"frame-b;"
    dirty: list = []
    # Connection 0 matches two channels: the same frame object twice is queued once; the
    # closed connection 2 gets nothing. The count is of frames queued.
    assert push_all([subs[0], subs[0], subs[1], subs[2]], a, dirty) == 2
    assert push_all([subs[0]], b, dirty) == 1
    assert dirty == [conns[0], conns[1]]
    # One frame is held as bytes (no list per connection per event), several as a list.
    assert conns[0].pending == [a, b] and conns[1].pending is a and conns[2].pending is None
    assert flush_all(dirty) == (2, 3)
    assert conns[0].pending is None and conns[1].pending is None
    conns[1].pending = b
    assert flush_all([conns[1]]) == (1, 1)
    for _ in range(100):
        if sum(len(v) for v in received.values()) >= len(a + b) + len(a + b):
            break
        await asyncio.sleep(0.01)
    assert sorted(bytes(v) for v in received.values()) == sorted([a + b, a + b, b""])
    for c in conns:
        c._raw.close()
    server.close()
    await server.wait_closed()
