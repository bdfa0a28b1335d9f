"""The compiled pgoutput decoder against the reference, on streams captured from real PostgreSQL."""

from __future__ import annotations

import asyncio
import struct

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtcore import pgoutput, pgoutput_ref
from rtcore.pgoutput_ref import UNCHANGED, parse_array
from rtserver.sources.pg_stream import ReplicationStream

WORKLOAD = [
    "CREATE TYPE mood AS ENUM ('sad', 'ok')",
    """CREATE TABLE t (id serial PRIMARY KEY, a int2, b int8, n numeric, n2 numeric(10,2), f float8, f4 float4,
       ok bool, tx text, vc varchar(10), bc char(3), u uuid, j json, jb jsonb, d date, tm time, ts timestamp,
       tz timestamptz, by bytea, ai int[], at text[], m mood, am mood[], iv interval, big text)""",
    "ALTER TABLE t ALTER big SET STORAGE EXTERNAL",
    "CREATE TABLE full_t (id int PRIMARY KEY, big text)",
    "ALTER TABLE full_t REPLICA IDENTITY FULL",
]
CHANGES = [
    """INSERT INTO t (a,b,n,n2,f,f4,ok,tx,vc,bc,u,j,jb,d,tm,ts,tz,by,ai,at,m,am,iv) VALUES
       (1, 9007199254740993, 123456789012345678901234, 3.14, 1.5, 'NaN', true, 'hé "x"', 'v', 'ab',
        gen_random_uuid(), '{"a":[1,2]}', '{"b":null}', '2024-01-15', '10:00:01.5', '2024-01-15 10:00:00.123',
        '2024-01-15 12:00:00.5+02', '\\x00ff10', '{{1,2},{3,NULL}}', '{"a b","c\\"d",NULL,"NULL",e}', 'ok',
        '{sad,ok}', '1 day 2 hours')""",
    "INSERT INTO t (big) VALUES (repeat(md5('x'), 1000))",
    "UPDATE t SET a = 5 WHERE big IS NOT NULL",
    "INSERT INTO full_t VALUES (1, repeat(md5('y'), 1000))",
    "UPDATE full_t SET id = 2",
    "BEGIN; SELECT pg_logical_emit_message(true, 'rt.correlation', 'corr-1'); DELETE FROM t WHERE id = 1; COMMIT",
    "SELECT pg_logical_emit_message(false, 'other', 'x')",
    "ALTER TABLE t ADD COLUMN extra int",
    "INSERT INTO t (extra) SELECT generate_series(1, 500)",
    "TRUNCATE t, full_t",
]


async def capture(dsn: str, count_commits: int) -> list[bytes]:
    stream = ReplicationStream(dsn, "cap", "cap_pub")
    await stream.connect(0)
    frames: list[bytes] = []
    done = asyncio.Event()

    def on_frame(f: bytes) -> None:
        frames.append(f)
        if sum(1 for x in frames if x[:1] == b"w" and x[25:26] == b"C") >= count_commits:
            done.set()

    stream.add_reader(lambda: stream.read_available(on_frame))
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        await stream.close()
    return frames


@pytest.fixture
async def captured(pg_database) -> list[bytes]:
    conn = await asyncpg.connect(pg_database)
    try:
        for sql in WORKLOAD:
            await conn.execute(sql)
        await conn.execute("CREATE PUBLICATION cap_pub FOR TABLE t, full_t")
        await conn.execute("SELECT pg_create_logical_replication_slot('cap', 'pgoutput')")
        for sql in CHANGES:
            await conn.execute(sql)
    finally:
        await conn.close()
    return await capture(pg_database, count_commits=len(CHANGES) - 2)  # DDL and the non-tx message: no commit


@pytest.mark.postgres
async def test_compiled_equals_reference_on_captured_stream(captured):
    compiled, ref = pgoutput.Decoder(), pgoutput_ref.Decoder()
    kinds = set()
    for frame in captured:
        a, b = compiled.decode_copy(frame), ref.decode_copy(frame)
        # repr: NaN never equals itself, its repr does
        assert repr(a.astuple()) == repr(b.astuple())
        if a.kind == "w":
            kinds.add(a.message.kind)
    assert {"B", "C", "R", "Y", "I", "U", "D", "T", "M"} <= kinds
    # spot checks of the conversions on the first insert
    inserts = [m.message for m in map(ref.decode_copy, captured) if m.kind == "w" and m.message.kind == "I"]
    row = inserts[0].new
    assert row["n"] == float("123456789012345678901234") and row["b"] == 9007199254740993
    assert row["tz"] == "2024-01-15T10:00:00.5Z" and row["ai"] == [[1, 2], [3, None]]
    assert row["at"] == ["a b", 'c"d', None, "NULL", "e"] and row["by"] == "AP8Q"


@pytest.mark.postgres
async def test_unchanged_toast_marker_and_full_identity(captured):
    dec = pgoutput_ref.Decoder()
    updates = [m.message for m in map(dec.decode_copy, captured) if m.kind == "w" and m.message.kind == "U"]
    default_update = next(u for u in updates if u.relation.name == "t")
    assert default_update.new["big"] is UNCHANGED and default_update.old is None
    full_update = next(u for u in updates if u.relation.name == "full_t")
    assert full_update.old_kind == "O" and len(full_update.old["big"]) == 32000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}", []),
        ("{1,2,3}", [1, 2, 3]),
        ("{NULL,null,3}", [None, None, 3]),
        ("{{1,2},{3,4}}", [[1, 2], [3, 4]]),
        ("[0:1]={5,6}", [5, 6]),
    ],
)
def test_parse_int_array(text, expected):
    assert parse_array(text, pgoutput_ref.CONV_INT) == expected


def test_parse_text_array_quotes_and_escapes():
    assert parse_array('{"a,b","c\\\\d", e f ,"{x}","NULL",NULL}', pgoutput_ref.CONV_TEXT) == [
        "a,b", "c\\d", "e f", "{x}", "NULL", None]


@pytest.mark.parametrize("mod", [pgoutput, pgoutput_ref])
def test_truncated_message_is_an_error(mod):
    dec = mod.Decoder()
    rel = b"R" + struct.pack("!I", 1) + b"public\0t\0d" + struct.pack("!h", 1) + b"\x01id\0" + struct.pack("!Ii", 23, -1)
    dec.decode(rel)
    with pytest.raises(pgoutput_ref.DecodeError):
        dec.decode(b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", 10) + b"12")
    with pytest.raises(pgoutput_ref.DecodeError):
        dec.decode(b"I" + struct.pack("!I", 99) + b"N\0\0")


_EDGE_VALUES = [
    (701, ["1.5", "-0", "NaN", "Infinity", "-Infinity", "1e308", "4.9e-324", "0.1" + "0" * 70 + "1", "3"]),
    (1700, ["123.45", "-0.5", "42", "-42", "99999999999999999999", "9223372036854775807", "NaN", "1e5"]),
    (1114, ["2024-01-15 10:00:00", "2024-01-15 10:00:00.5", "infinity", "0044-03-15 12:00:00 BC"]),
    (1184, ["2024-01-15 10:00:00.123456+00", "2024-01-15 12:00:00+02", "2024-01-15 12:00:00.25-03:30",
            "-infinity", "0044-03-15 12:00:00+00 BC"]),
    (23, ["0", "-2147483648", "2147483647"]),
    (16, ["t", "f"]),
    (25, ["", "hé ✓", "x" * 100]),
]


@pytest.mark.parametrize(("oid", "texts"), _EDGE_VALUES, ids=[str(oid) for oid, _ in _EDGE_VALUES])
def test_compiled_conversion_fast_paths_equal_reference(oid, texts):
    """The compiled decoder's C-level int/float/timestamp paths give the reference's values."""
    rel = b"R" + struct.pack("!I", 7) + b"public\0t\0d" + struct.pack("!h", 1) + b"\x01v\0" + struct.pack("!Ii", oid, -1)
    compiled, ref = pgoutput.Decoder(), pgoutput_ref.Decoder()
    compiled.decode(rel)
    ref.decode(rel)
    for text in texts:
        raw = text.encode()
        msg = b"I" + struct.pack("!I", 7) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", len(raw)) + raw
        a, b = compiled.decode(msg), ref.decode(msg)
        assert a.kind == b.kind == "I"
        assert repr(a.astuple()) == repr(b.astuple()), text  # repr: NaN never equals itself


def _one_column(oid: int) -> bytes:
    return b"R" + struct.pack("!I", 7) + b"public\0t\0d" + struct.pack("!h", 1) + b"\x01v\0" + struct.pack("!Ii", oid, -1)


def _insert(raw: bytes) -> bytes:
    return b"I" + struct.pack("!I", 7) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", len(raw)) + raw


@pytest.mark.parametrize("oid", [700, 701, 1700])
@pytest.mark.parametrize("text", [" 1", "1 ", "\uff11", "\u0661.5", "1_0"])
def test_floats_the_c_parser_refuses_convert_as_the_reference(oid, text):
    """Crafted input PostgreSQL does not send: the compiled float path left the C parser's error
    set when it fell back to float(), which then failed the whole message with SystemError (a
    crash of the feed) where the reference converts or reports the one value."""
    compiled, ref = pgoutput.Decoder(), pgoutput_ref.Decoder()
    results = []
    for decoder in (compiled, ref):
        decoder.decode(_one_column(oid))
        results.append((decoder.decode(_insert(text.encode())).new, [e[:3] for e in decoder.errors]))
    assert repr(results[0]) == repr(results[1])


_BEYOND_ISO = [
    # docs/postgres.md: what ISO 8601 does not write stays as PostgreSQL prints it
    (1114, "infinity"), (1114, "-infinity"), (1114, "0044-03-15 12:00:00 BC"), (1114, "10000-01-01 00:00:00"),
    (1184, "infinity"), (1184, "0044-03-15 12:00:00+00 BC"), (1184, "10000-01-01 00:00:00+00"),
    (1082, "infinity"), (1082, "0044-03-15 BC"), (1082, "10000-01-01"),
]


@pytest.mark.parametrize(("oid", "text"), _BEYOND_ISO)
def test_dates_iso_cannot_write_stay_as_printed(oid, text):
    for decoder in (pgoutput.Decoder(), pgoutput_ref.Decoder()):
        decoder.decode(_one_column(oid))
        assert decoder.decode(_insert(text.encode())).new == {"v": text}


_HUGE = "1" + "0" * 400


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


_UNREPRESENTABLE = [
    # numeric beyond a double (the compiled decoder raised OverflowError, the reference gave inf)
    (1700, _HUGE, _HUGE),
    (1700, "-" + _HUGE + ".5", "-" + _HUGE + ".5"),
    (1700, "1" + "0" * 5000, "1" + "0" * 5000),  # beyond int()'s 4300 digits
    (1700, "12345678901234567890", 12345678901234567890.0),  # beyond int64, within a double
    (1231, "{1," + _HUGE + "}", [1, _HUGE]),
    # json that PostgreSQL accepts and msgspec cannot decode: the JSON text
    (114, '{"x": 1e400}', '{"x": 1e400}'),
    (114, '"\\ud800"', '"\\ud800"'),
    (199, '{"[1e400]","{\\"a\\": 1}"}', ["[1e400]", {"a": 1}]),
    # nesting deeper than the feed can encode further down the stack (MAX_JSON_DEPTH): the text
    (3802, "[" * 513 + "]" * 513, "[" * 513 + "]" * 513),
    (114, '{"a": ' * 600 + "1" + "}" * 600, '{"a": ' * 600 + "1" + "}" * 600),
    (114, '[{"a": ' * 300 + "1" + "}]" * 300, '[{"a": ' * 300 + "1" + "}]" * 300),
    # brackets inside strings (an escaped quote too) are no nesting
    (3802, '["\\"' + "[" * 600 + '"]', ['"' + "[" * 600]),
    (3802, "[" * 512 + "]" * 512, _nested(512)),
]


@pytest.mark.parametrize("mod", [pgoutput, pgoutput_ref])
@pytest.mark.parametrize(("oid", "text", "expected"), _UNREPRESENTABLE, ids=[f"{o}-{t[:12]}" for o, t, _ in _UNREPRESENTABLE])
def test_values_json_cannot_carry_become_text(mod, oid, text, expected):
    dec = mod.Decoder()
    dec.decode(_one_column(oid))
    assert dec.decode(_insert(text.encode())).new == {"v": expected}
    assert dec.errors == []  # documented conversions, not failures


@pytest.mark.parametrize(
    ("oid", "raw", "expected", "error"),
    [
        (25, b"caf\xe9", "caf\ufffd", "UnicodeDecodeError"),  # not UTF-8 (a SQL_ASCII database)
        (1007, b"{1,2", "{1,2", "IndexError"),  # a malformed array literal
        (23, b"x1", "x1", "ValueError"),
    ],
)
def test_failed_conversion_is_text_and_reported_in_both_decoders(oid, raw, expected, error):
    """A value that cannot be converted never fails its row (which stopped the whole feed): it is
    sent as its text and listed in `errors` for the source to report; both decoders agree."""
    results = []
    for mod in (pgoutput, pgoutput_ref):
        dec = mod.Decoder()
        dec.decode(_one_column(oid))
        msg = dec.decode(_insert(raw))
        assert msg.new == {"v": expected}
        assert [e[:3] for e in dec.errors] == [("public", "t", "v")] and dec.errors[0][3].startswith(error)
        results.append((repr(msg.astuple()), dec.errors))
    assert results[0] == results[1]


@pytest.mark.parametrize("mod", [pgoutput, pgoutput_ref])
def test_names_that_are_no_utf8_are_read_with_replacement_characters(mod):
    """A SQL_ASCII database keeps names in any bytes; a Relation message refused for them would
    stop the feed at that message after every restart."""
    dec = mod.Decoder()
    rel = dec.decode(b"R" + struct.pack("!I", 7) + b"p\xe9\0t\xe9\0d" + struct.pack("!h", 1) + b"\x01n\xe9\0"
                     + struct.pack("!Ii", 25, -1))
    assert (rel.schema, rel.name) == ("p\ufffd", "t\ufffd")
    assert dec.decode(_insert(b"x")).new == {"n\ufffd": "x"}


@pytest.mark.parametrize("mod", [pgoutput, pgoutput_ref])
def test_domains_convert_as_their_base_type(mod):
    dec = mod.Decoder()
    dec.decode(_one_column(70000))
    dec.register_domain(70000, 3802)  # a domain over jsonb
    assert dec.decode(_insert(b'{"q": 1}')).new == {"v": {"q": 1}}
    dec.decode(_one_column(70001))
    dec.register_array(70001, 70002)  # an array of a domain over int4
    dec.register_domain(70002, 23)
    assert dec.decode(_insert(b"{1,NULL,3}")).new == {"v": [1, None, 3]}
    dec.decode(_one_column(70003))
    dec.register_domain(70003, 1007)  # a domain over int4[]
    assert dec.decode(_insert(b"{{1,2}}")).new == {"v": [[1, 2]]}


@pytest.mark.parametrize("mod", [pgoutput, pgoutput_ref])
def test_numeric_integers_within_64_bits_stay_integers(mod):
    """docs/postgres.md: only an integer beyond 64 bits becomes a double. The smallest int64,
    -9223372036854775808, became -9.223372036854776e18 (the bound checked was -(2**63 - 1))."""
    dec = mod.Decoder()
    dec.decode(_one_column(1700))
    for value in (-(2**63), 2**63 - 1, -(2**63 - 1)):
        got = dec.decode(_insert(str(value).encode())).new["v"]
        assert type(got) is int and got == value
    assert type(dec.decode(_insert(str(-(2**63) - 1).encode())).new["v"]) is float


# ---- any bytes: the two decoders agree, a bad message is a DecodeError ----------------------

_COLUMN_OIDS = [16, 17, 20, 23, 700, 701, 1700, 114, 3802, 1114, 1184, 25, 1082, 1007, 1009, 1231, 70010]
# What a column value may hold: printed values of the types above, and bytes that are no UTF-8
# (a SQL_ASCII database sends them as they are).
_VALUE_TEXTS = [b"t", b"f", b"1", b"-7", b"1.5", b"NaN", b"1e400", b"2024-01-15 10:00:00.5+00", b"infinity",
                b"{1,NULL}", b'{"a b",c}', b"\\x00ff", b'{"a":[1]}', b"\xbb", b"t\xbb", b"\\x\xbb", b"h\xc3\xa9", b""]


def _cstr(text: bytes) -> bytes:
    return text + b"\0"


@st.composite
def _pgoutput_messages(draw, oids: list[int]) -> bytes:
    """One pgoutput message of any kind for relation 1 (whose columns have `oids`), then maybe
    cut short, with one byte changed, or with bytes after it."""
    def tuple_data() -> bytes:
        out = struct.pack("!h", len(oids))
        for _ in oids:
            kind = draw(st.sampled_from(b"ntub"))
            out += bytes([kind])
            if kind in b"tb":
                raw = draw(st.sampled_from(_VALUE_TEXTS))
                out += struct.pack("!i", len(raw)) + raw
        return out

    relid = struct.pack("!I", 1)
    kind = draw(st.sampled_from("BCIUDRYTMOSEcA"))
    message = {
        "B": lambda: b"B" + struct.pack("!Qqi", 1, 2, -3),
        "C": lambda: b"C" + struct.pack("!BQQq", 0, 1, 2, 3),
        "I": lambda: b"I" + relid + b"N" + tuple_data(),
        "U": lambda: b"U" + relid + draw(st.sampled_from([b"", b"K", b"O"])) + tuple_data() + b"N" + tuple_data(),
        "D": lambda: b"D" + relid + draw(st.sampled_from([b"K", b"O"])) + tuple_data(),
        "R": lambda: b"R" + relid + _cstr(b"public") + _cstr(b"t") + b"d" + struct.pack("!h", 1) + b"\x01"
        + _cstr(b"id") + struct.pack("!Ii", 23, -1),
        "Y": lambda: b"Y" + struct.pack("!I", 77) + _cstr(b"s") + _cstr(b"mood"),
        "T": lambda: b"T" + struct.pack("!iB", 1, 0) + relid,
        "M": lambda: b"M\x01" + struct.pack("!Q", 5) + _cstr(b"rt.correlation") + struct.pack("!i", 3) + b"abc",
        "O": lambda: b"O" + struct.pack("!Q", 5) + _cstr(b"origin"),
        "S": lambda: b"S" + struct.pack("!IB", 5, 1),
        "E": lambda: b"E",
        "c": lambda: b"c" + struct.pack("!IBQQq", 5, 0, 1, 2, 3),
        "A": lambda: b"A" + struct.pack("!II", 5, 6),
    }[kind]()
    how = draw(st.sampled_from(["whole", "cut", "byte", "more"]))
    if how == "cut":
        return message[: draw(st.integers(0, len(message) - 1))]
    if how == "byte":
        at = draw(st.integers(0, len(message) - 1))
        return message[:at] + bytes([draw(st.integers(0, 255))]) + message[at + 1:]
    return message + b"\0\1" if how == "more" else message


def _outcome(dec, decode, data: bytes) -> tuple:
    """What decoding `data` gave: the message (repr: NaN) and the conversion errors it added,
    or the exception's type and text; the decoder's streaming state either way."""
    try:
        msg = decode(data)
        result = ("message", repr(msg.astuple()), list(dec.errors))
    except Exception as exc:  # noqa: BLE001 - compared between the decoders
        result = ("error", type(exc).__name__, str(exc))
    dec.errors.clear()
    return (*result, dec.in_stream)


_RELATION_OIDS = st.lists(st.sampled_from(_COLUMN_OIDS), max_size=4)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(_RELATION_OIDS.flatmap(lambda oids: st.tuples(st.just(oids), st.lists(_pgoutput_messages(oids), max_size=6))),
       st.booleans())
def test_any_bytes_decode_alike_and_bad_ones_are_decode_errors(relation_and_messages, as_copy_data):
    """The compiled decoder and the reference (the fallback without the extension) give the
    same message, or the same DecodeError, for any bytes: a message cut short, with a byte
    changed or with bytes after it, values that are no UTF-8. The reference raised struct.error,
    IndexError or ValueError ('subsection not found') for a message cut short, read tuples of
    a negative column count as empty, and took a logical message shorter than its length."""
    oids, messages = relation_and_messages
    relation = b"R" + struct.pack("!I", 1) + b"public\0t\0d" + struct.pack("!h", len(oids)) + b"".join(
        b"\x01" + b"c%d\0" % i + struct.pack("!Ii", oid, -1) for i, oid in enumerate(oids))
    decoders = [pgoutput.Decoder(), pgoutput_ref.Decoder()]
    for dec in decoders:
        dec.register_domain(70010, 16)
        dec.decode(relation)
    for data in messages:
        if as_copy_data:
            data = b"w" + struct.pack("!QQq", 1, 2, 3) + data
            got = [_outcome(dec, dec.decode_copy, data) for dec in decoders]
        else:
            got = [_outcome(dec, dec.decode, data) for dec in decoders]
        assert got[0] == got[1], data
        # a name that is no UTF-8 (schema, table, column) fails as UnicodeDecodeError in both
        assert got[0][0] == "message" or got[0][1] in ("DecodeError", "UnicodeDecodeError"), got[0]


@pytest.mark.parametrize("data", [b"", b"w", b"w" + b"\0" * 24, b"k" + b"\0" * 16, b"x"])
def test_short_copy_data_is_a_decode_error_in_both_decoders(data):
    got = []
    for mod in (pgoutput, pgoutput_ref):
        with pytest.raises(pgoutput_ref.DecodeError) as raised:
            mod.Decoder().decode_copy(data)
        got.append(str(raised.value))
    assert got[0] == got[1]
