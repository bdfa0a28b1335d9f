"""MongoDB change-feed scenarios shared by the test-double suite (test_mongo_source.py) and the
real-MongoDB suite (test_mongo_real.py): each takes an `Env` and drives a real MongoSource
with a real PyMongo client, asserting on what reached the sink."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from bson import Decimal128, Int64, ObjectId
from bson.binary import Binary, UuidRepresentation
from pymongo import AsyncMongoClient

from rtserver.sources.base import ChannelUnavailable
from rtserver.sources.mongo import MongoSource

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@dataclass
class Env:
    url: str
    database: str
    state_dir: str
    sink: Any  # tests.harness.fixtures_mongo.CollectingSink
    server: Any = None  # the test double's control API; None against a real MongoDB
    workspaces: list[str] = field(default_factory=lambda: ["w1"])


def make_source(env: Env, **options: Any) -> MongoSource:
    return MongoSource(env.url, database=env.database, state_dir=env.state_dir, sink=env.sink,
                       workspaces=lambda: list(env.workspaces), max_await_ms=100, retry_max_seconds=0.5, **options)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(env: Env, **options: Any) -> AsyncIterator[MongoSource]:
    source = make_source(env, **options)
    await source.start()
    try:
        await wait_until(source.ready, what="the change stream to open")
        yield source
    finally:
        await source.stop()


@asynccontextmanager
async def client(env: Env) -> AsyncIterator[Any]:
    c: AsyncMongoClient[Any] = AsyncMongoClient(env.url, serverSelectionTimeoutMS=5000)
    try:
        yield c[env.database]
    finally:
        await c.close()


async def settle(env: Env, count: int, quiet: float = 0.4) -> list[dict[str, Any]]:
    """Wait for `count` events, then a quiet spell; return all bodies (to catch extras)."""
    await env.sink.wait_for(count)
    await asyncio.sleep(quiet)
    return env.sink.bodies()


# ---- scenarios ------------------------------------------------------------------------------


async def operations_have_the_seed_shape(env: Env) -> None:
    async with running(env), client(env) as db:
        await db.orders.insert_one({"_id": 1, "orderId": "ORD-001", "total": 198.95, "status": "new"})
        await db.orders.update_one({"_id": 1}, {"$set": {"status": "paid"}, "$unset": {"total": ""}})
        await env.sink.wait_for(2)  # updateLookup reads at stream time: let it see this version
        await db.orders.replace_one({"_id": 1}, {"orderId": "ORD-001", "total": 10})
        await db.orders.delete_one({"_id": 1})
        bodies = await settle(env, 4)
    assert [b["operation"] for b in bodies] == ["INSERT", "UPDATE", "REPLACE", "DELETE"]
    assert [b["operationType"] for b in bodies] == ["insert", "update", "replace", "delete"]
    for b in bodies:
        assert b["type"] == "event" and b["channel"] == "mongo:orders" and b["collection"] == "orders"
        assert ISO_MS.match(b["timestamp"]) and b["correlationId"]
        assert "seq" not in b
    assert bodies[0]["document"] == {"_id": 1, "orderId": "ORD-001", "total": 198.95, "status": "new"}
    assert bodies[1]["document"] == {"_id": 1, "orderId": "ORD-001", "status": "paid"}
    assert bodies[1]["updateDescription"]["updatedFields"] == {"status": "paid"}
    assert bodies[1]["updateDescription"]["removedFields"] == ["total"]
    assert bodies[2]["document"] == {"_id": 1, "orderId": "ORD-001", "total": 10}
    assert "updateDescription" not in bodies[2]
    assert bodies[3]["document"] == {"_id": 1}
    events = env.sink.events
    assert [e.operation for e in events] == ["INSERT", "UPDATE", "REPLACE", "DELETE"]
    assert {(e.workspace, e.source, e.entity, e.channel) for e in events} == {("w1", "mongo", "orders", "mongo:orders")}
    assert events[3].record == {"_id": 1}
    assert len({b["correlationId"] for b in bodies}) == 4


async def update_then_delete_gives_null_document(env: Env) -> None:
    async with client(env) as db:
        await db.orders.insert_one({"_id": "a", "n": 1})
        async with running(env):
            # One transaction, so both writes are visible before the stream reads the update:
            # its updateLookup finds nothing.
            async with db.client.start_session() as session:
                async with await session.start_transaction():
                    await db.orders.update_one({"_id": "a"}, {"$inc": {"n": 1}}, session=session)
                    await db.orders.delete_one({"_id": "a"}, session=session)
            bodies = await settle(env, 2)
    assert [b["operation"] for b in bodies] == ["UPDATE", "DELETE"]
    assert bodies[0]["document"] is None
    assert env.sink.events[0].record == {"_id": "a"}
    assert bodies[0]["updateDescription"]["updatedFields"] == {"n": 2}


async def bson_types_map_to_json(env: Env) -> None:
    oid = ObjectId("65a5f0c2e4b0a1b2c3d4e5f6")
    when = dt.datetime(2024, 1, 15, 10, 0, 0, 123456)
    the_uuid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    doc = {
        "_id": oid,
        "when": when,
        "price": Decimal128("198.95"),
        "count": Decimal128("42"),
        "big": Int64(2**40),
        "blob": b"\x00\x01\xfe",
        "uid": Binary.from_uuid(the_uuid, UuidRepresentation.STANDARD),
        "nested": {"ids": [oid, {"at": when}], "flag": True, "nothing": None, "ratio": 0.5},
    }
    async with running(env), client(env) as db:
        await db.things.insert_one(doc)
        bodies = await settle(env, 1)
    assert bodies[0]["document"] == {
        "_id": "65a5f0c2e4b0a1b2c3d4e5f6",
        "when": "2024-01-15T10:00:00.123Z",
        "price": 198.95,
        "count": 42,
        "big": 2**40,
        "blob": "AAH+",
        "uid": "12345678-1234-5678-1234-567812345678",
        "nested": {"ids": ["65a5f0c2e4b0a1b2c3d4e5f6", {"at": "2024-01-15T10:00:00.123Z"}], "flag": True,
                   "nothing": None, "ratio": 0.5},
    }
    assert env.sink.events[0].record["price"] == 198.95  # predicates compare numbers


async def collections_are_channels(env: Env) -> None:
    async with running(env), client(env) as db:
        await db.orders.insert_one({"_id": 1})
        await db.customers.insert_one({"_id": 2})
        await db.orders.insert_one({"_id": 3})
        bodies = await settle(env, 3)
    assert [(b["channel"], b["document"]["_id"]) for b in bodies] == [("mongo:orders", 1), ("mongo:customers", 2),
                                                                      ("mongo:orders", 3)]
    assert [e.entity for e in env.sink.events] == ["orders", "customers", "orders"]


async def one_event_per_workspace(env: Env) -> None:
    env.workspaces[:] = ["w1", "w2", "w3"]
    async with running(env), client(env) as db:
        await db.orders.insert_one({"_id": 1})
        await settle(env, 3)
    events = env.sink.events
    assert [e.workspace for e in events] == ["w1", "w2", "w3"]
    assert events[0].body is events[1].body is events[2].body  # encoded once


async def pre_images_give_old_document(env: Env) -> None:
    async with client(env) as db:
        await db.create_collection("orders", changeStreamPreAndPostImages={"enabled": True})
        await db.orders.insert_one({"_id": 1, "price": 79.99})
        async with running(env):
            await db.orders.update_one({"_id": 1}, {"$set": {"price": 99.99}})
            await env.sink.wait_for(1)  # else the update's lookup may already miss the document
            await db.orders.delete_one({"_id": 1})
            bodies = await settle(env, 2)
    assert bodies[0]["oldDocument"] == {"_id": 1, "price": 79.99}
    assert bodies[0]["document"] == {"_id": 1, "price": 99.99}
    assert bodies[1]["oldDocument"] == {"_id": 1, "price": 99.99}
    assert env.sink.events[0].old_record == {"_id": 1, "price": 79.99}


async def transaction_correlation_id(env: Env) -> None:
    async with client(env) as db:
        await db.orders.insert_one({"_id": 0})
        async with running(env):
            async with db.client.start_session() as session:
                async with await session.start_transaction():
                    await db.orders.insert_one({"_id": 1}, session=session)
                    await db.orders.update_one({"_id": 0}, {"$set": {"x": 1}}, session=session)
            await db.orders.insert_one({"_id": 2})
            bodies = await settle(env, 3)
    ids = [b["correlationId"] for b in bodies]
    assert re.match(r"^[0-9a-f-]{36}:\d+$", ids[0]), ids
    assert ids[0] == ids[1] != ids[2]
    assert ids[2].startswith("mongo-")


async def far_dates_are_delivered(env: Env) -> None:
    """A date MongoDB accepts but RFC 3339 cannot write (year 10000, year -1) is delivered with
    an expanded year, as JavaScript writes it, and the changes after it flow on."""
    from bson.datetime_ms import DatetimeMS

    async with running(env), client(env) as db:
        await db.orders.insert_one({"_id": 1, "at": DatetimeMS(253402300800000), "before": DatetimeMS(-62167219200001)})
        await db.orders.insert_one({"_id": 2})
        bodies = await settle(env, 2)
    assert bodies[0]["document"] == {"_id": 1, "at": "+010000-01-01T00:00:00.000Z",
                                     "before": "-000001-12-31T23:59:59.999Z"}
    assert [b["document"]["_id"] for b in bodies] == [1, 2]


async def large_changes_arrive_whole(env: Env) -> None:
    """A change over 16 MiB (a 9 MB document's post- and pre-image together), which MongoDB can
    send only in fragments ($changeStreamSplitLargeEvent, MongoDB 7.0 / 6.0.9+), arrives as one
    event, in order, and is not published again after a restart."""
    big = "x" * (9 * 1024 * 1024)
    async with client(env) as db:
        await db.create_collection("orders", changeStreamPreAndPostImages={"enabled": True})
        await db.orders.insert_one({"_id": 1, "big": big})
        async with running(env):
            await db.orders.update_one({"_id": 1}, {"$set": {"n": 1}})
            await db.orders.insert_one({"_id": 2})
            await env.sink.wait_for(2, timeout=30)
        async with running(env):
            await db.orders.insert_one({"_id": 3})
            bodies = await settle(env, 3)
    assert [(b["operation"], b["document"]["_id"]) for b in bodies] == [("UPDATE", 1), ("INSERT", 2), ("INSERT", 3)]
    assert bodies[0]["document"] == {"_id": 1, "big": big, "n": 1}
    assert bodies[0]["oldDocument"] == {"_id": 1, "big": big}
    assert bodies[0]["updateDescription"] == {"updatedFields": {"n": 1}, "removedFields": []}
    assert "splitEvent" not in bodies[0]


async def a_change_too_large_to_send_is_skipped_with_a_gap(env: Env) -> None:
    """A document just under 16 MiB: its insert's event cannot be sent, not even in fragments
    (its fullDocument alone fills one: 7182500; BSONObjectTooLarge on a server without the split
    stage). Every read from the saved token failed: the whole database's feed stopped for good,
    restarts too, with no history_gap. It is skipped with a history_gap, the changes after it
    arrive, in order, and a restart publishes nothing again."""
    import bson

    near = {"_id": "near16", "blob": ""}
    near["blob"] = "x" * (16 * 1024 * 1024 - 64 - len(bson.encode(near)))
    async with client(env) as db:
        async with running(env) as source:
            await db.orders.insert_one({"_id": 1})
            await db.orders.insert_one(near)
            await db.orders.insert_one({"_id": 2})
            await db.customers.insert_one({"_id": 3})
            bodies = await settle(env, 3)
            assert source.status()["skipped_changes"] == 1
        async with running(env):
            await db.orders.insert_one({"_id": 4})
            bodies = await settle(env, 4)
    assert [(b["collection"], b["document"]["_id"]) for b in bodies] == [
        ("orders", 1), ("orders", 2), ("customers", 3), ("orders", 4)]
    assert [(w, s) for w, s, _ in env.sink.gaps] == [("w1", "mongo")]
    reason = env.sink.gaps[0][2]
    assert f"a MongoDB change in {env.database}.orders could not be converted" in reason, reason
    assert "RawBSONDocument" not in reason and "(code " in reason, reason


async def resume_after_restart(env: Env) -> None:
    async with client(env) as db:
        async with running(env):
            for i in range(3):
                await db.orders.insert_one({"_id": i})
            await env.sink.wait_for(3)
        # The gateway is down: these must arrive after the restart, once.
        for i in range(3, 6):
            await db.orders.insert_one({"_id": i})
        async with running(env) as source:
            assert source.status()["resumable"]
            await db.orders.insert_one({"_id": 6})
            bodies = await settle(env, 7)
    assert [b["document"]["_id"] for b in bodies] == list(range(7))



def with_option(url: str, option: str) -> str:
    """`url` with the query option `option` ("name=value") added."""
    if "?" in url:
        return f"{url}&{option}"
    return f"{url}?{option}" if url.split("://", 1)[1].count("/") else f"{url}/?{option}"


async def resume_after_restart_with_an_option_added(env: Env) -> None:
    """An operator adds an option to the URL (a timeout, the application name) while the
    gateway is down: the resume token file was named by the whole URL, so the restarted feed
    found none and opened the stream from "now", losing what changed in between."""
    async with client(env) as db:
        async with running(env):
            await db.orders.insert_one({"_id": 0})
            await env.sink.wait_for(1)
        await db.orders.insert_one({"_id": 1})
        env.url = with_option(env.url, "appname=rt-restarted")
        async with running(env) as source:
            assert source.status()["resumable"]
            await db.orders.insert_one({"_id": 2})
            bodies = await settle(env, 3)
    assert [b["document"]["_id"] for b in bodies] == [0, 1, 2]

async def a_new_stream_resumes_from_its_first_empty_batch(env: Env) -> None:
    """A stream opened from "now" that never saw a change still resumes where it was: changes
    made while the process was down arrive after the restart."""
    async with client(env) as db:
        async with running(env) as source:
            assert source.status()["resumable"]
        for i in range(3):
            await db.orders.insert_one({"_id": i})
        async with running(env):
            await db.orders.insert_one({"_id": 3})
            bodies = await settle(env, 4)
    assert [b["document"]["_id"] for b in bodies] == list(range(4))


async def resume_after_dropped_connections(env: Env, drop: Callable[[], Any]) -> None:
    async with running(env) as source, client(env) as db:
        await db.orders.insert_one({"_id": 1})
        await env.sink.wait_for(1)
        drop()
        await db.orders.insert_one({"_id": 2})
        await db.orders.insert_one({"_id": 3})
        bodies = await settle(env, 3)
        assert source.ready()
    assert [b["document"]["_id"] for b in bodies] == [1, 2, 3]


async def resume_after_failpoints(env: Env) -> None:
    async with running(env), client(env) as db:
        admin = db.client.admin
        await admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1},
                             "data": {"failCommands": ["getMore"], "closeConnection": True}})
        await db.orders.insert_one({"_id": 1})
        await env.sink.wait_for(1)
        await admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1},
                             "data": {"failCommands": ["getMore"], "errorCode": 91,
                                      "errorLabels": ["ResumableChangeStreamError"]}})
        await db.orders.insert_one({"_id": 2})
        bodies = await settle(env, 2)
        await admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    assert [b["document"]["_id"] for b in bodies] == [1, 2]


async def history_lost(env: Env, truncate: Callable[[], Any]) -> None:
    env.workspaces[:] = ["w1", "w2"]
    async with client(env) as db:
        async with running(env):
            await db.orders.insert_one({"_id": 1})
            await env.sink.wait_for(2)
        await db.orders.insert_one({"_id": 2})  # lost with the oplog
        truncate()
        source = make_source(env)
        await source.start()
        try:
            await wait_until(lambda: len(env.sink.gaps) == 2, what="history_gap")
            await wait_until(source.ready, what="a new stream")
            assert source.status()["history_lost"] == 1
            await db.orders.insert_one({"_id": 3})
            bodies = await settle(env, 4)
        finally:
            await source.stop()
    assert [(w, s) for w, s, _ in env.sink.gaps] == [("w1", "mongo"), ("w2", "mongo")]
    assert "history lost" in env.sink.gaps[0][2]
    assert [b["document"]["_id"] for b in bodies] == [1, 1, 3, 3]


async def invalidate_reopens(env: Env) -> None:
    async with client(env) as db:
        async with running(env) as source:
            await db.orders.insert_one({"_id": 1})
            await env.sink.wait_for(1)
            opened = source.status()["streams_opened"]
            await db.client.drop_database(env.database)
            await wait_until(lambda: source.status()["streams_opened"] > opened and source.ready(), what="reopen")
            await db.orders.insert_one({"_id": 2})
            await env.sink.wait_for(2)
            await db.client.drop_database(env.database)
            await asyncio.sleep(0.3)  # the saved token is now an invalidate event's
        await db.orders.insert_one({"_id": 3})
        async with running(env) as source:  # a restart must pass the invalidate (startAfter)
            await db.orders.insert_one({"_id": 4})
            bodies = await settle(env, 4)
            assert source.status()["history_lost"] == 0
    assert [b["document"]["_id"] for b in bodies] == [1, 2, 3, 4]
    assert env.sink.gaps == []


async def collection_drop_keeps_streaming(env: Env) -> None:
    async with running(env) as source, client(env) as db:
        await db.orders.insert_one({"_id": 1})
        await db.customers.insert_one({"_id": 2})
        await env.sink.wait_for(2)
        await db.orders.drop()
        await db.customers.insert_one({"_id": 3})
        bodies = await settle(env, 3)
        await _gone_after_a_relist(source, "orders")
    assert [b["document"]["_id"] for b in bodies] == [1, 2, 3]


async def _gone_after_a_relist(source: MongoSource, collection: str) -> None:
    """The source, streaming on, refuses `collection` once its listing may be made again."""
    assert source.ready()
    await asyncio.sleep(0.6)  # past the listing's refresh interval
    try:
        await source.check_channel("w1", collection)
    except ChannelUnavailable:
        return
    raise AssertionError(f"mongo:{collection} is still accepted")


async def collection_rename_keeps_streaming(env: Env) -> None:
    """A renamed collection's channel is refused once the rename is read (the listing kept it up
    to 5 s), the new name's taken, and the database's stream goes on with both."""
    async with running(env) as source, client(env) as db:
        await db.orders.insert_one({"_id": 1})
        assert await source.check_channel("w1", "orders") == "orders"  # listed: kept up to 5 s
        await db.orders.rename("orders_v2")
        await db.orders_v2.insert_one({"_id": 2})
        bodies = await settle(env, 2)
        await _gone_after_a_relist(source, "orders")
        assert await source.check_channel("w1", "orders_v2") == "orders_v2"
    assert [(b["collection"], b["document"]["_id"]) for b in bodies] == [("orders", 1), ("orders_v2", 2)]


async def check_channel(env: Env) -> None:
    async with client(env) as db:
        await db.orders.insert_one({"_id": 1})
        async with running(env) as source:
            assert await source.check_channel("w1", "orders") == "orders"
            assert await source.check_channel("w1", "*") == "*"
            for bad in ("nosuch", "$cmd", "system.views", ""):
                try:
                    await source.check_channel("w1", bad)
                    raise AssertionError(f"{bad!r} accepted")
                except ChannelUnavailable as exc:
                    assert "mongo:" in str(exc)
            # Created just after a listing (the refusals above): the check waits for the next
            # one (0.5 s apart at most) instead of refusing a collection that exists.
            await db.later.insert_one({"_id": 1})
            assert await source.check_channel("w1", "later") == "later"
            before = time.monotonic()
            for bad in ("nosuch1", "nosuch2", "nosuch3"):  # a listing per 0.5 s, however many ask
                try:
                    await source.check_channel("w1", bad)
                    raise AssertionError(f"{bad!r} accepted")
                except ChannelUnavailable:
                    pass
            assert time.monotonic() - before >= 1.0
        async with running(env, allow_unknown_collections=True) as source:
            assert await source.check_channel("w1", "notyet") == "notyet"


async def views_and_time_series_are_not_channels(env: Env) -> None:
    """A view or a time-series collection is listed beside the collections but streams no
    changes (MongoDB: change streams show neither): mongo:{it} is refused, saying what it is,
    rather than subscribed to wait for ever. The same on a Kafka-bus node, which reads no feed
    (RemoteSource): it accepted any well-formed name, a missing collection too."""
    from rtserver.bus_kafka import RemoteSource

    async with client(env) as db:
        await db.orders.insert_one({"_id": 1})
        await db.create_collection("paid", viewOn="orders", pipeline=[{"$match": {"status": "paid"}}])
        await db.create_collection("readings", timeseries={"timeField": "t"})
        node = RemoteSource("mongo", env.url, [], [], database=env.database)
        try:
            async with running(env) as source:
                for checker in (source, node):
                    for name, why in (("paid", "a view"), ("readings", "a timeseries"), ("nosuch", "no collection")):
                        try:
                            await checker.check_channel("w1", name)
                            raise AssertionError(f"{name!r} accepted by {checker!r}")
                        except ChannelUnavailable as exc:
                            assert f"mongo:{name}: " in str(exc) and why in str(exc), str(exc)
                            assert repr(env.database) in str(exc), str(exc)
                    assert await checker.check_channel("w1", "orders") == "orders"
        finally:
            await node.stop()


async def operations_narrow_the_stream(env: Env) -> None:
    async with running(env) as source, client(env) as db:
        opened = source.status()["streams_opened"]
        source.set_operations(["INSERT"])
        await wait_until(lambda: source.status()["streams_opened"] > opened and source.ready(), what="reopen")
        await db.orders.insert_one({"_id": 1})
        await db.orders.update_one({"_id": 1}, {"$set": {"x": 1}})
        await db.orders.insert_one({"_id": 2})
        bodies = await settle(env, 2)
    assert [(b["operation"], b["document"]["_id"]) for b in bodies] == [("INSERT", 1), ("INSERT", 2)]


async def not_ready_while_unreachable(env: Env) -> None:
    from tests.mongo_server import ThreadedMongoTestServer

    port = env.server.port
    env.server.stop()
    source = make_source(env, client_options={"serverSelectionTimeoutMS": 300})
    await source.start()
    try:
        await wait_until(lambda: bool(source.status()["last_error"]), what="a connection error")
        assert not source.ready()
        revived = ThreadedMongoTestServer(port=port).start()
        try:
            await wait_until(source.ready, timeout=15, what="recovery")
            async with client(env) as db:
                await db.orders.insert_one({"_id": 1})
            bodies = await settle(env, 1)
            assert bodies[0]["document"] == {"_id": 1}
        finally:
            await source.stop()
            revived.stop()
    finally:
        if source.ready():
            await source.stop()
