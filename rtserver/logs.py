"""Structured logging: one JSON object a line on stderr, written by a thread of its own.

Modules log with `logger.info("message", extra={"fields": {...}})`; the fields become members of
the JSON object. Nothing here ever receives a token: callers pass subjects and ids only.

A log call formats its line and queues it; `LineWriter`'s thread writes the queue to stderr.
stderr is a pipe to journald, a container runtime or a terminal, and a write to it waits when
its reader is slow: on the event loop that wait would stall every connection (a connection
storm logs an audit line per connection). The queue is bounded (`LineWriter.capacity` lines);
past it, lines are dropped and counted, and the writer says how many in a line of its own.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from typing import Any, TextIO

import msgspec

from rtcore.timefmt import iso_ms

# A value JSON has no type for (an exception, a path) is logged as its str().
_encode = msgspec.json.Encoder(enc_hook=str).encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": iso_ms(int(record.created * 1000)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        try:
            return _encode(out).decode()
        except (TypeError, UnicodeEncodeError):
            # A value JSON has no type for, or text JSON cannot hold: a name in another encoding
            # (a path, an environment variable) reaches Python with its odd bytes as lone
            # surrogates. Written as text, those escaped, rather than a traceback on stderr;
            # the other members keep their JSON types (a port stays a number, a flag a boolean).
            return _encode({k: _encodable(v) for k, v in out.items()}).decode()


def _encodable(value: Any) -> Any:
    """`value` with every text in it that JSON cannot hold escaped, numbers, booleans and
    null as they are; a value JSON has no type for as its escaped str()."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {_text(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encodable(v) for v in value]
    return _text(value)


def _text(value: Any) -> str:
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


# The members JsonFormatter writes before a record's fields (and "exc", after them).
LINE_KEYS = frozenset(("ts", "level", "logger", "msg"))


def json_line(ts: str, level: str, logger: str, msg: str, members: bytes) -> str:
    """The line JsonFormatter writes for a record without exc_info whose fields, none of them
    named in LINE_KEYS, encode to the JSON object `members`: a caller that has them encoded
    already (an audit record) does not build and encode them a second time."""
    head = _encode({"ts": ts, "level": level, "logger": logger, "msg": msg})
    if len(members) <= 2:  # {}
        return head.decode()
    return (head[:-1] + b"," + members[1:]).decode()


def direct_writer(logger: logging.Logger, level: int) -> LineWriter | None:
    """The LineWriter that alone writes what `logger` logs at `level`, with a JsonFormatter
    and no filter on the way (as `setup` configures it), or None: then log through `logger`
    (another handler, a filter, a test's capture). With it, a line from `json_line` handed to
    its `put` is what `logger.log(level, ...)` would have written, without the LogRecord, the
    caller lookup and the handler locks (~5 us of an audit record's ~8, measured)."""
    if logger.disabled or logger.filters or not logger.isEnabledFor(level):
        return None
    found = None
    c: logging.Logger | None = logger
    while c is not None:
        for h in c.handlers:
            if (
                found is not None
                or type(h) is not LineWriter
                or h.filters
                or level < h.level
                or type(h.formatter) is not JsonFormatter
            ):
                return None
            found = h
        c = c.parent if c.propagate else None
    return found


class LineWriter(logging.Handler):
    """Formats records in the caller's thread and writes the lines on a thread of its own.

    At most `capacity` lines wait; beyond that a line is dropped and counted, and the next write
    includes a warning with the count. `flush()` waits (up to `timeout` seconds) until what was
    queued is written; `close()` (called by logging.shutdown at exit) writes the rest and stops
    the thread.

    Woken by a line, the thread lets the lines of the next `linger` seconds join it before it
    writes (flush() and close() cut that short). Each wake-up of the thread takes the GIL from
    the event loop's thread and, on the core they share, preempts it: woken by the first line
    after each write, it did so ~3 times per connection in a connection storm (11,000
    preemptions of the loop's thread in a 4,000-connection storm, measured)."""

    def __init__(self, stream: TextIO, capacity: int = 10000, timeout: float = 5.0, linger: float = 0.005):
        super().__init__()
        self.stream = stream
        self.capacity = capacity
        self.timeout = timeout
        self.linger = linger
        self.dropped = 0  # in all (the count since the last warning is _unreported)
        self._lines: collections.deque[str] = collections.deque()
        self._unreported = 0
        self._writing = False
        self._closed = False
        self._flushing = 0  # flush() calls waiting
        self._cond = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._run, name="rt-log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must not raise into the caller
            self.handleError(record)
            return
        self.put(line)

    def put(self, line: str) -> bool:
        """Queue a formatted line (see `direct_writer`); False when it was dropped (the queue is
        full, or the writer closed): a caller whose lines are a record of their own (the audit
        trail) counts them lost."""
        with self._cond:
            if self._closed or len(self._lines) >= self.capacity:
                self.dropped += 1
                self._unreported += 1
                return False
            self._lines.append(line)
            if len(self._lines) == 1:
                self._cond.notify_all()
            return True

    def flush(self) -> None:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            self._flushing += 1  # the writer does not linger meanwhile
            self._cond.notify_all()  # nor goes on lingering
            try:
                while (self._lines or self._writing) and self._thread.is_alive():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._cond.wait(left)
            finally:
                self._flushing -= 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(self.timeout)
        super().close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._lines and not self._unreported and not self._closed:
                    self._cond.wait()
                if self.linger > 0 and not self._closed and not self._flushing:
                    self._cond.wait(self.linger)  # notified early by flush() or close()
                lines = list(self._lines)
                self._lines.clear()
                dropped, self._unreported = self._unreported, 0
                done = self._closed
                self._writing = bool(lines or dropped)
            if dropped:
                lines.append(self._dropped_line(dropped))
            if lines:
                text = "\n".join(lines) + "\n"
                if "\u2028" in text or "\u2029" in text:
                    text = _escape_line_separators(text)
                try:
                    self.stream.write(text)
                    self.stream.flush()
                except Exception:  # noqa: BLE001 - nowhere left to report it; keep the thread
                    pass
            with self._cond:
                self._writing = False
                self._cond.notify_all()
                if done and not self._lines:
                    return

    def _dropped_line(self, count: int) -> str:
        record = logging.LogRecord(
            "rtserver.logs", logging.WARNING, __file__, 0,
            f"{count} log lines dropped: stderr did not keep up", None, None,
        )
        record.fields = {"dropped": count}
        try:
            return self.format(record)
        except Exception:  # noqa: BLE001
            return f"{count} log lines dropped: stderr did not keep up"


def _escape_line_separators(text: str) -> str:
    """U+2028 and U+2029 as JSON escapes. JSON holds them raw (msgspec writes them so), but
    readers that split on Unicode line ends (str.splitlines(), JavaScript tooling) cut a line
    there: a value a token carries (a subject) made one record two lines that are not JSON.
    They occur only inside JSON strings, where the escape reads back as the same character."""
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def setup(level: str = "info") -> None:
    handler = LineWriter(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, LineWriter):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Without Kafka the audit records (INFO on rtserver.audit) are the audit trail itself, not
    # diagnostics: kept at any log level (RT_LOG_LEVEL=warning silenced the trail while the
    # audit status counted them delivered). Its operational child follows the level set.
    logging.getLogger("rtserver.audit").setLevel(min(logging.INFO, root.level))
    logging.getLogger("rtserver.audit.kafka").setLevel(root.level)
    # picows logs every connection at INFO; that is noise at our fan-out.
    logging.getLogger("picows").setLevel(logging.WARNING)
    # aiokafka logs an ERROR every few seconds while a broker is down; the audit reports
    # delivery trouble itself on rtserver.audit.kafka.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    # Library warnings (warnings.warn) and uncaught exceptions become log lines too: stderr
    # stays one JSON object a line.
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    # What Python reports but does not raise (an exception in a __del__ or a gc callback, an
    # error at a generator's close) and a thread's uncaught exception: plain-text tracebacks
    # on stderr otherwise.
    sys.unraisablehook = _log_unraisable
    threading.excepthook = _log_thread_uncaught


def _log_unraisable(unraisable: Any) -> None:
    where = unraisable.err_msg or "Exception ignored in"
    logging.getLogger("rtserver").error(
        "%s: %r", where, unraisable.object,
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
        if unraisable.exc_value is not None else None,
    )


def _log_thread_uncaught(args: Any) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("rtserver").critical(
        "uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("rtserver").critical("uncaught exception", exc_info=(kind, exc, tb))
    flush()


def flush() -> None:
    """Wait until the lines logged so far are written (before printing to stderr directly)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
