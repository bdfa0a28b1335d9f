"""Runs scenarios against servers and returns one result dict per (scenario, server).

The harness process only orchestrates: the server runs pinned to the server core, subscribers
and the publisher run in separate load-generator processes pinned to the other core(s).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from typing import Any

from benchmarks.fanout import servers as srv
from benchmarks.fanout.loadgen import raise_nofile
from benchmarks.fanout.scenarios import Scenario

PERCENTILES = (50, 90, 99, 99.9)


def cpu_plan() -> tuple[str | None, str | None]:
    """(server cpus, load-generator cpus) for taskset, or (None, None) on one core."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None, None
    if len(cpus) < 2:
        return None, None
    return str(cpus[0]), ",".join(str(c) for c in cpus[1:])


GOSUB_DIR = os.path.join(srv.ROOT, "benchmarks", "fanout", "gosub")
GOSUB_BIN = os.path.join(GOSUB_DIR, "gosub")


def gosub(log=print) -> str | None:
    """The Go subscriber binary, built on first use (standard library only, a few seconds);
    None when Go is not installed or the build fails (the Python subscriber is used then)."""
    src = os.path.join(GOSUB_DIR, "main.go")
    if os.path.exists(GOSUB_BIN) and os.path.getmtime(GOSUB_BIN) >= os.path.getmtime(src):
        return GOSUB_BIN
    go = shutil.which("go")
    if go is None:
        return None
    env = dict(os.environ, CGO_ENABLED="0", GOTOOLCHAIN="local")
    proc = subprocess.run([go, "build", "-o", GOSUB_BIN, "."], cwd=GOSUB_DIR, env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        log(f"[fanout] go build of the Go subscriber failed, using the Python one: {proc.stderr[-500:]}")
        return None
    return GOSUB_BIN


class LoadProc:
    """One load-generator process, driven by JSON lines."""

    def __init__(self, cfg: dict[str, Any], cpus: str | None, nice: int = 0, binary: str | None = None):
        env = dict(os.environ, PYTHONPATH=srv.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.err = tempfile.TemporaryFile()
        if binary is not None:  # the Go subscriber: one OS thread, like the servers it measures
            cmd = [binary, json.dumps(cfg)]
            env["GOMAXPROCS"] = "1"
        else:
            cmd = [sys.executable, "-m", "benchmarks.fanout.loadgen", json.dumps(cfg)]
        self.proc = subprocess.Popen(
            (["nice", "-n", str(nice)] if nice else []) + srv.taskset(cpus) + cmd,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env, cwd=srv.ROOT,
        )

    def read(self, timeout: float = 120.0) -> dict[str, Any]:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"load generator silent for {timeout}s: {self.stderr()}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited ({self.proc.poll()}): {self.stderr()}")
        return json.loads(line)

    def send(self, **cmd: Any) -> dict[str, Any]:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        return self.read()

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"op":"quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.err.close()


class Runner:
    def __init__(self, procs: int | None = None, client: str = "auto", log=print, answer_wait: float = 30.0):
        raise_nofile()
        # How long the publisher waits after a run for the server's last answers.
        self.answer_wait = answer_wait
        self.gosub = gosub(log) if client in ("auto", "go") else None
        if client == "go" and self.gosub is None:
            raise RuntimeError("--client go: the Go subscriber could not be built (is Go installed?)")
        self.client = "go" if self.gosub else "python"
        self.server_cpus, self.client_cpus = cpu_plan()
        # One Go process reads all its connections with one epoll loop; more would only add
        # context switches on the load generators' core. The Python one needs two to keep up.
        self.procs = procs or (1 if self.gosub else 2)
        self.log = log
        self.tmp = tempfile.mkdtemp(prefix="fanout-")
        self._src_base = 2
        self._n_tokens = 0
        self._pg = None

    def postgres(self) -> str:
        """DSN of a throwaway PostgreSQL cluster (wal_level=logical) with an empty `ticks`
        table, for the PostgreSQL-fed scenarios; started on first use, kept for the run."""
        import asyncio

        import asyncpg

        from tests.harness.pgcluster import PgCluster

        if self._pg is None:
            self._pg = PgCluster()
            self._pg.__enter__()

        async def reset() -> None:
            conn = await asyncpg.connect(self._pg.dsn)
            try:
                await conn.execute("DROP TABLE IF EXISTS ticks")
                # `t` first: an event's record then starts with {"t":<ns>, the subscribers' marker.
                await conn.execute("CREATE TABLE ticks (t bigint NOT NULL, id bigserial PRIMARY KEY, g int, u int, pad text)")
                for (slot,) in await conn.fetch("SELECT slot_name FROM pg_replication_slots WHERE NOT active"):
                    await conn.execute("SELECT pg_drop_replication_slot($1)", slot)
            finally:
                await conn.close()

        asyncio.run(reset())
        return self._pg.dsn

    def close(self) -> None:
        if self._pg is not None:
            self._pg.__exit__(None, None, None)
            self._pg = None

    # -- helpers --
    def _split(self, n: int) -> list[tuple[int, int]]:
        procs = max(1, min(self.procs, n))
        per = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        out, off = [], 0
        for k in per:
            out.append((off, k))
            off += k
        return out

    def _tokens(self, n: int) -> str:
        """A file of at least `n` distinct connection tokens (servers.write_tokens), made once
        for the run's largest need."""
        path = os.path.join(self.tmp, "tokens.txt")
        if n > self._n_tokens:
            srv.write_tokens(path, n)
            self._n_tokens = n
        return path

    def _next_src(self) -> int:
        # Each connecting phase uses fresh source addresses (TIME_WAIT of earlier phases).
        base = self._src_base
        self._src_base = 2 + (self._src_base + 8 - 2) % 240
        return base

    def _subscribers(self, server: srv.Server, sc: Scenario) -> list[LoadProc]:
        spec = dict(server.client_spec(sc.groups, sc.params.get("predicate", "distinct")), src_base=self._next_src(),
                    tokens=self._tokens(sc.clients))
        loads = [LoadProc({"role": "subscribers", "server": spec, "n": k, "offset": off,
                           "concurrency": sc.concurrency}, self.client_cpus, binary=self.gosub)
                 for off, k in self._split(sc.clients)]
        try:
            ready = [lp.read(timeout=180) for lp in loads]
        except BaseException:
            for lp in loads:
                lp.close()
            raise
        n_ready = sum(r["ready"] for r in ready)
        if n_ready < sc.clients:
            errs = [e for r in ready for e in r["errors"] or []]
            for lp in loads:
                lp.close()
            raise RuntimeError(f"{server.name}: only {n_ready}/{sc.clients} subscribers connected: {errs}")
        return loads

    # -- scenario kinds --
    def run(self, sc: Scenario, server: srv.Server) -> dict[str, Any]:
        base = {"scenario": sc.name, "kind": sc.kind, "server": server.name, "clients": sc.clients}
        try:
            if sc.kind == "fanout":
                res = self._fanout(sc, server)
            elif sc.kind == "storm":
                res = self._storm(sc, server)
            else:
                res = self._idle(sc, server)
            code = server.proc.poll()
            if code is not None:  # its figures stop where it died: not a result to compare
                raise RuntimeError(f"{server.name} exited with {code} during the run")
        except Exception as exc:  # a failed run is reported, not fatal to the set
            res = {"error": f"{type(exc).__name__}: {exc}"[:2000], "server_log": server.logs()[-1500:]}
        return {**base, **res}

    def _fanout(self, sc: Scenario, server: srv.Server) -> dict[str, Any]:
        loads = self._subscribers(server, sc)
        try:
            for lp in loads:
                lp.send(op="reset")
            per_event = sc.matches_per_event()
            batch = sc.params.get("batch", 0)
            spec = server.publish_spec(batch=batch) if batch else server.publish_spec()
            pub_cfg: dict[str, Any] = {"role": "publisher", "publish": spec, "mode": sc.mode,
                                       "duration": sc.duration, "groups": sc.groups or 1, "window": sc.window,
                                       "burst": sc.burst, "batch": batch, "answer_wait": self.answer_wait}
            if sc.mode == "paced":
                pub_cfg["events_per_s"] = sc.rate / per_event
            c0 = server.counters()
            cpu0, t0 = server.cpu_seconds(), time.monotonic()
            # The publisher shares a core with busy subscribers: a higher priority keeps its
            # reaction to acknowledgements prompt (root only; otherwise nice is refused, harmless).
            pub_proc = LoadProc(pub_cfg, self.client_cpus, nice=-10 if os.geteuid() == 0 else 0)
            try:
                pub = pub_proc.read(timeout=sc.duration + self.answer_wait + 30)
            finally:
                pub_proc.close()
            _check_answered(server, pub, self.answer_wait)
            # Deliveries owed for the events the server accepted: one it refused (a 503, an API
            # error) was answered too, and counted as lost before.
            accepted = pub.get("accepted", pub["acked"])
            expected = accepted * per_event
            got, last_change, prev = 0, time.monotonic(), -1
            while time.monotonic() - last_change < 3.0:
                got = sum(lp.send(op="stat")["count"] for lp in loads)
                if got >= expected:
                    break
                if got != prev:
                    prev, last_change = got, time.monotonic()
                time.sleep(0.05)
            cpu1, t1 = server.cpu_seconds(), time.monotonic()
            rss = server.rss_bytes()
            c1 = server.counters()
            reports, lats = [], []
            for i, lp in enumerate(loads):
                path = os.path.join(self.tmp, f"lat-{i}.bin")
                reports.append(lp.send(op="report", path=path))
                a = array("q")
                with open(path, "rb") as fh:
                    a.frombytes(fh.read())
                os.unlink(path)
                lats.append(a)
        finally:
            for lp in loads:
                lp.close()
        delivered = sum(r["count"] for r in reports)
        _check_owed(server.name, delivered, accepted, per_event)
        # Inserts made concurrently commit in another order than their timestamps: the order of
        # a PostgreSQL-fed scenario's events is not the timestamps'.
        _check_each_connection(server.name, reports, ordered=sc.params.get("source") != "postgres")
        last = max((r["last"] for r in reports if r["count"]), default=pub["t_start"])
        wall = max(1e-9, (last - pub["t_start"]) / 1e9)
        cpu = cpu1 - cpu0
        out = {
            "events": accepted, "refused": pub["acked"] - accepted, "sent": pub["sent"], "expected": expected,
            "delivered": delivered,
            "lost": max(0, expected - delivered),
            "deliveries_per_s": delivered / wall, "seconds": wall,
            "server_cpu_s": cpu, "server_cpu_util": cpu / max(1e-9, t1 - t0),
            "deliveries_per_cpu_s": delivered / cpu if cpu > 0 else None,
            "server_rss_mib": rss / 2**20,
            "client_cpu_s": sum(r["cpu_s"] for r in reports), "publisher_cpu_s": pub["cpu_s"],
            "client_wall_s": wall,
            # The same for every server when their frames are the same size (the baselines
            # copy the gateway's envelope): a paced delivery's cost depends on it (README-fanout).
            "bytes_per_delivery": sum(r.get("bytes", 0) for r in reports) / delivered if delivered else None,
        }
        # How busy the load generators' cores were (subscribers + publisher): near 100% the
        # figure measures the load generator as much as the server.
        client_cores = len(self.client_cpus.split(",")) if self.client_cpus else os.cpu_count() or 1
        out["loadgen_cpu_util"] = (out["client_cpu_s"] + out["publisher_cpu_s"]) / (wall * client_cores)
        if sc.mode == "paced":
            out["target_rate"] = sc.rate
        if sc.params.get("source"):  # events from a change feed, not published: charted apart
            out["source"] = sc.params["source"]
        if c1.get("rt_writes_total"):
            writes = c1["rt_writes_total"] - c0.get("rt_writes_total", 0)
            frames = c1["rt_frames_out_total"] - c0.get("rt_frames_out_total", 0)
            out["frames_per_write"] = frames / writes if writes else None
        gc_keys = [k for k in c1 if k.startswith("rt_gc_")]
        if gc_keys:  # collector passes and pause seconds during the measurement, by generation
            out["gc"] = {k[len("rt_gc_"):]: round(c1[k] - c0.get(k, 0.0), 6) for k in sorted(gc_keys)}
        out["latency_ms"] = _percentiles(lats)
        return out

    def _storm(self, sc: Scenario, server: srv.Server) -> dict[str, Any]:
        spec = dict(server.client_spec(0), src_base=self._next_src(), tokens=self._tokens(sc.total))
        cpu0 = server.cpu_seconds()
        loads, paths = [], []
        for i, (off, k) in enumerate(self._split(sc.total)):
            path = os.path.join(self.tmp, f"storm-{i}.bin")
            paths.append(path)
            loads.append(LoadProc({"role": "storm", "server": spec, "total": k, "offset": off,
                                   "concurrency": max(1, sc.concurrency // len(self._split(sc.total))),
                                   "path": path}, self.client_cpus, binary=self.gosub))
        try:
            res = [lp.read(timeout=300) for lp in loads]
        finally:
            for lp in loads:
                lp.close()
        cpu = server.cpu_seconds() - cpu0
        lats = []
        for p in paths:
            a = array("q")
            with open(p, "rb") as fh:
                a.frombytes(fh.read())
            os.unlink(p)
            lats.append(a)
        done = sum(r["done"] for r in res)
        elapsed = max(r["elapsed"] for r in res)
        return {"connections": done, "failed": sum(r["failed"] for r in res),
                "errors": [e for r in res for e in r["errors"]][:3],
                "connects_per_s": done / elapsed, "seconds": elapsed, "server_cpu_s": cpu,
                "connects_per_cpu_s": done / cpu if cpu > 0 else None,
                # The busiest load generator's share of its core: near 1, the rate is the client's
                # ceiling, not the server's (Centrifugo's storm: 0.95; it was not recorded).
                "client_cpu_util": max(r["cpu_s"] / max(1e-9, r["elapsed"]) for r in res),
                "latency_ms": _percentiles(lats)}

    def _idle(self, sc: Scenario, server: srv.Server) -> dict[str, Any]:
        # A process cannot hold more descriptors than the hard RLIMIT_NOFILE, which raising
        # needs CAP_SYS_RESOURCE (absent in some containers, e.g. 20000 here): stay under it,
        # and under what the gateway lets client sockets take of it (it keeps
        # fd_limit.RESERVED // 2 for its own files and feeds: 19,488 of 20,000; with 19,900
        # the last 412 were refused with 503 since 2026-11-30).
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and sc.clients > hard - 600:
            sc = dataclasses.replace(sc, clients=hard - 600)
        time.sleep(0.3)
        rss0 = server.rss_bytes()
        t0 = time.monotonic()
        loads = self._subscribers(server, sc)
        try:
            connect_s = time.monotonic() - t0
            time.sleep(1.0)
            rss1 = server.rss_bytes()
            still = sum(lp.send(op="stat")["open"] for lp in loads)
        finally:
            for lp in loads:
                lp.close()
        if still < sc.clients:  # the RSS growth would be spread over connections already gone
            raise RuntimeError(f"{server.name} kept {still} of the {sc.clients} idle connections open for 1 s")
        return {"clients": sc.clients, "connections": sc.clients, "open_after_1s": still, "rss_before_mib": rss0 / 2**20,
                "rss_after_mib": rss1 / 2**20, "rss_per_conn_kib": (rss1 - rss0) / sc.clients / 1024,
                "connect_s": connect_s}


def _check_answered(server: srv.Server, pub: dict[str, Any], answer_wait: float = 30.0) -> None:
    """Fail the round when the server left events unanswered (the publisher waits `answer_wait`
    seconds, 30 by default, after the run): a stalled or dead server. The deliveries owed are counted from the answers, so
    without this its round came out complete, measured on the events before it stopped."""
    if pub["acked"] >= pub["sent"]:
        return
    why = "closed the publish connection" if pub.get("closed") else f"answered no more within {answer_wait:g} s of the run's end"
    code = server.proc.poll() if server.proc is not None else None
    exited = f"; it exited with {code}" if code is not None else ""
    raise RuntimeError(f"{server.name} answered {pub['acked']} of the {pub['sent']} events published and {why}{exited}")


def _check_owed(name: str, delivered: int, accepted: int, per_event: int) -> None:
    """Fail the round when subscribers got more than the accepted events owe them: counted as
    deliveries, duplicated frames (or frames sent to subscribers they do not match) would
    inflate the rate."""
    if delivered > accepted * per_event:
        raise RuntimeError(f"{name}: {delivered} deliveries for the {accepted * per_event} owed ({accepted} events x "
                           f"{per_event} subscribers): frames duplicated or sent to subscribers they do not match")


def _check_each_connection(name: str, reports: list[dict[str, Any]], ordered: bool) -> None:
    """Fail the round when a connection got an event of another group than the one it
    subscribed to, or (`ordered`) an event not after the last it read (a duplicate, or out of
    order): the totals alone passed a server that sent each group's events to another group's
    subscribers, or one client's lost events as another's duplicates."""
    misrouted = sum(r.get("misrouted", 0) for r in reports)
    disorder = sum(r.get("disorder", 0) for r in reports) if ordered else 0
    if misrouted or disorder:
        raise RuntimeError(f"{name}: {misrouted} deliveries of another group's events and {disorder} duplicated or "
                           "out of order on their connection")


def _percentiles(arrays: list[array]) -> dict[str, float] | None:
    """Latency percentiles in ms (numpy when installed, else a sort: slower, same answer)."""
    n = sum(len(a) for a in arrays)
    if not n:
        return None
    try:
        import numpy as np
    except ImportError:
        v = sorted(x for a in arrays for x in a)
        out = {f"p{p:g}": _interpolated(v, p) / 1e6 for p in PERCENTILES}
        out.update(max=v[-1] / 1e6, mean=sum(v) / n / 1e6, samples=n)
        return out
    v = np.concatenate([np.frombuffer(a, dtype=np.int64) for a in arrays if len(a)])
    out = {f"p{p:g}": float(np.percentile(v, p)) / 1e6 for p in PERCENTILES}
    out.update(max=float(v.max()) / 1e6, mean=float(v.mean()) / 1e6, samples=int(v.size))
    return out


def _interpolated(v: list[int], p: float) -> float:
    """Percentile `p` of the sorted `v` as numpy.percentile computes it (linear interpolation
    between the two closest ranks), so a run without numpy reports the same figures."""
    rank = p / 100 * (len(v) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (rank - lo)


def run_set(scenarios: list[Scenario], server_names: list[str], procs: int | None = None, repeat: int = 1,
            client: str = "auto", log=print) -> dict[str, Any]:
    """Every scenario against every requested server it lists, each on a fresh server process.

    Scenario-major order (all servers for one scenario, then the next) keeps the runs being
    compared close in time on a machine whose other load varies; with `repeat` > 1 the servers
    take turns (order reversed every round) and the best round of each is kept (highest rate;
    for paced scenarios, lowest p99: interference from other load only adds latency; a round
    that lost deliveries only when every round did), the others are listed under `rounds`. A scenario may ask for more rounds (`Scenario.rounds`).
    """
    runner = Runner(procs=procs, client=client, log=log)
    meta: dict[str, Any] = {"server_cpus": runner.server_cpus, "client_cpus": runner.client_cpus,
                            "load_procs": runner.procs, "repeat": repeat, "subscriber_client": runner.client,
                            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    names = []
    for name in server_names:
        if srv.available(name):
            names.append(name)
        else:
            log(f"[fanout] {name}: not available (benchmarks/centrifugo/build.sh builds it); skipped")
    results: list[dict[str, Any]] = []
    try:
        for sc in scenarios:
            rounds: dict[str, list[dict[str, Any]]] = {}
            order = [n for n in names if n.split("-")[0] in sc.servers]
            for k in range(1 if repeat == 1 or sc.single_round else max(repeat, sc.rounds)):
                for name in order if k % 2 == 0 else order[::-1]:
                    server = srv.KINDS[name](name, runner.server_cpus)
                    t = time.monotonic()
                    try:
                        if sc.params.get("source") == "postgres":
                            server.extra["postgres"] = runner.postgres()
                        server.start()
                        if name == "gateway":
                            meta["gateway_compiled_core"] = server.extra.get("compiled")
                        res = runner.run(sc, server)
                    except Exception as exc:
                        res = {"scenario": sc.name, "kind": sc.kind, "server": name, "clients": sc.clients,
                               "error": f"{type(exc).__name__}: {exc}"[:2000]}
                    finally:
                        server.stop()
                    rounds.setdefault(name, []).append(res)
                    log(f"[fanout] {sc.name:16s} {name:11s} {_summary(res)}  ({time.monotonic() - t:.1f}s)")
            for name in order:
                best = _best(sc, rounds[name])
                if len(rounds[name]) > 1:
                    best = {**best, "rounds": [_brief(r) for r in rounds[name]]}
                # which run it is from: `--merge` puts results of several runs in one table
                results.append({**best, "run": meta["started"]})
    finally:
        runner.close()
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"meta": meta, "results": results}


def _score(sc: Scenario, r: dict[str, Any]) -> tuple[int, float]:
    if "error" in r:
        return 0, float("-inf")
    if sc.kind == "fanout":
        # A round that lost deliveries ranks below every complete one: the deliveries missing
        # from its percentiles are the late ones (a dropped slow reader), so its p99 looks better.
        complete = 2 if not r.get("lost") else 1
        if sc.mode == "paced":
            return complete, -(r.get("latency_ms") or {}).get("p99", float("inf"))
        return complete, r["deliveries_per_s"]
    if sc.kind == "storm":
        return 2, r["connects_per_s"]
    return 2, -r["rss_per_conn_kib"]


def _best(sc: Scenario, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return max(rounds, key=lambda r: _score(sc, r))


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("deliveries_per_s", "connects_per_s", "rss_per_conn_kib", "server_cpu_util", "error")
    out = {k: r[k] for k in keys if k in r}
    if r.get("latency_ms"):
        out["p99_ms"] = r["latency_ms"]["p99"]
    return out


def _summary(r: dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + r["error"][:300]
    if r["kind"] == "fanout":
        lat = r.get("latency_ms") or {}
        return (f"{r['deliveries_per_s']:>10,.0f} deliv/s  p50 {lat.get('p50', 0):.2f} p99 {lat.get('p99', 0):.2f} "
                f"max {lat.get('max', 0):.1f} ms  cpu {r['server_cpu_util']:.0%}  lost {r['lost']}"
                + (f"  refused {r['refused']}" if r.get("refused") else "")
                + (f"  frames/write {r['frames_per_write']:.2f}" if r.get("frames_per_write") else ""))
    if r["kind"] == "storm":
        return f"{r['connects_per_s']:>8,.0f} connects/s  failed {r['failed']}"
    return f"{r['rss_per_conn_kib']:.1f} KiB/conn  open {r['open_after_1s']}"
