"""CLI: `python -m benchmarks.fanout run [--smoke] [--servers ...] [--scenarios ...] [--out DIR]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.fanout import report, scenarios, servers
from benchmarks.fanout.run import run_set
from benchmarks.fanout.servers import ROOT

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fanout")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the standard set (or --smoke) and write results")
    r.add_argument("--smoke", action="store_true", help="tiny version of every scenario (~20 s, for CI)")
    r.add_argument("--servers", default="gateway,picows,websockets,centrifugo",
                   help="comma-separated: gateway, picows, websockets, centrifugo (skipped when not built)")
    r.add_argument("--scenarios", default="", help="comma-separated scenario names (default: all of the set)")
    r.add_argument("--procs", type=int, default=None,
                   help="subscriber load-generator processes (default: 1 with the Go subscriber, 2 with the Python one)")
    r.add_argument("--repeat", type=int, default=None,
                   help="rounds per scenario and server, best kept (default 2; 1 with --smoke)")
    r.add_argument("--client", choices=("auto", "go", "python"), default="auto",
                   help="subscriber load generator: the Go one (built with `go build` when Go is installed) "
                        "or the Python one; auto prefers Go")
    r.add_argument("--nice", type=int, default=0,
                   help="niceness of the servers and load generators (root may give them priority, e.g. -5, "
                        "over other work on a shared machine)")
    r.add_argument("--gateway-env", action="append", default=[], metavar="RT_NAME=VALUE",
                   help="a gateway setting for this run (repeatable), e.g. RT_FANOUT_BACKLOG_PER_CONNECTION=8")
    r.add_argument("--merge", action="store_true",
                   help="replace only this run's (scenario, server) results in the existing JSON of --out, "
                        "then rewrite the table and charts (re-running one scenario)")
    r.add_argument("--out", default=None,
                   help=f"directory for fanout.json, fanout.md and charts (default {DEFAULT_OUT}, the published "
                        "results: a partial run, of some scenarios or servers or with --gateway-env, goes there "
                        "only with --merge)")
    r.add_argument("--no-charts", action="store_true", help="skip the PNG charts (no matplotlib needed)")
    rep = sub.add_parser("report", help="rewrite the Markdown table and charts from a results JSON")
    rep.add_argument("json", nargs="?", default=os.path.join(DEFAULT_OUT, "fanout.json"))
    args = p.parse_args(argv)
    if args.command == "report":
        with open(args.json) as fh:
            data = json.load(fh)
        out_dir, stem = os.path.dirname(os.path.abspath(args.json)), os.path.basename(args.json)[:-5]
        with open(os.path.join(out_dir, stem + ".md"), "w") as fh:
            fh.write(report.markdown(data))
        for path in report.charts(data, out_dir, stem):
            print(f"[fanout] chart {path}")
        return 0

    chosen = scenarios.smoke() if args.smoke else scenarios.standard()
    if args.scenarios:
        wanted = set(args.scenarios.split(","))
        unknown = wanted - {s.name for s in chosen}
        if unknown:
            r.error(f"unknown scenarios {sorted(unknown)}; this set has {[s.name for s in chosen]}")
        chosen = [s for s in chosen if s.name in wanted]
    names = [s for s in args.servers.split(",") if s]
    unknown = [n for n in names if n not in servers.KINDS]
    if unknown:  # a misspelt name would otherwise run nothing for it, silently
        r.error(f"unknown servers {unknown}; known: {sorted(servers.KINDS)}")
    if args.repeat is not None and args.repeat < 1:  # 0 ran nothing and failed with KeyError
        r.error(f"--repeat {args.repeat}: give at least 1 round")
    if args.procs is not None and args.procs < 1:
        r.error(f"--procs {args.procs}: give at least 1 load-generator process")
    runs = [(s.name, n) for s in chosen for n in names if n in s.servers]
    if not runs:  # a server no chosen scenario runs wrote an empty result set, exit 0
        r.error(f"none of the scenarios {[s.name for s in chosen]} runs on {names} "
                f"(their servers: {sorted({n for s in chosen for n in s.servers})})")
    partial = bool(args.scenarios or args.gateway_env) or args.servers != r.get_default("servers")
    if args.out is None:
        if partial and not args.merge and not args.smoke:
            # It would replace the standard run's results (and the README's figures' source)
            # with a few rows.
            r.error(f"a partial run would replace the published results in {DEFAULT_OUT}: give --out DIR, or "
                    "--merge to put its results into them")
        args.out = DEFAULT_OUT
    t0 = time.monotonic()
    servers.NICE = args.nice
    for item in args.gateway_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("RT_"):
            r.error(f"--gateway-env {item!r}: expected RT_NAME=VALUE")
        servers.GATEWAY_ENV[name] = value
    repeat = args.repeat if args.repeat is not None else (1 if args.smoke else 2)
    data = run_set(chosen, names, procs=args.procs, repeat=repeat, client=args.client, log=lambda m: print(m, flush=True))
    data["meta"].update({"command": "python -m benchmarks.fanout " + " ".join(argv or sys.argv[1:]),
                         "smoke": args.smoke, "nice": args.nice, "seconds": time.monotonic() - t0})
    os.makedirs(args.out, exist_ok=True)
    stem = "fanout-smoke" if args.smoke else "fanout"
    old_path = os.path.join(args.out, stem + ".json")
    if args.merge and os.path.exists(old_path):
        with open(old_path) as fh:
            old = json.load(fh)
        order = [(r["scenario"], r["server"]) for r in old["results"]]
        merged = {(r["scenario"], r["server"]): r for r in old["results"]}
        merged.update({(r["scenario"], r["server"]): r for r in data["results"]})
        # new results in the order they ran (not a set's, which the hash seed decides)
        order += [(r["scenario"], r["server"]) for r in data["results"] if (r["scenario"], r["server"]) not in order]
        old["meta"].setdefault("merged", []).append(data["meta"])
        data = {"meta": old["meta"], "results": [merged[k] for k in order]}
    with open(os.path.join(args.out, stem + ".json"), "w") as fh:
        json.dump(data, fh, indent=1)
    md = report.markdown(data)
    with open(os.path.join(args.out, stem + ".md"), "w") as fh:
        fh.write(md)
    if not args.no_charts:
        for path in report.charts(data, args.out, stem):
            print(f"[fanout] chart {path}")
    print(md)
    print(f"[fanout] {len(data['results'])} results in {time.monotonic() - t0:.0f}s -> {args.out}/{stem}.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
