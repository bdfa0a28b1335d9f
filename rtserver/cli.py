"""The `rtserver` command: `serve`, `ingest` (feeds to Kafka), `token` (dev tokens), `check-config`,
`config-table`, `--version`."""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
import time

from rtcore.timefmt import MAX_RFC3339_MS
from rtserver import __version__
from rtserver.config import WORKSPACE_ID_RE, ConfigError, config_table_markdown, load
from rtserver.config_check import env_warnings
from rtserver.fd_limit import raise_open_files_limit


def _lifetime(text: str) -> float:
    """--ttl: positive and finite (nan or inf would not make an `exp`; 0 or less, an expired token)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number of seconds")
    # An exp past 9999 has no RFC 3339 date: auth_ok's expiresAt came out as "+3168873852708-..."
    # (1e20 s), which no date parser reads.
    most = MAX_RFC3339_MS // 1000 - time.time()
    if seconds > most:
        raise argparse.ArgumentTypeError(f"{text!r}: must end before the year 10000 (at most {most:.0f} seconds)")
    return seconds


def _subject(text: str) -> str:
    """--sub: not empty (the gateway refuses a token without a subject: 'token has no sub')."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty: the gateway refuses a token without a subject")
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtserver", description="Realtime subscriptions gateway")
    p.add_argument("--version", action="version", version=f"rtserver {__version__}")
    sub = p.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--state-dir", help="local state directory (default .rtserver)")
    serve.add_argument("--demo", action="store_true", default=None, help="serve the demo page at /demo")

    ing = sub.add_parser("ingest", help="read the change feeds and publish them to the Kafka bus (scale-out)")
    ing.add_argument("--config", help="TOML configuration file")
    ing.add_argument("--state-dir", help="local state directory (default .rtserver)")
    ing.add_argument("--host", help="address of the health port (default 127.0.0.1)")
    ing.add_argument("--health-port", type=int, help="port of /healthz, /readyz, /metrics (default: none)")

    tok = sub.add_parser("token", help="print a development token signed with the configured or generated secret")
    tok.add_argument("--workspace", action="append", required=True, help="workspace id to grant (repeatable; * = all)")
    tok.add_argument("--sub", type=_subject, default="dev-user", help="subject (default dev-user)")
    tok.add_argument("--publish", action="store_true", help="grant the publish API")
    tok.add_argument("--channel", action="append", default=[],
                     help="channel pattern granted when auth.channel_permissions is on (repeatable; events:*, *)")
    tok.add_argument("--ttl", type=_lifetime, default=3600.0, help="lifetime in seconds (default 3600)")
    tok.add_argument("--config", help="TOML configuration file")
    tok.add_argument("--state-dir", help="local state directory (default .rtserver)")

    chk = sub.add_parser("check-config", help="check the configuration (file, RT_* variables) as serve or ingest "
                                              "would take it, and print the settings in effect; exit 2 on an error")
    chk.add_argument("--config", help="TOML configuration file")
    chk.add_argument("--state-dir", help="local state directory (default .rtserver)")
    chk.add_argument("--ingest", action="store_true", help="check it as `rtserver ingest` takes it (Kafka bus, feeds)")

    sub.add_parser("config-table", help="print the configuration table (Markdown)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    if args.command == "config-table":
        print(config_table_markdown())
        return 0
    if getattr(args, "config", None) is not None and not args.config.strip():
        # `--config "$CFG"` with CFG unset started a gateway in dev mode, on defaults.
        print("rtserver: configuration error: --config is empty: give the TOML file's path", file=sys.stderr)
        return 2
    try:
        overrides = {"server.state_dir": getattr(args, "state_dir", None)}
        if args.command == "serve":
            overrides.update({"server.host": args.host, "server.port": args.port, "server.demo": args.demo})
        if args.command == "ingest":
            overrides.update({"server.host": args.host, "bus.ingest_port": args.health_port, "bus.kind": "kafka"})
        if args.command == "check-config" and args.ingest:
            overrides["bus.kind"] = "kafka"
        # Said in errors about them: no --ingest-port or --kind option exists.
        origins = {"bus.ingest_port": "option --health-port",
                   "bus.kind": "rtserver check-config --ingest" if args.command == "check-config" else "rtserver ingest"}
        cfg = load(args.config, overrides=overrides, override_origins=origins)
    except ConfigError as exc:
        print(f"rtserver: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "token":
        return _token(cfg, args)
    if args.command == "check-config":
        return _check_config(cfg, "ingest" if args.ingest else "serve")
    if args.command == "ingest":
        return _ingest(cfg)
    return _serve(cfg)


def _token(cfg, args) -> int:
    from rtserver.auth import DEV_SECRET_FILE, claims_for, load_or_create_dev_secret, mint_token

    for w in args.workspace:
        if w != "*" and not WORKSPACE_ID_RE.match(w):
            print(f"rtserver: --workspace {w!r} must be 1-64 of [A-Za-z0-9_-] or *", file=sys.stderr)
            return 2
    if cfg.auth.jwks_url and not cfg.auth.hs256_secret:
        print("rtserver: tokens come from your identity provider (auth.jwks_url is set); no HS256 secret to sign with",
              file=sys.stderr)
        return 2
    state_dir = os.path.abspath(cfg.server.state_dir)
    made = not cfg.auth.hs256_secret and not os.path.exists(os.path.join(state_dir, DEV_SECRET_FILE))
    try:
        secret = cfg.auth.hs256_secret or load_or_create_dev_secret(state_dir)
    except OSError as exc:
        print(f"rtserver token: state directory {state_dir} (server.state_dir): {exc.strerror or exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a dev-secret file cut short or unreadable: said as `serve` says it
        print(f"rtserver token: {exc}", file=sys.stderr)
        return 2
    if made:
        # Run elsewhere than the gateway, the token was signed with a secret of its own, and the
        # gateway refused it ("bad token signature") with nothing said here.
        print(f"rtserver token: made a new dev secret in {state_dir}: only a gateway using this state directory "
              "(started in this directory, or with --state-dir) accepts the token", file=sys.stderr)
    if cfg.auth.channel_permissions and not args.channel:
        print("rtserver token: auth.channel_permissions is on and no --channel given: the token grants no channel",
              file=sys.stderr)
    # The claims this configuration's gateway checks (issuer, audience, claim paths, role prefix).
    claims = claims_for(cfg.auth, workspaces=args.workspace, publish=args.publish, channels=args.channel)
    print(mint_token(secret, subject=args.sub, workspaces=args.workspace, publish=args.publish, ttl=args.ttl,
                     extra=claims))
    return 0


def _check_config(cfg, command: str) -> int:
    """The settings `command` runs with, as JSON on stdout; what would stop it at start without
    reaching a server (the state directory, the TLS files, an ingest with no feeds) is an
    error, exit 2."""
    import json

    from rtserver.config_check import report

    problem = _start_problem(cfg, command, make=False)
    if problem is not None:
        print(f"rtserver: configuration error: {cfg.explain(problem)}", file=sys.stderr)
        return 2
    out = report(cfg, command)
    if command == "ingest" and not out["feeds"]:
        from rtserver.ingest import NO_FEEDS

        print(f"rtserver: configuration error: {NO_FEEDS}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    for warning in out["warnings"]:
        print(f"rtserver: warning: {warning}", file=sys.stderr)
    return 0


def _start_problem(cfg, command: str, make: bool) -> str | None:
    """What stops `command` (serve or ingest) at its start: the state directory (made when
    `make`, as the start does; else only foreseen, as check-config does), and for serve the
    TLS certificate and key. serve and ingest say it before their log begins, in check-config's
    words: they said it after log lines, in other words, naming no origin."""
    from rtserver.atomic_file import directory_problem, ensure_state_dir, state_dir_problem
    from rtserver.auth import dev_secret_problem
    from rtserver.config_check import server_tls_context

    state_dir = os.path.abspath(cfg.server.state_dir)
    try:
        if make:
            ensure_state_dir(state_dir)
        elif (problem := state_dir_problem(state_dir)) is not None:
            return problem
        if command == "serve":
            server_tls_context(cfg)
    except RuntimeError as exc:
        return str(exc)
    if command == "serve" and cfg.dev_mode and (problem := dev_secret_problem(state_dir)) is not None:
        return problem
    if command == "serve" and cfg.audit.kafka_bootstrap and cfg.audit.spool_dir:  # the default is in the state dir
        spool = os.path.abspath(cfg.audit.spool_dir)
        return directory_problem(spool, f"audit spool {spool} (audit.spool_dir)")
    return None


def _ingest(cfg) -> int:
    if (problem := _start_problem(cfg, "ingest", make=True)) is not None:
        print(f"rtserver ingest: configuration error: {cfg.explain(problem)}", file=sys.stderr)
        return 2
    return _run_loop(cfg, "rtserver.ingest", "run", "rtserver ingest")


def _serve(cfg) -> int:
    if (problem := _start_problem(cfg, "serve", make=True)) is not None:
        print(f"rtserver: configuration error: {cfg.explain(problem)}", file=sys.stderr)
        return 2
    return _run_loop(cfg, "rtserver.app", "serve", "rtserver")


def _os_error(exc: OSError) -> str:
    """An OSError no start-up step explained, with the file it is about when it names one."""
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _run_loop(cfg, module: str, function: str, label: str) -> int:
    """Run `module.function(cfg)` on uvloop with structured logs; a start-up failure is one
    line, exit 2."""
    import uvloop

    from rtserver import logs

    logs.setup(cfg.server.log_level)
    for message, fields in env_warnings(cfg):
        logging.getLogger("rtserver.config").warning(message, extra={"fields": fields})
    # Imported once the log is JSON: what the import logs (the rtcore extensions not built,
    # the pure-Python engine in use) is a JSON line too, with its fields.
    main = getattr(importlib.import_module(module), function)
    # Everything the process writes under the state directory (dev secret, session ids, source
    # positions, the audit spool) is for its own eyes.
    os.umask(0o077)
    raise_open_files_limit()  # the start-up log line says the result
    try:
        return uvloop.run(main(cfg))
    except OSError as exc:
        logs.flush()
        print(f"{label}: {_os_error(exc)}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        logs.flush()
        print(f"{label}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
