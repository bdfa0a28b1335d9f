"""What both baseline servers share: token check, the event envelope, the publish listener.

The baselines are the floor a user would write by hand: every event is wrapped in the same
envelope the gateway sends (so frames are the same size), encoded once, and written to every
subscriber; a subscriber may name a group `g` (the filtered scenario), kept in a dict. Tokens
are checked with PyJWT (HS256) so the connection-storm figures compare like with like.
Publishes arrive on a second port as newline-separated JSON payloads; each is acknowledged with
one line when it is read, before its fan-out (as the gateway answers 202 before its frames
leave).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

import jwt

from rtcore.timefmt import iso_ms

_HEAD = b'{"type":"event","channel":"events:bench","operation":"PUBLISH","topic":"bench","payload":'


class Envelope:
    """The gateway's event envelope with values of the same length: a correlation id made of a
    random 16-hex-digit prefix and a hex counter from 1 (rtserver/app.py), and a position that
    starts at the wall clock in microseconds and counts events (rtserver/history.py). The
    frames are then the same size byte for byte, which matters beyond the copying: a Linux
    subscriber that has received more than 536 bytes since its last ACK (two frames of over
    268 bytes) ACKs at once, and on loopback that ACK is made and taken in the writer's system
    call (benchmarks/README-fanout.md, "Frame size")."""

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(8).encode()
        self.n = 0
        self.first_seq = time.time_ns() // 1000

    def body(self, payload: bytes) -> bytes:
        self.n += 1
        return b'%s%s,"timestamp":"%s","correlationId":"%s-%x","seq":%d}' % (
            _HEAD, payload, iso_ms(time.time_ns() // 1_000_000).encode(), self.prefix, self.n,
            self.first_seq + self.n)


def group_of(payload: bytes) -> int | None:
    pos = payload.find(b'"g":')
    if pos < 0:
        return None
    end = payload.find(b",", pos)
    return int(payload[pos + 4:end])


def check_token(token: str, secret: str) -> bool:
    try:
        jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp"]})
    except jwt.PyJWTError:
        return False
    return True


class PublishProtocol(asyncio.Protocol):
    """Newline-separated payloads in, one acknowledgement line out per payload."""

    def __init__(self, on_event: Callable[[bytes], None]):
        self.on_event = on_event
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        lines = buf.split(b"\n")
        self.buf = lines.pop()
        events = [ln for ln in lines if ln]
        if events:
            # Acknowledge first, as the gateway does (its 202 leaves before the frames do):
            # the publisher's next event is then already waiting when this fan-out ends.
            self.transport.write(b"+\n" * len(events))
        for line in events:
            self.on_event(line)
