"""Plain HTTP on the gateway's port: the publish API (§8), health, readiness, metrics, 404s."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time

from tests.harness.http_wire import read_answer
from tests.harness.prometheus import family_types, parse_exposition
from tests.harness.wsclient import subscribed_clients, ws_connect


async def test_health_ready_metrics(gateway):
    status, body = await gateway.get("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = await gateway.get("/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    status, body = await gateway.get("/metrics")
    text = body.decode()
    assert status == 200
    for name in ("rt_connections", "rt_subscriptions", "rt_events_in_total", "rt_deliveries_total",
                 "rt_drops_total", "rt_auth_failures_total"):
        assert f"\n{name}" in "\n" + text, name


async def test_metrics_are_valid_exposition_with_every_audit_number(gateway):
    """/metrics parses as the text format, and carries every number of the audit's status
    (docs/audit.md: `rt_audit_*`), equal to /readyz's."""
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe("events:x")
    await gateway.audit_records("session-suspended")
    _, body = await gateway.get("/metrics")
    samples = parse_exposition(body.decode())
    _, ready = await gateway.get("/readyz")
    audit = json.loads(ready)["audit"]
    numbers = {k: v for k, v in audit.items() if isinstance(v, int) and not isinstance(v, bool)}
    assert set(numbers) >= {"backlog", "queued", "spooled", "spool_bytes", "emitted", "delivered", "lost"}
    for key, value in numbers.items():
        assert samples.get(f"rt_audit_{key}") == value, key
    assert audit["emitted"] == 2  # auth-granted, session-suspended
    # What counts since start is typed counter (rate() and increase() apply), levels are gauges.
    types = family_types(body.decode())
    for name in ("rt_audit_emitted", "rt_audit_delivered", "rt_audit_lost", "rt_history_node_evicted"):
        assert types[name] == "counter", name
    for name in ("rt_audit_backlog", "rt_audit_spool_bytes", "rt_history_node_bytes", "rt_connections"):
        assert types[name] == "gauge", name
    assert all(kind == "counter" for name, kind in types.items() if name.endswith("_total")), types


async def test_source_series_of_same_named_databases_on_two_servers_are_distinct(gateway_factory, tmp_path):
    """Two workspaces whose MongoDB databases have the same name on two servers: /readyz tells
    them apart by URL, and so must /metrics, else each rt_source_* sample came twice with the
    same labels (a scrape with duplicate series: Prometheus keeps one of them)."""
    from tests.harness.fixtures_gateway import free_port

    urls = [f"mongodb://rt:s3cret@127.0.0.1:{free_port()}/app?serverSelectionTimeoutMS=500" for _ in range(2)]
    config = tmp_path / "rt.toml"
    config.write_text("".join(f'[workspaces.w{i}]\nmongo_url = "{url}"\n' for i, url in enumerate(urls)))
    gw = await gateway_factory(args=["--config", str(config)])
    _, ready = await gw.get("/readyz")
    assert len(json.loads(ready)["sources"]) == 2, ready
    _, body = await gw.get("/metrics")
    text = body.decode()
    samples = parse_exposition(text)
    assert len([k for k in samples if k.startswith("rt_source_ready{")]) == 2, text
    assert "s3cret" not in text


async def test_metrics_count_connections_events_and_auth_failures(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe("events:x")
        await gateway.publish("w1", "x", {"a": 1})
        await c.recv_event()
        async with ws_connect(gateway, "w1") as bad:
            await bad.send({"type": "auth", "token": "nope"})
            await bad.expect_close()
        _, body = await gateway.get("/metrics")
    text = body.decode()
    assert "rt_connections 1" in text
    assert "rt_subscriptions 1" in text
    assert 'rt_events_in_total{source="events"} 1' in text
    assert "rt_deliveries_total 1" in text
    assert 'rt_auth_failures_total{code="4002"} 1' in text


async def test_unknown_paths_are_404(gateway):
    for path in ("/", "/nope", "/workspaces/w1/realtime", "/workspaces/bad%20id/realtime/connect"):
        status, _ = await gateway.get(path)
        assert status == 404, path


async def test_an_absolute_form_target_without_a_path_is_answered_and_logs_no_error(gateway):
    """A request target in absolute form (as sent to a proxy) may have no path: `http://h`
    means `/` (RFC 9112 3.2.2). Its path was None, and the request handler failed on it outside
    its error handling: no answer, the connection dropped, and an ERROR line with a traceback
    ("Fatal error on transport") in the log for each such request anyone sent. Now it is the
    request for `/`: 404 (whatever the method: `/` is no endpoint), and the connection goes on."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        for request, want in ((b"GET http://h HTTP/1.1\r\nHost: h\r\n\r\n", 404),
                              (b"GET http://h?x=1 HTTP/1.1\r\nHost: h\r\n\r\n", 404),
                              (b"POST http://h HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}", 404),
                              (b"DELETE http://h HTTP/1.1\r\nHost: h\r\n\r\n", 404),
                              (b"GET http://h/healthz HTTP/1.1\r\nHost: h\r\n\r\n", 200)):
            writer.write(request)
            status, _, body = await read_answer(reader)
            assert status == want, (request, status, body)
    finally:
        writer.close()
    assert '"level":"error"' not in gateway.logs()


async def test_upgrade_to_bad_workspace_id_or_path_is_404(gateway):
    import websockets

    for path in ("/workspaces/" + "x" * 65 + "/realtime/connect", "/workspaces/a.b/realtime/connect", "/other"):
        try:
            async with websockets.connect(f"ws://127.0.0.1:{gateway.port}{path}"):
                raise AssertionError("upgrade should be refused")
        except websockets.InvalidStatus as exc:
            assert exc.response.status_code == 404


async def test_a_percent_encoded_workspace_id_connects_as_it_publishes(gateway):
    """A percent-encoded unreserved character is that character (RFC 3986 §2.3, §6.2.2.2):
    `/workspaces/w%31/...` is workspace `w1`. The publish API read it so, but the connect path
    answered 404; it is decoded the same way now (and a `%2F` is still no part of an id)."""
    import websockets

    async with ws_connect(gateway, "w%31", token=gateway.token("w1")) as c:
        await c.subscribe("events:orders")
        await gateway.publish("w1", "orders", {"n": 1})
        assert (await c.recv_event())["payload"] == {"n": 1}
    for path in ("/workspaces/w%2F1/realtime/connect", "/workspaces/w%0A/realtime/connect"):
        try:
            async with websockets.connect(f"ws://127.0.0.1:{gateway.port}{path}"):
                raise AssertionError("upgrade should be refused")
        except websockets.InvalidStatus as exc:
            assert exc.response.status_code == 404


async def test_publish_errors(gateway):
    base = "/workspaces/w1/realtime/events"
    good = {"Authorization": f"Bearer {gateway.token('w1', publish=True)}"}
    # A token whose header is JSON nested 6,000 deep.
    deep_token = base64.urlsafe_b64encode(b"[" * 6000 + b"]" * 6000).rstrip(b"=").decode() + ".e30.c2ln"
    cases = [
        (f"{base}/orders", b"{bad json", good, 400),
        # Unreadable JSON is bad JSON too (both were 500: the decoder's RecursionError and
        # UnicodeDecodeError were not caught).
        (f"{base}/orders", b"[" * 100000 + b"]" * 100000, good, 400),
        (f"{base}/orders", b'"\xff"', good, 400),
        (f"{base}/bad%20topic", b"{}", good, 400),
        (f"{base}/orders", b"", good, 400),
        (f"{base}/orders", b"{}", {}, 401),
        (f"{base}/orders", b"{}", {"Authorization": "Bearer garbage"}, 401),
        (f"{base}/orders", b"{}", {"Authorization": f"Bearer {deep_token}"}, 401),  # was 500
        (f"{base}/orders", b"{}", {"Authorization": f"Bearer {gateway.token('w1', publish=True, ttl=-60)}"}, 401),
        (f"{base}/orders", b"{}", {"Authorization": f"Bearer {gateway.token('w1')}"}, 403),
        (f"{base}/orders", b"{}", {"Authorization": f"Bearer {gateway.token('w2', publish=True)}"}, 403),
        ("/workspaces/bad.id/realtime/events/orders", b"{}", good, 404),
        (f"{base}/orders", b'"' + b"x" * (256 * 1024) + b'"', good, 413),
        (f"{base}/orders", b"{}", {**good, "X-Correlation-ID": "c" * 129}, 400),
        (f"{base}/a%2Fb", b"{}", good, 400),  # an encoded "/" stays in the topic, which refuses it
        (f"{base}/%FF", b"{}", good, 400),  # not UTF-8
        # A trailing newline is no part of a topic or a workspace id (a `$`-anchored check let
        # "orders\n" through as a topic and "w1\n" as a workspace of its own).
        (f"{base}/orders%0A", b"{}", good, 400),
        # An empty topic is a malformed one (PROTOCOL.md §8: 400), not an unknown endpoint.
        (f"{base}/", b"{}", good, 400),
        ("/workspaces/w1%0A/realtime/events/orders", b"{}",
         {"Authorization": f"Bearer {gateway.token('*', publish=True)}"}, 404),
    ]
    for path, body, headers, expected in cases:
        status, out = await gateway.post(path, body, headers)
        assert status == expected, (path, body[:20], headers, status, out)
        assert "error" in json.loads(out)
    # The publish API takes POST only: another method is 405, GET as PUT (GET was a 404).
    status, out = await gateway.get(f"{base}/orders", good)
    assert status == 405 and "POST" in json.loads(out)["error"], (status, out)


async def test_a_publish_403_names_the_permission_the_token_lacks(gateway_factory):
    """A developer whose token lacks the publish permission must learn from the 403 what to
    add: it said only "token does not grant publishing to workspace w1", naming neither the
    claim (`auth.publish_claim`) nor the role (`auth.publish_role`) that would grant it."""
    gw = await gateway_factory()
    status, out = await gw.post("/workspaces/w1/realtime/events/orders", b"{}",
                                {"Authorization": f"Bearer {gw.token('w1')}"})
    assert status == 403, out
    error = json.loads(out)["error"]
    assert "workspace w1" in error and "realtime_publish" in error, error
    gw = await gateway_factory(env={"RT_AUTH_PUBLISH_CLAIM": "can_publish", "RT_AUTH_PUBLISH_ROLE": "publisher"})
    status, out = await gw.post("/workspaces/w1/realtime/events/orders", b"{}",
                                {"Authorization": f"Bearer {gw.token('w1')}"})
    assert status == 403, out
    error = json.loads(out)["error"]
    assert "can_publish" in error and "publisher" in error and "realtime_publish" not in error, error


async def test_a_405_names_the_methods_allowed(gateway):
    """RFC 9110 §15.5.6: a 405 MUST carry an Allow header listing the methods the resource
    takes: POST for the publish URL (§8), GET and HEAD for the other endpoints. It had none."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        for request, allow in ((b"PUT /workspaces/w1/realtime/events/orders HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: 2\r\n\r\n{}", b"POST"),
                               (b"GET /workspaces/w1/realtime/events/orders HTTP/1.1\r\nHost: x\r\n\r\n", b"POST"),
                               (b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"GET, HEAD"),
                               (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", b"GET, HEAD"),
                               (b"PUT /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"GET, HEAD"),
                               (b"POST /workspaces/w1/realtime/connect HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: 0\r\n\r\n", b"GET, HEAD")):
            writer.write(request)
            status, head, _ = await read_answer(reader)
            assert status == 405, (request, head)
            assert b"\r\nAllow: " + allow + b"\r\n" in head, (request, head)
        # A path that is no endpoint is a 404 whatever the method (§1: any other path: 404).
        for request in (b"DELETE /nosuch HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"POST /nosuch HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"):
            writer.write(request)
            status, head, _ = await read_answer(reader)
            assert status == 404 and b"Allow" not in head, (request, head)
    finally:
        writer.close()


async def test_a_plain_get_of_the_connect_path_is_426_naming_the_upgrade(gateway):
    """The connect path without a WebSocket upgrade is 426 Upgrade Required, which MUST name
    the protocol to upgrade to (RFC 9110 §15.5.22: `Upgrade: websocket`); it named none."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(b"GET /workspaces/w1/realtime/connect HTTP/1.1\r\nHost: x\r\n\r\n")
        status, head, body = await read_answer(reader)
        assert status == 426, head
        assert b"\r\nUpgrade: websocket\r\n" in head, head
        assert b"\r\nConnection: Upgrade, keep-alive\r\n" in head, head
        assert "upgrade" in json.loads(body)["error"].lower()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection goes on
        assert (await read_answer(reader))[0] == 200
    finally:
        writer.close()


async def test_a_401_carries_a_bearer_challenge(gateway):
    """RFC 9110 §15.5.2: a 401 MUST carry a WWW-Authenticate challenge (RFC 6750 §3: Bearer).
    The publish API's 401s had none, and clients that act on the challenge failed on the answer
    instead of reporting the refused token. A 403 (token taken, no permission) needs none."""
    base = "/workspaces/w1/realtime/events/orders"
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        for auth, want in (("", 401), ("Authorization: Bearer garbage\r\n", 401),
                           (f"Authorization: Bearer {gateway.token('w1')}\r\n", 403)):
            writer.write(f"POST {base} HTTP/1.1\r\nHost: h\r\n{auth}Content-Length: 2\r\n\r\n{{}}".encode())
            status, head, body = await read_answer(reader)
            assert status == want, (auth, status, body)
            challenges = [line for line in head.lower().split(b"\r\n") if line.startswith(b"www-authenticate:")]
            assert challenges == ([b"www-authenticate: bearer"] if want == 401 else []), head
    finally:
        writer.close()


async def test_publish_topic_may_be_percent_encoded(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe("events:orders:eu")
        # What encodeURIComponent("orders:eu") gives, and a correlation id at its longest.
        status, body = await gateway.post(
            "/workspaces/w1/realtime/events/orders%3Aeu", b"{}",
            {"Authorization": f"Bearer {gateway.token('w1', publish=True)}", "X-Correlation-ID": "c" * 128},
        )
        assert status == 202, body
        ev = await c.recv_event()
        assert (ev["channel"], ev["topic"], ev["seq"]) == ("events:orders:eu", "orders:eu", json.loads(body)["seq"])
        assert ev["correlationId"] == "c" * 128


async def test_a_non_ascii_correlation_id_is_read_as_its_sender_wrote_it(gateway):
    """curl sends a header's `é` as UTF-8 bytes, Python's http.client as Latin-1: both must
    reach subscribers (and the answer) as `é`. Read as Latin-1 alone, the UTF-8 one became
    `Ã©`, an id the publisher would look for in vain."""
    token = gateway.token("w1", publish=True)
    async with ws_connect(gateway, "w1", token=token) as c:
        await c.subscribe("events:orders")
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            for raw, meant in (("café-€".encode(), "café-€"), ("café".encode("latin-1"), "café")):
                writer.write(b"POST /workspaces/w1/realtime/events/orders HTTP/1.1\r\nHost: x\r\n"
                             b"Authorization: Bearer " + token.encode() + b"\r\nX-Correlation-ID: " + raw +
                             b"\r\nContent-Length: 2\r\n\r\n{}")
                status, _, body = await read_answer(reader)
                assert status == 202 and json.loads(body)["correlationId"] == meant, body
                assert (await c.recv_event())["correlationId"] == meant
        finally:
            writer.close()


async def test_publish_accepts_any_json_value_up_to_the_limit(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe("events:*")
        for payload in (None, 3, "s", [1, {"a": True}], {"x" * 10: "y" * (200 * 1024)}):
            out = await gateway.publish("w1", "t", payload)
            ev = await c.recv_event()
            assert ev["payload"] == payload and ev["seq"] == out["seq"]


async def test_a_publish_nesting_at_the_limit_around_a_value_is_400_not_500(gateway):
    """The payload is decoded from the body, then encoded one level deeper inside the event
    (and a few calls further down the stack): a body at the decoder's very limit with a value
    innermost ([[...[1]...]]) decoded but could not be encoded, and its publisher got 500
    "internal error", its connection closed, and the log an ERROR traceback, at will. It is
    400 "nests too deeply", as a body nesting deeper still, and the connection serves on."""
    token = gateway.token("w1", publish=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    statuses = {}
    try:
        for depth in range(960, 1000):
            body = b"[" * depth + b"1" + b"]" * depth  # json.dumps would itself run out of stack
            writer.write(b"POST /workspaces/w1/realtime/events/deep HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (token.encode(), len(body), body))
            status, _, answer = await read_answer(reader)
            statuses[depth] = status
            if status == 400:
                assert b"nests too deeply" in answer, answer
        assert set(statuses.values()) == {202, 400}, statuses
    finally:
        writer.close()
    assert '"level":"error"' not in gateway.logs()


async def test_publish_keep_alive_connection_serves_several_requests(gateway):
    token = gateway.token("w1", publish=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        for i in range(3):
            body = json.dumps({"i": i}).encode()
            writer.write(
                f"POST /workspaces/w1/realtime/events/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 202"), head
            length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
            out = json.loads(await reader.readexactly(length))
            assert out["seq"] > 0
    finally:
        writer.close()


async def test_malformed_http_is_400(gateway):
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        data = s.recv(1000)
    assert data.startswith(b"HTTP/1.1 400")


async def test_expect_100_continue_and_head(gateway):
    token = gateway.token("w1", publish=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        body = json.dumps({"big": "x" * 2000}).encode()
        writer.write(
            f"POST /workspaces/w1/realtime/events/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 202")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 15" in head
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # the HEAD sent no body
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(15) == b'{"status":"ok"}'
    finally:
        writer.close()


async def test_a_head_of_a_publish_url_is_answered_without_a_body(gateway):
    """A HEAD of the publish URL gets 405 (§8: POST only) as a head alone (RFC 9110 §9.3.2):
    its JSON body was sent, and a keep-alive client read it as the start of its next answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(b"HEAD /workspaces/w1/realtime/events/orders HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 405"), head
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert await reader.readexactly(15) == b'{"status":"ok"}'
    finally:
        writer.close()


async def test_pipelined_publishes_keep_their_order_under_back_pressure(gateway_factory):
    """200 publish requests in one write on one connection, with the gateway writing one client
    per loop iteration and holding publishers beyond one queued frame: the responses come
    back in request order with increasing seq, and every subscriber gets the events in that
    order (more than the 64 requests after which the connection is no longer read)."""
    from contextlib import AsyncExitStack

    gw = await gateway_factory(env={"RT_FLUSH_CHUNK": "1", "RT_FANOUT_BACKLOG": "1", "RT_FANOUT_BACKLOG_PER_CONNECTION": "0"})
    token = gw.token("w1", publish=True)
    total = 200
    async with AsyncExitStack() as stack:
        clients = await subscribed_clients(stack, gw, 4, "events:k")
        seqs = await _pipelined_publishes(gw.port, token, "k", total)
        assert seqs == sorted(seqs) and len(set(seqs)) == total
        for c in clients:
            got = [await c.recv_event(timeout=10) for _ in range(total)]
            assert [e["payload"]["i"] for e in got] == list(range(total))
            assert [e["seq"] for e in got] == seqs
    _, metrics = await gw.get("/metrics")
    assert b"rt_publisher_waits_total 0" not in metrics  # the back-pressure did engage


async def _read_response(reader) -> tuple[int, dict]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return int(head.split()[1]), json.loads(await reader.readexactly(length))


async def _closed(reader, timeout: float = 10) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True


async def test_oversized_requests_are_refused_at_once_and_never_buffered(gateway):
    """A body announced over the limit is refused before it is sent; a chunked one once it
    passes the limit; a request head that never ends at 64 KiB: the connection closes each time,
    and what the client keeps sending is not kept in memory."""
    token = gateway.token("w1", publish=True)
    path = "/workspaces/w1/realtime/events/big"
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Length: 1000000000\r\n\r\n".encode())
    status, body = await _read_response(reader)  # without a byte of the body
    assert status == 413 and "payload exceeds 262144 bytes" in body["error"]
    assert await _closed(reader)
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Transfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
    with contextlib.suppress(ConnectionError):
        for _ in range(5):
            writer.write(chunk)
            await writer.drain()
    status, body = await _read_response(reader)
    assert status == 413
    assert await _closed(reader)
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    with contextlib.suppress(ConnectionError):
        for _ in range(100):  # 1 MB of headers if nobody stops it
            writer.write(b"X-Junk: " + b"y" * 10000 + b"\r\n")
            await writer.drain()
    status, body = await _read_response(reader)
    assert status == 431 and "request head exceeds 65536 bytes" in body["error"]
    assert await _closed(reader)
    writer.close()
    assert (await gateway.get("/healthz"))[0] == 200


async def test_a_head_over_64_kib_that_arrives_whole_is_refused_431(gateway):
    """The README's limit, 64 KiB of request headers (431), holds however the head arrives.
    Before, the size was checked read by read while the head was incomplete: a request whose
    100 KB head came in one or two reads was served, a publish included."""
    token = gateway.token("w1", publish=True)
    junk = "X-Junk: " + "y" * 100_000 + "\r\n"
    for head in (f"GET /healthz HTTP/1.1\r\nHost: x\r\n{junk}\r\n",
                 f"POST /workspaces/w1/realtime/events/big HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {token}\r\n{junk}Content-Length: 2\r\n\r\n{{}}",
                 f"GET /healthz?{'q' * 70_000} HTTP/1.1\r\nHost: x\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(head.encode())
        status, body = await _read_response(reader)
        assert status == 431 and "request head exceeds 65536 bytes" in body["error"], (head[:40], status, body)
        assert await _closed(reader)
        writer.close()
    # A head within the limit is served.
    assert (await gateway.get("/healthz", headers={"X-Junk": "y" * 60_000}))[0] == 200


async def test_a_body_announced_over_the_limit_with_trailing_whitespace_is_refused_at_once(gateway):
    """HTTP allows whitespace after a header value ("Content-Length: 1000000000 "), and the
    parser keeps it: the length was then not recognised, so the 413 waited for a gigabyte of
    body and an `Expect: 100-continue` was even answered 100 Continue, inviting it."""
    token = gateway.token("w1", publish=True)
    for length in ("1000000000 ", "1000000000\t"):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(f"POST /workspaces/w1/realtime/events/big HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {token}\r\nExpect: 100-continue\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())
        status, body = await _read_response(reader)
        assert status == 413 and "payload exceeds 262144 bytes" in body["error"], (length, status, body)
        assert await _closed(reader)
        writer.close()


async def test_refusal_is_answered_after_the_requests_before_it(gateway_factory):
    """Pipelined publishes held by back-pressure, then one over the limit: every earlier request
    is answered (202, in order) before the 413, and then the connection closes."""
    from contextlib import AsyncExitStack

    gw = await gateway_factory(env={"RT_FLUSH_CHUNK": "1", "RT_FANOUT_BACKLOG": "1", "RT_FANOUT_BACKLOG_PER_CONNECTION": "0"})
    token = gw.token("w1", publish=True)
    async with AsyncExitStack() as stack:
        clients = await subscribed_clients(stack, gw, 4, "events:k")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        head = f"POST /workspaces/w1/realtime/events/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        requests = [(head + "Content-Length: 2\r\n\r\n{}").encode() for _ in range(100)]
        requests.append((head + "Content-Length: 999999999\r\n\r\n").encode())
        writer.write(b"".join(requests))
        statuses = [(await _read_response(reader))[0] for _ in range(101)]
        assert statuses == [202] * 100 + [413]
        assert await _closed(reader)
        writer.close()
        for c in clients:  # the 100 accepted were delivered
            assert len([await c.recv_event(timeout=10) for _ in range(100)]) == 100
            await c.no_message(0.1)


async def test_silent_http_connections_are_closed_after_the_idle_timeout(gateway_factory):
    gw = await gateway_factory(env={"RT_IDLE_TIMEOUT": "1"})
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", gw.port)  # says nothing
    slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", gw.port)
    slow_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never finishes
    kept_reader, kept_writer = await asyncio.open_connection("127.0.0.1", gw.port)
    for _ in range(4):  # a keep-alive client that keeps asking stays
        kept_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await _read_response(kept_reader))[0] == 200
        await asyncio.sleep(0.5)
    assert await _closed(idle_reader, 5) and await _closed(slow_reader, 5)
    kept_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await _read_response(kept_reader))[0] == 200
    for w in (idle_writer, slow_writer, kept_writer):
        w.close()


async def _pipelined_publishes(port: int, token: str, topic: str, n: int) -> list[int]:
    """Send n publish requests ({"i": 0..n-1}) in one write on one connection; their seqs,
    after checking every response is a 202."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        requests = []
        for i in range(n):
            body = json.dumps({"i": i}).encode()
            requests.append(
                f"POST /workspaces/w1/realtime/events/{topic} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        writer.write(b"".join(requests))
        seqs = []
        for _ in range(n):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            assert head.startswith(b"HTTP/1.1 202"), head
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            seqs.append(json.loads(await reader.readexactly(length))["seq"])
        return seqs
    finally:
        writer.close()



async def test_a_request_trickling_in_is_cut_off_at_the_request_timeout(gateway_factory):
    """A peer that sends a request a byte at a time (slowloris) is never silent for the idle
    timeout: the request itself, head or body, must arrive within limits.request_timeout of its
    first byte, or it is answered 408 and the connection closes. A keep-alive client whose
    requests each arrive at once stays, however long it lasts."""
    gw = await gateway_factory(env={"RT_REQUEST_TIMEOUT": "2"})
    token = gw.token("w1", publish=True)
    heads = [
        b"GET /workspaces/w1/realtime/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nX-Pad: ",
        f"POST /workspaces/w1/realtime/events/t HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: 100\r\n\r\n{{\"a\":\"".encode(),
    ]
    slow = []
    for head in heads:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(head)
        slow.append((reader, writer))
    kept_reader, kept_writer = await asyncio.open_connection("127.0.0.1", gw.port)
    started = time.monotonic()
    answers: list[bytes] = [b"", b""]
    while time.monotonic() - started < 6 and not all(answers):
        await asyncio.sleep(0.25)
        for i, (reader, writer) in enumerate(slow):
            if not answers[i]:
                writer.write(b"a")  # never silent for long
                try:
                    answers[i] = await asyncio.wait_for(reader.read(1000), 0.01)
                except TimeoutError:
                    pass
        kept_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await _read_response(kept_reader))[0] == 200
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert time.monotonic() - started < 5
    for reader, _ in slow:
        assert await _closed(reader, 5)
    kept_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await _read_response(kept_reader))[0] == 200
    for _, writer in [*slow, (kept_reader, kept_writer)]:
        writer.close()


async def test_publishes_refused_as_too_large_are_counted_by_status(gateway):
    """rt_publish_requests_total counts the publish API's answers by status; a body over
    limits.max_publish_bytes is answered 413 before the request is read in full, and was not
    counted: a publisher whose events were refused left no trace in /metrics."""
    token = gateway.token("w1", publish=True)
    path = "/workspaces/w1/realtime/events/big"
    await gateway.publish("w1", "big", {"a": 1})  # 202
    for head in ("Content-Length: 1000000000\r\n\r\n", "Transfer-Encoding: chunked\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{head}".encode())
        with contextlib.suppress(ConnectionError):
            for _ in range(5 if "chunked" in head else 0):
                writer.write(b"%x\r\n%s\r\n" % (65536, b"x" * 65536))
                await writer.drain()
        status, _ = await _read_response(reader)
        assert status == 413
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
    assert (await _read_response(reader))[0] == 413  # not a publish: not counted
    writer.close()
    # A publish URL with a method it does not take: its 405 is a publish API answer too (it
    # was not counted); a 405 of /metrics is not one.
    assert (await gateway.request("PUT", path, b"{}", {"Authorization": f"Bearer {token}"}))[0] == 405
    assert (await gateway.request("PUT", "/metrics", b""))[0] == 405
    samples = parse_exposition((await gateway.get("/metrics"))[1].decode())
    assert {k: v for k, v in samples.items() if k.startswith("rt_publish_requests_total")} == {
        'rt_publish_requests_total{status="202"}': 1, 'rt_publish_requests_total{status="405"}': 1,
        'rt_publish_requests_total{status="413"}': 2}


async def test_every_message_refused_with_4000_is_counted(gateway):
    """rt_invalid_messages_total counts the client messages refused with 4000; one over
    limits.max_message_bytes got its 4000 (then 1009) and was not counted."""
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.send({"type": "nonsense", "id": "a"})
        assert (await c.recv_type("error"))["code"] == 4000
        await c.send(json.dumps({"type": "ping", "pad": "x" * 70000}))
        assert (await c.recv_type("error"))["code"] == 4000
        assert (await c.expect_close())[0] == 1009
    samples = parse_exposition((await gateway.get("/metrics"))[1].decode())
    assert samples["rt_invalid_messages_total"] == 2


async def test_a_labelled_counter_shown_once_is_shown_in_every_later_scrape(gateway):
    """rt_events_in_total, rt_auth_failures_total and rt_publish_requests_total showed a
    placeholder series at 0 (source="events", code="4002", status="202") only until another
    label value was counted: then it vanished from /metrics, which Prometheus reads as the
    series ending (and one that reappears later starts afresh: its first counts are missing
    from increase() and rate()). A counter's series stays once shown, never lower; the source
    kinds start at 0, so a feed's first events count too."""
    first = parse_exposition((await gateway.get("/metrics"))[1].decode())
    assert first['rt_events_in_total{source="postgres"}'] == first['rt_events_in_total{source="mongo"}'] == 0
    status, _ = await gateway.post("/workspaces/w1/realtime/events/x", b"{}", {"Authorization": "Bearer nope"})
    assert status == 401
    async with ws_connect(gateway, "w2") as c:
        await c.send({"type": "auth", "token": gateway.token("w1")})  # not granted w2
        assert (await c.recv_type("error"))["code"] == 4003
    later = parse_exposition((await gateway.get("/metrics"))[1].decode())
    assert later['rt_publish_requests_total{status="401"}'] == 1
    assert later['rt_auth_failures_total{code="4003"}'] == 1
    types = family_types((await gateway.get("/metrics"))[1].decode())
    for key, value in first.items():
        if types[key.split("{")[0]] == "counter":
            assert key in later and later[key] >= value, key


async def test_publish_api_refusals_are_audited_as_a_websockets_are(gateway):
    """A publisher's token refused (missing, forged, not granting the workspace, no publish
    permission) was counted in rt_publish_requests_total only: forged or guessed tokens sent
    to the publish API left no audit record, those sent over a WebSocket did (auth audit).
    Each is an auth-denied record now, with publish: true, the token never written."""
    path = "/workspaces/w1/realtime/events/o"
    forged = gateway.token("w1", publish=True, secret="another-secret-0123456789abcdef0123")
    cases = [({}, 401), ({"Authorization": f"Bearer {forged}"}, 401),
             ({"Authorization": f"Bearer {gateway.token('w2', publish=True)}"}, 403),
             ({"Authorization": f"Bearer {gateway.token('w1', sub='reader')}"}, 403)]
    for headers, status in cases:
        assert (await gateway.post(path, b"{}", headers))[0] == status
    batch = await gateway.post("/workspaces/w1/realtime/events", b'{"events":[]}', {})
    assert batch[0] == 401
    records = await gateway.audit_records("auth-denied", count=5)
    assert [(r["code"], r.get("publish"), r["workspaceId"]) for r in records] == [(4002, True, "w1")] * 2 + [
        (4003, True, "w1")] * 2 + [(4002, True, "w1")], records
    assert records[3]["subject"] == "reader" and "publishing" in records[3]["reason"], records[3]
    assert all(r["remoteAddr"].startswith("127.0.0.1:") for r in records), records
    assert forged not in gateway.logs()
