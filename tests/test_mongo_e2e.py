"""MongoDB changes through the whole gateway: the gateway subprocess reads the MongoDB test
double with PyMongo, a WebSocket client subscribes, the test writes with PyMongo."""

from __future__ import annotations

import signal

import pytest
from pymongo import AsyncMongoClient

from tests.harness.wsclient import ws_connect


@pytest.fixture
async def mongo_gateway(mongo_server, gateway_factory):  # the gateway stops first
    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    db = client["w1"]  # RT_MONGO_URL names no database: workspace w1 reads database w1
    await db.orders.insert_one({"_id": "seed"})
    await db.customers.insert_one({"_id": "seed"})
    gw = await gateway_factory(env={"RT_MONGO_URL": mongo_server.url})
    yield gw, db
    await client.close()


async def _subscribe(c, channel, **extra):
    await c.send({"type": "subscribe", "channel": channel, **extra})
    return await c.recv()


async def test_operations_reach_subscriber_with_seed_shape(mongo_gateway):
    gw, db = mongo_gateway
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await gw.wait_ready()  # w1's feed starts with its first connection
        assert (await _subscribe(c, "mongo:orders"))["type"] == "subscribed"
        await db.orders.insert_one({"_id": 1, "orderId": "ORD-001", "total": 198.95})
        ev = await c.recv_event(timeout=10)
        assert ev["channel"] == "mongo:orders" and ev["operation"] == "INSERT" and ev["operationType"] == "insert"
        assert ev["collection"] == "orders"
        assert ev["document"] == {"_id": 1, "orderId": "ORD-001", "total": 198.95}
        assert isinstance(ev["seq"], int) and ev["timestamp"].endswith("Z") and ev["correlationId"]
        await db.orders.update_one({"_id": 1}, {"$set": {"total": 10}})
        ev = await c.recv_event(timeout=10)
        assert ev["operation"] == "UPDATE" and ev["document"]["total"] == 10
        assert ev["updateDescription"] == {"updatedFields": {"total": 10}, "removedFields": []}
        await db.orders.replace_one({"_id": 1}, {"orderId": "ORD-002"})
        assert (await c.recv_event(timeout=10))["operation"] == "REPLACE"
        await db.orders.delete_one({"_id": 1})
        ev = await c.recv_event(timeout=10)
        assert ev["operation"] == "DELETE" and ev["document"] == {"_id": 1}


async def test_star_channel_and_filters(mongo_gateway):
    gw, db = mongo_gateway
    async with ws_connect(gw, "w1", token=gw.token("w1")) as star, ws_connect(gw, "w1", token=gw.token("w1")) as named:
        await gw.wait_ready()
        await _subscribe(star, "mongo:*")
        await _subscribe(named, "mongo:orders", filter={"operations": ["INSERT"], "predicates": {"total": {"$gte": 100}}})
        await db.customers.insert_one({"_id": 1, "name": "Ada"})
        await db.orders.insert_one({"_id": 2, "total": 5})
        await db.orders.insert_one({"_id": 3, "total": 500})
        seen = [(e["channel"], e["document"]["_id"]) for e in [await star.recv_event(timeout=10) for _ in range(3)]]
        assert seen == [("mongo:customers", 1), ("mongo:orders", 2), ("mongo:orders", 3)]
        ev = await named.recv_event(timeout=10)
        assert ev["document"]["_id"] == 3
        await named.no_message(0.3)


async def test_unknown_collection_is_4010(mongo_gateway):
    gw, _ = mongo_gateway
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await gw.wait_ready()
        reply = await _subscribe(c, "mongo:nosuch")
        assert reply["type"] == "error" and reply["code"] == 4010


async def test_a_workspace_id_longer_than_a_mongodb_database_name_is_4010_not_a_node_down(mongo_gateway):
    """With a URL that names no database each workspace reads the database named like it, but a
    workspace id may have 64 characters and a MongoDB database name 63: its feed failed at every
    attempt, and /readyz said 503 for the whole node. Now its mongo channels are 4010, saying so."""
    gw, _ = mongo_gateway
    long_id = "w" * 64
    await _refused_with_the_node_ready(gw, long_id, "is longer than MongoDB takes")


async def _refused_with_the_node_ready(gw, workspace: str, why: str) -> None:
    """`workspace`'s mongo channels answer 4010 saying its database `why`, and the node stays
    ready (its feed, which could never open, is not started)."""
    async with ws_connect(gw, workspace, token=gw.token(workspace)) as c:
        await gw.wait_ready()
        for channel in ("mongo:orders", "mongo:*"):
            reply = await _subscribe(c, channel)
            assert (reply["type"], reply["code"], reply["channel"]) == ("error", 4010, channel), reply
            assert f"MongoDB database '{workspace}' (of workspace {workspace}) {why}" in reply["message"]
        status, body = await gw.get("/readyz")
        assert status == 200, body


async def test_workspace_databases_are_bounded_by_mongo_max_databases(mongo_server, gateway_factory, tmp_path):
    """With a URL that names no database any workspace a token grants opened a change stream
    and a client of its own (3 sockets at the gateway, 3 connections at the server), without
    bound: a token granting `*` could take the descriptors kept for the gateway's own use. Past
    mongo.max_databases a further workspace's mongo channels are 4010 naming the limit (logged
    once), the node stays ready, and those read keep streaming. The sockets of those it may
    read are kept out of the clients' share of the open-files limit."""
    from rtserver.app import Gateway
    from rtserver.config import load
    from rtserver.fd_limit import RESERVED, open_files_limit

    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    try:
        for ws in ("w1", "w2", "w3"):
            await client[ws].orders.insert_one({"_id": "seed"})
        gw = await gateway_factory(env={"RT_MONGO_URL": mongo_server.url, "RT_MONGO_MAX_DATABASES": "2"})
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c1, ws_connect(gw, "w2", token=gw.token("w2")) as c2:
            await gw.wait_ready()
            for c in (c1, c2):
                assert (await _subscribe(c, "mongo:orders"))["type"] == "subscribed"
            for _ in range(2):  # a second connection: refused again, logged once
                async with ws_connect(gw, "w3", token=gw.token("w3")) as c3:
                    for channel in ("mongo:orders", "mongo:*"):
                        reply = await _subscribe(c3, channel)
                        assert (reply["type"], reply["code"], reply["channel"]) == ("error", 4010, channel), reply
                        assert ("the database of workspace w3 is not read: this gateway reads 2 workspace databases "
                                "at most (mongo.max_databases, RT_MONGO_MAX_DATABASES), all in use") in reply["message"]
                    assert (await _subscribe(c3, "events:x"))["type"] == "subscribed"  # only mongo is refused
            status, body = await gw.get("/readyz")
            assert status == 200 and b"mongo:w3" not in body, body
            await client["w3"].orders.insert_one({"_id": 3})
            await client["w2"].orders.insert_one({"_id": 2})
            assert (await c2.recv_event(timeout=10))["document"] == {"_id": 2}
            await c1.no_message(0.3)
        assert gw.logs().count("mongo.max_databases reached") == 1, gw.logs()
    finally:
        await client.close()

    soft = open_files_limit()
    if soft < 0 or soft // 2 > soft - RESERVED - 300:
        pytest.skip(f"an open-files limit of {soft} leaves the share at half of it")
    per_workspace = Gateway(load(environ={"RT_MONGO_URL": mongo_server.url, "RT_MONGO_MAX_DATABASES": "100",
                                          "RT_STATE_DIR": str(tmp_path / "a")}))
    shared = Gateway(load(environ={"RT_MONGO_URL": mongo_server.url.replace("/?", "/shop?"),
                                   "RT_MONGO_MAX_DATABASES": "100", "RT_STATE_DIR": str(tmp_path / "b")}))
    assert shared.max_node_connections == soft - RESERVED
    assert per_workspace.max_node_connections == soft - RESERVED - 300
    assert per_workspace.max_client_sockets <= soft - RESERVED // 2 - 300


async def test_gateway_restart_resumes_from_saved_token(mongo_gateway):
    gw, db = mongo_gateway
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await gw.wait_ready()
        await _subscribe(c, "mongo:orders")
        await db.orders.insert_one({"_id": 1})
        first = await c.recv_event(timeout=10)
    await gw.stop(signal.SIGTERM)
    await db.orders.insert_one({"_id": 2})  # written while the gateway is down
    await gw.restart()
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await gw.wait_ready()
        await _subscribe(c, "mongo:orders", since=first["seq"])
        await db.orders.insert_one({"_id": 3})
        seen = []
        while len(seen) < 2:
            msg = await c.recv(timeout=10)
            if msg["type"] == "event":
                seen.append(msg["document"]["_id"])
        assert seen == [2, 3]
        await c.no_message(0.3)


async def test_any_collection_mongodb_allows_is_a_channel(mongo_gateway):
    """MongoDB names may hold spaces, non-ASCII letters, ':' or '@' (not '$' or NUL, not
    system.*): each such existing collection is a channel, and an entity filter, as every event
    of mongo:* names it; a name MongoDB refuses is still 4010."""
    gw, db = mongo_gateway
    names = ["order items", "café", "a:b@v2"]
    for name in names:
        await db[name].insert_one({"_id": "seed"})
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c, ws_connect(gw, "w1", token=gw.token("w1")) as star:
        await gw.wait_ready()
        for name in names:
            assert (await _subscribe(c, f"mongo:{name}"))["type"] == "subscribed", name
        assert (await _subscribe(star, "mongo:*", filter={"entity": "café"}))["type"] == "subscribed"
        for bad in ("a$b", "system.views"):
            assert (await _subscribe(c, f"mongo:{bad}"))["code"] == 4010, bad
        for i, name in enumerate(names):
            await db[name].insert_one({"_id": i})
        seen = [(e["channel"], e["document"]["_id"]) for e in [await c.recv_event(timeout=10) for _ in names]]
        assert seen == [(f"mongo:{name}", i) for i, name in enumerate(names)]
        assert (await star.recv_event(timeout=10))["channel"] == "mongo:café"
        await star.no_message(0.3)


async def test_two_workspaces_of_one_database_both_get_its_changes(mongo_server, gateway_factory, tmp_path):
    """Two [workspaces.*] sections with the same mongo_url (naming the database) share one
    source: it was made for the first workspace and fed that one only; the second's
    subscribers, accepted, got none of the database's changes."""
    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    try:
        db = client["shop"]
        await db.orders.insert_one({"_id": "seed"})
        url = mongo_server.url.replace("/?", "/shop?")
        config = tmp_path / "rt.toml"
        config.write_text(f"[workspaces.a]\nmongo_url = '{url}'\n[workspaces.b]\nmongo_url = '{url}'\n")
        gw = await gateway_factory(args=["--config", str(config)])
        async with ws_connect(gw, "a", token=gw.token("a")) as ca, ws_connect(gw, "b", token=gw.token("b")) as cb:
            await gw.wait_ready()
            assert (await _subscribe(ca, "mongo:orders"))["type"] == "subscribed"
            assert (await _subscribe(cb, "mongo:orders"))["type"] == "subscribed"
            await db.orders.insert_one({"_id": 1})
            for c in (ca, cb):
                assert (await c.recv_event(timeout=10))["document"] == {"_id": 1}
    finally:
        await client.close()


async def test_a_stop_with_mongodb_unreachable_stays_bounded_however_many_databases(mongo_server, gateway_factory,
                                                                                    tmp_path):
    """SIGTERM while the link to MongoDB is dead (bytes go nowhere, no reset): closing each
    database's client waits for MongoDB until its own timeout. The sources were stopped one
    after the other, so with a few workspaces the stop overran its deadline and the process
    was killed from within (exit 1, `did not stop cleanly`, the audit trail not flushed). They
    stop together now: exit 0 however many there are."""
    from tests.harness.tcpproxy import TcpProxy

    proxy = await TcpProxy(mongo_server.port).start()
    try:
        url = mongo_server.url.replace(f":{mongo_server.port}", f":{proxy.port}")
        names = [f"w{i}" for i in range(16)]  # each its own database: RT_MONGO_URL names none
        config = tmp_path / "rt.toml"
        config.write_text("".join(f"[workspaces.{w}]\nmongo_url = '{url}'\n" for w in names))
        gw = await gateway_factory(args=["--config", str(config)], env={"RT_SHUTDOWN_TIMEOUT": "2"})
        await gw.wait_ready()  # every database's stream is open
        proxy.frozen = True
        assert await gw.stop(timeout=60) == 0, gw.logs()
        assert "did not stop cleanly" not in gw.logs()
    finally:
        await proxy.close()


@pytest.mark.parametrize("workspace", ["admin", "config", "local"])
async def test_a_workspace_named_like_a_mongodb_internal_database_is_4010_not_a_node_down(mongo_gateway, workspace):
    """With a URL that names no database each workspace reads the database named like it, but
    MongoDB opens no change stream on its internal databases (admin, config, local): a client
    of a workspace so named made the node start a feed that failed at every attempt, and
    /readyz said 503 for the whole node (the load balancer took it out). Now its mongo channels
    are 4010, saying why, and the node stays ready."""
    gw, _ = mongo_gateway
    await _refused_with_the_node_ready(gw, workspace, "is internal to MongoDB")


async def test_a_change_made_as_soon_as_subscribed_reaches_a_feed_just_started(mongo_server, gateway_factory):
    """A workspace's first grant starts its change stream (mongo.url names no database), and a
    subscribe was answered at once: a change made right after `subscribed` but before the
    stream had opened (its aggregate held here) was never delivered, and no history_gap said
    so (black-box audit). `subscribed` now comes once the feed reads from a position, so
    whatever is made after it arrives, on `mongo:*` as on a named collection."""
    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    db = client["w1"]
    await db.orders.insert_one({"_id": "seed"})
    await client.admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1},
                                "data": {"failCommands": ["aggregate"], "blockConnection": True, "blockTimeMS": 1500}})
    gw = await gateway_factory(env={"RT_MONGO_URL": mongo_server.url})
    try:
        async with ws_connect(gw, "w1", token=gw.token("w1")) as star, \
                ws_connect(gw, "w1", token=gw.token("w1")) as named:
            await star.send({"type": "subscribe", "channel": "mongo:*"})
            await named.send({"type": "subscribe", "channel": "mongo:orders"})
            assert (await star.recv())["type"] == "subscribed"
            assert (await named.recv())["type"] == "subscribed"
            await db.orders.insert_one({"_id": "right-after"})
            for c in (star, named):
                ev = await c.recv_event(timeout=10)
                assert ev["document"] == {"_id": "right-after"}, ev
    finally:
        await client.close()


async def test_a_feed_that_cannot_start_refuses_a_subscribe_rather_than_miss_changes(mongo_server, gateway_factory):
    """A first start whose change stream the server refuses (no changeStream privilege: code 13)
    answered `subscribed`, and the changes made until the stream opened were lost untold. The
    subscribe is now refused with 4010 saying why, after POSITION_WAIT; once the stream opens,
    a new subscribe is answered and reads what follows."""
    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    db = client["w1"]
    await db.orders.insert_one({"_id": "seed"})
    await client.admin.command({"configureFailPoint": "failCommand", "mode": "alwaysOn",
                                "data": {"failCommands": ["aggregate"], "errorCode": 13, "errorLabels": []}})
    gw = await gateway_factory(env={"RT_MONGO_URL": mongo_server.url})
    try:
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
            await c.send({"type": "subscribe", "channel": "mongo:*", "id": "s1"})
            refused = await c.recv(timeout=15)
            assert refused["type"] == "error" and refused["code"] == 4010, refused
            assert refused["message"].startswith("mongo:*: the change feed of mongo database 'w1' has not started "
                                                 "reading yet"), refused
            await client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
            await c.send({"type": "subscribe", "channel": "mongo:orders", "id": "s2"})
            assert (await c.recv(timeout=30))["type"] == "subscribed"
            await db.orders.insert_one({"_id": "after"})
            assert (await c.recv_event(timeout=10))["document"] == {"_id": "after"}
    finally:
        await client.close()


async def test_a_workspace_whose_database_a_section_reads_by_another_url_is_4010(mongo_server, gateway_factory,
                                                                                 tmp_path):
    """mongo.url naming no database, and [workspaces.wx] reading database `shop` of the same
    deployment by another URL: accepted (it was a configuration error no URL could mend, as the
    default must name no database and the section must name `shop`), and a workspace `shop`,
    whose own database is that one, gets 4010 on its mongo channels rather than a second feed
    sharing the section's resume token file. wx reads shop."""
    config = tmp_path / "rt.toml"
    config.write_text(f"[workspaces.wx]\nmongo_url = '{mongo_server.url.replace('/?', '/shop?')}&appname=wx'\n")
    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    await client.shop.orders.insert_one({"_id": "seed"})
    gw = await gateway_factory(env={"RT_MONGO_URL": mongo_server.url}, args=["--config", str(config)])
    try:
        async with ws_connect(gw, "shop", token=gw.token("shop")) as shop, \
                ws_connect(gw, "wx", token=gw.token("wx")) as wx:
            refused = await _subscribe(shop, "mongo:orders")
            assert refused["type"] == "error" and refused["code"] == 4010, refused
            assert "is read for another workspace's [workspaces.*] section through another URL" in refused["message"], refused
            assert (await _subscribe(wx, "mongo:orders"))["type"] == "subscribed"
            await client.shop.orders.insert_one({"_id": 1})
            assert (await wx.recv_event(timeout=10))["document"] == {"_id": 1}
    finally:
        await client.close()


async def test_a_filtered_subscription_sees_a_matching_document_deleted_when_pre_images_are_on(mongo_gateway):
    """With pre-images, a DELETE is matched on the deleted document (as a PostgreSQL DELETE
    under REPLICA IDENTITY FULL): a client keeping the list of paid orders in view learns that
    one was deleted; an unpaid one's delete does not reach it. It got neither before."""
    gw, db = mongo_gateway
    await db.command({"collMod": "orders", "changeStreamPreAndPostImages": {"enabled": True}})
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        sub = await _subscribe(c, "mongo:orders", filter={"predicates": {"status": "paid"}})
        assert sub["type"] == "subscribed"
        await db.orders.insert_many([{"_id": 1, "status": "paid"}, {"_id": 2, "status": "open"}])
        assert [(await c.recv_event(timeout=10))["document"]["_id"]] == [1]
        await db.orders.delete_one({"_id": 2})
        await db.orders.delete_one({"_id": 1})
        ev = await c.recv_event(timeout=10)
        assert (ev["operation"], ev["document"], ev["oldDocument"]) == ("DELETE", {"_id": 1}, {"_id": 1, "status": "paid"})
