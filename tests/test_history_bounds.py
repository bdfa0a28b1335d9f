"""Bounds on what the node retains across workspaces (history.node_bytes), with PROTOCOL.md §7's
gap rule kept exact: a reader from before an evicted event gets history_gap, a reader that
missed nothing does not."""

from __future__ import annotations

import re

from tests.harness.wsclient import ws_connect

BLOB = "x" * 1000  # an event retains ~2.5 KiB: its body, its frame, the objects around them


def _metric(body: bytes, name: str) -> float:
    return float(re.search(rb"^" + name.encode() + rb" (\S+)$", body, re.M).group(1))


async def test_node_history_bound_evicts_from_the_workspaces_retaining_the_most(gateway_factory):
    """A busy workspace passing the node bound loses its own oldest events, not a quiet one's:
    evicting the node's oldest events whichever workspace held them gave w1's two events to
    w2's later ones, and w1's readers history_gap though w1 had published two events."""
    gw = await gateway_factory(env={"RT_HISTORY_NODE_BYTES": "20000"})
    quiet = [(await gw.publish("w1", "t", {"i": i, "blob": BLOB}))["seq"] for i in range(2)]
    # w2's events push the node past its bound again and again: w1's are the oldest.
    busy = [(await gw.publish("w2", "t", {"i": i, "blob": BLOB}))["seq"] for i in range(12)]
    token = gw.token(["w1", "w2"])
    async with ws_connect(gw, "w1", token=token) as c:
        # The quiet workspace keeps what it published: no gap, both events.
        await c.send({"type": "subscribe", "channel": "events:t", "since": quiet[0] - 1})
        await c.recv_type("subscribed")
        assert [(await c.recv_event())["seq"] for _ in quiet] == quiet
        await c.no_message(0.5)
    async with ws_connect(gw, "w2", token=token) as c:
        # From before w2's evicted events: a gap, then what w2 still holds, in order.
        await c.send({"type": "subscribe", "channel": "events:t", "since": busy[0]})
        await c.recv_type("subscribed")
        gap = await c.recv_type("error")
        assert gap["code"] == 4011 and gap["channel"] == "events:t"
        rest = []
        while True:
            try:
                rest.append((await c.recv_event(timeout=0.5))["seq"])
            except TimeoutError:
                break
        assert rest == [s for s in busy if s >= gap["oldest"]] and 0 < len(rest) < len(busy)
    async with ws_connect(gw, "w2", token=token) as c:
        # From the last event: nothing was missed, so no gap even though w2 lost its oldest.
        await c.send({"type": "subscribe", "channel": "events:t", "since": busy[-1]})
        await c.recv_type("subscribed")
        await c.no_message(0.5)
    status, body = await gw.get("/metrics")
    assert _metric(body, "rt_history_node_bytes") <= 20000
    assert _metric(body, "rt_history_node_evicted") >= 1


async def test_a_history_of_no_events_delivers_live_and_reports_every_miss(gateway_factory):
    """history.events 0 was taken, and kept one event: a reader that missed two got the second
    replayed. Now nothing is kept: live delivery goes on, and a reader that missed events gets
    history_gap and no replay; one that missed nothing gets no gap."""
    gw = await gateway_factory(env={"RT_HISTORY_EVENTS": "0"})
    token = gw.token("w1")
    async with ws_connect(gw, "w1", token=token) as live:
        await live.subscribe("events:t")
        seqs = [(await gw.publish("w1", "t", {"i": i}))["seq"] for i in range(2)]
        assert [(await live.recv_event())["payload"]["i"] for _ in seqs] == [0, 1]
    async with ws_connect(gw, "w1", token=token) as c:
        await c.send({"type": "subscribe", "channel": "events:t", "since": seqs[0] - 1})
        await c.recv_type("subscribed")
        gap = await c.recv_type("error")
        assert gap["code"] == 4011 and gap["oldest"] > seqs[-1], gap
        await c.no_message(0.5)
    async with ws_connect(gw, "w1", token=token) as c:
        await c.send({"type": "subscribe", "channel": "events:t", "since": seqs[-1]})
        await c.recv_type("subscribed")
        await c.no_message(0.5)


async def test_a_gap_is_told_on_the_channels_whose_events_were_evicted(gateway_factory):
    """PROTOCOL.md §7: history_gap when an event after `since` *may* have existed that the history
    no longer holds. A busy topic's evictions gave it to every channel's reader, a quiet topic's
    too, whose own events were all kept: its client reloaded for nothing. Wildcards, and the
    quiet topic's reader from before its own evicted event, still get it."""
    gw = await gateway_factory(env={"RT_HISTORY_EVENTS": "5"})
    first_quiet = (await gw.publish("w1", "quiet", {"i": 0}))["seq"]
    quiet = (await gw.publish("w1", "quiet", {"i": 1}))["seq"]
    busy = [(await gw.publish("w1", "busy", {"i": i}))["seq"] for i in range(10)]  # 5 kept: busy[5:]
    gw_token = gw.token("w1")

    async def subscribe(channel: str, since: int) -> tuple[list[int], list[dict]]:
        async with ws_connect(gw, "w1", token=gw_token) as c:
            await c.send({"type": "subscribe", "channel": channel, "since": since})
            await c.recv_type("subscribed")
            seqs, gaps = [], []
            while True:
                try:
                    msg = await c.recv(timeout=0.5)
                except TimeoutError:
                    return seqs, gaps
                if msg["type"] == "event":
                    seqs.append(msg["seq"])
                else:
                    gaps.append(msg)

    # Nothing of events:quiet evicted after `quiet` (the history holds busy[5:] only): no gap,
    # where every channel got one. Nor of a topic that never had an event.
    assert await subscribe("events:quiet", quiet) == ([], [])
    assert await subscribe("events:other", first_quiet) == ([], [])
    # The reader from before quiet's own evicted event, busy's from before busy[4], and the
    # wildcard's (any of the source's evictions) get it.
    seqs, gaps = await subscribe("events:quiet", first_quiet)
    assert seqs == [] and [(g["code"], g["channel"]) for g in gaps] == [(4011, "events:quiet")], gaps
    seqs, gaps = await subscribe("events:busy", busy[3])
    assert seqs == busy[5:] and [g["code"] for g in gaps] == [4011], gaps
    seqs, gaps = await subscribe("events:*", quiet)
    assert seqs == busy[5:] and [g["code"] for g in gaps] == [4011], gaps
    assert await subscribe("events:busy", busy[4]) == (busy[5:], [])


def test_a_history_remembers_a_bounded_number_of_evicted_channels():
    """Past MAX_EVICTED_CHANNELS the channel evicted the longest ago is forgotten, and its
    position counts for every channel: a gap told too often, never one missed."""
    from rtcore.event import Event
    from rtserver.history import MAX_EVICTED_CHANNELS, History

    h = History("w1", max_events=1, max_seconds=3600, max_bytes=1 << 30)
    body = b'{"type":"event","channel":"events:t"}'
    seqs = [h.append(Event("w1", "events", f"t{i}", "PUBLISH", {}, body)).seq
            for i in range(MAX_EVICTED_CHANNELS + 3)]
    # t0 and t1 were forgotten: before t1's eviction, every channel may miss events.
    assert h.gap_for(seqs[1] - 1, "events", "never-evicted") and h.gap_for(seqs[1] - 1, "postgres", "*")
    assert not h.gap_for(seqs[1], "events", "never-evicted") and not h.gap_for(seqs[1], "postgres", "*")
    # Those remembered: a gap from before their own eviction only.
    assert h.gap_for(seqs[1], "events", "t2") and not h.gap_for(seqs[2], "events", "t2")
    assert h.gap_for(seqs[2], "events", "t5") and not h.gap_for(seqs[5], "events", "t5")
    assert h.gap_for(seqs[2], "events", "*") and not h.gap_for(seqs[-2], "events", "*")


def test_node_bound_shares_out_max_min_fairly():
    """In process: each trim takes the oldest event of the history retaining the most, so the
    workspaces under their fair share keep everything and the node bound stays exact."""
    from rtcore.event import Event
    from rtserver import config
    from rtserver.hub import Hub
    from rtserver.metrics import Metrics

    hub = Hub(config.load(environ={"RT_HISTORY_NODE_BYTES": "200000"}), Metrics())
    body = b'{"type":"event","channel":"events:t","blob":"' + b"x" * 400 + b'"}'
    for wid, n in (("small", 10), ("medium", 40)):  # ~16 KB and ~64 KB retained, published first
        for _ in range(n):
            hub.deliver(Event(wid, "events", "t", "PUBLISH", {}, body))
    for _ in range(1000):  # ~1.6 MB, eight times the bound
        hub.deliver(Event("big", "events", "t", "PUBLISH", {}, body))
    sizes = {w: len(hub.workspaces[w].history) for w in ("small", "medium", "big")}
    assert sizes["small"] == 10 and sizes["medium"] == 40, sizes  # under their share: untouched
    assert hub.history_budget.bytes <= 200000
    assert hub.history_budget.evicted == 1000 - sizes["big"]


async def test_idle_workspaces_give_their_memory_back_and_resume_exactly(tmp_path):
    """A workspace with no connection, subscription or retained event is dropped from memory
    after resume_ttl; only its position is kept, so a reader that missed nothing gets no gap
    and one from before an evicted event does. In process, to see the hub's workspaces."""
    import asyncio

    from rtserver.app import Gateway
    from tests.test_churn import Addr, Publisher, _cfg, _token, _until

    gw = Gateway(_cfg(tmp_path, RT_HISTORY_SECONDS="0.5"))
    await gw.start()
    pub = Publisher(gw.port)

    addr = Addr(gw)

    try:
        token = _token(["*"], "u")
        async with ws_connect(addr, "w1", token=token) as c:
            await c.subscribe("events:t")
            first = await pub.publish("w1", "t", {"i": 0})
            last = await pub.publish("w1", "t", {"i": 1})
            assert [(await c.recv_event())["seq"] for _ in range(2)] == [first, last]
            session = (await c.auth(token))["sessionId"]
        for i in range(50):  # many workspaces, each used once
            async with ws_connect(addr, f"once-{i}", token=token) as c:
                await c.subscribe("events:t")
        await _until(lambda: not gw.hub.workspaces, timeout=10, what="idle workspaces to be retired")
        assert len(gw.hub._retired) == 51
        # Back after retirement (the session expired with resume_ttl: subscribe again with
        # since) from the last event seen: nothing missed, no gap.
        async with ws_connect(addr, "w1") as c:
            ok = await c.auth(token, resume=session, since=last)
            assert ok["resumed"] is False
            await c.send({"type": "subscribe", "channel": "events:t", "since": last})
            await c.recv_type("subscribed")
            await c.no_message(0.5)
            seq = await pub.publish("w1", "t", {"i": 2})
            assert (await c.recv_event())["seq"] == seq > last
        async with ws_connect(addr, "w1", token=token) as c:
            # From before events that were evicted (by age): history_gap.
            await c.send({"type": "subscribe", "channel": "events:t", "since": first})
            await c.recv_type("subscribed")
            gap = await c.recv_type("error")
            assert gap["code"] == 4011 and gap["oldest"] == seq
            assert (await c.recv_event())["seq"] == seq
        assert sorted(gw.hub.workspaces) == ["w1"] and len(gw.hub._retired) == 50
    finally:
        await pub.close()
        await gw.shutdown()
    # A default change feed records only into workspaces in memory: theirs are never retired.
    shared = Gateway(_cfg(tmp_path, RT_POSTGRES_URL="postgresql://rt@127.0.0.1:1/app"))
    assert shared._retirable("w1") is False and gw._retirable("w1") is True
    await asyncio.sleep(0)


async def test_known_workspaces_file_holds_each_id_once(tmp_path):
    """A workspace new to the hub again (retired when idle, or not created at start) was
    appended to the state file once more each time: the file grew with every restart."""
    from rtserver.known_workspaces import KnownWorkspaces

    path = tmp_path / "workspaces"
    path.write_text("w1\nw2\nw1\nw2\nw3\n")  # as earlier versions left it
    known = KnownWorkspaces(str(path))
    assert known.load() == ["w1", "w2", "w3"]
    assert path.read_text() == "w1\nw2\nw3\n"  # compacted
    for wid in ("w1", "w2", "w4", "w1", "w4"):
        known.add(wid)
    await known.flush()
    assert path.read_text() == "w1\nw2\nw3\nw4\n"
    again = KnownWorkspaces(str(path))
    assert again.load() == ["w1", "w2", "w3", "w4"]


async def test_a_known_workspaces_line_cut_by_a_crash_does_not_swallow_the_next_id(tmp_path):
    """A crash in the middle of an append left part of an id without its newline: it was read
    back as an id of its own (a workspace nobody has), and the next id appended was joined to
    it ("w12w9"), so that workspace was not remembered at the next start either."""
    from rtserver.known_workspaces import KnownWorkspaces

    path = tmp_path / "workspaces"
    path.write_text("w1\nw12")  # "w123\n" cut short
    known = KnownWorkspaces(str(path))
    assert known.load() == ["w1"]
    known.add("w9")
    await known.flush()
    assert KnownWorkspaces(str(path)).load() == ["w1", "w9"]


async def test_workspaces_no_shared_feed_records_into_are_not_remembered(tmp_path):
    """The known-workspaces state file is read back only for the workspaces a default change
    feed records into (Gateway.start). Every other workspace id the node ever saw was added to
    it (and to a set in memory) all the same, for good: a publisher whose token grants `*`,
    publishing to ids of its choosing, grew both by one entry per id for the life of the node
    and of its state directory, long after those workspaces were retired."""
    import asyncio

    from rtserver.app import Gateway
    from tests.test_churn import Addr, Publisher, _cfg, _token, _until

    gw = Gateway(_cfg(tmp_path, RT_HISTORY_SECONDS="0.3"))
    await gw.start()
    pub = Publisher(gw.port)
    try:
        ids = [f"tenant-{i}" for i in range(40)]
        token = _token(["*"], "svc", publish=True)
        for wid in ids[:30]:
            pub.tokens[wid] = token
            await pub.publish(wid, "t", {"wid": wid})
        for wid in ids[30:]:
            async with ws_connect(Addr(gw), wid, token=token) as c:
                await c.subscribe("events:t")
        await _until(lambda: not gw.hub.workspaces, timeout=10, what="idle workspaces to be retired")
        assert sorted(gw.hub._retired) == sorted(ids)  # their positions are kept (bounded)
        assert len(gw._known._known) == 0
    finally:
        await pub.close()
        await gw.shutdown()
    await asyncio.sleep(0)
    path = tmp_path / "workspaces"
    assert not path.exists() or path.read_text() == ""


def test_history_series_only_for_the_workspaces_retaining_the_most():
    """A series pair per workspace holding events made a scrape of 100,000 workspaces a
    0.3-1 s stall of the event loop (8 MB of text): only the HISTORY_SERIES_MAX workspaces
    retaining the most bytes get one; the node totals cover the rest."""
    from rtcore.event import Event
    from rtserver import config
    from rtserver.hub import HISTORY_SERIES_MAX, Hub
    from rtserver.metrics import Metrics

    metrics = Metrics()
    hub = Hub(config.load(environ={}), metrics)
    n = HISTORY_SERIES_MAX + 50
    for i in range(n):  # workspace w{i} retains i + 1 events
        for _ in range(i + 1):
            hub.deliver(Event(f"w{i}", "events", "t", "PUBLISH", {}, b'{"type":"event","channel":"events:t"}'))
    text = metrics.render().decode()
    series = re.findall(r'^rt_history_bytes\{workspace="(w\d+)"\} \d+$', text, re.M)
    assert sorted(series, key=lambda w: int(w[1:])) == [f"w{i}" for i in range(n - HISTORY_SERIES_MAX, n)]
    assert len(re.findall(r"^rt_history_events\{", text, re.M)) == HISTORY_SERIES_MAX
    assert _metric(text.encode(), "rt_workspaces") == n


async def test_a_slow_replay_holds_no_event_the_history_has_evicted(tmp_path, monkeypatch):
    """A replay that leaves in pieces held the entries it began with until the client had read
    them all, those the history evicted meanwhile too: a client reading a little now and then
    kept up to history.bytes alive outside every bound, and each such client its own window
    (30 of them raised a gateway from 64 MB to 455 MB). The replay now reads the history
    afresh for each piece: what was evicted before the client got to it is reported with a
    history_gap, as for any reader from before an eviction, then the replay goes on from what
    the history holds, and live after it."""
    import asyncio
    import json
    import socket

    import jwt
    import websockets

    from tests.harness.http_wire import post_request, read_answer
    from tests.test_http_pipelining import SECRET, in_process_gateway

    size = 600
    gw, _ = await in_process_gateway(tmp_path, monkeypatch, RT_HISTORY_EVENTS=str(size),
                                     RT_SEND_BUFFER_BYTES=str(1 << 20))
    token = jwt.encode({"sub": "u", "workspaces": ["w1"], "realtime_publish": True, "exp": 4102444800},
                       SECRET, algorithm="HS256")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)

    async def publish(payloads: list[dict]) -> list[int]:
        writer.write(b"".join(post_request("/workspaces/w1/realtime/events/t", token, p) for p in payloads))
        answers = [await read_answer(reader) for _ in payloads]
        assert {status for status, _, _ in answers} == {202}
        return [json.loads(body)["seq"] for _, _, body in answers]

    try:
        first = (await publish([{"i": i, "pad": "x" * 20000} for i in range(size)]))[0]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client takes little at a time
        sock.connect(("127.0.0.1", gw.port))
        async with websockets.connect(f"ws://127.0.0.1:{gw.port}/workspaces/w1/realtime/connect", sock=sock,
                                      max_size=None, max_queue=1) as ws:
            await ws.send(json.dumps({"type": "auth", "token": token}))
            assert json.loads(await ws.recv())["type"] == "auth_ok"
            await ws.send(json.dumps({"type": "subscribe", "channel": "events:t", "since": first - 1}))
            assert json.loads(await ws.recv())["type"] == "subscribed"
            seen = -1
            while seen != gw.metrics.replayed:  # until the replay waits for the client
                seen = gw.metrics.replayed
                await asyncio.sleep(0.3)
            assert seen < size, "the whole replay was taken at once: the test needs a slower client"
            later = await publish([{"i": size + i} for i in range(size)])  # evicts every event of before
            got, gaps = [], []
            while not got or got[-1] != size * 2 - 1:
                msg = json.loads(await ws.recv())
                if msg["type"] == "error":
                    gaps.append((msg["code"], msg["oldest"], len(got)))
                else:
                    got.append(msg["payload"]["i"])
        cut = gaps[0][2] if gaps else len(got)
        assert got[:cut] == list(range(cut)) and cut < size  # what was already on its way
        assert gaps == [(4011, later[0], cut)]
        assert got[cut:] == list(range(size, size * 2))
    finally:
        writer.close()
        await gw.shutdown()


async def test_the_history_bound_counts_what_a_retained_event_holds_decoded(tmp_path):
    """The bound counted an event's frame and JSON body, but a retained event also holds its
    payload decoded (for filtered replays): 20-40 times the JSON for nested arrays and small
    objects. A publisher of 200 KB payloads of small arrays kept 66 MB under a 16 MB
    history.bytes (and the 1 GiB node bound was ~20 GB). The bound now counts them too,
    estimated from the JSON's structure: the memory retained stays within a few times it."""
    import gc
    import sys

    from rtserver.app import Gateway
    from tests.test_churn import Publisher, _cfg

    def weight(value) -> int:  # the Python objects of a decoded JSON value
        if isinstance(value, dict):
            return sys.getsizeof(value) + sum(weight(k) + weight(v) for k, v in value.items())
        if isinstance(value, list):
            return sys.getsizeof(value) + sum(weight(v) for v in value)
        return sys.getsizeof(value)

    bound = 16 << 20
    gw = Gateway(_cfg(tmp_path, RT_HISTORY_BYTES=str(bound)))
    await gw.start()
    pub = Publisher(gw.port)
    try:
        payload = [[i % 7, -(i % 5)] for i in range(20000)]  # ~200 KB of JSON
        for _ in range(20):
            await pub.publish("w1", "t", payload)
        gc.collect()
        entries = list(gw.hub.workspace("w1").history._entries)
        held = sum(len(e.frame) + len(e.event.body) + weight(e.event.record) for e in entries)
        assert len(entries) >= 1
        assert held < 2 * bound, (len(entries), held)
    finally:
        await pub.close()
        await gw.shutdown()
