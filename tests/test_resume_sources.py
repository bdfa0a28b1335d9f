"""One cursor for every source (issue: resumable sessions): PostgreSQL rows, MongoDB documents
and custom events missed while disconnected come back in one `seq` order on resume."""

from __future__ import annotations

import asyncpg
import pytest
from pymongo import AsyncMongoClient

from tests.harness.wsclient import ws_connect

pytestmark = pytest.mark.postgres


async def test_resume_replays_all_sources_in_one_order(gateway_factory, pg_database, mongo_server):
    pg = await asyncpg.connect(pg_database)
    await pg.execute("CREATE TABLE products (id int PRIMARY KEY, price int)")
    mongo = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    mdb = mongo["w1"]
    await mdb.orders.insert_one({"_id": "seed"})
    try:
        gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_MONGO_URL": mongo_server.url,
                                        "RT_INSTANCE": "resume"})
        token = gw.token("w1")
        async with ws_connect(gw, "w1", token=token) as c:
            await c.send({"type": "auth", "token": token})
            session = (await c.recv_type("auth_ok"))["sessionId"]
            # The first connection to w1 starts its MongoDB feed (the URL names no database: the
            # workspace's own); subscribe once every feed streams.
            await gw.wait_ready()
            for channel in ("postgres:products", "mongo:orders", "events:x"):
                await c.send({"type": "subscribe", "channel": channel})
                reply = await c.recv(timeout=15)
                assert reply["type"] == "subscribed", reply
            out = await gw.publish("w1", "x", {"n": 0})
            last = (await c.recv_event())["seq"]
            assert last == out["seq"]
        # disconnected: changes on all three sources, interleaved
        await pg.execute("INSERT INTO products VALUES (1, 10)")
        await mdb.orders.insert_one({"_id": 1, "total": 5})
        await gw.publish("w1", "x", {"n": 1})
        await pg.execute("UPDATE products SET price = 20 WHERE id = 1")
        await mdb.orders.delete_one({"_id": 1})
        expected = {("postgres:products", "INSERT"), ("mongo:orders", "INSERT"), ("events:x", "PUBLISH"),
                    ("postgres:products", "UPDATE"), ("mongo:orders", "DELETE")}
        async with ws_connect(gw, "w1") as c:
            ok = await c.auth(token, resume=session, since=last)
            assert ok["resumed"] is True
            got = [await c.recv_event(timeout=10) for _ in range(5)]
            await c.no_message(0.5)
        assert {(e["channel"], e["operation"]) for e in got} == expected
        seqs = [e["seq"] for e in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == 5 and seqs[0] > last
        # each source's own order is kept
        pg_ops = [e["operation"] for e in got if e["channel"] == "postgres:products"]
        mongo_ops = [e["operation"] for e in got if e["channel"] == "mongo:orders"]
        assert pg_ops == ["INSERT", "UPDATE"] and mongo_ops == ["INSERT", "DELETE"]
    finally:
        await pg.close()
        await mongo.close()


async def test_a_resumed_table_the_new_configuration_no_longer_publishes_is_refused(gateway_factory, pg_database):
    """A session suspended by a drained restart keeps its channels; a table the new
    configuration leaves out of postgres.tables is unavailable (§4: 4010), as a subscribe to it
    is. Only a source gone altogether was refused: such a table's subscription was restored
    without a word, and the client waited for rows the gateway no longer streams."""
    pg = await asyncpg.connect(pg_database)
    await pg.execute("CREATE TABLE products (id int PRIMARY KEY, price int)")
    await pg.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    try:
        gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "narrowed"})
        token = gw.token("w1")
        async with ws_connect(gw, "w1", token=token) as c:
            await gw.wait_ready()
            for channel in ("postgres:products", "postgres:orders"):
                await c.send({"type": "subscribe", "channel": channel})
                assert (await c.recv(timeout=15))["type"] == "subscribed"
            await c.send({"type": "auth", "token": token})
            session = (await c.recv_type("auth_ok"))["sessionId"]
        gw.env["RT_POSTGRES_TABLES"] = "public.orders"
        await gw.restart()
        async with ws_connect(gw, "w1") as c:
            assert (await c.auth(token, resume=session))["resumed"] is True
            refused = await c.recv_type("error")
            assert (refused["code"], refused["channel"]) == (4010, "postgres:products"), refused
            assert "postgres.tables" in refused["message"]
            assert (await c.recv_type("error"))["code"] == 4011  # postgres:orders: from before the restart
            await gw.wait_ready()
            await pg.execute("INSERT INTO orders VALUES (1)")
            event = await c.recv_event(timeout=10)
            assert (event["channel"], event["operation"]) == ("postgres:orders", "INSERT")
    finally:
        await pg.close()


async def test_a_session_of_an_earlier_version_with_both_spellings_of_a_table_tells_the_one_dropped(
        gateway_factory, pg_database, tmp_path):
    """Versions before 30 Nov 2026 kept `postgres:orders` and `postgres:public.orders` as two
    subscriptions, each with its filter, and saved both at a drained restart (sessions.json as
    the 29 Nov version wrote it). This version has one subscription per table: restored, the
    earlier one was replaced without a word, and the client waited for events its filter would
    have matched. It is now dropped with an error naming it (4000, as a subscription a restored
    session cannot keep), and the other goes on with its filter."""
    import json
    import time

    pg = await asyncpg.connect(pg_database)
    await pg.execute("CREATE TABLE orders (id int PRIMARY KEY, kind text)")
    state = tmp_path / "state"
    state.mkdir()
    (state / "sessions.json").write_text(json.dumps({"version": 1, "sessions": [{
        "id": "pbQVuk7VdGeFQQbzjY_LQp5_", "subject": "user-1", "workspace": "w1", "lastSeq": 1,
        "expiresAt": time.time() + 60, "subscriptions": [
            {"channel": "postgres:orders", "filter": {"predicates": {"kind": "a"}}},
            {"channel": "postgres:public.orders", "filter": {"predicates": {"kind": "b"}}}]}]}))
    try:
        gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "earlier"},
                                   state_dir=str(state))
        await gw.wait_ready()
        async with ws_connect(gw, "w1") as c:
            ok = await c.auth(gw.token("w1"), resume="pbQVuk7VdGeFQQbzjY_LQp5_")
            assert ok["resumed"] is True
            await pg.execute("INSERT INTO orders VALUES (0, 'b')")  # the errors come before it
            errors = []
            while (msg := await c.recv(timeout=10))["type"] == "error":
                errors.append(msg)
            assert msg["record"]["id"] == 0, msg
            dropped = [(e["code"], e["channel"]) for e in errors if e["name"] != "history_gap"]
            assert dropped == [(4000, "postgres:orders")], errors
            assert "postgres:public.orders" in errors[0]["message"] or "postgres:public.orders" in errors[-1]["message"]
            await pg.execute("INSERT INTO orders VALUES (1, 'a'), (2, 'b')")
            event = await c.recv_event(timeout=10)
            assert event["record"]["id"] == 2, event  # row 1 ('a') matched the dropped filter only
            await c.no_message(0.5)
    finally:
        await pg.close()
