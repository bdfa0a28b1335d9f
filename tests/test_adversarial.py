"""A hostile or buggy client on real sockets against `rtserver serve`: HTTP framing and header
shapes, WebSocket handshake and frame shapes, and values that flow into frames and logs."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct

from tests.harness.http_wire import read_answer
from tests.harness.wsclient import ws_connect


def _masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame (masked, as RFC 6455 §5.3 requires), built by hand: the frames under test
    break the rules a client library enforces."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _upgrade_request(workspace: str = "w1", extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /workspaces/{workspace}/realtime/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


async def _read_to_eof(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    out = b""
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), timeout)
        if not chunk:
            return out
        out += chunk


async def _until_closed(gateway, request: bytes) -> bytes:
    """All the gateway writes in answer to `request`, sent on a connection of its own, until it
    closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(request)
        return await _read_to_eof(reader)
    finally:
        writer.close()


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked server frame in `data`."""
    frames = []
    while data:
        opcode, n, at = data[0] & 0x0F, data[1] & 0x7F, 2
        if n == 126:
            n, at = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, at = struct.unpack("!Q", data[2:10])[0], 10
        frames.append((opcode, data[at:at + n]))
        data = data[at + n:]
    return frames


async def _upgrade_frames(gateway, request: bytes, then: bytes = b"") -> tuple[bytes, list[tuple[int, bytes]]]:
    """The answer's head and the server's frames of an upgrade, `then` sent once it is answered,
    until the gateway closes the connection (or 3 s of silence)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.write(then)
        data = b""
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 3)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
        return head, _server_frames(data)
    finally:
        writer.close()


async def test_a_long_authorization_header_or_query_still_gets_the_upgrade(gateway):
    """§1: the upgrade completes whatever the token, so the client can read a close code. picows
    drops a request head of 16 KiB or more without a word, and the front handed it the
    Authorization field and the query: a header token that long (a valid one just under the
    16 KiB token bound among them) got no 101, no close code, nothing. A Bearer field without
    a token waited for an auth message, and closed with "auth timeout" 10 s later."""
    long_valid = gateway.token("w1", pad="p" * 12100)
    assert 16300 < len(long_valid) <= 16384
    head, frames = await _upgrade_frames(gateway, _upgrade_request(extra=f"Authorization: Bearer {long_valid}\r\n"))
    assert head.startswith(b"HTTP/1.1 101"), head
    assert json.loads(frames[0][1])["type"] == "auth_ok", frames
    head, frames = await _upgrade_frames(gateway, _upgrade_request(extra=f"Authorization: Bearer {'a' * 30000}\r\n"))
    assert head.startswith(b"HTTP/1.1 101"), head
    error = json.loads(frames[0][1])
    assert error["code"] == 4002 and "longer than 16384 bytes" in error["message"], error
    assert frames[1][0] == 0x8 and struct.unpack("!H", frames[1][1][:2])[0] == 4002, frames
    for field in ("Authorization: Bearer\r\n", "Authorization: bearer  \r\n"):
        # A token getter that returned nothing: refused at once, not after the auth timeout.
        head, frames = await _upgrade_frames(gateway, _upgrade_request(extra=field))
        error = json.loads(frames[0][1])
        assert error["code"] == 4002 and "token missing" in error["message"], (field, error)
        assert frames[1][0] == 0x8 and struct.unpack("!H", frames[1][1][:2])[0] == 4002, frames
    request = _upgrade_request().replace(b"/connect ", b"/connect?x=" + b"q" * 20000 + b" ")
    auth = json.dumps({"type": "auth", "token": gateway.token("w1")}).encode()
    head, frames = await _upgrade_frames(gateway, request, _masked(0x1, auth))
    assert head.startswith(b"HTTP/1.1 101"), head
    assert json.loads(frames[0][1])["type"] == "auth_ok", frames


async def test_no_data_frame_follows_the_close_frame_of_a_protocol_error(gateway):
    """A frame breaking RFC 6455 (here a ping of 126 bytes, §5.5) right behind the auth
    message: picows sends its close 1002 and drops the connection 10 ms later. The gateway
    writes its frames to the socket itself, and went on meanwhile: auth_ok (and any event of
    that window) followed the close frame, which §5.5.1 forbids (MUST NOT)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(_upgrade_request())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        auth = json.dumps({"type": "auth", "token": gateway.token("w1")}).encode()
        writer.write(_masked(0x1, auth) + _masked(0x9, b"x" * 126))
        frames = _server_frames(await _read_to_eof(reader))
    finally:
        writer.close()
    opcodes = [op for op, _ in frames]
    assert 0x8 in opcodes, frames
    close = opcodes.index(0x8)
    assert struct.unpack("!H", frames[close][1][:2])[0] == 1002, frames
    assert opcodes[close + 1:] == [], f"frames after the close frame: {frames[close + 1:]}"


async def _answer(gateway, request: bytes) -> tuple[int, bytes, bytes]:
    """(status, head, body) of the answer to `request`, sent on a connection of its own."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(request)
        if request.startswith(b"GET "):  # an upgrade may be answered 101, without a length
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if not head.startswith(b"HTTP/1.1 101 "):
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                return int(head.split()[1]), head, await asyncio.wait_for(reader.readexactly(length), 10)
            return 101, head, b""
        return await read_answer(reader)
    finally:
        writer.close()


async def test_a_field_sent_twice_that_must_be_single_is_refused(gateway):
    """Authorization, Host, X-Correlation-ID, Sec-WebSocket-Key and -Version take one value;
    a request repeating one of them is not a valid request (RFC 9110 §5.3; RFC 9112 §3.2: 400
    for two Host lines, MUST; RFC 6455 §11.3.1: the key MUST NOT appear twice). The last line
    won: a publish with a rejected token and then a valid one was accepted (a proxy checking
    the first line and the gateway the last do not see the same request), and an upgrade
    with two keys was answered for one of them."""
    token = gateway.token("w1", publish=True)
    path = "/workspaces/w1/realtime/events/dup"
    cases = {
        "Authorization": f"Authorization: Bearer not-a-token\r\nAuthorization: Bearer {token}\r\n",
        "Host": f"Host: y\r\nAuthorization: Bearer {token}\r\n",
        "X-Correlation-ID": f"Authorization: Bearer {token}\r\nX-Correlation-ID: a\r\nX-Correlation-ID: b\r\n",
    }
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as watcher:
        await watcher.subscribe("events:dup")
        for name, fields in cases.items():
            request = f"POST {path} HTTP/1.1\r\nHost: x\r\n{fields}Content-Length: 2\r\n\r\n{{}}".encode()
            status, _, body = await _answer(gateway, request)
            assert status == 400, (name, status, body)
            assert name.lower() in json.loads(body)["error"].lower(), (name, body)
        await watcher.no_message(0.5)  # nothing was published
    for fields in (f"Authorization: Bearer x\r\nAuthorization: Bearer {token}\r\n",
                   "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n", "Sec-WebSocket-Version: 13\r\n"):
        status, _, body = await _answer(gateway, _upgrade_request(extra=fields))
        assert status == 400, (fields, status, body)
    assert '"level":"error"' not in gateway.logs()


async def test_an_http_1_1_request_without_host_is_refused(gateway):
    """RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host field.
    It was served (a publish accepted, an upgrade completed); HTTP/1.0 has no such field."""
    token = gateway.token("w1", publish=True)
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as watcher:
        await watcher.subscribe("events:nohost")
        status, _, body = await _answer(gateway, (
            f"POST /workspaces/w1/realtime/events/nohost HTTP/1.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: 2\r\n\r\n{{}}").encode())
        assert status == 400 and b"Host" in body, (status, body)
        await watcher.no_message(0.5)
    status, _, body = await _answer(gateway, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert status == 400 and b"Host" in body, (status, body)
    status, _, body = await _answer(gateway, _upgrade_request().replace(b"Host: x\r\n", b""))
    assert status == 400 and b"Host" in body, (status, body)
    status, _, body = await _answer(gateway, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status == 200, (status, body)


async def test_a_request_of_another_http_version_is_refused_505(gateway):
    """The parser takes request lines of HTTP/2.0 and HTTP/0.9 too; they were answered as
    HTTP/1.1 requests (HTTP/2's prior-knowledge preface got 400 'malformed HTTP request'). RFC 9110 §15.6.6: 505,
    naming the version spoken. Nothing of such a request is handled: no event is published."""
    token = gateway.token("w1", publish=True)
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as watcher:
        await watcher.subscribe("events:v2")
        for version in ("2.0", "0.9"):
            status, _, body = await _answer(gateway, (
                f"POST /workspaces/w1/realtime/events/v2 HTTP/{version}\r\nHost: x\r\n"
                f"Authorization: Bearer {token}\r\nContent-Length: 2\r\n\r\n{{}}").encode())
            assert status == 505 and f"HTTP/{version} is not supported".encode() in body, (version, status, body)
        await watcher.no_message(0.5)
    data = await _until_closed(gateway, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # curl --http2-prior-knowledge
    assert data.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), data
    status, _, body = await _answer(gateway, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200, (status, body)


async def test_an_unknown_method_is_not_implemented_501(gateway):
    """A well-formed request with a method the server does not know (a `post` in lower case, a
    made-up one) got 400 "malformed HTTP request", which points the client at its syntax.
    RFC 9110 §9.1: 501 (SHOULD), naming the method. A request line that is no request stays a
    400, and so does an unknown method behind a request answered in the same read."""
    token = gateway.token("w1", publish=True)
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as watcher:
        await watcher.subscribe("events:m")
        for method in ("post", "FOO", "Get"):
            data = await _until_closed(gateway, (
                f"{method} /workspaces/w1/realtime/events/m HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {token}\r\nContent-Length: 2\r\n\r\n{{}}").encode())
            assert data.startswith(b"HTTP/1.1 501 Not Implemented\r\n"), (method, data)
            error = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
            assert error.startswith(f"method {method} is not implemented") and "case-sensitive" in error, error
        await watcher.no_message(0.5)
    data = await _until_closed(gateway, b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 ") and b"malformed HTTP request" in data, data
    data = await _until_closed(gateway, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nFOO / HTTP/1.1\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 400 " in data and b" 501 " not in data, data


async def test_no_100_continue_to_an_http_1_0_request(gateway):
    """RFC 9110 §10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0
    request (1xx answers do not exist in HTTP/1.0). A 100 Continue was sent before the 202,
    which an HTTP/1.0 client reads as its answer."""
    token = gateway.token("w1", publish=True)
    data = await _until_closed(gateway, (f"POST /workspaces/w1/realtime/events/old HTTP/1.0\r\n"
                                         f"Authorization: Bearer {token}\r\n"
                                         f"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n{{}}").encode())
    assert data.startswith(b"HTTP/1.1 202 "), data
    assert b" 100 " not in data, data


async def test_a_transfer_coding_other_than_chunked_is_not_implemented(gateway):
    """`Transfer-Encoding: gzip, chunked` (or over two lines): the gateway decodes no coding
    but chunked, yet took the body as if it were plain and published it (a real gzip body was
    refused as bad JSON, a plain one accepted as what the client said was compressed). RFC 9112
    §6.1: 501 for a transfer coding the server does not understand (SHOULD)."""
    token = gateway.token("w1", publish=True)
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as watcher:
        await watcher.subscribe("events:te")
        for te in ("Transfer-Encoding: gzip, chunked\r\n", "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"):
            status, _, body = await _answer(gateway, (
                f"POST /workspaces/w1/realtime/events/te HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"{te}\r\n2\r\n{{}}\r\n0\r\n\r\n").encode())
            assert status == 501 and b"gzip" in body, (te, status, body)
        await watcher.no_message(0.5)
        status, _, body = await _answer(gateway, (
            f"POST /workspaces/w1/realtime/events/te HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n").encode())
        assert status == 202, (status, body)
        assert (await watcher.recv_event())["payload"] == {}


async def test_an_upgrade_for_another_websocket_version_gets_426_naming_13(gateway):
    """RFC 6455 §4.2.2 and §4.4: a handshake for a version the server does not speak MUST be
    refused (426) with `Sec-WebSocket-Version` naming the ones it does. Version 8 (a 2011
    draft) was upgraded (picows takes 7, 8 and 13), and a missing version got a 400 naming
    none, so a client could not tell what to send."""
    for version in ("Sec-WebSocket-Version: 8\r\n", "Sec-WebSocket-Version: 14\r\n", ""):
        request = _upgrade_request().replace(b"Sec-WebSocket-Version: 13\r\n", version.encode())
        status, head, body = await _answer(gateway, request)
        assert status == 426, (version, status, head, body)
        assert b"\r\nSec-WebSocket-Version: 13\r\n" in head, head
        error = json.loads(body)["error"]  # says what came, not a Python repr of it ('8', None)
        assert ("'" not in error and "None" not in error and (version.split(": ")[-1].strip() or "no Sec-") in error), error
    status, _, _ = await _answer(gateway, b"GET /workspaces/w1/realtime/connect HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 426  # a plain GET of the connect path, as before


async def test_every_refused_upgrade_is_answered_in_json_saying_why(gateway):
    """A WebSocket upgrade that picows refused got its text/plain answer: a Python repr
    ("Handshake error, invalid key: None", "Unsupported HTTP method: b'POST'") or "404 Not
    Found" for a path that is no endpoint, where every other refusal is JSON {"error": ...}.
    They are refused before the hand-off now, as the rest, and the connection closes."""
    cases = (
        (_rekeyed(_upgrade_request(), b""), 400, "Sec-WebSocket-Key"),
        (_rekeyed(_upgrade_request(), b"Sec-WebSocket-Key: not base64!\r\n"), 400, "Sec-WebSocket-Key"),
        (_rekeyed(_upgrade_request(), b"Sec-WebSocket-Key: c2hvcnQ=\r\n"), 400, "Sec-WebSocket-Key"),  # 5 bytes
        (_upgrade_request().replace(b"GET ", b"POST ", 1), 400, "GET"),
        (_upgrade_request(extra="Content-Length: 2\r\n") + b"{}", 400, "no body"),
        (_upgrade_request().replace(b"/workspaces/w1/realtime/connect", b"/other", 1), 404, "/other"),
        (_upgrade_request("a.b"), 404, "/workspaces/a.b/realtime/connect"),
    )
    for request, status, named in cases:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            body = await _read_to_eof(reader)  # and the connection closes after it
        finally:
            writer.close()
        assert int(head.split()[1]) == status, (request, head, body)
        assert b"\r\nContent-Type: application/json\r\n" in head, (request, head)
        error = json.loads(body)["error"]
        assert named in error and "b'" not in error, (request, error)
    assert '"level":"error"' not in gateway.logs()


def _rekeyed(request: bytes, line: bytes) -> bytes:
    """`request` with `line` in place of its Sec-WebSocket-Key line."""
    start = request.index(b"Sec-WebSocket-Key: ")
    end = request.index(b"\r\n", start) + 2
    return request[:start] + line + request[end:]


async def test_an_upgrade_in_absolute_form_connects(gateway):
    """RFC 9112 §3.2.2: a server MUST accept a request target in absolute form (as sent to a
    proxy). The publish API and the other endpoints did; an upgrade so addressed was handed to
    picows as it came, which read the whole URL as the path: 404."""
    request = _upgrade_request(extra=f"Authorization: Bearer {gateway.token('w1')}\r\n").replace(
        b"GET /workspaces/", b"GET http://x/workspaces/", 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head
        first, size = await asyncio.wait_for(reader.readexactly(2), 10)
        assert first == 0x81 and size < 126, (first, size)  # one unmasked text frame: auth_ok
        assert json.loads(await asyncio.wait_for(reader.readexactly(size), 10))["type"] == "auth_ok"
    finally:
        writer.close()


async def test_an_http_1_0_upgrade_is_served_as_a_plain_request(gateway):
    """RFC 9110 §7.8: an Upgrade field in an HTTP/1.0 request MUST be ignored. picows refused
    it with "Unsupported HTTP version: b'HTTP/1.0'" (text/plain); it is now the request it is
    without the field: the connect path's 426, and /healthz's 200."""
    request = _upgrade_request().replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    status, head, body = await _answer(gateway, request)
    assert status == 426 and b"\r\nUpgrade: websocket\r\n" in head, (status, head, body)
    assert json.loads(body)["error"]
    status, _, body = await _answer(gateway, request.replace(b"/workspaces/w1/realtime/connect", b"/healthz", 1))
    assert status == 200, (status, body)


async def test_a_subject_with_unicode_line_separators_keeps_one_log_object_a_line(gateway):
    """A token's `sub` (set by the identity provider, from a user name on some setups) holding
    U+2028 or U+2029 went into the audit log lines as it was: valid JSON, but a line break for
    readers that split on Unicode line ends (Python's str.splitlines(), which these tests use
    on the log, JavaScript tooling), so one record read as two lines that are not JSON. They are
    written escaped (\\u2028), as JSON allows: the value read back is the same."""
    subject = "eve\u2028{\"forged\":true}\u2029x"
    async with ws_connect(gateway, "w1", token=gateway.token("w1", sub=subject)):
        pass
    records = await gateway.audit_records("session-suspended")
    assert records and records[0]["subject"] == subject
    for line in gateway.logs().splitlines():
        assert isinstance(json.loads(line), dict), line


async def test_an_http_1_0_request_with_transfer_encoding_ends_its_connection(gateway):
    """RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding MUST be treated as having
    faulty framing, and the connection closed after it (an HTTP/1.0 intermediary does not
    know chunked, and may frame the bytes differently: request smuggling). With
    `Connection: keep-alive` the connection stayed open and the bytes after the chunked body
    were read as a request of their own."""
    token = gateway.token("w1", publish=True)
    data = await _until_closed(gateway, (
        f"POST /workspaces/w1/realtime/events/te10 HTTP/1.0\r\nConnection: keep-alive\r\n"
        f"Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
        f"GET /healthz HTTP/1.0\r\n\r\n").encode())
    assert data.startswith(b"HTTP/1.1 202 ") and b"\r\nConnection: close\r\n" in data, data
    assert data.count(b"HTTP/1.1 ") == 1, data  # the bytes after it were not taken for a request
