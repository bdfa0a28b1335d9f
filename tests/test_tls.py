"""wss:// and https:// when a certificate is configured (PROTOCOL.md §1)."""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl

import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _self_signed(tmp_path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


async def test_wss_and_https(gateway_factory, tmp_path):
    cert, key = _self_signed(tmp_path)
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
