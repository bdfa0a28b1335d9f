"""A loopback TCP proxy whose connections a test can cut: a network loss as a client sees it,
while the gateway behind it (and its history) lives on.

`cut()` aborts every open connection; while `hold` is set, new connections are dropped at once
(the gateway looks unreachable); while `frozen` is set, open connections go half-dead: bytes are
dropped both ways (writes succeed, nothing arrives), as on a link that died without a reset;
while `paused` is set, nothing is forwarded but nothing is lost either: the proxy stops reading
both ways (and a new connection is not connected onwards), bytes wait in the buffers and TCP's
flow control pushes back on the senders, and they are all delivered, in order, once `paused` is
cleared: a network that stalls and heals, as TCP retransmission would deliver. While `answer`
is set, a new connection gets those bytes (an HTTP answer, say a load balancer's 404 during a
deploy) once its request head is in, and is closed. `upstream_delay` (seconds) holds each chunk
a client sends that long before it goes on to the target: a client frozen for a while (a
background tab) as the gateway sees it. While `linger` is set, a connection the target closes
stays open on the client's side (its last bytes delivered, the close never): a server's close
not come through yet; `target_closed` counts those. `inject(data)` hands `data` to every open
connection's client as if the target had sent it (a corrupted stream).
"""

from __future__ import annotations

import asyncio


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.hold = False
        self.frozen = False
        self.answer: bytes | None = None
        self.upstream_delay = 0.0
        self.linger = False
        self.target_closed = 0
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._clients: set[asyncio.StreamWriter] = set()  # the client side of each open connection
        self._flowing = asyncio.Event()  # cleared while paused
        self._flowing.set()

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    @paused.setter
    def paused(self, value: bool) -> None:
        if value:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def start(self, port: int = 0) -> TcpProxy:
        """Listen on 127.0.0.1:`port` (a free one by default; `port` then says which)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def inject(self, data: bytes) -> None:
        for w in self._clients & self._writers:
            w.write(data)

    async def close(self) -> None:
        self.cut()
        self.paused = False  # the pipes waiting to go on find their connections gone and end
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.hold:
            writer.transport.abort()
            return
        # Taken as the connection arrives: a test clearing `answer` while the request was read
        # made this connection write None (a garbled answer the client reported as an error).
        answer = self.answer
        if answer is not None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            writer.close()
            return
        if self.paused:
            self._writers.add(writer)  # cut() reaches it while it waits
            await self._flowing.wait()
            self._writers.discard(writer)
            if writer.transport.is_closing():
                return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        self._clients.add(writer)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, upstream=True), self._pipe(up_reader, writer))
        finally:
            self._clients.discard(writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool = False) -> None:
        lingering = False
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(65536)
                if not data:
                    if not upstream:
                        self.target_closed += 1
                        lingering = self.linger  # the client's side stays open (cut() ends it)
                    break
                if self.frozen:
                    continue
                await self._flowing.wait()  # paused while this chunk was read: it waits too
                if upstream and self.upstream_delay:
                    await asyncio.sleep(self.upstream_delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not lingering:
                self._writers.discard(writer)
                writer.transport.abort()
