"""Baseline: a bare picows server that writes each pre-encoded frame to every subscriber.

No coalescing, no index, no history: one `write` of the same bytes per delivery, the floor the
issue measured (about 377k deliveries/s on this machine). Run by the harness as
`python -m benchmarks.fanout.baseline_picows PORT PUBLISH_PORT SECRET`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

from benchmarks.fanout.baseline_common import Envelope, PublishProtocol, check_token, group_of
from benchmarks.fanout.loadgen import raise_nofile
from benchmarks.fanout.wire import server_text_frame


class Server:
    def __init__(self, secret: str):
        self.secret = secret
        self.all: set = set()
        self.groups: dict[int, set] = {}
        self.env = Envelope()

    def publish(self, payload: bytes) -> None:
        frame = server_text_frame(self.env.body(payload))
        g = group_of(payload)
        targets = self.all if g is None or not self.groups else self.groups.get(g, ())
        for raw in targets:
            raw.write(frame)


class Client(WSListener):
    def __init__(self, server: Server):
        self.server = server
        self.raw = None
        self.authed = False
        self.group: int | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.raw = transport.underlying_transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            if frame.msg_type == WSMsgType.CLOSE:
                transport.disconnect()
            return
        msg = json.loads(frame.get_payload_as_bytes())
        srv = self.server
        if msg.get("type") == "auth":
            if not check_token(msg.get("token", ""), srv.secret):
                transport.send_close(4002)
                transport.disconnect()
                return
            self.authed = True
            self.raw.write(server_text_frame(b'{"type":"auth_ok"}'))
        elif msg.get("type") == "subscribe" and self.authed:
            srv.all.add(self.raw)
            if "g" in msg:
                self.group = int(msg["g"])
                srv.groups.setdefault(self.group, set()).add(self.raw)
            self.raw.write(server_text_frame(b'{"type":"subscribed"}'))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.server.all.discard(self.raw)
        if self.group is not None:
            members = self.server.groups.get(self.group)
            if members is not None:
                members.discard(self.raw)
                if not members:
                    del self.server.groups[self.group]


async def main(port: int, publish_port: int, secret: str) -> None:
    srv = Server(secret)
    # The gateway's connections run on uvloop transports; so do the baseline's (picows would
    # otherwise pick aiofastnet when it is installed). FANOUT_AIOFASTNET=1 to compare.
    fast = os.environ.get("FANOUT_AIOFASTNET") == "1"
    # picows's default first read buffer is 16 KiB per connection: most of an idle
    # connection's memory. FANOUT_PICOWS_READ_BUFFER overrides it (bytes) to compare.
    read_buffer = int(os.environ.get("FANOUT_PICOWS_READ_BUFFER", 16 * 1024))
    ws = await ws_create_server(lambda _req: Client(srv), "127.0.0.1", port, backlog=4096, use_aiofastnet=fast,
                                read_buffer_init_size=read_buffer)
    loop = asyncio.get_running_loop()
    pub = await loop.create_server(lambda: PublishProtocol(srv.publish), "127.0.0.1", publish_port)
    async with ws, pub:
        await asyncio.Event().wait()


if __name__ == "__main__":
    raise_nofile()
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
