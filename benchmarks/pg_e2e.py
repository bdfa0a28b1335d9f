"""End-to-end PostgreSQL benchmark: commit -> WebSocket client latency through the real gateway,
beside a bare replication reader in the same run, plus a bulk transaction's fan-out rate.

One command (not part of the test suite; starts its own throwaway cluster and gateway):

    PYTHONPATH=. python benchmarks/pg_e2e.py [--rate 1000] [--seconds 5] [--subscribers 100] [--bulk 100000]

Processes, so that measuring does not steal the measured process's loop:
- this orchestrator: the PostgreSQL cluster, the gateway subprocess, and the writer (asyncpg,
  one single-row autocommit INSERT per tick on an absolute schedule);
- `--role reader`: a bare replication reader (own slot and publication, same ReplicationStream
  and compiled decoder as the gateway, nothing else);
- the subscribers: N WebSocket clients subscribed to `postgres:ticks`: by default
  benchmarks/csub/csub.c (all N in one epoll loop in C, about a microsecond per frame, so the
  measuring clients do not take the CPU the gateway and PostgreSQL need on a small machine);
  `--client python`: picows clients in `--role subscribers` (several µs per frame);
  `--client go`: the Go load generator of benchmarks/fanout (as costly as Python at one frame
  per wake-up).
Latency = receive time - `t`, the writer's `time.time_ns()` taken just before it sends
the INSERT (so it includes the INSERT's own execution and commit, a conservative bound on
commit -> receive). All processes share one clock (same host, CLOCK_REALTIME).
Markers in `t`: > 0 measured tick, -3 warm-up, -1 end of the steady phase, 0 bulk row.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import sys
import tempfile
import time
from typing import Any

import msgspec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# `t` first: an event's record then starts with {"t":<ns>, which the Go subscriber looks for.
TABLE_SQL = "CREATE TABLE ticks (t bigint NOT NULL, id bigserial PRIMARY KEY, name text, price numeric(10,2))"
INSERT_SQL = "INSERT INTO ticks (t, name, price) VALUES ($1, 'tick', 9.99)"
WARMUP_ROWS = 200


def quantiles(samples_ns: array.array) -> dict[str, Any]:
    values = sorted(samples_ns)
    if not values:
        return {"n": 0}

    def q(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))] / 1e6, 3)

    return {"n": len(values), "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "p999_ms": q(0.999),
            "max_ms": round(values[-1] / 1e6, 3)}


# -- role: bare replication reader ---------------------------------------------------------


async def run_reader(dsn: str, slot: str, publication: str, bulk: int) -> None:
    from rtcore import pgoutput
    from rtserver.sources.pg_stream import ReplicationStream

    stream = ReplicationStream(dsn, slot, publication, application_name="bench-bare-reader")
    await stream.connect(0)
    decoder = pgoutput.Decoder()
    samples = array.array("q")
    state = {"bulk": 0, "bulk_first": 0, "bulk_last": 0, "steady_done": False, "lsn": 0}
    done = asyncio.Event()

    def on_frame(frame: bytes) -> None:
        now = time.time_ns()
        msg = decoder.decode_copy(frame)
        if msg.kind == "k":
            if msg.reply_requested:
                stream.send_status(state["lsn"])
            return
        m = msg.message
        if m.kind == "I":
            sent = m.new["t"]
            if sent > 0:
                samples.append(now - sent)
            elif sent == 0:
                state["bulk"] += 1
                if state["bulk"] == 1:
                    state["bulk_first"] = now
                if state["bulk"] == bulk:
                    state["bulk_last"] = now
                    done.set()
            elif sent == -1:
                state["steady_done"] = True
        elif m.kind == "C":
            state["lsn"] = m.end_lsn

    def readable() -> None:
        stream.read_available(on_frame)

    stream.add_reader(readable)
    print("READY", flush=True)
    try:
        await asyncio.wait_for(done.wait(), 600)
    finally:
        stream.send_status(state["lsn"])
        await stream.close()
    print(json.dumps({"steady": quantiles(samples), "bulk_first_ns": state["bulk_first"],
                      "bulk_last_ns": state["bulk_last"]}), flush=True)


# -- role: WebSocket subscribers ------------------------------------------------------------


class Rec(msgspec.Struct):
    """The one field of an event's record the subscribers read."""

    t: int = -9


class Msg(msgspec.Struct):
    type: str
    record: Rec | None = None
    code: int | None = None
    message: str | None = None


async def run_subscribers(url: str, token: str, count: int, bulk: int) -> None:
    from picows import WSListener, WSMsgType, ws_connect

    decode = msgspec.json.Decoder(Msg).decode
    samples = array.array("q")
    hub = {"subscribed": 0, "steady_done": 0, "bulk_done": 0, "closed": 0, "errors": []}
    bulk_last: list[int] = []
    steady_all = asyncio.Event()
    bulk_all = asyncio.Event()
    subscribed_all = asyncio.Event()
    sub_msg = json.dumps({"type": "subscribe", "channel": "postgres:ticks"}).encode()
    auth_msg = json.dumps({"type": "auth", "token": token}).encode()

    class Sub(WSListener):
        def __init__(self) -> None:
            self.bulk = 0
            self.finished = False

        def on_ws_connected(self, transport: Any) -> None:
            transport.send(WSMsgType.TEXT, auth_msg)

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            now = time.time_ns()
            if frame.msg_type != WSMsgType.TEXT:
                return
            msg = decode(frame.get_payload_as_bytes())
            if msg.type == "event":
                sent = msg.record.t
                if sent > 0:
                    samples.append(now - sent)
                elif sent == 0:
                    self.bulk += 1
                    if self.bulk == bulk:
                        bulk_last.append(now)
                        hub["bulk_done"] += 1
                        self._check()
                elif sent == -1:
                    hub["steady_done"] += 1
                    self._check()
            elif msg.type == "auth_ok":
                transport.send(WSMsgType.TEXT, sub_msg)
            elif msg.type == "subscribed":
                hub["subscribed"] += 1
                self._check()
            elif msg.type == "error":
                hub["errors"].append(f"{msg.code} {msg.message}")
                subscribed_all.set()

        def on_ws_disconnected(self, transport: Any) -> None:
            hub["closed"] += 1
            self._check()

        def _check(self) -> None:
            live = count - hub["closed"]
            if hub["subscribed"] >= count:
                subscribed_all.set()
            if hub["steady_done"] >= live:
                steady_all.set()
            if hub["bulk_done"] >= live:
                bulk_all.set()

    transports = []
    for _ in range(count):
        transport, _listener = await ws_connect(Sub, url, max_frame_size=1 << 20)
        transports.append(transport)
    await asyncio.wait_for(subscribed_all.wait(), 30)
    if hub["errors"]:
        print(json.dumps({"error": hub["errors"][:3]}), flush=True)
        return
    print("READY", flush=True)
    await asyncio.wait_for(steady_all.wait(), 120)
    print(json.dumps({"steady": quantiles(samples), "closed": hub["closed"]}), flush=True)
    try:
        await asyncio.wait_for(bulk_all.wait(), 600)
    except TimeoutError:
        pass
    print(json.dumps({"bulk_done": hub["bulk_done"], "bulk_last_ns": max(bulk_last, default=0),
                      "closed": hub["closed"]}), flush=True)
    for t in transports:
        t.disconnect()


# -- the Go subscriber ----------------------------------------------------------------------


class GoSubscribers:
    """benchmarks/fanout's Go subscriber (gosub) as the N clients: on one OS thread it costs a
    fraction of a Python client per frame, so the clients' own queueing does not inflate the
    gateway's latency. It reads each event's `{"t":<ns>,` (the record's first column)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, binary: str, ws_url: str, token: str, count: int) -> GoSubscribers:
        from urllib.parse import urlsplit

        u = urlsplit(ws_url)
        cfg = {"role": "subscribers", "n": count, "concurrency": 50, "server": {
            "host": u.hostname, "port": u.port, "path": u.path + (f"?{u.query}" if u.query else ""),
            "headers": {"Authorization": f"Bearer {token}"},
            "hello": [json.dumps({"type": "subscribe", "channel": "postgres:ticks"})], "ready": '"subscribed"'}}
        proc = await asyncio.create_subprocess_exec(binary, json.dumps(cfg), stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    env={**os.environ, "GOMAXPROCS": "1"})
        self = cls(proc)
        ready = await self._reply(60)
        if ready.get("ready") != count:
            raise RuntimeError(f"go subscribers: {ready}")
        return self

    async def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            raise RuntimeError(f"go subscribers exited ({await self.proc.wait()})")
        return json.loads(raw)

    async def cmd(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._reply(60)

    async def wait_count(self, n: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = await self.cmd("stat")
            if st["count"] >= n or time.monotonic() > deadline:
                return st
            await asyncio.sleep(0.05)

    async def latencies(self) -> array.array:
        with tempfile.NamedTemporaryFile(suffix=".lat") as fh:
            await self.cmd("report", path=fh.name)
            return load_latencies(fh.name)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


# -- the C subscriber -----------------------------------------------------------------------

CSUB_DIR = os.path.join(ROOT, "benchmarks", "csub")


def csub_binary() -> str | None:
    """benchmarks/csub/csub, built with gcc when missing or older than its source; None when
    there is no C compiler."""
    import shutil
    import subprocess

    src, binary = os.path.join(CSUB_DIR, "csub.c"), os.path.join(CSUB_DIR, "csub")
    if os.path.exists(binary) and os.path.getmtime(binary) >= os.path.getmtime(src):
        return binary
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    proc = subprocess.run([cc, "-O2", "-o", binary, src], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"pg_e2e: building csub failed, using the Python clients: {proc.stderr[-500:]}", file=sys.stderr)
        return None
    return binary


async def start_csub(binary: str, ws_url: str, token: str, count: int, bulk: int, out: str) -> Child:
    from urllib.parse import urlsplit

    u = urlsplit(ws_url)
    proc = await asyncio.create_subprocess_exec(
        binary, u.hostname or "127.0.0.1", str(u.port), u.path + (f"?{u.query}" if u.query else ""), token,
        str(count), str(bulk), out, stdout=asyncio.subprocess.PIPE)
    return Child(proc, "csub")


def load_latencies(path: str) -> array.array:
    samples = array.array("q")
    with open(path, "rb") as fh:
        samples.frombytes(fh.read())
    return samples


# -- CPU placement --------------------------------------------------------------------------


def pin(pid: int, cpu: int | None) -> None:
    if cpu is not None:
        try:
            os.sched_setaffinity(pid, {cpu})
        except OSError:
            pass  # the process is gone, or affinity is not ours to set


def pin_cluster(data_dir: str, cpu: int | None) -> None:
    """The postmaster and its current children (backends forked later inherit it)."""
    if cpu is None:
        return
    with open(os.path.join(data_dir, "postmaster.pid")) as fh:
        postmaster = int(fh.readline())
    pin(postmaster, cpu)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == postmaster:
                pin(int(entry), cpu)


# -- orchestrator ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), to show where the CPU went."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    """A role subprocess whose stdout lines are read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name

    @classmethod
    async def start(cls, name: str, *args: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), "--role", name, *args,
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT},
        )
        return cls(proc, name)

    async def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            raise RuntimeError(f"{self.name} exited ({await self.proc.wait()})")
        return raw.decode().strip()

    async def json(self, timeout: float) -> dict[str, Any]:
        return json.loads(await self.line(timeout))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


async def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg

    from tests.harness.fixtures_gateway import SECRET, Gateway, free_port
    from tests.harness.pgcluster import PgCluster

    cpus = sorted(os.sched_getaffinity(0))
    placement = (cpus[0], cpus[1]) if args.pin and len(cpus) >= 2 else None
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "rate": args.rate, "seconds": args.seconds,
                              "subscribers": args.subscribers, "bulk_rows": args.bulk}
    with PgCluster() as cluster, tempfile.TemporaryDirectory(prefix="rt-bench-gw-") as state_dir:
        dsn = cluster.dsn
        conn = await asyncpg.connect(dsn)
        await conn.execute(TABLE_SQL)
        await conn.execute("CREATE PUBLICATION bare_pub FOR TABLE ticks")
        await conn.execute("SELECT pg_create_logical_replication_slot('bare', 'pgoutput')")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
        env.update({"RT_STATE_DIR": state_dir, "RT_AUTH_HS256_SECRET": SECRET, "RT_LOG_LEVEL": "warning",
                    "RT_POSTGRES_URL": dsn, "RT_INSTANCE": "bench", "PYTHONPATH": ROOT,
                    # the whole bulk transaction may sit in a subscriber's buffer: no 1013 close
                    "RT_SEND_BUFFER_BYTES": str(64 * 1024 * 1024),
                    "RT_HISTORY_EVENTS": str(max(10_000, args.bulk + 1000)),
                    "RT_HISTORY_BYTES": str(256 * 1024 * 1024)})
        gw = Gateway(env, [], state_dir, free_port())
        await gw.start()
        children: list[Child] = []
        try:
            reader = await Child.start("reader", dsn, "bare", "bare_pub", str(args.bulk))
            children.append(reader)
            assert await reader.line(30) == "READY"
            go = csub = None
            if args.client in ("auto", "c"):
                csub = csub_binary()
                if csub is None and args.client == "c":
                    raise RuntimeError("benchmarks/csub could not be built (is gcc installed?)")
            if args.client == "go":
                from benchmarks.fanout.run import gosub

                go = gosub()
                if go is None:
                    raise RuntimeError("the Go subscriber could not be built (is Go installed?)")
            result["client"] = "c" if csub else "go" if go else "python"
            if csub:
                lat_file = os.path.join(state_dir, "csub-latencies.bin")
                subs = await start_csub(csub, gw.ws_url("w1"), gw.token("w1", ttl=7200), args.subscribers,
                                        args.bulk, lat_file)
                ready = await subs.line(60)
                if ready != "READY":
                    raise RuntimeError(f"csub: {ready}")
            elif go:
                subs = await GoSubscribers.start(go, gw.ws_url("w1"), gw.token("w1", ttl=7200), args.subscribers)
            else:
                subs = await Child.start("subscribers", gw.ws_url("w1"), gw.token("w1", ttl=7200),
                                         str(args.subscribers), str(args.bulk))
                ready = await subs.line(60)
                if ready != "READY":
                    raise RuntimeError(f"subscribers: {ready}")
            children.append(subs)

            stmt = await conn.prepare(INSERT_SQL)
            for _ in range(WARMUP_ROWS):
                await stmt.fetch(-3)
                await asyncio.sleep(1 / args.rate)
            await asyncio.sleep(0.5)
            if go:
                await subs.cmd("reset")
            pids = {"gateway": gw.proc.pid, "subscribers": subs.proc.pid, "bare_reader": reader.proc.pid}
            if placement:
                # As in a deployment where the database and the clients are other machines: the
                # gateway alone on one core, everything else on the other.
                gw_cpu, rest_cpu = placement
                pin(gw.proc.pid, gw_cpu)
                for pid in (subs.proc.pid, reader.proc.pid, os.getpid()):
                    pin(pid, rest_cpu)
                pin_cluster(cluster.data_dir, rest_cpu)
                result["placement"] = {"gateway_cpu": gw_cpu, "others_cpu": rest_cpu}
            cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
            load0 = os.getloadavg()[0]
            acks = array.array("q")
            total = int(args.rate * args.seconds)
            start = time.perf_counter()
            late = 0
            for i in range(total):
                delay = start + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -0.005:
                    late += 1
                t0 = time.time_ns()
                await stmt.fetch(t0)
                acks.append(time.time_ns() - t0)
            elapsed = time.perf_counter() - start
            if not go:
                await stmt.fetch(-1)  # the Python subscribers' end-of-phase marker
            result["cpu_share_during_steady"] = {k: round((cpu_seconds(p) - cpu0[k]) / elapsed, 2)
                                                 for k, p in pids.items()}
            result["machine_load_avg_1m"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
            result["writer"] = {"commits": total, "achieved_per_s": round(total / elapsed), "late_ticks": late,
                                "insert_roundtrip": quantiles(acks)}
            if go:
                st = await subs.wait_count(total * args.subscribers, 60)
                result["gateway"] = quantiles(await subs.latencies())
                result["gateway_closed_subscribers"] = args.subscribers - st["open"]
                await subs.cmd("reset")
            else:
                steady = await subs.json(120)
                result["gateway"] = quantiles(load_latencies(steady["steady_file"])) if csub else steady["steady"]
                result["gateway_closed_subscribers"] = steady["closed"]

            t_bulk = time.time_ns()
            await conn.execute(
                f"INSERT INTO ticks (t, name, price) SELECT 0, 'bulk ' || g, g % 1000 + 0.99 "
                f"FROM generate_series(1, {args.bulk}) g"
            )
            t_commit = time.time_ns()
            bare = await reader.json(600)
            result["bare_reader"] = bare["steady"]
            n = args.bulk
            if go:
                st = await subs.wait_count(n * args.subscribers, 900)
                bulk = {"bulk_done": args.subscribers if st["count"] >= n * args.subscribers else 0,
                        "bulk_last_ns": st["last"], "closed": args.subscribers - st["open"]}
            else:
                bulk = await subs.json(900)
            result["bulk"] = {
                "statement_ms": round((t_commit - t_bulk) / 1e6, 1),
                # from the statement start: with a small bulk the reader may be done before the
                # commit reply reaches the writer
                "bare_reader_rows_per_s_since_statement": round(n / ((bare["bulk_last_ns"] - t_bulk) / 1e9)),
                "subscribers_done": bulk["bulk_done"],
                "subscribers_closed": bulk["closed"],
            }
            if bulk["bulk_last_ns"]:
                secs = (bulk["bulk_last_ns"] - t_commit) / 1e9
                result["bulk"]["all_subscribers_rows_per_s"] = round(n / secs)
                result["bulk"]["all_subscribers_seconds_after_commit"] = round(secs, 2)
                result["bulk"]["frames_per_s"] = round(n * bulk["bulk_done"] / secs)
            for key in ("p50_ms", "p99_ms"):
                if result["bare_reader"].get(key):
                    result[f"ratio_{key[:3]}"] = round(result["gateway"][key] / result["bare_reader"][key], 2)
        finally:
            for child in children:
                await child.stop()
            await gw.stop()
            await conn.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=["reader", "subscribers"])
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--bulk", type=int, default=100_000)
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="leave CPU placement to the scheduler (default: the gateway alone on the first "
                             "CPU, PostgreSQL, the writer, the bare reader and the clients on the second)")
    parser.add_argument("--client", choices=["auto", "c", "go", "python"], default="auto",
                        help="the subscribers: benchmarks/csub, one epoll loop in C (auto: when gcc is "
                             "installed), the Go load generator of benchmarks/fanout, or picows clients "
                             "in one Python process")
    args, rest = parser.parse_known_args()
    if args.bulk < 1:
        parser.error("--bulk must be at least 1 (the run ends when the bulk transaction has arrived)")
    import uvloop

    if args.role == "reader":
        uvloop.run(run_reader(rest[0], rest[1], rest[2], int(rest[3])))
    elif args.role == "subscribers":
        uvloop.run(run_subscribers(rest[0], rest[1], int(rest[2]), int(rest[3])))
    else:
        print(json.dumps(uvloop.run(orchestrate(args)), indent=2))


if __name__ == "__main__":
    main()
