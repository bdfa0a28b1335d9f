"""Baseline: a minimal `websockets` server using the library's `broadcast()`.

What a user would write with the most common Python WebSocket library. Run by the harness as
`python -m benchmarks.fanout.baseline_websockets PORT PUBLISH_PORT SECRET`.
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvloop
from websockets.asyncio.server import broadcast, serve

from benchmarks.fanout.baseline_common import Envelope, PublishProtocol, check_token, group_of
from benchmarks.fanout.loadgen import raise_nofile


class Server:
    def __init__(self, secret: str):
        self.secret = secret
        self.all: set = set()
        self.groups: dict[int, set] = {}
        self.env = Envelope()

    def publish(self, payload: bytes) -> None:
        body = self.env.body(payload).decode()
        g = group_of(payload)
        targets = self.all if g is None or not self.groups else self.groups.get(g, ())
        broadcast(targets, body)

    async def handler(self, ws) -> None:
        group = None
        try:
            async for message in ws:
                msg = json.loads(message)
                if msg.get("type") == "auth":
                    if not check_token(msg.get("token", ""), self.secret):
                        await ws.close(4002)
                        return
                    await ws.send('{"type":"auth_ok"}')
                elif msg.get("type") == "subscribe":
                    self.all.add(ws)
                    if "g" in msg:
                        group = int(msg["g"])
                        self.groups.setdefault(group, set()).add(ws)
                    await ws.send('{"type":"subscribed"}')
        finally:
            self.all.discard(ws)
            members = self.groups.get(group) if group is not None else None
            if members is not None:
                members.discard(ws)
                if not members:
                    del self.groups[group]


async def main(port: int, publish_port: int, secret: str) -> None:
    srv = Server(secret)
    loop = asyncio.get_running_loop()
    pub = await loop.create_server(lambda: PublishProtocol(srv.publish), "127.0.0.1", publish_port)
    async with serve(srv.handler, "127.0.0.1", port, backlog=4096, compression=None, ping_interval=None,
                     max_queue=None):
        async with pub:
            await asyncio.Event().wait()


if __name__ == "__main__":
    raise_nofile()
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
