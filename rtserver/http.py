"""The one listening port: plain HTTP (publish API, health, metrics) and the WebSocket upgrade.

picows parses only GET requests without a body, so every connection starts with `FrontProtocol`,
which parses HTTP with httptools. A WebSocket upgrade is handed, as a request head rebuilt from
what was parsed and the bytes read after it, to a picows `WSProtocol` on the same transport; from then on the connection is pure picows and the
WebSocket hot path does not pass through this module. Everything else is answered here, with
keep-alive, so a publisher can reuse its connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httptools
import msgspec
from picows import WSAutoPingStrategy
from picows.picows import WSProtocol

from rtserver.config import WORKSPACE_ID_RE
from rtserver.eager import start_now

if TYPE_CHECKING:
    from rtserver.app import Gateway

log = logging.getLogger("rtserver.http")

# The head of a request (request line and headers) may take this many bytes; beyond: 431.
MAX_HEAD_BYTES = 64 * 1024
# After refusing a request over its limits, how long the rest of it is read and dropped.
_LINGER_SECONDS = 2.0

CONNECT_RE = re.compile(r"^/workspaces/([^/]+)/realtime/connect/?$")
# The topic may be empty here: the publish API refuses it as malformed (400), not as unknown.
# Without the topic's segment (group 2 None): a batch of events, its topics in the body.
PUBLISH_RE = re.compile(r"^/workspaces/([^/]+)/realtime/events(?:/([^/]*)/?)?$")

# The start of HTTP/2's connection preface (RFC 9113 §3.4), which the parser refuses as malformed.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n"

_REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_json = msgspec.json.Encoder()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Requests of one connection parsed and not yet answered before it stops being read.
_MAX_PIPELINED = 64


# Response heads up to the Content-Length value, by (status, content type, keep-alive, Allow).
_HEADS: dict[tuple[int, str, bool, str | None], bytes] = {}


def host_port(peer: Any) -> str:
    """A socket's peer address as `host:port` for logs and audit records; an IPv6 host in
    brackets (`[::1]:51234`), as in a URL, for `::1:51234` cannot be split back."""
    if not peer:
        return ""
    host = peer[0]
    return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"


def _target_path(url: bytes) -> str:
    """The path of a request target. One in absolute form (as sent to a proxy) may have none,
    `http://h`, which means `/` (RFC 9112 3.2.2): httptools gives None for it, and the handler
    failed on that outside its error handling (no answer, an ERROR traceback in the log for
    each such request anyone sent). HttpParserInvalidURLError for a target it cannot read."""
    return (httptools.parse_url(url).path or b"/").decode("latin-1")


def http_response(
    status: int, body: bytes, content_type: str = "application/json", keep_alive: bool = True, allow: str | None = None
) -> bytes:
    """A response; `allow`: the methods the resource takes, which a 405 names (RFC 9110
    §15.5.6 MUST)."""
    key = (status, content_type, keep_alive, allow)
    head = _HEADS.get(key)
    if head is None:
        # A 401 carries its challenge (RFC 9110 §15.5.2 MUST, RFC 6750 §3): clients that act
        # on it failed on a 401 without one instead of reporting the refused token.
        challenge = "WWW-Authenticate: Bearer\r\n" if status == 401 else ""
        if allow is not None:
            challenge += f"Allow: {allow}\r\n"
        connection = "keep-alive" if keep_alive else "close"
        if status == 426:
            # The protocol to upgrade to, and the `upgrade` option that must go with it (RFC 9110
            # §15.5.22, §7.8): a 426 naming none left the client to guess.
            challenge += "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"  # the one spoken (RFC 6455 §4.4)
            connection = f"Upgrade, {connection}"
        head = _HEADS[key] = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Type: {content_type}\r\n{challenge}"
            f"Connection: {connection}\r\nContent-Length: "
        ).encode()
    return b"%s%d\r\n\r\n%s" % (head, len(body), body)


def for_method(method: bytes, response: bytes) -> bytes:
    """`response` as the answer to `method`: a HEAD gets the head alone, its Content-Length
    the body's (RFC 9110 §9.3.2), whatever the status. Only the GET endpoints' answers left out
    their body: a 405 for a publish URL kept it, and a keep-alive client read it as the start of
    its next answer."""
    if method != b"HEAD":
        return response
    return response[: response.index(b"\r\n\r\n") + 4]


def json_error(status: int, message: str, keep_alive: bool = True) -> bytes:
    return http_response(status, _json.encode({"error": message}), keep_alive=keep_alive)


# The request headers something here reads (the publish API: authorization, the correlation id;
# the WebSocket handshake: _upgrade), by lower-case name: only these are decoded and kept; a
# client's other headers cost a lookup.
# The fields of the request rebuilt for picows. Not Authorization: the token goes to the
# listener beside it (Gateway.upgrading_token), as the workspace does. picows drops, without a
# word, a request head of 16 KiB or more, and a token that long (a token with many roles)
# got no 101, no close code, nothing (§1: the upgrade completes, then 4002 says why).
_UPGRADE_HEADERS = ("upgrade", "sec-websocket-key", "sec-websocket-version")
_READ_HEADERS = {
    name.encode(): name
    for name in ("content-length", "transfer-encoding", "expect", "x-correlation-id", "host", "authorization",
                 *_UPGRADE_HEADERS)
}
# Fields that take one value, as spelled in a refusal: a request repeating one is invalid (RFC
# 9110 §5.3, RFC 9112 §3.2, RFC 6455 §11.3.1). Keeping the last line let a request carry a
# token a proxy checked and another one the gateway used.
_SINGLE_HEADERS = {name.lower(): name for name in (
    "Authorization", "Host", "X-Correlation-ID", "Sec-WebSocket-Key", "Sec-WebSocket-Version")}


class _Request:
    __slots__ = ("url", "headers", "body", "size", "head", "canned", "version", "workspace")

    def __init__(self) -> None:
        self.url = b""
        self.head = 0  # bytes of the request line and headers parsed so far (MAX_HEAD_BYTES)
        self.headers: dict[str, str] = {}
        # The first piece the parser hands over as it is (most bodies come in one: no copy), the
        # rest in one buffer: not a list of pieces, since a chunked body comes in as many
        # pieces as it has chunks, and 256 KiB sent in 2-byte chunks, kept as one bytes object
        # each, held ~7 MB (27 times what limits.max_publish_bytes and
        # limits.pipelined_publish_bytes count).
        self.body: bytes | bytearray = b""
        self.size = 0
        # Not a request: an answer queued behind those of the requests before it (a refusal,
        # a 100 Continue), and whether the connection closes after it.
        self.canned: tuple[bytes, bool] | None = None
        self.version = ""  # "1.0", "1.1", read once the head is complete
        self.workspace = ""  # a WebSocket upgrade's, once _check_handshake has read its path


class PipelinedBytes:
    """The bytes of the requests queued on all HTTP connections of the node (parsed behind one
    that waits, not handled yet), and the connections not read because of them.

    Each connection queues at most _MAX_PIPELINED requests, bodies and all (up to
    limits.max_publish_bytes each): without a bound for the node, its connections together held
    as much as they sent. Past `bound`, a connection that queues one more stops being read, as
    does one that queues while others wait (in turn: none is left out while others publish);
    once the total is back under half of it, every such connection reads again. Requests
    already queued go on meanwhile: only the reading stops, so nothing waits on a paused read."""

    __slots__ = ("held", "bound", "low", "waiting")

    def __init__(self, bound: int) -> None:
        self.held = 0
        self.bound = bound
        self.low = bound // 2
        # Paused for the bound, in the order they paused (a dict: an ordered set).
        self.waiting: dict[FrontProtocol, None] = {}

    def give_back(self, size: int) -> None:
        """`size` bytes of queued requests handled or dropped: under the low-water mark, the
        waiting connections read again."""
        self.held -= size
        if self.waiting and self.held <= self.low:
            waiting, self.waiting = self.waiting, {}
            for proto in waiting:
                proto._node_resumed()


def _has_body(req: _Request) -> bool:
    return bool(req.headers.get("transfer-encoding") or req.headers.get("content-length", "0").strip(" \t0"))


def _valid_key(key: str | None) -> bool:
    """Whether a Sec-WebSocket-Key is the base64 of 16 bytes (RFC 6455 §4.1), as picows checks it."""
    if not key:
        return False
    try:
        return len(base64.b64decode(key.strip(" \t").encode("ascii"), validate=True)) == 16
    except (UnicodeEncodeError, binascii.Error):
        return False


class _Refused(Exception):
    """A request refused (over its size limits, malformed): answered (status, message), and
    nothing more is read."""


class FrontProtocol(asyncio.Protocol):
    """Reads the first request of a connection and routes it (see module docstring)."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        # Bytes of the request head being read (over MAX_HEAD_BYTES: 431).
        self._head_bytes = 0
        self._req: _Request | None = None
        self._handed_off = False
        # Requests parsed while an earlier one waits, answered in order by the _drainer task
        # (created then: a deque is ~600 bytes, and most connections become WebSockets).
        self._queue: deque[tuple[bytes, _Request, bool]] | None = None
        # Bytes of those requests (bodies and heads), counted in gw.pipelined too.
        self._queued_bytes = 0
        # Not read because the node's queued requests are over their bound (in gw.pipelined.waiting).
        self._node_paused = False
        self._drainer: asyncio.Task | None = None
        # Answers not written yet because one before them waits for the bus to confirm its
        # event (Kafka): (a future of (status, body), or the response's bytes; close after it).
        # Requests behind such a publish are handled meanwhile, their answers queued here.
        self._answers: deque[tuple[asyncio.Future[tuple[int, bytes]] | bytes, bool]] | None = None
        self._paused = False
        # The transport's write buffer is over its high-water mark: the peer does not read its
        # answers, so its requests are not read either (pause_writing).
        self._write_blocked = False
        self._closing = False
        self._header_name = b""
        # Responses of the requests answered while data_received runs: one write for all of
        # them when it returns (None outside data_received: a response is written at once).
        self._held: list[bytes] | None = None
        self._close_after = False
        self._max_body = gw.cfg.limits.max_publish_bytes
        # The last publish URL of this connection, and its path and route match.
        self._publish_url: bytes | None = None
        self._publish_route: tuple[str, tuple[str, str | None]] | None = None  # path, (workspace, topic)
        self._peer: str | None = None
        self._in_body = False  # the current request's headers are complete
        self._linger = False  # closing after a refusal (_refuse): see _close
        # A connection silent for limits.idle_timeout with no request of its own waiting is
        # closed (one timer, re-armed lazily from the time of the last read).
        self._idle_timeout = gw.cfg.limits.idle_timeout
        self._last_rx = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        # A request must arrive within limits.request_timeout of its first byte: without a
        # deadline, a peer sending a byte of its head (or body) now and then held the
        # connection for ever (slowloris), as idle_timeout only counts silence.
        self._request_timeout = gw.cfg.limits.request_timeout
        self._req_started = 0.0
        self._request_timer: asyncio.TimerHandle | None = None
        self._counted = False  # in gw.http_sockets

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        gw = self.gw
        if gw.http_sockets + len(gw.connections) + gw.closing_sockets >= gw.max_client_sockets:
            self._refuse_socket(transport)  # type: ignore[arg-type]
            return
        gw.http_sockets += 1
        self._counted = True
        loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        self._idle_timer = loop.call_later(self._idle_timeout, self._check_idle)

    def _refuse_socket(self, transport: asyncio.Transport) -> None:
        """503 and close, nothing read: the node holds as many client sockets as it may."""
        self.gw.metrics.connections_refused += 1
        self._closing = True
        self._parser = None
        transport.write(json_error(
            503, f"this node holds its limit of {self.gw.max_client_sockets} client sockets; try another node",
            keep_alive=False))
        transport.close()

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._handed_off or self._parser is None or self._closing:
            return
        loop = asyncio.get_running_loop()
        left = self._last_rx + self._idle_timeout - loop.time()
        # A request of its own is waiting, or the node does not read it (PipelinedBytes): not idle.
        if left > 0 or self._drainer is not None or self._answers or self._node_paused:
            self._idle_timer = loop.call_later(max(left, 1.0), self._check_idle)
            return
        self._closing = True
        t = self.transport
        if t is not None:
            # Answers it never read would hold a closing transport open for good.
            if t.get_write_buffer_size():
                t.abort()
            else:
                t.close()

    def _check_request(self) -> None:
        self._request_timer = None
        if self._handed_off or self._parser is None or self._closing or self._req is None:
            return  # no request being read: the next one arms the timer again
        loop = asyncio.get_running_loop()
        if self._paused:
            # Reading stopped on our side (requests waiting for the fan-out): not the client's
            # delay; it gets the whole timeout again once reading resumes.
            self._req_started = loop.time()
        deadline = self._req_started + self._request_timeout
        if loop.time() < deadline:
            self._request_timer = loop.call_at(deadline, self._check_request)
            return
        self._refuse(408, f"request not received in full within {self._request_timeout:g} s")

    def data_received(self, data: bytes) -> None:
        if self._handed_off or self._parser is None or self._closing:
            return
        self._last_rx = asyncio.get_running_loop().time()
        if not self._in_body or self._req is None:
            self._head_bytes += len(data)
        at_boundary = self._req is None  # this read starts a request: its method is data's first token
        # A publisher pipelining requests gets the answers to all those in this read in one
        # write: one system call (and one wake-up of the publisher) instead of one per event.
        self._held = []
        try:
            while True:
                try:
                    self._parser.feed_data(data)
                except httptools.HttpParserUpgrade as exc:
                    if not self._in_body:
                        raise  # to a WebSocket (on_headers_complete)
                    # To another protocol: answered as a plain request already, but a parser
                    # goes no further than an upgrade: what follows goes to a new one.
                    # A view: no copy of the rest per request (a read may hold thousands).
                    data = memoryview(data)[exc.args[0]:]  # type: ignore[assignment]
                    self._parser = httptools.HttpRequestParser(self)
                    if data and not self._closing:
                        continue
                break
            # Bounded: a request in progress holds no more than its head's limit (here) and its
            # body's (on_headers_complete, on_body).
            if self._req is not None and not self._in_body and self._head_bytes > MAX_HEAD_BYTES:
                raise _Refused(431, f"request head exceeds {MAX_HEAD_BYTES} bytes")
        except _Refused as exc:
            self._refuse(*exc.args)
        except httptools.HttpParserUpgrade as exc:
            if self._drainer is not None or self._answers:
                # The WebSocket would take the transport before their answers are written.
                self._refuse(400, "WebSocket upgrade pipelined behind requests not answered yet")
            elif (refusal := self.gw.upgrade_refusal()) is not None:
                self._refuse(*refusal)
            else:
                self._write_held()
                self._upgrade(data[exc.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Refused):
                raise
            self._refuse(*exc.__context__.args)
        except httptools.HttpParserError:
            if bytes(data[:len(_H2_PREFACE)]) == _H2_PREFACE:  # curl --http2-prior-knowledge, h2c clients
                self._respond(json_error(505, "HTTP/2.0 is not supported: send HTTP/1.1", keep_alive=False),
                              close=True)
            elif at_boundary and (method := _unknown_method(data)) is not None:
                # RFC 9110 §9.1: an unrecognized method SHOULD get 501 (a `post` was "malformed").
                self._respond(json_error(501, f"method {method} is not implemented: GET, HEAD and POST are "
                                              "(methods are case-sensitive)", keep_alive=False), close=True)
            else:
                self._respond(json_error(400, "malformed HTTP request", keep_alive=False), close=True)
        finally:
            self._write_held()

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` after the answers of the requests before it, then close; nothing
        more of this connection is read or buffered."""
        if self._req is not None and self._is_publish(self._req):
            # Refused before it was read in full (413, 408): counted as the answered ones are.
            self.gw.metrics.publish_requests[status] += 1
        self._req = None
        self._linger = True
        if self._answer_in_turn(json_error(status, message, keep_alive=False), close=True):
            self._closing_read()

    def _is_publish(self, req: _Request) -> bool:
        """Whether the request being read is one to the publish API."""
        try:
            if self._parser is None or self._parser.get_method() != b"POST":
                return False
            return PUBLISH_RE.match(_target_path(req.url)) is not None
        except httptools.HttpParserInvalidURLError:
            return False

    def _answer_in_turn(self, answer: bytes, close: bool) -> bool:
        """Answer `answer` after the answers of the requests before it: now (_respond keeps it
        behind those waiting for the bus), or queued behind the requests waiting for the
        drainer (True)."""
        if self._drainer is None:
            self._respond(answer, close)
            return False
        canned = _Request()
        canned.canned = (answer, close)
        if self._queue is None:
            self._queue = deque()
        self._queue.append((b"", canned, False))
        return True

    def _closing_read(self) -> None:
        """Stop reading (and parsing) for good; queued answers still leave."""
        self._parser = None
        self._pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_node_wait()
        self._drop_queue()
        self._answers = None  # their events are published all the same; nobody to tell
        if self._drainer is not None:
            self._drainer.cancel()
        self._release()

    def _release(self) -> None:
        self._leave_node_wait()
        # The parser holds bound methods of this protocol: without this, protocol, parser and
        # transport of every finished connection would wait for the cyclic garbage collector.
        self._parser = None
        self.transport = None
        if self._counted:  # handed to a WebSocket (counted in gw.connections from here), or gone
            self._counted = False
            self.gw.http_sockets -= 1
        if self._idle_timer is not None:  # it holds this protocol too
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        self._req = _Request()
        self._in_body = False
        # One timer per connection, re-armed lazily (_check_request), not one per request: a
        # publisher sends thousands a second on one connection.
        loop = asyncio.get_running_loop()
        self._req_started = loop.time()
        if self._request_timer is None:
            self._request_timer = loop.call_at(self._req_started + self._request_timeout, self._check_request)

    def on_url(self, url: bytes) -> None:
        assert self._req is not None
        self._req.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._req is not None
        if not self._in_body:
            self._count_head(len(name) + len(value) + 4)  # "name: value\r\n"
        key = _READ_HEADERS.get(name.lower())
        # Not the trailer fields after a chunked body: HTTP forbids merging them into the
        # head (they replaced the Authorization or X-Correlation-ID a proxy checked there).
        if key is not None and not self._in_body:
            headers = self._req.headers
            if key in headers:
                if key in _SINGLE_HEADERS:
                    raise _Refused(400, f"the {_SINGLE_HEADERS[key]} header field may appear once; it came twice")
                if key == "transfer-encoding":  # a list: each line's codings count (on_headers_complete)
                    headers[key] += ", " + value.decode("latin-1")
                    return
            headers[key] = value.decode("latin-1")

    def _count_head(self, size: int) -> None:
        """431 for a head over MAX_HEAD_BYTES as parsed. data_received bounds what a head not
        yet complete buffers, read by read; a head that arrived whole in one read, or
        completed in the read that passed the limit, went through it (up to twice the limit)."""
        req = self._req
        assert req is not None
        req.head += size
        if req.head > MAX_HEAD_BYTES:
            raise _Refused(431, f"request head exceeds {MAX_HEAD_BYTES} bytes")

    def on_headers_complete(self) -> None:
        req = self._req
        assert req is not None
        req.version = version = self._parser.get_http_version()
        if version != "1.1" and version != "1.0":
            # The parser takes HTTP/2.0 and 0.9 in a request line, and both were answered as
            # HTTP/1.1 requests: HTTP/2 is not spoken here (its preface, PRI * HTTP/2.0, the
            # parser refuses: data_received answers it 505), and 0.9 has no version to send
            # (RFC 9110 §15.6.6: 505).
            raise _Refused(505, f"HTTP/{version} is not supported: send HTTP/1.1")
        if "host" not in req.headers and version == "1.1":
            # RFC 9112 §3.2 (MUST): such a request was served, an upgrade completed.
            raise _Refused(400, "an HTTP/1.1 request must carry a Host header field")
        if self._parser.should_upgrade():
            if req.headers.get("upgrade", "").lower() == "websocket" and version == "1.1":
                self._check_handshake(req)
                return  # handled by HttpParserUpgrade in data_received
            # An upgrade to another protocol (h2c: curl --http2) is ignored, as a server may:
            # the request is served as it is (it went to picows: 404, 400). So is one in an
            # HTTP/1.0 request (RFC 9110 §7.8, MUST): the connect path answers it 426. The
            # parser leaves the body of such a request unread: it would be read as the next one.
            if _has_body(req):
                raise _Refused(400, "a request with a body may not ask for an Upgrade")
        coding = req.headers.get("transfer-encoding")
        if coding is not None and coding.strip(" \t").lower() != "chunked":
            # The parser checks that chunked comes last, and dechunks; no other coding is
            # decoded: a body sent gzip, chunked was taken as plain (RFC 9112 §6.1: 501).
            raise _Refused(501, f"Transfer-Encoding {coding!r}: only chunked is supported")
        self._in_body = True
        self._head_bytes = 0
        # The parser checked the value (digits, one length) but keeps the whitespace allowed
        # after it: "1000000000 " waited for its gigabyte and got its 100 Continue.
        length = req.headers.get("content-length")
        if length is not None and (length := length.rstrip(" \t")).isdigit() and int(length) > self._max_body:
            # Answered now, not after a body that may never end; the connection closes.
            raise _Refused(413, f"payload exceeds {self._max_body} bytes")
        elif req.headers.get("expect", "").lower() == "100-continue" and version != "1.0":
            # curl sends this for bodies over 1 KiB and would otherwise wait a second for it.
            # After the answers of the requests before it: with one of them waiting, it was
            # written at once, and read as an interim answer to that one. Not to HTTP/1.0,
            # which has no 1xx answers (RFC 9110 §10.1.1: ignored, MUST).
            self._answer_in_turn(_CONTINUE, close=False)

    def _check_handshake(self, req: _Request) -> None:
        """Refuse, as every other request is refused (JSON, a status that says why), a WebSocket
        upgrade that picows would refuse with a text of its own (a Python repr, text/plain).
        Whether the node takes it now (503) is asked at the hand-off (data_received)."""
        assert self._parser is not None
        try:
            target = httptools.parse_url(req.url)
        except httptools.HttpParserInvalidURLError:
            raise _Refused(400, "malformed URL") from None
        raw_path = target.path or b"/"
        path = raw_path.decode("latin-1")
        # picows reads the target it is handed as a path: one in absolute form (RFC 9112
        # §3.2.2, MUST be accepted) was a 404 there.
        req.url = raw_path + (b"?" + target.query if target.query else b"")
        method = self._parser.get_method().decode()
        workspace = parse_connect_path(path)
        if workspace is None:
            raise _Refused(404, f"no such endpoint: {method} {path} (WebSocket connections go to "
                                "/workspaces/{workspaceId}/realtime/connect)")
        if method != "GET":  # RFC 6455 §4.1: MUST be GET
            raise _Refused(400, f"a WebSocket upgrade is a GET request, not {method}")
        version = req.headers.get("sec-websocket-version", "").strip(" \t")
        if version != "13":
            # picows upgraded drafts 7 and 8 too, and refused a missing version with a
            # 400 naming none (RFC 6455 §4.2.2: 426 naming the versions spoken, MUST).
            said = f"WebSocket version {version} is not supported" if version else "no Sec-WebSocket-Version"
            raise _Refused(426, f"{said}: send Sec-WebSocket-Version: 13")
        if _has_body(req):
            raise _Refused(400, "a WebSocket upgrade request has no body")
        if not _valid_key(req.headers.get("sec-websocket-key")):
            raise _Refused(400, "Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455 §4.1)")
        req.workspace = workspace

    def on_body(self, body: bytes) -> None:
        req = self._req
        assert req is not None
        req.size += len(body)
        if req.size > self._max_body:  # a chunked body, its length not announced
            raise _Refused(413, f"payload exceeds {self._max_body} bytes")
        if not req.body:
            req.body = body
        elif type(req.body) is bytes:
            req.body = bytearray(req.body) + body
        else:
            req.body += body

    def on_message_complete(self) -> None:
        if not self._in_body:
            return  # a WebSocket upgrade (on_headers_complete), handed off in data_received
        req = self._req
        self._req = None
        if req is None or self._closing:
            return
        method = self._parser.get_method()
        keep_alive = self._parser.should_keep_alive()
        if keep_alive and "transfer-encoding" in req.headers and req.version == "1.0":
            # HTTP/1.0 knows no chunked: an intermediary of that version may frame these bytes
            # otherwise (smuggling). RFC 9112 §6.1: faulty framing, close after it (MUST).
            keep_alive = False
        # Pipelined requests are handled one after the other: their events get seq in request
        # order and the responses leave in that order, even when one waits (a JWKS fetch, the
        # fan-out back-pressure). A request runs at once unless an earlier one is waiting: its
        # response leaves before the loop moves on. (A task per request waited a loop iteration,
        # with a chunk of fan-out writes in it, before the request was even read, which held a
        # publisher with few requests in flight to a fraction of what the hub could take.)
        if self._drainer is not None:
            if self._queue is None:
                self._queue = deque()
            self._queue.append((method, req, keep_alive))
            size = req.size + req.head
            self._queued_bytes += size
            pipelined = self.gw.pipelined
            pipelined.held += size
            # Over the bound, or others wait for it: in turn (a connection whose requests kept
            # the total between half and the bound held one paused first out for good).
            if pipelined.held > pipelined.bound or pipelined.waiting:
                self._wait_for_node()
            if len(self._queue) >= _MAX_PIPELINED:
                self._pause_reading()
            return
        waiting = start_now(self._handle(method, req, keep_alive))
        if waiting is not None:
            self._drainer = asyncio.ensure_future(self._drain(waiting))

    async def _drain(self, first: asyncio.Task) -> None:
        """Finish the request that had to wait, then the ones queued behind it, in order."""
        waiting: asyncio.Task | None = first
        try:
            await first
            queue = self._queue or deque()
            while queue and not self._closing:
                waiting = self._answer_queued(queue)
                if waiting is not None:
                    await waiting
            self._drop_queue()  # closing: what came after a Connection: close is not answered
        finally:
            if self._drainer is asyncio.current_task():
                self._drainer = None
            if waiting is not None and not waiting.done():
                waiting.cancel()
        self._resume_reading()

    def _answer_queued(self, queue: deque[tuple[bytes, _Request, bool]]) -> asyncio.Task | None:
        """Run queued requests until one has to wait, and return its task. The answers of those
        before it leave in one write, as in data_received: at saturation, when every publisher
        waits for room, a write (and a wake-up of the publisher) per answer would cost the
        fan-out the core time it is short of."""
        self._held = []
        try:
            while queue and not self._closing:
                if len(queue) <= _MAX_PIPELINED // 2:
                    self._resume_reading()
                method, req, keep_alive = queue.popleft()
                size = req.size + req.head
                self._queued_bytes -= size
                self.gw.pipelined.give_back(size)
                waiting = start_now(self._handle(method, req, keep_alive))
                if waiting is not None:
                    return waiting
            return None
        finally:
            self._write_held()

    def _drop_queue(self) -> None:
        """Drop the requests queued (the connection is gone, or closes after an earlier one),
        giving their bytes back to the node."""
        if self._queue:
            self._queue.clear()
        if self._queued_bytes:
            size, self._queued_bytes = self._queued_bytes, 0
            self.gw.pipelined.give_back(size)

    def _wait_for_node(self) -> None:
        """The node's queued requests are over their bound: read nothing more of this connection
        until they are back under half of it (PipelinedBytes); its own queue goes on."""
        if not self._node_paused and not self._handed_off:
            self._node_paused = True
            self.gw.pipelined.waiting[self] = None
            self._pause_reading()

    def _node_resumed(self) -> None:
        """Out of gw.pipelined.waiting: read again, unless paused for reasons of its own."""
        self._node_paused = False
        # The time not read was the node's doing, not the client's: its timeouts start anew.
        self._last_rx = self._req_started = asyncio.get_running_loop().time()
        self._resume_reading()

    def _leave_node_wait(self) -> None:
        if self._node_paused:
            self._node_paused = False
            self.gw.pipelined.waiting.pop(self, None)

    def pause_writing(self) -> None:
        """The answers are not read: stop reading requests (each would add an answer to the
        buffer, without bound) until they are; one that never reads is closed as idle."""
        self._write_blocked = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._paused and not self._handed_off and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True

    def _resume_reading(self) -> None:
        """Read again, unless the answers are not being read (pause_writing), or requests or
        answers still wait beyond half of _MAX_PIPELINED, or the node's queued requests are over
        their bound (_wait_for_node); once no request is to be read any more (closing), reading
        goes on regardless and what arrives is dropped."""
        half = _MAX_PIPELINED // 2
        if self._parser is not None and not self._closing and (
                self._node_paused or self._write_blocked or len(self._queue or ()) > half
                or len(self._answers or ()) > half):
            return
        self._leave_node_wait()
        if self._paused:
            self._paused = False
            t = self.transport
            if t is not None and not t.is_closing():
                t.resume_reading()

    # -- routing --
    async def _handle(self, method: bytes, req: _Request, keep_alive: bool) -> None:
        if req.canned is not None:  # queued behind earlier requests (_answer_in_turn)
            self._respond(*req.canned)
            return
        # A draining gateway closes each connection after its answer: the peer's next request
        # connects anew, to a node that serves (the listener is closed already).
        keep_alive = keep_alive and not self.gw.draining
        route: tuple[str, str | None] | None
        if method == b"POST" and req.url == self._publish_url:
            # A publisher posts to the same URL request after request: parsed once.
            path, route = self._publish_route
            m = None  # POST: the route says it all
        else:
            try:
                path = _target_path(req.url)
            except httptools.HttpParserInvalidURLError:
                self._respond(for_method(method, json_error(400, "malformed URL", keep_alive)), close=not keep_alive)
                return
            m = PUBLISH_RE.match(path)
            route = None
            if m is not None and method == b"POST":
                # Segments are percent-decoded after the split (a client's encodeURIComponent
                # turns the topic "orders:eu" into "orders%3Aeu"; an encoded "/" stays inside
                # its segment, where the topic check refuses it).
                topic = m.group(2)
                route = (unquote(m.group(1), errors="replace"),
                         None if topic is None else unquote(topic, errors="replace"))
                self._publish_url, self._publish_route = req.url, (path, route)
        try:
            if route is not None:  # POST of a publish URL
                answer = await self.gw.publish_http(route[0], route[1], req.headers, bytes(req.body) if type(req.body) is bytearray else req.body,
                                                     self._remote())
                if type(answer) is not tuple:
                    self._respond_later(answer, keep_alive)
                    return
                response = http_response(answer[0], answer[1], keep_alive=keep_alive)
            elif method in (b"GET", b"HEAD") and m is None:
                status, ctype, body = self.gw.http_get(path)
                response = http_response(status, body, ctype, keep_alive)
            else:
                response = self._not_served(method, path, m is not None, keep_alive)
        except Exception:
            log.exception("HTTP request failed", extra={"fields": {"path": path, "method": method.decode()}})
            response = json_error(500, "internal error", keep_alive=False)
            keep_alive = False
        self._respond(for_method(method, response), close=not keep_alive)

    def _not_served(self, method: bytes, path: str, publish: bool, keep_alive: bool) -> bytes:
        """The answer to a method an endpoint does not take: 405 naming those it takes (a
        publish URL POST, the others GET and HEAD), or 404 for a path that is no endpoint,
        whatever the method (§1: any other path is a 404). A POST of /metrics was "no such
        endpoint", a DELETE of a path that is none a 405."""
        name = method.decode()
        if not publish and not self.gw.serves(path):
            return json_error(404, f"no such endpoint: {name} {path}", keep_alive)
        # A publish URL takes POST only (a GET of it was a 404, as for no endpoint).
        only = ": POST publishes" if publish else ""
        if publish:  # a publisher using the wrong method shows in /metrics, as a 401 does
            self.gw.metrics.publish_requests[405] += 1
        return http_response(405, _json.encode({"error": f"method {name} not allowed{only}"}), keep_alive=keep_alive,
                             allow="POST" if publish else "GET, HEAD")

    def _respond(self, data: bytes, close: bool) -> None:
        t = self.transport
        if t is None or t.is_closing() or self._close_after:
            return
        if self._answers:  # after those still waiting for the bus
            self._answers.append((data, close))
            if close:
                self._closing = True
            elif len(self._answers) >= _MAX_PIPELINED:
                # Held as those of publishes are: a client sending cheap requests (a GET, a
                # refused publish) behind one unconfirmed publish was read without end, each
                # answer kept until the bus confirmed it.
                self._pause_reading()
            return
        if self._held is not None:
            self._held.append(data)
            if close:
                self._closing = True
                self._close_after = True
            return
        t.write(data)
        if close:
            self._closing = True
            self._close(t)

    def _respond_later(self, answer: asyncio.Future[tuple[int, bytes]], keep_alive: bool) -> None:
        """Answer once `answer` is known, after the answers before it; the requests behind it
        go on meanwhile. Reading pauses while _MAX_PIPELINED answers wait."""
        answers = self._answers
        if answers is None:
            answers = self._answers = deque()
        answers.append((answer, not keep_alive))
        if not keep_alive:
            self._closing = True
        answer.add_done_callback(self._answered)
        if len(answers) >= _MAX_PIPELINED:
            self._pause_reading()

    def _answered(self, _: asyncio.Future) -> None:
        """Write the answers now known from the front of the line, in one write (the bus
        confirms a batch of records at once)."""
        answers = self._answers
        t = self.transport
        if not answers or t is None:
            return
        if t.is_closing():
            answers.clear()
            return
        out = []
        close = False
        while answers and not close:
            item, close = answers[0]
            if type(item) is not bytes:
                if not item.done():
                    close = False
                    break
                status, body = item.result()
                item = http_response(status, body, keep_alive=not close)
            answers.popleft()
            out.append(item)
        if out:
            t.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            answers.clear()
            self._close(t)
        else:
            self._resume_reading()

    def _close(self, t: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        if t.get_write_buffer_size():
            # close() waits for the buffer to be written: a peer that never reads it would hold
            # the connection open for good. It gets limits.idle_timeout to read it.
            loop.call_later(self._idle_timeout, t.abort)  # no-op once the connection is gone
        if not self._linger:
            t.close()
            return
        # The client is likely still sending what was refused: closing with its bytes unread
        # would reset the connection and could destroy the answer before it is read. Send the
        # answer and FIN, discard what still comes (data_received reads nothing while closing),
        # and close after _LINGER_SECONDS. A TLS transport has no half-close (its write_eof
        # raised NotImplementedError: no answer, the connection open for good): the answer
        # alone, then the close (close_notify) after _LINGER_SECONDS.
        if t.can_write_eof():
            t.write_eof()
        self._resume_reading()
        loop.call_later(_LINGER_SECONDS, t.close)

    def _write_held(self) -> None:
        held = self._held
        if held is None:
            return
        self._held = None
        t = self.transport
        if held and t is not None and not t.is_closing():
            t.write(held[0] if len(held) == 1 else b"".join(held))
        if self._close_after:
            self._close_after = False
            if t is not None:
                self._close(t)

    def _remote(self) -> str:
        if self._peer is None:
            self._peer = host_port(self.transport.get_extra_info("peername") if self.transport else None)
        return self._peer

    def _upgrade(self, after: bytes | memoryview) -> None:
        """Hand the transport to a picows WSProtocol: the upgrade request, then `after` (what
        the client sent behind it)."""
        self._handed_off = True
        transport = self.transport
        req = self._req
        assert transport is not None and req is not None and self._parser is not None
        # The head is rebuilt from what was parsed, not passed on as read: the bytes read of
        # a request sent behind others were dropped with theirs (the upgrade was never
        # answered), and picows wants "Connection" to be exactly "upgrade" where Firefox sends
        # "keep-alive, Upgrade" (should_upgrade() saw the upgrade option in it).
        # The path without its query (nothing reads it), which could take the head past
        # picows's 16 KiB as a long token did: the path itself is a connect path, ~200 bytes.
        head = [b"%s %s HTTP/%s\r\nConnection: Upgrade\r\n" % (
            self._parser.get_method(), req.url.partition(b"?")[0], req.version.encode())]
        for name in _UPGRADE_HEADERS:
            value = req.headers.get(name)
            if value is not None:
                head.append(b"%s: %s\r\n" % (name.encode(), value.encode("latin-1")))
        head.append(b"\r\n")
        if self._paused:  # the answers before the upgrade filled the write buffer (pause_writing)
            self._paused = False
            transport.resume_reading()  # picows has its own flow control from here on
        ws_proto = self.gw.new_ws_protocol({"remote": self._remote(), "workspace": req.workspace})
        transport.set_protocol(ws_proto)
        ws_proto.connection_made(transport)
        view = memoryview(b"".join(head) + after)
        # picows calls the listener factory synchronously while parsing these bytes; that is
        # where the connection learns its peer address and workspace.
        self.gw.upgrading_remote = self._remote()
        self.gw.upgrading_workspace = req.workspace
        self.gw.upgrading_token = _upgrade_token(req.headers)
        while view:
            buf = ws_proto.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            ws_proto.buffer_updated(n)
        self.gw.upgrading_remote = self.gw.upgrading_workspace = ""
        self.gw.upgrading_token = None
        self._release()


_MIN_READ = 512  # below this, the whole free part: the frame in progress needs it (picows grows then)


class _HalfReadWSProtocol(WSProtocol):
    """picows's protocol, offered at most half of its free read buffer per read.

    picows doubles its read buffer whenever one read fills it past 90%, and never shrinks it:
    a client that sent a burst once (its backlog filling each read) left its connection holding
    a buffer the size of the burst for good (a 135 KB burst: 128 KiB kept, measured). Offered
    half, a read never fills it: the buffer grows only for a frame larger than the part of it
    that is free (bounded by the frame size picows accepts), as it must."""

    def get_buffer(self, size_hint: int) -> memoryview:
        buf = WSProtocol.get_buffer(self, size_hint)
        half = len(buf) >> 1
        return buf[:half] if half >= _MIN_READ else buf

    def buffer_updated(self, nbytes: int) -> None:
        WSProtocol.buffer_updated(self, nbytes)
        # A frame breaking RFC 6455 in this read: picows sent its close frame and drops the
        # connection 10 ms later. The gateway writes its frames to the socket itself, past
        # picows's own check: auth_ok and events followed the close frame (§5.5.1: MUST NOT).
        if self.transport.is_close_frame_sent:
            closed = getattr(self.listener, "close_after_layer", None)
            if closed is not None:
                closed()


class _PeerLog(logging.LoggerAdapter):
    """picows's log of one connection, its lines carrying the client's address and workspace.

    picows refuses a frame that breaks RFC 6455 (unmasked, a bad close code, larger than it
    reads) before the gateway sees it, and logs that at ERROR: the client's doing, which any
    client could repeat at will before authenticating. It is logged as the gateway's own
    protocol errors are (Connection._protocol_error): INFO, "websocket protocol error"."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = self.extra
        return msg, kwargs

    protocol: weakref.ref[WSProtocol] | None = None  # the connection's, once made

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if level == logging.ERROR and msg == _PICOWS_PARSER_ERROR and args and isinstance(args[0], tuple):
            detail = args[0][-1] if args[0] else ""  # WSProtocolError's args: (close code, why)
            _ws_log.info("websocket protocol error", extra={"fields": {**self.extra["fields"], "detail": str(detail)}})
            if args[0]:
                self._refused(args[0][0], str(detail))
            return
        super().log(level, msg, *args, **kwargs)

    def _refused(self, code: Any, detail: str) -> None:
        """picows refused a frame and is about to close with its own words as the reason
        ("Received frame with payload size exceeding ..."): the listener closes first, as the
        gateway closes (the code's name as the reason, and for 1009 the 4000 saying why)."""
        protocol = self.protocol() if self.protocol is not None else None
        refused = getattr(getattr(protocol, "listener", None), "layer_refused_frame", None)
        if refused is not None:
            size = _FRAME_SIZE_RE.search(detail)
            refused(int(code), int(size.group(1)) if size else None)


_FRAME_SIZE_RE = re.compile(r"(\d+) > \d+$")  # the end of picows's words: "<frame size> > <its limit>"


_PICOWS_PARSER_ERROR = "WS parser error: %s, initiate disconnect"
_picows_log = logging.getLogger("picows.server")
_ws_log = logging.getLogger("rtserver.connection")


def new_ws_protocol(gw: Gateway, fields: dict[str, Any]) -> WSProtocol:
    """The WebSocket protocol of one upgrade; `fields` (remote, workspace) go into its log lines."""
    limits = gw.cfg.limits
    peer_log = _PeerLog(_picows_log, {"fields": fields})
    protocol = _HalfReadWSProtocol(
        None,
        None,
        False,
        gw.ws_listener_factory,
        peer_log,
        True,  # disconnect on exception
        5.0,  # handshake timeout
        False,  # auto ping: our sweeper pings idle peers (one timer for all connections)
        20.0,
        20.0,
        WSAutoPingStrategy.PING_WHEN_IDLE,
        True,  # auto pong
        # Frames up to this size are read so we can answer an oversized message with 4000 + 1009;
        # a larger one is refused unread, with the same answer (_PeerLog._refused).
        max(limits.max_message_bytes * 4, 1 << 20),
        None,
        # Client messages are small; the buffer grows when one is not. 2 KiB instead of
        # picows' 16 KiB default halves the memory of an idle connection (measured).
        2048,
    )
    peer_log.protocol = weakref.ref(protocol)  # weak: no cycle for the collector to find
    return protocol


# A request line (RFC 9112 §3): a method token (RFC 9110 §5.6.2), a target, the version.
_REQUEST_LINE_RE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}) [^ \x00-\x1f\x7f]+ HTTP/[0-9]\.[0-9]\r?\n")


def _unknown_method(data: bytes) -> str | None:
    """The method of the request line `data` starts with, when the line is well formed and the
    parser knows no method by that name (501, not 400: the request is not malformed)."""
    m = _REQUEST_LINE_RE.match(bytes(data[:8192]))
    if m is None:
        return None
    try:
        httptools.HttpRequestParser(_NoCallbacks()).feed_data(m.group(1) + b" / HTTP/1.1\r\n")
    except httptools.HttpParserInvalidMethodError:
        return m.group(1).decode("ascii")
    except httptools.HttpParserError:
        pass
    return None


class _NoCallbacks:
    """A parser's protocol that listens to nothing."""


def parse_connect_path(path: str) -> str | None:
    """The workspace id of a connect path, or None (404). Percent-decoded after the split, as
    the publish API's segments are: `w%31` is `w1` (RFC 3986 §6.2.2.2), and was a 404 here
    while a publish to it reached `w1`; a decoded `/` or newline fails the id check."""
    m = CONNECT_RE.match(path)
    if m is None:
        return None
    workspace = unquote(m.group(1), errors="replace")
    return workspace if WORKSPACE_ID_RE.match(workspace) else None


def _upgrade_token(headers: dict[str, str]) -> str | None:
    """An upgrade's header token; "" for a Bearer field with no token in it, which is refused
    at once (4002 "token missing"): it waited for the auth message for auth_timeout, then
    closed with "auth timeout", when the client's token getter had returned nothing. None
    (the auth message is awaited) without the field, or with another scheme, which may be a
    proxy's."""
    token = bearer(headers)
    if token is None and headers.get("authorization", "").partition(" ")[0].lower() == "bearer":
        return ""
    return token


def bearer(headers: Any) -> str | None:
    value = headers.get("authorization") if headers is not None else None
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()

