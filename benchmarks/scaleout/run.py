"""Fan-out capacity and latency with 1, 2 and 3 gateway nodes on the Kafka bus, against the
single-process (memory bus) gateway measured in the same run.

    python -m benchmarks.scaleout.run [--clients-per-node 500] [--rate 400] [--window 64] [--seconds 8]

Starts a throwaway Kafka broker (tests/harness/kafka.py), then for each configuration the
gateway processes (`rtserver serve`, RT_BUS=kafka for the nodes), subscribers split evenly over
the nodes (benchmarks/fanout load generators: every client subscribes to events:bench), and an
HTTP publisher on node 1. Two phases per configuration:
- latency: an open-loop publisher at --rate events/s; publish-to-receipt p50/p99 per delivery;
- capacity: a closed-loop publisher with --window events in flight; deliveries/s.
The bus's added latency is the Kafka configuration's p50/p99 minus the memory bus's.
Results: printed, and written to benchmarks/results/scaleout-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import urllib.request
import uuid
from array import array
from typing import Any

from benchmarks.fanout import servers as srv
from benchmarks.fanout.loadgen import raise_nofile
from benchmarks.fanout.run import LoadProc, _check_answered, _check_owed, _percentiles, gosub


class Node(srv.Gateway):
    """A gateway process; `bus` holds the RT_BUS* variables of a Kafka node (empty: memory)."""

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.extra.get("bus", {})}

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False


def run_config(name: str, nodes: int, bus: dict[str, str], args: argparse.Namespace, binary: str | None,
               src_base: int) -> dict[str, Any]:
    servers = [Node(f"{name}-{i}", None, extra={"bus": bus}) for i in range(nodes)]
    loads: list[LoadProc] = []
    # every connection presents a token of its own (the client spec's %T%: servers.write_tokens)
    tokens = os.path.join(tempfile.mkdtemp(prefix="rt-scaleout-"), "tokens.txt")
    srv.write_tokens(tokens, args.clients_per_node)
    try:
        for s in servers:
            s.start()
        for i, s in enumerate(servers):
            spec = dict(s.client_spec(0), src_base=src_base + i, tokens=tokens)
            loads.append(LoadProc({"role": "subscribers", "server": spec, "n": args.clients_per_node, "offset": 0,
                                   "concurrency": 128}, None, binary=binary))
        ready = [lp.read(timeout=180) for lp in loads]
        if sum(r["ready"] for r in ready) < nodes * args.clients_per_node:
            raise RuntimeError(f"{name}: subscribers failed: {[r['errors'] for r in ready]}")
        out: dict[str, Any] = {"config": name, "nodes": nodes, "clients": nodes * args.clients_per_node}
        for phase, pub in (("latency", {"mode": "paced", "events_per_s": args.rate}),
                           ("capacity", {"mode": "window", "window": args.window})):
            for lp in loads:
                lp.send(op="reset")
            cpu0 = sum(s.cpu_seconds() for s in servers)
            pub_proc = LoadProc({"role": "publisher", "publish": servers[0].publish_spec(), "duration": args.seconds,
                                 "groups": 1, **pub}, None)
            try:
                res = pub_proc.read(timeout=args.seconds + 60)
            finally:
                pub_proc.close()
            # Owed for the events node 1 accepted (one refused was answered too); a stalled or
            # dead node, leaving events unanswered, fails the run instead of measuring the
            # events before it stopped.
            _check_answered(servers[0], res)
            accepted = res.get("accepted", res["acked"])
            expected = accepted * out["clients"]
            got, prev, changed = 0, -1, time.monotonic()
            while time.monotonic() - changed < 3.0 and got < expected:
                got = sum(lp.send(op="stat")["count"] for lp in loads)
                if got != prev:
                    prev, changed = got, time.monotonic()
                time.sleep(0.05)
            lats, reports = [], []
            for lp in loads:
                path = os.path.join(srv.ROOT, "benchmarks", "results", f".lat-{uuid.uuid4().hex}.bin")
                reports.append(lp.send(op="report", path=path))
                a = array("q")
                with open(path, "rb") as fh:
                    a.frombytes(fh.read())
                os.unlink(path)
                lats.append(a)
            delivered = sum(r["count"] for r in reports)
            _check_owed(name, delivered, accepted, out["clients"])
            last = max((r["last"] for r in reports if r["count"]), default=res["t_start"])
            wall = max(1e-9, (last - res["t_start"]) / 1e9)
            out[phase] = {
                "events": accepted, "refused": res["acked"] - accepted, "delivered": delivered,
                "lost": max(0, expected - delivered), "events_per_s": accepted / wall, "deliveries_per_s": delivered / wall,
                "server_cpu_s": sum(s.cpu_seconds() for s in servers) - cpu0,
                "latency_ms": _percentiles(lats),
            }
        return out
    finally:
        for lp in loads:
            lp.close()
        for s in servers:
            s.stop()
        shutil.rmtree(os.path.dirname(tokens), ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients-per-node", type=int, default=500)
    p.add_argument("--rate", type=float, default=400.0, help="events/s of the latency phase")
    p.add_argument("--window", type=int, default=64, help="events in flight in the capacity phase")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--nodes", default="1,2,3")
    p.add_argument("--client", choices=("auto", "go", "python"), default="auto")
    args = p.parse_args()
    raise_nofile()
    os.makedirs(os.path.join(srv.ROOT, "benchmarks", "results"), exist_ok=True)
    from tests.harness.kafka import KafkaBroker, ensure_jars

    binary = gosub() if args.client in ("auto", "go") else None
    broker = KafkaBroker(ensure_jars())
    broker.start()
    results = []
    try:
        results.append(run_config("memory", 1, {}, args, binary, 2))
        print(json.dumps(results[-1]), flush=True)
        for n in (int(x) for x in args.nodes.split(",")):
            bus = {"RT_BUS": "kafka", "RT_BUS_KAFKA_BOOTSTRAP": broker.bootstrap,
                   "RT_BUS_TOPIC": f"bench.events.{uuid.uuid4().hex[:8]}", "RT_BUS_PARTITIONS": "6",
                   "RT_BUS_MAX_LAG": "100000"}
            results.append(run_config(f"kafka-{n}", n, bus, args, binary, 10 + 8 * n))
            print(json.dumps(results[-1]), flush=True)
    finally:
        broker.destroy()
    base = results[0]
    print(f"\n{'config':<10} {'clients':>7} | {'lat p50':>8} {'p99':>8} {'bus +p50':>9} {'bus +p99':>9} | "
          f"{'capacity ev/s':>13} {'deliveries/s':>12} {'p99 ms':>8}")
    for r in results:
        lat, cap = r["latency"]["latency_ms"] or {}, r["capacity"]
        blat = base["latency"]["latency_ms"] or {}
        print(f"{r['config']:<10} {r['clients']:>7} | {lat.get('p50', 0):8.2f} {lat.get('p99', 0):8.2f} "
              f"{lat.get('p50', 0) - blat.get('p50', 0):9.2f} {lat.get('p99', 0) - blat.get('p99', 0):9.2f} | "
              f"{cap['events_per_s']:13.0f} {cap['deliveries_per_s']:12.0f} {(cap['latency_ms'] or {}).get('p99', 0):8.1f}")
    os.makedirs(os.path.join(srv.ROOT, "benchmarks", "results"), exist_ok=True)
    path = os.path.join(srv.ROOT, "benchmarks", "results", f"scaleout-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as fh:
        json.dump({"args": vars(args), "results": results}, fh, indent=1)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
