"""Plain HTTP on a raw socket for tests that pipeline publish requests: the request bytes, and
reading one answer back."""

from __future__ import annotations

import asyncio
import json
from typing import Any


def post_request(path: str, token: str, payload: Any) -> bytes:
    """A keep-alive POST of `payload` as JSON to `path`, with a bearer token."""
    body = json.dumps(payload).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def read_answer(reader: asyncio.StreamReader, timeout: float = 10) -> tuple[int, bytes, bytes]:
    """(status, head, body) of the next response on `reader`."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return int(head.split()[1]), head, await asyncio.wait_for(reader.readexactly(length), timeout)
