"""One change, every path: the event a client receives is the same JSON whether it came live on
a single gateway (memory bus), replayed from its history (`since`), live on a Kafka-bus node
(`rtserver ingest` and the node's publish API writing msgpack records), or read back from Kafka
on a node whose memory no longer holds it; and filters decide alike on every path. Values that
are hard to carry: PostgreSQL numeric/float extremes, big integers in jsonb, non-BMP text,
BC and year-10000 dates, arrays with NULLs and explicit bounds, enums, domains, composites,
ranges, TOASTed values; BSON Decimal128, Int64, dates outside 1970-9999, binary subtypes, regex,
timestamps, MinKey/MaxKey; custom payloads with -0.0, 1.0 vs 1, integers beyond 64 bits."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re
import uuid

import pytest

from tests.harness.wsclient import ws_connect
from tests.test_scaleout import cluster  # noqa: F401 - the fixture

PG_SETUP = [
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    "CREATE DOMAIN posint AS int CHECK (VALUE > 0)",
    "CREATE DOMAIN intlist AS int[]",
    "CREATE DOMAIN jdom AS jsonb",
    "CREATE TYPE pair AS (a int, b text)",
    """CREATE TABLE hard (
      id int PRIMARY KEY, n numeric, f4 float4, f8 float8, i8 int8, t text, j json, jb jsonb, b bytea,
      ts timestamp, tstz timestamptz, d date, tm time, tmtz timetz, iv interval, u uuid,
      a2 int[], ta text[], m mood, ma mood[], pi posint, il intlist, jd jdom, c pair, ca pair[],
      r int4range, tr tstzrange, big text, nums numeric[], f8a float8[], ts_a timestamptz[], bx box[])""",
    "ALTER TABLE hard REPLICA IDENTITY FULL",
]
PG_CHANGES = [
    # jb holds an integer beyond 64 bits beside f8 = Infinity: on the bus only the former may
    # travel as JSON, or the filter below sees null for the latter
    r"""INSERT INTO hard VALUES (1, 123456789012345678901234567890.123456789, 'NaN', 'Infinity',
       9223372036854775807, E'a\x01b\u00e9\U0001F600', '{"b":1,"a":2,"b":3,"big":1e400}',
       '{"b":1,"a":2,"b":3,"n":18446744073709551616,"s":"\ud83d\ude00"}', '\x00ff10',
       '2024-01-15 10:00:00.123456', '0044-03-15 10:00:00+00 BC', '10000-01-01', '24:00:00',
       '10:00:00.5+05:30', '1 year 2 mons -3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
       '[0:1][1:2]={{1,NULL},{3,4}}', '{"a,b","NULL",NULL,"\\"}', 'happy', '{sad,happy}', 5, '{1,2}',
       '{"x":[1.0,-0.0]}', ROW(1, 'x,"y"'), ARRAY[ROW(2,'(q)')::pair, NULL], '[1,5)',
       '[2024-01-01,infinity)', repeat('x', 100000), '{NaN,-Infinity,-0,1e300}', '{NaN,-0,1e308}',
       '{infinity,"2024-01-01 00:00:00+00"}', '{(1,1),(0,0);(2,2),(1,1)}')""",
    "UPDATE hard SET f8 = '-0', n = 'NaN' WHERE id = 1",  # big: TOASTed, unchanged
    """INSERT INTO hard (id, n, f8, i8, jb, ts, tstz, d) VALUES (2, '-0.000000000000000000001', '1e308',
       -9223372036854775808, '[[1,[2]],null]', 'infinity', '-infinity', '4713-01-01 BC')""",
    "UPDATE hard SET id = 3 WHERE id = 2",
    "DELETE FROM hard WHERE id = 3",
]
PG_FILTER = {"f8": {"$gt": 100}}  # Infinity (row 1's INSERT), 1e308 (row 2's INSERT, UPDATE, DELETE)

PAYLOADS = [
    {"f": -0.0, "one": 1.0, "i": 1, "big": 2**70, "s": "x" * 50000, "ключ": "\U0001F600\u0000", "m": 1e308},
    2**70,
    {"big": -(2**64), "nested": [[1, [2, [None, {"k": 2**80}]]]]},
    {"big": 5},
]
EVENTS_FILTER = {"$or": [{"big": {"$gt": 2**64}}, {"big": {"$lt": -(2**63)}}]}  # the first and third

SEQ = re.compile(rb',"seq":\d+')


def _mongo_docs():
    from bson import Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
    from bson.binary import Binary
    from bson.datetime_ms import DatetimeMS

    return [
        {"_id": ObjectId("65a5f0c2e4b0a1b2c3d4e5f6"), "dec": Decimal128("Infinity"), "nan": float("nan"),
         "i64": Int64(2**63 - 1), "old": datetime.datetime(1969, 12, 31, 23, 59, 59, 999000),
         "far": DatetimeMS(253402300800000), "bc": DatetimeMS(-62167219200001),
         "u4": Binary(uuid.UUID(int=5).bytes, 4), "b0": Binary(b"abc", 0), "b128": Binary(b"\x00", 128),
         "rx": Regex("a.*b", "im"), "ts": Timestamp(1700000000, 7), "lo": MinKey(), "hi": MaxKey(),
         "deep": [[1, [2, [None, {"x": Decimal128("1E+6144")}]]]], "neg0": -0.0, "big": 1e308},
        {"_id": 2, "dec": Decimal128("12.5"), "i64": Int64(-(2**63))},
        {"_id": 3},
    ]


MONGO_FILTER = {"dec": {"$gt": 100}}  # Decimal128 Infinity passes, 12.5 does not


async def _frames(c, n: int, timeout: float = 20) -> list[bytes]:
    """The next `n` event frames as the server sent them."""
    out = []
    while len(out) < n:
        raw = await asyncio.wait_for(c.ws.recv(), timeout)
        raw = raw.encode() if isinstance(raw, str) else raw
        if json.loads(raw)["type"] == "event":
            out.append(raw)
    return out


def _without(frames: list[bytes], *members: str) -> list[bytes]:
    """Frames without seq (each path numbers apart) and `members` (e.g. a publish's timestamp)."""
    out = []
    for f in frames:
        f = SEQ.sub(b"", f)
        for m in members:
            f = re.sub(rb',"' + m.encode() + rb'":"[^"]*"', b"", f)
        out.append(f)
    return out


# Which events of each channel (1-based) its filter passes, on every path
PASSED = {"postgres:hard": [1, 3, 4, 5], "mongo:things": [1], "events:hard": [1, 3]}
CHANNELS = {"postgres:hard": PG_FILTER, "mongo:things": MONGO_FILTER, "events:hard": EVENTS_FILTER}


async def _subscribe_all(c, filtered: bool) -> dict[str, int]:
    """Subscribes to CHANNELS; their positions."""
    seqs = {}
    for channel, predicates in CHANNELS.items():
        sub = await c.subscribe(channel, {"predicates": predicates} if filtered else None)
        seqs[channel] = sub["seq"]
    return seqs


async def _resubscribe_all(c, filtered: bool, since: dict[str, int]) -> None:
    """Subscribes to CHANNELS with `since` (replays interleave with the answers: _frames)."""
    for channel, predicates in CHANNELS.items():
        message = {"type": "subscribe", "channel": channel, "since": since[channel]}
        if filtered:
            message["filter"] = {"predicates": predicates}
        await c.send(message)


async def _publish(gw, payload) -> None:
    status, body = await gw.post("/workspaces/w1/realtime/events/hard", json.dumps(payload).encode(),
                                 {"Authorization": f"Bearer {gw.token('w1', publish=True)}",
                                  "X-Correlation-ID": "corr-1"})
    assert status == 202, body


def _by_channel(frames: list[bytes]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for f in frames:
        out.setdefault(json.loads(f)["channel"], []).append(f)
    return out


@pytest.mark.postgres
@pytest.mark.kafka
async def test_one_change_is_the_same_event_on_every_path(cluster, gateway_factory, pg_database, mongo_server):  # noqa: F811
    from bson import Decimal128
    from pymongo import AsyncMongoClient

    for stmt in PG_SETUP:
        await cluster.db.execute(stmt)
    mongo = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=5000)
    things = mongo["shop"]["things"]
    await things.insert_one({"_id": 0})
    mongo_url = mongo_server.url.replace("/?", "/shop?")
    cluster.env["RT_MONGO_URL"] = mongo_url
    mem = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "mem", "RT_MONGO_URL": mongo_url})
    await mem.wait_ready()
    ingest = await cluster.ingest()
    await ingest.wait_active()
    node = await cluster.node()
    docs = _mongo_docs()
    n_pg, n_mongo, n_events = len(PG_CHANGES), len(docs) + 2, len(PAYLOADS)
    total = n_pg + n_mongo + n_events
    n_filtered = sum(len(passed) for passed in PASSED.values())
    try:
        async with contextlib.AsyncExitStack() as stack:
            conns = {}
            for name, gw in (("mem", mem), ("node", node)):
                for filtered in (False, True):
                    c = await stack.enter_async_context(ws_connect(gw, "w1", token=gw.token("w1")))
                    conns[name, filtered] = (c, await _subscribe_all(c, filtered))
            for stmt in PG_CHANGES:
                await cluster.db.execute(stmt)
            for doc in docs:
                await things.insert_one(doc)
            await things.update_one({"_id": 2}, {"$set": {"dec": Decimal128("-Infinity")}})
            # (another document: the update's is read when each stream reaches it, "updateLookup")
            await things.delete_one({"_id": 3})
            for payload in PAYLOADS:
                await _publish(mem, payload)
                await _publish(node, payload)
            live = {key: await _frames(c, total if not key[1] else n_filtered) for key, (c, _) in conns.items()}
        # replayed from the single gateway's history, and read back from Kafka by a node that
        # remembers one event
        async with ws_connect(mem, "w1", token=mem.token("w1")) as c:
            await _resubscribe_all(c, False, conns["mem", False][1])
            replay_mem = await _frames(c, total)
        node2 = await cluster.node(RT_HISTORY_EVENTS="1")
        await asyncio.sleep(1)
        async with ws_connect(node2, "w1", token=node2.token("w1")) as c:
            await _resubscribe_all(c, False, conns["node", False][1])
            read_back = await _frames(c, total)
        async with ws_connect(node2, "w1", token=node2.token("w1")) as c:
            await _resubscribe_all(c, True, conns["node", True][1])
            read_back_filtered = await _frames(c, n_filtered)
    finally:
        await mongo.close()

    mem_live, node_live = _by_channel(live["mem", False]), _by_channel(live["node", False])
    # PostgreSQL and MongoDB changes: byte for byte, but for seq
    for channel in ("postgres:hard", "mongo:things"):
        assert _without(node_live[channel]) == _without(mem_live[channel]), channel
    # custom events: each gateway stamped its own time
    assert _without(node_live["events:hard"], "timestamp") == _without(mem_live["events:hard"], "timestamp")
    # a replay from memory is the live frames, seq included; a read-back from Kafka too
    # (each subscribe replays its own channel: in seq order once merged)
    assert sorted(replay_mem, key=_seq) == live["mem", False]
    assert sorted(read_back, key=_seq) == live["node", False]
    # filters decide alike on every path
    for frames in (live["mem", True], live["node", True], read_back_filtered):
        by = _by_channel(frames)
        got = {ch: [_position(f, mem_live if frames is live["mem", True] else node_live) for f in fs]
               for ch, fs in by.items()}
        assert got == PASSED, got
    assert sorted(read_back_filtered, key=_seq) == live["node", True]


def _seq(frame: bytes) -> int:
    return json.loads(frame)["seq"]


def _position(frame: bytes, unfiltered: dict[str, list[bytes]]) -> int:
    """Which of its channel's events (1-based) `frame` is, found among the unfiltered frames."""
    channel = json.loads(frame)["channel"]
    return [SEQ.sub(b"", f) for f in unfiltered[channel]].index(SEQ.sub(b"", frame)) + 1


# Text values pgoutput sends, by type OID, that are hard to carry
PG_TEXTS = {
    1700: ["0", "NaN", "Infinity", "-Infinity", "9223372036854775807", "-9223372036854775808", "9223372036854775808",
           "1" + "0" * 400, "-1" + "0" * 400 + ".5", "0." + "0" * 400 + "1", "123.4500"],
    700: ["NaN", "Infinity", "-Infinity", "-0", "3.4028235e+38", "1e-45"],
    701: ["NaN", "-0", "1.7976931348623157e+308", "5e-324"],
    3802: ['{"a": 1, "a": 2}', '{"b":1,"a":2}', "18446744073709551616", '"\\u0000\\ud83d\\ude00"', "[1e308, -1e-400]",
           "[" * 600 + "]" * 600],
    114: ["1e400", '"\\ud800"', '{"x" : [1, 2]} '],
    1114: ["infinity", "2024-01-15 10:00:00.123456", "0044-03-15 10:00:00 BC", "10000-01-01 00:00:00"],
    1184: ["-infinity", "2024-01-15 10:00:00.123456+00", "0044-03-15 10:00:00+00 BC", "2024-01-15 10:00:00.5-03:30:15"],
    17: ["\\x", "\\x00ff"],
    1231: ["{NaN,Infinity,-0,1" + "0" * 400 + "}", "[0:1]={1,NULL}"],
    1021: ["{NaN,-Infinity,-0}"],
    1009: ['{"a\\"b","NULL",NULL," x ", y z }'],
    1185: ['{"2024-01-15 10:00:00+00",-infinity}'],
}


def _same(a, b) -> bool:
    """Equal values of the same types, NaN equal to NaN and -0.0 apart from 0.0."""
    if isinstance(a, float) and isinstance(b, float):
        return repr(a) == repr(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("oid,text", [(oid, text) for oid, texts in PG_TEXTS.items() for text in texts])
def test_the_compiled_pgoutput_converts_hard_values_as_its_reference(oid, text):
    from rtcore import pgoutput, pgoutput_ref

    assert _same(pgoutput.convert_value(oid, text), pgoutput_ref.convert_value(oid, text))


def test_the_compiled_mongo_normalizer_converts_hard_values_as_its_reference():
    import bson

    from rtcore import mongo, mongo_ref

    for doc in _mongo_docs():
        change = {"_id": {"_data": "82"}, "operationType": "insert", "ns": {"db": "shop", "coll": "things"},
                  "documentKey": {"_id": doc["_id"]}, "fullDocument": doc,
                  "wallTime": datetime.datetime(2024, 1, 1)}
        raw = bson.encode(change)
        compiled, reference = mongo.normalize_raw(raw, ["w1"])[0], mongo_ref.normalize_raw(raw, ["w1"])[0]
        assert compiled.body == reference.body
        assert _same(compiled.record, reference.record)


def test_a_record_crosses_the_bus_unchanged():
    """What the nodes' filters see is the record the source made: NaN, ±Infinity and -0.0 too,
    beside integers beyond 64 bits (which alone travel as JSON)."""
    from rtcore.event import Event
    from rtserver.bus_kafka import decode_event, encode_event

    record = {"f": float("nan"), "inf": float("inf"), "z": -0.0, "j": {"n": 2**70, "a": [-(2**64), 2**64 - 1, True]},
              "k": -(2**63), "s": "\U0001F600"}
    old = [float("-inf"), 2**100]
    _, event = decode_event("w1", encode_event(Event("w1", "postgres", "t", "UPDATE", record, b"{}", old)))
    assert _same(event.record, record) and _same(event.old_record, old)
    _, event = decode_event("w1", encode_event(Event("w1", "events", "t", "PUBLISH", 2**70, b"{}")))
    assert event.record == 2**70
