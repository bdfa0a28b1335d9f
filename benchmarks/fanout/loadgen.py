"""Load-generator process: subscribers, a publisher, or a connection storm.

Run as `python -m benchmarks.fanout.loadgen '<json config>'` by the harness, pinned to a core
with taskset. It speaks JSON lines: commands on stdin, replies on stdout. Subscribers are raw
asyncio protocols that do their own minimal WebSocket handshake and never decode frames: they
scan the received bytes for the payload's timestamp marker (wire.MARKER), which keeps the
client cost per delivery low enough not to be the bottleneck of a 2-core machine.

Subscriber commands: reset (forget counts), stat (counts so far), report (write latencies to
`path`, reply counts), quit. Publisher and storm processes run once and print their result.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import socket
import sys
import time
from array import array
from typing import Any

from benchmarks.fanout import wire

IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the port at connect(), so >28k per source address
_MAX_SAMPLES = 30_000_000


def raise_nofile(want: int = 200_000) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), max(hard, target)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def source_address(index: int, base: int = 2) -> str:
    """Spread connections over 127.0.0.x so the ephemeral port range is never the limit."""
    return f"127.0.0.{base + (index // 20000) % 200}"


async def open_socket(host: str, port: int, src: str) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((src, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class Stats:
    __slots__ = ("count", "first", "last", "lat", "bytes", "misrouted", "disorder")

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0  # received after the ready marker: frames as they came, headers included
        self.first = 0
        self.last = 0
        self.lat = array("q")
        # Deliveries a connection should not have had: another group's event, and one whose
        # timestamp is not after the last it read (duplicated or out of order). A total alone
        # passed a server that sent each group's events to another group's subscribers.
        self.misrouted = 0
        self.disorder = 0


class Subscriber(asyncio.Protocol):
    """One WebSocket client: handshake, hello messages, then count and time events."""

    __slots__ = ("stats", "hello", "ready_marker", "ready", "state", "buf", "tail", "transport", "closed", "_request",
                 "group", "last_t")

    def __init__(self, stats: Stats, request: bytes, hello: list[bytes], ready_marker: bytes, group: int = 0):
        self.stats = stats
        self.group = group  # whose events it subscribed to (index % groups)
        self.last_t = 0
        self.hello = hello
        self.ready_marker = ready_marker
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.state = 0  # 0 handshake, 1 waiting for the ready marker, 2 receiving
        self.buf = b""
        self.tail = b""
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._request = request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready: {exc or 'EOF'} {self.buf[:200]!r}"))

    def data_received(self, data: bytes) -> None:
        if self.state == 2:
            self._events(data)
            return
        self.buf += data
        if self.state == 0:
            end = self.buf.find(wire.HANDSHAKE_END)
            if end < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(ConnectionError(f"upgrade refused: {self.buf[:200]!r}"))
                self.transport.close()
                return
            self.buf = self.buf[end + 4:]
            self.state = 1
            if self.hello:
                self.transport.write(b"".join(self.hello))
        pos = self.buf.find(self.ready_marker)
        if pos >= 0:
            self.state = 2
            rest = self.buf[pos + len(self.ready_marker):]
            self.buf = b""
            if not self.ready.done():
                self.ready.set_result(None)
            if rest:
                self._events(rest)

    def _events(self, data: bytes) -> None:
        now = time.time_ns()
        self.stats.bytes += len(data)
        buf = self.tail + data if self.tail else data
        find = buf.find
        pos = find(wire.MARKER)
        if pos < 0:
            self.tail = buf[-4:]
            return
        st = self.stats
        lat = st.lat
        n = 0
        while pos >= 0:
            comma = find(b",", pos + 5)
            # `,"g":N,` follows the timestamp (wire.payload, and the PostgreSQL row's columns)
            end = find(b",", comma + 5) if comma >= 0 and buf.startswith(b',"g":', comma) else comma
            if end < 0 or comma + 5 > len(buf) and b',"g":'.startswith(buf[comma:]):
                self.tail = buf[pos:]
                break
            t = int(buf[pos + 5:comma])
            if end != comma and int(buf[comma + 5:end]) != self.group:
                st.misrouted += 1
            if t <= self.last_t:
                st.disorder += 1
            self.last_t = t
            lat.append(now - t)
            n += 1
            pos = find(wire.MARKER, comma)
        else:
            self.tail = buf[-4:]
        if n:
            if not st.count:
                st.first = now
            st.count += n
            st.last = now
            if len(lat) > _MAX_SAMPLES:
                del lat[: len(lat) // 2]


def _token(spec: dict[str, Any], index: int) -> str:
    """Connection `index`'s own token, from the spec's `tokens` file (read once)."""
    tokens = spec.get("_tokens")
    if tokens is None:
        with open(spec["tokens"]) as fh:
            tokens = spec["_tokens"] = fh.read().split()
    return tokens[index % len(tokens)]


def _fill(spec: dict[str, Any], text: str, index: int) -> str:
    """A hello message or header value for connection `index`: its token, index and group."""
    if "%T%" in text:
        text = text.replace("%T%", _token(spec, index))
    return text.replace("%I%", str(index)).replace("%G%", str(index % max(1, spec.get("groups", 1))))


def _hello(spec: dict[str, Any], index: int) -> list[bytes]:
    return [wire.client_text_frame(_fill(spec, msg, index).encode()) for msg in spec.get("hello", [])]


async def connect_one(spec: dict[str, Any], index: int, stats: Stats, timeout: float = 60.0,
                      attempts: int = 3) -> Subscriber:
    """Connect, upgrade, send the hello messages, wait for the ready marker; a connection
    reset during set-up (a full accept queue) is retried like a real client would."""
    for attempt in range(attempts):
        try:
            return await _connect_once(spec, index, stats, timeout)
        except (ConnectionError, OSError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


async def _connect_once(spec: dict[str, Any], index: int, stats: Stats, timeout: float) -> Subscriber:
    loop = asyncio.get_running_loop()
    host, port = spec["host"], spec["port"]
    sock = await asyncio.wait_for(open_socket(host, port, source_address(index, spec.get("src_base", 2))), timeout)
    headers = {k: _fill(spec, v, index) for k, v in (spec.get("headers") or {}).items()}
    request = wire.ws_request(host, port, spec["path"], headers)
    group = index % max(1, spec.get("groups", 1))
    _, proto = await loop.create_connection(
        lambda: Subscriber(stats, request, _hello(spec, index), spec["ready"].encode(), group), sock=sock
    )
    await asyncio.wait_for(proto.ready, timeout)
    return proto


async def run_subscribers(cfg: dict[str, Any]) -> None:
    spec = cfg["server"]
    n, offset = cfg["n"], cfg["offset"]
    stats = Stats()
    sem = asyncio.Semaphore(cfg.get("concurrency", 256))
    subs: list[Subscriber] = []
    errors: list[str] = []

    async def one(i: int) -> None:
        async with sem:
            try:
                subs.append(await connect_one(spec, offset + i, stats))
            except (TimeoutError, OSError, ConnectionError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    _reply({"ready": len(subs), "failed": len(errors), "errors": errors[:3], "connect_s": time.monotonic() - t0})
    reader = await _stdin()
    cpu0 = _cpu()
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "reset":
            cpu0 = _cpu()  # cpu_s counts from here: not the connecting
            stats.count = stats.first = stats.last = stats.bytes = stats.misrouted = stats.disorder = 0
            stats.lat = array("q")
            for s in subs:
                s.stats = stats
            _reply({"ok": True})
        elif op == "stat":
            _reply({"count": stats.count, "first": stats.first, "last": stats.last,
                    "open": sum(1 for s in subs if not s.closed)})
        elif op == "report":
            cpu = _cpu() - cpu0  # before writing the latencies: that is not load (gosub/main.go)
            with open(cmd["path"], "wb") as fh:
                stats.lat.tofile(fh)
            _reply({"count": stats.count, "first": stats.first, "last": stats.last, "samples": len(stats.lat),
                    "open": sum(1 for s in subs if not s.closed), "cpu_s": cpu,
                    "bytes": stats.bytes, "misrouted": stats.misrouted, "disorder": stats.disorder})
        elif op == "quit":
            break
    for s in subs:
        if s.transport is not None:
            s.transport.abort()
    _reply({"bye": True})


def _count_markers(tail: bytes, data: bytes, marker: bytes) -> tuple[int, bytes]:
    """The markers in `data` read after `tail` (the previous read's last len(marker) - 1 bytes:
    a marker cut in two is counted once, a whole one never twice), and the tail to keep."""
    buf = tail + data
    return buf.count(marker), buf[-(len(marker) - 1):] if len(marker) > 1 else b""


class Publisher(asyncio.Protocol):
    """Counts answers (one `ack` marker per event answered: they free the window) and, with an
    `ok` marker, the answers that accepted their event (a 503 or an API error answers too)."""

    def __init__(self, ack: bytes, ok: bytes | None = None):
        self.ack = ack
        self.ok = ok
        self.acked = 0
        self.accepted = 0
        self.tail = b""
        self.ok_tail = b""
        self.waiter: asyncio.Future | None = None
        self.want = 0
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        n, self.tail = _count_markers(self.tail, data, self.ack)
        self.acked += n
        if self.ok is None:
            self.accepted = self.acked
        else:
            n, self.ok_tail = _count_markers(self.ok_tail, data, self.ok)
            self.accepted += n
        if self.waiter is not None and self.acked >= self.want and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"publish connection lost: {exc}"))

    async def until(self, n: int) -> None:
        if self.acked >= n:
            return
        if self.lost.done():  # no answer can come any more: a waiter would wait out its timeout
            raise ConnectionError(f"publish connection lost: {self.lost.result()}")
        self.want = n
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter


def _publish_bytes(pub: dict[str, Any], group: int) -> bytes:
    body = wire.payload(group)
    wrap = pub.get("wrap")
    if wrap:
        body = wrap.encode().replace(b"%P%", body).replace(b"%G%", b"%d" % group)
    if pub["kind"] == "http":
        head = pub.get("_head")
        if head is None:
            head = pub["_head"] = wire.http_post_head(pub["host"], pub["port"], pub["path"], pub.get("headers", {}))
        return wire.http_post(head, body)
    return body + b"\n"


def _batch_bytes(pub: dict[str, Any], groups: list[int]) -> bytes:
    """One request of the gateway's batch endpoint carrying an event per group."""
    topic = pub["batch_topic"].encode()
    items = b",".join(b'{"topic":"%s","payload":%s}' % (topic, wire.payload(g)) for g in groups)
    head = pub.get("_head")
    if head is None:
        head = pub["_head"] = wire.http_post_head(pub["host"], pub["port"], pub["path"], pub.get("headers", {}))
    return wire.http_post(head, b'{"events":[%s]}' % items)


async def run_pg_publisher(cfg: dict[str, Any]) -> None:
    """Events as single-row INSERT commits (autocommit) through a small asyncpg pool; an event
    is acknowledged when its commit returns. Window: at most `window` commits in flight;
    paced: open loop at a fixed commit rate."""
    import asyncpg

    pub = cfg["publish"]
    groups = max(1, cfg.get("groups", 1))
    rng = random.Random(7)
    mode, duration = cfg["mode"], cfg["duration"]
    max_events = cfg.get("max_events", 1 << 62)
    window = cfg.get("window", 1) if mode == "window" else 8
    pool = await asyncpg.create_pool(pub["dsn"], min_size=window, max_size=window)
    sql, pad = pub["sql"], wire.PAD
    sent = acked = accepted = 0
    slots = asyncio.Semaphore(window)

    async def insert(group: int) -> None:
        nonlocal acked, accepted
        try:
            await pool.execute(sql, time.time_ns(), group, pad)
            accepted += 1
            acked += 1
        except asyncpg.PostgresError:
            acked += 1  # answered, with no event to deliver: `refused`, as a publish API's error
        finally:
            slots.release()

    tasks: set[asyncio.Task] = set()
    t_start = time.time_ns()
    cpu0 = _cpu()  # the run's CPU, not the start-up's
    t0 = time.monotonic()
    deadline = t0 + duration
    interval = 1.0 / cfg["events_per_s"] if mode == "paced" else 0.0
    while time.monotonic() < deadline and sent < max_events:
        if mode == "paced":
            due = t0 + sent * interval
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
        await slots.acquire()
        task = asyncio.create_task(insert(rng.randrange(groups)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    t_sent = time.time_ns()
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    await pool.close()
    _reply({"sent": sent, "acked": acked, "accepted": accepted, "t_start": t_start, "t_sent": t_sent, "cpu_s": _cpu() - cpu0})


async def run_publisher(cfg: dict[str, Any]) -> None:
    pub = cfg["publish"]
    if pub["kind"] == "pg":
        await run_pg_publisher(cfg)
        return
    loop = asyncio.get_running_loop()
    sock = await open_socket(pub["host"], pub["port"], "127.0.0.1")
    ok = pub["ok"].encode() if pub.get("ok") else None
    _, proto = await loop.create_connection(lambda: Publisher(pub["ack"].encode(), ok), sock=sock)
    groups = max(1, cfg.get("groups", 1))
    rng = random.Random(7)
    mode = cfg["mode"]
    duration = cfg["duration"]
    max_events = cfg.get("max_events", 1 << 62)
    sent = 0
    t_start = time.time_ns()
    cpu0 = _cpu()  # the run's CPU, not the start-up's
    deadline = time.monotonic() + duration
    write = proto.transport.write
    batch = cfg.get("batch", 0)
    try:
        if mode == "window" and batch:  # the same, the events `batch` to a request
            window = cfg.get("window", 1)
            while time.monotonic() < deadline and sent < max_events:
                room = min(window - (sent - proto.acked), max_events - sent)
                if room > 0:
                    sizes = [min(batch, room - k) for k in range(0, room, batch)]
                    write(b"".join([_batch_bytes(pub, [rng.randrange(groups) for _ in range(n)]) for n in sizes]))
                    sent += room
                await proto.until(sent - window + 1)
        elif mode == "window":  # closed loop: at most `window` events unacknowledged
            window = cfg.get("window", 1)
            while time.monotonic() < deadline and sent < max_events:
                # every event the window has room for, in one write (one system call, as a client
                # library batching its pipelined requests would)
                room = min(window - (sent - proto.acked), max_events - sent)
                if room > 0:
                    write(b"".join([_publish_bytes(pub, rng.randrange(groups)) for _ in range(room)]))
                    sent += room
                await proto.until(sent - window + 1)
        elif mode == "burst":  # `burst` events in one write, then wait for all of them
            burst = cfg["burst"]
            while time.monotonic() < deadline and sent < max_events:
                write(b"".join(_publish_bytes(pub, rng.randrange(groups)) for _ in range(burst)))
                sent += burst
                await proto.until(sent)
        elif mode == "paced":  # open loop at a fixed event rate
            interval = 1.0 / cfg["events_per_s"]
            t0 = time.monotonic()
            while True:
                due = t0 + sent * interval
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                if time.monotonic() >= deadline or sent >= max_events:
                    break
                if proto.lost.done():  # the server closed the connection: a write would raise
                    break
                write(_publish_bytes(pub, rng.randrange(groups)))
                sent += 1
    except ConnectionError:
        pass  # the server closed the connection: the reply says how many events it answered
    t_sent = time.time_ns()
    try:
        await asyncio.wait_for(proto.until(sent), cfg.get("answer_wait", 30))
    except (TimeoutError, ConnectionError):
        pass  # the harness compares `acked` with `sent`: an unanswered event fails the round
    proto.transport.close()
    _reply({"sent": sent, "acked": proto.acked, "accepted": proto.accepted, "closed": proto.lost.done(),
            "t_start": t_start, "t_sent": t_sent, "cpu_s": _cpu() - cpu0})


async def run_storm(cfg: dict[str, Any]) -> None:
    """Connect, authenticate, subscribe, close: `total` times, `concurrency` at once."""
    spec = cfg["server"]
    total, conc = cfg["total"], cfg.get("concurrency", 64)
    stats = Stats()
    times = array("q")
    errors: list[str] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter_ns()
            try:
                proto = await connect_one(spec, cfg["offset"] + i, stats, timeout=30)
            except (TimeoutError, OSError, ConnectionError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            times.append(time.perf_counter_ns() - t0)
            proto.transport.close()

    t_start, cpu0 = time.monotonic(), _cpu()
    await asyncio.gather(*(worker() for _ in range(conc)))
    elapsed, cpu = time.monotonic() - t_start, _cpu() - cpu0  # the storm's, not the process start's
    await asyncio.sleep(0.2)  # let the closes go out
    with open(cfg["path"], "wb") as fh:
        times.tofile(fh)
    _reply({"done": len(times), "failed": len(errors), "errors": errors[:3], "elapsed": elapsed, "cpu_s": cpu})


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _stdin() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def main() -> None:
    cfg = json.loads(sys.argv[1])
    raise_nofile()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    role = cfg["role"]
    fn = {"subscribers": run_subscribers, "publisher": run_publisher, "storm": run_storm}[role]
    try:
        asyncio.run(fn(cfg))
    except KeyboardInterrupt:
        pass
    os._exit(0)  # skip tearing down thousands of sockets one by one


if __name__ == "__main__":
    main()
