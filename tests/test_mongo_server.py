"""The MongoDB test double (tests/mongo_server) as PyMongo sees it: if these hold, the change
feed's tests exercise the driver's real handshake, cursor, getMore and resume logic."""

from __future__ import annotations

import asyncio
import struct

import bson
import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import DuplicateKeyError, OperationFailure


@pytest.fixture
async def db(mongo_server):
    client = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=3000)
    yield client["t"]
    await client.close()


def test_legacy_op_query_ismaster_gets_op_reply(mongo_server):
    import socket

    query = bson.encode({"isMaster": 1})
    body = struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + query
    message = struct.pack("<iiii", 16 + len(body), 7, 0, 2004) + body
    with socket.create_connection(("127.0.0.1", mongo_server.port), timeout=5) as sock:
        sock.sendall(message)
        header = sock.recv(16, socket.MSG_WAITALL)
        length, _, response_to, op_code = struct.unpack("<iiii", header)
        rest = sock.recv(length - 16, socket.MSG_WAITALL)
    assert (op_code, response_to) == (1, 7)
    reply = bson.decode(rest[20:])
    assert reply["ismaster"] is True and reply["helloOk"] is True
    assert reply["maxWireVersion"] == 21 and reply["logicalSessionTimeoutMinutes"] == 30
    assert reply["setName"] == "rs0" and reply["hosts"] == [f"127.0.0.1:{mongo_server.port}"]
    assert "topologyVersion" not in reply


async def test_hello_ping_buildinfo(db):
    hello = await db.client.admin.command("hello")
    assert hello["isWritablePrimary"] and hello["maxWireVersion"] == 21
    assert (await db.command("ping"))["ok"] == 1
    assert (await db.command("buildInfo"))["versionArray"][0] == 7


def test_sync_client_and_replica_set_url(mongo_server):
    with MongoClient(mongo_server.replica_set_url, serverSelectionTimeoutMS=3000) as client:
        client.t.c.insert_one({"_id": 1})
        assert client.t.c.find_one({"_id": 1}) == {"_id": 1}


async def test_crud_with_update_operators(db):
    await db.c.insert_many([{"_id": i, "k": i % 2, "tags": [], "n": {"v": i}} for i in range(4)])
    with pytest.raises(DuplicateKeyError):
        await db.c.insert_one({"_id": 0})
    assert [d["_id"] async for d in db.c.find({"k": 1})] == [1, 3]
    assert [d["_id"] async for d in db.c.find({"n.v": {"$gte": 2}})] == [2, 3]
    assert [d["_id"] async for d in db.c.find({"_id": {"$in": [0, 3]}})] == [0, 3]
    result = await db.c.update_many({"k": 0}, {"$set": {"s": "x"}, "$inc": {"n.v": 10}, "$push": {"tags": "t"}})
    assert (result.matched_count, result.modified_count) == (2, 2)
    assert await db.c.find_one({"_id": 2}) == {"_id": 2, "k": 0, "tags": ["t"], "n": {"v": 12}, "s": "x"}
    await db.c.update_one({"_id": 2}, {"$unset": {"s": ""}})
    await db.c.replace_one({"_id": 3}, {"only": True})
    assert await db.c.find_one({"_id": 3}) == {"_id": 3, "only": True}
    up = await db.c.update_one({"_id": 9, "k": 5}, {"$set": {"z": 1}}, upsert=True)
    assert up.upserted_id == 9 and await db.c.find_one({"_id": 9}) == {"_id": 9, "k": 5, "z": 1}
    assert (await db.c.delete_many({"k": {"$ne": 5}})).deleted_count == 4
    assert await db.c.count_documents({}) == 1
    assert await db.list_collection_names() == ["c"]


async def test_an_update_is_a_no_op_only_when_nothing_changes_in_bson(db):
    """As mongod decides (values equal in BSON, type included): `$set` of true over 1 or of 1.0
    over 1 changes the document and streams an update; the test double compared Python values
    (True == 1 == 1.0) and neither stored the new value nor streamed anything. A replacement by
    the same document is no change at all on mongod (no oplog entry), which it streamed."""
    await db.c.insert_one({"_id": 1, "flag": 1, "n": 1, "s": "x"})
    async with await db.c.watch(max_await_time_ms=50) as stream:
        assert (await db.c.update_one({"_id": 1}, {"$set": {"flag": True}})).modified_count == 1
        assert (await db.c.update_one({"_id": 1}, {"$set": {"n": 1.0}})).modified_count == 1
        assert (await db.c.update_one({"_id": 1}, {"$set": {"s": "x"}})).modified_count == 0
        assert (await db.c.replace_one({"_id": 1}, {"flag": True, "n": 1.0, "s": "x"})).modified_count == 0
        assert (await db.c.replace_one({"_id": 1}, {"flag": True, "n": 1, "s": "x"})).modified_count == 1
        got = []
        while (change := await stream.try_next()) is not None:
            got.append((change["operationType"], change.get("updateDescription", {}).get("updatedFields")))
    stored = await db.c.find_one({"_id": 1})
    assert got == [("update", {"flag": True}), ("update", {"n": 1.0}), ("replace", None)]
    assert [type(stored[k]) for k in ("flag", "n")] == [bool, int]


async def test_change_stream_events_tokens_and_resume(db):
    async with await db.c.watch(max_await_time_ms=50) as stream:
        await db.c.insert_one({"_id": 1})
        await db.c.update_one({"_id": 1}, {"$set": {"a": 1}})
        first = await stream.try_next()
        second = await stream.try_next()
        assert first["operationType"] == "insert" and first["fullDocument"] == {"_id": 1}
        assert second["operationType"] == "update" and "fullDocument" not in second
        assert second["updateDescription"]["updatedFields"] == {"a": 1}
        assert await stream.try_next() is None
        assert stream.resume_token == second["_id"]  # postBatchResumeToken of an empty batch
    await db.c.delete_one({"_id": 1})
    async with await db.c.watch(resume_after=first["_id"]) as stream:
        assert (await stream.next())["_id"] == second["_id"]
        assert (await stream.next())["operationType"] == "delete"
    async with await db.c.watch(start_after=second["_id"]) as stream:
        assert (await stream.next())["operationType"] == "delete"


async def test_match_stage_filters_events(db):
    pipeline = [{"$match": {"operationType": {"$in": ["insert"]}, "ns.coll": "keep"}}]
    async with await db.watch(pipeline, max_await_time_ms=50) as stream:
        await db.drop_me.insert_one({"_id": 1})
        await db.keep.update_one({"_id": 2}, {"$set": {"a": 1}}, upsert=True)
        await db.keep.update_one({"_id": 2}, {"$set": {"a": 2}})
        await db.keep.insert_one({"_id": 3})
        assert (await stream.next())["documentKey"] == {"_id": 2}  # the upsert is an insert
        last = await stream.next()
        assert last["documentKey"] == {"_id": 3}
        await db.drop_me.insert_one({"_id": 4})  # filtered out, yet the stream moves past it
        assert await stream.try_next() is None
        assert stream.resume_token["_data"] > last["_id"]["_data"]


async def test_update_lookup_reads_at_getmore_time(db):
    await db.c.insert_one({"_id": 1, "v": 0})
    async with await db.c.watch(full_document="updateLookup", max_await_time_ms=50) as stream:
        await db.c.update_one({"_id": 1}, {"$inc": {"v": 1}})
        await db.c.update_one({"_id": 1}, {"$inc": {"v": 1}})
        await db.c.delete_one({"_id": 1})
        a, b = await stream.next(), await stream.next()
        assert a["fullDocument"] is None and b["fullDocument"] is None
        assert (await stream.next())["operationType"] == "delete"
        await db.c.insert_one({"_id": 2, "v": 0})
        await db.c.update_one({"_id": 2}, {"$set": {"v": 5}})
        await stream.next()
        assert (await stream.next())["fullDocument"] == {"_id": 2, "v": 5}


async def test_pre_images_per_collection(db):
    await db.create_collection("with", changeStreamPreAndPostImages={"enabled": True})
    await db["with"].insert_one({"_id": 1, "v": 1})
    await db.without.insert_one({"_id": 1, "v": 1})
    async with await db.watch(full_document_before_change="whenAvailable", max_await_time_ms=50) as stream:
        await db["with"].update_one({"_id": 1}, {"$set": {"v": 2}})
        await db.without.update_one({"_id": 1}, {"$set": {"v": 2}})
        assert (await stream.next())["fullDocumentBeforeChange"] == {"_id": 1, "v": 1}
        assert (await stream.next())["fullDocumentBeforeChange"] is None


async def test_collection_drop_invalidates_collection_streams_only(db):
    await db.c.insert_one({"_id": 1})
    async with await db.c.watch(max_await_time_ms=50) as coll_stream, await db.watch(max_await_time_ms=50) as db_stream:
        await db.c.drop()
        await db.other.insert_one({"_id": 2})
        assert [(await coll_stream.next())["operationType"] for _ in range(2)] == ["drop", "invalidate"]
        assert await coll_stream.try_next() is None and not coll_stream.alive
        assert (await db_stream.next())["operationType"] == "drop"
        assert (await db_stream.next())["ns"] == {"db": "t", "coll": "other"}


async def test_a_rename_is_an_event_and_ends_the_renamed_collections_stream(db):
    """As mongod: renameCollection (on admin) is a `rename` event with `to`, in the database's
    stream and in the renamed collection's, which it invalidates; the documents move."""
    await db.c.insert_one({"_id": 1})
    async with await db.c.watch(max_await_time_ms=50) as coll_stream, await db.watch(max_await_time_ms=50) as db_stream:
        await db.c.rename("d")
        await db.d.insert_one({"_id": 2})
        renamed = await coll_stream.next()
        assert (renamed["operationType"], renamed["ns"], renamed["to"]) == ("rename", {"db": "t", "coll": "c"},
                                                                            {"db": "t", "coll": "d"})
        assert (await coll_stream.next())["operationType"] == "invalidate"
        assert (await db_stream.next())["operationType"] == "rename"
        assert (await db_stream.next())["ns"] == {"db": "t", "coll": "d"}
    assert await db.d.find_one({"_id": 1}) == {"_id": 1} and await db.c.find_one({"_id": 1}) is None
    await db.e.insert_one({"_id": 3})
    with pytest.raises(OperationFailure) as info:
        await db.d.rename("e")
    assert info.value.code == 48
    await db.d.rename("e", dropTarget=True)
    assert await db.e.find_one({"_id": 1}) == {"_id": 1}


async def test_a_project_stage_keeps_the_named_fields_and_the_token(db):
    """An inclusion $project (top-level fields) applies before the split stage: a change whose
    document alone fills a fragment (7182500) can be read without it. Dropping _id is refused,
    as mongod fails such a stream (280)."""
    near = {"_id": "near16", "blob": ""}
    near["blob"] = "x" * (16 * 1024 * 1024 - 64 - len(bson.encode(near)))
    opened = await db.p.watch()
    start = opened.resume_token
    await opened.close()
    await db.p.insert_one(near)
    split = [{"$changeStreamSplitLargeEvent": {}}]
    with pytest.raises(OperationFailure) as info:
        await db.p.watch(split, resume_after=start)
    assert info.value.code == 7182500 and "Splitting change event failed" in str(info.value)
    project = {"$project": {"operationType": 1, "documentKey": 1}}
    async with await db.p.watch([project, *split], resume_after=start) as stream:
        change = await stream.next()
    assert list(change) == ["_id", "operationType", "documentKey"] and change["documentKey"] == {"_id": "near16"}
    with pytest.raises(OperationFailure):
        await db.p.watch([{"$project": {"_id": 0, "ns": 1}}], resume_after=start)


async def test_events_over_16_mib_fail_or_split_into_fragments(db):
    """As mongod: a change event over 16 MiB (here a 9 MB document's pre- and post-image) fails
    the stream with BSONObjectTooLarge (10334); after $changeStreamSplitLargeEvent it comes as
    fragments, fields sorted by size, each with a token that resumes after it."""
    big = "x" * (9 * 1024 * 1024)
    await db.create_collection("c", changeStreamPreAndPostImages={"enabled": True})
    await db.c.insert_one({"_id": 1, "big": big})
    opened = await db.c.watch(full_document="updateLookup", full_document_before_change="whenAvailable")
    start = opened.resume_token
    await opened.close()
    await db.c.update_one({"_id": 1}, {"$set": {"n": 1}})
    await db.c.insert_one({"_id": 2})
    options = {"full_document": "updateLookup", "full_document_before_change": "whenAvailable", "resume_after": start}
    with pytest.raises(OperationFailure) as info:  # the aggregate's first batch holds it
        await db.c.watch(**options)
    assert info.value.code == 10334
    async with await db.c.watch([{"$changeStreamSplitLargeEvent": {}}], **options) as stream:
        one, two, after = await stream.next(), await stream.next(), await stream.next()
    assert [one["splitEvent"], two["splitEvent"]] == [{"fragment": 1, "of": 2}, {"fragment": 2, "of": 2}]
    # The smaller fields first: the post-image's element is the smaller one (its name is shorter).
    assert one["operationType"] == "update" and one["fullDocument"] == {"_id": 1, "big": big, "n": 1}
    assert list(two) == ["_id", "splitEvent", "fullDocumentBeforeChange"]
    assert two["fullDocumentBeforeChange"] == {"_id": 1, "big": big}
    assert one["_id"] != two["_id"] and after["documentKey"] == {"_id": 2}
    async with await db.c.watch([{"$changeStreamSplitLargeEvent": {}}], **{**options, "resume_after": one["_id"]}) as stream:
        assert (await stream.next())["splitEvent"] == {"fragment": 2, "of": 2}
    async with await db.c.watch([{"$changeStreamSplitLargeEvent": {}}], **{**options, "resume_after": two["_id"]}) as stream:
        assert (await stream.next())["documentKey"] == {"_id": 2}


async def test_split_stage_unknown_to_an_older_server():
    from tests.mongo_server import ThreadedMongoTestServer

    server = ThreadedMongoTestServer(split_large_events=False).start()
    client = AsyncMongoClient(server.url, serverSelectionTimeoutMS=3000)
    try:
        with pytest.raises(OperationFailure) as info:
            await client.t.watch([{"$changeStreamSplitLargeEvent": {}}])
        assert info.value.code == 40324 and "$changeStreamSplitLargeEvent" in str(info.value)
    finally:
        await client.close()
        server.stop()


async def test_truncated_oplog_is_history_lost(db, mongo_server):
    async with await db.c.watch() as stream:
        await db.c.insert_one({"_id": 1})
        token = (await stream.next())["_id"]
    await db.c.insert_one({"_id": 2})
    mongo_server.truncate_oplog()
    with pytest.raises(OperationFailure) as info:
        await db.c.watch(resume_after=token)
    assert info.value.code == 286


async def test_retried_write_applies_once(db):
    # rtAfterExecute (a test-server extension): run the insert, then drop the connection
    # instead of replying; the driver retries with the same lsid/txnNumber.
    await db.client.admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1},
                                   "data": {"failCommands": ["insert"], "closeConnection": True, "rtAfterExecute": True}})
    await db.c.insert_one({"x": 1})  # no _id: a second application would add a second document
    assert await db.c.count_documents({}) == 1


async def test_fail_command_error_codes_get_labels(db, mongo_server):
    admin = db.client.admin
    await admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1},
                         "data": {"failCommands": ["insert"], "errorCode": 91}})
    await db.c.insert_one({"_id": 1})  # RetryableWriteError: retried
    assert await db.c.count_documents({}) == 1
    async with await db.c.watch(max_await_time_ms=50) as stream:
        await admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1},
                             "data": {"failCommands": ["getMore"], "errorCode": 91}})
        await db.c.insert_one({"_id": 2})
        assert (await stream.next())["documentKey"] == {"_id": 2}  # resumed
    assert mongo_server.commands_seen().count("aggregate") >= 3
    await admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1},
                         "data": {"failCommands": ["find"], "errorCode": 2, "errorLabels": []}})
    with pytest.raises(OperationFailure):
        await db.c.find_one({})


async def test_transactions_commit_with_lsid_and_abort(db):
    async with await db.c.watch(max_await_time_ms=50) as stream:
        async with db.client.start_session() as session:
            async with await session.start_transaction():
                await db.c.insert_one({"_id": 1}, session=session)
                await db.c.insert_one({"_id": 2}, session=session)
            await session.start_transaction()
            await db.c.insert_one({"_id": 3}, session=session)
            await session.abort_transaction()
        a, b = await stream.next(), await stream.next()
        assert a["lsid"] == b["lsid"] and a["txnNumber"] == b["txnNumber"]
        assert await stream.try_next() is None
    assert await db.c.count_documents({}) == 2


async def test_drop_connections_and_kill_cursors(db, mongo_server):
    stream = await db.c.watch(max_await_time_ms=50)
    await db.c.insert_one({"_id": 1})
    await stream.next()
    assert mongo_server.drop_connections() >= 1
    await db.c.insert_one({"_id": 2})
    assert (await stream.next())["documentKey"] == {"_id": 2}
    await stream.close()
    await asyncio.sleep(0.05)
    assert "killCursors" in mongo_server.commands_seen()


async def test_views_and_time_series_are_listed_by_type(db):
    """As mongod lists them (db.getCollectionInfos()): a view with type "view", its viewOn and
    pipeline, read-only, beside the system.views collection that holds it; a time-series
    collection with type "timeseries". A write to a view fails as on mongod (166)."""
    await db.orders.insert_one({"_id": 1})
    await db.create_collection("paid", viewOn="orders", pipeline=[{"$match": {"status": "paid"}}])
    await db.create_collection("readings", timeseries={"timeField": "t"})
    infos = {i["name"]: i async for i in await db.list_collections()}
    assert infos["paid"]["type"] == "view" and infos["paid"]["info"] == {"readOnly": True}
    assert infos["paid"]["options"] == {"viewOn": "orders", "pipeline": [{"$match": {"status": "paid"}}]}
    assert infos["readings"]["type"] == "timeseries" and infos["readings"]["options"]["timeseries"]["timeField"] == "t"
    assert infos["orders"]["type"] == infos["system.views"]["type"] == "collection"
    names = {i["name"]: i["type"] async for i in await db.list_collections(nameOnly=True)}
    assert names == {"orders": "collection", "paid": "view", "readings": "timeseries", "system.views": "collection"}
    with pytest.raises(OperationFailure) as failed:
        await db.paid.insert_one({"_id": 2})
    assert failed.value.code == 166
