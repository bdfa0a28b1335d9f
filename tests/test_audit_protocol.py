"""Findings of the wire-protocol audit (docs/protocol.md §1, §6), each against a real
`rtserver serve` subprocess with a raw WebSocket client (hand-made frames, or `websockets`)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.harness.jwks_server import JwksServer
from tests.harness.wsclient import ws_connect
from tests.test_protocol import _masked, _raw_ws, _read_frame


async def test_a_close_frame_whose_reason_is_not_utf8_is_closed_1007_with_its_name(gateway):
    """picows answers a close frame whose reason is not UTF-8 with 1007 on its own. The code
    had no name in the gateway: the close frame's reason was picows's words ("Received CLOSE
    with invalid UTF-8 reason") where every close carries the code's name (§6), and the
    session-suspended record said (1007, "network"), as for a dropped connection."""
    reader, writer = await _raw_ws(gateway)
    try:
        writer.write(_masked(0x1, json.dumps({"type": "auth", "token": gateway.token("w1")}).encode()))
        assert json.loads((await _read_frame(reader))[1])["type"] == "auth_ok"
        writer.write(_masked(0x8, (1000).to_bytes(2, "big") + b"bye \xff"))
        opcode, data = await _read_frame(reader)
        assert (opcode, int.from_bytes(data[:2], "big"), data[2:]) == (0x8, 1007, b"invalid_frame_payload_data")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # one close frame, then the end
    finally:
        writer.close()
    (rec,) = await gateway.audit_records("session-suspended")
    assert (rec["code"], rec["reason"]) == (1007, "invalid_frame_payload_data")


@pytest.fixture
def jwks():
    server = JwksServer().start()
    yield server
    server.stop()


@pytest.mark.parametrize("refused", [False, True])
async def test_a_refresh_being_verified_when_the_token_expires_decides_the_close(jwks, gateway_factory, refused):
    """A refresh sent before `exp` whose token takes a while to verify (a new `kid` after the
    identity provider rotated its key: the gateway fetches the key set again, here 3 s) was
    overtaken by the old token's expiry: the connection closed with 4001 'refresh it with an
    auth message before exp' under a valid token the client had sent in time. The refresh now
    decides: accepted, the connection goes on; refused, the error, then the 4001."""
    jwks.add_key("k1")
    gw = await gateway_factory(env={"RT_AUTH_HS256_SECRET": "", "RT_AUTH_JWKS_URL": jwks.url,
                                    "RT_AUTH_JWKS_REFETCH_INTERVAL": "1"})
    now = int(time.time())
    short = jwks.sign({"sub": "u", "workspaces": ["w1"], "iat": now, "exp": now + 4}, "k1")
    async with ws_connect(gw, "w1", token=short) as c:
        await c.subscribe("events:orders")
        await asyncio.sleep(max(0.0, now + 2.5 - time.time()))  # 1.5 s before exp
        jwks.add_key("k2")
        jwks.delay = 3.0  # the key set answers after exp
        fresh = jwks.sign({"sub": "other" if refused else "u", "workspaces": ["w1"], "iat": now, "exp": now + 600},
                          "k2")
        await c.send({"type": "auth", "token": fresh, "id": "r"})
        reply = await c.recv(timeout=10)
        if refused:
            assert (reply["type"], reply["code"], reply["id"]) == ("error", 4003, "r"), reply
            assert (await c.recv_type("error"))["code"] == 4001
            assert await c.expect_close() == (4001, "token_expired")
            return
        assert (reply["type"], reply["id"]) == ("auth_ok", "r"), reply
        assert time.time() > now + 4  # answered after the old token's exp
        jwks.delay = 0.0
        token = jwks.sign({"sub": "p", "workspaces": ["w1"], "realtime_publish": True, "iat": now,
                           "exp": now + 600}, "k2")
        status, body = await gw.post("/workspaces/w1/realtime/events/orders", b'{"n":1}',
                                     {"Authorization": f"Bearer {token}"})
        assert status == 202, body
        assert (await c.recv_event())["payload"] == {"n": 1}


async def test_a_refresh_whose_token_cannot_be_checked_now_is_an_error_and_the_connection_goes_on(jwks, gateway_factory):
    """A refresh whose key set cannot be fetched (a new kid, the identity provider down) is
    refused with an error 1011, and the connection carries on under its token: §1 listed only
    4001/4002/4003 for a refused refresh and §6 said 1011 closes, so a client reading the 1011
    took the connection for lost."""
    jwks.add_key("k1")
    gw = await gateway_factory(env={"RT_AUTH_HS256_SECRET": "", "RT_AUTH_JWKS_URL": jwks.url,
                                    "RT_AUTH_JWKS_REFETCH_INTERVAL": "1"})
    now = int(time.time())
    async with ws_connect(gw, "w1", token=jwks.sign({"sub": "u", "workspaces": ["w1"], "iat": now,
                                                     "exp": now + 600}, "k1")) as c:
        await asyncio.sleep(1.2)  # past the refetch interval: the new kid is fetched, and fails
        jwks.add_key("k2")
        jwks.status = 500
        await c.send({"type": "auth", "id": "r",
                      "token": jwks.sign({"sub": "u", "workspaces": ["w1"], "iat": now, "exp": now + 600}, "k2")})
        err = await c.recv_type("error", timeout=15)
        assert (err["code"], err["name"], err["id"]) == (1011, "internal_error", "r"), err
        await c.send({"type": "ping", "id": 2})
        assert (await c.recv_type("pong"))["id"] == 2
