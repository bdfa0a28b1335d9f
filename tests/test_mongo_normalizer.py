"""rtcore.mongo (compiled) against rtcore.mongo_ref: the same JSON values and byte-identical
event bodies for any BSON document, from decoded dicts and from raw BSON alike."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import struct
import uuid

import bson
import pytest
from bson import Code, DBRef, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary, UuidRepresentation
from bson.datetime_ms import DatetimeMS
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.mongo_docs import order_change
from rtcore import mongo, mongo_ref

pytestmark = pytest.mark.skipif(not mongo.__file__.endswith(".so"), reason="rtcore.mongo is not compiled")

EPOCH_MS = st.integers(min_value=-62135596800000, max_value=253402300799999)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(Int64),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(min_size=12, max_size=12).map(ObjectId),
    EPOCH_MS.map(lambda ms: dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=ms)),
    st.decimals(allow_nan=True, allow_infinity=True, places=None).filter(
        lambda d: len(d.as_tuple().digits) <= 34 and -6000 < d.as_tuple().exponent < 6000
        if d.is_finite() else True).map(lambda d: Decimal128(d)),
    st.binary(max_size=20).map(lambda b: Binary(b, 0)),
    st.uuids().map(lambda u: Binary.from_uuid(u, UuidRepresentation.STANDARD)),
    st.binary(max_size=8).map(lambda b: Binary(b, 5)),
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)).map(lambda t: Timestamp(*t)),
)
keys = st.text(alphabet=st.characters(blacklist_characters="\x00$.", blacklist_categories=("Cs",)), min_size=1, max_size=8)
documents = st.recursive(
    st.dictionaries(keys, scalars, max_size=5),
    lambda children: st.dictionaries(keys, st.one_of(scalars, children, st.lists(st.one_of(scalars, children), max_size=4)),
                                     max_size=5),
    max_leaves=30,
)


def _same(a, b) -> bool:
    """Equal values, NaN included (a Decimal128 NaN is a float NaN, which == never equals);
    repr also tells 1 from 1.0."""
    return repr(a) == repr(b)


def _through_bson(doc):
    """What PyMongo hands over: the document after a BSON round trip."""
    return bson.decode(bson.encode({"d": doc}))["d"]


@settings(max_examples=300, deadline=None)
@given(documents)
def test_values_match_reference(doc):
    decoded = _through_bson(doc)
    assert _same(mongo.to_json(decoded), mongo_ref.to_json(decoded))
    raw = bson.encode(doc)
    assert _same(mongo.decode_raw(raw), mongo_ref.decode_raw(raw))
    json.dumps(mongo.decode_raw(raw), allow_nan=True)  # JSON-ready


@settings(max_examples=200, deadline=None)
@given(documents, st.sampled_from(["insert", "update", "replace", "delete"]), st.booleans())
def test_bodies_match_reference_byte_for_byte(doc, op, with_before):
    change = order_change(1, op)
    if op != "delete":
        change["fullDocument"] = {"_id": 1, **doc}
    if with_before:
        change["fullDocumentBeforeChange"] = {"_id": 1, **doc}
    change = _through_bson(change)
    raw = bson.encode(change)
    expected = mongo_ref.normalize_change(change, ["w1", "w2"])
    for got in (mongo.normalize_change(change, ["w1", "w2"]), mongo.normalize_raw(raw, ["w1", "w2"]),
                mongo.normalize_decoded(mongo.decode_raw(raw), ["w1", "w2"])):
        assert [e.body for e in got] == [e.body for e in expected]
        assert _same([(e.workspace, e.entity, e.operation, e.record, e.old_record) for e in got],
                     [(e.workspace, e.entity, e.operation, e.record, e.old_record) for e in expected])


# Every BSON type a stored document can hold, dates over the whole int64 range, NaN and
# infinite doubles, any binary subtype, keys with '.' and '$' (MongoDB 5.0+) or repeated.
rare_scalars = st.one_of(
    scalars,
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(DatetimeMS),
    st.floats(),
    st.tuples(st.text(alphabet="ab.*^$", max_size=5), st.sets(st.sampled_from("ilmsux"))).map(
        lambda t: Regex(t[0], "".join(sorted(t[1])))),
    st.just(MinKey()), st.just(MaxKey()),
    st.text(max_size=8).map(Code),
    st.text(max_size=8).map(lambda c: Code(c, {"x": 1})),
    st.tuples(st.binary(max_size=20), st.sampled_from([1, 3, 4, 6, 7, 128])).map(lambda t: Binary(*t)),
    st.builds(DBRef, st.text(min_size=1, max_size=5), st.integers(0, 9), st.one_of(st.none(), st.text(max_size=5))),
)
rare_keys = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=4)
rare_documents = st.recursive(
    st.lists(st.tuples(rare_keys, rare_scalars), max_size=5),
    lambda children: st.lists(st.tuples(rare_keys, st.one_of(rare_scalars, children.map(bson.SON),
                                                              st.lists(st.one_of(rare_scalars, children.map(bson.SON)),
                                                                       max_size=3))), max_size=5),
    max_leaves=25,
)


def _raw_with(pairs) -> bytes:
    """BSON of a document holding `pairs` in order, a repeated key repeated (bson.SON would keep one)."""
    body = b"".join(bson.encode({k: v})[4:-1] for k, v in pairs)
    return (len(body) + 5).to_bytes(4, "little") + body + b"\x00"


@settings(max_examples=300, deadline=None)
@given(rare_documents, st.sampled_from(["insert", "update", "replace", "delete"]))
def test_raw_bson_of_every_type_gives_the_reference_body(pairs, op):
    """normalize_raw, compiled and reference (what the feed runs without the extension), from the
    same bytes: the same body and record, or both refuse them."""
    change = order_change(1, op)
    change.pop("fullDocument", None)
    head = bson.encode(change)[:-1]
    element = b"\x03fullDocument\x00" + _raw_with([("_id", 1), *pairs]) if op != "delete" else b""
    raw = (len(head) + len(element) + 1).to_bytes(4, "little") + head[4:] + element + b"\x00"
    outcomes = []
    for impl in (mongo, mongo_ref):
        try:
            outcomes.append([(e.body, repr(e.record)) for e in impl.normalize_raw(raw, ["w1"])])
        except Exception as exc:  # noqa: BLE001 - both must refuse the same bytes
            outcomes.append(type(exc).__name__)
    assert outcomes[0] == outcomes[1] or (isinstance(outcomes[0], str) and isinstance(outcomes[1], str))


def test_bson_type_mapping():
    oid = ObjectId("65a5f0c2e4b0a1b2c3d4e5f6")
    value = {
        "oid": oid,
        "naive": dt.datetime(2024, 1, 15, 10, 0, 0, 999999),
        "aware": dt.datetime(2024, 1, 15, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "dec": Decimal128("198.95"),
        "decint": Decimal128("1.000"),
        "nan": Decimal128("NaN"),
        "bytes": b"\x00\xff",
        "bin": Binary(b"\x01\x02", 0),
        "uuid4": Binary.from_uuid(uuid.UUID(int=1), UuidRepresentation.STANDARD),
        "pyuuid": uuid.UUID(int=2),
        "int64": Int64(5),
        "ts": Timestamp(1705312800, 3),
        "re": Regex("^a", "im"),
        "min": MinKey(),
        "max": MaxKey(),
        "ref": DBRef("orders", oid, "shop"),
        "code": Code("x = 1"),
        "nested": [{"d": dt.datetime(1969, 12, 31, 23, 59, 59, 1000)}],
    }
    expected = {
        "oid": "65a5f0c2e4b0a1b2c3d4e5f6",
        "naive": "2024-01-15T10:00:00.999Z",
        "aware": "2024-01-15T10:00:00.000Z",
        "dec": 198.95,
        "decint": 1,
        "nan": math.nan,  # clients see null; filters see NaN
        "bytes": "AP8=",
        "bin": "AQI=",
        "uuid4": "00000000-0000-0000-0000-000000000001",
        "pyuuid": "00000000-0000-0000-0000-000000000002",
        "int64": 5,
        "ts": {"t": 1705312800, "i": 3},
        "re": {"$regex": "^a", "$options": "im"},
        "min": {"$minKey": 1},
        "max": {"$maxKey": 1},
        "ref": {"$ref": "orders", "$id": "65a5f0c2e4b0a1b2c3d4e5f6", "$db": "shop"},
        "code": "x = 1",
        "nested": [{"d": "1969-12-31T23:59:59.001Z"}],
    }
    for impl in (mongo, mongo_ref):
        got = impl.to_json(value)
        assert _same(got, expected)
        assert type(got["int64"]) is int and type(got["decint"]) is int
    raw_value = {k: v for k, v in value.items() if k != "pyuuid"}  # BSON has no native UUID
    raw_expected = {k: v for k, v in expected.items() if k != "pyuuid"}
    assert _same(mongo.decode_raw(bson.encode(raw_value)), raw_expected)


def test_deprecated_bson_types_have_the_json_docs_mongo_md_gives():
    """docs/mongo.md's BSON table: Symbol a string, Undefined null, DBPointer as a DBRef,
    JavaScript code with scope its source text (the scope left out), on every path. MongoDB
    still stores such values written by old drivers; PyMongo cannot encode them, so the BSON
    is written out here."""
    def element(kind: int, name: str, payload: bytes) -> bytes:
        return bytes([kind]) + name.encode() + b"\x00" + payload

    def string(text: str) -> bytes:
        data = text.encode() + b"\x00"
        return len(data).to_bytes(4, "little") + data

    empty = (5).to_bytes(4, "little") + b"\x00"
    code_with_scope = string("x = 1") + empty
    body = b"".join((
        element(0x10, "_id", (1).to_bytes(4, "little")),
        element(0x0E, "sym", string("abc")),
        element(0x06, "undef", b""),
        element(0x0C, "ptr", string("orders") + bytes.fromhex("65a5f0c2e4b0a1b2c3d4e5f6")),
        element(0x0F, "scoped", (4 + len(code_with_scope)).to_bytes(4, "little") + code_with_scope),
    ))
    raw = (len(body) + 5).to_bytes(4, "little") + body + b"\x00"
    expected = {"_id": 1, "sym": "abc", "undef": None, "ptr": {"$ref": "orders", "$id": "65a5f0c2e4b0a1b2c3d4e5f6"},
                "scoped": "x = 1"}
    for impl in (mongo, mongo_ref):
        assert impl.decode_raw(raw) == expected
        change = order_change(1, "insert")
        change.pop("fullDocument")
        head = bson.encode(change)[:-1]
        full = b"\x03fullDocument\x00" + raw
        event_raw = (len(head) + len(full) + 1).to_bytes(4, "little") + head[4:] + full + b"\x00"
        (event,) = impl.normalize_raw(event_raw, ["w1"])
        assert json.loads(event.body)["document"] == expected


@pytest.mark.parametrize(("ms", "text"), [
    (253402300799999, "9999-12-31T23:59:59.999Z"),
    (253402300800000, "+010000-01-01T00:00:00.000Z"),  # as JavaScript's toISOString writes it
    (-62167219200000, "0000-01-01T00:00:00.000Z"),
    (-62167219200001, "-000001-12-31T23:59:59.999Z"),
    (-30610224000001, "0999-12-31T23:59:59.999Z"),
    (2**63 - 1, "+292278994-08-17T07:12:55.807Z"),
])
def test_dates_beyond_four_digit_years_are_written_not_refused(ms, text):
    # MongoDB stores any int64 of milliseconds; a change holding one must still be delivered.
    from bson.codec_options import CodecOptions, DatetimeConversion
    from bson.datetime_ms import DatetimeMS

    change = order_change(1, "insert")
    change["fullDocument"] = {"_id": 1, "d": DatetimeMS(ms), "list": [DatetimeMS(ms)]}
    raw = bson.encode(change)
    decoded = bson.decode(raw, CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO))
    expected = mongo_ref.normalize_change(decoded, ["w1"])
    assert expected[0].record["d"] == text and expected[0].record["list"] == [text]
    fast = mongo.normalize_raw_fast_path(raw, ["w1"])
    for got in (fast, mongo.normalize_raw(raw, ["w1"]), mongo.normalize_decoded(mongo.decode_raw(raw), ["w1"])):
        assert [(e.body, e.record) for e in got] == [(e.body, e.record) for e in expected]


@pytest.mark.parametrize("ms", [253402300800000, -62167219200000, -62135596800001, 2**63 - 1, -(2**63)])
def test_the_reference_reads_far_dates_as_the_compiled_module_does(ms):
    """rtcore.mongo_ref is what the feed runs when the extension is not built: a date PyMongo's
    datetime cannot hold (before year 1, after 9999; MongoDB keeps any int64) must be delivered
    by it too, with the same text, not refused as malformed (and the change skipped)."""
    from bson.datetime_ms import DatetimeMS

    change = order_change(1, "insert")
    change["fullDocument"] = {"_id": 1, "d": DatetimeMS(ms), "list": [DatetimeMS(ms)]}
    change["wallTime"] = DatetimeMS(ms)
    raw = bson.encode(change)
    assert mongo_ref.decode_raw(raw) == mongo.decode_raw(raw)
    expected = [(e.body, e.record) for e in mongo.normalize_raw(raw, ["w1"])]
    assert json.loads(expected[0][0])["timestamp"] == expected[0][1]["d"]  # wallTime, as written
    for got in (mongo_ref.normalize_raw(raw, ["w1"]), mongo_ref.normalize_decoded(mongo_ref.decode_raw(raw), ["w1"])):
        assert [(e.body, e.record) for e in got] == expected


def test_memoryview_of_bson_is_accepted():
    # PyMongo hands over a large reply's documents as memoryviews of its buffer.
    raw = bson.encode(order_change(3, "insert"))
    for impl in (mongo, mongo_ref):
        assert [e.body for e in impl.normalize_raw(memoryview(raw), ["w1"])] == [
            e.body for e in impl.normalize_raw(raw, ["w1"])]
        assert impl.decode_raw(memoryview(raw)) == impl.decode_raw(raw)


def test_a_delete_with_a_pre_image_is_matched_on_it():
    """Predicates of a DELETE read its documentKey: a subscription to {"status": "paid"} never
    saw a paid document deleted, though its pre-image (oldDocument) was in the change, as a
    PostgreSQL DELETE under REPLICA IDENTITY FULL is matched on the old row. With a pre-image
    they read it (the body's `document` stays the key); without one, the key as before."""
    change = order_change(3, "delete")
    before = {"_id": change["documentKey"]["_id"], "status": "paid", "total": 5}
    for pre_image in (True, False):
        if pre_image:
            change["fullDocumentBeforeChange"] = before
        change = _through_bson(change)
        raw = bson.encode(change)
        for events in (mongo_ref.normalize_change(change, ["w1"]), mongo.normalize_change(change, ["w1"]),
                       mongo.normalize_raw(raw, ["w1"]), mongo.normalize_decoded(mongo.decode_raw(raw), ["w1"]),
                       mongo_ref.normalize_decoded(mongo_ref.decode_raw(raw), ["w1"])):
            (event,) = events
            body = json.loads(event.body)
            assert body["document"] == {"_id": "65a500000000000000000003"}
            if pre_image:
                assert event.record == {"_id": "65a500000000000000000003", "status": "paid", "total": 5}
                assert body["oldDocument"] == event.record
            else:
                assert event.record == {"_id": "65a500000000000000000003"} and "oldDocument" not in body
        change.pop("fullDocumentBeforeChange", None)


def test_event_fields_and_non_data_events():
    change = order_change(7, "update")
    (event,) = mongo.normalize_change(change, ["w1"])
    body = json.loads(event.body)
    assert (event.source, event.entity, event.operation, event.channel) == ("mongo", "orders", "UPDATE", "mongo:orders")
    assert body["type"] == "event" and body["operationType"] == "update" and body["collection"] == "orders"
    assert body["timestamp"] == "2024-01-15T10:00:07.123Z"
    assert re.match(r"^mongo-[0-9a-f]{24}$", body["correlationId"])
    assert body["updateDescription"] == {"updatedFields": {"status": "paid", "updatedAt": "2024-01-15T10:00:07.123Z"},
                                         "removedFields": []}
    assert event.record is not None and event.record["_id"] == "65a500000000000000000007"
    for op in ("drop", "invalidate", "rename", "dropDatabase"):
        assert mongo.normalize_change({"operationType": op, "_id": {"_data": "00"}}, ["w1"]) == []
    assert mongo.normalize_change(change, []) == []


def test_correlation_id_and_timestamp_fallbacks():
    change = order_change(1, "insert")
    sid = Binary.from_uuid(uuid.UUID(int=9), UuidRepresentation.STANDARD)
    change.update(lsid={"id": sid, "uid": b"\x00" * 32}, txnNumber=Int64(4))
    del change["wallTime"]
    for impl in (mongo, mongo_ref):
        body = json.loads(impl.normalize_change(change, ["w"])[0].body)
        assert body["correlationId"] == "00000000-0000-0000-0000-000000000009:4"
        assert body["timestamp"] == "2024-01-15T10:00:01.000Z"  # clusterTime's seconds
    body = json.loads(mongo.normalize_raw(bson.encode(change), ["w"])[0].body)
    assert body["correlationId"] == "00000000-0000-0000-0000-000000000009:4"


def test_decimal128_special_values_are_numbers_to_filters_and_null_to_clients():
    """Decimal128 NaN/±Infinity reach clients as null (JSON has no such number) but filters see
    the number, as for a double and as MongoDB compares them (docs/protocol.md): Infinity is
    $gt every finite number, null does not match NaN. The smallest int64 is an integer."""
    from rtcore.predicate import compile_predicates

    change = order_change(1, "insert")
    change["fullDocument"] = {"_id": 1, "dinf": Decimal128("Infinity"), "dninf": Decimal128("-Infinity"),
                              "dnan": Decimal128("NaN"), "inf": float("inf"), "low": Decimal128("-9223372036854775808")}
    raw = bson.encode(change)
    paths = [mongo.normalize_raw_fast_path(raw, ["w"]), mongo.normalize_raw(raw, ["w"]),
             mongo.normalize_decoded(mongo.decode_raw(raw), ["w"]), mongo_ref.normalize_raw(raw, ["w"]),
             mongo.normalize_change(bson.decode(raw), ["w"])]
    for (event,) in paths:
        assert json.loads(event.body)["document"] == {"_id": 1, "dinf": None, "dninf": None, "dnan": None, "inf": None,
                                                      "low": -9223372036854775808}
        record = event.record
        assert type(record["low"]) is int
        assert compile_predicates({"dinf": {"$gt": 1e308}}).matches(record)
        assert compile_predicates({"inf": {"$gt": 1e308}}).matches(record)
        assert compile_predicates({"dninf": {"$lt": -1e308}}).matches(record)
        assert not compile_predicates({"dnan": None}).matches(record)
        assert not compile_predicates({"dinf": None}).matches(record)
        assert not compile_predicates({"dnan": {"$gt": 0}}).matches(record)


def test_dbref_keeps_its_extra_fields_on_every_path():
    """A DBRef is a sub-document ({$ref, $id, $db} first, other fields allowed): every path
    delivers all of its fields; the reference (the fallback when rtcore.mongo is not built)
    dropped those after $db."""
    oid = ObjectId("65a5f0c2e4b0a1b2c3d4e5f6")
    change = order_change(1, "insert")
    change["fullDocument"] = {"_id": 1, "ref": {"$ref": "c", "$id": oid, "$db": "shop", "note": "x", "n": 2}}
    raw = bson.encode(change)
    want = {"$ref": "c", "$id": "65a5f0c2e4b0a1b2c3d4e5f6", "$db": "shop", "note": "x", "n": 2}
    bodies = set()
    for (event,) in (mongo.normalize_raw(raw, ["w"]), mongo_ref.normalize_raw(raw, ["w"]),
                     mongo.normalize_change(bson.decode(raw), ["w"]), mongo_ref.normalize_change(bson.decode(raw), ["w"])):
        assert event.record["ref"] == want
        bodies.add(event.body)
    assert len(bodies) == 1
    assert mongo_ref.to_json(DBRef("c", oid, "shop", note="x")) == {"$ref": "c", "$id": "65a5f0c2e4b0a1b2c3d4e5f6",
                                                                      "$db": "shop", "note": "x"}


def test_a_sub_document_with_ref_and_id_keeps_its_stored_field_order():
    """{"note": .., "$ref": .., "$id": ..} (or $id before $ref): bson.decode makes a DBRef of it,
    which the reference (the feed without the extension) wrote $ref, $id first, so its bodies
    were not the compiled module's, byte for byte, as they must be."""
    change = order_change(1, "insert")
    change["fullDocument"] = bson.SON([("_id", 1), ("a", bson.SON([("note", "x"), ("$ref", "c"), ("$id", 1)])),
                                       ("b", [bson.SON([("$id", 2), ("$ref", "d"), ("$db", "s")])])])
    raw = bson.encode(change)
    want = b'"document":{"_id":1,"a":{"note":"x","$ref":"c","$id":1},"b":[{"$id":2,"$ref":"d","$db":"s"}]}'
    for impl in (mongo, mongo_ref):
        (event,) = impl.normalize_raw(raw, ["w"])
        assert want in event.body
        assert list(event.record["a"]) == ["note", "$ref", "$id"]
        assert list(impl.decode_raw(raw)["fullDocument"]["b"][0]) == ["$id", "$ref", "$db"]


@pytest.mark.parametrize("token", [{"_data": Binary(b"\x82abc", 0)}, {"x": 1}, {"_data": 5}, {"_data": "82AB"}, "t"])
def test_the_correlation_id_of_any_token_is_the_same_on_every_path(token):
    """A token without a _data string (no MongoDB 4.4+ sends one, a proxy may): the reference
    digested the repr of what bson.decode made of it (a Binary, a RawBSONDocument), not the
    JSON value the compiled module digests, so the same change had two correlation ids."""
    change = order_change(1, "insert")
    change["_id"] = token
    raw = bson.encode(change)
    ids = {event.body.split(b'"correlationId":')[1]
           for impl in (mongo, mongo_ref)
           for (event,) in (impl.normalize_raw(raw, ["w"]), impl.normalize_decoded(impl.decode_raw(raw), ["w"]),
                            impl.normalize_change(bson.decode(raw), ["w"]))}
    assert len(ids) == 1, ids


def test_update_without_document_keeps_key_as_record():
    change = order_change(2, "update")
    change["fullDocument"] = None
    for impl in (mongo, mongo_ref):
        (event,) = impl.normalize_change(change, ["w"])
        assert json.loads(event.body)["document"] is None
        assert event.record == {"_id": "65a500000000000000000002"}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_correlation_digest_is_blake2b(data):
    import hashlib

    assert mongo.blake2b_96_hex(data) == hashlib.blake2b(data, digest_size=12).hexdigest()


@pytest.mark.parametrize("cut", [1, 5, 30, 200])
def test_malformed_bson_is_refused(cut):
    raw = bson.encode(order_change(1, "insert"))
    with pytest.raises(ValueError):
        mongo.decode_raw(raw[:-cut])


@pytest.mark.parametrize("element", [
    b"\x0cv\x00" + struct.pack("<i", 0x7FFFFFFF) + b"ab\x00" + b"x" * 12,  # DBPointer, 4 + size + 12 past int32
    b"\x0cv\x00" + struct.pack("<i", -17) + b"ab\x00" + b"x" * 12,  # DBPointer, negative length
    b"\x0fv\x00" + struct.pack("<i", -4) + b"x" * 20,  # code with scope, negative length
])
def test_rare_elements_with_bad_lengths_are_invalid_bson(element):
    """A DBPointer or code with scope whose length is negative (or whose end is past int32): the
    compiled decoder moved back by it and failed with SystemError ("Negative size passed to
    PyBytes_FromStringAndSize"), after a signed overflow in C for the DBPointer, where the
    reference says InvalidBSON: the skipped change's log and history_gap named a different
    error depending on the build. Only a broken server sends such BSON (MongoDB validates it)."""
    raw = struct.pack("<i", len(element) + 5) + element + b"\x00"
    for impl in (mongo, mongo_ref):
        with pytest.raises(Exception) as refused:  # noqa: PT011 - which one is the point
            impl.decode_raw(raw)
        assert type(refused.value).__name__ == "InvalidBSON", (impl.__name__, refused.value)


@pytest.mark.parametrize("kind", [b"\x02", b"\x05", b"\x0c"])
def test_a_value_length_near_2_31_in_a_change_is_invalid_bson(kind):
    """The one-pass path's skip of a value added its length to 4 (or 5) in int32: past 2**31 a
    signed overflow (undefined in C; with -fwrapv it wrapped negative and happened to be
    refused). The change takes the general path, which refuses it."""
    change = bson.encode(order_change(1, "insert"))
    element = kind + b"junk\x00" + struct.pack("<i", 0x7FFFFFFF) + b"\x00" * 8
    raw = struct.pack("<i", len(change) + len(element)) + change[4:-1] + element + b"\x00"
    assert mongo.normalize_raw_fast_path(raw, ["w1"]) is None
    for impl in (mongo, mongo_ref):
        with pytest.raises(Exception) as refused:  # noqa: PT011 - which one is the point
            impl.normalize_raw(raw, ["w1"])
        assert type(refused.value).__name__ == "InvalidBSON", (impl.__name__, refused.value)


def test_benchmark_shapes_take_the_compiled_fast_path():
    """The data changes the source sees go through the one-pass raw path, not a silent fallback."""
    import bson

    from rtcore import mongo as compiled

    for op in ("insert", "update", "replace", "delete"):
        assert compiled.normalize_raw_fast_path(bson.encode(order_change(1, op)), ["w"]) is not None, op


_MARK = "\x07mark\x07"


@settings(max_examples=200, deadline=None)
@given(documents, st.sampled_from(["insert", "update", "replace", "delete"]), st.sampled_from(["key", "value", "nested"]),
       st.integers(0x80, 0xFF))
def test_text_that_is_no_utf8_is_refused_alike(doc, op, where, byte):
    """MongoDB keeps a string that is no UTF-8 (a driver that does not check wrote it). The
    compiled decoder refused such a change with UnicodeDecodeError where the reference (and
    PyMongo) say InvalidBSON, so the skipped change's history_gap and log named a different
    error depending on the build. Both now raise InvalidBSON with the same text."""
    bad = {"key": {_MARK: 1}, "value": {"s": _MARK}, "nested": {"l": [{"a": ["x", _MARK]}]}}[where]
    change = order_change(1, op)
    change["fullDocument"] = {"_id": 1, **doc, **bad}
    change["documentKey"] = {"_id": 1, **bad} if op == "delete" else change["documentKey"]
    raw = bson.encode(change).replace(_MARK.encode(), b"\x07m" + bytes([byte]) + b"rk\x07", 1)
    outcomes = []
    for impl in (mongo, mongo_ref):
        for call, args in ((impl.normalize_raw, (raw, ["w1"])), (impl.decode_raw, (raw,))):
            with pytest.raises(Exception) as refused:  # noqa: PT011 - which one is the point
                call(*args)
            outcomes.append((type(refused.value).__name__, str(refused.value)))
    assert outcomes == [outcomes[-1]] * 4
    assert outcomes[0][0] == "InvalidBSON"
