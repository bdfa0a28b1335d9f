"""How the front protocol handles a connection's requests, in process with a recording
transport: a request that need not wait is answered before `data_received` returns (no task,
no loop iteration); one that waits (the fan-out back-pressure) holds the requests behind it,
which are then answered in order; reading pauses while too many are queued."""

from __future__ import annotations

import asyncio
import json
import socket

import jwt

from rtserver import config, http
from rtserver.app import Gateway
from tests.harness.http_wire import post_request, read_answer

SECRET = "pipelining-test-secret-0123456789abcdef"


class RecordingTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0
        self.paused = 0
        self.resumed = 0
        self.closed = False
        self.eof = False
        self.aborted = False
        self.unread = 0  # what get_write_buffer_size says: bytes the peer has not taken yet

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes += 1
        self.data += data

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return self.unread

    def abort(self) -> None:
        self.aborted = self.closed = True

    def can_write_eof(self) -> bool:  # a plain TCP transport's answer (a TLS one cannot half-close)
        return True

    def write_eof(self) -> None:  # a refusal's answer ends the stream, then lingers (FrontProtocol._close)
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 5555) if name == "peername" else default

    def responses(self) -> list[tuple[int, dict]]:
        out = []
        for part in bytes(self.data).split(b"HTTP/1.1 ")[1:]:
            head, _, body = part.partition(b"\r\n\r\n")
            out.append((int(head[:3]), json.loads(body)))
        return out


def make_gateway(tmp_path) -> Gateway:
    cfg = config.load(environ={"RT_AUTH_HS256_SECRET": SECRET, "RT_STATE_DIR": str(tmp_path),
                               "RT_FANOUT_BACKLOG": "10"})
    return Gateway(cfg)


def publish_request(i: int) -> bytes:
    token = jwt.encode({"sub": "svc", "workspaces": ["w1"], "realtime_publish": True, "exp": 4102444800},
                       SECRET, algorithm="HS256")
    body = json.dumps({"i": i}).encode()
    return (f"POST /workspaces/w1/realtime/events/t HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def queue_frames(hub, n: int) -> None:
    """As if workspace w1's events had `n` frames waiting for their write (over the bound of
    10 at 11: its publishers wait for room)."""
    hub._queued = n
    hub.workspace("w1").lane.queued = n


def connect(gw: Gateway) -> tuple[http.FrontProtocol, RecordingTransport]:
    proto = http.FrontProtocol(gw)
    transport = RecordingTransport()
    proto.connection_made(transport)
    return proto, transport


async def test_requests_that_need_not_wait_are_answered_within_data_received(tmp_path):
    gw = make_gateway(tmp_path)
    proto, transport = connect(gw)
    proto.data_received(b"".join(publish_request(i) for i in range(5)))
    # answered synchronously, in order, with consecutive seqs
    got = transport.responses()
    assert [status for status, _ in got] == [202] * 5
    seqs = [body["seq"] for _, body in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert proto._drainer is None
    # the five answers leave in one write
    assert transport.writes == 1
    proto.data_received(publish_request(5))
    assert transport.writes == 2 and len(transport.responses()) == 6


async def test_a_closing_request_ends_the_batch_and_later_ones_are_not_answered(tmp_path):
    gw = make_gateway(tmp_path)
    proto, transport = connect(gw)
    closing = publish_request(1).replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
    proto.data_received(publish_request(0) + closing + publish_request(2))
    got = transport.responses()
    assert [s for s, _ in got] == [202, 202]
    assert transport.writes == 1 and transport.closed
    assert b"Connection: close" in bytes(transport.data).split(b"HTTP/1.1 ")[2]
    assert [e.event.record["i"] for e in gw.hub.workspace("w1").history] == [0, 1]


async def test_a_malformed_request_after_good_ones_answers_them_then_400_and_closes(tmp_path):
    gw = make_gateway(tmp_path)
    proto, transport = connect(gw)
    proto.data_received(publish_request(0) + b"BROKEN\x00 / HTTP/9\r\n\r\n")
    got = transport.responses()
    assert [s for s, _ in got] == [202, 400]
    assert transport.writes == 1 and transport.closed


async def test_100_continue_follows_the_answers_before_it(tmp_path):
    gw = make_gateway(tmp_path)
    proto, transport = connect(gw)
    second = publish_request(1).replace(b"Host: x\r\n", b"Host: x\r\nExpect: 100-continue\r\n")
    head, _, body = second.partition(b"\r\n\r\n")
    proto.data_received(publish_request(0) + head + b"\r\n\r\n")
    data = bytes(transport.data)
    assert data.startswith(b"HTTP/1.1 202 ") and data.endswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    proto.data_received(body)
    parts = bytes(transport.data).split(b"HTTP/1.1 ")[1:]
    assert [p[:3] for p in parts] == [b"202", b"100", b"202"]


async def test_a_waiting_request_holds_the_ones_behind_it_which_follow_in_order(tmp_path):
    gw = make_gateway(tmp_path)
    hub = gw.hub
    queue_frames(hub, 11)  # over the bound of 10: publishers wait for room
    proto, transport = connect(gw)
    proto.data_received(publish_request(0) + publish_request(1))
    proto.data_received(publish_request(2))
    assert transport.responses() == [] and proto._drainer is not None
    assert len(proto._queue) == 2
    await asyncio.sleep(0.01)
    assert transport.responses() == []  # still waiting for room
    queue_frames(hub, 0)
    hub._drained.set()  # what Hub.flush does once the backlog is within its bound
    for _ in range(20):
        await asyncio.sleep(0)
        if len(transport.responses()) == 3:
            break
    got = transport.responses()
    assert [s for s, _ in got] == [202] * 3
    seqs = [b["seq"] for _, b in got]
    assert seqs == sorted(seqs)
    events = list(gw.hub.workspace("w1").history)
    assert [e.event.record["i"] for e in events] == [0, 1, 2]
    assert proto._drainer is None and not proto._queue
    # the waiting request's answer, then those of the two queued behind it in one write
    assert transport.writes == 2
    # and the next request is answered at once again
    proto.data_received(publish_request(3))
    assert len(transport.responses()) == 4


async def test_reading_pauses_while_too_many_requests_wait_and_resumes_after(tmp_path):
    gw = make_gateway(tmp_path)
    queue_frames(gw.hub, 11)
    proto, transport = connect(gw)
    proto.data_received(b"".join(publish_request(i) for i in range(http._MAX_PIPELINED + 1)))
    assert transport.paused == 1 and len(proto._queue) == http._MAX_PIPELINED
    queue_frames(gw.hub, 0)
    gw.hub._drained.set()
    for _ in range(50):
        await asyncio.sleep(0)
        if proto._drainer is None:
            break
    assert transport.resumed == 1 and not proto._paused
    assert len(transport.responses()) == http._MAX_PIPELINED + 1
    assert transport.writes == 2  # the first answer, then the queued ones together


async def test_connection_lost_cancels_the_waiting_request_and_drops_the_queue(tmp_path):
    gw = make_gateway(tmp_path)
    queue_frames(gw.hub, 11)
    proto, transport = connect(gw)
    proto.data_received(publish_request(0) + publish_request(1))
    drainer = proto._drainer
    assert drainer is not None
    proto.connection_lost(None)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert drainer.done() and not proto._queue
    assert len(gw.hub.workspace("w1").history) == 0  # nothing published after the connection went


async def test_queued_answers_leave_together_up_to_a_request_that_waits_again(tmp_path):
    gw = make_gateway(tmp_path)
    hub = gw.hub
    deliver = hub.deliver

    def deliver_then_fill(event, seq=None):
        out = deliver(event, seq)
        if event.record["i"] == 2:
            queue_frames(hub, 11)  # the backlog is over its bound again: request 3 must wait
        return out

    hub.deliver = deliver_then_fill
    queue_frames(hub, 11)
    proto, transport = connect(gw)
    proto.data_received(b"".join(publish_request(i) for i in range(5)))
    assert transport.writes == 0

    async def release(answers: int) -> None:
        queue_frames(hub, 0)
        drained, hub._drained = hub._drained, None  # as Hub.flush does
        drained.set()
        for _ in range(20):
            await asyncio.sleep(0)
            if len(transport.responses()) == answers:
                return

    await release(3)
    assert len(transport.responses()) == 3
    assert transport.writes == 2  # 0 on its own, then 1 and 2 together; 3 waits, 4 behind it
    assert [e.event.record["i"] for e in hub.workspace("w1").history] == [0, 1, 2]
    await release(5)
    got = transport.responses()
    assert [s for s, _ in got] == [202] * 5
    seqs = [b["seq"] for _, b in got]
    assert seqs == sorted(seqs)
    assert transport.writes == 4  # then 3 on its own, and 4
    assert [e.event.record["i"] for e in hub.workspace("w1").history] == [0, 1, 2, 3, 4]
    assert proto._drainer is None and not proto._queue


async def test_one_connection_publishing_to_several_urls_gets_each_routed(tmp_path):
    # The route of a connection's last publish URL is kept; another URL is parsed afresh.
    gw = make_gateway(tmp_path)
    proto, transport = connect(gw)

    def to(path: bytes, i: int) -> bytes:
        return publish_request(i).replace(b"/workspaces/w1/realtime/events/t", path, 1)

    proto.data_received(
        to(b"/workspaces/w1/realtime/events/t", 0) + to(b"/workspaces/w1/realtime/events/u", 1)
        + to(b"/workspaces/w1/realtime/nope", 2) + to(b"/workspaces/w1/realtime/events/u", 3)
        + to(b"/workspaces/w1/realtime/events/t", 4) + to(b"/workspaces/w%201/realtime/events/t", 5)
    )
    got = transport.responses()
    assert [s for s, _ in got] == [202, 202, 404, 202, 202, 404], got
    assert "no such endpoint: POST /workspaces/w1/realtime/nope" in got[2][1]["error"]
    history = list(gw.hub.workspace("w1").history)
    assert [(e.event.entity, e.event.record["i"]) for e in history] == [("t", 0), ("u", 1), ("u", 3), ("t", 4)]


class ConfirmingBus:
    """The bus interface as the Kafka bus behaves towards the publish API: submit() fixes an
    event's place at once and returns a future of its seq, which the test resolves in any
    order (Kafka acknowledges a batch at once; a failure may come before a success)."""

    def __init__(self) -> None:
        self.submitted: list[tuple[int, asyncio.Future]] = []

    async def submit(self, event) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.submitted.append((event.record["i"], fut))
        return fut

    def confirm(self, k: int) -> None:
        self.submitted[k][1].set_result(100 + k)


def confirming_gateway(tmp_path) -> tuple[Gateway, ConfirmingBus]:
    gw = make_gateway(tmp_path)
    bus = gw.bus = ConfirmingBus()
    return gw, bus


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_requests_behind_an_unconfirmed_publish_go_on_and_answers_keep_request_order(tmp_path):
    from rtserver.bus import BusUnavailable

    gw, bus = confirming_gateway(tmp_path)
    proto, transport = connect(gw)
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    proto.data_received(publish_request(0) + publish_request(1) + get + publish_request(2))
    # every event handed to the bus before any is confirmed; nothing answered yet
    assert [i for i, _ in bus.submitted] == [0, 1, 2]
    assert transport.responses() == [] and proto._drainer is None
    bus.confirm(1)
    await settle()
    assert transport.responses() == []  # 1 is known, but 0 is not
    bus.submitted[0][1].set_exception(BusUnavailable(504, "not acknowledged in time (workspace w1)"))
    await settle()
    got = transport.responses()
    assert [s for s, _ in got] == [504, 202, 200]  # the GET's answer was queued behind them
    assert got[1][1]["seq"] == 101 and "w1" in got[0][1]["error"]
    assert transport.writes == 1  # the three known answers in one write
    bus.confirm(2)
    await settle()
    assert [s for s, _ in transport.responses()] == [504, 202, 200, 202]
    assert not proto._answers
    # with nothing waiting, a request is answered within data_received again
    proto.data_received(get)
    assert len(transport.responses()) == 5
    assert gw.metrics.publish_requests[202] == 2 and gw.metrics.publish_requests[504] == 1


async def test_a_closing_publish_behind_unconfirmed_ones_closes_after_its_answer(tmp_path):
    gw, bus = confirming_gateway(tmp_path)
    proto, transport = connect(gw)
    closing = publish_request(1).replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
    proto.data_received(publish_request(0) + closing + publish_request(2))
    assert [i for i, _ in bus.submitted] == [0, 1]  # nothing after the closing request is handled
    bus.confirm(0)
    await settle()
    assert [s for s, _ in transport.responses()] == [202] and not transport.closed
    bus.confirm(1)
    await settle()
    assert [s for s, _ in transport.responses()] == [202, 202] and transport.closed
    assert b"Connection: close" in bytes(transport.data).split(b"HTTP/1.1 ")[2]


async def test_reading_pauses_while_too_many_answers_wait_for_the_bus(tmp_path):
    gw, bus = confirming_gateway(tmp_path)
    proto, transport = connect(gw)
    proto.data_received(b"".join(publish_request(i) for i in range(http._MAX_PIPELINED)))
    assert transport.paused == 1 and len(bus.submitted) == http._MAX_PIPELINED
    for k in range(http._MAX_PIPELINED // 2 - 1):
        bus.confirm(k)
    await settle()
    assert transport.resumed == 0  # still more than half waiting
    bus.confirm(http._MAX_PIPELINED // 2 - 1)
    await settle()
    assert transport.resumed == 1 and not proto._paused
    assert len(transport.responses()) == http._MAX_PIPELINED // 2


async def test_a_websocket_upgrade_behind_an_unconfirmed_publish_is_refused(tmp_path):
    gw, bus = confirming_gateway(tmp_path)
    proto, transport = connect(gw)
    upgrade = (b"GET /workspaces/w1/realtime/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n\r\n")
    proto.data_received(publish_request(0) + upgrade)
    assert not proto._handed_off
    bus.confirm(0)
    await settle()
    got = transport.responses()
    assert [s for s, _ in got] == [202, 400] and "upgrade" in got[1][1]["error"].lower()
    assert transport.eof  # then closed after the linger


async def test_connection_lost_with_unconfirmed_publishes_writes_nothing_later(tmp_path):
    gw, bus = confirming_gateway(tmp_path)
    proto, transport = connect(gw)
    proto.data_received(publish_request(0) + publish_request(1))
    proto.connection_lost(None)
    transport.closed = True
    bus.confirm(0)
    bus.confirm(1)
    await settle()  # RecordingTransport fails a write after close
    assert transport.responses() == []
    assert gw.metrics.publish_requests[202] == 2  # published all the same, and counted


def _small_window_socket() -> socket.socket:
    """A client socket with a 64 KiB receive buffer: answers it does not read stay with the
    gateway soon."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    return sock


async def _connected(sock: socket.socket, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def unread_publisher(tmp_path, monkeypatch, n: int, **env: str):
    """A gateway in process, and a real connection to it on which `n` pipelined publish
    requests are written (and nothing read): (gateway, its protocol, reader, writer)."""
    gw, protos = await in_process_gateway(tmp_path, monkeypatch, **env)
    token = jwt.encode({"sub": "svc", "workspaces": ["w1"], "realtime_publish": True, "exp": 4102444800},
                       SECRET, algorithm="HS256")
    requests = [post_request("/workspaces/w1/realtime/events/t", token, {"i": i}) for i in range(n)]
    sock = _small_window_socket()
    try:
        reader, writer = await _connected(sock, gw.port)
        for _ in range(100):
            if protos:
                break
            await asyncio.sleep(0.01)
        proto = protos[0]
        proto.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        writer.write(b"".join(requests))
    except BaseException:
        sock.close()
        await gw.shutdown()
        raise
    return gw, proto, reader, writer


async def test_a_publisher_that_never_reads_its_answers_is_cut_off_when_idle(tmp_path, monkeypatch):
    gw, proto, reader, writer = await unread_publisher(tmp_path, monkeypatch, 20_000, RT_IDLE_TIMEOUT="1")
    try:
        for _ in range(100):
            if proto.transport is None:  # connection_lost
                break
            await asyncio.sleep(0.1)
        assert proto.transport is None, "a connection whose answers are never read stayed open"
        assert gw.metrics.publish_requests[202] < 20_000
    finally:
        writer.close()
        await gw.shutdown()


async def test_a_publisher_that_does_not_read_its_answers_is_not_read_either(tmp_path, monkeypatch):
    """Over real sockets: a publisher writing 20,000 requests and reading none of the answers
    fills the gateway's write buffer; from then on the gateway stops reading its requests
    (bounded: the answers are not queued without end), and once it reads, every request is
    published and answered in order."""
    n = 20_000
    gw, proto, reader, writer = await unread_publisher(tmp_path, monkeypatch, n)
    try:
        def accepted() -> int:
            return gw.metrics.publish_requests[202]

        seen, steady = -1, 0
        while steady < 5 and accepted() < n:
            await asyncio.sleep(0.1)
            steady = steady + 1 if accepted() == seen else 0
            seen = accepted()
        assert accepted() < n, "the gateway read every request although no answer was read"
        assert proto._paused and proto._write_blocked
        assert proto.transport.get_write_buffer_size() < 1024 * 1024

        seqs = []
        for _ in range(n):
            status, head, body = await read_answer(reader, 20)
            assert status == 202, (head, body)
            seqs.append(json.loads(body)["seq"])
        assert seqs == sorted(seqs) and len(set(seqs)) == n and accepted() == n
        assert not proto._paused
    finally:
        writer.close()
        await gw.shutdown()


async def test_a_closing_answer_the_peer_never_reads_is_given_up_after_the_idle_timeout(tmp_path):
    cfg = config.load(environ={"RT_AUTH_HS256_SECRET": SECRET, "RT_STATE_DIR": str(tmp_path),
                               "RT_IDLE_TIMEOUT": "0.2"})
    gw = Gateway(cfg)
    proto, transport = connect(gw)
    transport.unread = 100_000  # the peer reads nothing: close() would wait for ever
    proto.data_received(publish_request(0).replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
    assert transport.closed and not transport.aborted  # asked to close after the write
    await asyncio.sleep(0.4)
    assert transport.aborted
    # an answer written in full is closed normally, with nothing left to give up
    proto, transport = connect(gw)
    proto.data_received(publish_request(1).replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
    await asyncio.sleep(0.4)
    assert transport.closed and not transport.aborted


async def in_process_gateway(tmp_path, monkeypatch, **env: str) -> tuple[Gateway, list[http.FrontProtocol]]:
    """A started gateway in process on a free port, and the front protocols of its connections
    as they are made (the caller shuts the gateway down)."""
    protos: list[http.FrontProtocol] = []

    class Recorded(http.FrontProtocol):
        def __init__(self, gw: Gateway) -> None:
            super().__init__(gw)
            protos.append(self)

    monkeypatch.setattr(http, "FrontProtocol", Recorded)
    cfg = config.load(environ={"RT_AUTH_HS256_SECRET": SECRET, "RT_STATE_DIR": str(tmp_path), "RT_PORT": "0",
                               "RT_GC_FREEZE": "false", **env})
    gw = Gateway(cfg)
    await gw.start()
    return gw, protos


def held_bytes(proto: http.FrontProtocol) -> int:
    """Bytes a front protocol holds in buffers of its own and of the request being read."""
    held = [v for v in vars(proto).values() if isinstance(v, (bytes, bytearray))]
    if proto._req is not None:
        held.append(proto._req.body)
    return sum(map(len, held))


async def test_a_chunked_body_keeps_no_copy_of_its_framing(tmp_path, monkeypatch):
    """Chunk extensions and trailer fields are framing the body limit does not count: the bytes
    read for a request in its body were all kept (for a WebSocket hand-off no body request can
    have), so a publish of a 2-byte body with megabytes of either held megabytes until the
    request timeout (measured: 8 MB per 8 MB sent)."""
    gw, protos = await in_process_gateway(tmp_path, monkeypatch)
    head = publish_request(0).split(b"Content-Length")[0] + b"Transfer-Encoding: chunked\r\n\r\n"
    try:
        for framing in (b"1;" + b"e" * 4000 + b"\r\n \r\n", b"X-Trailer: " + b"e" * 4000 + b"\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(head + b"1\r\n{\r\n")
            if framing.startswith(b"X-"):
                writer.write(b"1\r\n}\r\n0\r\n")  # the last chunk: trailer fields follow
            for _ in range(1000):  # 4 MB
                writer.write(framing)
                await writer.drain()
            for _ in range(5):  # the gateway (on this loop) reads what the socket holds
                await asyncio.sleep(0.02)
            assert held_bytes(protos[-1]) < 64 * 1024
            writer.write(b"1\r\n}\r\n0\r\n\r\n" if not framing.startswith(b"X-") else b"\r\n")
            status, _, body = await read_answer(reader)
            assert status == 202, body  # the body is "{ ... }" or "{}"
            writer.close()
    finally:
        await gw.shutdown()


UPGRADE = (b"GET /workspaces/w1/realtime/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")


def masked_text_frame(payload: bytes) -> bytes:
    """A client's WebSocket text frame (masked, as clients must; payload under 126 bytes)."""
    mask = b"\x01\x02\x03\x04"
    length = bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    return b"\x81" + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def upgraded_and_authenticated(reader: asyncio.StreamReader) -> None:
    """Read the 101 and the answer to the auth message sent right behind the upgrade request."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 "), head
    frame = await asyncio.wait_for(reader.read(1000), 10)
    assert b'"auth_ok"' in frame, frame


def auth_frame() -> bytes:
    token = jwt.encode({"sub": "u", "workspaces": ["w1"], "exp": 4102444800}, SECRET, algorithm="HS256")
    return masked_text_frame(json.dumps({"type": "auth", "token": token}).encode())


async def test_a_websocket_upgrade_behind_answered_requests_is_handed_over_whole(tmp_path, monkeypatch):
    """A client may send a request, then the upgrade without waiting (pipelined): both arrive in
    one read, or the upgrade starts in the read that ends the request before it. The bytes kept
    for the hand-off were dropped when the request before it was parsed, so picows got none or
    the upgrade's tail only, and the upgrade was never answered (the handshake timed out)."""
    gw, _ = await in_process_gateway(tmp_path, monkeypatch)
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        for first, later in ((get + UPGRADE + auth_frame(), b""),  # one read
                             (get + UPGRADE[:40], UPGRADE[40:] + auth_frame()),  # split after the GET
                             (publish_request(0) + UPGRADE[:40], UPGRADE[40:] + auth_frame())):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(first)
            status, _, _ = await read_answer(reader)
            assert status in (200, 202)
            if later:
                writer.write(later)
            await upgraded_and_authenticated(reader)
            writer.close()
    finally:
        await gw.shutdown()


async def test_a_websocket_upgrade_with_more_than_upgrade_in_its_connection_header_is_accepted(tmp_path, monkeypatch):
    """Firefox sends `Connection: keep-alive, Upgrade`, which HTTP allows (a list of options);
    picows accepts only a header that is exactly "upgrade", and answered 400 to every Firefox
    client."""
    gw, _ = await in_process_gateway(tmp_path, monkeypatch)
    try:
        for value in (b"keep-alive, Upgrade", b"Upgrade, keep-alive", b"upgrade"):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(UPGRADE.replace(b"Connection: Upgrade", b"Connection: " + value) + auth_frame())
            await upgraded_and_authenticated(reader)
            writer.close()
    finally:
        await gw.shutdown()


async def test_trailer_fields_of_a_chunked_body_do_not_replace_its_headers(tmp_path):
    """Fields after a chunked body (trailers) were stored as headers: one could replace the
    Authorization a proxy checked or set in the head, or the correlation id. HTTP forbids
    merging such fields into the head (RFC 9110 6.5.1); they are ignored."""
    gw = make_gateway(tmp_path)
    proto, transport = connect(gw)
    head = publish_request(0).split(b"Content-Length")[0]
    proto.data_received(head + b"X-Correlation-ID: from-head\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"2\r\n{}\r\n0\r\nAuthorization: Bearer garbage\r\nX-Correlation-ID: from-trailer\r\n\r\n")
    [(status, body)] = transport.responses()
    assert status == 202 and body["correlationId"] == "from-head", body


async def test_100_continue_waits_for_the_answers_of_requests_still_waiting_before_it(tmp_path):
    """With a request before it waiting (fan-out back-pressure), the 100 Continue of the next
    one was written at once, ahead of the earlier request's answer: the client read it as an
    interim answer to the earlier request and went on waiting for its own."""
    gw = make_gateway(tmp_path)
    queue_frames(gw.hub, 11)
    proto, transport = connect(gw)
    second = publish_request(1).replace(b"Host: x\r\n", b"Host: x\r\nExpect: 100-continue\r\n")
    head, _, body = second.partition(b"\r\n\r\n")
    proto.data_received(publish_request(0) + head + b"\r\n\r\n")
    assert bytes(transport.data) == b""  # the first waits: nothing may overtake its answer
    queue_frames(gw.hub, 0)
    gw.hub._drained.set()
    for _ in range(20):
        await asyncio.sleep(0)
    data = bytes(transport.data)
    assert data.startswith(b"HTTP/1.1 202 ") and data.endswith(b"HTTP/1.1 100 Continue\r\n\r\n"), data
    proto.data_received(body)
    for _ in range(20):
        await asyncio.sleep(0)
    parts = bytes(transport.data).split(b"HTTP/1.1 ")[1:]
    assert [p[:3] for p in parts] == [b"202", b"100", b"202"]


async def test_an_upgrade_to_another_protocol_than_websocket_is_ignored(tmp_path, monkeypatch):
    """`curl --http2` on plain HTTP asks to upgrade to h2c. Every request with an Upgrade header
    went to picows, which answered GET /healthz 404 and a publish 400 and closed. A server may
    ignore an upgrade it does not offer (RFC 9110 7.8): such a request is served as the HTTP/1.1
    request it is, and the connection goes on; one with a body (which the parser then leaves
    unread) is refused, and so is a CONNECT (400: its target is no path)."""
    gw, _ = await in_process_gateway(tmp_path, monkeypatch)
    h2c = b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(get + h2c + b"\r\n" + get + b"\r\n" + b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n" + get + b"\r\n")
        answers = [await read_answer(reader) for _ in range(4)]
        assert [status for status, _, _ in answers] == [200, 200, 400, 200]
        assert answers[0][2] == b'{"status":"ok"}'
        writer.write(publish_request(0).replace(b"Host: x\r\n", b"Host: x\r\n" + h2c))
        status, head, body = await read_answer(reader)
        assert status == 400 and b"Upgrade" in body, body
        writer.close()
    finally:
        await gw.shutdown()


async def test_answers_queued_behind_an_unconfirmed_publish_stop_the_reading(tmp_path, monkeypatch):
    """Over real sockets: while a publish waits for the bus to confirm it (Kafka: up to its
    delivery timeout), the requests behind it that need no wait (a GET, a refused publish)
    have their answers queued behind it. Reading paused only for answers of publishes: a
    client sending cheap requests behind one unconfirmed publish was read without end, every
    answer held in memory until the bus answered. Reading now pauses at _MAX_PIPELINED answers
    of any kind, and every answer leaves in order once the publish is confirmed."""

    n = 20_000
    gw, protos = await in_process_gateway(tmp_path, monkeypatch)
    real_bus = gw.bus
    bus = gw.bus = ConfirmingBus()
    sock = _small_window_socket()
    try:
        reader, writer = await _connected(sock, gw.port)
        get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        writer.write(publish_request(0) + get * n)
        for _ in range(100):
            if bus.submitted:
                break
            await asyncio.sleep(0.01)
        proto = protos[0]
        held, steady = -1, 0
        while steady < 5 and len(proto._answers or ()) <= n:
            await asyncio.sleep(0.1)
            steady = steady + 1 if len(proto._answers or ()) == held else 0
            held = len(proto._answers or ())
        assert proto._paused, "reading went on behind the unconfirmed publish"
        # What one read brought beyond the bound, at most (256 KiB reads)
        assert held < http._MAX_PIPELINED + 256 * 1024 // len(get), held
        assert held < n
        bus.confirm(0)
        status, _, body = await read_answer(reader, 20)
        assert status == 202 and json.loads(body)["seq"] == 100
        for _ in range(n):
            status, head, body = await read_answer(reader, 20)
            assert status == 200, (head, body)
        assert not proto._answers
        writer.close()
    finally:
        sock.close()
        gw.bus = real_bus
        await gw.shutdown()


# A node-wide bound on the bytes of pipelined requests queued: small here, bodies of ~16 KiB.
_NODE_BOUND = 128 * 1024
_PAD = "x" * 16_000
# What one read of a connection may bring beyond the bound before the connection pauses: the
# requests in it are parsed and queued (asyncio and uvloop read up to 256 KiB at once).
_ONE_READ = 256 * 1024 + 20_000


def queued_bytes(protos: list[http.FrontProtocol]) -> int:
    """Bytes of the requests queued (parsed, not yet handled) on these connections, counted
    from their queues: bodies and the heads as parsed."""
    return sum(req.size + req.head for p in protos for _, req, _ in (p._queue or ()))


async def metric(gw: Gateway, name: str) -> float:
    """A gauge's value as /metrics gives it, read over a connection of its own."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await read_answer(reader)
        assert status == 200
    finally:
        writer.close()
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def pipelining_publishers(tmp_path, monkeypatch, connections: int, requests: int):
    """A gateway whose fan-out backlog is over its bound (every publish waits), with a node
    bound of _NODE_BOUND on queued requests, and `connections` real connections each writing
    `requests` pipelined publishes of ~16 KiB, once the gateway has stopped reading more of
    them: (gateway, front protocols, [(reader, writer)])."""
    gw, protos = await in_process_gateway(tmp_path, monkeypatch, RT_FANOUT_BACKLOG="10",
                                          RT_MAX_PUBLISH_BYTES="65536", RT_PIPELINED_PUBLISH_BYTES=str(_NODE_BOUND))
    queue_frames(gw.hub, 11)
    token = jwt.encode({"sub": "svc", "workspaces": ["w1"], "realtime_publish": True, "exp": 4102444800},
                       SECRET, algorithm="HS256")
    peers = []
    try:
        for c in range(connections):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"".join(post_request("/workspaces/w1/realtime/events/t", token,
                                               {"c": c, "i": i, "pad": _PAD}) for i in range(requests)))
            peers.append((reader, writer))
        held, steady = -1, 0
        while steady < 5:
            await asyncio.sleep(0.1)
            steady = steady + 1 if queued_bytes(protos) == held else 0
            held = queued_bytes(protos)
    except BaseException:
        await gw.shutdown()
        raise
    return gw, protos, peers


def release_fanout(hub) -> None:
    """The backlog is within its bound again: the waiting publishers go on (as Hub.flush does)."""
    queue_frames(hub, 0)
    drained, hub._drained = hub._drained, None
    if drained is not None:
        drained.set()


async def test_requests_queued_on_all_connections_stop_at_the_node_bound(tmp_path, monkeypatch):
    """Each connection may queue _MAX_PIPELINED requests behind one that waits (the fan-out
    back-pressure, a Kafka confirmation, a JWKS fetch), bodies and all: 8 connections of 63
    requests of 16 KiB held 8 MB, and a node's connections together as much as they sent. The
    node's total stops at limits.pipelined_publish_bytes (give or take one read a connection):
    the connections queuing beyond it stop being read, and once the wait ends every request is
    answered in order, the paused connections read again and the total is given back."""
    n_conn, n_req = 8, 63
    gw, protos, peers = await pipelining_publishers(tmp_path, monkeypatch, n_conn, n_req)
    try:
        held = queued_bytes(protos)
        assert held <= _NODE_BOUND + n_conn * _ONE_READ, f"{held} bytes queued, bound {_NODE_BOUND}"
        assert await metric(gw, "rt_pipelined_publish_bytes") == held
        assert await metric(gw, "rt_pipelined_publish_paused_connections") >= 1
        assert gw.metrics.publish_requests[202] == 0

        release_fanout(gw.hub)
        for c, (reader, _) in enumerate(peers):
            seqs = []
            for _ in range(n_req):
                status, head, body = await read_answer(reader, 20)
                assert status == 202, (head, body)
                seqs.append(json.loads(body)["seq"])
            assert seqs == sorted(seqs) and len(set(seqs)) == n_req, c
        history = [e.event.record for e in gw.hub.workspace("w1").history]
        for c in range(n_conn):
            assert [r["i"] for r in history if r["c"] == c] == list(range(n_req))
        assert await metric(gw, "rt_pipelined_publish_bytes") == 0
        assert await metric(gw, "rt_pipelined_publish_paused_connections") == 0
        assert not any(p._paused for p in protos if p.transport is not None)
    finally:
        for _, writer in peers:
            writer.close()
        await gw.shutdown()


async def test_connections_closed_while_paused_for_the_node_bound_give_their_bytes_back(tmp_path, monkeypatch):
    """Publishers that give up while the node does not read them: their close is seen once
    the wait ends (a connection not read sees no FIN), and then every byte they held comes back
    and no connection stays registered: the node's count does not creep up until every later
    publisher is paused for good."""
    gw, protos, peers = await pipelining_publishers(tmp_path, monkeypatch, 4, 63)
    try:
        assert await metric(gw, "rt_pipelined_publish_paused_connections") >= 1
        for _, writer in peers:
            writer.transport.abort()
        release_fanout(gw.hub)
        for _ in range(500):
            if all(p.transport is None for p in protos):  # connection_lost, each of them
                break
            await asyncio.sleep(0.02)
        assert all(p.transport is None for p in protos)
        assert await metric(gw, "rt_pipelined_publish_bytes") == 0
        assert await metric(gw, "rt_pipelined_publish_paused_connections") == 0
        assert gw.pipelined.held == 0 and not gw.pipelined.waiting

        # and the node still takes pipelined publishes
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(publish_request(0) + publish_request(1))
        assert [(await read_answer(reader))[0] for _ in range(2)] == [202, 202]
        writer.close()
    finally:
        await gw.shutdown()


async def test_a_connection_lost_while_paused_for_the_node_bound_gives_its_bytes_back_and_resumes_others(tmp_path):
    """In process: two connections queue requests behind a waiting one past the node's bound,
    and both stop being read. The connection lost (a reset, an abort) gives its queued bytes
    back and leaves the registry at once; under half of the bound, the other reads again."""
    cfg = config.load(environ={"RT_AUTH_HS256_SECRET": SECRET, "RT_STATE_DIR": str(tmp_path),
                               "RT_FANOUT_BACKLOG": "10", "RT_MAX_PUBLISH_BYTES": "1024",
                               "RT_PIPELINED_PUBLISH_BYTES": "4096"})
    gw = Gateway(cfg)
    queue_frames(gw.hub, 11)
    size = len(publish_request(0))  # what one queued request counts, give or take
    a, a_transport = connect(gw)
    # the first waits, those behind it are queued: with one more later, half the bound at most
    a.data_received(b"".join(publish_request(i) for i in range(2048 // size)))
    assert not a._paused and gw.pipelined.held > 0
    b, b_transport = connect(gw)
    b.data_received(b"".join(publish_request(i) for i in range(2 + 8192 // size)))
    assert b._paused and b_transport.paused == 1 and gw.pipelined.held > 4096
    assert list(gw.pipelined.waiting) == [b]
    a.data_received(publish_request(99))  # queued over the bound: a stops being read too
    assert a._paused and list(gw.pipelined.waiting) == [b, a]

    a_held = a._queued_bytes
    b.connection_lost(ConnectionResetError())
    assert gw.pipelined.held == a_held <= 2048
    assert not gw.pipelined.waiting and not a._paused and a_transport.resumed == 1

    a.connection_lost(None)
    assert gw.pipelined.held == 0


async def test_connections_queueing_while_others_wait_for_the_node_bound_wait_in_turn(tmp_path):
    """In process: once a connection waits for the node's bound, one that queues a request wait
    too, even with the total back under the bound (but over half of it). Publishers that never
    pushed the total past the bound kept it between half and the bound for as long as they
    published, and the connection paused first was never read again."""
    cfg = config.load(environ={"RT_AUTH_HS256_SECRET": SECRET, "RT_STATE_DIR": str(tmp_path),
                               "RT_FANOUT_BACKLOG": "10", "RT_MAX_PUBLISH_BYTES": "1024",
                               "RT_PIPELINED_PUBLISH_BYTES": "4096"})
    gw = Gateway(cfg)
    queue_frames(gw.hub, 11)
    size = len(publish_request(0))
    assert size < 600
    a, _ = connect(gw)
    a.data_received(b"".join(publish_request(i) for i in range(1 + 2048 // size)))  # the first waits
    b, _ = connect(gw)
    b.data_received(b"".join(publish_request(i) for i in range(3 + 2048 // size)))
    assert b._paused and list(gw.pipelined.waiting) == [b]
    a.connection_lost(None)  # the total falls under the bound, not under half of it
    assert 2048 < gw.pipelined.held <= 4096 - size and list(gw.pipelined.waiting) == [b]
    c, c_transport = connect(gw)
    c.data_received(publish_request(0) + publish_request(1))  # the first waits, the second is queued
    assert c._paused and c_transport.paused == 1 and list(gw.pipelined.waiting) == [b, c]
    b.connection_lost(None)  # under half: every waiting connection reads again
    assert not gw.pipelined.waiting and not c._paused
    c.connection_lost(None)
    assert gw.pipelined.held == 0
