"""The wire contract (PROTOCOL.md §1, §3, §5, §6) against a real `rtserver serve` subprocess,
with the `websockets` library as the client."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import time

import jwt
import pytest
import websockets

from tests.harness.prometheus import parse_exposition
from tests.harness.wsclient import ws_connect


def _pong(msg: dict) -> dict:
    """A pong without its stream position (an integer, checked here)."""
    assert isinstance(msg.get("seq"), int), msg
    return {k: v for k, v in msg.items() if k != "seq"}

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def test_auth_by_message_and_auth_ok_shape(gateway):
    async with ws_connect(gateway, "w1") as c:
        await c.send({"type": "auth", "token": gateway.token("w1"), "id": 7})
        ok = await c.recv_type("auth_ok")
    assert ok["id"] == 7
    assert ok["resumed"] is False
    assert isinstance(ok["sessionId"], str) and ok["sessionId"]
    assert ISO_MS.match(ok["expiresAt"]), ok


async def test_auth_by_header(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1"), header_auth=True) as c:
        ok = await c.recv_type("auth_ok")
        assert ok["resumed"] is False
        # Messages sent right after the upgrade wait for the header auth to finish.
        await c.send({"type": "ping", "id": "p"})
        assert _pong(await c.recv()) == {"type": "pong", "id": "p"}


async def test_bad_header_token_closes_4002_after_upgrade(gateway):
    async with ws_connect(gateway, "w1", token="not-a-jwt", header_auth=True) as c:
        err = await c.recv_type("error")
        assert err["code"] == 4002 and err["name"] == "token_invalid"
        assert await c.expect_close() == (4002, "token_invalid")


async def test_messages_before_auth_get_4003_and_malformed_get_4000(gateway):
    async with ws_connect(gateway, "w1") as c:
        await c.send({"type": "subscribe", "channel": "events:x", "id": 1})
        err = await c.recv_type("error")
        assert (err["code"], err["name"], err["id"]) == (4003, "scope_denied", 1)
        await c.send("{not json")
        err = await c.recv_type("error")
        assert (err["code"], err["name"]) == (4000, "invalid_message")
        # still open: auth works afterwards
        await c.auth(gateway.token("w1"))


async def test_a_subscribe_before_auth_is_refused_naming_its_channel(gateway):
    """An error answering a subscribe names its channel (§5), the 4003 of one sent before auth
    too: a browser client sends its subscribes as soon as the socket opens, and without ids it
    could not tell which of them were refused. Before, that 4003 had no `channel`."""
    async with ws_connect(gateway, "w1") as c:
        for msg in ({"type": "subscribe", "channel": "events:orders"},
                    {"type": "unsubscribe", "channel": "events:orders", "id": 4}):
            await c.send(msg)
            err = await c.recv_type("error")
            assert (err["code"], err.get("channel"), err.get("id")) == (4003, "events:orders", msg.get("id")), err
        await c.send({"type": "ping", "id": 5})
        assert "channel" not in await c.recv_type("error")


async def test_auth_timeout_closes_4002(gateway_factory):
    gw = await gateway_factory(env={"RT_AUTH_TIMEOUT": "0.5"})
    async with ws_connect(gw, "w1") as c:
        err = await c.recv_type("error", timeout=5)
        assert err["code"] == 4002 and "auth timeout" in err["message"]
        assert await c.expect_close() == (4002, "token_invalid")


async def test_expired_token_at_connect_closes_4001(gateway):
    async with ws_connect(gateway, "w1") as c:
        await c.send({"type": "auth", "token": gateway.token("w1", ttl=-60), "id": 3})
        err = await c.recv_type("error")
        assert err["code"] == 4001 and err["name"] == "token_expired" and err["id"] == 3
        assert await c.expect_close() == (4001, "token_expired")


async def test_token_expiry_mid_session_closes_4001(gateway):
    async with ws_connect(gateway, "w1") as c:
        token = gateway.token("w1", ttl=2)
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        # exp is checked with leeway when presented, but the session ends exactly at exp.
        await c.auth(token)
        err = await c.recv_type("error", timeout=10)
        assert err["code"] == 4001
        assert await c.expect_close() == (4001, "token_expired")
        assert time.time() >= exp - 0.05, "closed before the token's exp"
    # The session stays resumable, and the audit trail says why its connection ended.
    (rec,) = await gateway.audit_records("session-suspended")
    assert (rec["code"], rec["reason"], rec["workspaceId"]) == (4001, "token_expired", "w1")


async def test_in_band_refresh_extends_session(gateway):
    async with ws_connect(gateway, "w1") as c:
        first = await c.auth(gateway.token("w1", ttl=2))
        await c.send({"type": "auth", "token": gateway.token("w1", ttl=3600), "id": "r"})
        again = await c.recv_type("auth_ok")
        assert again["sessionId"] == first["sessionId"] and again["id"] == "r"
        assert again["expiresAt"] > first["expiresAt"]
        await asyncio.sleep(2.5)
        await c.send({"type": "ping"})
        assert (await c.recv())["type"] == "pong"


async def test_a_refresh_waiting_on_the_rate_limit_is_handled_when_the_token_expires(gateway_factory):
    """Two refreshes within limits.min_refresh_interval, the first with a short token: the
    second (valid, sent before exp) waited out the interval, and the first's expiry closed the
    connection under it with 4001 "refresh it before exp" (auth audit). The expiry handles the
    waiting refresh at once; a waiting refresh that is refused still ends the connection."""
    gw = await gateway_factory(env={"RT_MIN_REFRESH_INTERVAL": "3"})
    async with ws_connect(gw, "w1") as c:
        await c.auth(gw.token("w1", ttl=3600))
        await c.send({"type": "auth", "token": gw.token("w1", ttl=1.5), "id": "r1"})
        await c.send({"type": "auth", "token": gw.token("w1", ttl=3600), "id": "r2"})
        assert (await c.recv_type("auth_ok"))["id"] == "r1"
        second = await c.recv_type("auth_ok", timeout=5)
        assert second["id"] == "r2", second
        await asyncio.sleep(2.5)  # past r1's exp and the interval
        await c.send({"type": "ping", "id": "p"})
        assert _pong(await c.recv()) == {"type": "pong", "id": "p"}
        assert c.close_code is None
    async with ws_connect(gw, "w1") as c:
        await c.auth(gw.token("w1", ttl=3600, sub="alice"))
        await c.send({"type": "auth", "token": gw.token("w1", ttl=1.5, sub="alice"), "id": "r1"})
        await c.send({"type": "auth", "token": gw.token("w1", ttl=3600, sub="mallory"), "id": "r2"})
        assert (await c.recv_type("auth_ok"))["id"] == "r1"
        assert (await c.recv_type("error", timeout=5))["id"] == "r2"
        assert (await c.expect_close())[0] == 4001


async def test_refused_refresh_keeps_connection(gateway):
    async with ws_connect(gateway, "w1") as c:
        await c.auth(gateway.token("w1", sub="alice"))
        await c.send({"type": "auth", "token": gateway.token("w1", sub="mallory"), "id": 1})
        err = await c.recv_type("error")
        assert err["code"] == 4003 and err["id"] == 1
        await c.send({"type": "auth", "token": gateway.token("w1", sub="alice", ttl=-30)})
        assert (await c.recv_type("error"))["code"] == 4001
        await c.send({"type": "auth", "token": "garbage"})
        assert (await c.recv_type("error"))["code"] == 4002
        # The same subject, but a token that no longer grants this workspace.
        await c.send({"type": "auth", "token": gateway.token("w2", sub="alice"), "id": 2})
        err = await c.recv_type("error")
        assert (err["code"], err["id"]) == (4003, 2) and "workspace w1" in err["message"]
        await c.send({"type": "ping"})
        assert (await c.recv())["type"] == "pong"


async def test_refresh_with_a_token_just_past_exp_is_refused(gateway):
    """A token a second or two past `exp` passes the presentation leeway, but the session ends
    exactly at `exp`: as a refresh it replaced the valid token and closed the connection with
    4001 at once. It is an expired token: refused (4001), the connection carries on."""
    async with ws_connect(gateway, "w1") as c:
        first = await c.auth(gateway.token("w1", sub="alice"))
        await c.send({"type": "auth", "token": gateway.token("w1", sub="alice", ttl=-2), "id": "late"})
        err = await c.recv_type("error")
        assert (err["code"], err["name"], err["id"]) == (4001, "token_expired", "late"), err
        await c.send({"type": "ping", "id": "p"})
        assert _pong(await c.recv()) == {"type": "pong", "id": "p"}
        await c.no_message(0.3)
        assert c.close_code is None
        # A later refresh with a valid token is still taken (same session).
        await asyncio.sleep(1.1)  # limits.min_refresh_interval
        again = await c.auth(gateway.token("w1", sub="alice", ttl=7200))
        assert again["sessionId"] == first["sessionId"]


async def test_workspace_not_granted_closes_4003(gateway):
    async with ws_connect(gateway, "w2") as c:
        await c.send({"type": "auth", "token": gateway.token("w1"), "id": "a1"})
        err = await c.recv_type("error")
        assert err["code"] == 4003 and err["id"] == "a1"
        assert await c.expect_close() == (4003, "scope_denied")


async def test_only_a_granted_workspace_gets_state(gateway_factory):
    """An upgrade whose token is refused or never comes leaves nothing behind: no workspace
    (history, metrics), no change streams, no line in the state dir's list of known ids. (The
    list holds the workspaces a default change feed records into: one is configured, though
    no server answers there.)"""
    gw = await gateway_factory(env={"RT_AUTH_TIMEOUT": "0.5", "RT_POSTGRES_URL": "postgresql://rt@127.0.0.1:1/app"})

    def known() -> list[str]:
        try:
            with open(os.path.join(gw.state_dir, "workspaces")) as fh:
                return fh.read().split()
        except FileNotFoundError:
            return []

    async def workspace_gauge() -> float:
        status, body = await gw.get("/metrics")
        assert status == 200
        return float(re.search(rb"^rt_workspaces (\S+)$", body, re.M).group(1))

    async with ws_connect(gw, "anon-bad") as c:
        await c.send({"type": "auth", "token": "garbage"})
        assert await c.expect_close() == (4002, "token_invalid")
    async with ws_connect(gw, "anon-other") as c:
        await c.send({"type": "auth", "token": gw.token("w1")})
        assert await c.expect_close() == (4003, "scope_denied")
    async with ws_connect(gw, "anon-silent") as c:
        assert await c.expect_close() == (4002, "token_invalid")
    async with ws_connect(gw, "anon-header", token="not-a-jwt", header_auth=True) as c:
        assert await c.expect_close() == (4002, "token_invalid")
    assert await workspace_gauge() == 0
    async with ws_connect(gw, "granted", token=gw.token("granted")) as c:
        await c.subscribe("events:x")
    assert await workspace_gauge() == 1
    deadline = time.monotonic() + 5
    while "granted" not in known() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # appended off the event loop
    assert known() == ["granted"]
    assert b"anon" not in (await gw.get("/metrics"))[1]


async def test_wildcard_workspace_grant(gateway):
    async with ws_connect(gateway, "any-ws", token=gateway.token("*")) as c:
        await c.subscribe("events:x")


async def test_bad_signature_and_alg_none_are_4002(gateway):
    import jwt

    forged = gateway.token("w1", secret="another-secret-of-sufficient-length")
    none_alg = jwt.encode({"sub": "x", "workspaces": ["w1"], "exp": int(time.time()) + 60}, None, algorithm="none")
    for token in (forged, none_alg):
        async with ws_connect(gateway, "w1") as c:
            await c.send({"type": "auth", "token": token})
            assert (await c.recv_type("error"))["code"] == 4002
            assert (await c.expect_close())[0] == 4002


def _deep_token(depth: int = 6000) -> str:
    """A token-shaped string whose header is JSON nested `depth` deep (under the 16 KiB bound)."""
    head = base64.urlsafe_b64encode(b"[" * depth + b"]" * depth).rstrip(b"=").decode()
    return f"{head}.e30.c2ln"


async def test_token_with_a_deeply_nested_header_is_4002(gateway):
    """Its header's JSON nests past the recursion limit: it is malformed (4002), not a crash of
    the handler (1011, internal_error, before the fix)."""
    async with ws_connect(gateway, "w1") as c:
        await c.send({"type": "auth", "token": _deep_token(), "id": "d"})
        err = await c.recv_type("error")
        assert (err["code"], err["id"]) == (4002, "d") and "nests too deeply" in err["message"], err
        assert await c.expect_close() == (4002, "token_invalid")
    async with ws_connect(gateway, "w1", token=_deep_token(), header_auth=True) as c:
        assert (await c.recv_type("error"))["code"] == 4002
        assert await c.expect_close() == (4002, "token_invalid")


async def test_subscribe_reply_echoes_id_and_unsubscribe(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.send({"type": "subscribe", "channel": "events:orders", "id": "s1"})
        reply = await c.recv()
        position = reply.pop("seq")  # where the subscription starts: every later event that matches
        assert reply == {"type": "subscribed", "channel": "events:orders", "id": "s1"}
        before = (await gateway.publish("w1", "other", {}))["seq"]
        await c.send({"type": "subscribe", "channel": "events:x", "id": "s2"})
        assert (await c.recv())["seq"] >= before > position
        await c.send({"type": "unsubscribe", "channel": "events:orders", "id": 2})
        assert await c.recv() == {"type": "unsubscribed", "channel": "events:orders", "id": 2}
        await c.send({"type": "unsubscribe", "channel": "events:never"})
        assert await c.recv() == {"type": "unsubscribed", "channel": "events:never"}
        await gateway.publish("w1", "orders", {"n": 1})
        await c.no_message()


async def test_event_shape_and_correlation_id(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe("events:orders")
        out = await gateway.publish("w1", "orders", {"id": 5, "total": 9.5}, correlation_id="corr-abc-123")
        ev = await c.recv_event()
    assert ev["channel"] == "events:orders" and ev["operation"] == "PUBLISH" and ev["topic"] == "orders"
    assert ev["payload"] == {"id": 5, "total": 9.5}
    assert ev["correlationId"] == "corr-abc-123" == out["correlationId"]
    assert ev["seq"] == out["seq"]
    assert ISO_MS.match(ev["timestamp"])


async def test_generated_correlation_id_when_absent(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe("events:*")
        out = await gateway.publish("w1", "a", [1, 2])
        ev = await c.recv_event()
    assert ev["correlationId"] == out["correlationId"] and len(ev["correlationId"]) >= 16
    assert ev["payload"] == [1, 2] and ev["channel"] == "events:a"


async def test_channel_errors_4010(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        # "events:x\n": a trailing newline is no part of a topic (a `$`-anchored check let it in).
        for channel in ("nosuch:thing", "events:bad topic!", "postgres:products", "mongo:orders", "events", "events:",
                        "events:x\n"):
            await c.send({"type": "subscribe", "channel": channel, "id": channel})
            err = await c.recv_type("error")
            assert (err["code"], err["name"], err["channel"], err["id"]) == (4010, "channel_unavailable", channel, channel)
        # Refused as malformed before the source is looked up (it passed as table "orders").
        await c.send({"type": "subscribe", "channel": "postgres:orders\n"})
        assert "a table is" in (await c.recv_type("error"))["message"]


async def test_filter_errors_4000(gateway):
    bad_filters = [
        {"operations": ["INSERT", "EXPLODE"]},
        {"operations": "INSERT"},
        {"entity": "other"},
        {"predicates": {"price": {"$regex": "x"}}},
        {"predicates": {"$where": "1"}},
        {"predicates": "x"},
        {"colour": "red"},
    ]
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        for i, f in enumerate(bad_filters):
            await c.send({"type": "subscribe", "channel": "events:orders", "filter": f, "id": i})
            err = await c.recv_type("error")
            assert err["code"] == 4000 and err["id"] == i, (f, err)
        await c.subscribe("events:orders")


async def test_a_null_filter_field_is_an_absent_one(gateway):
    """A filter field set to null is taken as absent (a client building the filter from
    optional values sends null for those it has none of): `operations`, `entity` and
    `predicates` were, but a null `transitions` was refused with 4000."""
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        f = {"operations": None, "entity": None, "predicates": None, "transitions": None}
        await c.subscribe("events:orders", f)
        await gateway.publish("w1", "orders", {"n": 1})
        ev = await c.recv_event()
        assert ev["payload"] == {"n": 1} and "transition" not in ev


async def test_a_refused_filter_names_its_channel(gateway):
    """A subscribe's errors name its channel (§5), a bad filter's 4000 too: a client with
    several subscribes in flight, and no ids, knows which one was refused. Before, the
    filter's 4000 alone had no `channel`, whether the filter's shape or a predicate was bad."""
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        for f in ({"colour": "red"}, {"predicates": {"price": {"$regex": "x"}}}):
            await c.send({"type": "subscribe", "channel": "events:orders", "filter": f})
            err = await c.recv_type("error")
            assert (err["code"], err.get("channel")) == (4000, "events:orders"), err


async def test_a_subscribe_refused_for_its_shape_names_its_channel(gateway):
    """A subscribe whose `filter` is not an object, or whose `since` is not an integer, is
    refused with 4000 before its filter is read: that error names the channel too (§5), as a
    client written from the docs waits for an answer naming it. Before, it had no `channel`."""
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        for extra in ({"filter": "status=paid"}, {"filter": [1]}, {"since": "1795882500879655"}):
            await c.send({"type": "subscribe", "channel": "events:orders", **extra})
            err = await c.recv_type("error")
            assert (err["code"], err.get("channel")) == (4000, "events:orders"), (extra, err)
        await c.send({"type": "unsubscribe", "channel": "events:orders", "id": 1.5})
        err = await c.recv_type("error")
        assert (err["code"], err.get("channel")) == (4000, "events:orders"), err
        await c.subscribe("events:orders")


async def test_unknown_type_and_non_object_are_4000(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        for msg in ('{"type":"explode","id":3}', "[1,2]", '"x"', '{"channel":"events:x"}'):
            await c.send(msg)
            err = await c.recv_type("error")
            assert err["code"] == 4000
        await c.send('{"type":"explode","id":3}')
        assert (await c.recv_type("error"))["id"] == 3


async def test_a_filter_at_the_decoders_very_limit_is_4000_not_1011(gateway):
    """A filter nesting just under the decoder's limit decoded, but the subscribe measures it
    by encoding it again, deeper in the stack: RecursionError, which nothing caught, and picows
    dropped the connection with 1011 and an ERROR traceback, at will. Each such subscribe is
    refused with 4000 now (the connection stays open), as one nesting deeper still is."""
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        for depth in range(975, 992):  # 17: under the 20 invalid messages a minute that close it
            inner = "[" * depth + "1" + "]" * depth  # json.dumps would itself run out of stack
            await c.send(f'{{"type":"subscribe","channel":"events:x","id":{depth},"filter":{{"predicates":{{"a":{inner}}}}}}}')
            err = await c.recv_type("error")
            # (no id past the limit: the decoder could not read it)
            assert err["code"] == 4000 and err.get("id") in (depth, None) and "nests" in err["message"], err
        await c.send({"type": "ping", "id": "still-open"})
        assert _pong(await c.recv()) == {"type": "pong", "id": "still-open"}
    assert '"level":"error"' not in gateway.logs()


async def test_unreadable_json_is_4000_and_the_connection_stays_open(gateway):
    """JSON nested past the recursion limit and a text frame that is not UTF-8 are messages
    that are not JSON (§6: 4000, the connection stays open), before auth and after. Both made
    the decoder raise what the gateway did not catch: picows dropped the connection with 1011."""
    from websockets.frames import Frame, Opcode

    deep_array = "[" * 30000 + "]" * 30000  # 60 KB, under the 64 KiB message limit
    deep_filter = json.dumps({"type": "subscribe", "channel": "events:x", "id": 5, "filter": {}})
    deep_filter = deep_filter.replace("{}", '{"predicates":{"x":' + "[" * 5000 + "]" * 5000 + "}}")
    not_utf8 = Frame(Opcode.TEXT, b'{"type":"ping","id":"\xff"}').serialize(mask=True, extensions=[])
    async with ws_connect(gateway, "w1") as c:
        for authenticated in (False, True):
            for send, says in ((deep_array, "got `array`"), (deep_filter, "nests too deeply"), (not_utf8, "UTF-8")):
                if isinstance(send, bytes):
                    c.ws.transport.write(send)
                else:
                    await c.send(send)
                err = await c.recv_type("error")
                assert (err["code"], err["name"]) == (4000, "invalid_message"), err
                assert says in err["message"], err
            if not authenticated:
                await c.auth(gateway.token("w1"))
        await c.send({"type": "ping", "id": "still-open"})
        assert _pong(await c.recv()) == {"type": "pong", "id": "still-open"}


async def test_a_lone_surrogate_escape_is_refused_saying_so(gateway):
    """JSON's grammar allows "\\ud83d" alone (JavaScript's JSON.stringify writes it for a string
    cut in the middle of an emoji), Unicode text does not: refused, on the WebSocket (4000) and
    by the publish API (400), with a message that says so, not "Input data was truncated"."""
    cut = '{"type":"subscribe","channel":"events:x","filter":{"predicates":{"name":"caf\\ud83d"}}}'
    low = '{"type":"ping","id":"\\udc00"}'
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        for text in (cut, low):
            await c.send(text)
            err = await c.recv_type("error")
            assert err["code"] == 4000 and "half a UTF-16 surrogate pair" in err["message"], err
        await c.send('{"type":"ping","id":"\\ud83d\\ude00 and \\\\ud83d"}')  # a pair; an escaped backslash
        assert _pong(await c.recv()) == {"type": "pong", "id": "\U0001f600 and \\ud83d"}
    status, body = await gateway.post("/workspaces/w1/realtime/events/orders", b'{"name":"caf\\ud83d"}',
                                      {"Authorization": f"Bearer {gateway.token('w1', publish=True)}"})
    assert status == 400 and b"half a UTF-16 surrogate pair" in body, body


async def test_twenty_invalid_messages_close_1008(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        for _ in range(20):
            await c.send("nope")
        code, reason = await c.expect_close()
    assert (code, reason) == (1008, "policy_violation")


async def test_messages_behind_a_slow_handler_wait_their_turn(gateway_factory):
    """Messages sent while an earlier one is still handled (an auth refresh awaits the token
    check) queue in order; past 64 the gateway stops reading instead of closing, so a client
    that writes a thousand messages at once gets every answer, in order."""
    from websockets.frames import Frame, Opcode

    # Refreshes unpaced: 200 of them at one a second would take minutes (pacing itself:
    # tests/test_amplification.py).
    gateway = await gateway_factory(env={"RT_MIN_REFRESH_INTERVAL": "0"})
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        messages = []
        for i in range(200):
            messages.append({"type": "auth", "token": gateway.token("w1"), "id": f"a{i}"})
            messages += [{"type": "ping", "id": f"p{i}.{j}"} for j in range(4)]
        # One write: the messages arrive faster than the refreshes are handled.
        data = b"".join(
            Frame(Opcode.TEXT, json.dumps(m).encode()).serialize(mask=True, extensions=[]) for m in messages
        )
        c.ws.transport.write(data)
        for m in messages:
            reply = await c.recv(timeout=10)
            assert reply["id"] == m["id"], (reply, m)
            assert reply["type"] == ("auth_ok" if m["type"] == "auth" else "pong")
        await c.send({"type": "ping", "id": "after"})
        assert _pong(await c.recv()) == {"type": "pong", "id": "after"}


async def test_oversized_message_is_refused(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.send(json.dumps({"type": "ping", "pad": "x" * 70000}))
        err = await c.recv_type("error")
        assert err["code"] == 4000 and "exceeds" in err["message"]
        code, _ = await c.expect_close()
        assert code == 1009


async def test_a_frame_over_the_read_limit_gets_the_answer_of_any_message_too_big(gateway):
    """A single frame beyond what the gateway reads (1 MiB, or 4 times
    limits.max_message_bytes) is refused as soon as its header is read, with the answer any
    message over the limit gets: error 4000 saying why, then close 1009 whose reason is the
    code's name (picows's own close said "Received frame with payload size exceeding max
    allowed size, 2097152 > 1048576" and the error never came)."""
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        # Only the header and a few bytes of the 2 MiB: the client is not left writing the rest
        # into a socket the gateway has closed (a reset, which may discard the close).
        header = bytes([0x81, 0x80 | 127]) + (2 << 20).to_bytes(8, "big") + b"\x01\x02\x03\x04"
        c.ws.transport.write(header + b"xxxxxxxx")
        err = await c.recv_type("error")
        assert (err["code"], err["message"]) == (4000, "message of 2097152 bytes exceeds the 65536-byte limit"), err
        assert await c.expect_close() == (1009, "message_too_big")
    (rec,) = await gateway.audit_records("session-suspended")
    assert (rec["code"], rec["reason"]) == (1009, "message_too_big")
    samples = parse_exposition((await gateway.get("/metrics"))[1].decode())
    assert samples["rt_invalid_messages_total"] == 1


async def test_a_frame_over_the_read_limit_sent_whole_closes_1009_and_is_audited_as_such(gateway):
    """The same frame sent whole: the gateway closes while the client is still writing it; the
    audit trail names the cause."""
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        try:
            await c.send(json.dumps({"type": "ping", "pad": "x" * (2 << 20)}))
            close = await c.expect_close()
        except websockets.ConnectionClosed as exc:
            # Closed while the 2 MiB were still being sent: the gateway's close of a socket with
            # unread bytes is a reset, which may also discard its close frame on the client's
            # side (the audit record below names the code all the same).
            close = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else None
        if close is not None:
            assert close == (1009, "message_too_big"), close
    (rec,) = await gateway.audit_records("session-suspended")
    assert (rec["code"], rec["reason"]) == (1009, "message_too_big")


async def test_fragmented_message_with_a_flood_of_empty_continuations(gateway):
    """A message may come in fragments; empty continuation frames cost the gateway nothing
    per frame (a sum over all fragments per frame made 40,000 of them, 240 KB sent before
    authenticating, hold the event loop for half a minute)."""
    from websockets.frames import Frame, Opcode

    def frame(opcode: Opcode, data: bytes, fin: bool) -> bytes:
        return Frame(opcode, data, fin=fin).serialize(mask=True, extensions=[])

    async with ws_connect(gateway, "w1") as c:
        message = json.dumps({"type": "auth", "token": gateway.token("w1"), "id": "frag"}).encode()
        empty = frame(Opcode.CONT, b"", False)
        c.ws.transport.write(
            frame(Opcode.TEXT, message[:10], False) + empty * 40000 + frame(Opcode.CONT, message[10:], True)
        )
        ok = await c.recv(timeout=5)
        assert ok["type"] == "auth_ok" and ok["id"] == "frag"
        status, _ = await gateway.get("/healthz")
        assert status == 200
        # Fragments still count toward the message limit, the first one included.
        c.ws.transport.write(frame(Opcode.TEXT, b"x" * 70000, False))
        err = await c.recv_type("error")
        assert err["code"] == 4000 and "exceeds" in err["message"]
        code, _ = await c.expect_close()
        assert code == 1009


async def test_a_binary_message_is_refused_in_its_turn(gateway):
    """Messages are answered in the order they came (docs/protocol.md §6), and `auth_ok` is the
    answer to `auth`: a binary message sent behind `auth` and a ping is refused (4000) after
    their answers. Its 4000 went out at once, ahead of `auth_ok`, while the messages before it
    waited for the token check."""
    from websockets.frames import Frame, Opcode

    def frame(opcode: Opcode, data: bytes) -> bytes:
        return Frame(opcode, data).serialize(mask=True, extensions=[])

    async with ws_connect(gateway, "w1") as c:
        auth = json.dumps({"type": "auth", "token": gateway.token("w1")}).encode()
        c.ws.transport.write(frame(Opcode.TEXT, auth) + frame(Opcode.TEXT, b'{"type":"ping","id":"p"}')
                             + frame(Opcode.BINARY, b"\x01"))
        assert (await c.recv())["type"] == "auth_ok"
        assert _pong(await c.recv()) == {"type": "pong", "id": "p"}
        err = await c.recv_type("error")
        assert (err["code"], err["message"]) == (4000, "binary frames are not supported: send JSON text"), err


@pytest.mark.parametrize("case", ["text_inside_text", "binary_inside_text", "stray_continuation"])
async def test_broken_fragmentation_is_a_protocol_error(gateway, case):
    """RFC 6455 §5.4: a message's fragments are not interleaved with another message, and a
    continuation frame continues a message. Before, a new message silently dropped the
    fragments before it and a stray continuation was ignored; now both close with 1002."""
    from websockets.frames import Frame, Opcode

    def frame(opcode: Opcode, data: bytes, fin: bool) -> bytes:
        return Frame(opcode, data, fin=fin).serialize(mask=True, extensions=[])

    ping = json.dumps({"type": "ping", "id": "p"}).encode()
    wrong = {
        "text_inside_text": frame(Opcode.TEXT, ping[:5], False) + frame(Opcode.TEXT, ping, True),
        "binary_inside_text": frame(Opcode.TEXT, ping[:5], False) + frame(Opcode.BINARY, b"x", True),
        "stray_continuation": frame(Opcode.CONT, ping, True),
    }[case]
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        # Fragments done right still work, a binary message's included (refused, 4000).
        c.ws.transport.write(frame(Opcode.BINARY, b"x", False) + frame(Opcode.CONT, b"y", True)
                             + frame(Opcode.TEXT, ping[:5], False) + frame(Opcode.CONT, ping[5:], True))
        assert (await c.recv_type("error"))["code"] == 4000
        assert _pong(await c.recv()) == {"type": "pong", "id": "p"}
        c.ws.transport.write(wrong)
        code, reason = await c.expect_close()
        assert (code, reason) == (1002, "protocol_error")


async def test_filters_operations_entity_predicates(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe("events:*", {"entity": "orders", "predicates": {"total": {"$gte": 100}, "tags": "vip"}})
        await gateway.publish("w1", "orders", {"total": 50, "tags": ["vip"]})
        await gateway.publish("w1", "other", {"total": 500, "tags": ["vip"]})
        await gateway.publish("w1", "orders", {"total": 150.5, "tags": ["vip", "eu"]})
        await gateway.publish("w1", "orders", {"total": "200", "tags": ["vip"]})  # string never compares to number
        ev = await c.recv_event()
        assert ev["payload"]["total"] == 150.5
        await c.no_message()


async def test_an_operation_that_cannot_occur_on_the_channel_is_taken_and_never_matches(gateway):
    """§4: an unknown operation name is 4000, but a known one that cannot occur on the channel
    (INSERT on events:) is taken and simply never matches."""
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe("events:orders", {"operations": ["INSERT", "DELETE"]})
        await c.subscribe("events:marker", {"operations": ["PUBLISH", "TRUNCATE"]})
        await gateway.publish("w1", "orders", {"n": 1})
        await gateway.publish("w1", "marker", {})
        assert (await c.recv_event())["channel"] == "events:marker"  # nothing of orders before it


async def test_predicate_or_in_exists_and_dotted_paths(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe(
            "events:orders",
            {"predicates": {"$or": [{"customer.country": {"$in": ["FR", "DE"]}}, {"rush": {"$exists": True}}]}},
        )
        for payload in ({"customer": {"country": "US"}}, {"customer": {"country": "DE"}, "n": 1}, {"rush": None, "n": 2}, 7):
            await gateway.publish("w1", "orders", payload)
        assert (await c.recv_event())["payload"]["n"] == 1
        assert (await c.recv_event())["payload"]["n"] == 2
        await c.no_message()


async def test_non_object_payload_matches_only_empty_predicates(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe("events:a", {"predicates": {"x": 1}})
        await c.subscribe("events:b", {"predicates": {}})
        await gateway.publish("w1", "a", "text")
        await gateway.publish("w1", "b", "text")
        ev = await c.recv_event()
        assert ev["channel"] == "events:b" and ev["payload"] == "text"
        await c.no_message()


async def test_resubscribe_replaces_filter(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe("events:o", {"predicates": {"n": 1}})
        await c.subscribe("events:o", {"predicates": {"n": 2}})
        await gateway.publish("w1", "o", {"n": 1})
        await gateway.publish("w1", "o", {"n": 2})
        assert (await c.recv_event())["payload"] == {"n": 2}
        await c.no_message()


async def test_event_matching_two_channels_arrives_once(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe("events:*")
        await c.subscribe("events:o")
        await gateway.publish("w1", "o", {"n": 1})
        assert (await c.recv_event())["payload"] == {"n": 1}
        await c.no_message()


async def test_subscription_quota_4008(gateway_factory):
    gw = await gateway_factory(env={"RT_MAX_SUBSCRIPTIONS": "3"})
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        for i in range(3):
            await c.subscribe(f"events:t{i}")
        await c.send({"type": "subscribe", "channel": "events:t9", "id": 9})
        err = await c.recv_type("error")
        assert (err["code"], err["name"], err["id"]) == (4008, "quota_exceeded", 9)
        await c.subscribe("events:t1")  # replacing an existing one is not a new subscription
        await c.send({"type": "ping"})
        assert (await c.recv())["type"] == "pong"


async def test_filter_bytes_per_connection_4008(gateway_factory):
    """The filters of a connection's subscriptions are bounded together in JSON bytes: a
    compiled filter takes ~30 times its size in memory, and a connection could otherwise hold
    the subscription quota's worth of the largest message each."""
    gw = await gateway_factory(env={"RT_MAX_FILTER_BYTES": "300"})

    def sized(n: int) -> dict:
        filter_ = {"predicates": {"k": {"$in": []}}}
        while len(json.dumps(filter_, separators=(",", ":"))) < n:
            filter_["predicates"]["k"]["$in"].append(len(filter_["predicates"]["k"]["$in"]))
        return filter_

    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("events:a", sized(200))
        await c.send({"type": "subscribe", "channel": "events:b", "filter": sized(150), "id": 7})
        err = await c.recv_type("error")
        assert (err["code"], err["name"], err["id"], err["channel"]) == (4008, "quota_exceeded", 7, "events:b")
        assert "over the limit of 300" in err["message"]
        await c.subscribe("events:b", sized(90))  # fits beside the first
        await c.subscribe("events:a", sized(205))  # a replaced filter counts once
        await c.send({"type": "unsubscribe", "channel": "events:a"})
        await c.recv_type("unsubscribed")
        await c.subscribe("events:c", sized(200))  # what an unsubscribe freed
        await gw.publish("w1", "b", {"k": 3})
        assert (await c.recv_event())["channel"] == "events:b"


async def test_node_connection_limit_answers_503_to_further_upgrades(gateway_factory):
    """limits.max_node_connections counts every workspace's WebSocket connections: past it an
    upgrade gets 503 (before the open-files limit, where the gateway's own sockets would fail
    too); a connection that ends makes room again."""
    gw = await gateway_factory(env={"RT_MAX_NODE_CONNECTIONS": "2"})
    async with ws_connect(gw, "w1", token=gw.token("w1")), ws_connect(gw, "w2", token=gw.token("w2")):
        with pytest.raises(websockets.InvalidStatus) as info:
            async with ws_connect(gw, "w3", token=gw.token("w3")):
                pass
        assert info.value.response.status_code == 503
        assert "limit of 2 connections" in json.loads(info.value.response.body)["error"]
    for _ in range(100):  # once the gateway has seen the two closes
        try:
            async with ws_connect(gw, "w3", token=gw.token("w3")) as c:
                await c.subscribe("events:x")
                break
        except websockets.InvalidStatus:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("no room after the connections ended")
    _, metrics = await gw.get("/metrics")
    refused = re.search(rb"^rt_connections_refused_total (\d+)", metrics, re.M)
    assert refused is not None and int(refused.group(1)) >= 1


async def test_connection_quota_per_workspace_closes_4008(gateway_factory):
    gw = await gateway_factory(env={"RT_MAX_CONNECTIONS": "2"})
    async with ws_connect(gw, "w1", token=gw.token("w1")), ws_connect(gw, "w1", token=gw.token("w1", sub="b")):
        async with ws_connect(gw, "w1") as third:
            await third.send({"type": "auth", "token": gw.token("w1", sub="c")})
            assert (await third.recv_type("error"))["code"] == 4008
            assert await third.expect_close() == (4008, "quota_exceeded")
        # another workspace is not affected
        async with ws_connect(gw, "w2", token=gw.token("w2")) as other:
            await other.subscribe("events:x")


async def test_connection_quota_per_subject_closes_4008(gateway_factory):
    gw = await gateway_factory(env={"RT_MAX_CONNECTIONS_PER_SUBJECT": "1"})
    async with ws_connect(gw, "w1", token=gw.token("w1", sub="same")):
        async with ws_connect(gw, "w1") as second:
            await second.send({"type": "auth", "token": gw.token("w1", sub="same")})
            assert (await second.recv_type("error"))["code"] == 4008
            assert (await second.expect_close())[0] == 4008
        # The limit counts the subject's connections in every workspace together.
        async with ws_connect(gw, "w2") as other:
            await other.send({"type": "auth", "token": gw.token(["w1", "w2"], sub="same"), "id": 9})
            err = await other.recv_type("error")
            assert (err["code"], err["id"]) == (4008, 9)
            assert (await other.expect_close())[0] == 4008
    # Its connection gone, the subject may connect again.
    async with ws_connect(gw, "w2", token=gw.token("w2", sub="same")) as again:
        await again.subscribe("events:x")


async def test_channel_permissions_claim(gateway_factory):
    gw = await gateway_factory(env={"RT_AUTH_CHANNEL_PERMISSIONS": "true"})
    token = gw.token("w1", realtime_channels=["events:orders"])
    async with ws_connect(gw, "w1", token=token) as c:
        await c.subscribe("events:orders")
        await c.send({"type": "subscribe", "channel": "events:secret", "id": 1})
        err = await c.recv_type("error")
        assert (err["code"], err["channel"]) == (4003, "events:secret")
        await c.send({"type": "ping"})
        assert (await c.recv())["type"] == "pong"


async def test_a_channel_refusal_names_the_claim_and_what_the_token_grants(gateway_factory):
    """A developer refused a channel must learn from the 4003 which claim is read and what it
    holds: the message said only "token does not grant channel events:secret", the same for a
    pattern typo (`event:*`), a claim under another name and a token with no claim at all."""
    gw = await gateway_factory(env={"RT_AUTH_CHANNEL_PERMISSIONS": "true"})
    for claims, expected in (({"realtime_channels": ["events:orders", "event:*"]},
                               "its claim realtime_channels lists events:orders, event:*"),
                              ({"channels": ["events:*"]}, "it has no realtime_channels claim")):
        async with ws_connect(gw, "w1", token=gw.token("w1", **claims)) as c:
            await c.send({"type": "subscribe", "channel": "events:secret", "id": 1})
            err = await c.recv_type("error")
            assert (err["code"], err["channel"]) == (4003, "events:secret"), err
            assert "events:secret" in err["message"] and expected in err["message"], err


async def test_a_workspace_refusal_names_the_claim_and_what_the_token_grants(gateway_factory):
    """The wrong workspace in the URL (or a token minted for another) gets a 4003 that names
    the claim read and what it holds: it said only "token does not grant workspace w1", the
    same for a claim mapped under another name or a role without the configured prefix."""
    gw = await gateway_factory()
    for token, expected in ((gw.token("w2"), "its claim workspaces lists w2"),
                            (gw.token("w2", workspaces=None, tenants=["w1"]), "it has no workspaces claim")):
        async with ws_connect(gw, "w1") as c:
            await c.send({"type": "auth", "token": token})
            err = await c.recv_type("error")
            assert err["code"] == 4003 and "does not grant workspace w1" in err["message"], err
            assert expected in err["message"], err
    gw = await gateway_factory(env={"RT_AUTH_WORKSPACE_CLAIM": "realm_access.roles",
                                    "RT_AUTH_WORKSPACE_ROLE_PREFIX": "workspace:"})
    async with ws_connect(gw, "w1") as c:
        await c.send({"type": "auth", "token": gw.token("w1", realm_access={"roles": ["w1", "offline_access"]})})
        err = await c.recv_type("error")
        assert err["code"] == 4003, err
        assert "no role workspace:w1 (nor workspace:*) in it: its claim realm_access.roles lists w1, offline_access" in err["message"], err


async def test_channel_permissions_take_a_public_table_in_either_spelling(gateway_factory):
    """`postgres:orders` and `postgres:public.orders` are one channel (§4): a token listing
    either spelling (or `postgres:public.*`) may subscribe to both. Before, the patterns were
    compared as text, so a token listing `postgres:public.orders` was refused `postgres:orders`
    with 4003, though it could subscribe to the same table by the other spelling. (No source is
    configured here: a granted channel gets 4010, a refused one 4003.)"""
    gw = await gateway_factory(env={"RT_AUTH_CHANNEL_PERMISSIONS": "true"})
    cases = [
        (["postgres:public.orders"], "postgres:orders", 4010),
        (["postgres:orders"], "postgres:public.orders", 4010),
        (["postgres:public.*"], "postgres:orders", 4010),
        (["postgres:ord*"], "postgres:public.orders", 4010),
        (["postgres:public.orders"], "postgres:public.orders", 4010),
        (["postgres:public.orders"], "postgres:sales.orders", 4003),
        (["postgres:sales.*"], "postgres:orders", 4003),
        (["postgres:orders"], "postgres:*", 4003),
        (["postgres:orders"], "postgres:order", 4003),
        # A prefix covers the channel in the spelling without `public.` (or, written with
        # `postgres:public.`, the tables of schema public): `postgres:p*` covered every table of
        # schema public through `postgres:public.*` (authorization audit).
        (["postgres:p*"], "postgres:orders", 4003),
        (["postgres:p*"], "postgres:public.orders", 4003),
        (["postgres:pu*"], "postgres:public.orders", 4003),
        (["postgres:p*"], "postgres:public.products", 4010),
        (["postgres:public.o*"], "postgres:orders", 4010),
        (["postgres:public.o*"], "postgres:products", 4003),
    ]
    for patterns, channel, code in cases:
        async with ws_connect(gw, "w1", token=gw.token("w1", realtime_channels=patterns)) as c:
            await c.send({"type": "subscribe", "channel": channel})
            err = await c.recv_type("error")
            assert (err["code"], err["channel"]) == (code, channel), (patterns, channel, err)


async def test_channel_permissions_apply_to_refreshed_and_resumed_sessions(gateway_factory):
    """The channel permissions are the current token's: a refresh, or a resume, with a token
    that grants fewer channels drops the subscriptions it does not cover (4003 on each), and
    neither live events nor the resume's replay of them reach the client."""
    gw = await gateway_factory(env={"RT_AUTH_CHANNEL_PERMISSIONS": "true"})
    wide = gw.token("w1", realtime_channels=["events:*"])
    narrow = gw.token("w1", realtime_channels=["events:public"])
    async with ws_connect(gw, "w1", token=wide) as c:
        await c.subscribe("events:secret")
        await c.subscribe("events:public")
        await c.send({"type": "auth", "token": narrow, "id": "r"})
        ok = await c.recv_type("auth_ok")
        session = ok["sessionId"]
        err = await c.recv_type("error")
        assert (err["code"], err["channel"]) == (4003, "events:secret")
        await gw.publish("w1", "secret", {"n": 1})
        await gw.publish("w1", "public", {"n": 2})
        assert (await c.recv_event())["payload"] == {"n": 2}
        await c.no_message()
        # Back to the wide token, then away: the session keeps both subscriptions.
        await c.send({"type": "auth", "token": wide})
        await c.recv_type("auth_ok")
        await c.subscribe("events:secret")
        seen = (await gw.publish("w1", "public", {"n": 3}))["seq"]
        assert (await c.recv_event())["seq"] == seen
    await gw.publish("w1", "secret", {"n": 4})
    await gw.publish("w1", "public", {"n": 5})
    async with ws_connect(gw, "w1") as c:
        ok = await c.auth(narrow, resume=session, since=seen)
        assert ok["resumed"] is True
        err = await c.recv_type("error")
        assert (err["code"], err["channel"]) == (4003, "events:secret")
        assert (await c.recv_event())["payload"] == {"n": 5}
        await gw.publish("w1", "secret", {"n": 6})
        await c.no_message()


async def test_fan_out_to_many_clients_in_order(gateway):
    n_clients, n_events = 50, 40
    token = gateway.token("w1")
    clients = []
    stack = []
    try:
        for _ in range(n_clients):
            cm = ws_connect(gateway, "w1", token=token)
            stack.append(cm)
            c = await cm.__aenter__()
            await c.subscribe("events:feed")
            clients.append(c)
        seqs = [(await gateway.publish("w1", "feed", {"i": i}))["seq"] for i in range(n_events)]
        assert seqs == sorted(seqs) and len(set(seqs)) == n_events
        for c in clients:
            got = [await c.recv_event() for _ in range(n_events)]
            assert [e["payload"]["i"] for e in got] == list(range(n_events))
            assert [e["seq"] for e in got] == seqs
    finally:
        for cm in reversed(stack):
            await cm.__aexit__(None, None, None)


async def test_workspaces_are_isolated(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as a, ws_connect(
        gateway, "w2", token=gateway.token("w2")
    ) as b:
        await a.subscribe("events:*")
        await b.subscribe("events:*")
        await gateway.publish("w2", "x", {"for": "w2"})
        assert (await b.recv_event())["payload"] == {"for": "w2"}
        await a.no_message()


async def test_slow_reader_gets_1013_and_others_lose_nothing(gateway_factory):
    gw = await gateway_factory(env={"RT_SEND_BUFFER_BYTES": "262144"})
    token = gw.token("w1")
    big = {"blob": "x" * 60000}  # 200 of these outgrow the kernel socket buffers too
    # The slow client: a raw websockets connection whose reading we stop.
    slow = await websockets.connect(gw.ws_url("w1"), max_size=None, max_queue=1)
    await slow.send(json.dumps({"type": "auth", "token": token}))
    await slow.recv()
    await slow.send(json.dumps({"type": "subscribe", "channel": "events:big"}))
    await slow.recv()
    slow.transport.pause_reading()
    async with ws_connect(gw, "w1", token=token) as fast:
        await fast.subscribe("events:big")
        received = 0
        for i in range(200):
            await gw.publish("w1", "big", {**big, "i": i})
            ev = await fast.recv_event()
            assert ev["payload"]["i"] == i
            received += 1
        assert received == 200
    slow.transport.resume_reading()
    try:
        while True:
            await asyncio.wait_for(slow.recv(), 10)
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 1013 and exc.rcvd.reason == "try_again_later"
    status, body = await gw.get("/metrics")
    assert b'rt_drops_total{reason="slow_reader"} 1' in body
    suspended = await gw.audit_records("session-suspended", count=2)
    assert sorted((r["code"], r["reason"]) for r in suspended) == [(1000, "client_close"), (1013, "slow_reader")]


async def _small_window_client(gw, token: str):
    """A client that reads as fast as it can through a small receive window: an event larger
    than the kernel buffers between the two ends waits in the gateway's send buffer while it
    leaves, as over a long-distance link."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect(("127.0.0.1", gw.port))
    ws = await websockets.connect(gw.ws_url("w1"), sock=sock, max_size=None)
    await ws.send(json.dumps({"type": "auth", "token": token}))
    await ws.recv()
    await ws.send(json.dumps({"type": "subscribe", "channel": "events:big"}))
    await ws.recv()
    return ws


async def test_an_event_larger_than_the_send_buffer_is_no_slow_reader(gateway_factory):
    """One 6 MiB event, 24 times send_buffer_bytes: what the kernel does not take at once waits
    in the send buffer, past its limit, however fast the client reads. That is no slow reader:
    it was closed with 1013 after the event (every subscriber, at every such event). The
    limit counts what waits beyond the largest frame: the events after it arrive, and the
    connection stays open."""
    gw = await gateway_factory(env={"RT_SEND_BUFFER_BYTES": "262144", "RT_MAX_PUBLISH_BYTES": str(8 << 20)})
    token = gw.token("w1")
    ws = await _small_window_client(gw, token)
    try:
        await gw.publish("w1", "big", {"blob": "x" * (6 << 20)})
        for i in range(3):
            await gw.publish("w1", "big", {"i": i})
        first = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert len(first["payload"]["blob"]) == 6 << 20
        assert [json.loads(await asyncio.wait_for(ws.recv(), 10))["payload"] for _ in range(3)] == [
            {"i": 0}, {"i": 1}, {"i": 2}]
        await ws.send(json.dumps({"type": "ping"}))
        assert _pong(json.loads(await asyncio.wait_for(ws.recv(), 10))) == {"type": "pong"}
    finally:
        await ws.close()
    status, body = await gw.get("/metrics")
    assert b'rt_drops_total{reason="slow_reader"}' not in body or b'rt_drops_total{reason="slow_reader"} 0' in body


async def test_a_slow_reader_is_closed_past_the_limit_beyond_its_largest_frame(gateway_factory):
    """The allowance for a large frame is that frame: a client that stops reading after it is
    closed with 1013 once send_buffer_bytes more wait behind it."""
    gw = await gateway_factory(env={"RT_SEND_BUFFER_BYTES": "262144", "RT_MAX_PUBLISH_BYTES": str(8 << 20)})
    token = gw.token("w1")
    ws = await _small_window_client(gw, token)
    ws.transport.pause_reading()
    await gw.publish("w1", "big", {"blob": "x" * (6 << 20)})
    for i in range(100):  # 6 MB more: the kernel buffers and 256 KiB beyond the 6 MiB frame
        await gw.publish("w1", "big", {"i": i, "pad": "y" * 60000})
    ws.transport.resume_reading()
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 30)
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 1013
    status, body = await gw.get("/metrics")
    assert b'rt_drops_total{reason="slow_reader"} 1' in body


async def test_ws_ping_frames_are_answered(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        pong_waiter = await c.ws.ping()
        await asyncio.wait_for(pong_waiter, 5)


async def test_idle_peer_is_closed_1001(gateway_factory):
    gw = await gateway_factory(env={"RT_IDLE_TIMEOUT": "2"})
    # A client that never answers pings: disable the library's automatic pong by pausing reads.
    ws = await websockets.connect(gw.ws_url("w1"), ping_interval=None)
    await ws.send(json.dumps({"type": "auth", "token": gw.token("w1")}))
    await ws.recv()
    ws.transport.pause_reading()
    await asyncio.sleep(4.5)
    ws.transport.resume_reading()
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None and (exc.rcvd.code, exc.rcvd.reason) == (1001, "going_away")
    (rec,) = await gw.audit_records("session-suspended")
    assert (rec["code"], rec["reason"]) == (1001, "idle_timeout")


def _holds_socket(pid: int, peer_port: int) -> bool:
    """Whether process `pid` holds (has a descriptor of) its TCP socket to local port
    `peer_port` (Linux /proc: a socket the process closed is the kernel's own, inode 0)."""
    inodes = set()
    with open(f"/proc/{pid}/net/tcp") as fh:
        for line in list(fh)[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == peer_port and fields[9] != "0":
                inodes.add(f"socket:[{fields[9]}]")
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            pass  # closed meanwhile
    return False


async def test_a_peer_closed_while_it_reads_nothing_is_cut_off_after_the_idle_timeout(gateway_factory):
    """A client that stops reading (a hung app: its TCP stack still acknowledges) is closed
    as idle with megabytes queued for it. The close frame waits behind them, and a graceful
    close waits for them to be written: the gateway held the socket, its descriptor and the
    queued bytes for as long as the peer lived. It now gives the peer idle_timeout to read
    them, then drops the connection."""
    gw = await gateway_factory(env={"RT_IDLE_TIMEOUT": "2", "RT_SEND_BUFFER_BYTES": str(64 << 20)})
    ws = await _stalled_subscriber(gw)
    try:
        port = ws.local_address[1]
        assert _holds_socket(gw.proc.pid, port)
        assert not await _held_for(gw, port, 30), "the gateway still holds a connection it closed 25 s ago"
    finally:
        ws.transport.abort()
    (rec,) = await gw.audit_records("session-suspended")
    assert (rec["code"], rec["reason"]) == (1001, "idle_timeout")


@pytest.mark.parametrize("first_byte", [0xC1, 0xA1, 0x91, 0x40])  # RSV1, RSV2, RSV3 on a text frame; RSV1 on a continuation
async def test_a_frame_with_reserved_bits_closes_1002(gateway, first_byte):
    """No extension is negotiated, so a frame with RSV1-3 set must fail the connection (RFC
    6455 §5.2): a client compressing without permessage-deflate got "not JSON" errors for each
    message, then 1008, and one with an unknown extension had its frames read as plain text."""
    reader, writer = await _raw_ws(gateway)
    try:
        writer.write(_masked(0x1, json.dumps({"type": "auth", "token": gateway.token("w1")}).encode()))
        opcode, data = await _read_frame(reader)
        assert opcode == 0x1 and json.loads(data)["type"] == "auth_ok"
        if first_byte & 0x0F == 0:  # a continuation: after the start of a message
            writer.write(b"\x01\x80\0\0\0\0")
        ping = b'{"type":"ping"}'
        writer.write(bytes([first_byte, 0x80 | len(ping)]) + b"\0\0\0\0" + ping)
        opcode, data = await _read_frame(reader)
        assert (opcode, int.from_bytes(data[:2], "big"), data[2:]) == (0x8, 1002, b"protocol_error")
    finally:
        writer.close()
    (rec,) = await gateway.audit_records("session-suspended")
    assert (rec["code"], rec["reason"]) == (1002, "protocol_error")


async def test_a_websocket_layer_close_behind_unread_frames_keeps_its_code(gateway_factory):
    """picows closes a connection on its own after a frame breaking RFC 6455 (1002), behind
    the frames queued for a peer that reads nothing; the connection ends only once they are
    written, so the idle sweep closed it again: a second close frame (1001) queued behind the
    first, and the audit said idle_timeout. It keeps the code sent, and is dropped after the
    idle timeout as any close is."""
    gw = await gateway_factory(env={"RT_IDLE_TIMEOUT": "2", "RT_SEND_BUFFER_BYTES": str(64 << 20)})
    ws = await _stalled_subscriber(gw)
    try:
        ws.transport.write(b"\x81\x02{}")  # not masked
        assert not await _held_for(gw, ws.local_address[1], 30)
    finally:
        ws.transport.abort()
    (rec,) = await gw.audit_records("session-suspended")
    assert (rec["code"], rec["reason"]) == (1002, "protocol_error")


async def _stalled_subscriber(gw) -> websockets.ClientConnection:
    """A subscriber of events:big of w1 that reads nothing (a hung app: its TCP stack still
    acknowledges), with 8 MB queued for it: more than the kernel buffers of both ends take."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect(("127.0.0.1", gw.port))
    ws = await websockets.connect(gw.ws_url("w1"), sock=sock, max_size=None, ping_interval=None)
    await ws.send(json.dumps({"type": "auth", "token": gw.token("w1")}))
    await ws.recv()
    await ws.send(json.dumps({"type": "subscribe", "channel": "events:big"}))
    await ws.recv()
    ws.transport.pause_reading()
    for i in range(40):
        await gw.publish("w1", "big", {"i": i, "pad": "y" * 200_000})
        await ws.send(json.dumps({"type": "ping"}))  # not idle until every event is queued
    return ws


async def _held_for(gw, port: int, seconds: float) -> bool:
    """Whether the gateway still holds the connection of client port `port` after waiting up
    to `seconds` for it to let go."""
    deadline = time.monotonic() + seconds
    while _holds_socket(gw.proc.pid, port) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return _holds_socket(gw.proc.pid, port)


async def _raw_ws(gw, workspace: str = "w1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket opened by hand: the server's frames are read as bytes, as sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /workspaces/{workspace}/realtime/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def _masked(opcode: int, payload: bytes) -> bytes:
    from websockets.frames import Frame, Opcode

    return Frame(Opcode(opcode), payload).serialize(mask=True, extensions=[])


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(n)


@pytest.mark.parametrize(("frame", "closed"), [
    (b"\x81\x02{}", (1002, "protocol_error")),  # not masked (RFC 6455 §5.1)
    (b"\x83\x80\0\0\0\0", (1002, "protocol_error")),  # a reserved opcode
    (b"\x89\xfe\x00\xc8\0\0\0\0" + b"x" * 200, (1002, "protocol_error")),  # a ping of 200 bytes (125 at most)
    (b"\x81\xff" + (1 << 30).to_bytes(8, "big") + b"\0\0\0\0", (1009, "message_too_big")),  # 1 GiB announced
])
async def test_a_frame_the_websocket_layer_refuses_is_audited_with_its_close(gateway, frame, closed):
    """Frames picows refuses itself (before the gateway sees them) close the connection with
    1002, or 1009 for a length over what it reads; the session-suspended record said
    (null, "network") for them, as for a dropped connection, instead of the code sent and its
    name (docs/audit.md). The close frame's reason is the name, as for the gateway's own
    closes (picows put its own words there: "Received frame with invalid opcode ..."), and a
    1009 comes after the 4000 that says why."""
    reader, writer = await _raw_ws(gateway)
    try:
        writer.write(_masked(0x1, json.dumps({"type": "auth", "token": gateway.token("w1")}).encode()))
        opcode, data = await _read_frame(reader)
        assert opcode == 0x1 and json.loads(data)["type"] == "auth_ok"
        writer.write(frame)
        opcode, data = await _read_frame(reader)
        if closed[0] == 1009:
            assert opcode == 0x1 and json.loads(data) == {"type": "error", "code": 4000, "name": "invalid_message",
                                                          "message": "message of 1073741824 bytes exceeds the 65536-byte limit"}
            opcode, data = await _read_frame(reader)
        assert (opcode, int.from_bytes(data[:2], "big"), data[2:].decode()) == (0x8, *closed)
        assert await reader.read() == b""  # one close frame, then the end
    finally:
        writer.close()
    (rec,) = await gateway.audit_records("session-suspended")
    assert (rec["code"], rec["reason"]) == closed


@pytest.mark.parametrize(("sent", "answer"), [
    (b"", 1000),  # no status code: "no status received" (1005) is not a code to send back
    ((1006).to_bytes(2, "big"), 1002),  # reserved: never in a close frame (RFC 6455 §7.4.1)
    ((5000).to_bytes(2, "big"), 1002),  # past the range of codes
    ((4321).to_bytes(2, "big") + b"bye", 4321),  # an application's code is echoed
])
async def test_a_client_close_is_answered_with_a_code_that_may_be_sent(gateway, sent, answer):
    """The server answers a client's close frame with one of its own. picows reads a close
    frame without a code as 0 and lets 1006 and codes from 5000 through; echoed, they made
    the server's close frame invalid (0 is no close code at all): a browser then fails the
    connection (1006, not clean) and `websockets` with 1002. The audit record of an empty
    close says 1005, as a browser's CloseEvent does."""
    reader, writer = await _raw_ws(gateway)
    try:
        writer.write(_masked(0x1, json.dumps({"type": "auth", "token": gateway.token("w1")}).encode()))
        opcode, data = await _read_frame(reader)
        assert opcode == 0x1 and json.loads(data)["type"] == "auth_ok"
        writer.write(_masked(0x8, sent))
        opcode, data = await _read_frame(reader)
        assert opcode == 0x8
        assert int.from_bytes(data[:2], "big") == answer, data
    finally:
        writer.close()
    (rec,) = await gateway.audit_records("session-suspended")
    expected = {1000: (1005, "client_close"), 1002: (1002, "protocol_error")}.get(answer, (answer, "client_close"))
    assert (rec["code"], rec["reason"]) == expected
    assert "Traceback" not in gateway.logs()


async def test_a_clients_broken_frame_is_logged_as_its_doing_with_its_workspace_and_address(gateway):
    """picows refuses a frame breaking RFC 6455 (unmasked, a bad close code, too large) before
    the gateway sees it, and logged it at ERROR with nothing saying whose it was: any client,
    before authenticating, set off the operator's error alerts at will. It is logged at INFO,
    as the gateway's own protocol errors are, with the workspace and the client's address."""
    reader, writer = await _raw_ws(gateway, "w7")
    host, port = writer.get_extra_info("sockname")[:2]
    local = f"{host}:{port}"
    writer.write(b"\x81\x05hello")  # unmasked
    assert (await _read_frame(reader))[0] == 0x8
    writer.close()
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        lines = [json.loads(line) for line in gateway.logs().splitlines()]
        found = [rec for rec in lines if "un-masked" in rec["msg"] + rec.get("detail", "")]
        if found or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    (rec,) = found
    assert (rec["level"], rec["msg"], rec.get("workspace"), rec.get("remote")) == (
        "info", "websocket protocol error", "w7", local), rec
    assert not [rec for rec in lines if rec["level"] == "error"], lines


async def test_a_protocol_error_the_gateway_finds_is_logged_with_the_clients_address(gateway):
    """The gateway's own protocol errors (a stray continuation frame) named the workspace but
    not the client, where picows's refusals name both."""
    reader, writer = await _raw_ws(gateway, "w8")
    host, port = writer.get_extra_info("sockname")[:2]
    writer.write(_masked(0x0, b"stray"))  # a continuation frame without a message to continue
    assert (await _read_frame(reader))[0] == 0x8
    writer.close()
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        found = [rec for rec in map(json.loads, gateway.logs().splitlines())
                 if rec["msg"] == "websocket protocol error" and rec.get("workspace") == "w8"]
        if found or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    (rec,) = found
    assert rec.get("remote") == f"{host}:{port}" and "continuation" in rec["detail"], rec


async def test_idle_http_connections_cannot_take_the_gateways_own_descriptors(gateway_factory):
    """limits.max_node_connections counts WebSocket connections only: sockets that never send
    a request (or never finish one) were held until limits.idle_timeout without any bound, so a
    flood of them took the descriptors kept for the gateway's own sockets and files (change
    feeds, positions, the audit spool) and then the open-files limit. The node holds at most
    max_node_connections + 512 client sockets of any kind; past it a connection gets 503 and
    is closed, and room is made again as they end."""
    gw = await gateway_factory(env={"RT_MAX_NODE_CONNECTIONS": "2", "RT_IDLE_TIMEOUT": "600"})
    loop = asyncio.get_running_loop()
    idle: list[socket.socket] = []

    async def connect() -> socket.socket:
        s = socket.socket()
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", gw.port))
        return s

    try:
        for _ in range(2 + 512 - 1):
            idle.append(await connect())
        # The last place, served and kept: the gateway has accepted every socket before it.
        last = await connect()
        idle.append(last)
        await loop.sock_sendall(last, b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert (await asyncio.wait_for(loop.sock_recv(last, 4096), 10)).startswith(b"HTTP/1.1 200 ")
        refused = await connect()
        try:
            answer = await asyncio.wait_for(loop.sock_recv(refused, 4096), 10)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"client sockets" in answer, answer
            assert await asyncio.wait_for(loop.sock_recv(refused, 4096), 10) == b""  # closed
        finally:
            refused.close()
        for s in idle[:10]:
            s.close()
        del idle[:10]
        for _ in range(100):  # once the gateway has seen the closes
            try:
                status, _ = await gw.get("/healthz")
            except (ConnectionError, OSError):
                status = 0
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200
        _, metrics = await gw.get("/metrics")
        open_now = re.search(rb"^rt_http_connections (\d+)", metrics, re.M)
        assert open_now is not None and int(open_now.group(1)) >= len(idle), metrics
    finally:
        for s in idle:
            s.close()
    refused_total = re.search(rb"^rt_connections_refused_total (\d+)", metrics, re.M)
    assert refused_total is not None and int(refused_total.group(1)) >= 1


async def test_closed_websockets_still_writing_count_against_the_client_sockets(gateway_factory):
    """A WebSocket closed while bytes were queued for its peer (here: a client that reads
    nothing sends a message over the size limit, 1009) left every count at once, yet its
    socket stays open until the peer has read them or limits.idle_timeout has passed: peers
    that stop reading and get closed could hold sockets beyond max_node_connections + 512.
    They count as client sockets until they end."""
    gw = await gateway_factory(env={"RT_MAX_NODE_CONNECTIONS": "2", "RT_IDLE_TIMEOUT": "600",
                                    "RT_SEND_BUFFER_BYTES": str(64 << 20)})
    loop = asyncio.get_running_loop()
    stalled = await _stalled_subscriber(gw)
    await stalled.send("x" * 70_000)  # over limits.max_message_bytes: closed behind the 8 MB
    idle: list[socket.socket] = []
    try:
        for _ in range(100):
            _, metrics = await gw.get("/metrics")
            if re.search(rb"^rt_closing_connections 1$", metrics, re.M):
                break
            await asyncio.sleep(0.05)
        assert re.search(rb"^rt_closing_connections 1$", metrics, re.M), "\n".join(
            line for line in metrics.decode().splitlines() if "closing" in line or "slow" in line or "rt_connections" in line)
        assert _holds_socket(gw.proc.pid, stalled.local_address[1])

        async def connect() -> socket.socket:
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", gw.port))
            idle.append(s)
            return s

        for _ in range(2 + 512 - 2):
            await connect()
        last = await connect()  # the last place beside the closed one's socket
        await loop.sock_sendall(last, b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert (await asyncio.wait_for(loop.sock_recv(last, 4096), 10)).startswith(b"HTTP/1.1 200 ")
        refused = await connect()
        answer = await asyncio.wait_for(loop.sock_recv(refused, 4096), 10)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"client sockets" in answer, answer
    finally:
        for s in idle:
            s.close()
        stalled.transport.abort()
    for _ in range(100):  # the closed one's socket ends with its peer, and leaves the count
        _, metrics = await gw.get("/metrics")
        if re.search(rb"^rt_closing_connections 0$", metrics, re.M):
            break
        await asyncio.sleep(0.05)
    assert re.search(rb"^rt_closing_connections 0$", metrics, re.M), metrics
