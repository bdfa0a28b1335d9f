"""rtserver.client against a real gateway: subscriptions, lossless resume across network loss,
history_gap after a gateway restart, token expiry and refresh, terminal refusals."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from rtserver.client import RealtimeClient, RealtimeError, channel_matches, token_expiry
from tests.harness.tcpproxy import TcpProxy

FAST = {"backoff_initial": 0.05, "backoff_max": 0.4}


async def wait_for(predicate: Callable[[], bool], timeout: float = 5, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_subscribe_receives_matching_events_and_unsubscribe_stops_them(gateway):
    got: list[dict] = []
    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1")) as client:
        unsubscribe = await client.subscribe("events:orders", {"predicates": {"big": True}}, got.append)
        a = await gateway.publish("w1", "orders", {"big": True, "n": 1})
        await gateway.publish("w1", "orders", {"big": False, "n": 2})
        c = await gateway.publish("w1", "orders", {"big": True, "n": 3})
        await wait_for(lambda: len(got) >= 2, what="two events")
        assert [(e["seq"], e["payload"]["n"], e["channel"]) for e in got] == [
            (a["seq"], 1, "events:orders"), (c["seq"], 3, "events:orders")]
        unsubscribe()
        other: list[dict] = []
        await client.subscribe("events:other", None, other.append)  # after the unsubscribe's round trip
        await gateway.publish("w1", "orders", {"big": True, "n": 4})
        d = await gateway.publish("w1", "other", {"n": 5})
        await wait_for(lambda: len(other) == 1, what="event on events:other")
        assert other[0]["seq"] == d["seq"]
        assert len(got) == 2
    assert client.state == "closed"


async def test_events_iterator_with_header_auth(gateway):
    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1"), header_auth=True) as client:
        await client.subscribe("events:*", {"entity": "a"})
        events = client.events()
        seqs = [(await gateway.publish("w1", "a" if i % 2 == 0 else "b", {"i": i}))["seq"] for i in range(6)]
        want = seqs[0::2]
        seen = []
        async for ev in events:
            seen.append(ev["seq"])
            if len(seen) == len(want):
                break
        assert seen == want


async def test_refused_subscription_raises_with_code(gateway):
    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1")) as client:
        with pytest.raises(RealtimeError) as info:
            await client.subscribe("nosuch:thing")
        assert (info.value.code, info.value.channel) == (4010, "nosuch:thing")
        assert client.state == "open"


async def test_network_loss_resumes_and_every_event_arrives_exactly_once(gateway):
    proxy = await TcpProxy(gateway.port).start()
    got: list[int] = []
    client = RealtimeClient(f"ws://127.0.0.1:{proxy.port}/workspaces/w1/realtime/connect",
                            lambda: gateway.token("w1"), **FAST)
    published: list[int] = []
    stop = asyncio.Event()

    async def publisher() -> None:
        i = 0
        while not stop.is_set():
            published.append((await gateway.publish("w1", "flow", {"i": i}))["seq"])
            i += 1

    try:
        await client.connect()
        await client.subscribe("events:flow", None, lambda e: got.append(e["seq"]))
        task = asyncio.create_task(publisher())
        for cut in range(3):
            await wait_for(lambda cut=cut: len(published) > (cut + 1) * 10, 10, "publishing")
            proxy.cut()
            await wait_for(lambda cut=cut: client.state == "open" and len(client.resumed) == cut + 2, 10, "reconnect")
        stop.set()
        await task
        await wait_for(lambda: len(got) >= len(published), 10, f"{len(published)} events")
        await asyncio.sleep(0.2)
        assert got == published
        assert client.resumed == [False, True, True, True]
    finally:
        await client.close()
        await proxy.close()


async def test_gateway_restart_resubscribes_and_surfaces_history_gap(gateway):
    gaps: list[dict] = []
    got: list[dict] = []
    client = RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1"), on_gap=gaps.append, **FAST)
    try:
        await client.connect()
        await client.subscribe("events:r", None, got.append)
        items = client.events()
        before = await gateway.publish("w1", "r", {"n": 1})
        await wait_for(lambda: len(got) == 1, what="first event")
        await gateway.restart()  # drained: the session survives, the in-memory history does not
        await wait_for(lambda: len(client.resumed) == 2 and client.state == "open", 15, "reconnect")
        assert client.resumed == [False, True]
        assert 1001 in client.closes
        await wait_for(lambda: len(gaps) == 1, what="history_gap")
        assert gaps[0]["channel"] == "events:r" and gaps[0]["oldest"] > before["seq"]
        # re-subscribed automatically: live events flow again
        after = await gateway.publish("w1", "r", {"n": 2})
        await wait_for(lambda: len(got) == 2, what="event after restart")
        assert got[1]["seq"] == after["seq"]
        kinds = []
        async for item in items:
            kinds.append(item["type"])
            if len(kinds) == 3:
                break
        assert kinds == ["event", "history_gap", "event"]
    finally:
        await client.close()


async def test_token_expired_4001_refetches_token_and_resumes_at_once(gateway):
    calls = []

    def get_token() -> str:
        calls.append(time.monotonic())
        return gateway.token("w1", ttl=2 if len(calls) == 1 else 3600)

    got: list[dict] = []
    # A backoff of >= 5 s would show: the reconnect after 4001 must not wait for it.
    client = RealtimeClient(gateway.ws_url("w1"), get_token, proactive_refresh=False, backoff_initial=10)
    try:
        await client.connect()
        await client.subscribe("events:x", None, got.append)
        await wait_for(lambda: client.closes == [4001], 8, "the 4001 close")
        await wait_for(lambda: len(client.resumed) == 2 and client.state == "open", 2, "reconnect")
        assert client.resumed == [False, True] and len(calls) == 2
        e = await gateway.publish("w1", "x", {})
        await wait_for(lambda: len(got) == 1, what="event")
        assert got[0]["seq"] == e["seq"]
    finally:
        await client.close()


async def test_proactive_refresh_keeps_the_connection_past_exp(gateway):
    calls = []

    def get_token() -> str:
        calls.append(1)
        return gateway.token("w1", ttl=3)

    got: list[dict] = []
    async with RealtimeClient(gateway.ws_url("w1"), get_token) as client:
        await client.subscribe("events:x", None, got.append)
        await wait_for(lambda: len(calls) >= 4, 10, "three refreshes")  # 3 s tokens, > 6 s in
        assert client.closes == [] and client.state == "open"
        e = await gateway.publish("w1", "x", {})
        await wait_for(lambda: len(got) == 1, what="event")
        assert got[0]["seq"] == e["seq"]


@pytest.mark.parametrize("case", ["scope_denied", "token_invalid"])
async def test_terminal_codes_raise_and_stop_reconnecting(gateway, case):
    proxy = await TcpProxy(gateway.port).start()
    if case == "scope_denied":
        token, code = gateway.token("w2"), 4003
    else:
        token, code = gateway.token("w1", secret="another-secret-0123456789abcdef0123"), 4002
    calls = []
    client = RealtimeClient(f"ws://127.0.0.1:{proxy.port}/workspaces/w1/realtime/connect",
                            lambda: calls.append(1) or token, **FAST)
    try:
        with pytest.raises(RealtimeError) as info:
            await client.connect()
        assert info.value.code == code and info.value.terminal
        assert client.state == "closed" and client.error is info.value
        await asyncio.sleep(0.5)  # several backoff periods
        assert proxy.accepted == 1 and len(calls) == 1
    finally:
        await client.close()
        await proxy.close()


async def test_unreachable_gateway_backs_off_then_connects(gateway):
    proxy = await TcpProxy(gateway.port).start()
    proxy.hold = True
    client = RealtimeClient(f"ws://127.0.0.1:{proxy.port}/workspaces/w1/realtime/connect",
                            lambda: gateway.token("w1"), **FAST)
    try:
        task = asyncio.create_task(client.connect())
        await wait_for(lambda: proxy.accepted >= 3, 5, "retries")
        proxy.hold = False
        await asyncio.wait_for(task, 5)
        assert client.state == "open" and client.attempt == 0
    finally:
        await client.close()
        await proxy.close()


def test_token_expiry_and_channel_routing():
    import jwt

    exp = int(time.time()) + 100
    assert token_expiry(jwt.encode({"exp": exp}, "k" * 32, algorithm="HS256")) == exp
    assert token_expiry("not-a-jwt") is None
    assert channel_matches("postgres:*", "postgres:products")
    assert channel_matches("postgres:*", "postgres:products", {"entity": "products"})
    assert not channel_matches("postgres:*", "postgres:orders", {"entity": "products"})
    assert not channel_matches("mongo:*", "postgres:orders")
