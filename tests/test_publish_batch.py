"""The publish API's batch (docs/protocol.md §8): many events in one request, in order, all
checked before any is published."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import websockets

from tests.harness.http_wire import read_answer
from tests.harness.wsclient import ws_connect

BATCH = "/workspaces/w1/realtime/events"


def _auth(gw, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.token('w1', publish=True)}", **extra}


async def test_a_batch_publishes_its_events_in_order_with_one_answer(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as every, \
            ws_connect(gateway, "w1", token=gateway.token("w1")) as big:
        await every.subscribe("events:*")
        await big.subscribe("events:orders", {"predicates": {"total": {"$gte": 100}}})
        before = await gateway.publish("w1", "orders", {"total": 1})
        batch = {"events": [
            {"topic": "orders", "payload": {"total": 150}, "correlationId": "mine-1"},
            {"topic": "audit.log", "payload": ["any", "json", None]},
            {"topic": "orders", "payload": {"total": 99}},
            {"topic": "orders", "payload": {"total": 100, "note": "é"}, "correlationId": "mine-2"},
            {"topic": "orders", "payload": None},
        ]}
        status, out = await gateway.post(BATCH, json.dumps(batch).encode(), _auth(gateway, **{"X-Correlation-ID": "op-7"}))
        assert status == 202, out
        answer = json.loads(out)["events"]
        seqs = [a["seq"] for a in answer]
        assert seqs == sorted(set(seqs)) and seqs[0] > before["seq"], answer
        # An event's own id, else the request's X-Correlation-ID.
        assert [a["correlationId"] for a in answer] == ["mine-1", "op-7", "op-7", "mine-2", "op-7"]

        assert (await every.recv_event())["seq"] == before["seq"]
        got = [await every.recv_event() for _ in batch["events"]]
        assert [(e["topic"], e["channel"], e["payload"], e["seq"], e["correlationId"]) for e in got] == [
            (item["topic"], f"events:{item['topic']}", item["payload"], a["seq"], a["correlationId"])
            for item, a in zip(batch["events"], answer, strict=True)]
        assert all(e["operation"] == "PUBLISH" and e["timestamp"] for e in got)
        assert [e["seq"] for e in [await big.recv_event(), await big.recv_event()]] == [seqs[0], seqs[3]]
        await big.no_message()

        # Without X-Correlation-ID, each event without an id of its own gets one of its own.
        status, out = await gateway.post(BATCH, b'{"events": [{"topic": "t", "payload": 1}, {"topic": "t", "payload": 2}]}',
                                         _auth(gateway))
        assert status == 202, out
        corrs = [a["correlationId"] for a in json.loads(out)["events"]]
        assert len(set(corrs)) == 2 and all(corrs), corrs
        assert [e["correlationId"] for e in [await every.recv_event(), await every.recv_event()]] == corrs

        # An empty batch publishes nothing, and says so.
        status, out = await gateway.post(BATCH, b'{"events": []}', _auth(gateway))
        assert (status, json.loads(out)) == (202, {"events": []})
        await every.no_message()


async def test_a_batch_with_one_bad_event_publishes_none_of_them(gateway):
    ok = {"topic": "t", "payload": {"ok": True}}
    cases = [
        (b"", "body is empty"),
        (b"{bad", "body is not valid JSON"),
        (b'[{"topic": "t", "payload": 1}]', "body is not a batch of events"),
        (b'{"event": []}', "unknown field `event`"),
        (b'{"events": {"topic": "t", "payload": 1}}', "$.events"),
        (json.dumps({"events": [ok, {"topic": "t"}]}).encode(), "$.events[1]"),  # no payload
        (json.dumps({"events": [ok, {"topic": "t", "payload": 1, "paylaod": 2}]}).encode(), "paylaod"),
        (json.dumps({"events": [ok, {"topic": 5, "payload": 1}]}).encode(), "$.events[1].topic"),
        (json.dumps({"events": [ok, ok, {"topic": "bad topic", "payload": 1}]}).encode(), "events[2].topic 'bad topic'"),
        (json.dumps({"events": [ok, {"topic": "", "payload": 1}]}).encode(), "events[1].topic ''"),
        (json.dumps({"events": [ok, {"topic": "t", "payload": 1, "correlationId": ""}]}).encode(),
         "events[1].correlationId must be 1-128 printable characters"),
        (json.dumps({"events": [ok, {"topic": "t", "payload": 1, "correlationId": "x" * 129}]}).encode(),
         "events[1].correlationId"),
        (json.dumps({"events": [ok, {"topic": "t", "payload": 1, "correlationId": "a\nb"}]}).encode(),
         "events[1].correlationId"),
        (b'{"events": [{"topic": "t", "payload": ' + b"[" * 100000 + b"]" * 100000 + b"}]}", "nests too deeply"),
        # Where the body says nothing of where it is, the byte: the event is found by it.
        (b'{"events": [{"topic": "t", "payload": 1}, {"topic": "t", "payload": "\xff"}]}', "not valid UTF-8 (byte 69)"),
        (b'{"events": [{"topic": "t", "payload": 1}, {"topic": "t", "payload": "\\ud800"}]}', "at byte 69"),
    ]
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as c:
        await c.subscribe("events:*")
        for body, said in cases:
            status, out = await gateway.post(BATCH, body, _auth(gateway))
            assert status == 400 and said in json.loads(out)["error"], (body[:60], status, out)
        status, out = await gateway.post(BATCH, json.dumps({"events": [ok]}).encode(),
                                         _auth(gateway, **{"X-Correlation-ID": "c" * 129}))
        assert status == 400 and "X-Correlation-ID" in json.loads(out)["error"], out
        # The 256 KiB bound is the whole request's, as for one event.
        big = json.dumps({"events": [{"topic": "t", "payload": "x" * (130 * 1024)}] * 2}).encode()
        status, out = await gateway.post(BATCH, big, _auth(gateway))
        assert status == 413, out
        marker = await gateway.publish("w1", "after", {"marker": True})
        first = await c.recv_event()
        assert (first["seq"], first["payload"]) == (marker["seq"], {"marker": True}), first


async def test_a_batch_is_refused_as_a_single_publish_is(gateway):
    body = b'{"events": [{"topic": "t", "payload": 1}]}'
    cases = [
        ({}, 401, "missing Authorization"),
        ({"Authorization": "Bearer garbage"}, 401, ""),
        ({"Authorization": f"Bearer {gateway.token('w1')}"}, 403, "realtime_publish"),
        ({"Authorization": f"Bearer {gateway.token('w2', publish=True)}"}, 403, ""),
    ]
    for headers, expected, said in cases:
        status, out = await gateway.post(BATCH, body, headers)
        assert status == expected and said in json.loads(out)["error"], (headers, status, out)
    status, out = await gateway.post("/workspaces/bad.id/realtime/events", body, _auth(gateway))
    assert status == 404, out
    status, out = await gateway.get(BATCH, _auth(gateway))
    assert status == 405 and "POST" in json.loads(out)["error"], (status, out)
    # With a slash and no topic it is a single event's URL with an empty topic, as before;
    # the refusal says where batches go.
    status, out = await gateway.post(BATCH + "/", body, _auth(gateway))
    assert status == 400 and "topic ''" in json.loads(out)["error"], (status, out)
    assert "a batch of events goes to /workspaces/w1/realtime/events" in json.loads(out)["error"], out
    _, metrics = await gateway.get("/metrics")
    assert b'rt_publish_requests_total{status="401"} 2' in metrics, metrics


async def test_batches_pipelined_with_single_publishes_keep_request_order(gateway_factory):
    """Under the fan-out back-pressure (a frame queued holds publishers), batches and single
    publishes written at once on one connection are answered in request order, and their
    events get seq in that order."""
    gw = await gateway_factory(env={"RT_FLUSH_CHUNK": "1", "RT_FANOUT_BACKLOG": "1",
                                    "RT_FANOUT_BACKLOG_PER_CONNECTION": "0"})
    token = gw.token("w1", publish=True)
    requests, expected = [], []
    for r in range(30):
        if r % 3 == 1:
            items = [{"topic": "k", "payload": {"i": len(expected) + j}} for j in range(5)]
            path, body = BATCH, {"events": items}
        else:
            items = [{"topic": "k", "payload": {"i": len(expected)}}]
            path, body = f"{BATCH}/k", items[0]["payload"]
        expected += [item["payload"]["i"] for item in items]
        data = json.dumps(body).encode()
        requests.append(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                        f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("events:k")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(b"".join(requests))
            seqs = []
            for r in range(30):
                status, _, out = await read_answer(reader, 20)
                assert status == 202, out
                answer = json.loads(out)
                seqs += [a["seq"] for a in answer["events"]] if r % 3 == 1 else [answer["seq"]]
        finally:
            writer.close()
        assert seqs == sorted(set(seqs)) and len(seqs) == len(expected) == 70
        got = [await c.recv_event(timeout=10) for _ in expected]
        assert [(e["seq"], e["payload"]["i"]) for e in got] == list(zip(seqs, expected, strict=True))


async def test_a_batch_partly_confirmed_says_which_events_were_published():
    """On a Kafka node each event of a batch is confirmed on its own (bus.submit_many): the
    answer waits for all of them, and when some fail it names each one's outcome, 504
    (unknown) winning over a refusal, so the publisher retries exactly what was not
    published and knows which may be written after all."""
    from rtserver.bus import BusUnavailable
    from rtserver.publish import batch_outcome, custom_event

    loop = asyncio.get_running_loop()
    corrs = [f"c{i}" for i in range(4)]
    events = [custom_event("w1", "t", {"i": i}, corrs[i], "2026-12-01T00:00:00.000Z") for i in range(4)]
    confirmations = [loop.create_future() for _ in range(3)]
    answer = batch_outcome([7, confirmations[1], confirmations[2], confirmations[0]], events, corrs)
    confirmations[0].set_result(8)
    confirmations[2].set_exception(BusUnavailable(504, "sent, not confirmed in time"))
    await asyncio.sleep(0)
    assert not answer.done()  # one still unconfirmed
    confirmations[1].set_exception(BusUnavailable(503, "not sent"))
    status, body = await asyncio.wait_for(answer, 1)
    out = json.loads(body)
    assert status == 504, out  # the first failure is a 503, but an outcome is unknown
    assert out["events"] == [
        {"seq": 7, "correlationId": "c0"},
        {"status": 503, "error": "not sent", "correlationId": "c1"},
        {"status": 504, "error": "sent, not confirmed in time", "correlationId": "c2"},
        {"seq": 8, "correlationId": "c3"},
    ]
    assert out["error"].startswith("2 of the batch's 4 events"), out
    assert "the first: events[1]: not sent" in out["error"], out

    done = [loop.create_future() for _ in range(2)]
    answer = batch_outcome(done, events[:2], corrs[:2])
    for seq, fut in enumerate(done, 20):
        fut.set_result(seq)
    status, body = await asyncio.wait_for(answer, 1)
    assert (status, json.loads(body)) == (202, {"events": [{"seq": 20, "correlationId": "c0"},
                                                            {"seq": 21, "correlationId": "c1"}]})


def _batch_request(token: str, count: int) -> bytes:
    body = json.dumps({"events": [{"topic": "t", "payload": i} for i in range(count)]}).encode()
    return (f"POST {BATCH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# The fan-out back-pressure at its tightest: a frame queued holds the publisher, one connection
# written per loop iteration, so a batch waits for room between its events.
_HELD = {"RT_FLUSH_CHUNK": "1", "RT_FANOUT_BACKLOG": "1", "RT_FANOUT_BACKLOG_PER_CONNECTION": "0"}


async def test_a_batch_waits_for_room_between_its_events_and_ends_without_its_publisher(gateway_factory):
    """Under back-pressure a batch is paced as single publishes are (it waits for room), and
    a publisher that disconnects in the middle does not cut it short: it was published in
    part, the events after the disconnect lost."""
    gw = await gateway_factory(env=_HELD)
    count = 3000
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("events:*")
        _, before = await gw.get("/metrics")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_batch_request(gw.token("w1", publish=True), count))
        got = [await c.recv_event() for _ in range(50)]
        writer.transport.abort()
        got += [await c.recv_event(timeout=10) for _ in range(count - 50)]
        assert [e["payload"] for e in got] == list(range(count))
        await c.no_message()
    _, after = await gw.get("/metrics")
    waits = [int(next(ln for ln in m.decode().splitlines() if ln.startswith("rt_publisher_waits_total ")).split()[1])
             for m in (before, after)]
    assert waits[1] - waits[0] >= 50, waits
    assert '"level":"error"' not in gw.logs()


async def test_a_batch_cut_short_by_a_drain_says_which_events_were_published(gateway_factory):
    """SIGTERM while a batch waits for room: its events not yet published are not (the
    subscribers are closed with 1001, the history ends with the process), and the answer, a
    503, names each event's outcome, as a single publish arriving then is refused 503."""
    gw = await gateway_factory(env=_HELD)
    count = 3000
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("events:*")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(_batch_request(gw.token("w1", publish=True), count))
            got = [await c.recv_event() for _ in range(50)]
            gw.proc.send_signal(signal.SIGTERM)
            status, _, body = await read_answer(reader, 20)
        finally:
            writer.close()
        answer = json.loads(body)
        assert status == 503, answer
        outcomes = answer["events"]
        published = [o for o in outcomes if "seq" in o]
        assert len(outcomes) == count and 50 <= len(published) < count, answer["error"]
        assert outcomes[:len(published)] == published  # the published ones first, in order
        assert {(o["status"], o["error"]) for o in outcomes[len(published):]} == {
            (503, "not published: the gateway is shutting down")}
        assert answer["error"].startswith(f"{count - len(published)} of the batch's {count} events"), answer["error"]
        with contextlib.suppress(websockets.ConnectionClosed):  # until its close (1001)
            while True:
                message = await c.recv(timeout=10)
                if message.get("type") == "event":
                    got.append(message)
        # What reached the subscriber before its close: published events only, in order.
        assert [e["payload"] for e in got] == list(range(len(got))) and len(got) <= len(published)
    assert await asyncio.wait_for(gw.proc.wait(), 15) == 0, gw.logs()  # the drain ends by itself


async def test_a_batch_payload_nests_three_levels_less_than_a_single_body_at_least(gateway):
    """docs/protocol.md §8: a payload may nest three levels less deep than a single publish's
    body may (the batch's object, array and event count against the same bound: Python's
    recursion limit, whose room left also varies by a level or two with how deep in the
    gateway's calls the request is decoded); deeper than the single body's bound it is 400."""
    def nest(depth: int) -> bytes:
        return b"[" * depth + b"1" + b"]" * depth

    async def single(depth: int) -> int:
        return (await gateway.post("/workspaces/w1/realtime/events/deep", nest(depth), _auth(gateway)))[0]

    low, high = 1, 4000  # single(low) takes it, single(high) does not
    assert await single(low) == 202 and await single(high) == 400
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if await single(mid) == 202 else (low, mid)

    async def batch(depth: int) -> tuple[int, bytes]:
        body = b'{"events": [{"topic": "deep", "payload": ' + nest(depth) + b"}]}"
        return await gateway.post(BATCH, body, _auth(gateway))

    status, out = await batch(low - 3)
    assert status == 202, (low, out)
    status, out = await batch(low + 1)
    assert status == 400 and "nests too deeply" in json.loads(out)["error"], (low, out)
