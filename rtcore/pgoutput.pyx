# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled pgoutput decoder: the hot path of the PostgreSQL source (one call per WAL message).

Same API and results as `rtcore.pgoutput_ref` (its docstring lists the value conversions);
tests compare the two on captured real streams. The message classes, the sentinel `UNCHANGED`,
the converter tables and the helpers that are not per-row hot (`standby_status`, lsn formatting,
array literal parsing of rare types) come from the reference module so there is one
definition of each.

The per-row messages (XLogData, Keepalive, Begin, Commit, Insert, Update, Delete) are native
classes here: building them is most of the per-row cost with Python classes. They carry the
same attributes, `kind` and `astuple()` as the reference classes and compare equal to them.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_SetItem
from cpython.float cimport PyFloat_FromDouble
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy


cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object o)
    # with a NULL overflow_exception it never raises on overflow; text that is no float at all
    # leaves a ValueError set (cleared before the fallback, see _float)
    double PyOS_string_to_double(const char* s, char** endptr, void* overflow_exception)
    void PyErr_Clear()

import base64

import msgspec

from rtcore.pgoutput_ref import (  # noqa: F401 - re-exported
    ARRAY_ELEMENTS,
    MAX_JSON_DEPTH,
    PG_EPOCH_OFFSET_US,
    SCALAR_CONVERTERS,
    UNCHANGED,
    DecodeError,
    LogicalMessage,
    Origin,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    TypeInfo,
    _plain,
    _timestamptz,
    convert_value,
    converter_for,
    format_lsn,
    parse_array,
    parse_lsn,
    standby_status,
)

cdef enum:
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

cdef object _json_decode = msgspec.json.decode
cdef object _JsonError = msgspec.DecodeError
cdef object _b64encode = base64.b64encode
cdef object _UNCHANGED = UNCHANGED
cdef int64_t _INT64_MAX = 9223372036854775807
cdef double _INF = float("inf")
cdef int _MAX_JSON_DEPTH = MAX_JSON_DEPTH


# -- native per-row messages ------------------------------------------------------------------


cdef class _Msg:
    kind = ""
    _fields = ()

    def astuple(self):
        return (self.kind, *[_plain(getattr(self, f)) for f in self._fields])

    def __eq__(self, other):
        return hasattr(other, "astuple") and self.astuple() == other.astuple()

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = None

    def __repr__(self):
        return f"{type(self).__name__}{self.astuple()[1:]}"


@cython.final
cdef class XLogData(_Msg):
    """A 'w' CopyData frame: the WAL position it covers and the decoded pgoutput message."""
    kind = "w"
    _fields = ("wal_start", "wal_end", "send_time", "message")

    def __init__(self, wal_start, wal_end, send_time, message):
        self.wal_start, self.wal_end, self.send_time, self.message = wal_start, wal_end, send_time, message


@cython.final
cdef class Keepalive(_Msg):
    kind = "k"
    _fields = ("wal_end", "send_time", "reply_requested")

    def __init__(self, wal_end, send_time, reply_requested):
        self.wal_end, self.send_time, self.reply_requested = wal_end, send_time, reply_requested


@cython.final
cdef class Begin(_Msg):
    kind = "B"
    _fields = ("final_lsn", "commit_time", "xid")

    def __init__(self, final_lsn, commit_time, xid):
        self.final_lsn, self.commit_time, self.xid = final_lsn, commit_time, xid


@cython.final
cdef class Commit(_Msg):
    kind = "C"
    _fields = ("flags", "commit_lsn", "end_lsn", "commit_time")

    def __init__(self, flags, commit_lsn, end_lsn, commit_time):
        self.flags, self.commit_lsn, self.end_lsn, self.commit_time = flags, commit_lsn, end_lsn, commit_time


@cython.final
cdef class Insert(_Msg):
    kind = "I"
    _fields = ("relation", "new", "xid")

    def __init__(self, relation, new, xid=None):
        self.relation, self.new, self.xid = relation, new, xid


@cython.final
cdef class Update(_Msg):
    """old_kind: "K" (old key columns), "O" (whole old row, REPLICA IDENTITY FULL) or ""."""
    kind = "U"
    _fields = ("relation", "old_kind", "old", "new", "xid")

    def __init__(self, relation, old_kind, old, new, xid=None):
        self.relation, self.old_kind, self.old, self.new, self.xid = relation, old_kind, old, new, xid


@cython.final
cdef class Delete(_Msg):
    kind = "D"
    _fields = ("relation", "old_kind", "old", "xid")

    def __init__(self, relation, old_kind, old, xid=None):
        self.relation, self.old_kind, self.old, self.xid = relation, old_kind, old, xid


cdef inline uint32_t _u32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline int16_t _i16(const uint8_t* p) noexcept nogil:
    return <int16_t>((<uint32_t>p[0] << 8) | <uint32_t>p[1])


cdef inline uint64_t _u64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>_u32(p) << 32) | <uint64_t>_u32(p + 4)


cdef inline int r_need(Reader* r, Py_ssize_t n) except -1:
    if n < 0 or r.pos + n > r.end:
        raise DecodeError("truncated pgoutput message")
    return 0


cdef inline uint8_t r_byte(Reader* r) except? 255:
    r_need(r, 1)
    r.pos += 1
    return r.buf[r.pos - 1]


cdef inline uint32_t r_u32(Reader* r) except? 0xFFFFFFFF:
    r_need(r, 4)
    r.pos += 4
    return _u32(r.buf + r.pos - 4)


cdef inline int16_t r_i16(Reader* r) except? -32768:
    r_need(r, 2)
    r.pos += 2
    return _i16(r.buf + r.pos - 2)


cdef inline uint64_t r_u64(Reader* r) except? 0xFFFFFFFFFFFFFFFF:
    r_need(r, 8)
    r.pos += 8
    return _u64(r.buf + r.pos - 8)


cdef inline int64_t r_i64(Reader* r) except? -1:
    return <int64_t>r_u64(r)


cdef str r_cstring(Reader* r):
    cdef Py_ssize_t start = r.pos
    while r.pos < r.end and r.buf[r.pos] != 0:
        r.pos += 1
    if r.pos >= r.end:
        raise DecodeError("unterminated string in pgoutput message")
    r.pos += 1
    # "replace": a name that is no UTF-8 (a SQL_ASCII database keeps any bytes) must not stop
    # the feed, which would stop at the same message again after every restart.
    return PyUnicode_DecodeUTF8(<const char*>r.buf + start, r.pos - 1 - start, "replace")


cdef object _parse_int(const uint8_t* p, Py_ssize_t n):
    """Decimal integer text -> int, without building a str on the common path."""
    cdef Py_ssize_t i = 0
    cdef bint neg = False
    cdef uint64_t acc = 0
    if n > 0 and p[0] == 45:  # '-'
        neg = True
        i = 1
    if n - i <= 0 or n - i > 18:
        return int(PyUnicode_DecodeUTF8(<const char*>p, n, NULL))
    while i < n:
        if p[i] < 48 or p[i] > 57:
            return int(PyUnicode_DecodeUTF8(<const char*>p, n, NULL))
        acc = acc * 10 + (p[i] - 48)
        i += 1
    if neg:
        return -<int64_t>acc
    return <int64_t>acc


cdef object _float(const uint8_t* p, Py_ssize_t n):
    """float(text) without the str: the same correctly rounded conversion (PyOS_string_to_double)."""
    cdef char buf[64]
    cdef char* end
    cdef double value
    if n <= 0 or n >= 64:
        return float(PyUnicode_DecodeUTF8(<const char*>p, n, NULL))
    memcpy(buf, p, n)
    buf[n] = 0
    value = PyOS_string_to_double(buf, &end, NULL)
    if end != buf + n:
        # not all of it parsed (and the error it set would surface later as SystemError):
        # float() decides, accepting or refusing as the reference does
        PyErr_Clear()
        return float(PyUnicode_DecodeUTF8(<const char*>p, n, NULL))
    return PyFloat_FromDouble(value)


cdef object _numeric(const uint8_t* p, Py_ssize_t n):
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t i
    cdef bint integral = True
    if n > 0 and p[0] == 45:
        start = 1
    if start >= n:
        return _float(p, n)
    for i in range(start, n):
        if p[i] < 48 or p[i] > 57:
            integral = False
            break
    # more than 19 digits is beyond int64 anyway (and int() refuses more than 4300)
    if integral and n - start <= 19:
        value = _parse_int(p, n)
        if -_INT64_MAX - 1 <= value <= _INT64_MAX:  # int64's range: -2**63 too
            return value
    value = _float(p, n)
    if (value == _INF or value == -_INF) and 48 <= p[start] <= 57:
        # beyond a double's range: its exact text rather than an infinity (see pgoutput_ref)
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    return value


cdef bint _nests_deeper(const uint8_t* p, Py_ssize_t n, int limit) noexcept nogil:
    """Whether the JSON text nests more than `limit` arrays and objects (see pgoutput_ref)."""
    cdef Py_ssize_t i = 0
    cdef int depth = 0
    cdef bint in_string = False
    cdef uint8_t c
    while i < n:
        c = p[i]
        if in_string:
            if c == 92:  # '\\': the escaped character, a quote too
                i += 1
            elif c == 34:  # '"'
                in_string = False
        elif c == 34:
            in_string = True
        elif c == 91 or c == 123:  # '[' '{'
            depth += 1
            if depth > limit:
                return True
        elif c == 93 or c == 125:  # ']' '}'
            depth -= 1
        i += 1
    return False


cdef object _json(const uint8_t* p, Py_ssize_t n):
    if _nests_deeper(p, n, _MAX_JSON_DEPTH):
        # deeper than the feed can encode further down the stack: the text (see pgoutput_ref)
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    cdef bytes raw = (<const char*>p)[:n]
    try:
        return _json_decode(raw)
    except _JsonError:
        # valid for PostgreSQL's json type, not representable here: the JSON text as a string
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)


cdef inline bint _ascii(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] >= 128:
            return False
    return True


cdef object _iso(const uint8_t* p, Py_ssize_t n, bint utc):
    """"YYYY-MM-DD HH:MM:SS[.f]" (+ "+00" when utc) -> "YYYY-MM-DDTHH:MM:SS[.f]" (+ "Z"),
    written straight into one new str."""
    cdef Py_ssize_t body = n - 3 if utc else n
    cdef Py_ssize_t size = body + 1 if utc else body
    out = PyUnicode_New(size, 127)
    cdef char* dst = <char*>PyUnicode_DATA(out)
    memcpy(dst, p, body)
    dst[10] = 84  # 'T'
    if utc:
        dst[body] = 90  # 'Z'
    return out


cdef object _bytea(const uint8_t* p, Py_ssize_t n):
    if not _ascii(p, n):
        # text that is no UTF-8 fails as in the reference (which decodes the whole text first)
        PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    if n >= 2 and p[0] == 92 and p[1] == 120:  # "\x"
        return _b64encode(bytes.fromhex(PyUnicode_DecodeUTF8(<const char*>p + 2, n - 2, NULL))).decode("ascii")
    return _b64encode((<const char*>p)[:n]).decode("ascii")


cdef object _timestamp(const uint8_t* p, Py_ssize_t n):
    if n >= 19 and p[10] == 32 and not (p[n - 1] == 67 and p[n - 2] == 66 and p[n - 3] == 32) and _ascii(p, n):
        return _iso(p, n, False)
    return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)


cdef object _timestamptz_fast(const uint8_t* p, Py_ssize_t n):
    # "+00" suffix (TimeZone=UTC on the replication connection): one copy
    if n >= 22 and p[10] == 32 and p[n - 3] == 43 and p[n - 2] == 48 and p[n - 1] == 48 and _ascii(p, n):
        return _iso(p, n, True)
    return _timestamptz(PyUnicode_DecodeUTF8(<const char*>p, n, NULL))


cdef object _convert(int code, int elem, const uint8_t* p, Py_ssize_t n):
    if code == CONV_TEXT:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    if code == CONV_INT:
        return _parse_int(p, n)
    if code == CONV_BOOL:
        if n == 1 and p[0] < 128:
            return p[0] == 116
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL) == "t"  # no UTF-8: fails as the reference
    if code == CONV_FLOAT:
        return _float(p, n)
    if code == CONV_NUMERIC:
        return _numeric(p, n)
    if code == CONV_JSON:
        return _json(p, n)
    if code == CONV_TIMESTAMP:
        return _timestamp(p, n)
    if code == CONV_TIMESTAMPTZ:
        return _timestamptz_fast(p, n)
    if code == CONV_BYTEA:
        return _bytea(p, n)
    if code == CONV_ARRAY:
        return parse_array(PyUnicode_DecodeUTF8(<const char*>p, n, NULL), elem)
    return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)


cdef class Decoder:
    """Stateful pgoutput decoder (see rtcore.pgoutput_ref.Decoder)."""

    def __init__(self):
        self.relations = {}
        self.types = {}
        self.arrays = {}
        self.domains = {}
        self.errors = []
        self._info = {}
        self.in_stream = False

    def register_array(self, array_oid, element_oid):
        self.arrays[array_oid] = element_oid
        self._rebuild()

    def register_domain(self, domain_oid, base_oid):
        self.domains[domain_oid] = base_oid
        self._rebuild()

    def _rebuild(self):
        for relid, rel in self.relations.items():
            self._info[relid] = self._build_info(rel)

    cdef _RelInfo _build_info(self, rel):
        cdef _RelInfo info = _RelInfo()
        codes = bytearray()
        elems = bytearray()
        keys = bytearray()
        keyset = set(rel.key_columns)
        for oid, col in zip(rel.type_oids, rel.columns):
            c, e = converter_for(oid, self.arrays, self.domains)
            codes.append(c)
            elems.append(e)
            keys.append(1 if col in keyset else 0)
        info.relation = rel
        info.columns = list(rel.columns)
        info.codes = bytes(codes)
        info.elems = bytes(elems)
        info.is_key = bytes(keys)
        info.ncols = len(rel.columns)
        return info

    def decode_copy(self, bytes data):
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef XLogData x
        cdef Keepalive k
        if n >= 25 and p[0] == 119:  # 'w'
            x = XLogData.__new__(XLogData)
            x.message = self._decode(p + 25, n - 25, data)
            x.wal_start = _u64(p + 1)
            x.wal_end = _u64(p + 9)
            x.send_time = <int64_t>_u64(p + 17)
            return x
        if n >= 18 and p[0] == 107:  # 'k'
            k = Keepalive.__new__(Keepalive)
            k.wal_end = _u64(p + 1)
            k.send_time = <int64_t>_u64(p + 9)
            k.reply_requested = p[17] != 0
            return k
        if n > 0 and (p[0] == 119 or p[0] == 107):
            raise DecodeError(f"truncated CopyData message {data[:1]!r}")
        raise DecodeError(f"unknown CopyData message {data[:1]!r}")

    def decode(self, buf):
        cdef bytes data = bytes(buf)
        return self._decode(<const uint8_t*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), data)

    cdef object _decode(self, const uint8_t* p, Py_ssize_t n, bytes owner):
        cdef Reader rd
        cdef Reader* r = &rd
        cdef uint8_t tag
        cdef object xid = None
        cdef _RelInfo info
        cdef Insert ins
        cdef Update upd
        cdef Delete dele
        cdef Begin beg
        cdef Commit com
        cdef uint8_t kind
        r.buf = p
        r.pos = 0
        r.end = n
        tag = r_byte(r)
        if tag == 73:  # 'I'
            if self.in_stream:
                xid = r_u32(r)
            info = self._info_for(r_u32(r))
            if r_byte(r) != 78:
                raise DecodeError("Insert without a new tuple")
            ins = Insert.__new__(Insert)
            ins.relation = info.relation
            ins.new = self._tuple(r, info, False)
            ins.xid = xid
            return ins
        if tag == 85:  # 'U'
            if self.in_stream:
                xid = r_u32(r)
            info = self._info_for(r_u32(r))
            upd = Update.__new__(Update)
            upd.relation = info.relation
            upd.xid = xid
            upd.old_kind = ""
            kind = r_byte(r)
            if kind == 75 or kind == 79:  # 'K' / 'O'
                upd.old_kind = "K" if kind == 75 else "O"
                upd.old = self._tuple(r, info, kind == 75)
                kind = r_byte(r)
            if kind != 78:
                raise DecodeError("Update without a new tuple")
            upd.new = self._tuple(r, info, False)
            return upd
        if tag == 68:  # 'D'
            if self.in_stream:
                xid = r_u32(r)
            info = self._info_for(r_u32(r))
            kind = r_byte(r)
            dele = Delete.__new__(Delete)
            dele.relation = info.relation
            dele.old_kind = chr(kind)
            dele.old = self._tuple(r, info, kind == 75)
            dele.xid = xid
            return dele
        if tag == 66:  # 'B'
            beg = Begin.__new__(Begin)
            beg.final_lsn = r_u64(r)
            beg.commit_time = r_i64(r)
            beg.xid = r_u32(r)
            return beg
        if tag == 67:  # 'C'
            com = Commit.__new__(Commit)
            com.flags = r_byte(r)
            com.commit_lsn = r_u64(r)
            com.end_lsn = r_u64(r)
            com.commit_time = r_i64(r)
            return com
        if tag == 83:  # 'S'
            sxid = r_u32(r)
            first = r_byte(r)
            self.in_stream = True
            return StreamStart(sxid, bool(first))
        if tag == 69:  # 'E'
            self.in_stream = False
            return StreamStop()
        if tag == 99:  # 'c'
            sxid = r_u32(r)
            flags = r_byte(r)
            commit_lsn = r_u64(r)
            end_lsn = r_u64(r)
            return StreamCommit(sxid, flags, commit_lsn, end_lsn, r_i64(r))
        if tag == 65:  # 'A'
            sxid = r_u32(r)
            return StreamAbort(sxid, r_u32(r))
        if tag == 79:  # 'O'
            lsn = r_u64(r)
            return Origin(lsn, r_cstring(r))
        if self.in_stream and tag in (82, 89, 84, 77):
            xid = r_u32(r)
        if tag == 82:  # 'R'
            relid = r_u32(r)
            schema = r_cstring(r)
            name = r_cstring(r)
            replident = chr(r_byte(r))
            ncols = r_i16(r)
            columns = []
            oids = []
            keys = []
            for _ in range(ncols):
                flags = r_byte(r)
                col = r_cstring(r)
                oid = r_u32(r)
                r_u32(r)  # typmod
                columns.append(col)
                oids.append(oid)
                if flags & 1:
                    keys.append(col)
            rel = Relation(relid, schema or "pg_catalog", name, replident, columns, oids, keys, xid)
            self.relations[relid] = rel
            self._info[relid] = self._build_info(rel)
            return rel
        if tag == 89:  # 'Y'
            oid = r_u32(r)
            schema = r_cstring(r)
            info_t = TypeInfo(oid, schema, r_cstring(r), xid)
            self.types[oid] = info_t
            return info_t
        if tag == 84:  # 'T'
            nrel = <int32_t>r_u32(r)
            options = r_byte(r)
            rels = [(<_RelInfo>self._info_for(r_u32(r))).relation for _ in range(nrel)]
            return Truncate(rels, options, xid)
        if tag == 77:  # 'M'
            transactional = bool(r_byte(r) & 1)
            lsn = r_u64(r)
            prefix = r_cstring(r)
            length = <int32_t>r_u32(r)
            r_need(r, length)
            content = (<const char*>p + r.pos)[:length]
            return LogicalMessage(transactional, lsn, prefix, content, xid)
        raise DecodeError(f"unknown pgoutput message {chr(tag)!r}")

    cdef _RelInfo _info_for(self, uint32_t relid):
        info = self._info.get(relid)
        if info is None:
            raise DecodeError(f"row for relation {relid} before its Relation message")
        return <_RelInfo>info

    cdef dict _tuple(self, Reader* r, _RelInfo info, bint key_only):
        cdef int16_t ncols = r_i16(r)
        cdef Py_ssize_t i
        cdef uint8_t kind
        cdef uint32_t length
        cdef const char* codes = PyBytes_AS_STRING(info.codes)
        cdef const char* elems = PyBytes_AS_STRING(info.elems)
        cdef const char* is_key = PyBytes_AS_STRING(info.is_key)
        cdef dict row = {}
        cdef list columns = info.columns
        cdef object value
        if ncols > info.ncols or ncols < 0:
            raise DecodeError(
                f"tuple of {ncols} columns for {info.relation.schema}.{info.relation.name} with {info.ncols}"
            )
        for i in range(ncols):
            kind = r_byte(r)
            if kind == 116:  # 't'
                length = r_u32(r)
                r_need(r, length)
                try:
                    value = _convert(codes[i], elems[i], r.buf + r.pos, length)
                except Exception as exc:
                    # one odd value must not fail its row: its text, and the source reports it
                    value = PyUnicode_DecodeUTF8(<const char*>r.buf + r.pos, length, "replace")
                    self.errors.append((info.relation.schema, info.relation.name, columns[i],
                                        f"{type(exc).__name__}: {exc}"))
                r.pos += length
            elif kind == 110:  # 'n'
                value = None
            elif kind == 117:  # 'u'
                value = _UNCHANGED
            elif kind == 98:  # 'b'
                length = r_u32(r)
                r_need(r, length)
                value = _b64encode((<const char*>r.buf + r.pos)[:length]).decode("ascii")
                r.pos += length
            else:
                raise DecodeError(f"unknown tuple column kind {kind!r}")
            if key_only and not is_key[i]:
                continue
            PyDict_SetItem(row, columns[i], value)
        return row
