"""A thin test client over the `websockets` library (a real third-party client)."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed


class Client:
    def __init__(self, ws: websockets.ClientConnection):
        self.ws = ws

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, dict):
            message = json.dumps(message)
        await self.ws.send(message)

    async def recv(self, timeout: float = 5) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        return json.loads(raw)

    async def recv_type(self, type_: str, timeout: float = 5) -> dict[str, Any]:
        """The next message of `type_`; fails on any other message type in between."""
        msg = await self.recv(timeout)
        assert msg.get("type") == type_, msg
        return msg

    async def recv_event(self, timeout: float = 5) -> dict[str, Any]:
        return await self.recv_type("event", timeout)

    async def auth(self, token: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "auth", "token": token, **extra})
        return await self.recv_type("auth_ok")

    async def subscribe(self, channel: str, filter: dict | None = None, **extra: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "subscribe", "channel": channel, **extra}
        if filter is not None:
            msg["filter"] = filter
        await self.send(msg)
        return await self.recv_type("subscribed")

    async def expect_close(self, timeout: float = 5) -> tuple[int, str]:
        """Read until the server closes; returns (code, reason)."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), timeout)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            assert rcvd is not None, "closed without a close frame"
            return rcvd.code, rcvd.reason

    async def no_message(self, within: float = 0.3) -> None:
        try:
            msg = await asyncio.wait_for(self.ws.recv(), within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message {msg!r}")

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code


@asynccontextmanager
async def ws_connect(gw: Any, workspace: str = "w1", token: str | None = None, header_auth: bool = False,
                     **kwargs: Any):
    headers = {}
    if header_auth and token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with websockets.connect(gw.ws_url(workspace), additional_headers=headers, max_size=None,
                                  open_timeout=10, **kwargs) as ws:
        client = Client(ws)
        if token is not None and not header_auth:
            await client.auth(token)
        yield client


async def subscribed_clients(stack: Any, gw: Any, count: int, channel: str, workspace: str = "w1") -> list[Client]:
    """`count` authenticated clients of `workspace`, each subscribed to `channel`, closed by
    `stack` (a contextlib.AsyncExitStack)."""
    clients = []
    for _ in range(count):
        c = await stack.enter_async_context(ws_connect(gw, workspace, token=gw.token(workspace)))
        await c.subscribe(channel)
        clients.append(c)
    return clients
