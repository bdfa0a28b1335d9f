# cython: language_level=3
"""Compiled normalizer of MongoDB change events (see mongo_ref.py, the reference it must equal
byte for byte): a change event -> one Event per target workspace, from raw BSON
(`normalize_raw`, what MongoSource uses: decoded here straight to JSON values in one pass) or
from a dict PyMongo decoded (`normalize_change`).

Hot paths: the BSON decoder and the value walk, with exact-type dispatch for the common types
and C formatting of ObjectId hex, UUIDs, RFC 3339 dates, Decimal128 and the correlation digest;
anything rarer falls back to the reference."""

from cpython.datetime cimport (
    datetime_tzinfo, import_datetime, PyDateTime_GET_YEAR, PyDateTime_GET_MONTH, PyDateTime_GET_DAY,
    PyDateTime_DATE_GET_HOUR, PyDateTime_DATE_GET_MINUTE, PyDateTime_DATE_GET_SECOND,
    PyDateTime_DATE_GET_MICROSECOND,
)
from cpython.dict cimport PyDict_Copy, PyDict_Next
from cpython.object cimport PyObject
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint32_t
from libc.string cimport memchr, memcmp, memcpy, memset
from libc.stdint cimport uint64_t

from binascii import b2a_base64

import datetime as _dt

import bson as _bson
from bson import Decimal128, Int64, ObjectId
from bson.binary import Binary
from bson.timestamp import Timestamp

from rtcore.event import Event
from rtcore.messages import MongoEventBody, encode
from rtcore import mongo_ref as _ref

import_datetime()

import sys as _sys

if _sys.byteorder != "little":  # the BSON and BLAKE2b code reads little-endian words directly
    raise ImportError("rtcore.mongo supports little-endian machines only; use rtcore.mongo_ref")


class InvalidBSON(ValueError):
    """The change event's bytes are not well-formed BSON."""



from bson.raw_bson import RawBSONDocument

cdef object _RawBSONDocument = RawBSONDocument
cdef object _ref_iso_ms = _ref.iso_ms
cdef object _ref_binary = _ref.to_json

OPERATIONS = _ref.OPERATIONS
decimal_to_number = _ref.decimal_to_number

cdef object _ObjectId = ObjectId
cdef object _Int64 = Int64
cdef object _Decimal128 = Decimal128
cdef object _Binary = Binary
cdef object _b2a = b2a_base64
cdef object _ref_decimal = _ref.decimal_to_number
cdef object _Timestamp = Timestamp
cdef object _datetime = _dt.datetime
cdef object _Event = Event
cdef object _Body = MongoEventBody
assert MongoEventBody.__struct_fields__ == (
    "channel", "operation", "collection", "document", "operationType", "timestamp", "correlationId",
    "updateDescription", "oldDocument"), "rtcore.mongo builds MongoEventBody positionally: update it"
cdef object _encode = encode
cdef object _rare = _ref.to_json
cdef object _bson_decode = _bson.decode
cdef object _ref_iso = _ref.iso_datetime
cdef dict _OPS = dict(_ref.OPERATIONS)
cdef const char* _HEX = b"0123456789abcdef"


cdef str _hex12(const unsigned char* p):
    cdef char buf[24]
    cdef int i
    for i in range(12):
        buf[2 * i] = _HEX[p[i] >> 4]
        buf[2 * i + 1] = _HEX[p[i] & 15]
    return PyUnicode_DecodeASCII(buf, 24, NULL)


cdef str _oid_hex(object oid):
    cdef bytes raw = oid._ObjectId__id
    if len(raw) != 12:
        return str(oid)
    return _hex12(raw)


cdef double[23] _POW10 = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14,
                          1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22]
cdef uint64_t[20] _IPOW10 = [1ULL, 10ULL, 100ULL, 1000ULL, 10000ULL, 100000ULL, 1000000ULL, 10000000ULL,
                             100000000ULL, 1000000000ULL, 10000000000ULL, 100000000000ULL, 1000000000000ULL,
                             10000000000000ULL, 100000000000000ULL, 1000000000000000ULL, 10000000000000000ULL,
                             100000000000000000ULL, 1000000000000000000ULL, 10000000000000000000ULL]


cdef object _SLOW = object()


cdef object _decimal_bits(uint64_t low, uint64_t high):
    # IEEE 754-2008 decimal128 (BID). Fast path: a 64-bit coefficient with a small negative or
    # zero exponent, where int() or one correctly rounded division gives exactly what
    # float(Decimal) gives (Clinger's fast path); anything else (_SLOW) goes to the reference.
    cdef uint64_t coeff = low
    cdef uint64_t scale
    cdef int exp
    cdef bint negative = (high >> 63) != 0
    cdef double result
    if ((high >> 61) & 3) == 3 or (high & 0x1FFFFFFFFFFFFULL) != 0:
        return _SLOW
    exp = <int>((high >> 49) & 0x3FFF) - 6176
    if exp == 0:
        if coeff >= (1ULL << 63):
            return _SLOW
        return -<long long>coeff if negative else <long long>coeff
    if exp > 0 or exp < -19:
        return _SLOW
    scale = _IPOW10[-exp]
    if coeff % scale == 0:
        return -<long long>(coeff // scale) if negative else <long long>(coeff // scale)
    if coeff >= (1ULL << 53) or -exp > 22:
        return _SLOW
    result = <double>coeff / _POW10[-exp]
    return -result if negative else result


cdef object _decimal(object value):
    result = _decimal_bits(value._Decimal128__low, value._Decimal128__high)
    return _ref_decimal(value) if result is _SLOW else result


cdef str _uuid_text(const unsigned char* p):
    cdef char buf[36]
    cdef int i, j = 0
    for i in range(16):
        if i == 4 or i == 6 or i == 8 or i == 10:
            buf[j] = 45  # '-'
            j += 1
        buf[j] = _HEX[p[i] >> 4]
        buf[j + 1] = _HEX[p[i] & 15]
        j += 2
    return PyUnicode_DecodeASCII(buf, 36, NULL)


cdef object _binary(object value, type t):
    cdef bytes raw
    if t is _Binary:
        subtype = value.subtype
        if (subtype == 4 or subtype == 3) and len(value) == 16:
            raw = bytes(value)
            return _uuid_text(raw)
    return _b2a(value, newline=False).decode("ascii")


cdef str _iso(object value):
    if datetime_tzinfo(value) is not None:
        return _ref_iso(value)
    return _format_iso(PyDateTime_GET_YEAR(value), PyDateTime_GET_MONTH(value), PyDateTime_GET_DAY(value),
                       PyDateTime_DATE_GET_HOUR(value), PyDateTime_DATE_GET_MINUTE(value),
                       PyDateTime_DATE_GET_SECOND(value), PyDateTime_DATE_GET_MICROSECOND(value) // 1000)


# Copy on write: a dict or list whose values are all JSON-native is returned as is (no
# allocation); only the path down to a converted value is copied. The input is never mutated.
cdef dict _conv_dict(dict d):
    cdef dict out = None
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    cdef object converted
    while PyDict_Next(d, &pos, &k, &v):
        converted = _conv(<object>v)
        if converted is not <object>v:
            if out is None:
                out = PyDict_Copy(d)
            out[<object>k] = converted
    return d if out is None else out


cdef list _conv_list(list items):
    cdef list out = None
    cdef Py_ssize_t i
    cdef object item, converted
    for i in range(len(items)):
        item = items[i]
        converted = _conv(item)
        if converted is not item:
            if out is None:
                out = list(items)
            out[i] = converted
    return items if out is None else out


cdef object _conv(object value):
    cdef type t = type(value)
    if t is str or t is float or t is bool or value is None:
        return value
    if t is int:
        return value
    if t is dict:
        return _conv_dict(<dict>value)
    if t is list:
        return _conv_list(<list>value)
    if t is _ObjectId:
        return _oid_hex(value)
    if t is _datetime:
        return _iso(value)
    if t is _Int64:
        return int(value)
    if t is _Decimal128:
        return _decimal(value)
    if t is _Binary or t is bytes:
        return _binary(value, t)
    return _rare(value)


def to_json(value):
    """A BSON value (as PyMongo decodes it) as a JSON-ready Python value."""
    return _conv(value)


def change_timestamp(change):
    wall = change.get("wallTime")
    if type(wall) is _datetime:
        return _iso(wall)
    return _ref.change_timestamp(change)


# ---- BLAKE2b (RFC 7693), 12-byte digest, for correlation ids ----------------------------------
# hashlib's call costs ~0.45 us per event here (object, keyword parsing, hexdigest); the same
# digest computed in C on the token's UTF-8 bytes costs a fraction of that. Tests compare it
# with hashlib.blake2b(digest_size=12).

cdef uint64_t[8] _B2_IV = [
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL]
cdef unsigned char[12][16] _B2_SIGMA = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
    [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
    [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
    [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
    [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
    [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
    [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
    [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3]]


cdef inline uint64_t _rotr(uint64_t x, int n) noexcept:
    return (x >> n) | (x << (64 - n))


cdef void _b2_compress(uint64_t* h, const unsigned char* block, uint64_t t, bint last) noexcept:
    cdef uint64_t v[16]
    cdef uint64_t m[16]
    cdef int i, r
    cdef const unsigned char* s
    for i in range(16):
        memcpy(&m[i], block + 8 * i, 8)
    for i in range(8):
        v[i] = h[i]
        v[i + 8] = _B2_IV[i]
    v[12] ^= t
    if last:
        v[14] = ~v[14]
    for r in range(12):
        s = _B2_SIGMA[r]
        _b2_g(v, 0, 4, 8, 12, m[s[0]], m[s[1]])
        _b2_g(v, 1, 5, 9, 13, m[s[2]], m[s[3]])
        _b2_g(v, 2, 6, 10, 14, m[s[4]], m[s[5]])
        _b2_g(v, 3, 7, 11, 15, m[s[6]], m[s[7]])
        _b2_g(v, 0, 5, 10, 15, m[s[8]], m[s[9]])
        _b2_g(v, 1, 6, 11, 12, m[s[10]], m[s[11]])
        _b2_g(v, 2, 7, 8, 13, m[s[12]], m[s[13]])
        _b2_g(v, 3, 4, 9, 14, m[s[14]], m[s[15]])
    for i in range(8):
        h[i] ^= v[i] ^ v[i + 8]


cdef inline void _b2_g(uint64_t* v, int a, int b, int c, int d, uint64_t x, uint64_t y) noexcept:
    v[a] = v[a] + v[b] + x
    v[d] = _rotr(v[d] ^ v[a], 32)
    v[c] = v[c] + v[d]
    v[b] = _rotr(v[b] ^ v[c], 24)
    v[a] = v[a] + v[b] + y
    v[d] = _rotr(v[d] ^ v[a], 16)
    v[c] = v[c] + v[d]
    v[b] = _rotr(v[b] ^ v[c], 63)


cdef str _blake2b_96_hex(const unsigned char* data, Py_ssize_t n, const char* prefix, int prefix_len):
    """prefix + hex of BLAKE2b with a 12-byte digest (no key)."""
    cdef uint64_t h[8]
    cdef unsigned char block[128]
    cdef unsigned char digest[64]
    cdef char out[64]
    cdef Py_ssize_t done = 0
    cdef int i
    for i in range(8):
        h[i] = _B2_IV[i]
    h[0] ^= 0x01010000ULL ^ 12
    while n - done > 128:
        _b2_compress(h, data + done, <uint64_t>(done + 128), False)
        done += 128
    memset(block, 0, 128)
    memcpy(block, data + done, n - done)
    _b2_compress(h, block, <uint64_t>n, True)
    memcpy(digest, h, 64)  # little-endian words: x86-64 and aarch64
    memcpy(out, prefix, prefix_len)
    for i in range(12):
        out[prefix_len + 2 * i] = _HEX[digest[i] >> 4]
        out[prefix_len + 2 * i + 1] = _HEX[digest[i] & 15]
    return PyUnicode_DecodeASCII(out, prefix_len + 24, NULL)


def blake2b_96_hex(bytes data) -> str:
    """hashlib.blake2b(data, digest_size=12).hexdigest(), for the tests."""
    return _blake2b_96_hex(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), "", 0)


cdef str _token_correlation(str data):
    cdef Py_ssize_t n
    cdef const char* utf8 = PyUnicode_AsUTF8AndSize(data, &n)
    return _blake2b_96_hex(<const unsigned char*>utf8, n, "mongo-", 6)


def correlation_id(change):
    """`<lsid uuid>:<txnNumber>` for a transaction's changes, else a digest of the resume token."""
    if change.get("lsid") is not None:
        return _ref.correlation_id(change)
    token = change.get("_id")
    if type(token) is dict:
        data = (<dict>token).get("_data")
        if type(data) is str:
            return _token_correlation(<str>data)
    return _ref.correlation_id(change)


cdef list _events(object workspaces, object collection, object operation, object record, object body, object old):
    cdef list out = []
    for ws in workspaces:
        out.append(_Event(ws, "mongo", collection, operation, record, body, old))
    return out


cdef object _update_description(object desc):
    if desc is None:
        return None
    out = {
        "updatedFields": _conv(desc.get("updatedFields") or {}),
        "removedFields": list(desc.get("removedFields") or []),
    }
    truncated = desc.get("truncatedArrays")
    if truncated:
        out["truncatedArrays"] = _conv(truncated)
    return out


def normalize_change(change, workspaces):
    """One Event per workspace for a data change (insert/update/replace/delete); [] otherwise."""
    op_type = change.get("operationType")
    operation = _OPS.get(op_type)
    if operation is None or not workspaces:
        return []
    ns = change.get("ns") or {}
    collection = ns.get("coll", "")
    key = _conv(change.get("documentKey") or {})
    if operation == "DELETE":
        record = key
        body_document = key
    else:
        full = change.get("fullDocument")
        body_document = _conv(full) if full is not None else None
        record = body_document if body_document is not None else key
    before = change.get("fullDocumentBeforeChange")
    old = _conv(before) if before is not None else None
    body = _encode(_Body("mongo:" + collection, operation, collection, body_document, op_type, change_timestamp(change),
                         correlation_id(change),
                         _update_description(change.get("updateDescription")) if operation == "UPDATE" else None, old))
    return _events(workspaces, collection, operation, record, body, old)


# ---- raw BSON -> JSON-ready values in one pass ----------------------------------------------
# PyMongo's own decode builds ObjectId, datetime, Decimal128... objects only for this module to
# turn them into strings and numbers; decoding the BSON here skips that (measured: see
# benchmarks/README-mongo.md). Every value equals what to_json(bson.decode(raw)) gives.


cdef inline int32_t _i32(const unsigned char* p) noexcept:
    cdef int32_t v
    memcpy(&v, p, 4)
    return v


cdef inline int64_t _i64(const unsigned char* p) noexcept:
    cdef int64_t v
    memcpy(&v, p, 8)
    return v


cdef inline void _digits(char* out, int value, int width) noexcept:
    cdef int i
    for i in range(width - 1, -1, -1):
        out[i] = 48 + value % 10
        value //= 10


cdef str _format_iso(int year, int month, int day, int hour, int minute, int second, int millis):
    # snprintf and gmtime_r cost ~0.6 us together here; fixed-width digits do not.
    cdef char buf[24]
    if year < 0 or year > 9999:
        raise InvalidBSON(f"year {year} is outside RFC 3339")
    _digits(buf, year, 4)
    buf[4] = 45
    _digits(buf + 5, month, 2)
    buf[7] = 45
    _digits(buf + 8, day, 2)
    buf[10] = 84  # T
    _digits(buf + 11, hour, 2)
    buf[13] = 58
    _digits(buf + 14, minute, 2)
    buf[16] = 58
    _digits(buf + 17, second, 2)
    buf[19] = 46
    _digits(buf + 20, millis, 3)
    buf[23] = 90  # Z
    return PyUnicode_DecodeASCII(buf, 24, NULL)


cdef str _iso_ms(int64_t ms):
    # Howard Hinnant's days -> civil date, proleptic Gregorian, UTC.
    cdef int64_t secs = ms // 1000
    cdef int64_t rem = ms % 1000
    cdef int64_t days, sod, era, doe, yoe, doy, mp, year, month, day
    if rem < 0:
        rem += 1000
        secs -= 1
    days = secs // 86400
    sod = secs % 86400
    if sod < 0:
        sod += 86400
        days -= 1
    days += 719468
    era = (days if days >= 0 else days - 146096) // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    year = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    if month <= 2:
        year += 1
    return _format_iso(<int>year, <int>month, <int>day, <int>(sod // 3600), <int>(sod % 3600 // 60), <int>(sod % 60), <int>rem)


cdef object _raw_binary(const unsigned char* p, int32_t size, int subtype):
    if (subtype == 4 or subtype == 3) and size == 16:
        return _uuid_text(p)
    if subtype == 2 and size >= 4:  # old binary: an inner length
        return _b2a(p[4:size], newline=False).decode("ascii")
    return _b2a(p[:size], newline=False).decode("ascii")


cdef object _raw_value(int kind, const unsigned char* buf, Py_ssize_t* pos, Py_ssize_t end):
    cdef Py_ssize_t p = pos[0]
    cdef int32_t size
    cdef const unsigned char* q
    cdef double d
    cdef object value
    if kind == 0x02 or kind == 0x0D or kind == 0x0E:  # string, code, symbol
        if p + 4 > end:
            raise InvalidBSON("truncated string")
        size = _i32(buf + p)
        if size < 1 or p + 4 + size > end or buf[p + 3 + size] != 0:
            raise InvalidBSON("bad string length")
        pos[0] = p + 4 + size
        return PyUnicode_DecodeUTF8(<const char*>buf + p + 4, size - 1, NULL)
    if kind == 0x10:
        if p + 4 > end:
            raise InvalidBSON("truncated int32")
        pos[0] = p + 4
        return _i32(buf + p)
    if kind == 0x03 or kind == 0x04:
        return _raw_document(buf, pos, end, kind == 0x04)
    if kind == 0x01:
        if p + 8 > end:
            raise InvalidBSON("truncated double")
        memcpy(&d, buf + p, 8)
        pos[0] = p + 8
        return d
    if kind == 0x07:
        if p + 12 > end:
            raise InvalidBSON("truncated ObjectId")
        pos[0] = p + 12
        return _hex12(buf + p)
    if kind == 0x09:
        if p + 8 > end:
            raise InvalidBSON("truncated datetime")
        pos[0] = p + 8
        return _iso_ms(_i64(buf + p))
    if kind == 0x08:
        if p + 1 > end:
            raise InvalidBSON("truncated bool")
        pos[0] = p + 1
        return buf[p] != 0
    if kind == 0x0A or kind == 0x06:
        return None
    if kind == 0x12:
        if p + 8 > end:
            raise InvalidBSON("truncated int64")
        pos[0] = p + 8
        return _i64(buf + p)
    if kind == 0x13:
        if p + 16 > end:
            raise InvalidBSON("truncated decimal128")
        pos[0] = p + 16
        value = _decimal_bits(<uint64_t>_i64(buf + p), <uint64_t>_i64(buf + p + 8))
        return _ref_decimal(_Decimal128.from_bid(buf[p:p + 16])) if value is _SLOW else value
    if kind == 0x05:
        if p + 5 > end:
            raise InvalidBSON("truncated binary")
        size = _i32(buf + p)
        if size < 0 or p + 5 + size > end:
            raise InvalidBSON("bad binary length")
        pos[0] = p + 5 + size
        return _raw_binary(buf + p + 5, size, buf[p + 4])
    if kind == 0x11:
        if p + 8 > end:
            raise InvalidBSON("truncated timestamp")
        pos[0] = p + 8
        return {"t": <uint32_t>_i32(buf + p + 4), "i": <uint32_t>_i32(buf + p)}
    if kind == 0xFF:
        return {"$minKey": 1}
    if kind == 0x7F:
        return {"$maxKey": 1}
    return _raw_rare(kind, buf, pos, end)


cdef object _raw_rare(int kind, const unsigned char* buf, Py_ssize_t* pos, Py_ssize_t end):
    # Regex, DBPointer, code with scope: let bson decode the element, then map it.
    cdef Py_ssize_t p = pos[0]
    cdef Py_ssize_t start = p
    cdef const unsigned char* q
    cdef int32_t size
    if kind == 0x0B:
        for _ in range(2):
            q = <const unsigned char*>memchr(buf + p, 0, end - p)
            if q == NULL:
                raise InvalidBSON("truncated regex")
            p = q - buf + 1
    elif kind == 0x0F:
        if p + 4 > end:
            raise InvalidBSON("truncated code with scope")
        size = _i32(buf + p)
        p += size
    elif kind == 0x0C:
        if p + 4 > end:
            raise InvalidBSON("truncated DBPointer")
        size = _i32(buf + p)
        p += 4 + size + 12
    else:
        raise InvalidBSON(f"unknown BSON element type 0x{kind:02x}")
    if p > end:
        raise InvalidBSON("truncated element")
    pos[0] = p
    element = bytes([kind]) + b"v\x00" + buf[start:p]
    doc = (len(element) + 5).to_bytes(4, "little", signed=True) + element + b"\x00"
    return _rare(_bson_decode(doc)["v"])


# Field names repeat from one event to the next: a direct-mapped cache of their str objects
# saves the decode and the hash (a str keeps its hash) of most keys.
cdef enum:
    KEY_SLOTS = 1024  # a power of two
    KEY_MAX = 24
cdef list _key_str = [None] * KEY_SLOTS
cdef char _key_bytes[KEY_SLOTS][KEY_MAX]
cdef Py_ssize_t _key_len[KEY_SLOTS]


cdef inline object _key(const unsigned char* p, Py_ssize_t n):
    cdef uint64_t h = 1469598103934665603ULL
    cdef Py_ssize_t i
    cdef Py_ssize_t slot
    cdef object key
    if n > KEY_MAX:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    for i in range(n):
        h = (h ^ p[i]) * 1099511628211ULL
    slot = <Py_ssize_t>(h & (KEY_SLOTS - 1))
    if _key_len[slot] == n and memcmp(_key_bytes[slot], p, n) == 0:
        key = _key_str[slot]
        if key is not None:
            return key
    key = PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    memcpy(_key_bytes[slot], p, n)
    _key_len[slot] = n
    _key_str[slot] = key
    return key


cdef object _raw_document(const unsigned char* buf, Py_ssize_t* pos, Py_ssize_t end, bint as_list):
    cdef Py_ssize_t p = pos[0]
    cdef int32_t size
    cdef Py_ssize_t doc_end
    cdef int kind
    cdef const unsigned char* q
    cdef object key
    if p + 5 > end:
        raise InvalidBSON("truncated document")
    size = _i32(buf + p)
    if size < 5 or p + size > end or buf[p + size - 1] != 0:
        raise InvalidBSON("bad document length")
    doc_end = p + size - 1
    p += 4
    cdef list items = [] if as_list else None
    cdef dict fields = None if as_list else {}
    while p < doc_end:
        kind = buf[p]
        p += 1
        q = <const unsigned char*>memchr(buf + p, 0, doc_end - p)
        if q == NULL:
            raise InvalidBSON("unterminated field name")
        if as_list:
            p = q - buf + 1
            items.append(_raw_value(kind, buf, &p, doc_end))
        else:
            key = _key(buf + p, q - buf - p)
            p = q - buf + 1
            fields[key] = _raw_value(kind, buf, &p, doc_end)
    if p != doc_end:
        raise InvalidBSON("element overruns its document")
    pos[0] = doc_end + 1
    return items if as_list else fields


def decode_raw(raw):
    """BSON bytes (or a RawBSONDocument) as JSON-ready values: to_json(bson.decode(raw))."""
    cdef bytes data = raw.raw if type(raw) is _RawBSONDocument else raw
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    result = _raw_document(<const unsigned char*>PyBytes_AS_STRING(data), &pos, n, False)
    if pos != n:
        raise InvalidBSON("trailing bytes after the document")
    return result


def normalize_raw(raw, workspaces):
    """normalize_change of a change event still in BSON (PyMongo's RawBSONDocument or bytes)."""
    if not workspaces:
        return []
    return normalize_decoded(decode_raw(raw), workspaces)


def normalize_decoded(dict change, workspaces):
    """normalize_change of a change event already decoded by decode_raw (JSON-ready values)."""
    if not workspaces:
        return []
    op_type = change.get("operationType")
    operation = _OPS.get(op_type)
    if operation is None:
        return []
    ns = change.get("ns") or {}
    collection = ns.get("coll", "")
    key = change.get("documentKey") or {}
    if operation == "DELETE":
        record = key
        body_document = key
    else:
        body_document = change.get("fullDocument")
        record = body_document if body_document is not None else key
    old = change.get("fullDocumentBeforeChange")
    wall = change.get("wallTime")
    if type(wall) is str:
        timestamp = wall
    else:
        cluster = change.get("clusterTime")
        timestamp = _ref_iso_ms(cluster["t"] * 1000) if type(cluster) is dict else _ref.change_timestamp({})
    lsid = change.get("lsid")
    if lsid is not None and change.get("txnNumber") is not None:
        correlation = f"{lsid.get('id')}:{change['txnNumber']}"
    else:
        token = change.get("_id")
        data = token.get("_data") if type(token) is dict else None
        if type(data) is str:
            correlation = _token_correlation(<str>data)
        else:
            correlation = _ref.correlation_id({"_id": token})
    update = None
    if operation == "UPDATE":
        desc = change.get("updateDescription")
        if desc is not None:
            update = {"updatedFields": desc.get("updatedFields") or {}, "removedFields": list(desc.get("removedFields") or [])}
            if desc.get("truncatedArrays"):
                update["truncatedArrays"] = desc["truncatedArrays"]
    # Positional: MongoEventBody's field order (channel, operation, collection, document,
    # operationType, timestamp, correlationId, updateDescription, oldDocument); kwargs cost more.
    body = _encode(_Body("mongo:" + collection, operation, collection, body_document, op_type, timestamp,
                         correlation, update, old))
    return _events(workspaces, collection, operation, record, body, old)
