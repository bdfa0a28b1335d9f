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
