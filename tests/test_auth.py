"""Authentication: HS256 dev tokens and RS/PS/ES tokens verified against a real local JWKS server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import stat
import threading
import time
from typing import Any

import jwt
import pytest
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from rtserver import auth as auth_module
from rtserver import config
from rtserver.app import Gateway
from rtserver.auth import (
    Authenticator,
    AuthError,
    Identity,
    claim_at,
    load_or_create_dev_secret,
    mint_token,
)
from rtserver.jwks import FAILURE_RETRY_INTERVAL, JwksCache, JwksError, KeyNotFound, parse_jwks
from tests.harness.jwks_server import JwksServer, private_key, public_pem
from tests.harness.wsclient import ws_connect

SECRET = "s3cret-for-tests-0123456789abcdef0123456789abcdef"
WS = "acme"


def make_cfg(tmp_path: Any, **env: Any) -> config.Config:
    environ = {"RT_STATE_DIR": str(tmp_path / "state")}
    environ.update({k: str(v) for k, v in env.items()})
    return config.load(environ=environ)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "user-1", "workspaces": [WS], "iat": now, "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand, for shapes PyJWT refuses to produce (alg none, PEM as HMAC secret)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


async def refused(auth: Authenticator, token: str, workspace: str = WS) -> AuthError:
    with pytest.raises(AuthError) as info:
        await auth.authenticate(token, workspace)
    exc = info.value
    assert token not in str(exc)
    return exc


@pytest.fixture
def hs_auth(tmp_path: Any) -> Authenticator:
    return Authenticator(make_cfg(tmp_path, RT_AUTH_HS256_SECRET=SECRET))


@pytest.fixture
def jwks_server() -> Any:
    server = JwksServer().start()
    server.add_key("rsa-1", "RSA")
    yield server
    server.stop()


@pytest.fixture
async def rs_auth(tmp_path: Any, jwks_server: JwksServer) -> Any:
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_JWKS_URL=jwks_server.url))
    await auth.start()
    yield auth
    await auth.close()


# -- HS256 -------------------------------------------------------------------------------------


async def test_hs256_ok(hs_auth: Authenticator) -> None:
    c = claims(realtime_publish=True)
    identity = await hs_auth.authenticate(jwt.encode(c, SECRET, algorithm="HS256"), WS)
    assert isinstance(identity, Identity)
    assert identity.subject == "user-1"
    assert identity.expires_at == float(c["exp"])
    assert identity.can_publish is True
    assert identity.channel_patterns is None
    assert identity.claims["workspaces"] == [WS]
    assert hs_auth.may_publish(identity)
    assert hs_auth.may_subscribe(identity, "postgres:products")


async def test_hs256_expired(hs_auth: Authenticator) -> None:
    exp = int(time.time()) - 60
    exc = await refused(hs_auth, jwt.encode(claims(exp=exp), SECRET, algorithm="HS256"))
    assert (exc.code, exc.name, exc.subject) == (4001, "token_expired", "user-1")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))
    assert str(exc) == f"token expired at {stamp}"


async def test_hs256_expired_within_leeway_is_accepted_and_keeps_its_exp(hs_auth: Authenticator) -> None:
    exp = int(time.time()) - 2  # default leeway is 5 s
    identity = await hs_auth.authenticate(jwt.encode(claims(exp=exp), SECRET, algorithm="HS256"), WS)
    assert identity.expires_at == exp  # the session itself still ends at exp


async def test_leeway_is_configurable(tmp_path: Any) -> None:
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_HS256_SECRET=SECRET, RT_AUTH_LEEWAY=0))
    exc = await refused(auth, jwt.encode(claims(exp=int(time.time()) - 2), SECRET, algorithm="HS256"))
    assert exc.code == 4001


async def test_hs256_not_yet_valid(hs_auth: Authenticator) -> None:
    exc = await refused(hs_auth, jwt.encode(claims(nbf=int(time.time()) + 120), SECRET, algorithm="HS256"))
    assert (exc.code, exc.name) == (4002, "token_invalid")
    assert "not yet valid" in str(exc)


async def test_hs256_bad_signature(hs_auth: Authenticator) -> None:
    token = jwt.encode(claims(), "another-secret-of-sufficient-length-000000", algorithm="HS256")
    exc = await refused(hs_auth, token)
    assert exc.code == 4002
    assert exc.subject is None  # an unverified sub is not trusted, not even for audit
    assert "signature" in str(exc)


async def test_hs256_key_checked_once_and_every_token_still_verified(tmp_path: Any) -> None:
    """PyJWT's check of the HS256 key runs once per key (auth._HS256); every token's signature
    is still checked with it, and a key PyJWT refuses is refused every time."""
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_HS256_SECRET=SECRET))
    for _ in range(3):
        assert (await auth.authenticate(jwt.encode(claims(jti=os.urandom(4).hex()), SECRET, algorithm="HS256"),
                                        WS)).subject == "user-1"
        other = jwt.encode(claims(jti=os.urandom(4).hex()), "another-secret-of-sufficient-length-000000",
                           algorithm="HS256")
        assert "signature" in str(await refused(auth, other))
    alg = auth_module._pyjwt._jws.get_algorithm_by_name("HS256")
    assert isinstance(alg, auth_module._HS256) and alg._prepared == (SECRET.encode(), SECRET.encode())
    assert jwt.api_jws._jws_global_obj.get_algorithm_by_name("HS256") is not alg  # jwt.decode as it was

    pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"
    pem_auth = Authenticator(make_cfg(tmp_path, RT_AUTH_HS256_SECRET=pem))
    for _ in range(2):
        token = raw_token({"alg": "HS256", "typ": "JWT"}, claims(jti=os.urandom(4).hex()), pem.encode())
        exc = await refused(pem_auth, token)
        assert exc.code == 4002 and str(exc).startswith("token key refused: "), str(exc)


async def test_hs256_tampered_payload(hs_auth: Authenticator) -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    header, _payload, signature = token.split(".")
    forged = claims(workspaces=["*"])
    exc = await refused(hs_auth, f"{header}.{b64(json.dumps(forged).encode())}.{signature}")
    assert exc.code == 4002


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "x" * 20000, "eyJhbGciOiJIUzI1NiJ9.e30"])
async def test_malformed_tokens(hs_auth: Authenticator, token: str) -> None:
    with pytest.raises(AuthError) as info:
        await hs_auth.authenticate(token, WS)
    assert info.value.code == 4002


@pytest.mark.parametrize("token", [
    "abc", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30",
    "eyJhbGciOiJIUzI1NiJ9.e30.@@@",  # a readable header, the rest not
    "eyJhbGciOiJIUzI1NiJ9.e!30.abc",
    "eyJhbGciOiJIUzI1NiJ9===.e30.abc",
])
async def test_malformed_tokens_are_named_so(hs_auth: Authenticator, token: str) -> None:
    # The header is read for the key without PyJWT (Authenticator._verify_now); PyJWT still
    # judges the whole token, and a token it cannot read is "malformed" either way.
    exc = await refused(hs_auth, token)
    assert exc.code == 4002 and str(exc).startswith("malformed token: "), str(exc)


async def test_a_token_is_verified_once_and_refused_once_it_expires(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_HS256_SECRET=SECRET, RT_AUTH_LEEWAY=0))
    decoded: list[str] = []
    decode = auth_module._pyjwt.decode

    def counting_decode(token: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(auth_module._pyjwt, "decode", counting_decode)
    exp = int(time.time()) + 2
    token = jwt.encode(claims(exp=exp), SECRET, algorithm="HS256")
    for _ in range(3):  # a reconnect, a refresh with the same token, another connection
        assert (await auth.authenticate(token, WS)).subject == "user-1"
    assert len(decoded) == 1
    # The remembered verification does not outlive the token.
    while time.time() < exp:
        await asyncio.sleep(0.05)
    exc = await refused(auth, token)
    assert exc.code == 4001
    # Nor does it widen what the token grants.
    other = jwt.encode(claims(), SECRET, algorithm="HS256")
    await auth.authenticate(other, WS)
    assert (await refused(auth, other, "another-workspace")).code == 4003


async def test_remembered_verifications_are_bounded(hs_auth: Authenticator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rtserver.auth._VERIFIED_MAX", 10)
    for i in range(25):
        await hs_auth.authenticate(jwt.encode(claims(sub=f"user-{i}"), SECRET, algorithm="HS256"), WS)
    assert len(hs_auth._verified) == 10
    # By their tokens' size too: a few long tokens take the place of many short ones.
    long_tokens = [jwt.encode(claims(sub=f"big-{i}", pad="x" * 5000), SECRET, algorithm="HS256") for i in range(3)]
    monkeypatch.setattr("rtserver.auth._VERIFIED_BYTES", len(long_tokens[0]) * 5 // 2)  # two of them
    for token in long_tokens:
        await hs_auth.authenticate(token, WS)
    assert [token for token, _ in hs_auth._verified] == long_tokens[1:]
    assert hs_auth._verified_bytes == sum(map(len, long_tokens[1:]))
    assert hs_auth.known(long_tokens[0], WS) is None and hs_auth.known(long_tokens[2], WS) is not None


async def test_missing_exp_and_sub(hs_auth: Authenticator) -> None:
    exc = await refused(hs_auth, jwt.encode(claims(exp=None), SECRET, algorithm="HS256"))
    assert (exc.code, str(exc)) == (4002, "token has no exp")
    exc = await refused(hs_auth, jwt.encode(claims(sub=None), SECRET, algorithm="HS256"))
    assert (exc.code, str(exc)) == (4002, "token has no sub")
    exc = await refused(hs_auth, jwt.encode(claims(sub=""), SECRET, algorithm="HS256"))
    assert exc.code == 4002


async def test_exp_must_be_a_number(hs_auth: Authenticator) -> None:
    token = jwt.encode(claims(exp=str(int(time.time()) + 300)), SECRET, algorithm="HS256")
    exc = await refused(hs_auth, token)
    assert exc.code == 4002


async def test_an_exp_too_large_for_a_float_is_token_invalid(gateway_factory: Any) -> None:
    """An integer exp past a float's range (10**400) passed PyJWT's int() check, then
    math.isfinite raised OverflowError: the connection closed 1011 and an error was logged,
    instead of the token being refused as one whose exp is not a usable number."""
    gw = await gateway_factory()
    token = gw.token("w1", exp=10**400)
    async with ws_connect(gw, "w1") as c:
        await c.send({"type": "auth", "token": token})
        error = await c.recv_type("error")
        assert error["code"] == 4002 and "exp" in error["message"], error
        assert (await c.expect_close())[0] == 4002
    assert "message handler failed" not in gw.logs()


async def test_an_exp_whose_milliseconds_overflow_is_token_invalid(gateway_factory: Any) -> None:
    """An exp of 1e306 is a finite float, but auth_ok's expiresAt is in milliseconds: 1e309
    overflowed to infinity, int() raised in the handler, and the connection that had just been
    granted closed with 1011 (an error logged) instead of the token being refused."""
    gw = await gateway_factory()
    async with ws_connect(gw, "w1") as c:
        await c.send({"type": "auth", "token": gw.token("w1", exp=1e306)})
        error = await c.recv_type("error")
        assert error["code"] == 4002 and "exp" in error["message"], error
        assert (await c.expect_close())[0] == 4002
    assert "message handler failed" not in gw.logs()


async def test_an_exp_past_the_year_9999_says_the_last_date_in_expires_at(gateway_factory: Any) -> None:
    """An exp of 1e20 s (a "never" some token issuers write, or `rtserver token --ttl 1e20`) was
    written as an expanded year, "+3168873852708-01-25T01:51:05.216Z", which no date parser
    reads. The token is taken; auth_ok's expiresAt says the last RFC 3339 date."""
    gw = await gateway_factory()
    async with ws_connect(gw, "w1") as c:
        await c.send({"type": "auth", "token": gw.token("w1", exp=10**20)})
        ok = await c.recv_type("auth_ok")
        assert ok["expiresAt"] == "9999-12-31T23:59:59.999Z", ok


# -- alg none and algorithm confusion ----------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
async def test_alg_none_refused(hs_auth: Authenticator, alg: str) -> None:
    token = raw_token({"alg": alg, "typ": "JWT"}, claims(), None)
    exc = await refused(hs_auth, token)
    assert exc.code == 4002


@pytest.mark.parametrize("alg", [["HS256"], None, 7, {"a": 1}])
async def test_non_string_alg_refused(hs_auth: Authenticator, alg: Any) -> None:
    exc = await refused(hs_auth, raw_token({"alg": alg}, claims(), SECRET.encode()))
    assert exc.code == 4002


async def test_an_attacker_chosen_kid_or_alg_is_not_echoed_at_length(rs_auth: Authenticator,
                                                                      jwks_server: JwksServer) -> None:
    """The header's kid and alg reach error messages (and audit records' reason): a 5,000-character
    kid is refused as such, without a JWKS refetch, and an unknown alg is shown cut short."""
    fetches = jwks_server.requests
    exc = await refused(rs_auth, raw_token({"alg": "RS256", "kid": "k" * 5000}, claims(), None))
    assert exc.code == 4002 and len(str(exc)) < 200 and "kid longer than" in str(exc)
    assert jwks_server.requests == fetches
    exc = await refused(rs_auth, raw_token({"alg": "X" * 5000, "kid": "rsa-1"}, claims(), None))
    assert exc.code == 4002 and len(str(exc)) < 200
    # a kid of ordinary length is looked up as before
    exc = await refused(rs_auth, raw_token({"alg": "RS256", "kid": "k" * 100}, claims(), None))
    assert "unknown key id" in str(exc)


async def test_a_private_key_published_in_the_jwks_verifies_nothing(
    rs_auth: Authenticator, jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A key set that publishes a private key (its "d"): anyone may sign with it, so the key is
    not used and the operator is told; tokens of that kid get 4002 (before: PyJWT's verify of a
    private key raised AttributeError, closing each such connection 1011), the other keys work."""
    import json as _json

    from jwt.algorithms import RSAAlgorithm

    leaked = private_key("leaked")
    jwk = _json.loads(RSAAlgorithm.to_jwk(leaked))
    good = _json.loads(RSAAlgorithm.to_jwk(private_key("rsa-1").public_key()))
    jwk["kid"], good["kid"] = "leaked", "rsa-1"
    jwks_server.body = _json.dumps({"keys": [jwk, good]}).encode()
    await rs_auth.jwks.refresh()
    assert "publishes a private key" in caplog.text and '"d"' not in caplog.text
    forged = jwt.encode(claims(), leaked, algorithm="RS256", headers={"kid": "leaked"})
    exc = await refused(rs_auth, forged)
    assert exc.code == 4002 and "unknown key id" in str(exc)
    ok = jwt.encode(claims(), private_key("rsa-1"), algorithm="RS256", headers={"kid": "rsa-1"})
    assert (await rs_auth.authenticate(ok, WS)).subject


async def test_alg_none_refused_with_jwks(rs_auth: Authenticator) -> None:
    exc = await refused(rs_auth, raw_token({"alg": "none", "kid": "rsa-1"}, claims(), None))
    assert exc.code == 4002


async def test_hs256_signed_with_rsa_public_key_refused_when_only_jwks(
    rs_auth: Authenticator, jwks_server: JwksServer
) -> None:
    pem = public_pem(private_key("rsa-1"))
    token = raw_token({"alg": "HS256", "kid": "rsa-1"}, claims(), pem)
    exc = await refused(rs_auth, token)
    assert exc.code == 4002
    assert "HS256" in str(exc)


async def test_hs256_signed_with_rsa_public_key_refused_when_both_configured(
    tmp_path: Any, jwks_server: JwksServer
) -> None:
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_JWKS_URL=jwks_server.url, RT_AUTH_HS256_SECRET=SECRET))
    await auth.start()
    try:
        # Both verification paths are live: the RS token passes, the forged HS one does not.
        ok = await auth.authenticate(jwks_server.sign(claims(), "rsa-1"), WS)
        assert ok.subject == "user-1"
        pem = public_pem(private_key("rsa-1"))
        exc = await refused(auth, raw_token({"alg": "HS256", "kid": "rsa-1"}, claims(), pem))
        assert exc.code == 4002
        # and the same JWK text as secret (another form of the public key)
        jwk_text = json.dumps(jwks_server.document()["keys"][0]).encode()
        exc = await refused(auth, raw_token({"alg": "HS256", "kid": "rsa-1"}, claims(), jwk_text))
        assert exc.code == 4002
    finally:
        await auth.close()


async def test_rs256_refused_when_only_hs_configured(hs_auth: Authenticator) -> None:
    token = jwt.encode(claims(), private_key("rsa-1"), algorithm="RS256", headers={"kid": "rsa-1"})
    exc = await refused(hs_auth, token)
    assert exc.code == 4002
    assert "RS256" in str(exc)


async def test_rs_token_against_ec_key_refused(rs_auth: Authenticator, jwks_server: JwksServer) -> None:
    jwks_server.add_key("ec-1", "EC")
    await rs_auth.jwks.refresh()
    # header claims RS256 but names the EC key: the key type does not fit the algorithm
    token = jwt.encode(claims(), private_key("rsa-1"), algorithm="RS256", headers={"kid": "ec-1"})
    exc = await refused(rs_auth, token)
    assert exc.code == 4002


async def test_key_published_for_another_alg_refused(rs_auth: Authenticator, jwks_server: JwksServer) -> None:
    jwks_server.add_key("rsa-ps", "RSA", alg="PS256")
    await rs_auth.jwks.refresh()
    exc = await refused(rs_auth, jwks_server.sign(claims(), "rsa-ps", "RS256"))
    assert exc.code == 4002
    identity = await rs_auth.authenticate(jwks_server.sign(claims(), "rsa-ps", "PS256"), WS)
    assert identity.subject == "user-1"


async def test_unsupported_algorithm_refused(hs_auth: Authenticator) -> None:
    exc = await refused(hs_auth, jwt.encode(claims(), SECRET * 2, algorithm="HS512"))
    assert exc.code == 4002


# -- JWKS --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "kind", "published_alg"),
    [
        ("RS256", "RSA", None),
        ("RS384", "RSA", None),
        ("RS512", "RSA", "RS512"),
        ("PS256", "RSA", None),
        ("ES256", "EC", None),
        ("ES256", "EC", "ES256"),
        ("EdDSA", "OKP", None),  # Keycloak's EdDSA key provider (Ed25519)
        ("EdDSA", "OKP", "EdDSA"),
    ],
)
async def test_jwks_algorithms(
    tmp_path: Any, jwks_server: JwksServer, alg: str, kind: str, published_alg: str | None
) -> None:
    kid = f"{kind}-{alg}-{published_alg}"
    jwks_server.add_key(kid, kind, alg=published_alg, name=f"{kind}-shared")
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_JWKS_URL=jwks_server.url))
    await auth.start()
    try:
        identity = await auth.authenticate(jwks_server.sign(claims(), kid, alg), WS)
        assert identity.subject == "user-1"
        assert jwks_server.requests == 1
    finally:
        await auth.close()


async def test_jwks_bad_signature(rs_auth: Authenticator, jwks_server: JwksServer) -> None:
    # signed by a key that is not the one published under this kid
    token = jwt.encode(claims(), private_key("intruder"), algorithm="RS256", headers={"kid": "rsa-1"})
    exc = await refused(rs_auth, token)
    assert exc.code == 4002


async def test_jwks_over_https(tmp_path: Any) -> None:
    server = JwksServer(tls=True).start()
    try:
        server.add_key("tls-key", "EC")
        assert server.url.startswith("https://")
        auth = Authenticator(
            make_cfg(tmp_path, RT_AUTH_JWKS_URL=server.url), jwks_ssl_context=server.client_ssl_context
        )
        await auth.start()
        identity = await auth.authenticate(server.sign(claims(), "tls-key", "ES256"), WS)
        assert identity.subject == "user-1"
        assert server.requests == 1

        # Without trusting the self-signed certificate the fetch fails (verification is on).
        untrusting = Authenticator(make_cfg(tmp_path, RT_AUTH_JWKS_URL=server.url))
        await untrusting.start()
        exc = await refused(untrusting, server.sign(claims(), "tls-key", "ES256"))
        assert exc.code == 1011  # no key set: no verdict on the token
        assert not untrusting.jwks.loaded
    finally:
        server.stop()


async def test_an_https_jwks_url_redirected_to_http_is_not_followed(tmp_path: Any) -> None:
    """urllib follows any redirect between http, https and ftp: an https JWKS URL answering 302
    to a plain http address had its keys taken from there, where anyone on the network path
    can put theirs, and tokens signed with those were accepted."""
    idp = JwksServer(tls=True).start()
    plain = JwksServer().start()  # the attacker's key set, over plain http
    try:
        idp.add_key("rsa-1", "RSA")
        plain.add_key("evil", "RSA")
        idp.redirect = plain.url
        auth = Authenticator(make_cfg(tmp_path, RT_AUTH_JWKS_URL=idp.url), jwks_ssl_context=idp.client_ssl_context)
        await auth.start()
        try:
            exc = await refused(auth, plain.sign(claims(), "evil"))
            assert exc.code == 1011  # no key set: no verdict on the token, and none of plain's keys
            assert not auth.jwks.loaded and plain.requests == 0
            with pytest.raises(JwksError, match="redirect"):
                await auth.jwks.refresh()
            # A redirect that keeps TLS is followed.
            idp.redirect = idp.url + "?moved"
            await auth.jwks.refresh()
            assert (await auth.authenticate(idp.sign(claims(), "rsa-1"), WS)).subject == "user-1"
        finally:
            await auth.close()
    finally:
        idp.stop()
        plain.stop()


async def test_key_rotation_triggers_refetch(rs_auth: Authenticator, jwks_server: JwksServer) -> None:
    assert jwks_server.requests == 1  # the prefetch
    await rs_auth.authenticate(jwks_server.sign(claims(), "rsa-1"), WS)
    await rs_auth.authenticate(jwks_server.sign(claims(), "rsa-1"), WS)
    assert jwks_server.requests == 1  # cached

    jwks_server.rotate("rsa-2", "RSA")
    identity = await rs_auth.authenticate(jwks_server.sign(claims(sub="user-2"), "rsa-2"), WS)
    assert identity.subject == "user-2"
    assert jwks_server.requests == 2

    # The old key left the set with the refetch: its tokens no longer verify. Within the
    # refetch interval the gateway cannot tell a withdrawn key from one published since the
    # fetch: 1011 (clients reconnect, with a fresh token); 4002 once a fetch has looked
    # (test_unknown_kid_refetch_is_rate_limited).
    exc = await refused(rs_auth, jwks_server.sign(claims(), "rsa-1"))
    assert exc.code == 1011 and "unknown key id 'rsa-1'" in str(exc)


async def test_unknown_kid_refetch_is_rate_limited(rs_auth: Authenticator, jwks_server: JwksServer) -> None:
    token = jwks_server.sign(claims(), "rsa-1", headers={"kid": "nope-1"})
    exc = await refused(rs_auth, token)
    assert exc.code == 4002 and "unknown key id" in str(exc)
    assert jwks_server.requests == 2  # prefetch + one refetch for the unknown kid
    exc = await refused(rs_auth, jwks_server.sign(claims(), "rsa-1", headers={"kid": "nope-2"}))
    # Within the 30 s interval: no second refetch, and no verdict on the token either (its key
    # may have been published since): 1011, which clients retry, not 4002, where they stop.
    assert exc.code == 1011 and "try again" in str(exc)
    assert jwks_server.requests == 2


async def test_refetch_allowed_again_after_the_interval(tmp_path: Any, jwks_server: JwksServer) -> None:
    auth = Authenticator(
        make_cfg(tmp_path, RT_AUTH_JWKS_URL=jwks_server.url, RT_AUTH_JWKS_REFETCH_INTERVAL=0.3)
    )
    await auth.start()
    try:
        token = jwks_server.sign(claims(), "rsa-1", headers={"kid": "late"})
        assert (await refused(auth, token)).code == 4002
        assert jwks_server.requests == 2
        jwks_server.add_key("late", "RSA", name="rsa-1")
        assert (await refused(auth, token)).code == 1011  # published, but within the interval: try again
        assert jwks_server.requests == 2
        await asyncio.sleep(0.35)
        identity = await auth.authenticate(token, WS)
        assert identity.subject == "user-1"
        assert jwks_server.requests == 3
    finally:
        await auth.close()


async def test_concurrent_refetches_are_coalesced(rs_auth: Authenticator, jwks_server: JwksServer) -> None:
    jwks_server.add_key("rsa-new", "RSA", name="rsa-1")
    jwks_server.delay = 0.3
    token = jwks_server.sign(claims(), "rsa-new")
    results = await asyncio.gather(*(rs_auth.authenticate(token, WS) for _ in range(8)))
    assert [r.subject for r in results] == ["user-1"] * 8
    assert jwks_server.requests == 2


async def test_fetch_does_not_block_the_loop(rs_auth: Authenticator, jwks_server: JwksServer) -> None:
    jwks_server.add_key("rsa-slow", "RSA", name="rsa-1")
    jwks_server.delay = 0.5
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await rs_auth.authenticate(jwks_server.sign(claims(), "rsa-slow"), WS)
    finally:
        task.cancel()
    assert ticks >= 5  # the loop kept running while the fetch waited


async def test_a_trickling_jwks_answer_is_cut_off_at_the_fetch_timeout(jwks_server: JwksServer) -> None:
    """The fetch timeout bounds the whole fetch: urllib's bounds each socket read, so a key set
    trickling in a byte at a time held the fetch, and every token waiting on it, for as long as
    the server went on (here about 20 s)."""
    jwks_server.trickle = 0.05
    cache = JwksCache(jwks_server.url, timeout=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(JwksError, match="no complete answer within 1 s"):
            await cache.refresh()
        assert time.monotonic() - started < 3
        jwks_server.trickle = 0.0
        await cache.refresh()
        assert cache.loaded
    finally:
        await cache.close()


async def test_prefetch_failure_is_not_fatal(tmp_path: Any, jwks_server: JwksServer) -> None:
    jwks_server.status = 503
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_JWKS_URL=jwks_server.url))
    await auth.start()  # logs, does not raise
    try:
        assert not auth.jwks.loaded
        jwks_server.status = 200
        await asyncio.sleep(FAILURE_RETRY_INTERVAL + 0.05)
        identity = await auth.authenticate(jwks_server.sign(claims(), "rsa-1"), WS)
        assert identity.subject == "user-1"
        assert jwks_server.requests == 2
    finally:
        await auth.close()


async def test_token_without_kid_uses_the_only_key(rs_auth: Authenticator, jwks_server: JwksServer) -> None:
    token = jwt.encode(claims(), private_key("rsa-1"), algorithm="RS256")
    assert (await rs_auth.authenticate(token, WS)).subject == "user-1"
    jwks_server.add_key("rsa-3", "RSA")
    await rs_auth.jwks.refresh()
    exc = await refused(rs_auth, token)
    assert exc.code == 4002


# -- iss / aud / azp ---------------------------------------------------------------------------


async def test_issuer_checked_when_configured(tmp_path: Any) -> None:
    iss = "https://kc.example/realms/acme"
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_HS256_SECRET=SECRET, RT_AUTH_ISSUER=iss))
    assert (await auth.authenticate(jwt.encode(claims(iss=iss), SECRET, algorithm="HS256"), WS)).subject
    exc = await refused(auth, jwt.encode(claims(iss="https://evil.example"), SECRET, algorithm="HS256"))
    assert exc.code == 4002 and iss in str(exc)
    exc = await refused(auth, jwt.encode(claims(), SECRET, algorithm="HS256"))
    assert exc.code == 4002


async def test_issuer_configured_with_a_trailing_slash_takes_keycloaks_tokens(tmp_path: Any) -> None:
    """Keycloak's iss has no trailing slash: an issuer configured with one refused every token
    of the realm, and the refusal did not say which iss the token had."""
    iss = "https://kc.example/realms/acme"
    for configured, token_iss in ((iss + "/", iss), (iss, iss + "/")):
        auth = Authenticator(make_cfg(tmp_path, RT_AUTH_HS256_SECRET=SECRET, RT_AUTH_ISSUER=configured))
        assert (await auth.authenticate(jwt.encode(claims(iss=token_iss), SECRET, algorithm="HS256"), WS)).subject
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_HS256_SECRET=SECRET, RT_AUTH_ISSUER=iss + "/"))
    exc = await refused(auth, jwt.encode(claims(iss="http://kc.example/realms/acme"), SECRET, algorithm="HS256"))
    assert exc.code == 4002
    assert "'http://kc.example/realms/acme'" in str(exc) and iss in str(exc)
    exc = await refused(auth, jwt.encode(claims(), SECRET, algorithm="HS256"))
    assert exc.code == 4002 and "absent" in str(exc)


async def test_issuer_ignored_when_not_configured(hs_auth: Authenticator) -> None:
    token = jwt.encode(claims(iss="https://anything.example"), SECRET, algorithm="HS256")
    assert (await hs_auth.authenticate(token, WS)).subject == "user-1"


async def test_audience_or_azp(tmp_path: Any, jwks_server: JwksServer) -> None:
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_JWKS_URL=jwks_server.url, RT_AUTH_AUDIENCE="realtime"))
    await auth.start()
    try:
        for ok in (claims(aud="realtime"), claims(aud=["account", "realtime"]), claims(aud="account", azp="realtime")):
            assert (await auth.authenticate(jwks_server.sign(ok, "rsa-1"), WS)).subject == "user-1"
        for bad in (claims(aud="account"), claims(aud=["account"], azp="web"), claims()):
            exc = await refused(auth, jwks_server.sign(bad, "rsa-1"))
            assert exc.code == 4002 and "audience" in str(exc)
            assert exc.subject == "user-1"
    finally:
        await auth.close()


async def test_keycloak_tokens_that_are_no_access_tokens_are_refused(tmp_path: Any, jwks_server: JwksServer) -> None:
    """Keycloak signs ID tokens with the realm's keys too, with the client as aud and azp: an
    ID token (typ "ID") passed for an access token wherever auth.audience named the client.
    Access tokens (typ "Bearer") and tokens without typ pass as before."""
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_JWKS_URL=jwks_server.url, RT_AUTH_AUDIENCE="web"))
    await auth.start()
    try:
        for typ in ("Bearer", None):
            token = jwks_server.sign(claims(aud="web", azp="web", typ=typ), "rsa-1")
            assert (await auth.authenticate(token, WS)).subject == "user-1"
        for typ in ("ID", "Refresh", "Offline", "Logout"):
            exc = await refused(auth, jwks_server.sign(claims(aud="web", azp="web", typ=typ), "rsa-1"))
            assert exc.code == 4002 and f"{typ} token is not an access token" in str(exc), exc
    finally:
        await auth.close()


async def test_audience_not_configured_accepts_keycloak_account_aud(hs_auth: Authenticator) -> None:
    token = jwt.encode(claims(aud="account", azp="web"), SECRET, algorithm="HS256")
    assert (await hs_auth.authenticate(token, WS)).subject == "user-1"


# -- workspaces --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "granted"),
    [
        ([WS], True),
        (["other", WS], True),
        (WS, True),
        (["*"], True),
        ("*", True),
        (["other"], False),
        ("acm", False),
        (f"other {WS}", True),  # an OAuth scope-style string: space-separated entries
        ("other acm", False),
        ([], False),
        (None, False),
        ({"acme": True}, False),
    ],
)
async def test_workspace_claim_variants(hs_auth: Authenticator, value: Any, granted: bool) -> None:
    token = jwt.encode(claims(workspaces=value), SECRET, algorithm="HS256")
    if granted:
        assert (await hs_auth.authenticate(token, WS)).subject == "user-1"
    else:
        exc = await refused(hs_auth, token)
        assert (exc.code, exc.name, exc.subject) == (4003, "scope_denied", "user-1")
        assert WS in str(exc)


async def test_workspace_checked_per_workspace(hs_auth: Authenticator) -> None:
    token = jwt.encode(claims(workspaces=["a", "b"]), SECRET, algorithm="HS256")
    assert (await hs_auth.authenticate(token, "a")).subject == "user-1"
    assert (await hs_auth.authenticate(token, "b")).subject == "user-1"
    assert (await refused(hs_auth, token, "c")).code == 4003


async def test_keycloak_roles_with_prefix(tmp_path: Any, jwks_server: JwksServer) -> None:
    auth = Authenticator(
        make_cfg(
            tmp_path,
            RT_AUTH_JWKS_URL=jwks_server.url,
            RT_AUTH_WORKSPACE_CLAIM="resource_access.realtime.roles",
            RT_AUTH_WORKSPACE_ROLE_PREFIX="workspace:",
            RT_AUTH_PUBLISH_ROLE="realtime-publisher",
        )
    )
    await auth.start()
    try:
        roles = {"realtime": {"roles": ["workspace:acme", "realtime-publisher"]}, "account": {"roles": ["x"]}}
        identity = await auth.authenticate(jwks_server.sign(claims(workspaces=None, resource_access=roles), "rsa-1"), WS)
        assert identity.can_publish is True
        assert (await refused(auth, jwks_server.sign(claims(resource_access=roles), "rsa-1"), "beta")).code == 4003

        # without the prefix a bare id does not grant: entries are role names
        bare = {"realtime": {"roles": ["acme"]}}
        assert (await refused(auth, jwks_server.sign(claims(resource_access=bare), "rsa-1"))).code == 4003
        # the top-level default claim is not consulted when a path is configured
        assert (await refused(auth, jwks_server.sign(claims(), "rsa-1"))).code == 4003

        everything = {"realtime": {"roles": ["workspace:*"]}}
        identity = await auth.authenticate(jwks_server.sign(claims(resource_access=everything), "rsa-1"), "beta")
        assert identity.can_publish is False
    finally:
        await auth.close()


def test_claim_path_with_dotted_keys() -> None:
    c = {"resource_access": {"my.app": {"roles": ["workspace:acme"]}}, "a": {"b": {"c": 1}}}
    assert claim_at(c, "resource_access.my.app.roles") == ["workspace:acme"]
    assert claim_at(c, "a.b.c") == 1
    assert claim_at(c, "a.b.c.d") is None
    assert claim_at(c, "a.x") is None
    assert claim_at(c, "") is None


# -- publish -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "can_publish"),
    [
        ({"realtime_publish": True}, True),
        # a Keycloak user-attribute mapper of JSON type String writes the attribute as text
        ({"realtime_publish": "true"}, True),
        ({"realtime_publish": "True"}, True),
        ({"realtime_publish": "false"}, False),
        ({"realtime_publish": "yes"}, False),
        ({"realtime_publish": 1}, False),
        ({"realtime_publish": False}, False),
        ({}, False),
    ],
)
async def test_publish_claim(hs_auth: Authenticator, extra: dict[str, Any], can_publish: bool) -> None:
    identity = await hs_auth.authenticate(jwt.encode(claims(**extra), SECRET, algorithm="HS256"), WS)
    assert identity.can_publish is can_publish
    assert hs_auth.may_publish(identity) is can_publish


async def test_publish_claim_name_and_role_configurable(tmp_path: Any) -> None:
    auth = Authenticator(
        make_cfg(
            tmp_path, RT_AUTH_HS256_SECRET=SECRET, RT_AUTH_PUBLISH_CLAIM="perms.publish", RT_AUTH_PUBLISH_ROLE="publisher"
        )
    )
    by_claim = await auth.authenticate(jwt.encode(claims(perms={"publish": True}), SECRET, algorithm="HS256"), WS)
    assert by_claim.can_publish
    by_role = await auth.authenticate(jwt.encode(claims(workspaces=[WS, "publisher"]), SECRET, algorithm="HS256"), WS)
    assert by_role.can_publish
    neither = await auth.authenticate(jwt.encode(claims(realtime_publish=True), SECRET, algorithm="HS256"), WS)
    assert not neither.can_publish


# -- channel permissions -----------------------------------------------------------------------


async def test_channel_patterns(tmp_path: Any) -> None:
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_HS256_SECRET=SECRET, RT_AUTH_CHANNEL_PERMISSIONS="true"))
    token = jwt.encode(claims(realtime_channels=["postgres:*", "events:orders"]), SECRET, algorithm="HS256")
    identity = await auth.authenticate(token, WS)
    assert identity.channel_patterns == ("postgres:*", "events:orders")
    allowed = {"postgres:products", "postgres:*", "postgres:sales.orders", "events:orders"}
    denied = {"events:other", "events:*", "events:orders2", "mongo:orders", "mongo:*", "postgresx:y"}
    for channel in allowed:
        assert auth.may_subscribe(identity, channel), channel
    for channel in denied:
        assert not auth.may_subscribe(identity, channel), channel

    # permissions on, claim absent: nothing may be subscribed
    bare = await auth.authenticate(jwt.encode(claims(), SECRET, algorithm="HS256"), WS)
    assert bare.channel_patterns == ()
    assert not auth.may_subscribe(bare, "events:orders")

    everything = await auth.authenticate(jwt.encode(claims(realtime_channels="*"), SECRET, algorithm="HS256"), WS)
    assert auth.may_subscribe(everything, "mongo:orders")


async def test_channel_permissions_off_by_default(hs_auth: Authenticator) -> None:
    token = jwt.encode(claims(realtime_channels=["events:orders"]), SECRET, algorithm="HS256")
    identity = await hs_auth.authenticate(token, WS)
    assert identity.channel_patterns is None
    assert hs_auth.may_subscribe(identity, "mongo:anything")


async def test_channel_claim_path_is_configurable(tmp_path: Any) -> None:
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_HS256_SECRET=SECRET, RT_AUTH_CHANNEL_PERMISSIONS="true",
                                  RT_AUTH_CHANNEL_CLAIM="rt.channels"))
    identity = await auth.authenticate(jwt.encode(claims(rt={"channels": ["mongo:*"]}), SECRET, algorithm="HS256"), WS)
    assert auth.may_subscribe(identity, "mongo:orders") and not auth.may_subscribe(identity, "events:x")


def test_channel_permission_settings_that_contradict_are_refused(tmp_path: Any) -> None:
    # A claim named with the check off would look enforced and not be.
    with pytest.raises(config.ConfigError, match=r"set auth.channel_permissions \(RT_AUTH_CHANNEL_PERMISSIONS\) to true"):
        make_cfg(tmp_path, RT_AUTH_CHANNEL_CLAIM="rt.channels")
    with pytest.raises(config.ConfigError, match="names no claim"):
        make_cfg(tmp_path, RT_AUTH_CHANNEL_PERMISSIONS="true", RT_AUTH_CHANNEL_CLAIM="")


# -- dev secret and mint_token -----------------------------------------------------------------


def test_dev_secret_persists(tmp_path: Any) -> None:
    state = str(tmp_path / "state")
    first = load_or_create_dev_secret(state)
    assert len(first) == 64 and int(first, 16) >= 0
    path = os.path.join(state, "dev-secret")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_dev_secret(state) == first
    assert load_or_create_dev_secret(str(tmp_path / "other")) != first
    assert sorted(os.listdir(state)) == ["dev-secret"]  # no temporary files left behind


def test_dev_secret_concurrent_creation_agrees(tmp_path: Any) -> None:
    state = str(tmp_path / "race")
    results: list[str] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(load_or_create_dev_secret(state))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1


def test_dev_secret_too_short_is_an_error(tmp_path: Any) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "dev-secret").write_text("short\n")
    with pytest.raises(RuntimeError, match="shorter than 32"):
        load_or_create_dev_secret(str(state))


async def test_dev_mode_uses_the_persisted_secret(tmp_path: Any) -> None:
    cfg = make_cfg(tmp_path)
    assert cfg.dev_mode
    auth = Authenticator(cfg)
    assert auth.dev_mode
    secret = load_or_create_dev_secret(cfg.server.state_dir)
    token = mint_token(secret, subject="dev", workspaces=[WS], publish=True, ttl=60)
    identity = await auth.authenticate(token, WS)
    assert (identity.subject, identity.can_publish) == ("dev", True)

    explicit = Authenticator(cfg, dev_secret="x" * 40)
    assert (await refused(explicit, token)).code == 4002


async def test_mint_token_round_trip(hs_auth: Authenticator) -> None:
    before = time.time()
    token = mint_token(SECRET, subject="svc", workspaces=[WS, "b"], publish=False, ttl=90, extra={"realtime_channels": ["events:*"]})
    decoded = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert decoded["sub"] == "svc"
    assert decoded["workspaces"] == [WS, "b"]
    assert decoded["realtime_publish"] is False
    assert decoded["realtime_channels"] == ["events:*"]
    assert before + 89 <= decoded["exp"] <= time.time() + 91
    identity = await hs_auth.authenticate(token, "b")
    assert identity.subject == "svc" and identity.expires_at == decoded["exp"] and not identity.can_publish

    expired = mint_token(SECRET, subject="svc", workspaces=[WS], publish=False, ttl=-60)
    assert (await refused(hs_auth, expired)).code == 4001


def test_auth_error_names_follow_codes() -> None:
    exc = AuthError(4003, "a refresh token must be for the same subject", subject="u")
    assert (exc.code, exc.name, exc.subject, str(exc)) == (4003, "scope_denied", "u", "a refresh token must be for the same subject")
    assert AuthError(4001, "x").name == "token_expired"
    assert AuthError(4002, "x").name == "token_invalid"
    with pytest.raises(ValueError):
        AuthError(4000, "not an auth code")


# -- JwksCache directly ------------------------------------------------------------------------


async def test_cancelled_waiter_does_not_break_the_shared_fetch(jwks_server: JwksServer) -> None:
    cache = JwksCache(jwks_server.url)
    jwks_server.delay = 0.3
    try:
        first = asyncio.create_task(cache.key_for("rsa-1", "RS256"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(cache.key_for("rsa-1", "RS256"))
        await asyncio.sleep(0.05)
        first.cancel()
        key = await second
        assert key.algorithm_name == "RS256"
        assert jwks_server.requests == 1
        with pytest.raises(asyncio.CancelledError):
            await first
    finally:
        await cache.close()


async def test_stale_key_set_is_refreshed_behind(jwks_server: JwksServer) -> None:
    cache = JwksCache(jwks_server.url, refetch_interval=0.1, max_age=0.2)
    try:
        await cache.refresh()
        jwks_server.rotate("rsa-next", "RSA")
        await asyncio.sleep(0.25)
        # still served from the old set while the refresh runs behind
        assert (await cache.key_for("rsa-1", "RS256")).algorithm_name == "RS256"
        for _ in range(100):
            if jwks_server.requests >= 2 and cache._inflight is None:
                break
            await asyncio.sleep(0.02)
        assert jwks_server.requests == 2
        with pytest.raises(KeyNotFound):
            await cache.key_for("rsa-1", "RS256")  # withdrawn by the provider
        assert (await cache.key_for("rsa-next", "RS256")).algorithm_name == "RS256"
    finally:
        await cache.close()


async def withdraw_rsa1_once_stale(auth: Authenticator, jwks_server: JwksServer) -> None:
    """The provider replaces key rsa-1 by another, and the key set `auth` holds is old enough
    (max_age 0.2 s) that its next use refreshes it behind."""
    assert auth.jwks is not None
    auth.jwks.max_age = 0.2
    jwks_server.rotate("rsa-next", "RSA")
    await asyncio.sleep(0.25)


async def test_a_remembered_token_stops_verifying_once_its_key_is_withdrawn(
    tmp_path: Any, jwks_server: JwksServer
) -> None:
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_JWKS_URL=jwks_server.url, RT_AUTH_JWKS_REFETCH_INTERVAL=0.1))
    await auth.start()
    try:
        token = jwks_server.sign(claims(), "rsa-1")
        await auth.authenticate(token, WS)  # verified and remembered
        await withdraw_rsa1_once_stale(auth, jwks_server)
        # Only this token arrives: its own use of the old set refreshes it behind, as a new
        # token's would, and once the new set is in it is verified again, against that set.
        for _ in range(100):
            try:
                await auth.authenticate(token, WS)
            except AuthError as exc:
                assert exc.code == 4002 and "rsa-1" in str(exc)
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("a token whose key the provider withdrew still verifies")
    finally:
        await auth.close()


async def test_a_publishers_remembered_token_stops_once_its_key_is_withdrawn(
    tmp_path: Any, jwks_server: JwksServer
) -> None:
    # The publish API takes a token verified before from the same memory as connections do,
    # so the provider's withdrawal of a key stops a publisher as it stops a client.
    gw = Gateway(make_cfg(tmp_path, RT_AUTH_JWKS_URL=jwks_server.url, RT_AUTH_JWKS_REFETCH_INTERVAL=0.1))
    headers = {"authorization": f"Bearer {jwks_server.sign(claims(realtime_publish=True), 'rsa-1')}"}
    try:
        for _ in range(3):
            status, body = await gw.publish_http(WS, "orders", headers, b"{}", "127.0.0.1")
            assert status == 202, body
        assert jwks_server.requests == 1  # the key set fetched once
        await withdraw_rsa1_once_stale(gw.auth, jwks_server)
        accepted = 3
        for _ in range(100):
            status, body = await gw.publish_http(WS, "orders", headers, b"{}", "127.0.0.1")
            if status != 202:
                break
            accepted += 1
            await asyncio.sleep(0.02)
        assert status == 401 and b"rsa-1" in body, body
        assert len(gw.hub.workspace(WS).history) == accepted  # the refused one was not published
    finally:
        await gw.auth.close()


def test_parse_jwks_keeps_only_public_signing_keys() -> None:
    doc = {
        "keys": [
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "x", "e": "AQAB"},
            {"kty": "RSA", "kid": "sig", "use": "sig", "n": "x", "e": "AQAB"},
            {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "x", "y": "y"},
            {"kty": "RSA", "kid": 7},
            "junk",
        ]
    }
    assert sorted(parse_jwks(json.dumps(doc).encode())) == ["ec", "sig"]
    for bad in (b"not json", b"[]", b'{"keys": {}}'):
        with pytest.raises(JwksError):
            parse_jwks(bad, "http://idp/certs")


async def test_one_kid_for_an_rsa_and_an_ec_key_verifies_both(tmp_path: Any, jwks_server: JwksServer) -> None:
    """RFC 7517 §4.5 lets keys of different types share a kid (equivalent alternatives). The
    key set was a dict by kid, so the last of them replaced the others: tokens signed with the
    RSA one were refused 'key (EC) cannot verify RS256'."""
    rsa_jwk = RSAAlgorithm.to_jwk(private_key("dup-rsa", "RSA").public_key(), as_dict=True)
    ec_jwk = ECAlgorithm.to_jwk(private_key("dup-ec", "EC").public_key(), as_dict=True)
    jwks_server.body = json.dumps({"keys": [{**rsa_jwk, "kid": "dup"}, {**ec_jwk, "kid": "dup"}]}).encode()
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_JWKS_URL=jwks_server.url))
    await auth.start()
    try:
        for key, alg in ((private_key("dup-rsa", "RSA"), "RS256"), (private_key("dup-ec", "EC"), "ES256")):
            token = jwt.encode(claims(), key, algorithm=alg, headers={"kid": "dup"})
            assert (await auth.authenticate(token, WS)).subject == "user-1", alg
        assert jwks_server.requests == 1
    finally:
        await auth.close()


async def test_an_unreachable_identity_provider_is_no_verdict_on_the_token(tmp_path: Any) -> None:
    """With the key set never fetched (the identity provider down at start) every RS token got
    4002 token_invalid, "no signing keys available": both clients take 4002 for the end and
    stopped until the user reloaded. The token was not refused, only not checkable: 1011
    (clients reconnect with their backoff), and the publish API answers 503."""
    auth = Authenticator(make_cfg(tmp_path, RT_AUTH_JWKS_URL="http://127.0.0.1:9/certs"))
    await auth.start()
    try:
        token = jwt.encode(claims(), private_key("rsa-1"), algorithm="RS256", headers={"kid": "rsa-1"})
        exc = await refused(auth, token)
        assert (exc.code, exc.name) == (1011, "internal_error") and "not loaded" in str(exc), exc
    finally:
        await auth.close()


async def test_a_short_hs256_secret_is_warned_of_at_start(tmp_path, caplog):
    """HS256 wants a key of at least 32 bytes (RFC 7518 §3.2): a short shared secret can be
    guessed offline from any token, and whoever guesses it mints tokens for every workspace.
    It was said only by PyJWT, at the first token, in a warning naming its own source line;
    the start-up now says it once, naming the setting (and never the secret)."""
    import logging

    from rtserver.app import Gateway
    from tests.test_churn import _cfg

    for secret, warned in (("s3cr3t", True), ("x" * 32, False)):
        caplog.clear()
        gw = Gateway(_cfg(tmp_path / str(len(secret)), RT_AUTH_HS256_SECRET=secret))
        with caplog.at_level(logging.WARNING):
            await gw.start()
            await gw.shutdown()
        lines = [r.getMessage() for r in caplog.records if "auth.hs256_secret" in r.getMessage()]
        assert bool(lines) == warned, lines
        assert not any(secret in line for line in lines)
        if warned:
            assert "6 bytes" in lines[0] and "32" in lines[0]


def test_the_pyjwt_floor_excludes_releases_that_take_a_part_of_the_issuer() -> None:
    """PyJWT 2.10.0 compared a string `issuer` as a substring (CVE-2024-53861): with
    auth.issuer `https://kc/realms/acme`, a token whose `iss` was `acme`, `https://kc/realms/ac`
    or empty passed the issuer check (shown against 2.10.0 through the Authenticator). The
    declared `PyJWT[crypto]>=2.8` let an installation keep such a release; releases before 2.12
    also take a token whose `crit` header names extensions they do not understand (RFC 7515
    §4.1.11, GHSA-752w-5fwx-jx9f)."""
    import tomllib

    from packaging.requirements import Requirement

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml"), "rb") as fh:
        deps = [Requirement(d) for d in tomllib.load(fh)["project"]["dependencies"]]
    (pyjwt,) = [r for r in deps if r.name.lower() == "pyjwt"]
    for flawed in ("2.8.0", "2.10.0", "2.11.0"):
        assert not pyjwt.specifier.contains(flawed), (flawed, str(pyjwt))
    assert pyjwt.specifier.contains(jwt.__version__)


async def test_roles_as_the_workspace_claim_without_a_prefix_are_warned_of_at_start(tmp_path, caplog):
    """With a roles (or scope) claim as the workspace claim and no role prefix, every role a
    token carries grants the workspace of its name: Keycloak gives every user offline_access,
    uma_authorization and default-roles-<realm>. The start says so, naming the setting to set."""
    import logging

    from rtserver.app import Gateway
    from tests.test_churn import _cfg

    cases = (
        ({"RT_AUTH_WORKSPACE_CLAIM": "realm_access.roles"}, True),
        ({"RT_AUTH_WORKSPACE_CLAIM": "resource_access.my.app.roles"}, True),
        ({"RT_AUTH_WORKSPACE_CLAIM": "scope"}, True),
        ({"RT_AUTH_WORKSPACE_CLAIM": "realm_access.roles", "RT_AUTH_WORKSPACE_ROLE_PREFIX": "workspace:"}, False),
        ({}, False),  # the default claim, `workspaces`
    )
    for n, (env, warned) in enumerate(cases):
        caplog.clear()
        gw = Gateway(_cfg(tmp_path / str(n), RT_AUTH_HS256_SECRET="x" * 32, **env))
        with caplog.at_level(logging.WARNING):
            await gw.start()
            await gw.shutdown()
        lines = [r.getMessage() for r in caplog.records if "auth.workspace_role_prefix" in r.getMessage()]
        assert bool(lines) == warned, (env, lines)
