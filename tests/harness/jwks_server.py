"""A real JWKS endpoint for auth tests: serves a rotatable key set over HTTP or HTTPS on loopback.

It plays the identity provider (Keycloak's `/protocol/openid-connect/certs`): holds RSA and EC
private keys, publishes their public halves, signs tokens with them, and counts the requests it
served so tests can check caching, rate limiting and coalescing of refetches.
"""

from __future__ import annotations

import json
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.harness.certs import self_signed

JWKS_PATH = "/realms/test/protocol/openid-connect/certs"

# RSA key generation costs tens of milliseconds; tests reuse keys by name within a run.
_KEY_CACHE: dict[str, Any] = {}


def private_key(name: str, kind: str = "RSA") -> Any:
    """A private key, generated once per (name, kind) per test run."""
    cache_key = f"{kind}:{name}"
    key = _KEY_CACHE.get(cache_key)
    if key is None:
        if kind == "RSA":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif kind == "EC":
            key = ec.generate_private_key(ec.SECP256R1())
        elif kind == "OKP":
            key = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(f"unknown key kind {kind}")
        _KEY_CACHE[cache_key] = key
    return key


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class _Entry:
    kid: str
    kind: str
    key: Any
    alg: str | None  # published "alg" member, None to leave it out like some providers do


class JwksServer:
    """Threaded HTTP(S) server on 127.0.0.1 with a random port."""

    def __init__(self, *, tls: bool = False) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self.requests = 0
        self.delay = 0.0  # seconds each response waits (to overlap concurrent fetches)
        # When set, the key set answered is the one published when the request arrived, sent
        # this many seconds later (a slow link): keys published meanwhile are not in it.
        self.late = 0.0
        self.trickle = 0.0  # when set, the key set is sent a byte at a time, this many seconds apart
        self.status = 200  # answer this HTTP status instead of the key set when not 200
        self.body: bytes | None = None  # when set, answer these bytes (status 200) instead of the key set
        # When set, answer 302 to this URL instead of the key set (the URL with a query string,
        # `url + "?moved"`, still answers the key set: a redirect to it ends there).
        self.redirect: str | None = None
        self.tls = tls
        self.client_ssl_context: ssl.SSLContext | None = None
        self.cert_path: str | None = None  # with tls: its self-signed certificate (PEM)
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- keys ---------------------------------------------------------------------------------
    def add_key(self, kid: str, kind: str = "RSA", *, alg: str | None = None, name: str | None = None) -> Any:
        """Publish a key under `kid` (key material reused by `name`, default the kid)."""
        key = private_key(name or kid, kind)
        with self._lock:
            self._entries[kid] = _Entry(kid, kind, key, alg)
        return key

    def remove_key(self, kid: str) -> None:
        with self._lock:
            self._entries.pop(kid, None)

    def rotate(self, kid: str, kind: str = "RSA", *, alg: str | None = None) -> Any:
        """Replace the whole key set with one new key (a provider's key rotation)."""
        key = private_key(kid, kind)
        with self._lock:
            self._entries = {kid: _Entry(kid, kind, key, alg)}
        return key

    def sign(self, claims: dict[str, Any], kid: str, alg: str = "RS256", *, headers: dict[str, Any] | None = None) -> str:
        """A token signed with the private key published (or once published) under `kid`."""
        with self._lock:
            entry = self._entries.get(kid)
        key = entry.key if entry is not None else None
        if key is None:
            key = _KEY_CACHE.get(f"RSA:{kid}") or _KEY_CACHE.get(f"EC:{kid}") or _KEY_CACHE.get(f"OKP:{kid}")
        if key is None:
            raise KeyError(kid)
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, **(headers or {})})

    def document(self) -> dict[str, Any]:
        with self._lock:
            entries = list(self._entries.values())
        keys = []
        for entry in entries:
            codec = {"RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}[entry.kind]
            jwk = codec.to_jwk(entry.key.public_key(), as_dict=True)
            jwk.update({"kid": entry.kid, "use": "sig"})
            if entry.alg:
                jwk["alg"] = entry.alg
            keys.append(jwk)
        return {"keys": keys}

    # -- server -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}{JWKS_PATH}"

    def start(self) -> JwksServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with server._lock:
                    server.requests += 1
                arrived = json.dumps(server.document()).encode() if server.late else None
                if server.late:
                    time.sleep(server.late)
                if server.delay:
                    time.sleep(server.delay)
                if self.path.partition("?")[0] != JWKS_PATH:
                    self._send(404, b'{"error":"not found"}')
                elif server.redirect is not None and self.path == JWKS_PATH:
                    self.send_response(302)
                    self.send_header("Location", server.redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif server.status != 200:
                    self._send(server.status, b'{"error":"unavailable"}')
                elif server.body is not None:
                    self._send(200, server.body)
                else:
                    self._send(200, arrived if arrived is not None else json.dumps(server.document()).encode())

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not server.trickle:
                    self.wfile.write(body)
                    return
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(server.trickle)
                except OSError:
                    pass  # the client gave up

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # keep test output clean

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        if self.tls:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="jwks-tls-")
            cert_path, key_path = self_signed(self._tmpdir.name)
            server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server_ctx.load_cert_chain(cert_path, key_path)
            httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
            self.client_ssl_context = ssl.create_default_context(cafile=cert_path)
            self.cert_path = cert_path
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="jwks-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
