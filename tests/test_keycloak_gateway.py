"""Keycloak-style tokens through the real gateway: RS256 keys from a JWKS URL served by a local
HTTP server, key rotation, issuer/audience checks, roles as workspace grants."""

from __future__ import annotations

import time

import pytest

from tests.harness.jwks_server import JwksServer
from tests.harness.wsclient import ws_connect

ISSUER = "http://keycloak.test/realms/acme"


@pytest.fixture
def jwks():
    server = JwksServer().start()
    yield server
    server.stop()


def _claims(**extra):
    now = int(time.time())
    return {"sub": "kc-user", "iss": ISSUER, "aud": "realtime", "iat": now, "exp": now + 600, **extra}


async def test_rs256_via_jwks_with_rotation_and_roles(jwks, gateway_factory):
    jwks.add_key("k1")
    gw = await gateway_factory(env={
        "RT_AUTH_HS256_SECRET": "",
        "RT_AUTH_JWKS_URL": jwks.url,
        "RT_AUTH_ISSUER": ISSUER,
        "RT_AUTH_AUDIENCE": "realtime",
        "RT_AUTH_WORKSPACE_CLAIM": "resource_access.realtime.roles",
        "RT_AUTH_WORKSPACE_ROLE_PREFIX": "workspace:",
        "RT_AUTH_PUBLISH_ROLE": "publisher",
    })
    roles = {"resource_access": {"realtime": {"roles": ["workspace:acme", "publisher"]}}}
    token = jwks.sign(_claims(**roles), "k1")
    async with ws_connect(gw, "acme", token=token) as c:
        await c.subscribe("events:orders")
        # the publish role grants the publish API
        status, body = await gw.post("/workspaces/acme/realtime/events/orders", b'{"n":1}',
                                     {"Authorization": f"Bearer {token}"})
        assert status == 202, body
        assert (await c.recv_event())["payload"] == {"n": 1}
    # the provider rotates its key: a token with the new kid triggers a refetch
    jwks.rotate("k2")
    async with ws_connect(gw, "acme", token=jwks.sign(_claims(**roles), "k2")) as c:
        await c.subscribe("events:orders")
    # wrong audience, wrong issuer, workspace not among the roles, an HS256 token: refused
    refused = [
        (jwks.sign(_claims(aud="other", **roles), "k2"), 4002),
        (jwks.sign(_claims(iss="http://evil/realms/acme", **roles), "k2"), 4002),
        (jwks.sign(_claims(resource_access={"realtime": {"roles": ["workspace:other"]}}), "k2"), 4003),
        (gw.token("acme", secret="x" * 40), 4002),
    ]
    for bad, code in refused:
        async with ws_connect(gw, "acme") as c:
            await c.send({"type": "auth", "token": bad})
            assert (await c.recv_type("error"))["code"] == code
            assert (await c.expect_close())[0] == code
