"""PostgreSQL changes through the whole gateway: subscribe over WebSocket, write with asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import asyncpg
import pytest

from tests.harness.wsclient import ws_connect

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pg_gateway(gateway_factory, pg_database):
    conn = await asyncpg.connect(pg_database)
    await conn.execute("CREATE TABLE products (id int PRIMARY KEY, name text, category text, price numeric(10,2))")
    await conn.execute("ALTER TABLE products REPLICA IDENTITY FULL")
    gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "e2e"})
    await gw.wait_ready()
    yield gw, conn
    await conn.close()


async def _subscribe(c, channel, **extra):
    await c.send({"type": "subscribe", "channel": channel, **extra})
    return await c.recv(timeout=15)


async def _handled(gw, transactions: int) -> None:
    """Wait until the gateway has handled `transactions` transactions of the database: a row
    written before a subscribe that reached the gateway after it (a slow run) was taken for
    one of the changes the test makes next."""
    for _ in range(400):
        _, body = await gw.get("/readyz")
        if any(src.get("kind") == "postgres" and src["transactions"] >= transactions
               for src in json.loads(body)["sources"].values()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway has not handled {transactions} transactions: {body!r}")


async def test_insert_update_delete_reach_subscriber(pg_gateway):
    gw, db = pg_gateway
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        assert (await _subscribe(c, "postgres:products"))["type"] == "subscribed"
        await db.execute("INSERT INTO products VALUES (1, 'New Product', 'electronics', 29.99)")
        ev = await c.recv_event(timeout=10)
        assert ev["channel"] == "postgres:products" and ev["operation"] == "INSERT"
        assert ev["record"] == {"id": 1, "name": "New Product", "category": "electronics", "price": 29.99}
        await db.execute("UPDATE products SET price = 99.99 WHERE id = 1")
        ev = await c.recv_event(timeout=10)
        assert ev["oldRecord"]["price"] == 29.99 and ev["changedColumns"] == ["price"]
        assert isinstance(ev["seq"], int)


async def test_unknown_table_is_4010(pg_gateway):
    gw, _ = pg_gateway
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        reply = await _subscribe(c, "postgres:nosuch")
        assert reply["type"] == "error" and reply["code"] == 4010


async def test_subscribes_to_no_table_count_as_invalid_messages(pg_gateway):
    # Each costs a catalog query on the connection genuine subscribes share (behind one lock),
    # and a 4010 was not counted as invalid: a client could repeat it at will (bounds audit).
    # A refusal that costs no lookup (a table outside the configured schemas) is not counted.
    gw, _ = pg_gateway
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        for i in range(25):
            reply = await _subscribe(c, "postgres:pg_catalog.pg_class", id=i)
            assert (reply["type"], reply["code"]) == ("error", 4010), reply
        for i in range(20):
            reply = await _subscribe(c, f"postgres:nosuch{i}", id=i)
            assert (reply["type"], reply["code"], reply["id"]) == ("error", 4010, i), reply
            assert "does not exist" in reply["message"]
        assert await c.expect_close() == (1008, "policy_violation")
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:  # another connection's count is its own
        assert (await c.subscribe("postgres:products"))["type"] == "subscribed"


async def test_quoted_table_names_are_channels(pg_gateway):
    """Tables whose names need quoting in SQL (hyphens, spaces, non-ASCII letters, capitals)
    stream on postgres:* and are channels of their own too: before, `postgres:order-items` was
    refused as malformed (4010) though its events flowed under that channel name."""
    gw, db = pg_gateway
    names = ["order-items", "produits été", "Mixed"]
    for name in names:
        await db.execute(f'CREATE TABLE "{name}" (id int PRIMARY KEY)')
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        for name in names:
            reply = await _subscribe(c, f"postgres:{name}")
            assert reply["type"] == "subscribed", reply
        for bad in ['postgres:a"b', "postgres:" + "é" * 32, "postgres:x\ty"]:
            reply = await _subscribe(c, bad)
            assert (reply["type"], reply["code"]) == ("error", 4010), reply
        for i, name in enumerate(names):
            await db.execute(f'INSERT INTO "{name}" VALUES ({i})')
            ev = await c.recv_event(timeout=10)
            assert (ev["channel"], ev["table"], ev["record"]) == (f"postgres:{name}", name, {"id": i})


async def test_filters_on_record(pg_gateway):
    gw, db = pg_gateway
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await _subscribe(c, "postgres:*", filter={"operations": ["INSERT"], "entity": "products",
                                                  "predicates": {"category": "electronics", "price": {"$gte": 100}}})
        await db.execute("INSERT INTO products VALUES (1, 'cheap', 'electronics', 5)")
        await db.execute("INSERT INTO products VALUES (2, 'other', 'food', 500)")
        await db.execute("UPDATE products SET price = 200 WHERE id = 1")
        await db.execute("INSERT INTO products VALUES (3, 'tv', 'electronics', 999)")
        ev = await c.recv_event(timeout=10)
        assert ev["record"]["id"] == 3


async def test_gateway_killed_mid_stream_nothing_lost_nothing_duplicated(pg_gateway):
    gw, db = pg_gateway
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await _subscribe(c, "postgres:products")
        await db.execute("INSERT INTO products VALUES (1, 'a', 'x', 1)")
        first = await c.recv_event(timeout=10)
    await gw.stop(signal.SIGKILL)
    await db.execute("INSERT INTO products VALUES (2, 'b', 'x', 2)")
    await gw.restart()
    await gw.wait_ready()
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await _subscribe(c, "postgres:products", since=first["seq"])
        await db.execute("INSERT INTO products VALUES (3, 'c', 'x', 3)")
        seen, got = [], []
        while len(seen) < 2:
            try:
                ev = await c.recv(timeout=10)
            except TimeoutError:  # say what came (it failed once, in a loaded run, with nothing said)
                _, ready = await gw.get("/readyz")
                raise AssertionError(f"no message for 10 s after {got}; /readyz: {ready.decode()}") from None
            got.append(ev)
            if ev["type"] == "event":
                seen.append(ev["record"]["id"])
        assert seen == [2, 3], got


async def test_transitions_enter_and_leave(pg_gateway):
    """With "transitions": true, an UPDATE that takes a row out of the filter arrives as a
    `leave`, one that brings it in as an `enter` (REPLICA IDENTITY FULL gives the old row)."""
    gw, db = pg_gateway
    await db.execute("INSERT INTO products VALUES (1, 'tv', 'electronics', 150)")
    await _handled(gw, 1)
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c, ws_connect(gw, "w1", token=gw.token("w1")) as plain:
        f = {"predicates": {"price": {"$gte": 100}}}
        assert (await _subscribe(c, "postgres:products", filter={**f, "transitions": True}))["type"] == "subscribed"
        assert (await _subscribe(plain, "postgres:products", filter=f))["type"] == "subscribed"
        await db.execute("UPDATE products SET price = 120 WHERE id = 1")  # stays in
        await db.execute("UPDATE products SET price = 50 WHERE id = 1")  # leaves
        await db.execute("UPDATE products SET price = 60 WHERE id = 1")  # stays out
        await db.execute("UPDATE products SET price = 500 WHERE id = 1")  # enters
        got = [await c.recv_event(timeout=10) for _ in range(3)]
        assert [(e["record"]["price"], e.get("transition")) for e in got] == [(120, None), (50, "leave"), (500, "enter")]
        assert got[1]["oldRecord"]["price"] == 120
        plain_got = [await plain.recv_event(timeout=10) for _ in range(2)]
        assert [e["record"]["price"] for e in plain_got] == [120, 500]
        assert all("transition" not in e for e in plain_got)
        await c.no_message()


async def test_a_public_table_is_one_channel_in_either_spelling(pg_gateway):
    """`postgres:products` and `postgres:public.products` name one channel (§4), and a
    connection holds one subscription per channel (§3): subscribing in the other spelling
    replaces the filter, and unsubscribing in either ends it. Before, each spelling was a
    subscription of its own: the client got `unsubscribed` and the table's events went on."""
    gw, db = pg_gateway
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        await c.subscribe("events:marker")
        reply = await _subscribe(c, "postgres:products", filter={"predicates": {"category": "food"}})
        assert reply["type"] == "subscribed", reply
        reply = await _subscribe(c, "postgres:public.products", filter={"predicates": {"category": "toys"}})
        assert (reply["type"], reply["channel"]) == ("subscribed", "postgres:public.products"), reply
        await db.execute("INSERT INTO products VALUES (1, 'bread', 'food', 2)")
        await db.execute("INSERT INTO products VALUES (2, 'ball', 'toys', 5)")
        ev = await c.recv_event(timeout=10)
        assert ev["record"]["id"] == 2, ev  # the food filter was replaced
        await c.send({"type": "unsubscribe", "channel": "postgres:products", "id": "u"})
        assert await c.recv() == {"type": "unsubscribed", "channel": "postgres:products", "id": "u"}
        await db.execute("INSERT INTO products VALUES (3, 'kite', 'toys', 9)")
        await _handled(gw, 3)
        await gw.publish("w1", "marker", {})
        ev = await c.recv_event(timeout=10)
        assert ev["channel"] == "events:marker", ev  # nothing of the unsubscribed table before it


async def test_one_event_once_per_connection_whatever_its_subscriptions_say(pg_gateway):
    """One connection, a transitions subscription on the table and a plain one on postgres:*
    with the same filter: an UPDATE that enters arrives once, as `enter`; with the plain one
    unfiltered, an UPDATE that leaves the filter arrives once, plain (the row is still in view)."""
    gw, db = pg_gateway
    await db.execute("INSERT INTO products VALUES (1, 'tv', 'electronics', 50)")
    await _handled(gw, 1)
    f = {"predicates": {"price": {"$gte": 100}}}
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        assert (await _subscribe(c, "postgres:products", filter={**f, "transitions": True}))["type"] == "subscribed"
        assert (await _subscribe(c, "postgres:*", filter=f))["type"] == "subscribed"
        await db.execute("UPDATE products SET price = 150 WHERE id = 1")  # enters
        ev = await c.recv_event(timeout=10)
        assert (ev["record"]["price"], ev.get("transition")) == (150, "enter")
        await c.no_message(0.5)
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        assert (await _subscribe(c, "postgres:products", filter={**f, "transitions": True}))["type"] == "subscribed"
        assert (await _subscribe(c, "postgres:*"))["type"] == "subscribed"
        await db.execute("UPDATE products SET price = 20 WHERE id = 1")  # leaves the filter
        ev = await c.recv_event(timeout=10)
        assert ev["record"]["price"] == 20 and "transition" not in ev
        await c.no_message(0.5)


async def test_replay_shows_transitions_as_the_live_path_does(pg_gateway):
    """A subscriber that catches up with `since` (or a resume) gets the same enter/leave as it
    would have live: a replay that dropped the leave would keep a stale row in its view."""
    gw, db = pg_gateway
    await db.execute("INSERT INTO products VALUES (1, 'tv', 'electronics', 150)")
    await _handled(gw, 1)
    f = {"predicates": {"price": {"$gte": 100}}, "transitions": True}
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        assert (await _subscribe(c, "postgres:products", filter=f))["type"] == "subscribed"
        await db.execute("UPDATE products SET price = 120 WHERE id = 1")  # stays in
        since = (await c.recv_event(timeout=10))["seq"]
    async with ws_connect(gw, "w1", token=gw.token("w1")) as watcher:
        assert (await _subscribe(watcher, "postgres:products"))["type"] == "subscribed"
        await db.execute("UPDATE products SET price = 50 WHERE id = 1")  # leaves
        await db.execute("UPDATE products SET price = 60 WHERE id = 1")  # stays out
        await db.execute("UPDATE products SET price = 500 WHERE id = 1")  # enters
        await db.execute("UPDATE products SET price = 510 WHERE id = 1")  # stays in
        for _ in range(4):  # all four in the history
            await watcher.recv_event(timeout=10)
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        assert (await _subscribe(c, "postgres:products", filter=f, since=since))["type"] == "subscribed"
        got = [await c.recv_event(timeout=10) for _ in range(3)]
        assert [(e["record"]["price"], e.get("transition")) for e in got] == [(50, "leave"), (500, "enter"), (510, None)]
        await c.no_message(0.5)


async def test_key_change_under_default_identity_is_no_transition(pg_gateway):
    """REPLICA IDENTITY DEFAULT: an UPDATE of the key sends only the old key; the row matched
    before and after, so no "enter" (the key alone was taken for the old row and did not match)."""
    gw, db = pg_gateway
    await db.execute("CREATE TABLE accounts (id int PRIMARY KEY, status text)")
    async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
        f = {"predicates": {"status": "active"}, "transitions": True}
        assert (await _subscribe(c, "postgres:accounts", filter=f))["type"] == "subscribed"
        await db.execute("INSERT INTO accounts VALUES (1, 'active')")
        assert (await c.recv_event(timeout=10))["operation"] == "INSERT"
        await db.execute("UPDATE accounts SET id = 10 WHERE id = 1")
        ev = await c.recv_event(timeout=10)
        assert ev["record"] == {"id": 10, "status": "active"} and ev["oldRecord"] == {"id": 1}
        assert "transition" not in ev


async def test_a_reported_loss_reaches_readers_that_come_back_later(pg_gateway):
    """A source's loss (here rows written to a table before the gateway's publication held it)
    is told to a session resumed or a `since` from before it, on that source's channels only,
    not only to the subscribers connected at that moment: before, a session resumed afterwards
    got its events as if nothing was missing."""
    gw, db = pg_gateway
    token = gw.token("w1")
    async with ws_connect(gw, "w1", token=token) as c:
        await c.subscribe("postgres:products")
        await c.subscribe("events:t")
        await c.send({"type": "auth", "token": token})
        session = (await c.recv_type("auth_ok"))["sessionId"]
        await db.execute("INSERT INTO products VALUES (1, 'a', 'x', 1)")
        before = (await c.recv_event(timeout=10))["seq"]
    # Disconnected: a new table is written before the publication holds it, then a subscriber
    # makes the gateway add it (the periodic sync would too): its rows are lost.
    # One transaction: the periodic publication sync (every 2 s) could otherwise add the
    # table between the two, and the row was captured (no loss to tell).
    await db.execute("CREATE TABLE fresh (id int PRIMARY KEY); INSERT INTO fresh VALUES (1)")
    async with ws_connect(gw, "w1", token=token) as other:
        await other.subscribe("postgres:fresh")  # answered after the sync that finds the loss
        await other.subscribe("postgres:products")
        await db.execute("INSERT INTO products VALUES (2, 'b', 'x', 2)")
        # In the gateway before the publish below, so the replay's order is known.
        assert (await other.recv_event(timeout=10))["record"]["id"] == 2
    out = await gw.publish("w1", "t", {"n": 1})
    async with ws_connect(gw, "w1") as c:
        ok = await c.auth(token, resume=session, since=before)
        assert ok["resumed"] is True
        gap = await c.recv_type("error", timeout=10)
        assert gap["code"] == 4011 and gap["channel"] == "postgres:products"  # not events:t
        got = [await c.recv_event(timeout=10) for _ in range(2)]
        assert [(e["channel"], e["seq"] > before) for e in got] == [("postgres:products", True), ("events:t", True)]
        assert got[0]["record"]["id"] == 2 and got[1]["seq"] == out["seq"]
        await c.no_message(0.3)
    async with ws_connect(gw, "w1", token=token) as c:
        # From a position after the loss: nothing missed, no gap.
        await c.send({"type": "subscribe", "channel": "postgres:products", "since": got[0]["seq"] - 1})
        await c.recv_type("subscribed")
        assert (await c.recv_event(timeout=10))["record"]["id"] == 2
        await c.no_message(0.3)


async def test_truncate_reaches_filtered_subscriptions(pg_gateway):
    """A TRUNCATE (record null) empties the table, so it reaches every subscription of the table
    whose operations take it, whatever the predicates, once per connection, live and in a
    replay: before, the index evaluated `{"category": "electronics"}` on a row without fields
    and a client's filtered view silently kept the rows of an emptied table."""
    gw, db = pg_gateway
    token = gw.token("w1")
    await db.execute("INSERT INTO products VALUES (1, 'tv', 'electronics', 150)")
    await _handled(gw, 1)
    async with ws_connect(gw, "w1", token=token) as c, ws_connect(gw, "w1", token=token) as other:
        assert (await _subscribe(c, "postgres:products", filter={"predicates": {"category": "electronics"}}))["type"] == "subscribed"
        assert (await _subscribe(c, "postgres:*", filter={"predicates": {"price": {"$gt": 1000}}}))["type"] == "subscribed"
        # Not for it: other operations only.
        assert (await _subscribe(other, "postgres:products", filter={"operations": ["INSERT"], "predicates": {"category": "electronics"}}))["type"] == "subscribed"
        assert (await _subscribe(other, "postgres:*", filter={"operations": ["DELETE"]}))["type"] == "subscribed"
        await db.execute("INSERT INTO products VALUES (2, 'radio', 'electronics', 20)")
        inserted = await c.recv_event(timeout=10)
        assert (await other.recv_event(timeout=10))["seq"] == inserted["seq"]
        await db.execute("TRUNCATE products")
        ev = await c.recv_event(timeout=10)
        assert (ev["operation"], ev["record"], ev["channel"]) == ("TRUNCATE", None, "postgres:products")
        await c.no_message(0.3)  # once per connection, though both subscriptions take it
        await other.no_message(0.3)
    async with ws_connect(gw, "w1", token=token) as c:
        await c.auth(token)
        await _subscribe(c, "postgres:products", filter={"predicates": {"category": "electronics"}}, since=inserted["seq"])
        replayed = await c.recv_event(timeout=10)
        assert (replayed["operation"], replayed["seq"]) == ("TRUNCATE", ev["seq"])
        await c.no_message(0.3)


async def test_a_subscribe_to_no_table_costs_no_publication_sync(pg_database, tmp_path, monkeypatch):
    """A subscribe to a table the publication lacks synced the publication first (a table
    created since the last sync): several catalog queries, under the lock every such subscribe
    waits on. 4010 is no invalid message (no 1008), so a client naming tables that do not exist
    made the gateway run that sync as often as it liked, and other clients' subscribes to new
    tables queued behind. A table outside the configured schemas now costs no query, a name
    that is no table one lookup; a table created since the last sync is still found."""
    from rtserver.app import Gateway
    from rtserver.sources.pg_catalog import Catalog
    from tests.test_churn import Addr, _cfg, _token

    syncs = [0]
    original = Catalog.sync_publication

    async def counting(self):
        # Not the maintenance's sync (every 2 s): a slow run saw one within the subscribes.
        if asyncio.current_task().get_coro().__qualname__ != "PostgresSource._maintenance":
            syncs[0] += 1
        return await original(self)

    monkeypatch.setattr(Catalog, "sync_publication", counting)
    db = await asyncpg.connect(pg_database)
    await db.execute("CREATE TABLE early (id int PRIMARY KEY)")
    gw = Gateway(_cfg(tmp_path, RT_POSTGRES_URL=pg_database, RT_INSTANCE="nosync"))
    await gw.start()
    try:
        async with ws_connect(Addr(gw), "w1", token=_token(["w1"], "u")) as c:
            assert (await _subscribe(c, "postgres:early"))["type"] == "subscribed"  # the source is up
            before = syncs[0]
            for i in range(10):  # fewer than limits.max_invalid_per_minute: each counts as invalid
                reply = await _subscribe(c, f"postgres:nosuch{i}", id=i)
                assert (reply["type"], reply["code"], reply["id"]) == ("error", 4010, i), reply
                assert "does not exist" in reply["message"]
            # A table outside the configured schemas is never published: nothing to sync either.
            for i in range(20):
                reply = await _subscribe(c, "postgres:pg_catalog.pg_class", id=i)
                assert (reply["type"], reply["code"], reply["id"]) == ("error", 4010, i), reply
                assert "not published" in reply["message"]
            assert syncs[0] == before
            await db.execute("CREATE TABLE late (id int PRIMARY KEY)")
            assert (await _subscribe(c, "postgres:late"))["type"] == "subscribed"
    finally:
        await db.close()
        await gw.shutdown()


async def _recv_ids(c, want: int) -> list[int]:
    seen = []
    while len(seen) < want:
        ev = await c.recv(timeout=15)
        if ev["type"] == "event":
            seen.append(ev["record"]["id"])
    return seen


async def test_databases_named_alike_on_two_servers_keep_their_own_positions(gateway_factory, pg_cluster, tmp_path):
    """Two workspaces on two PostgreSQL servers, each with a database `app`: their slots live on
    their own servers, but the position file was named by the slot alone, so both sources kept
    their position in one file. After a restart, source b read server a's (higher) LSN and
    dropped b's next change as already published: its subscriber got nothing."""
    from tests.harness.fixtures_postgres import databases_named_alike, put_wal_ahead

    async with databases_named_alike(pg_cluster, tmp_path) as (db_a, db_b, config):
        gw = await gateway_factory(args=["--config", str(config)])
        async with ws_connect(gw, "a", token=gw.token("a")) as ca, ws_connect(gw, "b", token=gw.token("b")) as cb:
            await gw.wait_ready()
            assert (await _subscribe(ca, "postgres:t"))["type"] == "subscribed"
            assert (await _subscribe(cb, "postgres:t"))["type"] == "subscribed"
            await db_b.execute("INSERT INTO t VALUES (1, 'b')")
            assert await _recv_ids(cb, 1) == [1]
            await put_wal_ahead(db_a)  # server a's positions above server b's
            assert await _recv_ids(ca, 3) == [-1, -1, 0]
        assert await db_a.fetchval("SELECT pg_current_wal_lsn()") > await db_b.fetchval("SELECT pg_current_wal_lsn()")
        await gw.restart()
        await gw.wait_ready()
        async with ws_connect(gw, "a", token=gw.token("a")) as ca, ws_connect(gw, "b", token=gw.token("b")) as cb:
            await _subscribe(ca, "postgres:t")
            await _subscribe(cb, "postgres:t")
            await db_b.execute("INSERT INTO t VALUES (2, 'b, after the restart')")
            await db_a.execute("INSERT INTO t VALUES (3, 'a, after the restart')")
            assert await _recv_ids(cb, 1) == [2]
            assert await _recv_ids(ca, 1) == [3]
        await gw.stop()


async def test_two_workspaces_of_one_database_both_get_its_changes(gateway_factory, pg_database, tmp_path):
    """Two [workspaces.*] sections with the same postgres_url share one source (one slot): it
    was made for the first workspace and fed that one only; the second's subscribers, accepted,
    got none of the database's changes."""
    db = await asyncpg.connect(pg_database)
    try:
        await db.execute("CREATE TABLE t (id int PRIMARY KEY)")
        config = tmp_path / "rt.toml"
        config.write_text(f"[workspaces.a]\npostgres_url = '{pg_database}'\n[workspaces.b]\npostgres_url = '{pg_database}'\n")
        gw = await gateway_factory(args=["--config", str(config)])
        await gw.wait_ready()
        async with ws_connect(gw, "a", token=gw.token("a")) as ca, ws_connect(gw, "b", token=gw.token("b")) as cb:
            assert (await _subscribe(ca, "postgres:t"))["type"] == "subscribed"
            assert (await _subscribe(cb, "postgres:t"))["type"] == "subscribed"
            await db.execute("INSERT INTO t VALUES (1)")
            assert await _recv_ids(ca, 1) == [1]
            assert await _recv_ids(cb, 1) == [1]
    finally:
        await db.close()



async def test_one_database_named_by_two_host_names_is_one_source_and_costs_no_workspace_its_events(
        gateway_factory, pg_database, tmp_path):
    """Two sections naming one database by URLs the configuration check cannot tell apart
    (`127.0.0.1` and `localhost`) made two sources on one slot and one publication: the second
    never streamed ("slot is active", its workspace's subscribes accepted and answered with
    nothing) and its publication sync took the first's tables out (a change of the first
    workspace written meanwhile was never sent). The second now stops before touching the
    publication, saying which URL holds the database; the workspace of the source that streams
    gets every change."""
    db = await asyncpg.connect(pg_database)
    try:
        await db.execute("CREATE SCHEMA a; CREATE SCHEMA b; CREATE TABLE a.t (id int PRIMARY KEY); "
                         "CREATE TABLE b.t (id int PRIMARY KEY)")
        alias = pg_database.replace("@127.0.0.1:", "@localhost:")
        assert alias != pg_database
        config = tmp_path / "rt.toml"
        config.write_text(f"[workspaces.ta]\npostgres_url = '{pg_database}'\npostgres_schemas = ['a']\n"
                          f"[workspaces.tb]\npostgres_url = '{alias}'\npostgres_schemas = ['b']\n")
        gw = await gateway_factory(args=["--config", str(config)])

        async def sources() -> dict:
            return json.loads((await gw.get("/readyz"))[1])["sources"]

        for _ in range(300):  # the source that connects first streams; the other is refused
            now = (await sources()).values()
            # ... and the rows below wait for the slot (made on this first start) to stream
            if any("another URL" in s["last_error"] for s in now) and any(s["ready"] for s in now):
                break
            await asyncio.sleep(0.1)
        refused = [name for name, s in (await sources()).items() if "another URL" in s["last_error"]]
        assert len(refused) == 1, await sources()
        workspace, schema = ("ta", "a") if "localhost" in refused[0] else ("tb", "b")
        async with ws_connect(gw, workspace, token=gw.token(workspace)) as c:
            assert (await _subscribe(c, f"postgres:{schema}.t"))["type"] == "subscribed"
            for i in range(5):
                await db.execute(f"INSERT INTO a.t VALUES ({i})")
                await db.execute(f"INSERT INTO b.t VALUES ({i})")
            assert await _recv_ids(c, 5) == list(range(5))
        published = {(r["schemaname"], r["tablename"]) for r in await db.fetch("SELECT * FROM pg_publication_tables")}
        assert published == {(schema, "t")}
    finally:
        await db.close()


async def test_a_4010_for_a_database_that_went_away_names_no_internals(gateway_factory):
    """A subscribe while the gateway cannot reach the database is 4010 "database unavailable",
    but its message carried the driver's error (here the database's name; with others hosts,
    ports and roles) to any client of the workspace. It now names the kind of error,
    as MongoDB's do; the source's own log and /readyz keep the details for the operator."""
    from tests.harness.fixtures_postgres import create_database
    from tests.harness.pgcluster import PgCluster

    cluster = PgCluster()
    cluster.init()
    cluster.start()
    try:
        dsn = create_database(cluster, "rt_gone")
        gw = await gateway_factory(env={"RT_POSTGRES_URL": dsn})
        await gw.wait_ready()
        admin = await asyncpg.connect(cluster.dsn_for("postgres"))
        try:
            await admin.execute("ALTER DATABASE rt_gone ALLOW_CONNECTIONS false")
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'rt_gone'")
        finally:
            await admin.close()
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
            for table in ("t", "u"):  # the catalog's connection closed, then its reconnection refused
                reply = await _subscribe(c, f"postgres:{table}")
                assert (reply["type"], reply["code"]) == ("error", 4010), reply
                assert "database unavailable" in reply["message"], reply
                assert "rt_gone" not in reply["message"] and str(cluster.port) not in reply["message"], reply
    finally:
        cluster.destroy()


async def test_postgres_public_star_is_no_channel_of_every_table(gateway_factory, pg_database):
    """`postgres:public.*` was read as the table `*` of schema public, whose canonical name `*`
    is the wildcard: the subscription took every table of every published schema. With channel
    permissions, a token granted `postgres:public.*` (a prefix pattern meant for schema public)
    was refused `postgres:billing.invoices` with 4003, yet received its rows through that
    channel. It is refused as a malformed channel now (4010), as other names that are no table."""
    async with public_star_token_client(gateway_factory, pg_database) as (db, c):
        reply = await _subscribe(c, "postgres:billing.invoices")
        assert (reply["type"], reply["code"]) == ("error", 4003), reply
        reply = await _subscribe(c, "postgres:public.*")
        assert (reply["type"], reply["code"], reply["channel"]) == ("error", 4010, "postgres:public.*"), reply
        assert (await _subscribe(c, "postgres:orders"))["type"] == "subscribed"
        await db.execute("INSERT INTO billing.invoices VALUES (1, 'not for this token')")
        await db.execute("INSERT INTO orders VALUES (1)")
        ev = await c.recv_event(timeout=10)
        assert (ev["channel"], ev["record"]) == ("postgres:orders", {"id": 1}), ev


@contextlib.asynccontextmanager
async def public_star_token_client(gateway_factory, pg_database):
    """(database connection, client) of a gateway publishing schemas public (`orders`) and
    billing (`invoices`, a `secret` column) with channel permissions on, the client's token
    granting `postgres:public.*` alone."""
    db = await asyncpg.connect(pg_database)
    try:
        await db.execute("CREATE TABLE orders (id int PRIMARY KEY)")
        await db.execute("CREATE SCHEMA billing")
        await db.execute("CREATE TABLE billing.invoices (id int PRIMARY KEY, secret text)")
        gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "e2e",
                                        "RT_POSTGRES_SCHEMAS": "public,billing",
                                        "RT_AUTH_CHANNEL_PERMISSIONS": "true"})
        await gw.wait_ready()
        token = gw.token("w1", realtime_channels=["postgres:public.*"])
        async with ws_connect(gw, "w1", token=token) as c:
            yield db, c
    finally:
        await db.close()


async def test_wal_level_not_logical_is_reported_and_fixing_it_needs_no_gateway_restart(gateway_factory):
    """docs/postgres.md: the gateway checks wal_level at start and reports `wal_level is
    'replica'` in /readyz and the log. An operator then sets wal_level = logical and restarts
    PostgreSQL, not the gateway: the feed's retry (every 10 s) finds it fixed and streams."""
    from tests.harness.fixtures_postgres import create_database
    from tests.harness.pgcluster import PgCluster

    cluster = PgCluster(settings={"wal_level": "replica"})
    cluster.init()
    cluster.start()
    try:
        dsn = create_database(cluster, "rt_replica")
        db = await asyncpg.connect(dsn)
        await db.execute("CREATE TABLE t (id int PRIMARY KEY)")
        await db.close()
        gw = await gateway_factory(env={"RT_POSTGRES_URL": dsn})
        for _ in range(200):
            status, body = await gw.get("/readyz")
            if b"wal_level" in body:
                break
            await asyncio.sleep(0.05)
        (source,) = json.loads(body)["sources"].values()
        assert status == 503 and not source["ready"], body
        assert "wal_level is 'replica'" in source["last_error"], source
        for _ in range(200):  # the log's writer thread may not have written it yet
            if "wal_level is 'replica'" in gw.logs():
                break
            await asyncio.sleep(0.05)
        assert "wal_level is 'replica'" in gw.logs()
        admin = await asyncpg.connect(cluster.dsn_for("postgres"))
        try:
            await admin.execute("ALTER SYSTEM SET wal_level = logical")
        finally:
            await admin.close()
        cluster.restart()
        await gw.wait_ready(timeout=60)
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
            assert (await _subscribe(c, "postgres:t"))["type"] == "subscribed"
            db = await asyncpg.connect(dsn)
            try:
                await db.execute("INSERT INTO t VALUES (1)")
            finally:
                await db.close()
            assert await _recv_ids(c, 1) == [1]
    finally:
        cluster.destroy()


async def test_a_workspace_section_naming_no_postgres_url_reads_no_default_database(gateway_factory, pg_database,
                                                                                      tmp_path):
    """README: a [workspaces.W] section replaces both defaults, so a source it does not name is
    not configured for W (its channels answer 4010): W never reads the default database by
    accident, while workspaces without a section do."""
    db = await asyncpg.connect(pg_database)
    try:
        await db.execute("CREATE TABLE t (id int PRIMARY KEY)")
        config = tmp_path / "rt.toml"
        config.write_text("[workspaces.acme]\nmongo_url = 'mongodb://127.0.0.1:9/acme?serverSelectionTimeoutMS=500'\n")
        gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database}, args=["--config", str(config)])
        # The node is never ready (acme's MongoDB does not answer): wait for the default database's
        # slot to stream, or the row below could be written before the slot was made on this first
        # start (the row never captured).
        for _ in range(400):
            sources = json.loads((await gw.get("/readyz"))[1])["sources"]
            if any(src.get("kind") == "postgres" and src["ready"] for src in sources.values()):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the default database does not stream: {sources}")
        async with ws_connect(gw, "acme", token=gw.token("acme")) as acme, \
                ws_connect(gw, "w1", token=gw.token("w1")) as other:
            for channel in ("postgres:t", "postgres:*"):
                reply = await _subscribe(acme, channel)
                assert (reply["type"], reply["code"]) == ("error", 4010), reply
                assert "postgres is not configured for workspace acme" in reply["message"], reply
            assert (await _subscribe(other, "postgres:t"))["type"] == "subscribed"
            await db.execute("INSERT INTO t VALUES (1)")
            assert await _recv_ids(other, 1) == [1]
    finally:
        await db.close()


async def test_truncate_of_two_tables_is_two_events_and_plain_to_a_transitions_subscription(pg_gateway):
    """docs/postgres.md: TRUNCATE a, b gives one event per table, with record null and no
    oldRecord; a subscription with "transitions": true gets it as a plain event (no
    `transition`), whatever its predicates, live and in a replay."""
    gw, db = pg_gateway
    await db.execute("CREATE TABLE tags (id int PRIMARY KEY, name text); ALTER TABLE tags REPLICA IDENTITY FULL")
    token = gw.token("w1")
    async with ws_connect(gw, "w1", token=token) as c:
        assert (await _subscribe(c, "postgres:tags"))["type"] == "subscribed"  # published now
        flt = {"predicates": {"price": {"$gte": 100}}, "transitions": True}
        assert (await _subscribe(c, "postgres:products", filter=flt))["type"] == "subscribed"
        await db.execute("INSERT INTO products VALUES (1, 'tv', 'electronics', 150)")
        first = await c.recv_event(timeout=10)
        await db.execute("TRUNCATE products, tags")
        got = [await c.recv_event(timeout=10) for _ in range(2)]
        await c.no_message(0.3)
    assert sorted(ev["channel"] for ev in got) == ["postgres:products", "postgres:tags"], got
    for ev in got:
        assert (ev["operation"], ev["record"]) == ("TRUNCATE", None), ev
        assert "oldRecord" not in ev and "transition" not in ev, ev
    async with ws_connect(gw, "w1", token=token) as c:
        flt = {"predicates": {"price": {"$gte": 100}}, "transitions": True}
        await _subscribe(c, "postgres:products", filter=flt, since=first["seq"])
        replayed = await c.recv_event(timeout=10)
        assert (replayed["operation"], replayed["record"]) == ("TRUNCATE", None) and "transition" not in replayed


async def test_a_row_committed_during_the_drain_reaches_clients_after_the_restart(gateway_factory, pg_database):
    """A drained stop (SIGTERM) closes every subscriber with 1001 at once, then waits for slow
    readers. The feed went on meanwhile: a row committed then was published to a history that
    ends with the process, for no one, and acknowledged to the slot, so the restarted gateway
    did not have it either: a client resuming got the history_gap and never the row (seen by
    test_chaos_restart: rows written in a drain were lost behind the gap). The sources stop
    first now, so such a row stays in the slot and comes after the restart."""
    from tests.test_lifecycle import _slow_subscriber

    db = await asyncpg.connect(pg_database)
    await db.execute("CREATE TABLE products (id int PRIMARY KEY, name text, category text, price numeric(10,2))")
    gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "drain",
                                    "RT_SHUTDOWN_TIMEOUT": "30", "RT_SEND_BUFFER_BYTES": str(32 << 20)})
    await gw.wait_ready()
    try:
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
            await _subscribe(c, "postgres:products")
            await db.execute("INSERT INTO products VALUES (1, 'a', 'x', 1)")
            last = (await c.recv_event(timeout=10))["seq"]
            slow = await _slow_subscriber(gw, 100)  # holds the drain open
            gw.proc.send_signal(signal.SIGTERM)
            assert await c.expect_close(timeout=15) == (1001, "going_away")
        await db.execute("INSERT INTO products VALUES (2, 'b', 'x', 2)")
        lsn = await db.fetchval("SELECT pg_current_wal_lsn()")
        # Either the feed has stopped (the slot is let go), or it has taken the row.
        for _ in range(300):
            active, flushed = await db.fetchrow(
                "SELECT active, confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name LIKE 'drain_%'",
                lsn)
            if not active or flushed:
                break
            await asyncio.sleep(0.05)
        slow.transport.abort()
        assert await asyncio.wait_for(gw.proc.wait(), 30) == 0
        await gw.restart()
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
            assert (await _subscribe(c, "postgres:products", since=last))["type"] == "subscribed"
            assert (await c.recv_type("error", timeout=10))["code"] == 4011  # the history is new
            await db.execute("INSERT INTO products VALUES (3, 'c', 'x', 3)")
            seen = [(await c.recv_event(timeout=15))["record"]["id"]]
            while seen[-1] != 3:
                seen.append((await c.recv_event(timeout=15))["record"]["id"])
            assert seen == [2, 3]
    finally:
        await db.close()


async def test_a_change_made_as_soon_as_subscribed_reaches_a_feed_making_its_slot(gateway_factory, pg_database):
    """A first start makes the replication slot, which waits for the transactions running then;
    a subscribe meanwhile was answered at once, and a row committed right after `subscribed`
    (before the slot's start) never came, with no history_gap. `subscribed` now comes once the
    slot exists (or 4010 after a few seconds), and every row committed after it arrives."""
    db = await asyncpg.connect(pg_database)
    other = await asyncpg.connect(pg_database)
    await db.execute("CREATE TABLE early (id int PRIMARY KEY)")
    held = other.transaction()
    await held.start()
    await other.execute("SELECT txid_current()")  # an xid: the slot's creation waits for its end

    async def end_held() -> None:
        await asyncio.sleep(1.5)
        await held.rollback()

    try:
        gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "e2e"})
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
            await c.send({"type": "subscribe", "channel": "postgres:*"})
            ending = asyncio.ensure_future(end_held())
            assert (await c.recv(timeout=15))["type"] == "subscribed"
            await db.execute("INSERT INTO early VALUES (1)")
            assert (await c.recv_event(timeout=15))["record"] == {"id": 1}
            await ending
    finally:
        await other.close()  # ends the transaction if the test failed before
        await db.close()
