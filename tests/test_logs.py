"""The log writer: JSON lines in order, written off the calling thread; a stderr that stops
reading neither blocks the caller nor grows memory (bounded queue, drops counted and reported)."""

from __future__ import annotations

import json
import logging
import threading

from rtserver.logs import JsonFormatter, LineWriter


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
