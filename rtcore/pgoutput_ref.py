"""Pure-Python reference of the pgoutput decoder (PostgreSQL logical replication protocol).

Decodes the messages of the built-in `pgoutput` plugin (protocol 1, plus protocol 2's stream
messages) from the CopyData payloads of a replication connection, and converts the text
representation of column values to JSON-ready Python values by type OID. The compiled
`rtcore.pgoutput` has the same API and must return equal results; tests compare the two on
captured real streams, and the benchmark measures the compiled one against this.

Value conversion (text format, which is what pgoutput sends unless `binary` is requested):
  bool -> bool; int2/int4/int8/oid -> int; float4/float8 -> float (NaN/Infinity encode as
  null); numeric -> int when the text is integral ("42") and fits in 64 bits, else float
  (precision beyond ~15 significant digits is lost: JSON numbers are doubles for most
  clients), and its text (a str) when beyond the range of a double, where a float would be
  infinite; text, varchar, bpchar, name, char, uuid -> str; json/jsonb -> the parsed JSON
  value, or its text (a str) when it holds what JSON cannot carry here (a number beyond the
  range of a double, a lone surrogate escape, nesting deeper than MAX_JSON_DEPTH); date -> "YYYY-MM-DD";
  time/timetz -> as PostgreSQL prints it; timestamp -> "YYYY-MM-DDTHH:MM:SS[.ffffff]" (no
  offset: the value has none); timestamptz -> UTC "YYYY-MM-DDTHH:MM:SS[.ffffff]Z";
  bytea -> base64; one-dimensional or nested arrays of these -> lists; enums and every
  other type -> their text form; a domain -> as its base type. 'n' (NULL) -> None; 'u' (an
  unchanged TOASTed value that the server did not send) -> the `UNCHANGED` sentinel, which the
  source must replace.

A value whose conversion fails all the same (e.g. text that is not UTF-8 in a SQL_ASCII
database) never fails the message: it becomes its text (invalid UTF-8 replaced by U+FFFD) and
the failure is appended to `Decoder.errors` as (schema, table, column, error) for the source to
report.
"""

from __future__ import annotations

import base64
import struct
from datetime import UTC, datetime
from typing import Any

import msgspec

# -- sentinels and constants -----------------------------------------------------------------


class _Unchanged:
    """The value of a TOASTed column an UPDATE did not touch (pgoutput's 'u' marker)."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()

# Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
PG_EPOCH_OFFSET_US = 946_684_800_000_000

# Converter codes by type OID; the compiled decoder switches on the same codes.
CONV_TEXT = 0
CONV_BOOL = 1
CONV_INT = 2
CONV_FLOAT = 3
CONV_NUMERIC = 4
CONV_JSON = 5
CONV_TIMESTAMP = 6
CONV_TIMESTAMPTZ = 7
CONV_BYTEA = 8
CONV_ARRAY = 9

SCALAR_CONVERTERS: dict[int, int] = {
    16: CONV_BOOL,
    20: CONV_INT, 21: CONV_INT, 23: CONV_INT, 26: CONV_INT, 28: CONV_INT,  # int8 int2 int4 oid xid
    700: CONV_FLOAT, 701: CONV_FLOAT,
    1700: CONV_NUMERIC,
    114: CONV_JSON, 3802: CONV_JSON,
    1114: CONV_TIMESTAMP,
    1184: CONV_TIMESTAMPTZ,
    17: CONV_BYTEA,
    # text-like and date/time types whose text form is already what we send
    25: CONV_TEXT, 1043: CONV_TEXT, 1042: CONV_TEXT, 19: CONV_TEXT, 18: CONV_TEXT,
    2950: CONV_TEXT, 1082: CONV_TEXT, 1083: CONV_TEXT, 1266: CONV_TEXT,
    # int2vector, oidvector: in the array category with ',' as delimiter, but printed "1 2"
    22: CONV_TEXT, 30: CONV_TEXT,
}

# Built-in array type OID -> element type OID.
ARRAY_ELEMENTS: dict[int, int] = {
    1000: 16, 1001: 17, 1002: 18, 1003: 19, 1005: 21, 1007: 23, 1009: 25, 1014: 1042,
    1015: 1043, 1016: 20, 1021: 700, 1022: 701, 1028: 26, 1115: 1114, 1182: 1082,
    1183: 1083, 1185: 1184, 1231: 1700, 1270: 1266, 199: 114, 3807: 3802, 2951: 2950,
}


# -- value conversion ----------------------------------------------------------------------


_INT64_MAX = (1 << 63) - 1
_INF = float("inf")


_INT64_DIGITS = 19


def _numeric(text: str) -> Any:
    digits = text[1:] if text.startswith("-") else text
    # more than 19 digits is beyond int64 anyway (and int() refuses more than 4300); ASCII
    # digits only, as the compiled decoder counts them (str.isdigit() takes "１" too)
    if digits.isascii() and digits.isdigit() and len(digits) <= _INT64_DIGITS:
        value = int(text)
        if -_INT64_MAX - 1 <= value <= _INT64_MAX:  # int64's range: -2**63 too
            return value
    value = float(text)
    if (value == _INF or value == -_INF) and digits[:1].isdigit():
        # beyond a double's range (numeric goes to 10^131072): an infinity, i.e. null in JSON,
        # would lose the value; its exact text does not ('Infinity' itself stays a float)
        return text
    return value


# JSON nesting deeper than this arrives as its text. The feed encodes each event (JSON for
# clients, msgpack for the Kafka bus) further down the stack than it decodes, and Python's
# recursion limit (1000 frames, each level of nesting takes one) then failed the encoding of a
# value nesting ~950 levels: the feed stopped at that transaction after every reconnect.
MAX_JSON_DEPTH = 512


def _nests_deeper(text: str, limit: int) -> bool:
    """Whether the JSON `text` nests more than `limit` arrays and objects (brackets inside
    strings do not count)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = False
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 1  # the escaped character, a quote too
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "[" or ch == "{":
            depth += 1
            if depth > limit:
                return True
        elif ch == "]" or ch == "}":
            depth -= 1
        i += 1
    return False


def _json(text: str) -> Any:
    if _nests_deeper(text, MAX_JSON_DEPTH):
        return text  # see MAX_JSON_DEPTH
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        # valid for PostgreSQL's json type, not representable here (a number beyond a double,
        # a lone surrogate escape): the JSON text itself, as a string
        return text


def _timestamp(text: str) -> str:
    # "2024-01-15 10:00:00.123" -> "2024-01-15T10:00:00.123"; infinity / BC stay text
    if len(text) >= 19 and text[10] == " " and not text.endswith(" BC"):
        return text[:10] + "T" + text[11:]
    return text


def _timestamptz(text: str) -> str:
    # The replication connection runs with TimeZone=UTC, so the fast path is "+00".
    if len(text) < 22 or text[10] != " " or text.endswith(" BC"):
        return text
    if text.endswith("+00"):
        return text[:10] + "T" + text[11:-3] + "Z"
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return text
    value = value.astimezone(UTC)
    frac = text.find(".", 19)
    out = value.strftime("%Y-%m-%dT%H:%M:%S")
    if frac != -1:
        digits = 0
        while frac + 1 + digits < len(text) and text[frac + 1 + digits].isdigit():
            digits += 1
        out += "." + f"{value.microsecond:06d}"[:digits]
    return out + "Z"


def _bytea(text: str) -> str:
    if text.startswith("\\x"):
        return base64.b64encode(bytes.fromhex(text[2:])).decode("ascii")
    return base64.b64encode(text.encode()).decode("ascii")  # escape format: not produced with bytea_output=hex


def convert_scalar(code: int, text: str) -> Any:
    if code == CONV_TEXT:
        return text
    if code == CONV_INT:
        return int(text)
    if code == CONV_BOOL:
        return text == "t"
    if code == CONV_FLOAT:
        return float(text)
    if code == CONV_NUMERIC:
        return _numeric(text)
    if code == CONV_JSON:
        return _json(text)
    if code == CONV_TIMESTAMP:
        return _timestamp(text)
    if code == CONV_TIMESTAMPTZ:
        return _timestamptz(text)
    if code == CONV_BYTEA:
        return _bytea(text)
    return text


def parse_array(text: str, element_code: int) -> Any:
    """Parse an array literal ("{1,NULL,"a b",{2,3}}") converting elements with `element_code`."""
    pos = 0
    if text.startswith("["):  # explicit bounds: "[0:1]={1,2}"
        pos = text.index("=") + 1
    value, _ = _parse_array_at(text, pos, element_code)
    return value


def _parse_array_at(text: str, pos: int, code: int) -> tuple[list, int]:
    if text[pos] != "{":
        raise ValueError(f"malformed array literal: {text!r}")
    pos += 1
    items: list = []
    n = len(text)
    if pos < n and text[pos] == "}":
        return items, pos + 1
    while pos < n:
        ch = text[pos]
        if ch == "{":
            sub, pos = _parse_array_at(text, pos, code)
            items.append(sub)
        elif ch == '"':
            pos += 1
            buf = []
            while text[pos] != '"':
                if text[pos] == "\\":
                    pos += 1
                buf.append(text[pos])
                pos += 1
            pos += 1
            items.append(convert_scalar(code, "".join(buf)))
        else:
            start = pos
            buf = []
            while text[pos] not in ",}":
                if text[pos] == "\\":
                    pos += 1
                buf.append(text[pos])
                pos += 1
            raw = "".join(buf).strip()
            if pos - start == 4 and raw.upper() == "NULL":
                items.append(None)
            else:
                items.append(convert_scalar(code, raw))
        ch = text[pos]
        pos += 1
        if ch == "}":
            return items, pos
        if ch != ",":
            raise ValueError(f"malformed array literal: {text!r}")
    raise ValueError(f"unterminated array literal: {text!r}")


def converter_for(
    type_oid: int, arrays: dict[int, int] | None = None, domains: dict[int, int] | None = None
) -> tuple[int, int]:
    """(code, element code) for `type_oid`; `arrays` adds array OIDs learnt at runtime, `domains`
    maps a domain OID to its (ultimate) base type OID: a domain's values are its base type's."""
    if domains:
        type_oid = domains.get(type_oid, type_oid)
    code = SCALAR_CONVERTERS.get(type_oid)
    if code is not None:
        return code, CONV_TEXT
    elem = ARRAY_ELEMENTS.get(type_oid)
    if elem is None and arrays is not None:
        elem = arrays.get(type_oid)
    if elem:  # 0: learnt not to be an array
        if domains:
            elem = domains.get(elem, elem)  # an array of a domain
        return CONV_ARRAY, SCALAR_CONVERTERS.get(elem, CONV_TEXT)
    return CONV_TEXT, CONV_TEXT


def convert_value(
    type_oid: int, text: str, arrays: dict[int, int] | None = None, domains: dict[int, int] | None = None
) -> Any:
    """Convert one text-format value of type `type_oid` (used for on-demand fetches too)."""
    code, elem = converter_for(type_oid, arrays, domains)
    if code == CONV_ARRAY:
        return parse_array(text, elem)
    return convert_scalar(code, text)


def convert_or_text(code: int, elem: int, raw: bytes) -> tuple[Any, str]:
    """(value, "") or, when the conversion fails, (the text with invalid UTF-8 replaced, the
    error): one odd value must not fail its row, let alone stop the feed."""
    try:
        text = raw.decode("utf-8")
        if code == CONV_ARRAY:
            return parse_array(text, elem), ""
        return convert_scalar(code, text), ""
    except Exception as exc:  # noqa: BLE001 - any failure: the row is still delivered
        return raw.decode("utf-8", "replace"), f"{type(exc).__name__}: {exc}"


# -- messages ------------------------------------------------------------------------------


class _Msg:
    __slots__ = ()
    kind = ""

    def astuple(self) -> tuple:
        return (self.kind, *(_plain(getattr(self, f)) for f in self.__slots__))

    def __eq__(self, other: object) -> bool:
        return hasattr(other, "astuple") and self.astuple() == other.astuple()

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.astuple()[1:]}"


def _plain(value: Any) -> Any:
    if isinstance(value, Relation):
        return (value.relid, value.schema, value.name)
    if isinstance(value, list) and value and isinstance(value[0], Relation):
        return [_plain(v) for v in value]
    return value


class Relation(_Msg):
    """A table's shape as the server last described it (R message)."""

    __slots__ = ("relid", "schema", "name", "replident", "columns", "type_oids", "key_columns", "xid")
    kind = "R"

    def __init__(self, relid, schema, name, replident, columns, type_oids, key_columns, xid=None):
        self.relid = relid
        self.schema = schema
        self.name = name
        self.replident = replident
        self.columns = columns
        self.type_oids = type_oids
        self.key_columns = key_columns
        self.xid = xid


class Begin(_Msg):
    __slots__ = ("final_lsn", "commit_time", "xid")
    kind = "B"

    def __init__(self, final_lsn, commit_time, xid):
        self.final_lsn, self.commit_time, self.xid = final_lsn, commit_time, xid


class Commit(_Msg):
    __slots__ = ("flags", "commit_lsn", "end_lsn", "commit_time")
    kind = "C"

    def __init__(self, flags, commit_lsn, end_lsn, commit_time):
        self.flags, self.commit_lsn, self.end_lsn, self.commit_time = flags, commit_lsn, end_lsn, commit_time


class Origin(_Msg):
    __slots__ = ("lsn", "name")
    kind = "O"

    def __init__(self, lsn, name):
        self.lsn, self.name = lsn, name


class TypeInfo(_Msg):
    __slots__ = ("oid", "schema", "name", "xid")
    kind = "Y"

    def __init__(self, oid, schema, name, xid=None):
        self.oid, self.schema, self.name, self.xid = oid, schema, name, xid


class Insert(_Msg):
    __slots__ = ("relation", "new", "xid")
    kind = "I"

    def __init__(self, relation, new, xid=None):
        self.relation, self.new, self.xid = relation, new, xid


class Update(_Msg):
    """old_kind: "K" (old key columns), "O" (whole old row, REPLICA IDENTITY FULL) or ""."""

    __slots__ = ("relation", "old_kind", "old", "new", "xid")
    kind = "U"

    def __init__(self, relation, old_kind, old, new, xid=None):
        self.relation, self.old_kind, self.old, self.new, self.xid = relation, old_kind, old, new, xid


class Delete(_Msg):
    __slots__ = ("relation", "old_kind", "old", "xid")
    kind = "D"

    def __init__(self, relation, old_kind, old, xid=None):
        self.relation, self.old_kind, self.old, self.xid = relation, old_kind, old, xid


class Truncate(_Msg):
    """options: bit 1 CASCADE, bit 2 RESTART IDENTITY."""

    __slots__ = ("relations", "options", "xid")
    kind = "T"

    def __init__(self, relations, options, xid=None):
        self.relations, self.options, self.xid = relations, options, xid


class LogicalMessage(_Msg):
    __slots__ = ("transactional", "lsn", "prefix", "content", "xid")
    kind = "M"

    def __init__(self, transactional, lsn, prefix, content, xid=None):
        self.transactional, self.lsn, self.prefix, self.content, self.xid = transactional, lsn, prefix, content, xid


class StreamStart(_Msg):
    __slots__ = ("xid", "first_segment")
    kind = "S"

    def __init__(self, xid, first_segment):
        self.xid, self.first_segment = xid, first_segment


class StreamStop(_Msg):
    __slots__ = ()
    kind = "E"


class StreamCommit(_Msg):
    __slots__ = ("xid", "flags", "commit_lsn", "end_lsn", "commit_time")
    kind = "c"

    def __init__(self, xid, flags, commit_lsn, end_lsn, commit_time):
        self.xid, self.flags, self.commit_lsn, self.end_lsn, self.commit_time = xid, flags, commit_lsn, end_lsn, commit_time


class StreamAbort(_Msg):
    __slots__ = ("xid", "subxid")
    kind = "A"

    def __init__(self, xid, subxid):
        self.xid, self.subxid = xid, subxid


class XLogData(_Msg):
    """A 'w' CopyData frame: the WAL position it covers and the decoded pgoutput message."""

    __slots__ = ("wal_start", "wal_end", "send_time", "message")
    kind = "w"

    def __init__(self, wal_start, wal_end, send_time, message):
        self.wal_start, self.wal_end, self.send_time, self.message = wal_start, wal_end, send_time, message


class Keepalive(_Msg):
    __slots__ = ("wal_end", "send_time", "reply_requested")
    kind = "k"

    def __init__(self, wal_end, send_time, reply_requested):
        self.wal_end, self.send_time, self.reply_requested = wal_end, send_time, reply_requested


class DecodeError(ValueError):
    """A CopyData frame or pgoutput message that does not parse."""


def standby_status(written_lsn: int, flushed_lsn: int, applied_lsn: int, now_us: int, reply: bool = False) -> bytes:
    """A Standby Status Update ('r') frame; `now_us` is microseconds since the Unix epoch."""
    return b"r" + struct.pack(
        "!QQQqB", written_lsn, flushed_lsn, applied_lsn, now_us - PG_EPOCH_OFFSET_US, 1 if reply else 0
    )


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


# -- the decoder ---------------------------------------------------------------------------

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_Q = struct.Struct("!Q")
_q = struct.Struct("!q")


class Decoder:
    """Stateful pgoutput decoder: keeps the relations the server described (R messages) and
    whether a streamed transaction segment is open (then messages carry an xid)."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self.types: dict[int, TypeInfo] = {}
        self.arrays: dict[int, int] = {}  # array OID -> element OID learnt from the catalog
        self.domains: dict[int, int] = {}  # domain OID -> base type OID learnt from the catalog
        # (schema, table, column, error) of values sent as text because their conversion failed
        self.errors: list[tuple[str, str, str, str]] = []
        self._converters: dict[int, tuple[list[int], list[int]]] = {}
        self.in_stream = False

    def register_array(self, array_oid: int, element_oid: int) -> None:
        """Teach the decoder a non-built-in array type (e.g. an array of an enum)."""
        self.arrays[array_oid] = element_oid
        self._rebuild()

    def register_domain(self, domain_oid: int, base_oid: int) -> None:
        """Teach the decoder a domain: its values are converted as its base type's."""
        self.domains[domain_oid] = base_oid
        self._rebuild()

    def _rebuild(self) -> None:
        for relid, rel in self.relations.items():
            self._converters[relid] = self._build_converters(rel)

    def _build_converters(self, rel: Relation) -> tuple[list[int], list[int]]:
        codes, elems = [], []
        for oid in rel.type_oids:
            c, e = converter_for(oid, self.arrays, self.domains)
            codes.append(c)
            elems.append(e)
        return codes, elems

    def decode_copy(self, data: bytes) -> XLogData | Keepalive:
        """Decode one CopyData payload of a START_REPLICATION stream ('w' or 'k')."""
        tag = data[:1]
        if tag != b"w" and tag != b"k":
            raise DecodeError(f"unknown CopyData message {tag!r}")
        if len(data) < (25 if tag == b"w" else 18):
            raise DecodeError(f"truncated CopyData message {tag!r}")
        if tag == b"w":
            wal_start, wal_end, send_time = struct.unpack_from("!QQq", data, 1)
            return XLogData(wal_start, wal_end, send_time, self.decode(memoryview(data)[25:]))
        wal_end, send_time, reply = struct.unpack_from("!QqB", data, 1)
        return Keepalive(wal_end, send_time, bool(reply))

    def decode(self, buf: bytes | memoryview) -> Any:
        """Decode one pgoutput message; DecodeError when it does not parse."""
        try:
            return self._decode(bytes(buf))
        except (struct.error, IndexError):
            # a field read past the end: the message was cut short (as the compiled decoder says)
            raise DecodeError("truncated pgoutput message") from None

    def _decode(self, buf: bytes) -> Any:
        tag = chr(buf[0])
        pos = 1
        if tag == "B":
            final_lsn, ts, xid = struct.unpack_from("!Qqi", buf, pos)
            return Begin(final_lsn, ts, xid & 0xFFFFFFFF)
        if tag == "C":
            flags, commit_lsn, end_lsn, ts = struct.unpack_from("!BQQq", buf, pos)
            return Commit(flags, commit_lsn, end_lsn, ts)
        if tag == "S":
            xid, first = struct.unpack_from("!IB", buf, pos)
            self.in_stream = True
            return StreamStart(xid, bool(first))
        if tag == "E":
            self.in_stream = False
            return StreamStop()
        if tag == "c":
            xid, flags, commit_lsn, end_lsn, ts = struct.unpack_from("!IBQQq", buf, pos)
            return StreamCommit(xid, flags, commit_lsn, end_lsn, ts)
        if tag == "A":
            xid, subxid = struct.unpack_from("!II", buf, pos)
            return StreamAbort(xid, subxid)
        if tag == "O":
            (lsn,) = _Q.unpack_from(buf, pos)
            name, pos = _cstring(buf, pos + 8)
            return Origin(lsn, name)

        xid = None
        if self.in_stream and tag in "RYIUDTM":
            (xid,) = _U32.unpack_from(buf, pos)
            pos += 4
        if tag == "I":
            rel = self._relation(_U32.unpack_from(buf, pos)[0])
            if buf[pos + 4] != 0x4E:  # 'N'
                raise DecodeError("Insert without a new tuple")
            new, pos = self._tuple(buf, pos + 5, rel, False)
            return Insert(rel, new, xid)
        if tag == "U":
            rel = self._relation(_U32.unpack_from(buf, pos)[0])
            pos += 4
            old_kind, old = "", None
            if buf[pos] in (0x4B, 0x4F):  # 'K' / 'O'
                old_kind = chr(buf[pos])
                old, pos = self._tuple(buf, pos + 1, rel, old_kind == "K")
            if buf[pos] != 0x4E:
                raise DecodeError("Update without a new tuple")
            new, pos = self._tuple(buf, pos + 1, rel, False)
            return Update(rel, old_kind, old, new, xid)
        if tag == "D":
            rel = self._relation(_U32.unpack_from(buf, pos)[0])
            old_kind = chr(buf[pos + 4])
            old, pos = self._tuple(buf, pos + 5, rel, old_kind == "K")
            return Delete(rel, old_kind, old, xid)
        if tag == "R":
            relid, = _U32.unpack_from(buf, pos)
            schema, pos = _cstring(buf, pos + 4)
            name, pos = _cstring(buf, pos)
            replident = chr(buf[pos])
            (ncols,) = _I16.unpack_from(buf, pos + 1)
            pos += 3
            columns, oids, keys = [], [], []
            for _ in range(ncols):
                flags = buf[pos]
                col, pos = _cstring(buf, pos + 1)
                oid, _typmod = struct.unpack_from("!Ii", buf, pos)
                pos += 8
                columns.append(col)
                oids.append(oid)
                if flags & 1:
                    keys.append(col)
            rel = Relation(relid, schema or "pg_catalog", name, replident, columns, oids, keys, xid)
            self.relations[relid] = rel
            self._converters[relid] = self._build_converters(rel)
            return rel
        if tag == "Y":
            (oid,) = _U32.unpack_from(buf, pos)
            schema, pos = _cstring(buf, pos + 4)
            name, pos = _cstring(buf, pos)
            info = TypeInfo(oid, schema, name, xid)
            self.types[oid] = info
            return info
        if tag == "T":
            nrel, options = struct.unpack_from("!iB", buf, pos)
            pos += 5
            rels = [self._relation(_U32.unpack_from(buf, pos + 4 * i)[0]) for i in range(nrel)]
            return Truncate(rels, options, xid)
        if tag == "M":
            transactional = bool(buf[pos] & 1)
            (lsn,) = _Q.unpack_from(buf, pos + 1)
            prefix, pos = _cstring(buf, pos + 9)
            (length,) = _I32.unpack_from(buf, pos)
            content = buf[pos + 4: pos + 4 + length]
            if length < 0 or len(content) != length:
                raise DecodeError("truncated pgoutput message")
            return LogicalMessage(transactional, lsn, prefix, content, xid)
        raise DecodeError(f"unknown pgoutput message {tag!r}")

    def _relation(self, relid: int) -> Relation:
        rel = self.relations.get(relid)
        if rel is None:
            raise DecodeError(f"row for relation {relid} before its Relation message")
        return rel

    def _tuple(self, buf: bytes, pos: int, rel: Relation, key_only: bool) -> tuple[dict, int]:
        (ncols,) = _I16.unpack_from(buf, pos)
        pos += 2
        codes, elems = self._converters[rel.relid]
        columns = rel.columns
        if ncols > len(columns) or ncols < 0:
            raise DecodeError(f"tuple of {ncols} columns for {rel.schema}.{rel.name} with {len(columns)}")
        row: dict[str, Any] = {}
        keys = rel.key_columns if key_only else None
        for i in range(ncols):
            kind = buf[pos]
            pos += 1
            if kind == 0x6E:  # 'n'
                value: Any = None
            elif kind == 0x75:  # 'u'
                value = UNCHANGED
            elif kind == 0x74 or kind == 0x62:  # 't' / 'b'
                (length,) = _I32.unpack_from(buf, pos)
                pos += 4
                raw = buf[pos: pos + length]
                if len(raw) != length:
                    raise DecodeError("truncated pgoutput message")
                pos += length
                if kind == 0x62:
                    value = base64.b64encode(raw).decode("ascii")
                else:
                    value, error = convert_or_text(codes[i], elems[i], raw)
                    if error:
                        self.errors.append((rel.schema, rel.name, columns[i], error))
            else:
                raise DecodeError(f"unknown tuple column kind {kind!r}")
            if keys is not None and columns[i] not in keys:
                continue  # a key-only tuple sends the other columns as nulls
            row[columns[i]] = value
        return row, pos


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.find(0, pos)
    if end < 0:
        raise DecodeError("unterminated string in pgoutput message")
    # "replace": a name that is no UTF-8 (a SQL_ASCII database keeps any bytes) must not stop
    # the feed, which would stop at the same message again after every restart.
    return buf[pos:end].decode("utf-8", "replace"), end + 1
