"""The log writer: JSON lines in order, written off the calling thread; a stderr that stops
reading neither blocks the caller nor grows memory (bounded queue, drops counted and reported)."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time

from rtserver import logs
from rtserver.audit import LogAudit
from rtserver.audit import log as audit_log
from rtserver.logs import JsonFormatter, LineWriter, direct_writer


class BlockingStream:
    """A stream whose writes wait until `release` is set (a pipe nobody reads)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.text = ""

    def write(self, data: str) -> int:
        self.entered.set()
        assert self.release.wait(30), "the test never released the stream"
        self.text += data
        return len(data)

    def flush(self) -> None:
        pass

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.text.splitlines()]


def make_logger(handler: logging.Handler, name: str) -> logging.Logger:
    handler.setFormatter(JsonFormatter())
    logger = logging.Logger(name, logging.INFO)
    logger.addHandler(handler)
    return logger


def test_lines_are_json_in_order_with_their_fields():
    stream = BlockingStream()
    stream.release.set()
    handler = LineWriter(stream)
    log = make_logger(handler, "t.order")
    for i in range(50):
        log.info("line %d", i, extra={"fields": {"i": i, "workspace": "w1"}})
    handler.flush()
    got = stream.lines()
    assert [line["i"] for line in got] == list(range(50))
    assert got[7]["msg"] == "line 7" and got[7]["logger"] == "t.order" and got[7]["workspace"] == "w1"
    handler.close()


def test_a_stream_that_does_not_read_neither_blocks_the_caller_nor_grows_the_queue():
    stream = BlockingStream()
    handler = LineWriter(stream, capacity=3)
    log = make_logger(handler, "t.blocked")
    log.info("first", extra={"fields": {"i": 0}})
    assert stream.entered.wait(10)  # the writer thread holds line 0 and waits in write()

    def burst() -> None:
        for i in range(1, 11):
            log.info("more", extra={"fields": {"i": i}})

    caller = threading.Thread(target=burst)
    caller.start()
    caller.join(10)
    assert not caller.is_alive(), "a log call waited for the stream"
    assert handler.dropped == 7  # 3 queued behind the line being written, 7 over capacity

    stream.release.set()
    handler.flush()
    got = stream.lines()
    assert [line.get("i") for line in got[:4]] == [0, 1, 2, 3]
    notice = got[4]
    assert notice["level"] == "warning" and notice["dropped"] == 7 and "7 log lines dropped" in notice["msg"]
    assert len(got) == 5
    handler.close()


def test_close_writes_what_is_queued_and_stops_the_thread():
    stream = BlockingStream()
    handler = LineWriter(stream)
    log = make_logger(handler, "t.close")
    log.info("a")
    assert stream.entered.wait(10)
    log.info("b")
    log.info("c")
    stream.release.set()
    handler.close()
    assert [line["msg"] for line in stream.lines()] == ["a", "b", "c"]
    assert not handler._thread.is_alive()
    log.info("after close")  # counted, not written, no error
    assert handler.dropped == 1 and len(stream.lines()) == 3


def test_a_value_json_has_no_type_for_is_logged_as_its_text():
    stream = BlockingStream()
    stream.release.set()
    handler = LineWriter(stream)
    log = make_logger(handler, "t.types")
    log.warning("odd", extra={"fields": {"error": ValueError("bad thing"), "count": 3, "ok": True}})
    handler.flush()
    (line,) = stream.lines()
    assert line["error"] == "bad thing" and line["count"] == 3 and line["ok"] is True
    assert line["ts"].endswith("Z") and len(line["ts"]) == len("2026-11-29T04:15:43.123Z")
    handler.close()


def test_a_line_with_a_text_json_cannot_hold_keeps_its_other_members_types():
    """A path that is not UTF-8 (lone surrogates) in one member made the formatter write every
    member as text: "port":"8080", "tls":"False" (Python's spelling, no JSON boolean), so a
    shipper's typed fields and queries on them broke for such lines."""
    stream = BlockingStream()
    stream.release.set()
    handler = LineWriter(stream)
    log = make_logger(handler, "t.surrogates")
    path = os.fsdecode(b"/var/lib/\xe9t\xe9")
    log.info("listening", extra={"fields": {"path": path, "port": 8080, "tls": False, "node": None, "lag": 0.5,
                                            "keys": ["a", path], "limits": {"n": 3, path: path}}})
    handler.flush()
    (line,) = stream.lines()
    assert line["path"] == "/var/lib/\\udce9t\\udce9", line
    assert line["port"] == 8080 and line["tls"] is False and line["node"] is None and line["lag"] == 0.5, line
    assert line["keys"] == ["a", line["path"]] and line["limits"] == {"n": 3, line["path"]: line["path"]}, line
    handler.close()


class ListStream:
    def __init__(self) -> None:
        self.text = ""

    def write(self, data: str) -> int:
        self.text += data
        return len(data)

    def flush(self) -> None:
        pass


def _pairs(line: str) -> list[tuple[str, object]]:
    return json.loads(line, object_pairs_hook=list)


def test_log_audit_lines_are_the_formatters_lines_with_or_without_the_direct_path(monkeypatch):
    """With the writer logs.setup() installs, LogAudit hands its line to the writer directly
    (logs.direct_writer); the line is the one the logging call made: same members, same order,
    one JSON object, no member twice. Any other configuration goes through logging."""
    stream = ListStream()
    writer = LineWriter(stream)
    writer.setFormatter(JsonFormatter())
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [writer])  # without pytest's capture handler
    monkeypatch.setattr(audit_log, "level", audit_log.level)  # restored after the test
    audit_log.setLevel(logging.INFO)
    assert logs.direct_writer(audit_log, logging.INFO) is writer
    calls = []
    monkeypatch.setattr(audit_log, "info", lambda *a, **kw: (calls.append(a), logging.Logger.info(audit_log, *a, **kw)))

    audit = LogAudit("node-d")
    kw = dict(workspace_id="w1", subject="alice", session_id="s1", remote_addr="1.2.3.4:5", refresh=True)
    audit.emit("auth-granted", **kw)  # direct
    assert not calls
    audit.emit("auth-granted", **kw, msg="clash")  # a member the line has itself: through logging
    assert len(calls) == 1
    monkeypatch.setattr(root, "handlers", [writer, logging.NullHandler()])
    assert logs.direct_writer(audit_log, logging.INFO) is None
    audit.emit("auth-granted", **kw)  # another handler: through logging
    assert len(calls) == 2
    writer.flush()
    direct, clash, logged = (_pairs(line) for line in stream.text.splitlines())
    assert [k for k, _ in direct] == [k for k, _ in logged]
    assert [k for k, _ in direct][:4] == ["ts", "level", "logger", "msg"]
    same = {"ts", "id", "timestamp"}
    assert [p for p in direct if p[0] not in same] == [p for p in logged if p[0] not in same]
    assert dict(direct)["msg"] == "audit auth-granted" and dict(direct)["refresh"] is True
    assert dict(direct)["ts"] == dict(direct)["timestamp"]
    assert len({k for k, _ in clash}) == len(clash) and dict(clash)["msg"] == "audit auth-granted"
    assert audit.status()["delivered"] == 3
    writer.close()


def test_direct_writer_only_for_the_plain_setup():
    writer = LineWriter(ListStream())
    writer.setFormatter(JsonFormatter())
    parent = logging.Logger("t.direct", logging.INFO)
    parent.addHandler(writer)
    child = logging.Logger("t.direct.child", logging.NOTSET)
    child.parent = parent
    assert direct_writer(child, logging.INFO) is writer
    assert direct_writer(child, logging.DEBUG) is None  # not enabled
    writer.setLevel(logging.WARNING)
    assert direct_writer(child, logging.INFO) is None
    writer.setLevel(logging.NOTSET)
    writer.addFilter(lambda r: True)
    assert direct_writer(child, logging.INFO) is None
    writer.filters.clear()
    child.addFilter(lambda r: True)
    assert direct_writer(child, logging.INFO) is None
    child.filters.clear()
    writer.setFormatter(logging.Formatter())
    assert direct_writer(child, logging.INFO) is None
    writer.setFormatter(JsonFormatter())
    child.propagate = False
    assert direct_writer(child, logging.INFO) is None  # no handler: logging's last resort
    child.propagate = True
    child.disabled = True
    assert direct_writer(child, logging.INFO) is None
    writer.close()


class CountingStream(ListStream):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: str) -> int:
        self.writes += 1
        return super().write(data)


def test_lines_of_a_burst_leave_in_one_write_and_flush_or_close_do_not_wait_for_the_linger():
    """Woken by a line, the writer lets the burst behind it gather for `linger` seconds (one
    wake-up of its thread, one write); flush() and close() write at once."""
    stream = CountingStream()
    handler = LineWriter(stream, linger=30.0)
    log = make_logger(handler, "t.linger")
    started = time.monotonic()
    for i in range(50):
        log.info("line %d", i, extra={"fields": {"i": i}})
    handler.flush()
    assert time.monotonic() - started < 10
    assert [json.loads(line)["i"] for line in stream.text.splitlines()] == list(range(50))
    assert stream.writes == 1
    log.info("last", extra={"fields": {"i": 50}})
    handler.close()
    assert time.monotonic() - started < 10
    assert json.loads(stream.text.splitlines()[-1])["i"] == 50

    quick = CountingStream()
    handler = LineWriter(quick, linger=0.01)
    log = make_logger(handler, "t.linger2")
    log.info("alone")
    deadline = time.monotonic() + 10
    while not quick.text and time.monotonic() < deadline:  # written without a flush
        time.sleep(0.005)
    assert json.loads(quick.text)["msg"] == "alone"
    handler.close()


async def test_a_path_in_another_encoding_is_logged_as_a_json_line(gateway_factory, tmp_path):
    """A name that is not UTF-8 (here the state directory's, Latin-1 'été') reaches Python with
    its odd bytes as lone surrogates, which JSON cannot encode: the formatter's error took
    the dev-mode warning's place, as a 35-line '--- Logging error ---' traceback on stderr."""
    state_dir = os.fsdecode(os.fsencode(str(tmp_path)) + b"/st-\xe9t\xe9")
    os.makedirs(state_dir)
    gw = await gateway_factory(env={"RT_AUTH_HS256_SECRET": ""}, state_dir=state_dir)
    await gw.stop()
    lines = [json.loads(line) for line in gw.logs().splitlines()]  # each one JSON
    (warning,) = [rec for rec in lines if rec["msg"].startswith("dev mode")]
    assert warning["state_dir"].endswith("/st-\\udce9t\\udce9"), warning


async def test_a_mongo_url_asking_for_a_compressor_not_installed_logs_json_only(gateway_factory):
    """`compressors=snappy` or `zstd` in a MongoDB URL (Atlas suggests them) without the
    driver's optional module: the configuration checks made the driver warn before the log
    began, two plain 'UserWarning: Wire protocol compression with snappy is not available'
    lines each on stderr, which a log shipper reading one JSON object a line refuses. The
    driver's warning is logged once the log is JSON, as a JSON line."""
    gw = await gateway_factory(env={"RT_MONGO_URL": "mongodb://127.0.0.1:9/app?replicaSet=rs0&compressors=snappy,bogus"})
    await gw.stop()
    lines = [json.loads(line) for line in gw.logs().splitlines()]  # each one JSON
    assert any(rec["msg"] == "listening" for rec in lines), lines
    assert any(rec["logger"] == "py.warnings" and "snappy" in rec["msg"] for rec in lines), lines


async def test_audit_records_a_stalled_stderr_drops_are_counted_lost_not_delivered(tmp_path):
    """Without Kafka the log is the audit trail. When stderr's reader falls behind, the log
    writer drops lines past its bound (as it should: the gateway must not block or grow), but
    the audit records among them were counted delivered: rt_audit_delivered said every record
    reached the trail and rt_audit_lost stayed 0 while thousands were missing from it. A real
    `rtserver serve` whose stderr pipe is not read while one connection refreshes its token
    12,000 times (each refresh is an auth-granted record): what the trail holds is what it
    counts delivered, and the rest is counted lost."""
    import asyncio
    import signal
    import subprocess
    import sys

    from tests.harness.fixtures_gateway import SECRET, Gateway, free_port
    from tests.harness.wsclient import ws_connect

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
    env.update({"RT_STATE_DIR": str(tmp_path), "RT_AUTH_HS256_SECRET": SECRET, "RT_LOG_LEVEL": "info",
                "RT_MIN_REFRESH_INTERVAL": "0"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rtserver", "serve", "--host", "127.0.0.1", "--port", str(port),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    gw = Gateway(env, [], str(tmp_path), port)  # for its URLs, tokens and HTTP helpers
    gw.proc = proc
    try:
        for _ in range(200):
            try:
                status, _ = await gw.get("/healthz")
                if status == 200:
                    break
            except OSError:
                await asyncio.sleep(0.05)
        token = gw.token("w1")
        refreshes = 12_000
        async with ws_connect(gw, "w1", token=token) as c:
            for start in range(0, refreshes, 1000):
                for i in range(start, start + 1000):
                    await c.send({"type": "auth", "token": token, "id": i})
                for _ in range(1000):
                    await c.recv_type("auth_ok")

        def audit() -> dict[str, float]:
            return {m.group(1): float(m.group(2)) for m in re.finditer(rb"^rt_audit_(\w+) (\S+)$", body, re.M)}

        wanted = refreshes + 2  # the refreshes, the connection's auth-granted and session-suspended
        for _ in range(100):
            _, body = await gw.get("/metrics")
            if audit()[b"emitted"] >= wanted:
                break
            await asyncio.sleep(0.05)
        counts = audit()
        proc.send_signal(signal.SIGTERM)
        err = await asyncio.wait_for(proc.stderr.read(), 60)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    trail = [line for line in err.decode().splitlines() if '"logger":"rtserver.audit"' in line]
    assert counts[b"emitted"] == wanted
    assert b'log lines dropped' in err  # the writer did drop lines: the case under test
    assert counts[b"delivered"] == len(trail) < wanted
    assert counts[b"lost"] == wanted - len(trail)


def test_what_python_reports_without_raising_is_a_json_line():
    # An exception in a __del__ (or a gc callback: FreezeSurvivors's at exit, logs audit) and a
    # thread's uncaught exception went to stderr as plain-text tracebacks, between the JSON lines.
    import subprocess
    import sys

    script = (
        "import gc, threading\n"
        "from rtserver import logs\n"
        "logs.setup('info')\n"
        "class Bad:\n"
        "    def __del__(self):\n"
        "        raise ValueError('in a finalizer')\n"
        "Bad()\n"
        "gc.collect()\n"
        "t = threading.Thread(target=lambda: 1 / 0, name='worker-x')\n"
        "t.start(); t.join()\n"
        "logs.flush()\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is JSON
    text = json.dumps(lines)
    assert any("Exception ignored" in line["msg"] for line in lines), lines
    assert "in a finalizer" in text and "ValueError" in text, lines
    assert any(line["msg"] == "uncaught exception in thread worker-x" for line in lines), lines
    assert "ZeroDivisionError" in text, lines
