"""What a peer's input makes the gateway hold stays within the documented bounds, counted in the
memory it really takes (a real gateway process, real sockets; its resident memory read from
/proc)."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.test_scaleout import cluster  # noqa: F401 - the fixture

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/PID/status")


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def settled_rss(pid: int) -> float:
    """The process's resident memory once it has read what the sockets hold."""
    last = -1.0
    for _ in range(50):
        await asyncio.sleep(0.1)
        now = resident_mib(pid)
        if abs(now - last) < 0.5:
            return now
        last = now
    return last


async def test_a_chunked_publish_body_in_tiny_chunks_holds_no_more_than_its_bytes(gateway):
    """limits.max_publish_bytes bounds a body as it is read, and limits.pipelined_publish_bytes
    the bodies queued on the node, both counted in body bytes. A chunked body was kept as one
    bytes object per chunk: sent in 2-byte chunks, 256 KiB of body (900 KB on the wire, no
    token needed: the body is read before the request is handled) held ~7 MB until the request
    was complete or timed out, 27 times the bound: 40 such requests in progress held ~280 MB."""
    body = b'"' + b"a" * (256 * 1024 - 100) + b'"'
    chunked = b"".join(b"2\r\n" + body[i:i + 2] + b"\r\n" for i in range(0, len(body) - 2, 2))
    head = (b"POST /workspaces/w1/realtime/events/t HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    pid = gateway.proc.pid
    before = await settled_rss(pid)
    writers = []
    try:
        for _ in range(40):
            _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(head + chunked)  # all but the last chunk: the request stays in progress
            await writer.drain()
            writers.append(writer)
        grown = await settled_rss(pid) - before
        # 40 bodies of 256 KiB are 10 MiB; allow the sockets and their buffers as much again.
        assert grown < 40, f"40 chunked bodies of 256 KiB in progress: resident memory grew {grown:.0f} MiB"
    finally:
        for writer in writers:
            writer.close()


UPGRADE = (b"GET /workspaces/w1/realtime/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")


def masked_frame(opcode: int, payload: bytes, fin: bool) -> bytes:
    """A client's WebSocket frame (masked; payload under 126 bytes)."""
    mask = b"\x01\x02\x03\x04"
    return (bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


async def test_a_message_in_tiny_fragments_holds_no_more_than_its_bytes(gateway):
    """limits.max_message_bytes bounds a message as its fragments arrive, counted in payload
    bytes. The fragments were kept as one bytes object each: a message of 64 KiB sent in
    2-byte continuation frames (256 KB on the wire, before any auth message) held ~1.8 MB
    until it ended or the connection did, 27 times the bound (40 such connections: +70 MB)."""
    message = masked_frame(1, b'{"', fin=False) + masked_frame(0, b"aa", fin=False) * (65536 // 2 - 100)
    pid = gateway.proc.pid
    before = await settled_rss(pid)
    writers = []
    try:
        for _ in range(40):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(UPGRADE)
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 101 ")
            writer.write(message)  # no final fragment: the message stays in progress
            await writer.drain()
            writers.append(writer)
        grown = await settled_rss(pid) - before
        # 40 messages of 64 KiB are 2.5 MiB; allow the sockets and their buffers several times that.
        assert grown < 20, f"40 messages of 64 KiB in 2-byte fragments: resident memory grew {grown:.0f} MiB"
    finally:
        for writer in writers:
            writer.close()


async def test_filter_field_names_a_client_chose_are_given_back_with_their_subscriptions(gateway):
    """The compiled filters interned their field names (sys.intern): on Python 3.12, which the
    gateway supports (requires-python >= 3.11), an interned string is immortal, so every field
    name any client ever put in a filter stayed in memory for the life of the process. A client
    subscribing and unsubscribing with fresh 30 KB field names grew the gateway by 30 KB each
    time (3,000 of them: +90 MB), whatever the limits on its subscriptions."""
    from tests.harness.wsclient import ws_connect

    pid = gateway.proc.pid
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as client:
        await client.subscribe("events:warm", {"predicates": {"warm": 1}})
        before = await settled_rss(pid)
        for i in range(3000):
            name = f"f{i}-" + "x" * 30_000
            await client.send({"type": "subscribe", "channel": "events:t", "filter": {"predicates": {name: 1}}})
            await client.send({"type": "unsubscribe", "channel": "events:t"})
            if i % 100 == 99:  # keep reading the answers (subscribed, unsubscribed)
                for _ in range(200):
                    assert (await client.recv())["type"] in ("subscribed", "unsubscribed")
        grown = await settled_rss(pid) - before
    assert grown < 30, f"3,000 filters on fresh 30 KB field names, each unsubscribed: resident memory grew {grown:.0f} MiB"


async def test_suspended_sessions_hold_about_what_their_bound_counts(gateway_factory):
    """history.max_suspended_filter_bytes bounds the memory of the suspended sessions' filters,
    counted as their JSON: a suspended session keeps its filters decoded, and a filter's JSON
    decodes to 20 times its size and more (an array of 16,000 empty arrays: 64 KB of JSON,
    ~1.3 MB decoded). With a bound of 2 MiB, 32 such sessions were kept (~40 MB): each now
    counts what its filter decodes to, estimated as the history counts its events."""
    from contextlib import AsyncExitStack

    from tests.harness.wsclient import ws_connect

    bound = 2 * 1024 * 1024
    gw = await gateway_factory({"RT_MAX_SUSPENDED_FILTER_BYTES": str(bound), "RT_RESUME_TTL": "4",
                                "RT_MAX_CONNECTIONS_PER_SUBJECT": "1000"})
    pid = gw.proc.pid
    arrays = {"predicates": {"a": {"$eq": [[] for _ in range(16_000)]}}}
    async with AsyncExitStack() as stack:
        for _ in range(40):
            client = await stack.enter_async_context(ws_connect(gw, "w1", token=gw.token("w1")))
            await client.subscribe("events:t", arrays)
    # All 40 closed at once: suspended, up to the bound.
    suspended = await settled_rss(pid)
    deadline = asyncio.get_running_loop().time() + 15
    while b"rt_suspended_sessions 0\n" not in (await gw.get("/metrics"))[1]:
        assert asyncio.get_running_loop().time() < deadline, "the suspended sessions did not expire"
        await asyncio.sleep(0.2)
    held = suspended - await settled_rss(pid)
    assert held < 3 * bound / 2**20, (f"suspended sessions bounded at {bound // 2**20} MiB of filters held "
                                      f"{held:.0f} MiB")


@pytest.mark.postgres
@pytest.mark.kafka
async def test_idle_connections_to_the_ingest_health_port_cannot_take_its_descriptors(cluster):  # noqa: F811
    """The gateway's port holds a bounded number of client sockets, so that a flood of idle
    connections cannot take the descriptors its feeds and files need. The ingest's health port
    (bus.ingest_port) took every connection and held each for up to 5 s waiting for its
    request: 1,500 idle connections were hundreds of descriptors (397 within a second) of the
    process that reads the feeds and writes to Kafka. Past 64 at once, a connection is now
    answered 503 and closed at once."""
    import socket

    ingest = await cluster.ingest()
    await ingest.wait_active()
    pid = ingest.proc.pid

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    before = descriptors()
    socks = []
    try:
        for _ in range(1500):
            s = socket.create_connection(("127.0.0.1", ingest.port))
            socks.append(s)  # sends nothing: waits for its request
        await asyncio.sleep(1)
        grown = descriptors() - before
        assert grown < 200, f"1,500 idle connections to the health port: the ingest holds {grown} more descriptors"
    finally:
        for s in socks:
            s.close()
    await asyncio.sleep(0.5)
    assert (await ingest.status())["role"] == "active"  # answered again once they are gone
