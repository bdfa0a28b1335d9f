"""Pure-Python reference of WebSocket frame building (server to client, unmasked).

The compiled `rtcore.frames` must produce byte-identical output; tests compare the two.
"""

from __future__ import annotations

import struct


def text_frame(payload: bytes) -> bytes:
    """A complete, final, unmasked text frame carrying `payload`."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + struct.pack("!H", n) + payload
    return b"\x81\x7f" + struct.pack("!Q", n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with `code` and a UTF-8 `reason` (truncated to fit 125 bytes)."""
    data = struct.pack("!H", code) + reason.encode()[:123]
    return bytes((0x88, len(data))) + data


def with_seq(body: bytes, seq: int, extra: bytes = b"") -> bytes:
    """Splice `extra` members and `"seq": seq` into the encoded JSON object `body`."""
    return b"%b%b,\"seq\":%d}" % (body[:-1], extra, seq)


def event_frame(body: bytes, seq: int, extra: bytes = b"") -> bytes:
    """The complete WebSocket frame of an event body at position `seq`."""
    return text_frame(with_seq(body, seq, extra))


def json_tokens(body: bytes) -> int:
    """How many `,` `:` and `[` the JSON `body` holds: what the objects it decodes to weigh
    grows with (rtserver.history.retained_size)."""
    return body.count(b",") + body.count(b":") + body.count(b"[")
