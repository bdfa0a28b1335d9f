"""rtserver.client against a real gateway: subscriptions, lossless resume across network loss,
history_gap after a gateway restart, token expiry and refresh, terminal refusals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import time
from collections.abc import Callable

import pytest

from rtserver.client import RealtimeClient, RealtimeError, channel_matches, token_expiry
from tests.harness.fixtures_gateway import free_port
from tests.harness.tcpproxy import TcpProxy

FAST = {"backoff_initial": 0.05, "backoff_max": 0.4}


def proxied(proxy: TcpProxy, workspace: str = "w1") -> str:
    """The connect URL of `workspace` through `proxy`."""
    return f"ws://127.0.0.1:{proxy.port}/workspaces/{workspace}/realtime/connect"


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
        with pytest.raises(RealtimeError) as info:  # the gateway's 4000 names no channel: matched by id
            await asyncio.wait_for(client.subscribe("events:x", {"bogus": 1}), 5)
        assert (info.value.code, info.value.channel) == (4000, "events:x")
        assert client.state == "open"


async def test_network_loss_resumes_and_every_event_arrives_exactly_once(gateway):
    proxy = await TcpProxy(gateway.port).start()
    got: list[int] = []
    client = RealtimeClient(proxied(proxy),
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


async def test_a_history_gap_reaches_the_iterator_of_a_narrowed_wildcard_channel(gateway):
    client = RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1"), **FAST)
    try:
        await client.connect()
        items = client.events("events:*")
        await client.subscribe("events:*", {"entity": "r"})
        first = await gateway.publish("w1", "r", {})
        assert (await asyncio.wait_for(items.__anext__(), 5))["seq"] == first["seq"]
        await gateway.restart()  # the in-memory history is gone: the resume reports a gap
        gap = await asyncio.wait_for(items.__anext__(), 15)
        assert (gap["type"], gap["channel"]) == ("history_gap", "events:*")
    finally:
        await client.close()


async def test_token_expired_4001_refetches_token_and_resumes_at_once(gateway):
    calls = []

    def get_token() -> str:
        calls.append(time.monotonic())
        return gateway.token("w1", ttl=2 if len(calls) == 1 else 3600)

    got: list[dict] = []
    # A backoff (30 s here) would show: the reconnect after 4001 must not wait for it. The wait
    # for it is 10 s, not 2: a reconnect took longer on a loaded machine.
    client = RealtimeClient(gateway.ws_url("w1"), get_token, proactive_refresh=False, backoff_initial=30)
    try:
        await client.connect()
        await client.subscribe("events:x", None, got.append)
        await wait_for(lambda: client.closes == [4001], 8, "the 4001 close")
        await wait_for(lambda: len(client.resumed) == 2 and client.state == "open", 10, "reconnect")
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


async def test_a_device_clock_ahead_of_the_issuer_does_not_refresh_in_a_loop(gateway_factory):
    # A device whose clock is 400 s fast, 300 s tokens: every fresh token looks 100 s expired to
    # it. The gateway (and the issuer, Gateway.token) run 400 s behind instead, which the client
    # cannot tell apart. It refreshed as fast as the gateway answered (a token request and an
    # audit record each), for good.
    gw = await gateway_factory(clock_offset=-400)
    calls: list[float] = []

    def get_token() -> str:
        calls.append(time.monotonic())
        return gw.token("w1", ttl=300)

    async with RealtimeClient(gw.ws_url("w1"), get_token) as client:
        await asyncio.sleep(5)
        assert client.state == "open" and client.closes == []
        assert len(calls) <= 3, f"{len(calls)} tokens fetched in 5 s"

    # Short tokens on that device are still refreshed before they expire at the gateway.
    short: list[float] = []

    def short_token() -> str:
        short.append(time.monotonic())
        return gw.token("w1", ttl=6)

    async with RealtimeClient(gw.ws_url("w1"), short_token) as client:
        await asyncio.sleep(9)  # past the first token's exp at the gateway
        assert client.state == "open" and client.closes == [], client.closes
        assert len(short) >= 3


async def test_a_device_clock_ahead_of_the_issuer_still_reconnects_at_once_after_4001(gateway_factory):
    # The fresh 300 s token looks 100 s expired to a device 400 s fast (the gateway runs 400 s
    # behind here): it was taken for a stale one, and the client backed off after every 4001.
    gw = await gateway_factory(clock_offset=-400)
    calls: list[int] = []

    def get_token() -> str:
        calls.append(1)
        return gw.token("w1", ttl=2 if len(calls) == 1 else 300)

    # A backoff (30 s here) would show: the reconnect after 4001 must not wait for it.
    client = RealtimeClient(gw.ws_url("w1"), get_token, proactive_refresh=False, backoff_initial=30)
    try:
        await client.connect()
        await wait_for(lambda: client.closes == [4001], 8, "the 4001 close")
        await wait_for(lambda: len(client.resumed) == 2 and client.state == "open", 10, "reconnect")
        assert client.resumed == [False, True] and len(calls) == 2
    finally:
        await client.close()


@pytest.mark.parametrize("path", ["/workspaces/bad.id/realtime/connect", "/realtime/connect"])
async def test_a_404_to_the_upgrade_is_terminal(gateway, path):
    # A wrong URL: the gateway answers a malformed workspace id and any other path with HTTP 404
    # before the upgrade. It was retried for good, connect() never returned, on_error heard nothing.
    errors: list[RealtimeError] = []
    calls: list[int] = []
    client = RealtimeClient(f"ws://127.0.0.1:{gateway.port}{path}", lambda: calls.append(1) or gateway.token("w1"),
                            on_error=errors.append, **FAST)
    try:
        with pytest.raises(RealtimeError) as info:
            await asyncio.wait_for(client.connect(), 5)
        err = info.value
        assert (err.code, err.name, err.terminal) == (404, "upgrade_refused", True)
        assert "HTTP 404" in str(err) and path in str(err)
        assert client.state == "closed" and client.error is not None and client.error.code == 404
        assert [e.code for e in errors] == [404]
        await asyncio.sleep(0.5)  # several backoff periods: no retry
        assert len(calls) == 1
    finally:
        await client.close()


async def test_an_http_url_is_taken_as_ws_and_one_that_is_no_websocket_url_raises_at_once(gateway):
    # http://host:port/... (the gateway's own URL, as its HTTP API is written) failed every attempt
    # in websockets' URL parser: the loop retried it for good, connect() never returned and
    # on_error heard nothing. The JS client's runtimes take it as ws://; so does this one now.
    errors: list[RealtimeError] = []
    url = f"http://127.0.0.1:{gateway.port}/workspaces/w1/realtime/connect"
    async with asyncio.timeout(10):
        async with RealtimeClient(url, lambda: gateway.token("w1"), on_error=errors.append, **FAST) as client:
            assert client.url == f"ws://127.0.0.1:{gateway.port}/workspaces/w1/realtime/connect"
            got: list[dict] = []
            await client.subscribe("events:u", None, got.append)
            sent = await gateway.publish("w1", "u", {"n": 1})
            await wait_for(lambda: len(got) == 1, what="the event")
            assert got[0]["seq"] == sent["seq"] and errors == []
    for bad in ("ws//127.0.0.1/workspaces/w1/realtime/connect", "ftp://127.0.0.1/x", "ws://127.0.0.1:99999/x"):
        with pytest.raises(ValueError, match="no WebSocket URL"):
            RealtimeClient(bad, lambda: "unused")


async def test_an_auth_timeout_is_retried_not_the_end(gateway_factory):
    # A 4002 after the error "auth timeout" says the auth message came too late (a frozen
    # process, a stalled link), not that the token is bad: it was terminal, the client stopped
    # for good. Here every chunk the client sends reaches the gateway 1 s late, well past its 0.2 s.
    gw = await gateway_factory(env={"RT_AUTH_TIMEOUT": "0.2"})
    proxy = await TcpProxy(gw.port).start()
    proxy.upstream_delay = 1.0
    errors: list[RealtimeError] = []
    client = RealtimeClient(proxied(proxy),
                            lambda: gw.token("w1"), on_error=errors.append, **FAST)
    try:
        connecting = asyncio.ensure_future(client.connect())
        await wait_for(lambda: client.closes.count(4002) >= 2, 10, "timed-out attempts")
        assert not connecting.done() and client.state == "reconnecting" and client.error is None
        # Once across the attempts, as a retried close, with the gateway's reason.
        assert [(e.code, str(e)) for e in errors] == [(4002, "connection closed: token_invalid: auth timeout; retrying")]
        proxy.upstream_delay = 0.0
        await asyncio.wait_for(connecting, 10)
        assert client.state == "open"
    finally:
        await client.close()
        await proxy.close()


async def test_a_gateway_that_cannot_be_reached_is_reported_once_and_retried(gateway):
    # No WebSocket at all (here every connection is dropped at once, as by a gateway that is
    # down): the client retried for good with nothing but a log line and on_state, and an
    # application could not tell the gateway down from a slow start. Now on_error hears it once
    # (not at every attempt), and the client gets in when the gateway answers.
    proxy = await TcpProxy(gateway.port).start()
    proxy.hold = True
    errors: list[RealtimeError] = []
    client = RealtimeClient(proxied(proxy),
                            lambda: gateway.token("w1"), on_error=errors.append, **FAST)
    try:
        connecting = asyncio.ensure_future(client.connect())
        await wait_for(lambda: proxy.accepted >= 4, 5, "failed attempts")
        assert not connecting.done() and client.state == "reconnecting"
        assert [(e.code, e.name, e.terminal) for e in errors] == [(0, "connect_failed", False)]
        assert f"cannot connect to ws://127.0.0.1:{proxy.port}/" in str(errors[0]) and "retrying" in str(errors[0])
        proxy.hold = False
        await asyncio.wait_for(connecting, 10)
        assert client.state == "open" and len(errors) == 1
    finally:
        await client.close()
        await proxy.close()


async def test_a_404_once_connected_is_retried_and_reported_once(gateway):
    # Once a connection has succeeded the URL is right: a 404 then is a proxy's or a load
    # balancer's during a deploy, retried with the backoff (and reported once), not the end.
    proxy = await TcpProxy(gateway.port).start()
    errors: list[RealtimeError] = []
    client = RealtimeClient(proxied(proxy),
                            lambda: gateway.token("w1"), on_error=errors.append, **FAST)
    try:
        await asyncio.wait_for(client.connect(), 5)
        proxy.answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nno route!"
        refused = proxy.accepted
        proxy.cut()
        await wait_for(lambda: proxy.accepted - refused >= 3, 5, "refused attempts")
        assert client.state == "reconnecting" and client.error is None
        # The lost link (a connection had succeeded), then the 404, each once.
        assert _described(errors) == [(1006, "abnormal_closure", False), (404, "upgrade_refused", False)]
        proxy.answer = None
        await wait_for(lambda: client.state == "open", 5, "the connection back")
        assert len(errors) == 2
    finally:
        await client.close()
        await proxy.close()


async def test_a_503_to_the_upgrade_is_retried_and_reported_once(gateway_factory):
    # A gateway at its connection limit answers HTTP 503 before the upgrade: retried with the
    # backoff (it may have room later), but it reached on_error not at all, and an operator saw
    # only 1006 in `closes`. Now once, not at every attempt, with the reason the gateway gives.
    gw = await gateway_factory(env={"RT_MAX_NODE_CONNECTIONS": "1"})
    errors: list[RealtimeError] = []
    async with RealtimeClient(gw.ws_url("w1"), lambda: gw.token("w1")) as holder:
        client = RealtimeClient(gw.ws_url("w1"), lambda: gw.token("w1"), on_error=errors.append, **FAST)
        try:
            connecting = asyncio.ensure_future(client.connect())
            await wait_for(lambda: len(client.closes) >= 4, 5, "refused attempts")
            assert not connecting.done() and client.state == "reconnecting"
            assert [(e.code, e.name, e.terminal) for e in errors] == [(503, "upgrade_refused", False)]
            assert "HTTP 503" in str(errors[0]) and "limit of 1 connections" in str(errors[0])
            assert '"error"' not in str(errors[0])  # what the JSON says, not the JSON
            await holder.close()  # room again: the retry gets in
            await asyncio.wait_for(connecting, 5)
            assert client.state == "open" and len(errors) == 1
        finally:
            await client.close()


@pytest.mark.parametrize("case", ["scope_denied", "token_invalid"])
async def test_terminal_codes_raise_and_stop_reconnecting(gateway, case):
    proxy = await TcpProxy(gateway.port).start()
    if case == "scope_denied":
        token, code = gateway.token("w2"), 4003
    else:
        token, code = gateway.token("w1", secret="another-secret-0123456789abcdef0123"), 4002
    calls = []
    errors: list[RealtimeError] = []
    client = RealtimeClient(proxied(proxy),
                            lambda: calls.append(1) or token, on_error=errors.append, **FAST)
    try:
        with pytest.raises(RealtimeError) as info:
            await client.connect()
        assert info.value.code == code and info.value.terminal
        assert client.state == "closed" and client.error is info.value
        # Reported once, with the gateway's reason (on_error got the reason, then the terminal
        # error again, and connect() raised "connection closed: token_invalid", no reason).
        assert errors == [info.value]
        reason = "does not grant workspace w1" if code == 4003 else "signature"
        assert reason in str(info.value), str(info.value)
        await asyncio.sleep(0.5)  # several backoff periods
        assert proxy.accepted == 1 and len(calls) == 1
    finally:
        await client.close()
        await proxy.close()


async def test_unreachable_gateway_backs_off_then_connects(gateway):
    proxy = await TcpProxy(gateway.port).start()
    proxy.hold = True
    client = RealtimeClient(proxied(proxy),
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
    assert channel_matches("postgres:public.products", "postgres:products")
    assert channel_matches("postgres:*", "postgres:products", {"entity": "public.products"})
    assert not channel_matches("postgres:*", "postgres:sales.products", {"entity": "products"})
    assert channel_matches("postgres:sales.products", "postgres:sales.products")
    assert not channel_matches("events:*", "events:order.created", {"entity": "created"})
    assert not channel_matches("events:public.x", "events:x")  # only PostgreSQL has schemas
    # a history_gap notice names the subscription's channel as it was written
    assert channel_matches("events:*", "events:*", {"entity": "created"})
    assert channel_matches("postgres:public.products", "postgres:public.products")


@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999999])
def test_backoff_follows_the_schedule_from_1_s_to_30_s(monkeypatch, rand):
    # The product's schedule (1 s doubling to 30 s); the jitter only lengthens a wait, up to
    # half as long again, and never past the maximum (it used to halve it: 0.5 s first).
    import rtserver.client

    monkeypatch.setattr(rtserver.client.random, "random", lambda: rand)
    client = RealtimeClient("ws://127.0.0.1:9/workspaces/w1/realtime/connect", lambda: "unused")
    waits = []
    for attempt in range(8):
        client.attempt = attempt
        waits.append(client._backoff())
    schedule = [1, 2, 4, 8, 16, 30, 30, 30]
    assert all(s <= w <= min(30, s * 1.5) for s, w in zip(schedule, waits, strict=True)), waits
    if rand == 0.0:
        assert waits == schedule


# ---- reconnect edge cases ------------------------------------------------------------------


def publish_many(gateway, workspace: str, topic: str, n: int) -> list[int]:
    """Publishes n events over one keep-alive connection (in a thread); returns their seqs."""
    import http.client
    import json

    headers = {"Authorization": f"Bearer {gateway.token(workspace, publish=True)}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    seqs = []
    try:
        for i in range(n):
            conn.request("POST", f"/workspaces/{workspace}/realtime/events/{topic}", json.dumps({"i": i}), headers)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 202, (resp.status, body)
            seqs.append(json.loads(body)["seq"])
    finally:
        conn.close()
    return seqs


async def test_a_get_token_that_never_answers_is_reported_and_retried(gateway):
    # A token service's request hanging on a dead link: the client waited for it for good,
    # "connecting" with nothing reported. Past open_timeout it now counts as a failed get_token.
    calls: list[int] = []

    async def get_token() -> str:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.Event().wait()  # never answers
        return gateway.token("w1")

    errors: list[RealtimeError] = []
    client = RealtimeClient(gateway.ws_url("w1"), get_token, on_error=errors.append, open_timeout=0.3, **FAST)
    try:
        await asyncio.wait_for(client.connect(), 10)
        assert client.state == "open" and len(calls) == 2
        assert [(e.code, e.name, e.terminal) for e in errors] == [(0, "token_unavailable", False)]
        assert isinstance(errors[0].__cause__, TimeoutError) and "did not answer within 0.3 s" in str(errors[0])
    finally:
        await client.close()


async def test_get_token_failure_is_reported_and_retried_with_backoff(gateway):
    proxy = await TcpProxy(gateway.port).start()
    calls: list[int] = []

    def get_token() -> str:
        calls.append(1)
        if len(calls) in (1, 3):  # the first connection, and the reconnect after the cut
            raise RuntimeError("token service 503")
        return gateway.token("w1")

    errors: list[RealtimeError] = []
    got: list[dict] = []
    client = RealtimeClient(proxied(proxy), get_token, on_error=errors.append, **FAST)
    try:
        await asyncio.wait_for(client.connect(), 5)
        await client.subscribe("events:t", None, got.append)
        proxy.cut()
        await wait_for(lambda: len(client.resumed) == 2 and client.state == "open", 5, "reconnect")
        e = await gateway.publish("w1", "t", {})
        await wait_for(lambda: len(got) == 1, what="event after the reconnect")
        assert got[0]["seq"] == e["seq"] and len(calls) == 4
        assert [err.name for err in errors] == ["token_unavailable", "abnormal_closure", "token_unavailable"]
        assert isinstance(errors[0].__cause__, RuntimeError) and not errors[0].terminal
    finally:
        await client.close()
        await proxy.close()


async def test_a_failed_refresh_is_retried_while_the_token_lasts(gateway):
    """One failure of the token service at the refresh cost a disconnect: the refresh was not
    tried again, and the gateway closed with 4001 at exp. It is retried with the backoff."""
    calls: list[int] = []

    def get_token() -> str:
        calls.append(1)
        if len(calls) == 2:  # the proactive refresh
            raise RuntimeError("token service 503")
        return gateway.token("w1", ttl=3 if len(calls) == 1 else 3600)

    errors: list[RealtimeError] = []
    client = RealtimeClient(gateway.ws_url("w1"), get_token, on_error=errors.append, **FAST)
    try:
        await client.connect()
        await wait_for(lambda: len(calls) == 3, 10, "the refresh tried again")
        await asyncio.sleep(3)  # past the first token's exp
        assert client.state == "open" and client.closes == [] and client.resumed == [False]
        assert [e.name for e in errors] == ["token_unavailable"] and isinstance(errors[0].__cause__, RuntimeError)
    finally:
        await client.close()


async def test_a_refresh_failing_until_exp_is_reported_and_the_4001_that_follows_reconnects(gateway):
    calls: list[int] = []
    exp: list[float] = []

    def get_token() -> str:
        calls.append(1)
        if len(calls) > 1 and time.time() < exp[0]:  # the token service is down until the token's end
            raise RuntimeError("token service 503")
        exp.append(time.time() + 3)
        return gateway.token("w1", ttl=3 if len(calls) == 1 else 3600)

    errors: list[RealtimeError] = []
    client = RealtimeClient(gateway.ws_url("w1"), get_token, on_error=errors.append, **FAST)
    try:
        await client.connect()
        await wait_for(lambda: len(client.resumed) == 2 and client.state == "open", 10, "the reconnect after 4001")
        assert client.closes == [4001] and client.resumed == [False, True] and len(calls) > 3
        failed = [e for e in errors if e.code != 4001]  # the gateway's error before its 4001 close
        assert {e.name for e in failed} == {"token_unavailable"} and len(failed) == len(calls) - 2, failed
    finally:
        await client.close()


async def test_exceptions_raised_by_callbacks_are_logged_and_swallowed(gateway, caplog):
    def boom(*_: object) -> None:
        raise RuntimeError("a bug in a callback")

    got: list[dict] = []
    client = RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1"), on_state=boom, on_error=boom, **FAST)
    try:
        await asyncio.wait_for(client.connect(), 5)
        with pytest.raises(RealtimeError) as info:
            await client.subscribe("nosuch:thing")  # on_error raises
        assert info.value.code == 4010
        await client.subscribe("events:cb", None, boom)
        await client.subscribe("events:cb2", None, got.append)
        await gateway.publish("w1", "cb", {})
        e = await gateway.publish("w1", "cb2", {})
        await wait_for(lambda: len(got) == 1, what="event")
        assert got[0]["seq"] == e["seq"] and client.state == "open"
        assert "on_state callback failed" in caplog.text and "on_error callback failed" in caplog.text
    finally:
        await client.close()  # on_state("closed") raises too
    assert client.state == "closed"


async def test_fresh_session_resubscribing_overlapping_channels_delivers_each_event_once(gateway):
    # Header auth: every reconnect is a new session, re-subscribed with `since`; events:* and
    # events:orders each replay the 5000 events missed, more than any fixed dedupe window.
    proxy = await TcpProxy(gateway.port).start()
    client = RealtimeClient(proxied(proxy), lambda: gateway.token("w1"), header_auth=True,
                            max_buffered=100_000, **FAST)
    on_all: list[int] = []
    on_orders: list[int] = []
    try:
        await client.connect()
        items = client.events()
        await client.subscribe("events:*", None, lambda e: on_all.append(e["seq"]))
        await client.subscribe("events:orders", None, lambda e: on_orders.append(e["seq"]))
        first = await gateway.publish("w1", "orders", {"i": -1})
        await wait_for(lambda: len(on_all) == 1, what="first event")
        proxy.hold = True
        proxy.cut()
        await wait_for(lambda: client.state == "reconnecting", what="reconnecting")
        missed = await asyncio.to_thread(publish_many, gateway, "w1", "orders", 5000)
        proxy.hold = False
        await wait_for(lambda: len(client.resumed) == 2 and client.state == "open", 10, "reconnect")
        assert client.resumed == [False, False]
        await wait_for(lambda: len(on_all) >= 5001, 20, "the replay")
        live = await gateway.publish("w1", "orders", {"i": "live"})
        seqs: list[int] = []
        while not seqs or seqs[-1] != live["seq"]:
            item = await asyncio.wait_for(items.__anext__(), 10)
            seqs.append(item["seq"])
        want = [first["seq"], *missed, live["seq"]]
        assert seqs == want
        await asyncio.sleep(0.2)
        assert on_all == want and on_orders == want
    finally:
        await client.close()
        await proxy.close()


async def test_unsubscribe_lost_on_a_dead_link_is_sent_again_after_resume(gateway):
    proxy = await TcpProxy(gateway.port).start()
    client = RealtimeClient(proxied(proxy), lambda: gateway.token("w1"), **FAST)
    try:
        await client.connect()
        items = client.events()
        await client.subscribe("events:a")
        await client.subscribe("events:b")
        await gateway.publish("w1", "b", {})
        assert (await asyncio.wait_for(items.__anext__(), 5))["channel"] == "events:b"
        proxy.frozen = True
        client.unsubscribe("events:a")  # written into a link that no longer carries anything
        await asyncio.sleep(0.3)
        proxy.frozen = False
        proxy.cut()
        await wait_for(lambda: client.state == "open" and len(client.resumed) == 2, 5, "resume")
        assert client.resumed == [False, True]  # the gateway restored events:a with the session
        await gateway.publish("w1", "a", {"x": "must not arrive"})
        b = await gateway.publish("w1", "b", {})
        item = await asyncio.wait_for(items.__anext__(), 5)
        assert (item.get("channel"), item.get("seq")) == ("events:b", b["seq"]), item
    finally:
        await client.close()
        await proxy.close()


async def test_a_channel_unsubscribed_while_disconnected_delivers_nothing_after_the_resume(gateway):
    # The resumed session has events:a back and replays what it missed there before the
    # unsubscribe, sent after auth_ok, reaches the gateway: that replay is not the app's.
    proxy = await TcpProxy(gateway.port).start()
    client = RealtimeClient(proxied(proxy), lambda: gateway.token("w1"), **FAST)
    on_a: list[dict] = []
    try:
        await client.connect()
        items = client.events()
        await client.subscribe("events:a", None, on_a.append)
        await client.subscribe("events:b")
        await gateway.publish("w1", "b", {})
        assert (await asyncio.wait_for(items.__anext__(), 5))["channel"] == "events:b"
        proxy.hold = True
        proxy.cut()
        await wait_for(lambda: client.state == "reconnecting", what="reconnecting")
        client.unsubscribe("events:a")
        await gateway.publish("w1", "a", {"x": "must not arrive"})
        proxy.hold = False
        await wait_for(lambda: client.state == "open" and len(client.resumed) == 2, 5, "resume")
        assert client.resumed == [False, True]
        b = await gateway.publish("w1", "b", {})
        item = await asyncio.wait_for(items.__anext__(), 5)
        assert (item.get("channel"), item.get("seq")) == ("events:b", b["seq"]), item
        assert on_a == []
    finally:
        await client.close()
        await proxy.close()


@pytest.mark.parametrize("header_auth", [False, True], ids=["resumed", "new-session"])
async def test_an_event_in_flight_before_the_first_one_arrived_is_not_lost(gateway, header_auth):
    # No event seen yet: the resume (or the re-subscribe of a new session) asks `since` the
    # position of the `subscribed` reply, so the event the dead link swallowed is replayed;
    # also after a first reconnect that had nothing to replay.
    proxy = await TcpProxy(gateway.port).start()
    client = RealtimeClient(proxied(proxy), lambda: gateway.token("w1"), header_auth=header_auth, **FAST)
    got: list[int] = []
    try:
        await client.connect()
        await client.subscribe("events:a", None, lambda e: got.append(e["seq"]))
        proxy.cut()
        await wait_for(lambda: client.state == "open" and len(client.resumed) == 2, 5, "reconnect")
        await wait_for(lambda: client._catchup is None, 5, "the end of the catch-up, if any")
        proxy.frozen = True  # the gateway writes the event into a link that carries nothing
        e = await gateway.publish("w1", "a", {})
        proxy.frozen = False
        proxy.cut()
        await wait_for(lambda: client.state == "open" and len(client.resumed) == 3, 5, "reconnect")
        assert client.resumed == [False, not header_auth, not header_auth]
        live = await gateway.publish("w1", "a", {})
        await wait_for(lambda: live["seq"] in got, 5, "the live event")
        assert got == [e["seq"], live["seq"]]
    finally:
        await client.close()
        await proxy.close()


@pytest.mark.parametrize("header_auth", [False, True], ids=["resumed", "new-session"])
async def test_a_quiet_subscription_in_a_busy_workspace_reconnects_without_a_gap(gateway_factory, header_auth):
    # The subscription gets no event while the workspace's other topics outrun the history (20
    # events here): its `since` follows the pongs of the client's position pings, so the
    # reconnect asks for what the history holds. It asked from the `subscribed` position (or
    # its last event, long ago) and got a history_gap at every reconnect, for nothing.
    gw = await gateway_factory(env={"RT_HISTORY_EVENTS": "20"})
    proxy = await TcpProxy(gw.port).start()
    client = RealtimeClient(proxied(proxy), lambda: gw.token("w1"), header_auth=header_auth,
                            position_interval=0.1, **FAST)
    got: list[int] = []
    gaps: list[dict] = []
    client.on_gap = gaps.append
    try:
        await client.connect()
        await client.subscribe("events:quiet", None, lambda e: got.append(e["seq"]))
        busy = await asyncio.get_running_loop().run_in_executor(None, publish_many, gw, "w1", "busy", 50)
        await wait_for(lambda: client._floor is not None and client._floor >= busy[-1], 5, "a pong after the busy events")
        proxy.frozen = True
        e = await gw.publish("w1", "quiet", {})
        proxy.frozen = False
        proxy.cut()
        await wait_for(lambda: e["seq"] in got, 5, "the event of the outage")
        assert got == [e["seq"]] and gaps == []
        assert client.resumed == [False, not header_auth]
    finally:
        await client.close()
        await proxy.close()


@pytest.mark.parametrize("header_auth", [False, True], ids=["resumed", "new-session"])
async def test_subscription_made_or_changed_while_disconnected_gets_the_outage(gateway, header_auth):
    proxy = await TcpProxy(gateway.port).start()
    client = RealtimeClient(proxied(proxy), lambda: gateway.token("w1"), header_auth=header_auth, **FAST)
    got: list[int] = []

    def on_event(e: dict) -> None:
        got.append(e["seq"])

    try:
        await client.connect()
        await client.subscribe("events:orders", {"predicates": {"status": "new"}}, on_event)
        e0 = await gateway.publish("w1", "orders", {"status": "new"})
        await wait_for(lambda: len(got) == 1, what="first event")
        proxy.hold = True
        proxy.cut()
        await wait_for(lambda: client.state == "reconnecting", what="reconnecting")
        changed = asyncio.create_task(client.subscribe("events:orders", {"predicates": {"status": "paid"}}, on_event))
        added = asyncio.create_task(client.subscribe("events:invoices", None, on_event))
        await asyncio.sleep(0.05)  # both registered, waiting for the connection
        e1 = await gateway.publish("w1", "orders", {"status": "paid"})
        await gateway.publish("w1", "orders", {"status": "new"})  # the old filter's only: not the app's any more
        e2 = await gateway.publish("w1", "invoices", {})
        proxy.hold = False
        await asyncio.wait_for(asyncio.gather(changed, added), 10)
        await wait_for(lambda: len(client.resumed) == 2 and client.state == "open", 10, "reconnect")
        e3 = await gateway.publish("w1", "orders", {"status": "paid"})
        e4 = await gateway.publish("w1", "invoices", {})
        await wait_for(lambda: len(got) >= 5, 5, "the outage's events and the live ones")
        await asyncio.sleep(0.2)
        assert got == [e["seq"] for e in (e0, e1, e2, e3, e4)]
        # A resumed session would replay events:orders with the old filter before the new one
        # arrived: the filter changed offline makes it a fresh session, every channel since e0.
        assert client.resumed == [False, False]
    finally:
        await client.close()
        await proxy.close()


async def test_a_filter_unacknowledged_when_the_link_died_is_not_resumed_with_the_old_one(gateway):
    """A replacing subscribe sent just before a link loss, its answer lost with the link: the
    gateway's session may hold either filter, so the client starts a fresh session. Resumed,
    the old filter's replay of the outage reached the new handler. A session whose
    subscriptions are all acknowledged (one added offline too) still resumes."""
    proxy = await TcpProxy(gateway.port).start()
    client = RealtimeClient(proxied(proxy), lambda: gateway.token("w1"), **FAST)
    got: list[dict] = []
    try:
        await client.connect()
        await client.subscribe("events:t", {"predicates": {"k": 1}}, got.append)
        proxy.cut()
        await wait_for(lambda: client.state == "open" and client.resumed == [False, True], 5, "a resume")
        proxy.frozen = True  # the subscribe leaves, its answer does not come back
        changed = asyncio.create_task(client.subscribe("events:t", {"predicates": {"k": 2}}, got.append))
        await asyncio.sleep(0.2)
        await gateway.publish("w1", "t", {"k": 1, "i": 1})
        e2 = await gateway.publish("w1", "t", {"k": 2, "i": 2})
        proxy.frozen = False
        proxy.cut()
        await asyncio.wait_for(changed, 10)
        await wait_for(lambda: len(client.resumed) == 3 and client.state == "open", 10, "a reconnect")
        e3 = await gateway.publish("w1", "t", {"k": 2, "i": 3})
        await wait_for(lambda: len(got) >= 2, 5, "the outage's event and the live one")
        await asyncio.sleep(0.2)
        assert [e["seq"] for e in got] == [e2["seq"], e3["seq"]], got
        assert client.resumed == [False, True, False]
        await client.subscribe("events:u", None, got.append)
        proxy.cut()
        await wait_for(lambda: len(client.resumed) == 4 and client.state == "open", 10, "a resume")
        assert client.resumed[-1] is True
    finally:
        await client.close()
        await proxy.close()


async def test_unsubscribe_then_subscribe_on_the_same_channel_keeps_the_order(gateway):
    got: list[dict] = []
    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1")) as client:
        stop = await client.subscribe("events:orders", {"predicates": {"status": "new"}}, got.append)
        stop()
        await client.subscribe("events:orders", {"predicates": {"status": "paid"}}, got.append)
        e = await gateway.publish("w1", "orders", {"status": "paid"})
        await wait_for(lambda: len(got) == 1, what="event under the new filter")
        assert got[0]["seq"] == e["seq"]


async def test_subscribe_connect_and_events_after_close_or_a_terminal_error_raise(gateway):
    client = RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1"))
    await client.connect()
    await client.close()
    with pytest.raises(RealtimeError) as info:
        await asyncio.wait_for(client.subscribe("events:x"), 2)
    assert info.value.code == 1000
    with pytest.raises(RealtimeError) as info:
        await asyncio.wait_for(client.events().__anext__(), 2)
    assert info.value.code == 1000
    with pytest.raises(RealtimeError):
        await asyncio.wait_for(client.connect(), 2)

    denied = RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w2"), **FAST)
    with pytest.raises(RealtimeError):
        await denied.connect()
    for attempt in (denied.subscribe("events:x"), denied.events().__anext__()):
        with pytest.raises(RealtimeError) as info:
            await asyncio.wait_for(attempt, 2)
        assert info.value.code == 4003 and info.value.terminal
    await denied.close()


async def test_subscribe_waits_for_the_confirmation_across_a_reconnect(gateway):
    proxy = await TcpProxy(gateway.port).start()
    got: list[dict] = []
    client = RealtimeClient(proxied(proxy), lambda: gateway.token("w1"), **FAST)
    try:
        await client.connect()
        proxy.frozen = True  # the subscribes are lost, and so would be their answers
        pending = asyncio.create_task(client.subscribe("events:orders", None, got.append))
        with pytest.raises(RealtimeError) as info:  # not TimeoutError with the subscription left active
            await client.subscribe("events:other", None, got.append, timeout=0.3)
        assert info.value.name == "timeout" and info.value.channel == "events:other"
        assert not pending.done()
        proxy.frozen = False
        proxy.cut()
        await asyncio.wait_for(pending, 5)  # confirmed on the next connection
        await gateway.publish("w1", "other", {})  # withdrawn after its timeout: not delivered
        e = await gateway.publish("w1", "orders", {})
        await wait_for(lambda: len(got) >= 1, what="event")
        await asyncio.sleep(0.2)
        assert [x["seq"] for x in got] == [e["seq"]]
    finally:
        await client.close()
        await proxy.close()


async def test_each_4001_after_a_healthy_connection_reconnects_at_once(gateway):
    ttls = [2, 7, 3600]  # the second connection lives > 5 s: healthy
    calls: list[int] = []

    def get_token() -> str:
        calls.append(1)
        return gateway.token("w1", ttl=ttls[min(len(calls), 3) - 1])

    # A backoff (30 s here) would show: neither reconnect after 4001 may wait for it.
    client = RealtimeClient(gateway.ws_url("w1"), get_token, proactive_refresh=False, backoff_initial=30)
    try:
        await client.connect()
        await wait_for(lambda: client.closes == [4001], 5, "the first 4001")
        await wait_for(lambda: len(client.resumed) == 2 and client.state == "open", 10, "reconnect")
        await wait_for(lambda: client.closes == [4001, 4001], 10, "the second 4001")
        await wait_for(lambda: len(client.resumed) == 3 and client.state == "open", 10, "second reconnect")
        assert client.resumed == [False, True, True] and len(calls) == 3
    finally:
        await client.close()


async def test_4001_with_a_stale_token_backs_off_instead_of_looping(gateway):
    # A token cache that serves a token until it sees it expired: exp 1 s ago is refused with
    # 4001 at connect.
    stale = gateway.token("w1", ttl=-1)
    calls: list[int] = []
    client = RealtimeClient(gateway.ws_url("w1"), lambda: calls.append(1) or stale, proactive_refresh=False,
                            backoff_initial=0.2, backoff_max=0.4)
    # connect() returns at the first auth_ok, which a token always stale never gets.
    connecting = asyncio.ensure_future(client.connect())
    try:
        await asyncio.sleep(2)
        assert 4001 in client.closes and client.state != "closed" and not connecting.done()
        assert len(calls) < 30, len(calls)  # 0.1-0.2 s apart; a storm makes hundreds
    finally:
        await client.close()
        with contextlib.suppress(Exception):
            await connecting


async def test_events_reach_the_callbacks_of_the_subscriptions_the_gateway_matched(gateway):
    # Topics may hold dots: `events:*` narrowed to entity `created` is not `events:order.created`,
    # which reaches the connection through its own subscription.
    narrowed: list[str] = []
    order_created: list[str] = []
    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1")) as client:
        items = client.events("events:*")
        await client.subscribe("events:*", {"entity": "created"}, lambda e: narrowed.append(e["channel"]))
        await client.subscribe("events:order.created", None, lambda e: order_created.append(e["channel"]))
        await gateway.publish("w1", "order.created", {})
        last = await gateway.publish("w1", "created", {})
        seen = []
        while not seen or seen[-1][1] != last["seq"]:
            item = await asyncio.wait_for(items.__anext__(), 5)
            seen.append((item["channel"], item["seq"]))
        assert [channel for channel, _ in seen] == ["events:created"]
        assert narrowed == ["events:created"] and order_created == ["events:order.created"]


@pytest.mark.postgres
async def test_a_public_table_channel_written_with_its_schema_gets_its_events(gateway_factory, pg_database):
    import asyncpg

    db = await asyncpg.connect(pg_database)
    try:
        await db.execute("CREATE TABLE products (id int PRIMARY KEY, name text)")
        gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "clientpg"})
        await gw.wait_ready()
        got: list[dict] = []
        narrowed: list[dict] = []
        async with RealtimeClient(gw.ws_url("w1"), lambda: gw.token("w1")) as client:
            items = client.events("postgres:public.products")
            await client.subscribe("postgres:public.products", None, got.append)
            await client.subscribe("postgres:*", {"entity": "public.products"}, narrowed.append)
            await db.execute("INSERT INTO products VALUES (1, 'a')")
            item = await asyncio.wait_for(items.__anext__(), 15)
            assert (item["channel"], item["record"]["id"]) == ("postgres:products", 1)
            assert [e["record"]["id"] for e in got] == [1] and [e["record"]["id"] for e in narrowed] == [1]
    finally:
        await db.close()


@pytest.mark.postgres
async def test_a_public_table_in_either_spelling_is_one_subscription(gateway_factory, pg_database):
    # The gateway keeps one subscription for postgres:orders and postgres:public.orders (§3).
    # The client kept one per spelling: the replaced one's handler still got the table's
    # events, and an unsubscribe in the other spelling left the first registered, so the next
    # session subscribed it again while the application thought it had left.
    import asyncpg

    db = await asyncpg.connect(pg_database)
    try:
        await db.execute("CREATE TABLE orders (id int PRIMARY KEY, big boolean); CREATE TABLE marks (id int PRIMARY KEY)")
        gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "spelling"})
        await gw.wait_ready()
        proxy = await TcpProxy(gw.port).start()
        short, long, marks = [], [], []
        errors: list[RealtimeError] = []
        client = RealtimeClient(proxied(proxy), lambda: gw.token("w1"), header_auth=True, on_error=errors.append,
                                **FAST)
        try:
            await client.connect()
            await client.subscribe("postgres:orders", None, short.append)
            await client.subscribe("postgres:public.orders", {"predicates": {"big": True}}, long.append)  # replaces
            await client.subscribe("postgres:marks", None, marks.append)
            await db.execute("INSERT INTO orders VALUES (1, false), (2, true)")
            await wait_for(lambda: len(long) == 1, 15, "the event of the replacing filter")
            assert [e["record"]["id"] for e in long] == [2] and short == []
            client.unsubscribe("postgres:orders")  # the other spelling ends it, as at the gateway
            proxy.cut()  # a new session (header auth): what the client still has is subscribed again
            await wait_for(lambda: client.state == "open" and len(client.resumed) == 2, 5, "the new session")
            await db.execute("INSERT INTO orders VALUES (3, true)")
            await db.execute("INSERT INTO marks VALUES (1)")  # committed after it: comes after it
            await wait_for(lambda: len(marks) == 1, 15, "the mark")
            assert [e["record"]["id"] for e in long] == [2] and short == []
            assert {e.code for e in errors} <= {1006}, errors  # the cut link, nothing else
        finally:
            await client.close()
            await proxy.close()
    finally:
        await db.close()


@pytest.mark.postgres
@pytest.mark.parametrize("changed", [False, True], ids=["restored", "changed-while-away"])
async def test_a_resumed_table_no_longer_published_is_reported_and_dropped(gateway_factory, pg_database, changed):
    # A drained restart keeps the session; the new configuration leaves a table out, and the
    # resume refuses its subscription with 4010 naming the channel. The client reports it once
    # (named as the application wrote it) and drops it: not subscribed again on later sessions.
    # Changed while disconnected, its new subscribe is refused too: still one report.
    import asyncpg

    db = await asyncpg.connect(pg_database)
    try:
        await db.execute("CREATE TABLE products (id int PRIMARY KEY); CREATE TABLE orders (id int PRIMARY KEY)")
        gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "narrowed"})
        await gw.wait_ready()
        proxy = await TcpProxy(gw.port).start()
        errors: list[RealtimeError] = []
        orders: list[dict] = []
        client = RealtimeClient(proxied(proxy), lambda: gw.token("w1"), on_error=errors.append, **FAST)
        try:
            await client.connect()
            await asyncio.wait_for(client.subscribe("postgres:public.products"), 15)
            await client.subscribe("postgres:orders", None, orders.append)
            gw.env["RT_POSTGRES_TABLES"] = "public.orders"
            proxy.hold = True
            proxy.cut()
            await gw.restart()
            await wait_for(lambda: client.state == "reconnecting", 5, "reconnecting")
            if changed:
                again = asyncio.ensure_future(client.subscribe("postgres:public.products", {"operations": ["INSERT"]}))
            proxy.hold = False
            await wait_for(lambda: any(e.code == 4010 for e in errors), 15, "the refusal")
            if changed:
                with pytest.raises(RealtimeError):
                    await asyncio.wait_for(again, 5)
            await gw.wait_ready()
            await db.execute("INSERT INTO orders VALUES (1)")
            await wait_for(lambda: len(orders) == 1, 15, "the event on the table still published")
            assert client.resumed == [False, not changed]  # changed while away: a fresh session
            proxy.cut()
            await wait_for(lambda: len(client.resumed) == 3 and client.state == "open", 10, "the next session")
            await db.execute("INSERT INTO orders VALUES (2)")
            await wait_for(lambda: len(orders) == 2, 15, "the next event")
            refused = [(e.code, e.name, e.channel) for e in errors if e.code == 4010]
            assert refused == [(4010, "channel_unavailable", "postgres:public.products")], errors
        finally:
            await client.close()
            await proxy.close()
    finally:
        await db.close()


async def test_a_subscription_dropped_on_resume_is_reported_once_also_when_changed_meanwhile(gateway_factory):
    # The resume drops a subscription its new token no longer grants (4003 naming the channel);
    # one the application changed while disconnected was subscribed again at the same time and
    # refused again: on_error heard of the one channel twice.
    gw = await gateway_factory(env={"RT_AUTH_CHANNEL_PERMISSIONS": "true"})
    proxy = await TcpProxy(gw.port).start()
    grants = {"now": ["events:a", "events:b"]}
    errors: list[RealtimeError] = []
    got: list[dict] = []
    client = RealtimeClient(proxied(proxy), lambda: gw.token("w1", realtime_channels=grants["now"]),
                            on_error=errors.append, **FAST)
    try:
        await client.connect()
        await client.subscribe("events:a")
        await client.subscribe("events:b", None, got.append)
        grants["now"] = ["events:b"]
        proxy.hold = True
        proxy.cut()
        await wait_for(lambda: client.state == "reconnecting", 5, "reconnecting")
        again = asyncio.ensure_future(client.subscribe("events:a", {"operations": ["PUBLISH"]}))
        proxy.hold = False
        with pytest.raises(RealtimeError) as refused:
            await asyncio.wait_for(again, 5)
        assert (refused.value.code, refused.value.channel) == (4003, "events:a")
        assert client.resumed == [False, False]  # changed while away: a fresh session, events:a refused once
        b = await gw.publish("w1", "b", {})  # after every answer to the session's messages
        await wait_for(lambda: len(got) == 1, 5, "the event on events:b")
        assert got[0]["seq"] == b["seq"]
        assert [(e.code, e.channel) for e in errors if e.code != 1006] == [(4003, "events:a")], errors
    finally:
        await client.close()
        await proxy.close()


async def _resumed_and_marked(client: RealtimeClient, proxy: TcpProxy, gw, marks: list[dict], sessions: int) -> None:
    """Cuts the link, waits for the client's `sessions`-th session, then for a published mark."""
    proxy.cut()
    await wait_for(lambda: client.state == "open" and len(client.resumed) == sessions, 5, "the resume")
    seq = (await gw.publish("w1", "mark", {}))["seq"]
    await wait_for(lambda: bool(marks) and marks[-1]["seq"] == seq, 5, "the mark")

@pytest.mark.postgres
async def test_a_source_loss_told_live_is_not_told_again_by_the_next_resume(gateway_factory, pg_database):
    # A source's loss reaches its channels' subscribers at once (a 4011 whose `oldest` is the
    # history's first event, before what the client has) and, later, any session resumed from
    # before the loss (§7). The client resumed from its last event, before the loss: each
    # reconnect until the next event or position ping told the application the loss again.
    import asyncpg

    db = await asyncpg.connect(pg_database)
    try:
        await db.execute("CREATE TABLE products (id int PRIMARY KEY)")
        gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "loss"})
        await gw.wait_ready()
        proxy = await TcpProxy(gw.port).start()
        gaps: list[dict] = []
        marks: list[dict] = []
        got: list[dict] = []
        client = RealtimeClient(proxied(proxy), lambda: gw.token("w1"), on_gap=gaps.append, **FAST)
        other = RealtimeClient(gw.ws_url("w1"), lambda: gw.token("w1", sub="other"))
        try:
            await client.connect()
            await client.subscribe("postgres:products", None, got.append)
            await client.subscribe("events:mark", None, marks.append)
            await db.execute("INSERT INTO products VALUES (1)")
            await wait_for(lambda: len(got) == 1, 15, "the first event")
            # Rows written to a table before the gateway's publication holds it are lost; a
            # subscribe to it makes the gateway add it and find the loss.
            # One transaction: the periodic publication sync (every 2 s) could otherwise add the
            # table between the two, and the row was captured (no loss to tell).
            await db.execute("CREATE TABLE fresh (id int PRIMARY KEY); INSERT INTO fresh VALUES (1)")
            await other.connect()
            await asyncio.wait_for(other.subscribe("postgres:fresh"), 15)
            await wait_for(lambda: len(gaps) == 1, 15, "the loss, told live")
            assert gaps[0]["channel"] == "postgres:products"
            # A round trip that moves no position (a refused subscribe: no seq) after the gap,
            # so the link is cut after what the client sent on it had its answer.
            with pytest.raises(RealtimeError):
                await asyncio.wait_for(client.subscribe("nosuch:x"), 5)
            for sessions in (2, 3):
                await _resumed_and_marked(client, proxy, gw, marks, sessions)
            assert client.resumed == [False, True, True]
            assert len(gaps) == 1, gaps
        finally:
            await client.close()
            await other.close()
            await proxy.close()
    finally:
        await db.close()


@pytest.mark.postgres
async def test_a_9_mib_event_is_delivered_and_the_connection_stays_open(gateway_factory, pg_database):
    import asyncpg

    db = await asyncpg.connect(pg_database)
    try:
        await db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "clientbig"})
        await gw.wait_ready()
        got: list[dict] = []
        async with RealtimeClient(gw.ws_url("w1"), lambda: gw.token("w1"), **FAST) as client:
            await client.subscribe("postgres:docs", None, got.append)
            await db.execute("INSERT INTO docs VALUES (1, $1)", "x" * (9 << 20))  # a 9 MiB row
            await db.execute("INSERT INTO docs VALUES (2, 'small')")
            await wait_for(lambda: len(got) == 2, 30, "both rows")
            assert [(e["record"]["id"], len(e["record"]["body"])) for e in got] == [(1, 9 << 20), (2, 5)]
            assert client.closes == [] and client.state == "open"
    finally:
        await db.close()


async def test_the_records_of_reconnects_stay_bounded(gateway):
    # `closes` gets an entry per failed attempt, `resumed` one per session: a client that runs
    # for months through a flapping network keeps the latest 1000 only.
    proxy = await TcpProxy(gateway.port).start()
    proxy.hold = True
    client = RealtimeClient(proxied(proxy), lambda: gateway.token("w1"), backoff_initial=0.0001, backoff_max=0.0001)
    try:
        task = asyncio.create_task(client.connect())
        await wait_for(lambda: proxy.accepted > 1100, 60, "many attempts")
        proxy.hold = False
        await asyncio.wait_for(task, 10)
        assert len(client.closes) == 1000 and set(client.closes) == {1006}
        assert client.resumed == [False]
    finally:
        await client.close()
        await proxy.close()


async def test_an_events_iterator_dropped_unstarted_stops_buffering(gateway):
    # The README's pattern: events() before subscribe(); when subscribe() raises, the
    # iterator is dropped without being iterated. It must not hold events for good.
    import gc
    import weakref

    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1")) as client:
        got: list[dict] = []
        await client.subscribe("events:kept", None, got.append)
        events = client.events()
        with pytest.raises(RealtimeError):
            await client.subscribe("nosuch:thing")
        buffered = weakref.ref(next(iter(client._feeds)))
        del events
        # One being iterated keeps receiving, by a task the application kept no reference to.
        iterated: list[dict] = []

        async def consume() -> None:
            async for item in client.events():
                iterated.append(item)

        consumer = weakref.ref(asyncio.ensure_future(consume()))
        await asyncio.sleep(0)  # the consumer waits for its first item
        gc.collect()
        e = await gateway.publish("w1", "kept", {})
        await wait_for(lambda: len(got) == 1 and len(iterated) == 1, what="the event")
        assert got[0]["seq"] == iterated[0]["seq"] == e["seq"] and buffered() is None
        assert consumer() is not None and len(client._feeds) == 1


async def test_a_filter_json_cannot_carry_raises_and_registers_nothing(gateway):
    # Registered, it failed the re-subscribe of every connection: a reconnect loop.
    import datetime

    proxy = await TcpProxy(gateway.port).start()
    client = RealtimeClient(proxied(proxy), lambda: gateway.token("w1"), **FAST)
    got: list[dict] = []
    try:
        await client.connect()
        await client.subscribe("events:ok", None, got.append)
        with pytest.raises(TypeError):
            await client.subscribe("events:bad", {"predicates": {"at": datetime.datetime.now()}})
        proxy.cut()
        await wait_for(lambda: client.state == "open" and len(client.resumed) == 2, 5, "reconnect")
        e = await gateway.publish("w1", "ok", {})
        await wait_for(lambda: len(got) == 1, what="the event")
        assert got[0]["seq"] == e["seq"] and client.closes == [1006] and client.resumed == [False, True]
    finally:
        await client.close()
        await proxy.close()


async def test_a_history_gap_is_reported_once_not_after_every_reconnect(gateway_factory):
    # The event missed on events:g was evicted by others: a gap, and nothing to replay. The
    # next reconnect asked from the same position again, and got the same gap again. (events:h
    # lost nothing: no gap there.)
    gw = await gateway_factory(env={"RT_HISTORY_EVENTS": "20"})
    proxy = await TcpProxy(gw.port).start()
    gaps: list[dict] = []
    got: list[dict] = []
    client = RealtimeClient(proxied(proxy), lambda: gw.token("w1"), on_gap=gaps.append, **FAST)
    try:
        await client.connect()
        await client.subscribe("events:g", None, got.append)
        await client.subscribe("events:h")
        await gw.publish("w1", "g", {})
        await wait_for(lambda: len(got) == 1, what="first event")
        proxy.hold = True
        proxy.cut()
        await wait_for(lambda: client.state == "reconnecting", what="reconnecting")
        await gw.publish("w1", "g", {"missed": True})
        for i in range(30):
            await gw.publish("w1", "other", {"i": i})
        proxy.hold = False
        await wait_for(lambda: len(gaps) == 1, 10, "the gap on events:g")
        proxy.cut()  # before any event: the floor is where the gap said the history starts
        await wait_for(lambda: client.state == "open" and len(client.resumed) == 3, 10, "reconnect")
        h = await gw.publish("w1", "h", {})  # comes after the resume's replay and gaps, in order
        await wait_for(lambda: client.last_seq == h["seq"], 5, "the live event")
        assert client.resumed == [False, True, True] and len(got) == 1
        assert [(g["channel"], g["code"]) for g in gaps] == [("events:g", 4011)]
    finally:
        await client.close()
        await proxy.close()


async def test_subscribe_awaited_in_an_on_event_handler_raises_instead_of_hanging(gateway):
    # An async on_event is awaited before the next frame is read (events stay in order), so
    # the confirmation a subscribe() awaited there waits for could never be read: it hung for
    # good, and with it every subscription of the client.
    outcome: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
    after: list[int] = []

    async def on_order(event: dict) -> None:
        if outcome.done():
            after.append(event["seq"])
            return
        try:
            await client.subscribe("events:lines")
            outcome.set_result(None)
        except Exception as exc:
            outcome.set_result(exc)

    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1")) as client:
        await client.subscribe("events:orders", None, on_order)
        await gateway.publish("w1", "orders", {})
        error = await asyncio.wait_for(outcome, 5)
        assert isinstance(error, RuntimeError) and "on_event" in str(error), repr(error)
        e = await gateway.publish("w1", "orders", {})  # the connection carries on
        await wait_for(lambda: after == [e["seq"]], what="the next event")
        assert client.state == "open"


async def test_a_refused_replacement_filter_leaves_the_channel_unsubscribed_at_the_gateway_too(gateway_factory):
    # The gateway keeps a subscription whose replacement it refuses; the client forgot it
    # (subscribe() raised: "the channel is not subscribed"), so it went on taking events the
    # client dropped and a subscription slot: here the only one, the next subscribe got 4008.
    gateway = await gateway_factory(env={"RT_MAX_SUBSCRIPTIONS": "1"})
    got: list[dict] = []
    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1")) as client:
        await client.subscribe("events:orders", None, got.append)
        with pytest.raises(RealtimeError) as info:
            await asyncio.wait_for(client.subscribe("events:orders", {"bogus": 1}), 5)
        assert info.value.code == 4000
        await asyncio.wait_for(client.subscribe("events:other", None, got.append), 5)
        e = await gateway.publish("w1", "other", {})
        await wait_for(lambda: len(got) == 1, what="the event on events:other")
        assert got[0]["seq"] == e["seq"]


async def test_a_filter_with_nan_or_infinity_raises_instead_of_hanging(gateway):
    # json.dumps writes NaN and Infinity, which JSON has not: the gateway answered "not JSON"
    # with no id to match, so subscribe() waited for good (and the subscription, registered,
    # was sent again at every reconnect, each an invalid message towards the 1008 close).
    got: list[dict] = []
    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1")) as client:
        for value in (float("inf"), float("nan")):
            with pytest.raises(ValueError):
                await asyncio.wait_for(client.subscribe("events:x", {"predicates": {"price": {"$lt": value}}}), 5)
        await client.subscribe("events:y", None, got.append)
        await gateway.publish("w1", "x", {"price": 1})
        e = await gateway.publish("w1", "y", {})
        await wait_for(lambda: len(got) == 1, what="the event on events:y")
        assert got[0]["seq"] == e["seq"]


async def test_async_with_abandoned_while_connecting_stops_the_client(gateway):
    # `async with` under a timeout that fires while the gateway is unreachable: __aexit__ does
    # not run for an __aenter__ that raised, and the connection loop went on in the background
    # for good (reconnecting, calling get_token), with no client left to close it.
    proxy = await TcpProxy(gateway.port).start()
    proxy.hold = True
    calls: list[float] = []

    def get_token() -> str:
        calls.append(time.monotonic())
        return gateway.token("w1")

    client = RealtimeClient(proxied(proxy), get_token, **FAST)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5), client:
                pytest.fail("connected through a proxy that drops every connection")
        assert client.state == "closed"
        n = len(calls)
        proxy.hold = False
        await asyncio.sleep(0.5)  # several backoff periods: no attempt may follow
        assert len(calls) == n and client.state == "closed"
    finally:
        await client.close()
        await proxy.close()


async def test_a_filter_changed_by_the_application_after_subscribe_is_not_what_a_reconnect_sends(gateway):
    # The client kept the application's dict: one built from a template and changed for the
    # next subscribe changed the first subscription too, silently, at the next new session.
    proxy = await TcpProxy(gateway.port).start()
    got: list[dict] = []
    client = RealtimeClient(proxied(proxy), lambda: gateway.token("w1"), header_auth=True, **FAST)
    try:
        await client.connect()
        template = {"predicates": {"status": "paid"}}
        await client.subscribe("events:orders", template, got.append)
        template["predicates"]["status"] = "refunded"
        await client.subscribe("events:refunds", template, got.append)
        proxy.cut()
        await wait_for(lambda: client.state == "open" and len(client.resumed) == 2, 5, "a new session")
        e = await gateway.publish("w1", "orders", {"status": "paid"})
        await wait_for(lambda: len(got) == 1, what="the paid order")
        assert got[0]["seq"] == e["seq"]
    finally:
        await client.close()
        await proxy.close()


def _unverifiable_token() -> str:
    """An RS256 token whose key only the JWKS URL can give: the gateway looks the key up before
    it checks anything else, so the signature does not matter."""
    import base64
    import json

    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims = {"sub": "user-1", "iat": int(time.time()), "exp": int(time.time()) + 3600, "workspaces": ["w1"]}
    return f"{part({'alg': 'RS256', 'kid': 'k1', 'typ': 'JWT'})}.{part(claims)}.c2ln"


def _described(errors: list[RealtimeError]) -> list[tuple[int, str, bool]]:
    return [(e.code, e.name, e.terminal) for e in errors]


async def test_a_quota_close_is_reported_once_per_outage_with_its_reason(gateway_factory):
    # Connections per workspace over the limit: the gateway sends the error (why), then closes
    # with 4008. The client retries, and on_error heard the gateway's error at every attempt (a
    # flood while the quota holds); a link lost after a success (1006) it did not hear at all.
    # Now each retried close is reported once per code until a connection succeeds again.
    gw = await gateway_factory(env={"RT_MAX_CONNECTIONS": "1"})
    proxy = await TcpProxy(gw.port).start()
    errors: list[RealtimeError] = []
    client = RealtimeClient(proxied(proxy), lambda: gw.token("w1"), on_error=errors.append, **FAST)
    holder = RealtimeClient(gw.ws_url("w1"), lambda: gw.token("w1", sub="holder"), **FAST)
    try:
        await holder.connect()
        connecting = asyncio.ensure_future(client.connect())
        await wait_for(lambda: client.closes.count(4008) >= 3, 5, "refused attempts")
        assert not connecting.done() and client.state == "reconnecting"
        assert _described(errors) == [(4008, "quota_exceeded", False)]
        assert "quota_exceeded" in str(errors[0]) and "limit of 1 connections" in str(errors[0]), str(errors[0])
        await holder.close()  # room again: the retry gets in
        await asyncio.wait_for(connecting, 5)
        # The link dies (reported: a connection had succeeded), and while the client is away
        # another takes the slot: the 4008 is reported again, once.
        proxy.paused = True
        proxy.cut()
        holder = RealtimeClient(gw.ws_url("w1"), lambda: gw.token("w1", sub="holder"), **FAST)
        await asyncio.wait_for(holder.connect(), 5)
        refused = client.closes.count(4008)
        proxy.paused = False
        await wait_for(lambda: client.closes.count(4008) >= refused + 3, 5, "refused attempts again")
        assert _described(errors) == [(4008, "quota_exceeded", False), (1006, "abnormal_closure", False),
                                      (4008, "quota_exceeded", False)]
        assert "limit of 1 connections" in str(errors[2])
    finally:
        await client.close()
        await holder.close()
        await proxy.close()


async def test_an_identity_provider_out_of_reach_is_reported_once_as_1011(gateway_factory):
    # The gateway cannot fetch the key set that verifies the token: it closes with 1011 (not
    # 4002: the token may be fine), and the client retries. on_error heard nothing, only a
    # state change: an application could not say "authentication service unavailable".
    gw = await gateway_factory(env={"RT_AUTH_JWKS_URL": f"http://127.0.0.1:{free_port()}/certs"})
    tokens = {"now": _unverifiable_token()}
    errors: list[RealtimeError] = []
    proxy = await TcpProxy(gw.port).start()
    client = RealtimeClient(proxied(proxy), lambda: tokens["now"], on_error=errors.append, **FAST)
    try:
        connecting = asyncio.ensure_future(client.connect())
        await wait_for(lambda: client.closes.count(1011) >= 3, 5, "refused attempts")
        assert not connecting.done() and client.state == "reconnecting"
        assert _described(errors) == [(1011, "internal_error", False)]
        # The gateway's error before the close says why (the identity provider out of reach).
        assert str(errors[0]) == ("connection closed: internal_error: no signing keys available (JWKS not loaded): "
                                  "the identity provider's key set could not be fetched; retrying")
        tokens["now"] = gw.token("w1")  # one the gateway can check (HS256)
        await asyncio.wait_for(connecting, 5)
        tokens["now"] = _unverifiable_token()
        proxy.cut()
        await wait_for(lambda: client.closes.count(1011) >= 6, 5, "refused attempts again")
        assert _described(errors) == [(1011, "internal_error", False), (1006, "abnormal_closure", False),
                                      (1011, "internal_error", False)]
    finally:
        await client.close()
        await proxy.close()


async def test_an_idle_close_after_each_success_is_reported_each_time(gateway_factory):
    # The gateway closes a silent connection with 1001 going_away (here the client sends no
    # position ping and its keepalive is slower than the idle timeout). on_error heard nothing;
    # now each such close is reported, as each follows a connection that succeeded.
    gw = await gateway_factory(env={"RT_IDLE_TIMEOUT": "0.5"})
    errors: list[RealtimeError] = []
    client = RealtimeClient(gw.ws_url("w1"), lambda: gw.token("w1"), on_error=errors.append, position_interval=0,
                            **FAST)
    try:
        await client.connect()
        await wait_for(lambda: client.closes.count(1001) >= 2, 5, "two idle closes")
        assert len(client.resumed) >= 2
        assert _described(errors) == [(1001, "going_away", False)] * client.closes.count(1001)
        assert str(errors[0]) == "connection closed: going_away; retrying"
    finally:
        await client.close()


async def _slow_reader_drops(gw) -> int:
    """The connections the gateway closed with 1013 (its rt_drops_total)."""
    status, body = await gw.get("/metrics")
    assert status == 200
    return int(re.search(rb'^rt_drops_total\{reason="slow_reader"\} (\d+)$', body, re.M).group(1))


async def test_a_slow_reader_close_is_reported_each_time_it_recurs(gateway_factory):
    # The application holds each event (an async on_event that waits), so the client stops
    # reading: past its send buffer the gateway closes with 1013 try_again_later and the client
    # resumes. on_error heard nothing; now it hears the 1013, again after a connection
    # succeeded in between.
    gw = await gateway_factory(env={"RT_SEND_BUFFER_BYTES": "262144"})
    big = {"blob": "x" * 60000}
    gate = asyncio.Event()
    gate.set()

    async def held(event: dict) -> None:
        await gate.wait()

    errors: list[RealtimeError] = []
    client = RealtimeClient(gw.ws_url("w1"), lambda: gw.token("w1"), on_error=errors.append, **FAST)
    try:
        await client.connect()
        await client.subscribe("events:big", None, held)
        for round_ in (1, 2):
            gate.clear()
            # Until the gateway closes it: how much the kernel's socket buffers absorb first
            # depends on their autotuning (a fixed 200 events was sometimes not enough). Read
            # again at once: a reader that has not read its close within 5 s is cut off (1006).
            for i in range(2000):
                await gw.publish("w1", "big", {**big, "i": i})
                if await _slow_reader_drops(gw) == round_:
                    break
            gate.set()
            await wait_for(lambda round_=round_: client.closes.count(1013) == round_, 10, "the 1013 close")
            await wait_for(lambda round_=round_: client.state == "open" and len(client.resumed) == round_ + 1, 10,
                           "the resume")
        assert _described(errors) == [(1013, "try_again_later", False)] * 2
        assert str(errors[0]) == "connection closed: try_again_later; retrying"
    finally:
        await client.close()


class _HalfRefusingProxy(TcpProxy):
    """A load balancer in front of two nodes: every other connection is answered 503 (a node at
    its connection limit), the others reach the gateway."""

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.answer = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nfull"
                       if self.accepted % 2 else None)
        await super()._accept(reader, writer)


async def test_failures_that_alternate_are_each_reported_once_per_outage(gateway_factory):
    # "Once per distinct close code (status) until a connection succeeds": the client kept the
    # last kind reported only, so a quota close and a 503 taking turns (two nodes behind a load
    # balancer, one at its quota, one at its connection limit) reached on_error at every attempt,
    # the flood the rule is there to prevent.
    gw = await gateway_factory(env={"RT_MAX_CONNECTIONS": "1"})
    proxy = await _HalfRefusingProxy(gw.port).start()
    errors: list[RealtimeError] = []
    client = RealtimeClient(proxied(proxy), lambda: gw.token("w1"), on_error=errors.append, **FAST)
    holder = RealtimeClient(gw.ws_url("w1"), lambda: gw.token("w1", sub="holder"), **FAST)
    try:
        await holder.connect()
        connecting = asyncio.ensure_future(client.connect())
        await wait_for(lambda: client.closes.count(4008) >= 3 and proxy.accepted >= 6, 10, "alternating attempts")
        assert not connecting.done() and client.state == "reconnecting"
        assert _described(errors) == [(4008, "quota_exceeded", False), (503, "upgrade_refused", False)]
        await holder.close()  # room again: a retry that reaches the gateway gets in
        await asyncio.wait_for(connecting, 10)
        assert len(errors) == 2
    finally:
        await client.close()
        await holder.close()
        await proxy.close()


async def test_get_token_returning_the_token_endpoints_answer_is_reported_at_once_and_retried(gateway):
    # A common slip: get_token returns `{"access_token": ...}`. Sent as it was, the gateway
    # answered the auth message with 4000 (its `token` is not a string) and the auth timeout
    # closed the connection, at every attempt. It is refused before any connection now, as
    # token_unavailable naming what came instead (never the token), and retried with the backoff.
    errors: list[RealtimeError] = []
    client = RealtimeClient(gateway.ws_url("w1"), lambda: {"access_token": gateway.token("w1")},  # type: ignore[arg-type,return-value]
                            on_error=errors.append, **FAST)
    try:
        connecting = asyncio.ensure_future(client.connect())
        await wait_for(lambda: bool(errors), 5, "the report")
        await asyncio.sleep(0.5)  # several attempts at backoff_max 0.4 s
        assert not connecting.done() and client.state == "reconnecting" and client.error is None
        assert len(errors) >= 2, "not retried"  # reported at each attempt, as any failing get_token
        assert all(e.name == "token_unavailable" and not e.terminal for e in errors), errors
        assert "dict" in str(errors[0]) and gateway.token("w1").rsplit(".", 1)[1] not in str(errors[0])
        assert client.closes == []  # no connection was opened for it
    finally:
        await client.close()
        with contextlib.suppress(RealtimeError):
            await connecting


async def test_why_an_auth_message_too_big_was_refused_reaches_on_error(gateway_factory):
    # A token larger than the gateway's message limit (a token carrying every role of a large
    # realm): the gateway says so in an error 4000, then closes with 1009, terminal. The 4000,
    # held as the connection's refusal, was dropped for not matching the close's code: on_error
    # heard "connection closed: message_too_big" only, not which message or what limit.
    gw = await gateway_factory(env={"RT_MAX_MESSAGE_BYTES": "1024"})
    errors: list[RealtimeError] = []
    client = RealtimeClient(gw.ws_url("w1"), lambda: gw.token("w1") + "x" * 2000, on_error=errors.append, **FAST)
    try:
        with pytest.raises(RealtimeError) as refused:
            await asyncio.wait_for(client.connect(), 5)
        assert refused.value.code == 1009 and refused.value.terminal
        assert [(e.code, e.terminal) for e in errors] == [(4000, False), (1009, True)], errors
        assert "1024-byte limit" in str(errors[0])
        assert "1024-byte limit" in str(errors[1]), errors[1]  # the terminal report says it too
    finally:
        await client.close()
    # Authenticated, a subscribe over the limit: the terminal 1009 said "message_too_big" only.
    errors.clear()
    client = RealtimeClient(gw.ws_url("w1"), lambda: gw.token("w1"), on_error=errors.append, **FAST)
    try:
        await client.connect()
        with pytest.raises(RealtimeError) as refused:
            await asyncio.wait_for(client.subscribe("events:big", {"predicates": {"id": {"$in": list(range(400))}}}), 5)
        assert refused.value.code == 1009 and refused.value.terminal and "1024-byte limit" in str(refused.value)
        assert [(e.code, e.terminal) for e in errors] == [(4000, False), (1009, True)], errors
    finally:
        await client.close()


# ---- from a black-box audit of the client (2 Dec) ---------------------------------------------


async def test_an_async_on_event_raising_cancelled_error_does_not_kill_the_client(gateway):
    # "An exception raised by a callback (on_event, on_state, on_gap, on_error) is logged and
    # swallowed." An async handler that awaits a future someone else cancelled raises
    # CancelledError: it escaped `except Exception`, ended the connection task silently, and the
    # client stayed "open" for good with no event, no reconnect, nothing on on_error.
    got: list[int] = []
    cancelled = asyncio.get_running_loop().create_future()
    cancelled.cancel()

    async def on_event(ev: dict) -> None:
        got.append(ev["payload"]["n"])
        if ev["payload"]["n"] == 1:
            await cancelled  # raises CancelledError: the handler's own bug, not the client's cancellation

    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1"), **FAST) as client:
        await client.subscribe("events:c", None, on_event)
        await gateway.publish("w1", "c", {"n": 1})
        await wait_for(lambda: got == [1], what="first event")
        await asyncio.sleep(0.2)
        await gateway.publish("w1", "c", {"n": 2})
        await wait_for(lambda: got == [1, 2], 5, f"the event after the handler's CancelledError (state {client.state})")


async def test_an_async_get_token_raising_cancelled_error_is_reported_and_retried(gateway):
    # An async get_token that awaits a shared token-refresh task another caller cancelled raises
    # CancelledError: it escaped `except Exception` in _fetch_token and ended the connection
    # task. connect() then waited for good, "connecting", with nothing reported.
    calls: list[int] = []

    async def get_token() -> str:
        calls.append(1)
        if len(calls) == 1:
            shared = asyncio.ensure_future(asyncio.sleep(10))
            shared.cancel()
            await shared  # CancelledError
        return gateway.token("w1")

    errors: list[RealtimeError] = []
    client = RealtimeClient(gateway.ws_url("w1"), get_token, on_error=errors.append, **FAST)
    try:
        await asyncio.wait_for(client.connect(), 5)
        assert client.state == "open" and len(calls) == 2
        assert [e.name for e in errors] == ["token_unavailable"]
    finally:
        await client.close()


async def test_a_get_token_returning_none_is_reported_not_retried_silently(gateway):
    # The README's fetch_token reads os.environ; `os.environ.get("RT_TOKEN")` unset returns None.
    # The client took None for a failed get_token without reporting it: connect() waited for good,
    # "reconnecting", on_error never called, nothing logged.
    errors: list[RealtimeError] = []
    client = RealtimeClient(gateway.ws_url("w1"), lambda: None, on_error=errors.append, **FAST)
    try:
        task = asyncio.create_task(client.connect())
        await wait_for(lambda: bool(errors), 3, "an error reported")
        assert errors[0].name == "token_unavailable" and "None" in str(errors[0])
        task.cancel()
    finally:
        await client.close()


async def test_a_get_token_returning_bytes_is_reported_and_leaks_no_task(gateway):
    # A token read with subprocess.check_output or an HTTP library's `.content` is bytes. The auth
    # message could not be encoded: each attempt logged "connection failed" with a TypeError, told
    # on_error nothing, retried for good, and left its connection's writer task pending forever
    # (one more per attempt).
    errors: list[RealtimeError] = []
    client = RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1").encode(), on_error=errors.append,
                            **FAST)
    try:
        task = asyncio.create_task(client.connect())
        await asyncio.sleep(2)  # several attempts at backoff_max 0.4 s
        writers = [t for t in asyncio.all_tasks() if "_write" in repr(t.get_coro())]
        assert len(writers) <= 1, f"{len(writers)} writer tasks left pending"
        assert errors and errors[0].name == "token_unavailable" and "bytes" in str(errors[0]), \
            (client.state, [str(e) for e in errors])
        task.cancel()
    finally:
        await client.close()


async def test_a_sync_get_token_that_blocks_is_timed_out_without_freezing_the_loop(gateway):
    # The README's fetch_token is sync ("or fetch one from your identity provider"), and the
    # client promises that a get_token that "has not answered within open_timeout" is reported
    # as "token_unavailable" and retried. A sync one was called on the event loop: a token
    # service that hangs froze the whole application (every task, the websocket keepalive) for
    # as long, and open_timeout never applied.
    calls: list[int] = []

    def get_token() -> str:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(2.0)  # a token request on a stalled link (requests without a timeout)
        return gateway.token("w1")

    errors: list[RealtimeError] = []
    gaps: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.05)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    client = RealtimeClient(gateway.ws_url("w1"), get_token, on_error=errors.append, open_timeout=0.3, **FAST)
    try:
        await asyncio.wait_for(client.connect(), 10)
        stop.set()
        await beat
        assert max(gaps) < 1.0, f"the event loop was blocked for {max(gaps):.1f} s by get_token"
        assert [e.name for e in errors] == ["token_unavailable"]
    finally:
        stop.set()
        await client.close()


# A seeded random walk of cuts, outages with changes made meanwhile, and subscribe/unsubscribe
# churn around a stable channel: every one of its events once, in order, to its handler and to its
# iterator alike (RT_CLIENT_WALK_SEED picks another walk).

async def test_a_random_walk_of_cuts_and_churn_keeps_a_stable_channel_exactly_once(gateway):
    rnd = random.Random(int(os.environ.get("RT_CLIENT_WALK_SEED", "1")))
    proxy = await TcpProxy(gateway.port).start()
    got_a: list[int] = []
    other: dict[str, list[int]] = {}
    errors: list[RealtimeError] = []
    client = RealtimeClient(proxied(proxy), lambda: gateway.token("w1"), on_error=errors.append,
                            backoff_initial=0.02, backoff_max=0.1)
    published: dict[str, list[int]] = {"a": [], "b": [], "c": [], "d": []}
    stop = asyncio.Event()

    async def publisher() -> None:
        i = 0
        while not stop.is_set():
            topic = "abcd"[i % 4]
            r = await gateway.publish("w1", topic, {"i": i, "odd": i % 2 == 1})
            published[topic].append(r["seq"])
            i += 1

    def handler(name: str):
        return lambda e: other.setdefault(name, []).append(e["seq"])

    ops = 0
    try:
        await client.connect()
        feed = client.events("events:a")
        await client.subscribe("events:a", None, lambda e: got_a.append(e["seq"]))
        task = asyncio.create_task(publisher())
        for _ in range(40):
            op = rnd.choice(["cut", "hold", "sub_b", "unsub_b", "filter_c", "sub_star", "unsub_star", "sleep"])
            ops += 1
            if op == "cut":
                proxy.cut()
            elif op == "hold":
                proxy.hold = True
                proxy.cut()
                await asyncio.sleep(rnd.uniform(0.05, 0.3))
                # changes while disconnected
                if rnd.random() < 0.5:
                    asyncio.ensure_future(client.subscribe("events:c", {"predicates": {"odd": rnd.random() < 0.5}},
                                                           handler("c")))
                if rnd.random() < 0.5:
                    client.unsubscribe("events:*")
                proxy.hold = False
            elif op == "sub_b":
                asyncio.ensure_future(client.subscribe("events:b", None, handler("b")))
            elif op == "unsub_b":
                client.unsubscribe("events:b")
            elif op == "filter_c":
                asyncio.ensure_future(client.subscribe("events:c", {"predicates": {"odd": rnd.random() < 0.5}},
                                                       handler("c")))
            elif op == "sub_star":
                asyncio.ensure_future(client.subscribe("events:*", {"entity": "d"}, handler("*")))
            elif op == "unsub_star":
                client.unsubscribe("events:*")
            await asyncio.sleep(rnd.uniform(0.0, 0.15))
        stop.set()
        await task
        await wait_for(lambda: client.state == "open", 10, "open")
        await asyncio.sleep(0.5)
        fed: list[int] = []
        while True:
            try:
                item = await asyncio.wait_for(feed.__anext__(), 0.2)
            except TimeoutError:
                break
            if item.get("type") == "event":
                fed.append(item["seq"])
        for name, seqs in other.items():
            assert len(seqs) == len(set(seqs)), f"duplicates to {name}: {len(seqs) - len(set(seqs))}"
        assert len(got_a) == len(set(got_a)), "duplicates on events:a"
        missing = sorted(set(published["a"]) - set(got_a))
        assert not missing, f"{len(missing)} of {len(published['a'])} events:a events lost; resumed={client.resumed}"
        assert got_a == sorted(got_a), "events:a out of order"
        assert fed == got_a
        assert not [e for e in errors if e.name not in ("abnormal_closure", "connect_failed")], errors
    finally:
        stop.set()
        await client.close()
        await proxy.close()


async def test_a_header_auth_token_with_a_trailing_newline_is_never_logged_nor_put_in_an_error(gateway, caplog):
    # A token read from a file (`open(path).read()`) ends with "\n". With header_auth, websockets
    # refuses the header with InvalidHeaderValue("invalid Authorization header: Bearer <token>"),
    # and the client put str(exc) in its INFO log "connect failed" at every attempt and in the
    # on_error RealtimeError ("cannot connect to ...: InvalidHeaderValue: invalid Authorization
    # header: Bearer eyJ...; retrying"): the whole bearer token, in logs and error reports. And
    # it was reported as "connect_failed" (the gateway unreachable), retried for good.
    caplog.set_level(logging.DEBUG, logger="rtserver.client")
    token = gateway.token("w1") + "\n"
    secret_part = token.strip().rsplit(".", 1)[1]  # the signature: what makes it a credential
    errors: list[RealtimeError] = []
    client = RealtimeClient(gateway.ws_url("w1"), lambda: token, header_auth=True, on_error=errors.append, **FAST)
    try:
        task = asyncio.create_task(client.connect())
        await asyncio.sleep(1.5)
        task.cancel()
        for e in errors:
            assert secret_part not in str(e) and secret_part not in repr(e.__cause__), f"token in on_error: {e}"
        for record in caplog.records:
            text = record.getMessage() + repr(record.__dict__.get("fields"))
            assert secret_part not in text, f"token in the log record {record.getMessage()!r}: {text[:300]}"
        assert secret_part not in caplog.text
        # Reported as what it is: the token (not the gateway out of reach).
        assert errors and errors[0].name == "token_unavailable", [(e.name, str(e)[:80]) for e in errors]
    finally:
        await client.close()


async def test_a_filter_too_large_for_one_message_fails_that_subscribe_not_the_whole_client(gateway):
    # §4 allows 1000 values in an `$in` and limits.max_filter_bytes is 128 KiB, but a subscribe
    # over limits.max_message_bytes (64 KiB) gets a 4000 and a close 1009, which the client takes
    # as terminal: one "watch these 1000 customers" subscribe closed the client for good, every
    # other subscription with it, no reconnect. subscribe() promises a RealtimeError for a refused
    # subscription (and checks NaN and non-JSON filters at once, before registering them).
    got: list[dict] = []
    errors: list[RealtimeError] = []
    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1"), on_error=errors.append,
                              **FAST) as client:
        await client.subscribe("events:ok", None, got.append)
        big = {"predicates": {"customer": {"$in": [f"customer-{i:060d}" for i in range(1000)]}}}  # ~73 KB
        try:
            await asyncio.wait_for(client.subscribe("events:customers", big), 5)
        except RealtimeError:
            pass  # that subscribe fails: expected
        await asyncio.sleep(0.3)
        assert client.state == "open", (client.state, [(e.code, str(e)[:80]) for e in errors])
        assert not [e for e in errors if e.terminal]
        await gateway.publish("w1", "ok", {"n": 1})
        await wait_for(lambda: len(got) == 1, 5, "the other subscription's event")


async def test_a_filter_changed_while_the_resume_is_in_flight_does_not_get_the_old_filters_replay(gateway):
    # "a filter changed while disconnected, or not yet acknowledged when the link died, makes the
    # client start a fresh session instead of resuming: the resumed session would replay the
    # outage with the old filter first". The client decides so when it writes its auth message;
    # a filter changed after that and before auth_ok (state still "reconnecting": a slow link, a
    # gateway refetching its JWKS) got the resumed session's replay of the old filter, to the new
    # filter's handler.
    proxy = await TcpProxy(gateway.port).start()
    old_got: list[dict] = []
    new_got: list[dict] = []
    client = RealtimeClient(proxied(proxy), lambda: gateway.token("w1"), **FAST)
    try:
        await client.connect()
        await client.subscribe("events:f", {"predicates": {"k": "old"}}, old_got.append)
        await gateway.publish("w1", "f", {"k": "old", "n": 0})
        await wait_for(lambda: len(old_got) == 1, what="first event")
        proxy.hold = True
        proxy.cut()
        await wait_for(lambda: client.state == "reconnecting", what="reconnecting")
        a1 = await gateway.publish("w1", "f", {"k": "old", "n": 1})  # the outage: old filter only
        b1 = await gateway.publish("w1", "f", {"k": "new", "n": 2})  # the outage: new filter only
        proxy.upstream_delay = 1.0  # each chunk the client sends reaches the gateway 1 s late
        accepted = proxy.accepted
        proxy.hold = False
        await wait_for(lambda: proxy.accepted > accepted, 5, "a connection through")
        await asyncio.sleep(1.4)  # upgraded (~1.0 s); the auth message on its way (arrives ~2.0 s)
        assert client.state == "reconnecting"
        changed = asyncio.create_task(client.subscribe("events:f", {"predicates": {"k": "new"}}, new_got.append))
        await asyncio.wait_for(changed, 10)
        proxy.upstream_delay = 0
        b2 = await gateway.publish("w1", "f", {"k": "new", "n": 3})
        await wait_for(lambda: any(e["seq"] == b2["seq"] for e in new_got), 5, "a live event")
        assert [e["seq"] for e in new_got] == [b1["seq"], b2["seq"]], \
            f"new filter's handler got {[(e['payload'], e['seq']) for e in new_got]}; a1={a1['seq']}"
    finally:
        await client.close()
        await proxy.close()


async def test_no_event_reaches_a_handler_after_close_returned(gateway):
    # A handler that stops the client after the event it waited for (`await client.close()`):
    # the frames already read were still handed to on_event after close() had returned, and the
    # client "closed".
    calls: list[tuple[int, str]] = []
    client = RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1"), **FAST)

    async def on_event(ev: dict) -> None:
        calls.append((ev["payload"]["n"], client.state))
        if ev["payload"]["n"] == 0:
            await asyncio.sleep(0.3)  # some work; the next events arrive meanwhile
            await client.close()

    try:
        await client.connect()
        await client.subscribe("events:stop", None, on_event)
        for n in range(3):
            await gateway.publish("w1", "stop", {"n": n})
        await wait_for(lambda: bool(calls), 5, "the first event")
        await asyncio.sleep(0.5)
        assert calls == [(0, "open")], f"delivered after close(): {calls[1:]}"
    finally:
        await client.close()


@pytest.mark.parametrize("header_auth", [False, True], ids=["resumed", "new-session"])
async def test_a_filter_changed_as_the_connection_comes_back_gets_the_outages_events(gateway, header_auth):
    # The application changes a filter when it learns the connection is back ("open"), while the
    # outage's replay (the resume's, or the re-subscribe's with since) is still to come. The
    # replacement went without `since`: the outage's events that only the new filter takes
    # were never delivered.
    proxy = await TcpProxy(gateway.port).start()
    old_got: list[int] = []
    new_got: list[int] = []
    changed: list[asyncio.Future] = []
    back = False

    def on_state(state: str) -> None:
        if state == "open" and back and not changed:
            changed.append(asyncio.ensure_future(
                client.subscribe("events:o", {"predicates": {"status": "paid"}}, lambda e: new_got.append(e["seq"]))))

    client = RealtimeClient(proxied(proxy), lambda: gateway.token("w1"), header_auth=header_auth, on_state=on_state,
                            **FAST)
    try:
        await client.connect()
        await client.subscribe("events:o", {"predicates": {"status": "new"}}, lambda e: old_got.append(e["seq"]))
        e0 = await gateway.publish("w1", "o", {"status": "new"})
        await wait_for(lambda: old_got == [e0["seq"]], what="first event")
        proxy.hold = True
        proxy.cut()
        await wait_for(lambda: client.state == "reconnecting", what="reconnecting")
        await gateway.publish("w1", "o", {"status": "new"})  # the old filter's only
        e2 = await gateway.publish("w1", "o", {"status": "paid"})  # the new filter's only
        back = True
        proxy.hold = False
        await wait_for(lambda: bool(changed), 10, "the reconnect")
        await asyncio.wait_for(changed[0], 10)
        e3 = await gateway.publish("w1", "o", {"status": "paid"})
        await wait_for(lambda: e3["seq"] in new_got, 5, "the live event")
        await asyncio.sleep(0.2)
        assert e2["seq"] in new_got, f"the outage's event for the new filter was lost: {new_got}"
        assert len(new_got) == len(set(new_got)), f"an event delivered twice: {new_got}"
        assert e0["seq"] not in new_got
    finally:
        await client.close()
        await proxy.close()


async def test_nothing_reaches_a_handler_once_unsubscribe_is_called_also_within_one_event(gateway):
    # events:* and events:orders both match an event; the first handler to run unsubscribes the
    # other (the user navigated away). The list of handlers was made before any ran: the other
    # still got that event.
    late: list[int] = []
    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1"), **FAST) as client:
        stop = await client.subscribe("events:*", None, lambda e: client.unsubscribe("events:orders"))
        await client.subscribe("events:orders", None, lambda e: late.append(e["seq"]))
        feed = client.events()
        published = await gateway.publish("w1", "orders", {})
        item = await asyncio.wait_for(feed.__anext__(), 5)  # the event went through the handlers
        assert item["seq"] == published["seq"]
        await asyncio.sleep(0.2)
        assert late == [], f"delivered after unsubscribe(): {late}"
        stop()


# ---- from a parity audit of the two clients (2 Dec) -------------------------------------------
async def test_a_subscribe_the_gateway_takes_is_not_refused_as_message_too_big(gateway):
    # README "Clients": a subscribe fails at once as message_too_big when its message "would pass
    # the gateway's limits.max_message_bytes". The JS client sends compact UTF-8 JSON, and the
    # gateway confirms these two subscribes from it (1000 `$in` values each, as §4 allows); the
    # Python client writes the same message with ", "/": " separators and \\uXXXX escapes
    # (json.dumps defaults): 66 KB and 104 KB, refused at once, though the gateway takes the
    # subscription.
    cities = ["\u00e9" * 16 + f"{i:04d}" for i in range(1000)]  # 43 KB as UTF-8 JSON
    codes = ["v" * 58 + f"{i:04d}" for i in range(1000)]  # 65.1 KB compact
    got: list[dict] = []
    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1"), **FAST) as client:
        for channel, field, values in (("events:cities", "city", cities), ("events:codes", "code", codes)):
            try:
                await asyncio.wait_for(client.subscribe(channel, {"predicates": {field: {"$in": values}}}, got.append), 5)
            except RealtimeError as exc:
                raise AssertionError(f"{channel}: {exc.name}: {exc}") from None
        await gateway.publish("w1", "cities", {"city": cities[999]})
        await gateway.publish("w1", "codes", {"code": codes[5]})
        await wait_for(lambda: len(got) == 2, 5, "both events")
        assert client.state == "open"


async def test_close_sends_a_normal_closure_as_the_js_client_does(gateway):
    # clients/js/index.d.ts close(): "Closes for good: sends a close 1000"; the Python client's
    # close() cancels its connection task inside `async with connect(...)`, and websockets closes
    # a connection left by an exception with 1011: the gateway's audit trail (session-suspended,
    # docs/protocol.md §9) records an internal_error for every Python client that closes.
    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1"), **FAST) as client:
        await client.subscribe("events:x")
    records = await gateway.audit_records("session-suspended")
    assert [(r["code"], r["reason"]) for r in records] == [(1000, "client_close")]


async def test_a_get_token_returning_no_str_is_token_unavailable_not_a_terminal_4002(gateway):
    # With the JS client's fix (clients/js/src/index.js checkedToken: anything but a string is
    # token_unavailable, retried), the Python client is the one that sends a number as the token:
    # with header_auth "Bearer 42", a terminal 4002 (message auth: a 4000 and the 10 s auth timeout).
    calls = 0
    errors: list[RealtimeError] = []

    def get_token() -> object:
        nonlocal calls
        calls += 1
        return 42 if calls == 1 else gateway.token("w1")

    client = RealtimeClient(gateway.ws_url("w1"), get_token, header_auth=True, on_error=errors.append, **FAST)
    try:
        await asyncio.wait_for(client.connect(), 5)
        assert [(e.name, e.terminal) for e in errors] == [("token_unavailable", False)]
    finally:
        await client.close()


async def test_a_channel_that_is_no_str_is_refused_by_name(gateway):
    # subscribe(None) (a channel read from a missing setting) failed deep inside with an
    # AttributeError naming no argument.
    async with RealtimeClient(gateway.ws_url("w1"), lambda: gateway.token("w1"), **FAST) as client:
        for bad in (None, 42, b"events:x"):
            with pytest.raises(TypeError, match="channel must be a str such as 'events:orders', not "):
                await client.subscribe(bad)  # type: ignore[arg-type]
        await client.subscribe("events:x")  # the client carries on
