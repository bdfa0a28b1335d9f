"""Keycloak-style tokens through the real gateway: RS256 keys from a JWKS URL served by a local
HTTP server, key rotation, issuer/audience checks, roles as workspace grants."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable

import pytest

from rtserver.jwks import FAILURE_RETRY_INTERVAL
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


async def test_a_jwks_url_under_a_private_ca_is_trusted_through_ssl_cert_file(gateway_factory):
    """An identity provider whose certificate a private CA signed: the gateway's JWKS fetch uses
    the system's trust store, so the operator names the CA with OpenSSL's SSL_CERT_FILE (the
    README says so). Without it the key set is never loaded and every RS token gets 1011."""
    idp = JwksServer(tls=True).start()
    try:
        idp.add_key("k1")
        env = {"RT_AUTH_HS256_SECRET": "", "RT_AUTH_JWKS_URL": idp.url, "RT_AUTH_ISSUER": ISSUER}
        token = idp.sign(_claims(workspaces=["acme"]), "k1")
        gw = await gateway_factory(env={**env, "SSL_CERT_FILE": idp.cert_path})
        async with ws_connect(gw, "acme", token=token) as c:
            await c.subscribe("events:orders")
        untrusting = await gateway_factory(env=env)
        async with ws_connect(untrusting, "acme") as c:
            await c.send({"type": "auth", "token": token})
            assert (await c.recv_type("error"))["code"] == 1011
            assert (await c.expect_close())[0] == 1011
    finally:
        idp.stop()


def _forged(header: dict, claims: dict) -> str:
    """A token with the header given (shapes PyJWT will not encode), signature garbage."""
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(claims)}.c2lnbmF0dXJl"


async def _until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Until `condition()` holds: generous, for a loaded machine; AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def _logged(gw, text: str) -> None:
    """Until the gateway's log (written by a thread of its own) has `text`."""
    try:
        await _until(lambda: text in gw.logs(), f"{text!r} in the log")
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{gw.logs()}") from None


async def _refused_with(gw, token: str, code: int, *, header_auth: bool = False) -> dict:
    async with ws_connect(gw, "acme", token=token if header_auth else None, header_auth=header_auth) as c:
        if not header_auth:
            await c.send({"type": "auth", "token": token})
        error = await c.recv_type("error")
        assert error["code"] == code, error
        assert (await c.expect_close())[0] == code
        return error


async def test_a_kid_that_is_not_a_string_is_token_invalid(jwks, gateway_factory):
    """A header kid that is a JSON list or object reached the key-set lookup as a dict key:
    TypeError, the connection closed 1011 and a publish answered 500, with an error and its
    traceback logged, for a token anyone can forge. An integer kid cost a JWKS refetch."""
    jwks.add_key("k1")
    gw = await gateway_factory(env={"RT_AUTH_HS256_SECRET": "", "RT_AUTH_JWKS_URL": jwks.url})
    roles = {"workspaces": ["acme"], "realtime_publish": True}
    for kid in (["k1"], {"k": "k1"}, 7):
        token = _forged({"alg": "RS256", "kid": kid}, _claims(**roles))
        error = await _refused_with(gw, token, 4002)
        assert "kid" in error["message"]
        await _refused_with(gw, token, 4002, header_auth=True)
        status, body = await gw.post("/workspaces/acme/realtime/events/orders", b"{}",
                                     {"Authorization": f"Bearer {token}"})
        assert status == 401, body
    assert jwks.requests == 1  # the prefetch only: a malformed kid is no reason to refetch
    assert "message handler failed" not in gw.logs()
    async with ws_connect(gw, "acme", token=jwks.sign(_claims(**roles), "k1")) as c:
        await c.subscribe("events:orders")


async def test_a_jwks_answer_nested_too_deeply_is_a_failed_fetch(jwks, gateway_factory):
    """A key set answer of deeply nested JSON made json.loads raise RecursionError, which no one
    expected: the token that caused the refetch closed its connection 1011 and the keys held
    were not known to be kept. It is a failed fetch like any malformed answer: the token with
    the unknown kid gets no verdict (1011, try again: the fetch failed), the keys held keep
    serving."""
    jwks.add_key("k1")
    gw = await gateway_factory(env={"RT_AUTH_HS256_SECRET": "", "RT_AUTH_JWKS_URL": jwks.url})
    roles = {"workspaces": ["acme"]}
    jwks.add_key("k2")
    jwks.body = b"[" * 100_000
    async with ws_connect(gw, "acme") as c:
        await c.send({"type": "auth", "token": jwks.sign(_claims(**roles), "k2")})
        assert (await c.expect_close())[0] == 1011
    (rec,) = await gw.audit_records("auth-denied")
    assert rec["code"] == 1011 and "k2" in rec["reason"], rec
    assert jwks.requests == 2
    async with ws_connect(gw, "acme", token=jwks.sign(_claims(**roles), "k1")) as c:
        await c.subscribe("events:orders")
    await _logged(gw, "JWKS fetch failed")  # as what it is, and nothing worse
    assert "nested too deeply" in gw.logs() and "message handler failed" not in gw.logs()


async def test_a_token_sent_in_time_is_not_cut_off_by_the_auth_timeout(jwks, gateway_factory):
    """The auth deadline is the client's to send a token; it stayed armed while the gateway
    verified one, so a client that sent a valid token at once, whose kid made the gateway
    refetch a slow key set (a key rotation), was closed 4002 "auth timeout" at the deadline."""
    jwks.add_key("k1")
    gw = await gateway_factory(env={
        "RT_AUTH_HS256_SECRET": "", "RT_AUTH_JWKS_URL": jwks.url, "RT_AUTH_TIMEOUT": "0.5",
    })
    jwks.rotate("k2")
    jwks.delay = 1.5  # the refetch the new kid causes outlasts the auth deadline
    token = jwks.sign(_claims(workspaces=["acme"]), "k2")
    async with ws_connect(gw, "acme") as c:
        await c.send({"type": "auth", "token": token, "id": 1})
        answer = await c.recv()
        assert answer["type"] == "auth_ok" and answer["id"] == 1, answer
        await c.subscribe("events:orders")
    # With no token sent at all, the deadline still closes the connection.
    async with ws_connect(gw, "acme") as c:
        error = await c.recv_type("error")
        assert error["code"] == 4002 and "auth timeout" in error["message"]
        assert (await c.expect_close())[0] == 4002


async def test_a_secret_in_the_jwks_url_is_not_logged(jwks, gateway_factory):
    """A JWKS URL may carry a credential in its query (an API gateway's key in front of the
    provider). The JWKS log lines and fetch errors wrote the URL as configured, the secret
    with it; they now write it redacted, as the database URLs are."""
    jwks.add_key("k1")
    jwks.status = 503
    url = jwks.url + "?api_key=s3cr3t-jwks-credential"
    gw = await gateway_factory(env={"RT_AUTH_HS256_SECRET": "", "RT_AUTH_JWKS_URL": url})
    await _logged(gw, "JWKS prefetch failed")
    jwks.status = 200
    await asyncio.sleep(FAILURE_RETRY_INTERVAL + 0.1)  # the next token may fetch again
    async with ws_connect(gw, "acme", token=jwks.sign(_claims(workspaces=["acme"]), "k1")) as c:
        await c.subscribe("events:orders")
    await _logged(gw, "JWKS loaded")
    assert "s3cr3t-jwks-credential" not in gw.logs()
    assert "api_key=***" in gw.logs()


async def test_a_token_refused_after_its_client_left_is_still_audited(jwks, gateway_factory):
    """A token is refused whether or not its client waits for the answer: one whose unknown
    kid made the gateway refetch a slow key set was refused after the client had closed, and
    no auth-denied record was written (a client sending tokens and leaving at once left no
    trace of its failed attempts in the audit trail)."""
    jwks.add_key("k1")
    jwks.add_key("k-withdrawn")
    jwks.remove_key("k-withdrawn")  # its tokens are signed with a key the provider no longer has
    gw = await gateway_factory(env={"RT_AUTH_HS256_SECRET": "", "RT_AUTH_JWKS_URL": jwks.url})
    await _logged(gw, "JWKS loaded")
    jwks.delay = 1.0  # the refetch the unknown kid causes outlasts the client
    async with ws_connect(gw, "acme") as c:
        await c.send({"type": "auth", "token": jwks.sign(_claims(workspaces=["acme"]), "k-withdrawn")})
    (rec,) = await gw.audit_records("auth-denied", timeout=10)
    assert (rec["workspaceId"], rec["code"]) == ("acme", 4002), rec
    assert "k-withdrawn" in rec["reason"] and rec["remoteAddr"], rec


async def test_an_identity_provider_out_of_reach_is_try_again_not_token_invalid(jwks, gateway_factory):
    """Keycloak down when the gateway started: every RS token was closed with 4002
    token_invalid ("no signing keys available"), which both bundled clients take for the end,
    so every browser stopped until its user reloaded the page. The token was not refused, only
    not checkable: 1011 (clients reconnect with their backoff), 503 to a publisher, and the
    same token is taken once the key set can be fetched."""
    jwks.add_key("k1")
    jwks.status = 503
    gw = await gateway_factory(env={"RT_AUTH_HS256_SECRET": "", "RT_AUTH_JWKS_URL": jwks.url})
    await _logged(gw, "JWKS prefetch failed")
    token = jwks.sign(_claims(workspaces=["acme"], realtime_publish=True), "k1")
    async with ws_connect(gw, "acme") as c:
        await c.send({"type": "auth", "token": token})
        assert (await c.expect_close())[0] == 1011
    status, body = await gw.post("/workspaces/acme/realtime/events/orders", b'{"n":1}',
                                 {"Authorization": f"Bearer {token}"})
    assert status == 503 and b"could not be fetched" in body, body
    jwks.status = 200
    await asyncio.sleep(FAILURE_RETRY_INTERVAL + 0.1)  # the next token may fetch again
    async with ws_connect(gw, "acme", token=token) as c:
        await c.subscribe("events:orders")
    recs = await gw.audit_records("auth-denied")
    assert recs and {r["code"] for r in recs} == {1011}, recs


async def test_a_token_issued_by_a_clock_ahead_of_the_gateways_is_taken(jwks, gateway_factory):
    """The gateway's clock 30 s behind Keycloak's: every fresh token's `iat` is in the gateway's
    future. PyJWT refuses such a token by default, so each new connection was closed 4002
    token_invalid ("not yet valid"), which the clients take for the end, and the publish API
    answered 401, until the token was 25 s old. The contract checks `nbf`, not `iat` (§2):
    Keycloak sets no `nbf`, and a token it issued is valid from the moment it says it was."""
    jwks.add_key("k1")
    gw = await gateway_factory(
        env={"RT_AUTH_HS256_SECRET": "", "RT_AUTH_JWKS_URL": jwks.url, "RT_AUTH_ISSUER": ISSUER},
        clock_offset=-30,
    )
    token = jwks.sign(_claims(workspaces=["acme"], realtime_publish=True), "k1")  # iat: Keycloak's now
    async with ws_connect(gw, "acme", token=token) as c:
        await c.subscribe("events:orders")
        status, body = await gw.post("/workspaces/acme/realtime/events/orders", b'{"n":1}',
                                     {"Authorization": f"Bearer {token}"})
        assert status == 202, body
        assert (await c.recv_event())["payload"] == {"n": 1}
    # `nbf` is still checked: a token not valid before Keycloak's now is refused by a gateway
    # that is not there yet.
    early = jwks.sign(_claims(workspaces=["acme"], nbf=int(time.time())), "k1")
    error = await _refused_with(gw, early, 4002)
    assert "not yet valid" in error["message"]


async def test_a_token_that_cannot_be_checked_now_is_told_why_before_the_close(jwks, gateway_factory):
    """Keycloak out of reach: the connection is closed 1011 internal_error, which a gateway
    failure gives too. The reason (the key set could not be fetched: reconnect later) was
    dropped, against §6 (details come in an error just before the close), so the clients
    reported "connection closed: internal_error; retrying" and the application could not tell
    an identity provider outage from a gateway bug. The error now comes first, as for 4xxx."""
    jwks.add_key("k1")
    jwks.status = 503
    gw = await gateway_factory(env={"RT_AUTH_HS256_SECRET": "", "RT_AUTH_JWKS_URL": jwks.url})
    await _logged(gw, "JWKS prefetch failed")
    token = jwks.sign(_claims(workspaces=["acme"]), "k1")
    await asyncio.sleep(FAILURE_RETRY_INTERVAL + 0.1)  # this token's fetch is made, and fails
    for header_auth in (False, True):
        async with ws_connect(gw, "acme", token=token if header_auth else None, header_auth=header_auth) as c:
            if not header_auth:
                await c.send({"type": "auth", "token": token, "id": 7})
            error = await c.recv_type("error")
            assert (error["code"], error["name"]) == (1011, "internal_error"), error
            assert "key set could not be fetched" in error["message"], error
            assert error.get("id") == (None if header_auth else 7), error
            assert (await c.expect_close()) == (1011, "internal_error")


async def test_a_new_kid_joining_a_fetch_begun_before_it_is_no_verdict(jwks, gateway_factory):
    """A token whose kid the gateway did not hold joined the key-set fetch already in flight,
    and when that set did not hold the kid either the token was refused 4002 token_invalid,
    the clients' end. But a fetch begun before the token came may predate the kid: Keycloak
    rotated its key meanwhile, and the first clients with new tokens were refused for good.
    Only a key set fetched after the token came says its kid is not the provider's; until one
    may be fetched (auth.jwks_refetch_interval) the token gets 1011, try again."""
    jwks.add_key("k1")
    jwks.add_key("k-withdrawn")
    jwks.remove_key("k-withdrawn")
    # The withdrawn kid's fetch to the rotated token's verdict must fit in it: 3 s did not on a
    # loaded machine (the rotated token's own fetch came due, found k2, and it was taken).
    refetch = 10
    gw = await gateway_factory(env={
        "RT_AUTH_HS256_SECRET": "", "RT_AUTH_JWKS_URL": jwks.url, "RT_AUTH_JWKS_REFETCH_INTERVAL": str(refetch),
    })
    await _logged(gw, "JWKS loaded")
    jwks.late = 1.0  # the key set of the request's arrival, answered a second later
    async with ws_connect(gw, "acme") as withdrawn, ws_connect(gw, "acme") as rotated:
        # A token signed with a withdrawn key makes the gateway fetch the key set ...
        await withdrawn.send({"type": "auth", "token": jwks.sign(_claims(workspaces=["acme"]), "k-withdrawn")})
        # (until the request is there: its answer is the set of then. It waited 2 s and went
        # on regardless: a gateway slower than that fetched a set holding k2, and took the token.)
        await _until(lambda: jwks.requests == 2, "the key-set request for the withdrawn kid")
        # ... Keycloak rotates to a new key meanwhile, and a token signed with it comes.
        jwks.add_key("k2")
        token = jwks.sign(_claims(workspaces=["acme"]), "k2")
        await rotated.send({"type": "auth", "token": token})
        assert (await withdrawn.expect_close())[0] == 4002  # the set fetched for it: its kid is not there
        assert (await rotated.expect_close())[0] == 1011  # that set was not fetched for it
    jwks.late = 0.0
    await asyncio.sleep(refetch)
    async with ws_connect(gw, "acme", token=token) as c:
        await c.subscribe("events:orders")


async def test_a_slow_identity_provider_does_not_hold_the_gateways_start(jwks, gateway_factory):
    """The gateway fetched the key set before it listened, and waited for it: with Keycloak
    slow or its packets dropped, the port stayed closed up to the fetch timeout (10 s) at every
    start, /healthz and the services using HS256 tokens held with it. It waits a second at
    most now; an RS token that comes before the key set waits for that same fetch."""
    jwks.add_key("k1")
    jwks.delay = 6.0  # each key-set answer takes 6 s
    gw = await gateway_factory(env={"RT_AUTH_JWKS_URL": jwks.url})  # and the HS256 secret
    async with ws_connect(gw, "acme", token=gw.token("acme")) as c:
        await c.subscribe("events:orders")
    assert "JWKS loaded" not in gw.logs()  # served before the key set came
    async with ws_connect(gw, "acme") as c:
        await c.send({"type": "auth", "token": jwks.sign(_claims(workspaces=["acme"]), "k1")})
        assert (await c.recv(timeout=10))["type"] == "auth_ok"
    assert jwks.requests == 1  # the start's fetch, which the token waited for


async def test_readyz_is_not_ready_while_no_token_can_be_verified(jwks, gateway_factory):
    """With a JWKS URL alone, a key set not fetched (the provider down) or empty made every
    client 1011 and every publish 503 while /readyz said ready, so a load balancer kept sending
    clients there; an empty set was told as "could not be fetched" (auth audit). /readyz is 503
    with its `auth` saying why until a key is loaded, and its polls fetch the set again (at most
    once a refetch interval: it was fetched on demand only)."""
    jwks.status = 503
    gw = await gateway_factory(env={"RT_AUTH_HS256_SECRET": "", "RT_AUTH_JWKS_URL": jwks.url,
                                    "RT_AUTH_JWKS_REFETCH_INTERVAL": "0.5"})

    async def readiness(state: str) -> tuple[int, dict]:
        for _ in range(100):
            status, body = await gw.get("/readyz")
            if json.loads(body)["auth"].get("jwks") == state:
                return status, json.loads(body)
            await asyncio.sleep(0.1)
        raise AssertionError(f"/readyz never said the key set is {state}: {body!r}")

    status, body = await readiness("not loaded")
    assert status == 503 and body["auth"] == {"ready": False, "jwks": "not loaded", "keys": 0}, body
    jwks.status = 200  # serving a set with no key
    status, body = await readiness("empty")
    assert status == 503 and body["ready"] is False, body
    await _logged(gw, "JWKS holds no signing key")
    jwks.add_key("k1")
    token = jwks.sign(_claims(workspaces=["acme"], realtime_publish=True), "k1")
    jwks.remove_key("k1")  # signed with a key the set does not hold: the set, fetched, is empty
    status, answer = await gw.post("/workspaces/acme/realtime/events/orders", b'{"n":1}',
                                   {"Authorization": f"Bearer {token}"})
    assert status == 503 and b"the key set is empty" in answer and b"could not be fetched" not in answer, answer
    jwks.add_key("k1")
    status, body = await readiness("loaded")
    assert status == 200 and body["auth"] == {"ready": True, "jwks": "loaded", "keys": 1}, body
