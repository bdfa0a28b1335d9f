"""The one listening port: plain HTTP (publish API, health, metrics) and the WebSocket upgrade.

picows parses only GET requests without a body, so every connection starts with `FrontProtocol`,
which parses HTTP with httptools. A WebSocket upgrade is handed, with the bytes read so far, to a
picows `WSProtocol` on the same transport; from then on the connection is pure picows and the
WebSocket hot path does not pass through this module. Everything else is answered here, with
keep-alive, so a publisher can reuse its connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any

import httptools
import msgspec
from picows import WSAutoPingStrategy
from picows.picows import WSProtocol

from rtserver.config import WORKSPACE_ID_RE

if TYPE_CHECKING:
    from rtserver.app import Gateway

log = logging.getLogger("rtserver.http")

CONNECT_RE = re.compile(r"^/workspaces/([^/]+)/realtime/connect/?$")
PUBLISH_RE = re.compile(r"^/workspaces/([^/]+)/realtime/events/([^/]+)/?$")

_REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    426: "Upgrade Required",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

_json = msgspec.json.Encoder()
# Requests of one connection parsed and not yet answered before it stops being read.
_MAX_PIPELINED = 64


def http_response(status: int, body: bytes, content_type: str = "application/json", keep_alive: bool = True,
                  extra: dict[str, str] | None = None) -> bytes:
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    for k, v in (extra or {}).items():
        head.append(f"{k}: {v}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def json_error(status: int, message: str, keep_alive: bool = True) -> bytes:
    return http_response(status, _json.encode({"error": message}), keep_alive=keep_alive)


class _Request:
    __slots__ = ("url", "headers", "body", "size", "too_large")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.too_large = False


class FrontProtocol(asyncio.Protocol):
    """Reads the first request of a connection and routes it (see module docstring)."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._raw = bytearray()
        self._req: _Request | None = None
        self._handed_off = False
        self._tasks: set[asyncio.Task] = set()
        self._last: asyncio.Task | None = None  # the newest request's handler (they run in order)
        self._paused = False
        self._closing = False
        self._header_name = b""

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._handed_off:
            return
        self._raw += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade()
        except httptools.HttpParserError:
            self._respond(json_error(400, "malformed HTTP request", keep_alive=False), close=True)

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self._tasks:
            task.cancel()

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        self._req = _Request()

    def on_url(self, url: bytes) -> None:
        assert self._req is not None
        self._req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._req is not None
        self._req.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        req = self._req
        assert req is not None
        if self._parser.should_upgrade():
            return  # handled by HttpParserUpgrade in data_received
        length = req.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.gw.cfg.limits.max_publish_bytes:
            req.too_large = True
        elif req.headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            # curl sends this for bodies over 1 KiB and would otherwise wait a second for it.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        req = self._req
        assert req is not None
        if req.too_large:
            return
        req.size += len(body)
        if req.size > self.gw.cfg.limits.max_publish_bytes:
            req.too_large = True
            req.body = []
        else:
            req.body.append(body)

    def on_message_complete(self) -> None:
        if self._parser.should_upgrade():
            return  # the hand-off in data_received needs every byte of this request
        req = self._req
        self._req = None
        # The bytes of completed requests are no longer needed for a possible upgrade hand-off.
        self._raw.clear()
        if req is None or self._closing:
            return
        method = self._parser.get_method()
        keep_alive = self._parser.should_keep_alive()
        # Pipelined requests are handled one after the other: their events get seq in request
        # order and the responses leave in that order, even when one waits (a JWKS fetch, the
        # fan-out back-pressure). Beyond _MAX_PIPELINED waiting, stop reading the socket.
        task = asyncio.ensure_future(self._handle_after(self._last, method, req, keep_alive))
        self._last = task
        self._tasks.add(task)
        task.add_done_callback(self._handler_done)
        if len(self._tasks) >= _MAX_PIPELINED and not self._paused and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True

    async def _handle_after(self, previous: asyncio.Task | None, method: bytes, req: _Request,
                            keep_alive: bool) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # only its end matters here, not its outcome
        await self._handle(method, req, keep_alive)

    def _handler_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if self._last is task:
            self._last = None
        t = self.transport
        if self._paused and len(self._tasks) <= _MAX_PIPELINED // 2 and t is not None and not t.is_closing():
            t.resume_reading()
            self._paused = False

    # -- routing --
    async def _handle(self, method: bytes, req: _Request, keep_alive: bool) -> None:
        try:
            path = httptools.parse_url(req.url).path.decode("latin-1")
        except httptools.HttpParserInvalidURLError:
            self._respond(json_error(400, "malformed URL", keep_alive), close=not keep_alive)
            return
        try:
            if method == b"POST":
                m = PUBLISH_RE.match(path)
                if m is None:
                    response = json_error(404, f"no such endpoint: POST {path}", keep_alive)
                elif req.too_large:
                    response = json_error(
                        413, f"payload exceeds {self.gw.cfg.limits.max_publish_bytes} bytes", keep_alive=False
                    )
                    keep_alive = False
                else:
                    status, body = await self.gw.publish_http(
                        m.group(1), m.group(2), req.headers, b"".join(req.body), self._remote()
                    )
                    response = http_response(status, body, keep_alive=keep_alive)
            elif method in (b"GET", b"HEAD"):
                status, ctype, body = self.gw.http_get(path)
                response = http_response(status, body, ctype, keep_alive)
                if method == b"HEAD":
                    response = response[: len(response) - len(body)]  # headers only, same length
            else:
                response = json_error(405, f"method {method.decode()} not allowed", keep_alive)
        except Exception:
            log.exception("HTTP request failed", extra={"fields": {"path": path, "method": method.decode()}})
            response = json_error(500, "internal error", keep_alive=False)
            keep_alive = False
        self._respond(response, close=not keep_alive)

    def _respond(self, data: bytes, close: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(data)
        if close:
            self._closing = True
            t.close()

    def _remote(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else ""

    def _upgrade(self) -> None:
        """Hand the transport and every byte read so far to a picows WSProtocol."""
        self._handed_off = True
        transport = self.transport
        assert transport is not None
        ws_proto = self.gw.new_ws_protocol()
        transport.set_protocol(ws_proto)
        ws_proto.connection_made(transport)
        data = bytes(self._raw)
        self._raw = bytearray()
        view = memoryview(data)
        # picows calls the listener factory synchronously while parsing these bytes; that is
        # where the connection learns its peer address.
        self.gw.upgrading_remote = self._remote()
        while view:
            buf = ws_proto.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            ws_proto.buffer_updated(n)
        self.gw.upgrading_remote = ""


def new_ws_protocol(gw: Gateway) -> WSProtocol:
    limits = gw.cfg.limits
    return WSProtocol(
        None,
        None,
        False,
        gw.ws_listener_factory,
        logging.getLogger("picows.server"),
        True,  # disconnect on exception
        5.0,  # handshake timeout
        False,  # auto ping: our sweeper pings idle peers (one timer for all connections)
        20.0,
        20.0,
        WSAutoPingStrategy.PING_WHEN_IDLE,
        True,  # auto pong
        # Frames up to this size are read so we can answer an oversized message with 4000 + 1009;
        # beyond it picows drops the connection.
        max(limits.max_message_bytes * 4, 1 << 20),
        None,
        # Client messages are small; the buffer grows when one is not. 2 KiB instead of
        # picows' 16 KiB default halves the memory of an idle connection (measured).
        2048,
    )


def parse_connect_path(path: str) -> str | None:
    """The workspace id of a connect path, or None (404)."""
    m = CONNECT_RE.match(path)
    if m is None or not WORKSPACE_ID_RE.match(m.group(1)):
        return None
    return m.group(1)


def bearer(headers: Any) -> str | None:
    value = headers.get("authorization") if headers is not None else None
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()

