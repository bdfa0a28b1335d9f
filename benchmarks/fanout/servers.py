"""Drivers of the servers under test: how to start each one, how a client talks to it, how
events are published to it. Every server runs as its own process pinned to the server core.

- `gateway`: `python -m rtserver serve`, clients authenticate with a bearer header and
  subscribe to `events:bench`; events are published through the HTTP publish API.
- `picows`, `websockets`: the baselines (baseline_*.py), same frames, events over a TCP line port.
- `centrifugo`: benchmarks/centrifugo/bin/centrifugo (built by benchmarks/centrifugo/build.sh),
  its JSON protocol over WebSocket, events through its HTTP API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import jwt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
CENTRIFUGO_BIN = os.path.join(ROOT, "benchmarks", "centrifugo", "bin", "centrifugo")
WORKSPACE = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token(sub: str = "bench-user", publish: bool = False, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + 7200, "workspaces": [WORKSPACE], **claims}
    if publish:
        payload["realtime_publish"] = True
    return jwt.encode(payload, SECRET, algorithm="HS256")


def write_tokens(path: str, n: int) -> None:
    """`n` connection tokens, one a line, each for its own subject (`bench-user-<i>`): the load
    generators give connection i token i (the `%T%` of a client spec). With one token for every
    connection the gateway verified it once and remembered it (Authenticator.known), while the
    baselines verified every connection's: the storm compared unlike work."""
    with open(path, "w") as fh:
        fh.writelines(token(f"bench-user-{i}") + "\n" for i in range(n))


NICE = 0  # set by the CLI (--nice): priority of every benchmark process on a shared machine
GATEWAY_ENV: dict[str, str] = {}  # set by the CLI (--gateway-env): settings to measure, e.g. RT_FANOUT_BACKLOG


def taskset(cpus: str | None) -> list[str]:
    """Pin to `cpus` (and apply NICE); empty when taskset is missing or there is one core."""
    prefix = ["nice", "-n", str(NICE)] if NICE else []
    if cpus is None or shutil.which("taskset") is None:
        return prefix
    return prefix + ["taskset", "-c", cpus]


class _PortTaken(RuntimeError):
    """A server could not bind a port free_port() had found free."""


@dataclass
class Server:
    name: str
    cpus: str | None
    port: int = 0
    proc: subprocess.Popen | None = None
    tmp: tempfile.TemporaryDirectory | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- lifecycle --
    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start(self) -> None:
        # free_port() only finds a port free now: another process (a test beside this run) may
        # take it before the server binds it. Such a start is tried again on other ports.
        for _ in range(3):
            try:
                self._start_once()
                return
            except _PortTaken:
                self.stop()
        self._start_once()

    def _start_once(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix=f"fanout-{self.name}-")
        self.port = free_port()
        self.extra["publish_port"] = free_port()
        log = open(os.path.join(self.tmp.name, "server.log"), "wb")
        self.proc = subprocess.Popen(taskset(self.cpus) + self.command(), env=self.env(), cwd=self.tmp.name,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                logs = self.logs()
                if "address already in use" in logs.lower():
                    raise _PortTaken(logs)
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{logs}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not come up:\n{self.logs()}")

    def healthy(self) -> bool:
        for port in (self.port, self.extra["publish_port"]):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None

    def logs(self) -> str:
        try:
            with open(os.path.join(self.tmp.name, "server.log"), errors="replace") as fh:
                return fh.read()[-5000:]
        except (OSError, AttributeError):
            return ""

    # -- what the load generator needs --
    def client_spec(self, filtered_groups: int = 0, predicate: str = "distinct") -> dict[str, Any]:
        """How subscribers connect and subscribe; with `filtered_groups`, each matches
        1/groups of the events (`predicate`: "distinct", a filter per client, or "eq", one
        equality shared by a group; only the gateway has filters, the others route by group).
        `%T%` in headers and hello messages is the connection's own token (Runner adds the
        `tokens` file; see write_tokens), `%I%` its index, `%G%` its group."""
        raise NotImplementedError

    def publish_spec(self) -> dict[str, Any]:
        return {"kind": "line", "host": "127.0.0.1", "port": self.extra["publish_port"], "ack": "+\n"}

    def counters(self) -> dict[str, float]:
        """Server-side counters worth reporting (the gateway's writes and frames)."""
        return {}

    # -- process figures --
    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            parts = fh.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


class Gateway(Server):
    def command(self) -> list[str]:
        return [sys.executable, "-m", "rtserver", "serve", "--host", "127.0.0.1", "--port", str(self.port)]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in super().env().items() if not k.startswith("RT_")}
        env.update({
            "RT_AUTH_HS256_SECRET": SECRET,
            "RT_STATE_DIR": self.tmp.name,
            "RT_LOG_LEVEL": "warning",
            "RT_MAX_CONNECTIONS": "1000000",
            "RT_MAX_CONNECTIONS_PER_SUBJECT": "1000000",
            # The harness keeps its connections under the open-files limit itself (idle-20k's
            # 19,400 on a hard limit of 20,000, within the 19,488 client sockets the gateway
            # allows); the WebSocket share (that limit less 1024) would refuse the last ~400
            # with 503.
            "RT_MAX_NODE_CONNECTIONS": "1000000",
            "RT_IDLE_TIMEOUT": "3600",
            "RT_SEND_BUFFER_BYTES": str(64 * 1024 * 1024),
        })
        env.update(GATEWAY_ENV)
        if self.extra.get("postgres"):  # a PostgreSQL-fed scenario (see Runner.postgres)
            env["RT_POSTGRES_URL"] = self.extra["postgres"]
            env["RT_INSTANCE"] = f"bench_{self.port}"
        return env

    def start(self) -> None:
        super().start()
        self.extra["compiled"] = _gateway_compiled()

    def healthy(self) -> bool:
        # With a change feed: ready once it streams (rows inserted before would not be read).
        path = "/readyz" if self.extra.get("postgres") else "/healthz"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def counters(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("rt_writes_total", "rt_frames_out_total", "rt_deliveries_total",
                        'rt_drops_total{reason="slow_reader"}'):
                out[name] = float(value)
            elif name.startswith(("rt_gc_collections_total", "rt_gc_pause_seconds_total")):
                out[name] = float(value)
        return out

    def client_spec(self, filtered_groups: int = 0, predicate: str = "distinct") -> dict[str, Any]:
        channel = "postgres:ticks" if self.extra.get("postgres") else "events:bench"
        sub: dict[str, Any] = {"type": "subscribe", "channel": channel}
        if filtered_groups and predicate == "eq":
            # The control: the same deliveries per event, through a plain equality per group.
            sub["filter"] = {"predicates": {"g": 999999}}
        elif filtered_groups:
            # Distinct predicate per client (the $ne value), 1/groups of the clients match an event.
            sub["filter"] = {"predicates": {"g": 999999, "u": {"$ne": 888888}}}
        hello = json.dumps(sub).replace("999999", "%G%").replace("888888", "%I%")
        return {
            "host": "127.0.0.1", "port": self.port, "path": f"/workspaces/{WORKSPACE}/realtime/connect",
            "headers": {"Authorization": "Bearer %T%"}, "hello": [hello], "ready": '"subscribed"',
            "groups": filtered_groups,
        }

    def publish_spec(self, batch: int = 0) -> dict[str, Any]:
        """How the publisher sends events; with `batch`, up to that many to a request of the
        batch endpoint, each answered with its own "seq" (the markers count events, not answers)."""
        if batch:
            return {"kind": "http", "host": "127.0.0.1", "port": self.port,
                    "path": f"/workspaces/{WORKSPACE}/realtime/events", "batch_topic": "bench",
                    "headers": {"Authorization": f"Bearer {token('bench-publisher', publish=True)}"},
                    "ack": '"correlationId"', "ok": '"seq"'}
        if self.extra.get("postgres"):
            # INSERTs whose columns are the payload's fields: the record starts with {"t":
            return {"kind": "pg", "dsn": self.extra["postgres"],
                    "sql": "INSERT INTO ticks (t, g, u, pad) VALUES ($1, $2, -1, $3)"}
        return {"kind": "http", "host": "127.0.0.1", "port": self.port,
                "path": f"/workspaces/{WORKSPACE}/realtime/events/bench",
                "headers": {"Authorization": f"Bearer {token('bench-publisher', publish=True)}"},
                "ack": "HTTP/1.1 ", "ok": "HTTP/1.1 202 "}


class GatewayReadBuffer2k(Gateway):
    """The gateway with a 2 KiB first read buffer per connection (see gateway_variant.py)."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "benchmarks.fanout.gateway_variant", "serve", "--host", "127.0.0.1",
                "--port", str(self.port)]


class Baseline(Server):
    module = ""

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, str(self.port), str(self.extra["publish_port"]), SECRET]

    def client_spec(self, filtered_groups: int = 0, predicate: str = "distinct") -> dict[str, Any]:
        sub = '{"type":"subscribe","channel":"events:bench"%s}' % (',"g":%G%' if filtered_groups else "")
        auth = json.dumps({"type": "auth", "token": "%T%"})
        return {"host": "127.0.0.1", "port": self.port, "path": "/", "hello": [auth, sub],
                "ready": '"subscribed"', "groups": filtered_groups}


class PicowsBaseline(Baseline):
    module = "benchmarks.fanout.baseline_picows"


class WebsocketsBaseline(Baseline):
    module = "benchmarks.fanout.baseline_websockets"


class Centrifugo(Server):
    """Centrifugo v6 with HMAC tokens and the HTTP API; one channel `bench`."""

    api_key = "bench-api-key"

    def command(self) -> list[str]:
        cfg = {
            "http_server": {"address": "127.0.0.1", "port": str(self.port)},
            "client": {"token": {"hmac_secret_key": SECRET}, "allowed_origins": ["*"]},
            # Tags filters (v6.4+): each subscriber of filtered-10k names its own (client_spec).
            "channel": {"without_namespace": {"allow_subscribe_for_client": True, "allow_tags_filter": True}},
            "http_api": {"key": self.api_key},
            "log": {"level": "error"},
        }
        path = os.path.join(self.tmp.name, "config.json")
        with open(path, "w") as fh:
            json.dump(cfg, fh)
        return [CENTRIFUGO_BIN, "--config", path]

    def env(self) -> dict[str, str]:
        # One core, like the Python servers (and CPU per core is what the report compares).
        return dict(os.environ, GOMAXPROCS="1")

    def healthy(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def client_spec(self, filtered_groups: int = 0, predicate: str = "distinct") -> dict[str, Any]:
        connect = json.dumps({"id": 1, "connect": {"token": "%T%"}})
        subscribe: dict[str, Any] = {"channel": "bench"}
        if filtered_groups:
            # Its publication filter by tags, the gateway's predicate: the group's equality, and
            # for "distinct" the client's own inequality on `u` (publish_spec's tags).
            group = {"key": "g", "cmp": "eq", "val": "%G%"}
            subscribe["tf"] = group if predicate == "eq" else {
                "op": "and", "nodes": [group, {"key": "u", "cmp": "neq", "val": "%I%"}]}
        sub = json.dumps({"id": 2, "subscribe": subscribe})
        return {"host": "127.0.0.1", "port": self.port, "path": "/connection/websocket",
                "hello": [connect, sub], "ready": '"id":2', "groups": filtered_groups}

    def publish_spec(self) -> dict[str, Any]:
        return {"kind": "http", "host": "127.0.0.1", "port": self.port, "path": "/api/publish",
                "headers": {"X-API-Key": self.api_key},
                "wrap": '{"channel":"bench","data":%%P%%,"tags":{"p":"%s","g":"%%G%%","u":"-1"}}' % ("x" * centrifugo_pad()),
                # an API error is a 200 too, with {"error":...} in place of {"result":...}
                "ack": "HTTP/1.1 ", "ok": '{"result"'}


def centrifugo_pad() -> int:
    """Characters of padding in a publication's tags that make Centrifugo's push (its JSON
    protocol: `{"push":{"channel":"bench","pub":{"data":...,"tags":{...}}}}`) as long as the
    gateway's event envelope around the same payload. Without it Centrifugo sent 142 bytes per
    delivery against everyone else's 290, below the frame size past which a paced delivery
    costs the writer an immediate ACK (README-fanout, "Frame size")."""
    from benchmarks.fanout.baseline_common import Envelope
    from benchmarks.fanout.wire import payload

    sample = payload(0)
    push = b'{"push":{"channel":"bench","pub":{"data":%s,"tags":{"p":"","g":"0","u":"-1"}}}}' % sample
    return max(0, len(Envelope().body(sample)) - len(push))


def _gateway_compiled() -> bool | None:
    try:
        from rtcore.engine import COMPILED

        return COMPILED
    except Exception:
        return None


KINDS: dict[str, type[Server]] = {
    "gateway": Gateway,
    "gateway-rb2k": GatewayReadBuffer2k,
    "picows": PicowsBaseline,
    "websockets": WebsocketsBaseline,
    "centrifugo": Centrifugo,
}


def available(name: str) -> bool:
    return name != "centrifugo" or os.access(CENTRIFUGO_BIN, os.X_OK)
