"""wss:// and https:// when a certificate is configured (PROTOCOL.md §1)."""

from __future__ import annotations

import asyncio
import json
import ssl

import websockets

from tests.harness.certs import self_signed


async def test_wss_and_https(gateway_factory, tmp_path):
    cert, key = self_signed(str(tmp_path))
    gw = await gateway_factory(env={"RT_TLS_CERT": cert, "RT_TLS_KEY": key}, wait_tls=cert)
    ctx = ssl.create_default_context(cafile=cert)
    url = f"wss://localhost:{gw.port}/workspaces/w1/realtime/connect"
    async with websockets.connect(url, ssl=ctx) as ws:
        await ws.send(json.dumps({"type": "auth", "token": gw.token("w1")}))
        assert json.loads(await ws.recv())["type"] == "auth_ok"
        await ws.send(json.dumps({"type": "subscribe", "channel": "events:t"}))
        assert json.loads(await ws.recv())["type"] == "subscribed"
        # publish over https on the same port
        reader, writer = await asyncio.open_connection("localhost", gw.port, ssl=ctx)
        body = b'{"tls": true}'
        writer.write(
            f"POST /workspaces/w1/realtime/events/t HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Authorization: Bearer {gw.token('w1', publish=True)}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        response = await reader.read()
        writer.close()
        assert response.startswith(b"HTTP/1.1 202")
        ev = json.loads(await ws.recv())
        assert ev["type"] == "event" and ev["payload"] == {"tls": True}


def test_unusable_certificate_or_key_is_one_clear_line(tmp_path):
    """A missing file names its setting; a passphrase-protected key is refused instead of
    OpenSSL prompting on the terminal."""
    import os
    import subprocess
    import sys

    from cryptography.hazmat.primitives import serialization

    cert, key = self_signed(str(tmp_path))
    with open(key, "rb") as fh:
        plain = serialization.load_pem_private_key(fh.read(), password=None)
    locked = tmp_path / "locked.pem"
    locked.write_bytes(plain.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"sesame")))
    base = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
    base.update({"RT_STATE_DIR": str(tmp_path / "state"), "RT_PORT": "0"})
    for tls_key, expected in ((str(tmp_path / "nokey.pem"), "server.tls_key " + str(tmp_path / "nokey.pem")
                               + ": cannot read: No such file or directory"),
                              (str(locked), "passphrase")):
        out = subprocess.run([sys.executable, "-m", "rtserver", "serve"], env={**base, "RT_TLS_CERT": cert,
                             "RT_TLS_KEY": tls_key}, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=30)
        errors = [line for line in out.stderr.splitlines() if line.startswith("rtserver:")]
        assert out.returncode == 2 and len(errors) == 1 and expected in errors[0], out.stderr


async def test_a_refused_request_over_tls_is_answered_and_closed(gateway_factory, tmp_path):
    """A refusal that closes the connection (408 for a request head not in full within
    limits.request_timeout, 413, 431) half-closes it after its answer (write_eof), which a TLS
    transport cannot do: NotImplementedError. Over https:// the 408 was never sent, an ERROR
    traceback was logged, and the connection stayed open for good, counted in
    rt_http_connections: a slowloris peer held sockets until the node answered 503 to everyone.
    Over TLS the answer now leaves and the connection is closed."""
    cert, key = self_signed(str(tmp_path))
    gw = await gateway_factory(env={"RT_TLS_CERT": cert, "RT_TLS_KEY": key, "RT_REQUEST_TIMEOUT": "1",
                                    "RT_MAX_PUBLISH_BYTES": "10"}, wait_tls=cert)
    ctx = ssl.create_default_context(cafile=cert)
    for head, status in ((b"GET /healthz HTTP/1.1\r\nHost: local", b"408"),
                         (b"POST /workspaces/w1/realtime/events/t HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n",
                          b"413")):
        reader, writer = await asyncio.open_connection("localhost", gw.port, ssl=ctx)
        writer.write(head)
        # until the gateway closes the connection (it never did over TLS)
        response = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert response.startswith(b"HTTP/1.1 " + status), response
    reader, writer = await asyncio.open_connection("localhost", gw.port, ssl=ctx)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    metrics = (await asyncio.wait_for(reader.read(), 30)).decode()
    writer.close()
    assert "\nrt_http_connections 1\n" in metrics  # this scrape's only
    assert '"level":"error"' not in gw.logs(), gw.logs()


async def test_a_tls_handshake_that_never_comes_is_cut_off_at_the_request_timeout(gateway_factory, tmp_path):
    """A connection that opens TCP and never starts its TLS handshake reaches no protocol of
    the gateway's, so neither the client-socket cap nor the request timeout counted it: each
    held a descriptor for asyncio's default 60 s, and a flood of them took the descriptors
    kept for the feeds and state files. The handshake gets limits.request_timeout now."""
    cert, key = self_signed(str(tmp_path))
    gw = await gateway_factory(env={"RT_TLS_CERT": cert, "RT_TLS_KEY": key, "RT_REQUEST_TIMEOUT": "1"},
                               wait_tls=cert)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)  # TCP only, no ClientHello
    try:
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the gateway, well before 60 s
    finally:
        writer.close()
