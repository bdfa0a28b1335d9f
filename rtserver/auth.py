"""Token authentication: verifies a JWT and turns it into an Identity for one workspace.

HS256 tokens are verified with the shared secret (configured, or the generated development
secret); RS/PS/ES tokens with the identity provider's JWKS keys (rtserver.jwks). The algorithm a
token claims only selects which of the two key sources is consulted, and each source verifies
only its own algorithms, so neither `alg: none` nor an HS256 token signed with a public key can
pass. Error messages and logs never contain the token.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import os
import re
import secrets
import stat
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
import msgspec
from jwt.algorithms import HMACAlgorithm

from rtserver.config import Config
from rtserver.jwks import ASYMMETRIC_ALGORITHMS, JwksCache, KeyNotFound, KeysUnavailable

log = logging.getLogger("rtserver.auth")

_json_decode = msgspec.json.decode
_VERIFIED_MAX = 4096  # (token, workspace) pairs remembered as verified (Authenticator.known)
_VERIFIED_BYTES = 8 * 1024 * 1024  # and their tokens' characters at most: 512 of the longest
MAX_TOKEN_BYTES = 16 * 1024  # real tokens are 1-4 KiB; bounds the work an anonymous peer can cause
# A token header's kid and alg come from anyone and end up in error messages and audit records:
# a longer kid is refused (real ones are up to ~100 characters), an unknown alg shown cut short.
MAX_KID_CHARS = 256
_SHOWN_ALG_CHARS = 32
_SHOWN_ISS_CHARS = 200
# Keycloak's `typ` claim of the tokens that are not access tokens ("Bearer").
_NOT_ACCESS_TOKENS = frozenset({"id", "refresh", "offline", "logout"})
DEV_SECRET_FILE = "dev-secret"
MIN_HS256_SECRET = 32  # bytes: HS256's key is at least its hash's size (RFC 7518 §3.2)


# 1011: the token could not be checked now (KeysUnavailable); a later try may pass. Clients
# treat 4002 as the end, so an identity provider out of reach must not look like a bad token.
CODE_NAMES = {4001: "token_expired", 4002: "token_invalid", 4003: "scope_denied", 1011: "internal_error"}


class AuthError(Exception):
    """A refused token: `code`/`name` are the protocol's close code and name (§6).

    `subject` is the token's verified `sub` when known (for the audit trail), never the token.
    `audited` is the reason the audit record gives (the message unless said): a record is keyed
    by the workspace of the connection, and tells nothing of the token meant for the client
    alone, such as the other workspaces it grants.
    """

    def __init__(self, code: int, message: str, *, subject: str | None = None, audited: str | None = None) -> None:
        if code not in CODE_NAMES:
            raise ValueError(f"AuthError code {code} is not one of {sorted(CODE_NAMES)}")
        super().__init__(message)
        self.code = code
        self.name = CODE_NAMES[code]
        self.subject = subject
        self.audited = message if audited is None else audited


def _peek_header(token: str) -> dict[str, Any] | None:
    """The token's header, read only to choose the key (jwt.decode then checks all of the
    token, this header included), or None when it is not plainly readable and PyJWT should say
    what is wrong. PyJWT's own reading checks every character of all three segments in Python
    (~23 µs for a typical token), which jwt.decode does again: a third of a connection's
    authentication."""
    head, dot, _ = token.partition(".")
    if not dot:
        return None
    try:
        header = _json_decode(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, msgspec.DecodeError):  # binascii.Error is a ValueError
        return None
    except RecursionError:
        # Refused here: PyJWT's json.loads would raise RecursionError too, not a PyJWTError,
        # and the connection closed with 1011 (a publish got 500) instead of 4002 (401).
        raise _invalid("malformed token: its header nests too deeply") from None
    return header if isinstance(header, dict) else None


class _HS256(HMACAlgorithm):
    """PyJWT's HS256, its key check made once per key. prepare_key refuses a secret that is an
    asymmetric key or a certificate in disguise (PEM and SSH patterns, DER and JWK parsing
    attempts: ~6 us, a quarter of a token's verification, measured); its answer depends on the
    key alone, and every HS256 token is verified with the same one. The signature and every
    claim are checked by PyJWT as before."""

    def __init__(self) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._prepared: tuple[bytes, bytes] | None = None

    def prepare_key(self, key: str | bytes) -> bytes:
        prepared = self._prepared
        if prepared is not None and type(key) is bytes and key == prepared[0]:
            return prepared[1]
        result = super().prepare_key(key)  # raises for a key it refuses: never remembered
        if type(key) is bytes:
            self._prepared = (key, result)
        return result


# A code point of a UTF-16 surrogate: in a str json.loads made, only from a \u escape of half
# a pair (a pair's two escapes make one character).
_SURROGATE = re.compile("[\ud800-\udfff]")


class _PyJWT(jwt.PyJWT):
    """PyJWT whose claims hold text only: a claim with a lone surrogate (`"sub":"\\ud83d"`, as
    JavaScript's JSON.stringify writes a name cut in the middle of an emoji) is a malformed
    token. json.loads takes one, and no UTF-8 can carry it: every audit record of such a
    subject was dropped ('could not be built'), and at a stop the suspended sessions could not
    be written, which ended the shutdown there (no session of any workspace saved, the audit
    not flushed), as the gateway's own JSON readers refuse such text in messages and bodies."""

    def _decode_payload(self, decoded: dict[str, Any]) -> dict[str, Any]:
        payload = super()._decode_payload(decoded)
        if _holds_surrogate(payload):
            raise jwt.DecodeError("a claim holds a \\u escape of half a UTF-16 surrogate pair "
                                  "(a string cut in the middle of a character)")
        return payload


def _holds_surrogate(value: Any) -> bool:
    """Whether a text in `value` (claims as json.loads made them) holds a surrogate. Without
    recursion: the claims may nest as deeply as json.loads went."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _new_pyjwt() -> jwt.PyJWT:
    """A PyJWT of our own (jwt.decode's defaults) verifying HS256 with _HS256 and refusing
    claims that are not text (_PyJWT); the module's jwt.decode and jwt.encode stay as they are."""
    pyjwt = _PyJWT()
    jws = getattr(pyjwt, "_jws", None)
    if isinstance(jws, jwt.PyJWS) and "HS256" in jws.get_algorithms():
        jws.unregister_algorithm("HS256")
        jws.register_algorithm("HS256", _HS256())
    return pyjwt


_pyjwt = _new_pyjwt()


def _expired(message: str, subject: str | None = None) -> AuthError:
    return AuthError(4001, message, subject=subject)


def _invalid(message: str, subject: str | None = None) -> AuthError:
    return AuthError(4002, message, subject=subject)


def _denied(message: str, subject: str | None = None, audited: str | None = None) -> AuthError:
    return AuthError(4003, message, subject=subject, audited=audited)


@dataclass(frozen=True)
class Identity:
    """A verified token, granted one workspace."""

    subject: str
    expires_at: float  # the token's exp (epoch seconds); tokens without exp are refused
    can_publish: bool
    channel_patterns: tuple[str, ...] | None  # None: channel permissions off (all channels allowed)
    claims: dict[str, Any] = field(compare=False, repr=False)


def _rfc3339(epoch: Any) -> str:
    try:
        return datetime.fromtimestamp(float(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError, TypeError):
        return repr(epoch)


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """The value at a dotted claim path, or None.

    Keys may themselves contain dots (Keycloak client ids such as `my.app`), so at each level the
    longest key present wins: `resource_access.my.app.roles` finds `resource_access["my.app"]`.
    """
    if not path:
        return None
    node: Any = claims
    parts = path.split(".")
    while parts:
        if not isinstance(node, dict):
            return None
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in node:
                node = node[key]
                parts = parts[n:]
                break
        else:
            return None
    return node


def _granted(value: Any) -> bool:
    """A boolean permission claim: true, or the string "true" (any case), which is what a
    Keycloak user-attribute mapper of JSON type String emits for the attribute `true`."""
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _string_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str)]
    return []


def _claim_entries(value: Any) -> list[str]:
    """The entries of a workspace claim: a list, or a string of space-separated entries (an
    OAuth `scope`), which a workspace id or a role cannot contain. Read as one entry, a
    `scope` claim granted nothing, without a word."""
    return value.split() if isinstance(value, str) else _string_list(value)


_PUBLIC = "postgres:public."


def _short(name: str) -> str:
    """A channel or pattern in one spelling: a table of schema public without its schema
    (`postgres:public.orders` and `postgres:orders` are one channel, protocol §4)."""
    return "postgres:" + name[len(_PUBLIC):] if name.startswith(_PUBLIC) else name


# The patterns a channel refusal quotes at most: a token may list hundreds.
_REFUSAL_PATTERNS_SHOWN = 10


def _claim_held(path: str, value: Any, entries: list[str]) -> str:
    """What a token's claim at `path` holds, for a refusal: at most _REFUSAL_PATTERNS_SHOWN of
    its entries (a token may list hundreds)."""
    if value is None:
        return f"it has no {path} claim"
    if not entries:
        return f"its claim {path} lists nothing this gateway reads"
    shown = ", ".join(entries[:_REFUSAL_PATTERNS_SHOWN])
    extra = len(entries) - _REFUSAL_PATTERNS_SHOWN
    return f"its claim {path} lists {shown}" + (f" and {extra} more" if extra > 0 else "")


def channel_allowed(patterns: tuple[str, ...] | None, channel: str) -> bool:
    """Whether a channel is covered, in any of its spellings: exact pattern, or a pattern
    ending in `*` as a prefix (`postgres:*`), of the channel spelt as in _short. A prefix written
    with `postgres:public.` covers tables of schema public whose name it begins: matched against
    the spelling a client chose, `postgres:p*` covered `postgres:public.orders`, every table of
    schema public (an authorization audit). A wildcard channel (`postgres:*`, `mongo:*`,
    `events:*`) is every name of its kind: a prefix covers it only when it covers every name of
    the kind. Matched as text, `postgres:public.*` covered `postgres:*` (the table `*` of schema
    public), and with it every published schema's tables (a tenant-isolation audit)."""
    if patterns is None:
        return True
    if channel.endswith(":*") and channel.count(":") == 1:
        kind = channel[:-1]  # "postgres:"
        return any(p == channel or (p.endswith("*") and kind.startswith(p[:-1])) for p in patterns)
    name = _short(channel)
    table = name[len("postgres:"):] if name.startswith("postgres:") else None
    # The name of a table of schema public (or what a client wrote after `postgres:public.`)
    public = channel[len(_PUBLIC):] if channel.startswith(_PUBLIC) else table if table and "." not in table else None
    for pattern in patterns:
        if not pattern.endswith("*"):
            if _short(pattern) == name:
                return True
        elif pattern.startswith(_PUBLIC):
            if public is not None and public.startswith(pattern[len(_PUBLIC):-1]):
                return True
        elif name.startswith(pattern[:-1]):
            return True
    return False


class Authenticator:
    """Verifies tokens against the configured secret and/or JWKS URL."""

    def __init__(self, cfg: Config, *, dev_secret: str | None = None, jwks_ssl_context: Any = None) -> None:
        auth = cfg.auth
        # Compared without a trailing slash: Keycloak's iss has none, and an issuer configured
        # with one refused every token of the realm.
        self._issuer: str = auth.issuer.rstrip("/")
        self._audience: str = auth.audience
        self._leeway: float = auth.leeway
        self._workspace_claim: str = auth.workspace_claim
        self._role_prefix: str = auth.workspace_role_prefix
        self._channel_claim: str = auth.channel_claim if auth.channel_permissions else ""
        self._publish_claim: str = auth.publish_claim
        self._publish_role: str = auth.publish_role
        secret: str = auth.hs256_secret
        self.dev_mode = False
        if not secret and not auth.jwks_url:
            secret = dev_secret if dev_secret is not None else load_or_create_dev_secret(cfg.server.state_dir)
            self.dev_mode = True
        self._secret: bytes | None = secret.encode() if secret else None
        # (token, workspace) -> the identity granted and the generation of the JWKS key set that
        # verified the token (None: HS256); see known().
        self._verified: OrderedDict[tuple[str, str], tuple[Identity, int | None]] = OrderedDict()
        self._verified_bytes = 0
        self.jwks: JwksCache | None = None
        self._prefetch: asyncio.Task[None] | None = None
        if auth.jwks_url:
            self.jwks = JwksCache(
                auth.jwks_url, refetch_interval=auth.jwks_refetch_interval, ssl_context=jwks_ssl_context
            )

    def readiness(self) -> dict[str, Any]:
        """/readyz's `auth`: not ready while no token can be verified (a JWKS URL alone whose
        key set is not loaded, or empty: every client got 1011 and every publish 503, while
        /readyz said ready)."""
        if self.jwks is None:
            return {"ready": True}
        keys_ready, details = self.jwks.readiness()
        return {"ready": keys_ready or self._secret is not None, **details}

    async def start(self) -> None:
        """Prefetch the JWKS so the first client does not wait on it (a failure is retried on demand)."""
        if self.jwks is not None:
            try:
                await self.jwks.refresh()
            except Exception as exc:  # noqa: BLE001 - not fatal: the IdP may come up after us
                log.warning("JWKS prefetch failed", extra={"fields": {"url": self.jwks.shown_url, "error": str(exc)}})

    def prefetch(self) -> asyncio.Task[None] | None:
        """start() as a task of its own (None without a JWKS URL), for a caller that must not
        wait on it to the end: an RS token that comes before the key set waits for this same
        fetch (JwksCache.refresh coalesces them). close() cancels it."""
        if self.jwks is not None and self._prefetch is None:
            self._prefetch = asyncio.get_running_loop().create_task(self.start())
        return self._prefetch

    async def close(self) -> None:
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None and not prefetch.done():
            prefetch.cancel()
            await asyncio.gather(prefetch, return_exceptions=True)
        if self.jwks is not None:
            await self.jwks.close()

    async def authenticate(self, token: str, workspace: str) -> Identity:
        """Verify `token` and check it grants `workspace`. Raises AuthError."""
        identity = self.known(token, workspace)
        if identity is not None:
            return identity
        claims, generation = await self._verify_now(token)
        identity = self._identity(claims, workspace)
        self._remember((token, workspace), identity, generation)
        return identity

    def known(self, token: str, workspace: str) -> Identity | None:
        """The identity of a token verified before for `workspace`, while it has not expired
        and the key set that verified it is current; None: authenticate() it.

        A client reconnecting or refreshing, every connection of a service using one token,
        and a service publishing at a high rate present the same token again, and a
        verification is a third of what a connection costs the gateway and most of a publish
        request (PyJWT checks each character in Python: ~50 µs for a short token, ~120 µs at
        Keycloak's usual length). A key the provider withdrew stops its tokens as it did before:
        a token verified with a JWKS key counts only while that key set is the current one
        (JwksCache.still_current). What a token grants is not widened: the pair is the key, and
        a workspace the token does not grant is never remembered."""
        key = (token, workspace)
        entry = self._verified.get(key)
        if entry is None:
            return None
        identity, generation = entry
        if identity.expires_at + self._leeway > time.time() and (
            generation is None or (self.jwks is not None and self.jwks.still_current(generation))
        ):
            self._verified.move_to_end(key)
            return identity
        del self._verified[key]
        self._verified_bytes -= len(token)
        return None

    def _remember(self, key: tuple[str, str], identity: Identity, generation: int | None) -> None:
        verified = self._verified
        if key in verified:  # verified again meanwhile by a concurrent authenticate
            return
        verified[key] = (identity, generation)
        self._verified_bytes += len(key[0])
        while len(verified) > _VERIFIED_MAX or self._verified_bytes > _VERIFIED_BYTES:
            (token, _), _entry = verified.popitem(last=False)
            self._verified_bytes -= len(token)

    def _identity(self, claims: dict[str, Any], workspace: str) -> Identity:
        subject = claims["sub"]
        if not self._grants_workspace(claims, workspace):
            # What the token holds is the client's to read, not the refused workspace's audit
            # trail: it named every other workspace the token grants (tenant-isolation audit).
            raise _denied(self._workspace_refusal(claims, workspace), subject,
                          audited=f"token does not grant workspace {workspace}")
        patterns: tuple[str, ...] | None = None
        if self._channel_claim:
            # Permissions on but no claim: the subject may subscribe to nothing.
            patterns = tuple(_string_list(claim_at(claims, self._channel_claim)))
        return Identity(
            subject=subject,
            expires_at=float(claims["exp"]),
            can_publish=self._grants_publish(claims),
            channel_patterns=patterns,
            claims=claims,
        )

    def may_subscribe(self, identity: Identity, channel: str) -> bool:
        return channel_allowed(identity.channel_patterns, channel)

    def channel_refusal(self, identity: Identity, channel: str) -> str:
        """Why a channel is refused, naming the claim read and what it holds: without them a
        pattern typo, a claim mapped under another name and a missing claim looked alike."""
        held = _claim_held(self._channel_claim, claim_at(identity.claims, self._channel_claim),
                           list(identity.channel_patterns or ()))
        return f"token does not grant channel {channel}: {held}"

    def may_publish(self, identity: Identity) -> bool:
        return identity.can_publish

    def publish_requirement(self) -> str:
        """What a token needs to publish, as this configuration checks it: a 403 that names it
        tells the developer what to add to the token (or the identity provider's mapper)."""
        ways = []
        if self._publish_claim:
            ways.append(f"the claim {self._publish_claim}: true")
        if self._publish_role:
            ways.append(f"the role {self._publish_role} in {self._workspace_claim}")
        return " or ".join(ways) if ways else "nothing this gateway accepts (auth.publish_claim and auth.publish_role are empty)"

    async def _verify_now(self, token: str) -> tuple[dict[str, Any], int | None]:
        """The verified claims, and the generation of the JWKS key set that verified them
        (None for HS256)."""
        if not isinstance(token, str) or not token:
            raise _invalid("token missing")
        if len(token) > MAX_TOKEN_BYTES:
            raise _invalid(f"token longer than {MAX_TOKEN_BYTES} bytes")
        header = _peek_header(token)
        if header is None:
            try:
                header = jwt.get_unverified_header(token)
            except jwt.PyJWTError as exc:
                raise _invalid(f"malformed token: {exc}") from None
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str):
            raise _invalid("malformed token: alg is not a string")
        # Checked before the key set is consulted: a list or object kid is no dict key there
        # (TypeError: close 1011, publish 500), and any other would cost a refetch.
        if kid is not None and not isinstance(kid, str):
            raise _invalid("malformed token: kid is not a string")
        if kid is not None and len(kid) > MAX_KID_CHARS:
            raise _invalid(f"malformed token: kid longer than {MAX_KID_CHARS} characters")
        key: Any
        generation: int | None = None
        if alg == "HS256":
            if self._secret is None:
                raise _invalid("HS256 tokens are not accepted (no shared secret configured)")
            key = self._secret
        elif alg in ASYMMETRIC_ALGORITHMS:
            if self.jwks is None:
                raise _invalid(f"{alg} tokens are not accepted (no JWKS URL configured)")
            try:
                key = await self.jwks.key_for(kid, alg)
            except KeysUnavailable as exc:
                raise AuthError(1011, str(exc)) from None
            except KeyNotFound as exc:
                raise _invalid(str(exc)) from None
            generation = self.jwks.generation
        else:
            raise _invalid(f"algorithm {alg[:_SHOWN_ALG_CHARS]!r} is not accepted")

        # aud/azp are checked below. iat is not checked (§2 checks nbf): PyJWT refuses an iat
        # past now + leeway, so a gateway whose clock is behind the issuer's refused every fresh
        # token with 4002, which clients take for the end (Keycloak sets no nbf).
        options = {"verify_aud": False, "verify_iat": False, "require": ["exp"]}
        try:
            claims = _pyjwt.decode(
                token,
                key,
                algorithms=[alg],
                options=options,
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError:
            # The signature was verified before the expiry check, so the claims are authentic.
            claims = jwt.decode(token, options={"verify_signature": False})
            sub = claims.get("sub") if isinstance(claims.get("sub"), str) else None
            raise _expired(f"token expired at {_rfc3339(claims.get('exp'))}", sub) from None
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(f"token has no {exc.claim}") from None
        except jwt.ImmatureSignatureError:
            raise _invalid("token not yet valid (nbf in the future)") from None
        except jwt.InvalidSignatureError:
            raise _invalid("bad token signature") from None
        except jwt.DecodeError as exc:  # after InvalidSignatureError, one of its kind
            raise _invalid(f"malformed token: {exc}") from None
        except jwt.InvalidKeyError as exc:
            raise _invalid(f"token key refused: {exc}") from None
        except jwt.PyJWTError as exc:
            raise _invalid(f"invalid token: {exc}") from None

        if self._issuer:
            self._check_issuer(claims)
        exp = claims.get("exp")
        try:
            # float(): an int past a float's range raised OverflowError here (closed 1011). In
            # milliseconds too: auth_ok's expiresAt is, and an exp past ~1.8e305 made it
            # infinite (OverflowError in the handler: closed 1011 after the token was taken).
            usable = (
                not isinstance(exp, bool) and isinstance(exp, int | float) and math.isfinite(float(exp) * 1000)
            )
        except OverflowError:
            usable = False
        if not usable:
            raise _invalid("token exp is not a number")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise _invalid("token has no sub")
        typ = claims.get("typ")
        if isinstance(typ, str) and typ.lower() in _NOT_ACCESS_TOKENS:
            # Keycloak signs its ID tokens with the realm's keys as well, with the client as
            # aud/azp: an ID token passed for an access token wherever auth.audience names it.
            raise _invalid(f"a Keycloak {typ} token is not an access token", sub)
        if self._audience and not self._audience_ok(claims):
            raise _invalid(f"token audience is not {self._audience}", sub)
        return claims, generation

    def _check_issuer(self, claims: dict[str, Any]) -> None:
        iss = claims.get("iss")
        if not isinstance(iss, str) or iss.rstrip("/") != self._issuer:
            # The token's iss is shown (it is no secret): a mismatch is mostly a configuration
            # error (http vs https, a host name, the realm), which the operator must see.
            shown = repr(iss[:_SHOWN_ISS_CHARS]) if isinstance(iss, str) else "absent"
            sub = claims.get("sub") if isinstance(claims.get("sub"), str) else None
            raise _invalid(f"token issuer {shown} is not {self._issuer}", sub)

    def _audience_ok(self, claims: dict[str, Any]) -> bool:
        # Keycloak access tokens often carry aud "account" and name the client in azp.
        if self._audience in _string_list(claims.get("aud")):
            return True
        return claims.get("azp") == self._audience

    def _grants_workspace(self, claims: dict[str, Any], workspace: str) -> bool:
        entries = _claim_entries(claim_at(claims, self._workspace_claim))
        if self._role_prefix:
            wanted = {self._role_prefix + workspace, self._role_prefix + "*"}
        else:
            wanted = {workspace, "*"}
        return any(entry in wanted for entry in entries)

    def _workspace_refusal(self, claims: dict[str, Any], workspace: str) -> str:
        """Names the claim read and what it holds, as channel_refusal does: the workspace in the
        URL is usually right and the token (or its mapper) is not."""
        value = claim_at(claims, self._workspace_claim)
        held = _claim_held(self._workspace_claim, value, _claim_entries(value))
        if self._role_prefix and value is not None:
            held = f"no role {self._role_prefix}{workspace} (nor {self._role_prefix}*) in it: {held}"
        return f"token does not grant workspace {workspace}: {held}"

    def _grants_publish(self, claims: dict[str, Any]) -> bool:
        if self._publish_claim and _granted(claim_at(claims, self._publish_claim)):
            return True
        if self._publish_role:
            return self._publish_role in _claim_entries(claim_at(claims, self._workspace_claim))
        return False


def load_or_create_dev_secret(state_dir: str) -> str:
    """The development HS256 secret kept in `state_dir/dev-secret` (0600), created on first use.

    `rtserver serve` and `rtserver token` both call this, possibly at the same moment, so the file
    is written aside and linked into place: whoever links first wins and the other reads it.
    """
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, DEV_SECRET_FILE)
    existing = _read_secret(path)
    if existing is not None:
        return existing
    secret = secrets.token_hex(32)
    fd, tmp = tempfile.mkstemp(prefix=".dev-secret.", dir=state_dir)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            existing = _read_secret(path)
            if existing is None:
                raise RuntimeError(f"dev secret {path} exists but is empty or unreadable") from None
            return existing
    finally:
        os.unlink(tmp)
    return secret


def dev_secret_problem(state_dir: str) -> str | None:
    """Why the dev secret kept in `state_dir` cannot be used (load_or_create_dev_secret would
    refuse it), without making one; None when it can or is not there yet."""
    try:
        _read_secret(os.path.join(state_dir, DEV_SECRET_FILE))
    except RuntimeError as exc:
        return str(exc)
    return None


def _read_secret(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise RuntimeError(f"dev secret {path} is not ASCII text (a generated one is 64 hex digits); "
                           "delete it to regenerate") from None
    except OSError as exc:
        raise RuntimeError(f"dev secret {path}: cannot read: {exc.strerror or exc}") from None
    if len(text) < MIN_HS256_SECRET:
        raise RuntimeError(f"dev secret {path} is shorter than {MIN_HS256_SECRET} characters; delete it to regenerate")
    # Whoever can read it signs tokens for every workspace; one another user wrote was theirs.
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise RuntimeError(f"dev secret {path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 "
                           "it, or delete it to regenerate")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise RuntimeError(f"dev secret {path} belongs to another user (uid {st.st_uid}): delete it to regenerate")
    return text


def claims_for(auth: Any, *, workspaces: list[str], publish: bool, channels: list[str]) -> dict[str, Any]:
    """The claims with which a token passes the checks of configuration section `auth` (the
    Authenticator's): its issuer and audience, the workspaces at its claim path with its role
    prefix, publishing by its claim or role, and `channels` at the channel claim. Without it,
    `rtserver token` wrote the default shape, which a gateway configured for Keycloak refused."""
    claims: dict[str, Any] = {}
    if auth.issuer:
        claims["iss"] = auth.issuer
    if auth.audience:
        claims["aud"] = auth.audience
    granted = [auth.workspace_role_prefix + w for w in workspaces]
    if publish and not auth.publish_claim and auth.publish_role:
        granted.append(auth.publish_role)
    _put_claim(claims, auth.workspace_claim, granted)
    if publish and auth.publish_claim:
        _put_claim(claims, auth.publish_claim, True)
    if channels:
        _put_claim(claims, auth.channel_claim, list(channels))
    return claims


def _put_claim(claims: dict[str, Any], path: str, value: Any) -> None:
    """Set `value` at dotted `path` (one level a part: claim_at finds it that way too)."""
    *parents, last = path.split(".")
    node = claims
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def mint_token(
    secret: str,
    *,
    subject: str,
    workspaces: list[str],
    publish: bool,
    ttl: float,
    extra: dict[str, Any] | None = None,
) -> str:
    """An HS256 token for `rtserver token` and tests (claims: sub, workspaces, realtime_publish, iat, exp)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "workspaces": list(workspaces),
        "realtime_publish": bool(publish),
        "iat": now,
        "exp": now + math.ceil(ttl),
    }
    if extra:
        claims.update(extra)
    return jwt.encode(claims, secret, algorithm="HS256")
