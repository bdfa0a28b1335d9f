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
