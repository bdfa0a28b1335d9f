"""Bounds on what the node retains across workspaces (history.node_bytes), with PROTOCOL.md §7's
gap rule kept exact: a reader from before an evicted event gets history_gap, a reader that
missed nothing does not."""

from __future__ import annotations

import re

from tests.harness.wsclient import ws_connect

BLOB = "x" * 1000  # an event retains ~2 KiB: its body and its frame


def _metric(body: bytes, name: str) -> float:
    return float(re.search(rb"^" + name.encode() + rb" (\S+)$", body, re.M).group(1))


async def test_node_history_bound_evicts_the_oldest_events_node_wide(gateway_factory):
    gw = await gateway_factory(env={"RT_HISTORY_NODE_BYTES": "20000"})
    old = [(await gw.publish("w1", "t", {"i": i, "blob": BLOB}))["seq"] for i in range(5)]
    # Another workspace's events push the node past its bound: w1's are the oldest.
    new = [(await gw.publish("w2", "t", {"i": i, "blob": BLOB}))["seq"] for i in range(6)]
    token = gw.token(["w1", "w2"])
    async with ws_connect(gw, "w1", token=token) as c:
        # From before the evicted events: a gap, then what w1 still holds, in order.
        await c.send({"type": "subscribe", "channel": "events:t", "since": old[0]})
        await c.recv_type("subscribed")
        gap = await c.recv_type("error")
        assert gap["code"] == 4011 and gap["channel"] == "events:t"
        rest = []
        while True:
            try:
                rest.append((await c.recv_event(timeout=0.5))["seq"])
            except TimeoutError:
                break
        assert rest == [s for s in old if s >= gap["oldest"]] and len(rest) < len(old)
    async with ws_connect(gw, "w1", token=token) as c:
        # From the last event: nothing was missed, so no gap even though w1 lost its oldest.
        await c.send({"type": "subscribe", "channel": "events:t", "since": old[-1]})
        await c.recv_type("subscribed")
        await c.no_message(0.5)
    async with ws_connect(gw, "w2", token=token) as c:
        # The newest events are kept: a reader of w2 from its first event misses nothing.
        await c.send({"type": "subscribe", "channel": "events:t", "since": new[0]})
        await c.recv_type("subscribed")
        assert [(await c.recv_event())["seq"] for _ in new[1:]] == new[1:]
        await c.no_message(0.5)
    status, body = await gw.get("/metrics")
    assert _metric(body, "rt_history_node_bytes") <= 20000
    assert _metric(body, "rt_history_node_evicted") >= 1
