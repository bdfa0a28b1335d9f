"""JWKS key cache: the identity provider's public signing keys, fetched without blocking the loop.

The key set is fetched over HTTP(S) with urllib in a daemon thread of its own, cached, and
refetched when a token names a `kid` the cache does not hold (a Keycloak key rotation). Refetches
on unknown kids are rate-limited (an attacker can mint tokens with random kids for free), and
concurrent refetches are coalesced into one request. A cached key set older than `max_age` is
refreshed on the next lookup so that keys the provider withdrew stop verifying; if that refresh
fails the old keys keep serving (the provider being down must not lock every client out).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import jwt

from rtserver.redact import redact

log = logging.getLogger("rtserver.auth")

# Algorithms verified with JWKS keys, and the key type (and EC curve) each needs.
ASYMMETRIC_ALGORITHMS: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    # Keycloak's EdDSA key provider (Ed25519, or Ed448): an OKP key of that curve.
    "EdDSA": ("OKP", None),
}

MAX_JWKS_BYTES = 1024 * 1024  # a real key set is a few KiB; bound what we read
MAX_KEYS = 100  # likewise bound how many keys we keep
FETCH_TIMEOUT = 10.0
FAILURE_RETRY_INTERVAL = 1.0  # after a failed fetch the cache may be empty: retry sooner
DEFAULT_MAX_AGE = 300.0


class JwksError(Exception):
    """The key set could not be fetched or parsed (message names the URL, never a token)."""


class KeyNotFound(Exception):
    """No usable key for the token's kid/alg (message says why)."""


class KeysUnavailable(KeyNotFound):
    """The token's key could not be looked for now: no key set loaded (the identity provider
    unreachable), or its kid unknown and the key set could not be fetched again (the fetch
    failed, or one was made within jwks_refetch_interval). Not the token's fault: a later try
    may verify it (a key published since the last fetch)."""


class _NoDowngradeRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows a redirect from https to plain http (or ftp): keys fetched that way can be
    anyone's on the network path. A redirect is followed only to https, or from http to http."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        old, new = req.full_url.lower(), newurl.lower()
        if not new.startswith("https:") and not (old.startswith("http:") and new.startswith("http:")):
            raise JwksError(f"JWKS {redact(req.full_url)}: refused redirect ({code}) to {redact(newurl)}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _in_daemon_thread(fn: Any, *args: Any) -> asyncio.Future[Any]:
    """`fn(*args)` in a daemon thread of its own. Not the loop's executor: its threads are
    waited for by the loop's close and the interpreter's exit, so a fetch hung on an identity
    provider that says nothing (urllib's timeout bounds each socket operation; DNS has none)
    held a stopped gateway's exit. Fetches are rare (jwks_refetch_interval apart at most)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():  # given up on (wait_for's timeout, a stop)
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(*args), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the loop has closed: nobody waits for it any more

    threading.Thread(target=run, name="jwks-fetch", daemon=True).start()
    return future


def _fetch_blocking(url: str, ssl_context: ssl.SSLContext | None, timeout: float) -> bytes:
    # Runs in a thread of its own (_in_daemon_thread): urllib blocks on DNS, connect and read.
    # urllib's timeout bounds each socket operation, not the fetch: the body is read piecewise
    # against a deadline so a server trickling its answer frees the thread too (the waiters are
    # freed by _fetch).
    deadline = time.monotonic() + timeout
    shown = redact(url)  # errors are logged: a credential in the URL's query is not
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "rtserver"})
    try:
        context = ssl_context or ssl.create_default_context()
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoDowngradeRedirects)
        with opener.open(request, timeout=timeout) as response:  # URL is operator config
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_JWKS_BYTES:
                if time.monotonic() > deadline:
                    raise JwksError(f"JWKS {shown}: no complete answer within {timeout:g} s")
                chunk = response.read1(MAX_JWKS_BYTES + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            body = b"".join(chunks)
    except urllib.error.HTTPError as exc:
        raise JwksError(f"JWKS {shown}: HTTP {exc.code}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise JwksError(f"JWKS {shown}: {reason}") from None
    if len(body) > MAX_JWKS_BYTES:
        raise JwksError(f"JWKS {shown}: response larger than {MAX_JWKS_BYTES} bytes")
    return body


def parse_jwks(body: bytes, url: str = "") -> dict[str, list[dict[str, Any]]]:
    """Signing keys of a JWKS document by kid ("" for a key without kid), in document order: keys
    of different types may share a kid (RFC 7517 §4.5). Unusable keys are skipped."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise JwksError(f"JWKS {url}: not JSON: {exc}") from None
    except RecursionError:
        # Not a ValueError: it escaped every caller (the token waiting on the fetch got 1011).
        raise JwksError(f"JWKS {url}: not JSON: nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError(f"JWKS {url}: no \"keys\" list")
    keys: dict[str, list[dict[str, Any]]] = {}
    count = 0
    for entry in doc["keys"]:
        if count >= MAX_KEYS:
            log.warning("JWKS has too many keys; ignoring the rest", extra={"fields": {"url": url, "max": MAX_KEYS}})
            break
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid", "")
        if not isinstance(kid, str):
            continue
        # Only public signature keys: symmetric ("oct") keys in a JWKS would reopen algorithm
        # confusion, and encryption keys (use=enc) must never verify a signature.
        if entry.get("kty") not in ("RSA", "EC", "OKP") or entry.get("use", "sig") != "sig":
            continue
        if "d" in entry:
            # A private key in a published key set: anyone who fetched it can sign tokens, so it
            # verifies nothing (PyJWT could not verify with it either: each token got 1011).
            log.error("JWKS publishes a private key; it is not used: rotate it at the identity provider",
                      extra={"fields": {"url": url, "kid": kid[:64]}})
            continue
        keys.setdefault(kid, []).append(entry)
        count += 1
    return keys


class JwksCache:
    """Cached key set of one JWKS URL."""

    def __init__(
        self,
        url: str,
        *,
        refetch_interval: float = 30.0,
        max_age: float = DEFAULT_MAX_AGE,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self.url = url
        self.shown_url = redact(url)  # for logs and errors: without a credential it may carry
        self.refetch_interval = refetch_interval
        self.max_age = max(max_age, refetch_interval)
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._keys: dict[str, list[dict[str, Any]]] = {}
        self._resolved: dict[tuple[str, str], jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # monotonic time of the last successful fetch
        self._attempted_at: float | None = None  # monotonic time of the last attempt
        self._kid_refetch_at: float | None = None  # monotonic time of the last unknown-kid refetch
        self._inflight: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None
        self.fetch_count = 0  # attempts made, for metrics and tests
        self.generation = 0  # key sets loaded so far: which one a key came from (still_current)

    @property
    def loaded(self) -> bool:
        return self._fetched_at is not None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether a token can be verified (a key is loaded), and what /readyz says of the set.
        Without a key, a fetch is begun when the last attempt is a refetch interval old: the
        set was fetched on demand only, and a gateway the load balancer sends no client while
        it is not ready would never fetch it again."""
        if not self._keys and self._inflight is None and (
                self._attempted_at is None or time.monotonic() - self._attempted_at >= self.refetch_interval):
            self._refresh_behind()
        state = "loaded" if self._keys else "empty" if self.loaded else "not loaded"
        return bool(self._keys), {"jwks": state, "keys": len(self._keys)}

    async def refresh(self) -> None:
        """Fetch the key set now (coalesced with any fetch in flight). Raises JwksError.

        The fetch runs as its own task: a caller that is cancelled (its client went away) leaves
        it running for the others waiting on it.
        """
        task = self._inflight
        if task is None:
            self._attempted_at = time.monotonic()
            self.fetch_count += 1
            task = asyncio.get_running_loop().create_task(self._fetch())
            task.add_done_callback(self._fetch_done)
            self._inflight = task
        await asyncio.shield(task)

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved by the waiters; never reported as unobserved

    async def _fetch(self) -> None:
        fetch = _in_daemon_thread(_fetch_blocking, self.url, self._ssl_context, self._timeout)
        try:
            # The whole fetch, not each socket operation: clients wait on it (an RS token with an
            # unknown kid, the first ones after start) and a trickling answer must not hold them.
            body = await asyncio.wait_for(fetch, self._timeout)
        except TimeoutError:
            raise JwksError(f"JWKS {self.shown_url}: no complete answer within {self._timeout:g} s") from None
        keys = parse_jwks(body, self.shown_url)
        if not keys:
            log.warning("JWKS holds no signing key: every token it should verify is refused",
                        extra={"fields": {"url": self.shown_url}})
        self._keys = keys
        self._resolved.clear()
        self.generation += 1
        self._fetched_at = time.monotonic()
        log.info("JWKS loaded", extra={"fields": {"url": self.shown_url, "keys": sorted(keys)}})

    def _may_fetch_for_unknown_kid(self) -> bool:
        if self._inflight is not None:
            return True  # joining a fetch in flight costs nothing
        now = time.monotonic()
        if self._fetched_at is None:
            # Nothing cached yet (the prefetch failed): retry soon, but not on every token.
            return self._attempted_at is None or now - self._attempted_at >= FAILURE_RETRY_INTERVAL
        # Forged kids cost an attacker nothing: one refetch per interval, however many arrive.
        # Only kid-triggered refetches count, so a rotation right after a scheduled fetch still works.
        if self._kid_refetch_at is not None and now - self._kid_refetch_at < self.refetch_interval:
            return False
        self._kid_refetch_at = now
        return True

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The verification key for a token header's kid and alg. Raises KeyNotFound."""
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise KeyNotFound(f"algorithm {alg} is not verified with JWKS keys")
        looked = True
        if not self._has(kid):
            joined = self._inflight is not None
            looked = self._may_fetch_for_unknown_kid() and await self._refresh_logged()
            if looked and joined and not self._has(kid):
                # The fetch joined began before this token came: its set may predate the kid
                # (a key rotated in meanwhile). Only a set fetched since says the kid is not the
                # provider's; until one may be fetched, no verdict (refused 4002, the first
                # tokens of a new key ended their clients).
                looked = self._may_fetch_for_unknown_kid() and await self._refresh_logged()
        elif self._stale():
            # The key is known but the set is old: verify with it now and refresh behind, so a
            # key the provider withdrew stops verifying within max_age.
            self._refresh_behind()
        try:
            return self._resolve(kid, alg)
        except KeyNotFound as exc:
            if not self._keys:
                why = "has no signing key" if self.loaded else "could not be fetched"
                raise KeysUnavailable(f"{exc}: the identity provider's key set {why}") from None
            if not looked and not self._has(kid):
                raise KeysUnavailable(f"{exc}: the key set could not be fetched again now; try again") from None
            raise

    def still_current(self, generation: int) -> bool:
        """Whether the key set is still the one of `generation` (a token verified with a key of
        it may be taken as verified); an old set is refreshed behind, as by key_for, so that
        holds within max_age of a key's withdrawal for those tokens too."""
        if self._stale():
            self._refresh_behind()
        return generation == self.generation

    def _refresh_behind(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(self._refresh_logged())

    def _stale(self) -> bool:
        if self._fetched_at is None or self._attempted_at is None:
            return False
        now = time.monotonic()
        # While the provider is down, retry the scheduled refresh once per refetch interval.
        return now - self._fetched_at >= self.max_age and now - self._attempted_at >= self.refetch_interval

    async def _refresh_logged(self) -> bool:
        """refresh(), its failure logged; whether it succeeded."""
        try:
            await self.refresh()
        except JwksError as exc:
            log.warning("JWKS fetch failed", extra={"fields": {"url": self.shown_url, "error": str(exc)}})
            return False
        return True

    async def close(self) -> None:
        """Cancel a background refresh and a fetch in flight (its thread ends on its own)."""
        tasks = [t for t in (self._background, self._inflight) if t is not None and not t.done()]
        self._background = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _has(self, kid: str | None) -> bool:
        if kid is None:
            return len(self._keys) == 1
        return kid in self._keys

    def _resolve(self, kid: str | None, alg: str) -> jwt.PyJWK:
        if not self._keys:
            raise KeyNotFound("no signing keys available (" + ("the key set is empty" if self.loaded else "JWKS not loaded")
                              + ")")
        if kid is None:
            # A token without kid is only unambiguous when the provider has exactly one key.
            if len(self._keys) != 1:
                raise KeyNotFound("token has no kid and the key set has several keys")
            kid = next(iter(self._keys))
        cached = self._resolved.get((kid, alg))
        if cached is not None:
            return cached
        candidates = self._keys.get(kid)
        if candidates is None:
            raise KeyNotFound(f"unknown key id {kid!r}")
        kty, crv = ASYMMETRIC_ALGORITHMS[alg]
        # Of the keys under this kid, the first of the type (and curve) the algorithm needs.
        data = next(
            (d for d in candidates if d.get("kty") == kty and (crv is None or d.get("crv") == crv)), None
        )
        if data is None:
            types = ", ".join(str(d.get("kty")) for d in candidates)
            raise KeyNotFound(f"key {kid!r} ({types}) cannot verify {alg}")
        if "alg" in data and data["alg"] != alg:
            raise KeyNotFound(f"key {kid!r} is for {data['alg']}, token uses {alg}")
        try:
            key = jwt.PyJWK(data, algorithm=alg)
        except jwt.PyJWTError as exc:
            raise KeyNotFound(f"key {kid!r} is unusable: {exc}") from None
        self._resolved[(kid, alg)] = key
        return key
