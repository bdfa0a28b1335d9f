"""The hub's write loop: at most `limits.flush_chunk` connections per loop iteration, frames of
events that arrive in between joined to the connections not yet written, order kept, and
publishers held back while more than `limits.fanout_backlog` frames wait to be written.
In process, with recording transports (the wire is covered by the protocol and fan-out tests)."""

from __future__ import annotations

import asyncio

import pytest

from rtcore.engine import Outbox, SubKey, queue_one
from rtcore.event import Event
from rtserver import config
from rtserver.channels import parse
from rtserver.hub import Hub, Lane, Subscription
from rtserver.metrics import Metrics
from tests.harness.wsclient import ws_connect


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


class Conn:
    """A connection as the hub's loops see it: an outbox writing to a recording transport."""

    def __init__(self) -> None:
        self._raw = RecordingTransport()
        self.out = Outbox()
        self.out.write = self._raw.write


def Sub(conn: Conn) -> SubKey:  # noqa: N802 - stands in for the Subscription class
    return SubKey(conn.out)


def lane(hub: Hub, workspace: str = "w1") -> Lane:
    return hub.workspace(workspace).lane


def push(hub: Hub, subs: list[SubKey], frame: bytes, workspace: str = "w1") -> None:
    """Queue `frame` for `subs` as an event of `workspace` (Hub.deliver's fan-out)."""
    hub._push_all(subs, frame, lane(hub, workspace))


def make_hub(chunk: int, backlog: int) -> Hub:
    cfg = config.load(environ={"RT_FLUSH_CHUNK": str(chunk), "RT_FANOUT_BACKLOG": str(backlog)})
    return Hub(cfg, Metrics())


async def test_flush_writes_a_chunk_per_iteration_and_joins_later_frames():
    hub = make_hub(chunk=3, backlog=100)
    conns = [Conn() for _ in range(8)]
    subs = [Sub(c) for c in conns]
    push(hub, subs, b"e1")
    await asyncio.sleep(0)  # one iteration: the first chunk only
    assert [len(c._raw.writes) for c in conns] == [1, 1, 1, 0, 0, 0, 0, 0]
    push(hub, subs, b"e2")  # arrives while five connections still wait
    for _ in range(10):
        await asyncio.sleep(0)
    # the first three get e2 on its own; the five not yet written get e1 and e2 in one write
    assert [c._raw.writes for c in conns[:3]] == [[b"e1", b"e2"]] * 3
    assert [c._raw.writes for c in conns[3:]] == [[b"e1e2"]] * 5
    assert hub.metrics.writes == 11 and hub.metrics.frames_out == 16
    assert hub.waiting() == 0 and not hub._flush_scheduled


async def test_a_long_backlog_is_walked_by_offset_and_compacted():
    """Chunks advance an offset over the list of waiting connections (no copy of the rest per
    chunk); once most of a long list is written, the written part is dropped. Connections
    queued again meanwhile get their frames in order, once each."""
    hub = make_hub(chunk=1000, backlog=10**6)
    conns = [Conn() for _ in range(6000)]
    push(hub, [Sub(c) for c in conns], b"e1")
    await asyncio.sleep(0)
    assert hub.waiting() == 5000
    push(hub, [Sub(c) for c in conns[:1000]], b"e2")  # written already: queued again at the end
    assert hub.waiting() == 6000 and len(lane(hub).dirty) == 7000
    for _ in range(4):
        await asyncio.sleep(0)
    # 5000 of 7000 written: the written part is dropped from the list
    assert len(lane(hub).dirty) == 2000 and hub.waiting() == 2000
    for _ in range(3):
        await asyncio.sleep(0)
    assert hub.waiting() == 0 and lane(hub).dirty == [] and not hub._flush_scheduled
    assert all(c._raw.writes == [b"e1", b"e2"] for c in conns[:1000])
    assert all(c._raw.writes == [b"e1"] for c in conns[1000:])
    assert hub.metrics.writes == 7000 and hub._queued == 0


async def test_workspaces_take_turns_so_a_small_one_is_not_written_after_a_large_one():
    """A workspace's single connection is written in the next loop iteration, while another
    workspace still has thousands to write; so are replies. The chunk is shared, what a lane
    does not use goes to the others, and each connection still gets its frames in order."""
    hub = make_hub(chunk=16, backlog=10**6)
    big = [Conn() for _ in range(5000)]
    push(hub, [Sub(c) for c in big], b"a1", "A")
    await asyncio.sleep(0)
    assert hub.waiting() == 5000 - 16  # alone, the large workspace gets the whole chunk
    small = Conn()
    push(hub, [Sub(small)], b"b1", "B")
    replied = Conn()
    replied.out.closed = False
    if queue_one(replied.out, b"reply"):
        hub.schedule(replied.out)
    await asyncio.sleep(0)
    assert small._raw.writes == [b"b1"] and replied._raw.writes == [b"reply"]
    assert hub.metrics.writes == 32  # 16 + (1 + 1 + 14: the rest of the chunk to A)
    push(hub, [Sub(c) for c in big], b"a2", "A")  # joins those not yet written
    for _ in range(400):
        if not hub.waiting():
            break
        await asyncio.sleep(0)
    assert hub.waiting() == 0 and not hub._flush_scheduled and hub._queued == 0
    assert all(c._raw.writes == [b"a1", b"a2"] for c in big[:30])
    assert all(c._raw.writes == [b"a1a2"] for c in big[30:])


async def test_many_lanes_share_a_chunk_in_turns():
    """More lanes waiting than the chunk has connections: one connection each per iteration,
    in turns, none skipped."""
    hub = make_hub(chunk=4, backlog=10**6)
    conns = {f"w{i}": [Conn(), Conn()] for i in range(10)}
    for wid, cs in conns.items():
        push(hub, [Sub(c) for c in cs], b"e", wid)
    await asyncio.sleep(0)
    assert [sum(len(c._raw.writes) for c in cs) for cs in conns.values()] == [1] * 4 + [0] * 6
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [sum(len(c._raw.writes) for c in cs) for cs in conns.values()] == [2] * 2 + [1] * 8
    for _ in range(5):
        await asyncio.sleep(0)
    assert all(c._raw.writes == [b"e"] for cs in conns.values() for c in cs) and hub.waiting() == 0


async def test_publishers_wait_while_the_queued_frames_are_over_the_bound():
    """The bound counts frames, not connections: four connections with three frames each are
    over a bound of five until three of them have been written."""
    hub = make_hub(chunk=1, backlog=5)
    conns = [Conn() for _ in range(4)]
    subs = [Sub(c) for c in conns]
    for e in (b"e1", b"e2", b"e3"):
        push(hub, subs, e)
    assert hub.backlogged() and hub.waiting() == 4 and hub._queued == 12
    waiter = asyncio.ensure_future(hub.room())
    await asyncio.sleep(0)
    assert not waiter.done() and hub._queued == 9  # one connection written
    await asyncio.sleep(0)
    assert not waiter.done() and hub._queued == 6
    await asyncio.sleep(0)
    # three written, three frames queued: within the bound, the waiter is woken
    assert not hub.backlogged() and hub.waiting() == 1
    rows = [ln for ln in hub.metrics.render().decode().splitlines()
            if ln.startswith(("rt_publisher_waits", "rt_write_backlog", "rt_write_queue_frames"))]
    assert rows == ["rt_publisher_waits_total 1", "rt_write_backlog 1", "rt_write_queue_frames 3"], rows
    await asyncio.sleep(0)
    assert waiter.done()
    await waiter
    for _ in range(3):
        await asyncio.sleep(0)
    assert all(c._raw.writes == [b"e1e2e3"] for c in conns)
    assert hub._queued == 0 and hub.waiting() == 0
    await hub.room()  # nothing waits: returns at once


async def test_only_the_workspace_filling_the_queue_waits():
    """Over the bound, a publish of a workspace holding less than an equal share of the queued
    frames goes on; the workspace holding the rest waits until the queue is within its bound."""
    hub = make_hub(chunk=1, backlog=5)
    conns = [Conn() for _ in range(4)]
    for e in (b"a1", b"a2", b"a3"):
        push(hub, [Sub(c) for c in conns], e, "A")
    assert hub.backlogged() and hub._queued == 12
    busy = asyncio.ensure_future(hub.room("A"))
    await asyncio.sleep(0)  # it waits; one connection written (chunk 1): 9 frames queued
    assert not busy.done() and hub.metrics.publisher_waits == 1
    await hub.room("B")  # nothing of B queued: at once
    other = Conn()
    push(hub, [Sub(other)], b"b1", "B")
    await hub.room("B")  # 1 of 10 queued frames, two workspaces waiting: under its share
    assert not busy.done() and hub.metrics.publisher_waits == 1
    await hub.room("C")  # a workspace the node does not hold yet
    for _ in range(10):
        if busy.done():
            break
        await asyncio.sleep(0)
    assert busy.done() and not hub.backlogged()
    assert other._raw.writes == [b"b1"]


async def test_a_flood_spread_over_many_workspaces_is_held_at_the_bound_too():
    """The exemption of a workspace under its equal share is bounded: a publisher spreading
    its events over many workspaces (a token granting `*`, a shared feed recording into every
    workspace) found the workspace it published to next, the one its last turn of writes had
    emptied, under its share every time, and was never held: 2.4 million frames queued at a
    bound of 1,000 here (a slot per frame per connection, and every connection's delay with
    them). Past twice the bound, every publisher waits; each event still reaches every
    subscriber, in order."""
    from rtserver.bus import MemoryBus

    bound, workspaces, per_workspace, events = 1000, 50, 200, 3000
    hub = make_hub(chunk=16, backlog=bound)
    bus = MemoryBus(hub)
    conns: dict[str, list[Conn]] = {}
    for w in range(workspaces):
        ws = hub.workspace(f"w{w}")
        conns[ws.id] = [Conn() for _ in range(per_workspace)]
        for c in conns[ws.id]:
            c.subscriptions = {}
            hub.add(ws, Subscription(c, parse("events:t", None)))
    most = 0

    async def publisher(k: int) -> None:
        nonlocal most
        for i in range(events):
            wid = f"w{(i + k) % workspaces}"
            await bus.publish(Event(workspace=wid, source="events", entity="t", operation="PUBLISH",
                                    record={}, body=b'{"i":%d}' % i))
            most = max(most, hub._queued)

    await asyncio.gather(*(publisher(k) for k in range(4)))
    # Before: 2,390,976 frames queued at most (nearly all of them: 12,000 events times 200).
    assert most <= 2 * bound + per_workspace, most
    while hub.waiting():
        await asyncio.sleep(0)
    for cs in conns.values():  # every event of the workspace, the same bytes at each connection
        got = {b"".join(c._raw.writes) for c in cs}
        assert len(got) == 1 and got.pop().count(b'"i":') == 4 * events // workspaces
    assert hub.metrics.deliveries == 4 * events * per_workspace


async def test_the_bound_grows_with_the_open_connections():
    """limits.fanout_backlog is a floor; with more connections each may hold
    fanout_backlog_per_connection frames on average (so that coalescing per connection does
    not shrink as connections are added); 0 turns the growth off."""
    cfg = config.load(environ={"RT_FANOUT_BACKLOG": "10", "RT_FANOUT_BACKLOG_PER_CONNECTION": "4"})
    hub = Hub(cfg, Metrics())
    open_now = [1]
    hub.open_connections = lambda: open_now[0]
    assert hub.backlog_bound() == 10  # 4 x 1 < 10
    hub._queued = 15
    assert hub.backlogged()
    open_now[0] = 5
    assert hub.backlog_bound() == 20 and not hub.backlogged()
    hub._queued = 21
    assert hub.backlogged()
    rows = [ln for ln in hub.metrics.render().decode().splitlines() if ln.startswith("rt_write_queue_bound ")]
    assert rows == ["rt_write_queue_bound 20"], rows
    off = Hub(config.load(environ={"RT_FANOUT_BACKLOG": "10", "RT_FANOUT_BACKLOG_PER_CONNECTION": "0"}), Metrics())
    off.open_connections = lambda: 1000
    assert off.backlog_bound() == 10
    with pytest.raises(config.ConfigError, match="fanout_backlog_per_connection"):
        config.load(environ={"RT_FANOUT_BACKLOG_PER_CONNECTION": "-1"})


async def test_the_gateway_counts_its_open_connections_for_the_bound(gateway_factory):
    gw = await gateway_factory(env={"RT_FANOUT_BACKLOG": "10", "RT_FANOUT_BACKLOG_PER_CONNECTION": "1000"})
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("events:x")
        _, body = await gw.get("/metrics")
    bound = [ln for ln in body.decode().splitlines() if ln.startswith("rt_write_queue_bound ")]
    assert bound and float(bound[0].split()[1]) >= 1000, bound


async def test_closed_connections_are_skipped_and_order_holds_per_connection():
    hub = make_hub(chunk=2, backlog=100)
    conns = [Conn() for _ in range(5)]
    subs = [Sub(c) for c in conns]
    for i in range(1, 6):
        push(hub, subs, b"e%d" % i)
        if i == 2:
            conns[4].out.closed = True
        await asyncio.sleep(0)
    for _ in range(10):
        await asyncio.sleep(0)
    for c in conns[:4]:
        assert b"".join(c._raw.writes) == b"e1e2e3e4e5"
    assert conns[4]._raw.writes == []


async def test_every_client_gets_every_event_in_order_with_one_connection_per_iteration(gateway_factory):
    """The real gateway written one connection per loop iteration, with publishers held back
    beyond two queued frames: eight clients, forty concurrent publishes, nothing lost,
    repeated or reordered."""
    from contextlib import AsyncExitStack

    from tests.harness.wsclient import subscribed_clients

    gw = await gateway_factory(env={"RT_FLUSH_CHUNK": "1", "RT_FANOUT_BACKLOG": "2", "RT_FANOUT_BACKLOG_PER_CONNECTION": "0"})
    async with AsyncExitStack() as stack:
        clients = await subscribed_clients(stack, gw, 8, "events:x")
        acks = await asyncio.gather(*(gw.publish("w1", "x", {"n": n}) for n in range(40)))
        by_seq = sorted((a["seq"], n) for n, a in enumerate(acks))
        for c in clients:
            got = [await c.recv_event(timeout=10) for _ in range(40)]
            assert [(e["seq"], e["payload"]["n"]) for e in got] == by_seq
            await c.no_message(0.2)


async def test_frames_not_queued_do_not_count_against_the_bound():
    """An event whose matching connections are all closed, or that matches one connection
    through several subscriptions, queues nothing (or one frame): publishers must not wait
    for frames that will never be written (nothing would wake them)."""
    hub = make_hub(chunk=2, backlog=2)
    closed = [Conn() for _ in range(5)]
    for c in closed:
        c.out.closed = True
    push(hub, [Sub(c) for c in closed], b"e1")
    assert hub._queued == 0 and not hub.backlogged() and hub.waiting() == 0
    await asyncio.wait_for(hub.room(), 1)
    one = Conn()
    push(hub, [Sub(one), Sub(one), Sub(one)], b"e2")
    assert hub._queued == 1 and hub.metrics.deliveries == 1
    for _ in range(2):
        await asyncio.sleep(0)
    assert one._raw.writes == [b"e2"] and hub._queued == 0


async def test_events_riding_on_a_reply_write_do_not_hold_their_workspace_back_later():
    """An event queued on a connection that a reply (subscribed, pong, a replay) made dirty
    first leaves with the reply's write, not through its workspace's lane. It counted in that
    lane's share of the queue (Lane.queued) for good, since only a turn of the lane resets it:
    a quiet workspace whose subscribers churned while it published was later taken for the one
    filling the queue, and its publishes waited behind another workspace's flood."""
    hub = make_hub(chunk=1, backlog=5)
    quiet = Conn()
    for n in range(20):
        # A reply to the subscriber, then an event of Q in the same loop iteration.
        if queue_one(quiet.out, b"reply%d" % n):
            hub.schedule(quiet.out)
        push(hub, [Sub(quiet)], b"q%d" % n, "Q")
        for _ in range(3):
            await asyncio.sleep(0)
    assert quiet._raw.writes == [b"reply%dq%d" % (n, n) for n in range(20)]
    assert hub._queued == 0 and hub.waiting() == 0
    conns = [Conn() for _ in range(4)]
    for e in (b"a1", b"a2"):  # 8 frames: over the bound, within twice it (where all wait)
        push(hub, [Sub(c) for c in conns], e, "A")
    assert hub.backlogged()
    waiting = hub.metrics.publisher_waits
    await hub.room("Q")  # nothing of Q is queued: at once
    assert hub.metrics.publisher_waits == waiting and hub.backlogged()


async def test_a_truncate_reaches_indexed_subscriptions_whatever_their_predicates():
    """A TRUNCATE has no row for predicates to look at: it reaches, once per connection, each
    indexed subscription whose channel and operations take it. A subscription the connection
    holds but the index does not (taken out while its replay reads the bus back) gets it from
    that replay, not from the live path too."""
    hub = make_hub(chunk=100, backlog=10**6)
    ws = hub.workspace("w1")
    specs = {
        "filtered": [parse("postgres:products", {"predicates": {"category": "electronics"}}),
                     parse("postgres:*", {"predicates": {"price": {"$gt": 1000}}})],  # both take it: once
        "inserts": [parse("postgres:products", {"operations": ["INSERT"]})],
        "other_table": [parse("postgres:orders", None)],
        "reading_back": [parse("postgres:products", None)],
    }
    conns = {}
    for name, its_specs in specs.items():
        conn = Conn()
        conn.subscriptions = {}
        for spec in its_specs:
            sub = Subscription(conn, spec)
            conn.subscriptions[spec.channel] = sub
            if name != "reading_back":
                hub.add(ws, sub)
        ws.connections.add(conn)
        conns[name] = conn
    hub.deliver(Event("w1", "postgres", "products", "TRUNCATE", {}, b'{"type":"event","operation":"TRUNCATE"}'))
    for _ in range(3):
        await asyncio.sleep(0)
    got = {name: len(conn._raw.writes) for name, conn in conns.items()}
    assert got == {"filtered": 1, "inserts": 0, "other_table": 0, "reading_back": 0}
    assert b'"operation":"TRUNCATE"' in conns["filtered"]._raw.writes[0]


async def test_a_batch_stopped_before_its_first_event_is_refused_whole():
    """A drain that begins before a batch's first event is published (while its events are
    checked, or while the first waits for room) refuses the batch as a single publish is then
    refused: one 503, nothing published. It was the partial answer, each event listed 'not
    published', and its headline 'N of the batch's N events not confirmed as published'. One
    that begins after some were published still ends the batch there, with each event's
    outcome."""
    from rtserver.bus import SHUTTING_DOWN, BusUnavailable, MemoryBus

    hub = make_hub(chunk=16, backlog=100)
    bus = MemoryBus(hub)
    conn = Conn()
    conn.subscriptions = {}
    ws = hub.workspace("w1")
    hub.add(ws, Subscription(conn, parse("events:t", None)))
    events = [Event(workspace="w1", source="events", entity="t", operation="PUBLISH", record={}, body=b'{"i":%d}' % i)
              for i in range(3)]
    try:
        await bus.submit_many(events, lambda: True)
    except BusUnavailable as exc:
        assert (exc.status, str(exc), exc.index) == (503, SHUTTING_DOWN, None)
    else:
        raise AssertionError("a batch stopped before its first event was published")
    assert len(ws.history) == 0 and hub.metrics.deliveries == 0
    asked = iter([False, True, True])
    seqs = await bus.submit_many(events, lambda: next(asked))
    assert type(seqs[0]) is int and len(ws.history) == 1
    assert [f.exception().status for f in seqs[1:]] == [503, 503]
