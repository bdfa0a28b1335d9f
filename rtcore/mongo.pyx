# cython: language_level=3
"""Compiled normalizer of MongoDB change events (see mongo_ref.py, the reference it must equal
byte for byte): a change event -> one Event per target workspace, from raw BSON
(`normalize_raw`, the hot path: one walk of the BSON builds the record and writes the body's
JSON, no msgspec pass) or from a dict PyMongo decoded (`normalize_change`); `decode_raw` +
`normalize_decoded` decode BSON to JSON values, then encode (the general path, also
normalize_raw's fallback for unusual shapes).

Hot paths: the BSON decoder and the value walk, with exact-type dispatch for the common types
and C formatting of ObjectId hex, UUIDs, RFC 3339 dates, Decimal128, floats (msgspec's text)
and the correlation digest; anything rarer falls back to the reference."""

from cpython.datetime cimport (
    datetime_tzinfo, import_datetime, PyDateTime_GET_YEAR, PyDateTime_GET_MONTH, PyDateTime_GET_DAY,
    PyDateTime_DATE_GET_HOUR, PyDateTime_DATE_GET_MINUTE, PyDateTime_DATE_GET_SECOND,
    PyDateTime_DATE_GET_MICROSECOND,
)
from cpython.dict cimport PyDict_Copy, PyDict_Next
from cpython.object cimport PyObject
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport (
    PyUnicode_1BYTE_DATA, PyUnicode_AsUTF8AndSize, PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8, PyUnicode_New,
)
from cpython.ref cimport Py_INCREF, Py_XDECREF
from libc.stdint cimport int32_t, int64_t, uint32_t
from libc.string cimport memchr, memcmp, memcpy, memset, strchr, strlen
from libc.stdlib cimport atoi
from libc.math cimport fabs, isfinite, signbit
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint64_t

from binascii import b2a_base64

import datetime as _dt

import bson as _bson
from bson import Decimal128, Int64, ObjectId
from bson.binary import Binary
from bson.timestamp import Timestamp

from rtcore.event import Event
from rtcore.messages import MongoEventBody, encode
from rtcore.timefmt import MAX_RFC3339_MS, MIN_RFC3339_MS
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
    cdef char out[64]
    memcpy(out, prefix, prefix_len)
    _blake2b_96_chars(data, n, out + prefix_len)
    return PyUnicode_DecodeASCII(out, prefix_len + 24, NULL)


cdef void _blake2b_96_chars(const unsigned char* data, Py_ssize_t n, char* out) noexcept:
    """The 24 hex digits of BLAKE2b with a 12-byte digest (no key), written to out."""
    cdef uint64_t h[8]
    cdef unsigned char block[128]
    cdef unsigned char digest[64]
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
    for i in range(12):
        out[2 * i] = _HEX[digest[i] >> 4]
        out[2 * i + 1] = _HEX[digest[i] & 15]


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
    if operation == "DELETE" and old is not None:
        record = old  # the pre-image: predicates match the document deleted, not its key alone
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


cdef const char* _PAIRS = (b"00010203040506070809101112131415161718192021222324252627282930313233343536373839"
                           b"40414243444546474849505152535455565758596061626364656667686970717273747576777879"
                           b"8081828384858687888990919293949596979899")


cdef inline void _digits(char* out, int value, int width) noexcept:
    # value < 10**width
    if width == 2:
        memcpy(out, _PAIRS + 2 * value, 2)
    elif width == 4:
        memcpy(out, _PAIRS + 2 * (value // 100), 2)
        memcpy(out + 2, _PAIRS + 2 * (value % 100), 2)
    else:
        out[0] = <char>(48 + value // 100)
        memcpy(out + 1, _PAIRS + 2 * (value % 100), 2)


cdef str _format_iso(int year, int month, int day, int hour, int minute, int second, int millis):
    cdef char buf[24]
    _format_iso_chars(buf, year, month, day, hour, minute, second, millis)
    return PyUnicode_DecodeASCII(buf, 24, NULL)


cdef int _format_iso_chars(char* buf, int year, int month, int day, int hour, int minute, int second,
                           int millis) except -1:
    # snprintf and gmtime_r cost ~0.6 us together here; fixed-width digits do not.
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
    return 0


# Dates whose year has four digits; others are written with expanded years (rtcore.timefmt).
cdef int64_t _MIN_RFC3339_MS = MIN_RFC3339_MS
cdef int64_t _MAX_RFC3339_MS = MAX_RFC3339_MS


cdef str _iso_ms(int64_t ms):
    cdef char buf[24]
    if ms < _MIN_RFC3339_MS or ms > _MAX_RFC3339_MS:
        return _ref_iso_ms(ms)
    _iso_ms_chars(buf, ms)
    return PyUnicode_DecodeASCII(buf, 24, NULL)


cdef int _iso_ms_chars(char* buf, int64_t ms) except -1:
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
    return _format_iso_chars(buf, <int>year, <int>month, <int>day, <int>(sod // 3600), <int>(sod % 3600 // 60),
                             <int>(sod % 60), <int>rem)


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
        if size < 0:  # it would move p back, and slicing a negative length raised SystemError
            raise InvalidBSON("bad code with scope length")
        p += size
    elif kind == 0x0C:
        if p + 4 > end:
            raise InvalidBSON("truncated DBPointer")
        size = _i32(buf + p)
        if size < 0:
            raise InvalidBSON("bad DBPointer length")
        p += 4 + <Py_ssize_t>size + 12  # in Py_ssize_t: 4 + size + 12 overflowed int32
    else:
        raise InvalidBSON(f"unknown BSON element type 0x{kind:02x}")
    if p > end:
        raise InvalidBSON("truncated element")
    pos[0] = p
    element = bytes([kind]) + b"v\x00" + buf[start:p]
    doc = (len(element) + 5).to_bytes(4, "little", signed=True) + element + b"\x00"
    return _rare(_bson_decode(doc)["v"])


# Field names repeat from one event to the next: a direct-mapped cache of their str objects
# saves the decode and the hash (a str keeps its hash) of most keys, and keeps each name's JSON
# text ("name":) for the body writer.
cdef enum:
    KEY_SLOTS = 1024  # a power of two
    KEY_BITS = 10
    KEY_MAX = 24  # three 64-bit words
    KEY_JSON_MAX = 48

cdef struct _KeySlot:  # one slot's fields together: a lookup touches one or two cache lines
    uint64_t words[3]  # the name's bytes, zero-padded
    PyObject* obj  # an owned reference to its str, NULL when empty
    int32_t length
    int32_t json_length  # 0: too long to keep
    char json[KEY_JSON_MAX]  # "name":

cdef _KeySlot _keys[KEY_SLOTS]


cdef inline uint64_t _low_bytes(Py_ssize_t k) noexcept:
    return 0xFFFFFFFFFFFFFFFFULL if k >= 8 else (1ULL << (8 * k)) - 1


cdef inline Py_ssize_t _key_slot(const unsigned char* p, Py_ssize_t n, Py_ssize_t avail, uint64_t* w) noexcept:
    # The name as three zero-padded words. Three fixed-size loads and masks when 24 bytes are
    # readable: copying n bytes then reading words back stalls on store forwarding.
    if avail >= 24:
        memcpy(&w[0], p, 8)
        memcpy(&w[1], p + 8, 8)
        memcpy(&w[2], p + 16, 8)
        if n <= 8:
            w[0] &= _low_bytes(n)
            w[1] = 0
            w[2] = 0
        elif n <= 16:
            w[1] &= _low_bytes(n - 8)
            w[2] = 0
        else:
            w[2] &= _low_bytes(n - 16)
    else:
        w[0] = 0
        w[1] = 0
        w[2] = 0
        memcpy(w, p, n)
    cdef uint64_t h = (w[0] ^ (w[1] * 0xC2B2AE3D27D4EB4FULL) ^ (w[2] * 0x165667B19E3779F9ULL) ^ <uint64_t>n) \
        * 0x9E3779B97F4A7C15ULL
    return <Py_ssize_t>(h >> (64 - KEY_BITS))


cdef inline bint _key_hit(const _KeySlot* s, Py_ssize_t n, const uint64_t* w) noexcept:
    return s.length == n and s.words[0] == w[0] and s.words[1] == w[1] and s.words[2] == w[2] and s.obj != NULL


cdef object _key_fill(Py_ssize_t slot, const unsigned char* p, Py_ssize_t n, const uint64_t* w):
    cdef object key = PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    cdef char text[6 * KEY_MAX + 3]
    cdef _Out o
    o.p = text
    o.n = 0
    o.cap = sizeof(text)
    o.heap = False
    _put_string(&o, p, n)
    _putc(&o, 58)  # never grows: sized for the worst case
    cdef _KeySlot* s = &_keys[slot]
    Py_XDECREF(s.obj)
    Py_INCREF(key)
    s.obj = <PyObject*>key
    s.words[0] = w[0]
    s.words[1] = w[1]
    s.words[2] = w[2]
    s.length = <int32_t>n
    if o.n <= KEY_JSON_MAX:
        memcpy(s.json, text, o.n)
        s.json_length = <int32_t>o.n
    else:
        s.json_length = 0
    return key


cdef inline object _key(const unsigned char* p, Py_ssize_t n, Py_ssize_t avail=0):
    """The str of a field name of n bytes at p (avail: bytes readable from p)."""
    cdef uint64_t w[3]
    cdef Py_ssize_t slot
    if n > KEY_MAX:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    slot = _key_slot(p, n, avail, w)
    if _key_hit(&_keys[slot], n, w):
        return <object>_keys[slot].obj
    return _key_fill(slot, p, n, w)


cdef inline object _jkey(const unsigned char* p, Py_ssize_t n, Py_ssize_t avail, _Out* o):
    """_key, also writing "name": to o."""
    cdef uint64_t w[3]
    cdef Py_ssize_t slot
    cdef object key
    cdef _KeySlot* s
    if n <= KEY_MAX:
        slot = _key_slot(p, n, avail, w)
        s = &_keys[slot]
        key = <object>s.obj if _key_hit(s, n, w) else _key_fill(slot, p, n, w)
        if s.json_length:
            _put(o, s.json, s.json_length)
            return key
    else:
        key = PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    _put_string(o, p, n)
    _putc(o, 58)
    return key


cdef inline const unsigned char* _name_end(const unsigned char* p, const unsigned char* end) noexcept:
    # The NUL ending a field name, or NULL; names are short, so a loop beats calling memchr.
    while p < end:
        if p[0] == 0:
            return p
        p += 1
    return NULL


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
        q = _name_end(buf + p, buf + doc_end)
        if q == NULL:
            raise InvalidBSON("unterminated field name")
        if as_list:
            p = q - buf + 1
            items.append(_raw_value(kind, buf, &p, doc_end))
        else:
            key = _key(buf + p, q - buf - p, doc_end - p)
            p = q - buf + 1
            fields[key] = _raw_value(kind, buf, &p, doc_end)
    if p != doc_end:
        raise InvalidBSON("element overruns its document")
    pos[0] = doc_end + 1
    return items if as_list else fields


cdef object _no_utf8(object exc):
    # A string or name that is no UTF-8 (MongoDB keeps what a driver wrote): malformed BSON,
    # as bson.decode (the reference) says, with the same text, whichever path read it.
    return InvalidBSON(str(exc))


cdef bytes _bson_bytes(object raw):
    # PyMongo hands large replies' documents over as memoryviews of the reply buffer.
    data = raw.raw if type(raw) is _RawBSONDocument else raw
    if data is None:
        raise TypeError("expected BSON bytes or a RawBSONDocument, got None")
    return data if type(data) is bytes else bytes(data)


def decode_raw(raw):
    """BSON bytes (or a RawBSONDocument, or a memoryview of BSON) as JSON-ready values:
    to_json(bson.decode(raw))."""
    cdef bytes data = _bson_bytes(raw)
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    try:
        result = _raw_document(<const unsigned char*>PyBytes_AS_STRING(data), &pos, n, False)
    except UnicodeDecodeError as exc:
        raise _no_utf8(exc) from None
    if pos != n:
        raise InvalidBSON("trailing bytes after the document")
    return result


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
    if operation == "DELETE" and old is not None:
        record = old  # the pre-image: predicates match the document deleted, not its key alone
    return _events(workspaces, collection, operation, record, body, old)


# ---- raw BSON -> record and event body in one pass ---------------------------------------------
# msgspec's encoding of the body was a second walk over the decoded document (~1 us of ~4.7 us).
# Here each BSON value becomes its Python value (the record predicates read) and its JSON text
# in the same step, and the parts of the change event that only the body needs
# (updateDescription) or nothing needs (clusterTime when wallTime is there, documentKey beside
# a fullDocument) are never turned into Python objects. The JSON equals msgspec.json's bytes:
# same escapes, same float text (tests compare with the reference byte for byte). A change event
# of an unusual shape returns None from the fast path and goes the general way.

cdef extern from "Python.h":
    char* PyOS_double_to_string(double val, char format_code, int precision, int flags, int* ptype) except NULL

cdef struct _Out:  # the body being written: a stack buffer, moved to the heap if it outgrows it
    char* p
    Py_ssize_t n
    Py_ssize_t cap
    bint heap


cdef int _grow(_Out* o, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = o.cap * 2
    cdef char* p
    if cap < o.n + need:
        cap = o.n + need
    p = <char*>PyMem_Malloc(cap)
    if p == NULL:
        raise MemoryError()
    memcpy(p, o.p, o.n)
    if o.heap:
        PyMem_Free(o.p)
    o.p = p
    o.cap = cap
    o.heap = True
    return 0


cdef inline int _put(_Out* o, const char* s, Py_ssize_t n) except -1:
    if o.n + n > o.cap:
        _grow(o, n)
    memcpy(o.p + o.n, s, n)
    o.n += n
    return 0


cdef inline int _puts(_Out* o, const char* s) except -1:
    return _put(o, s, strlen(s))


cdef inline int _putc(_Out* o, char c) except -1:
    if o.n + 1 > o.cap:
        _grow(o, 1)
    o.p[o.n] = c
    o.n += 1
    return 0


# msgspec's escapes: \" \\ \b \t \n \f \r, \u00XX for other control characters; the rest
# (DEL and non-ASCII UTF-8 included) verbatim.
cdef unsigned char _ESC[256]
memset(_ESC, 0, 256)
for _c in range(32):
    _ESC[_c] = 117  # u
_ESC[8], _ESC[9], _ESC[10], _ESC[12], _ESC[13] = 98, 116, 110, 102, 114
_ESC[34], _ESC[92] = 34, 92


cdef int _put_chars(_Out* o, const unsigned char* s, Py_ssize_t n) except -1:
    """UTF-8 text as the inside of a JSON string."""
    cdef Py_ssize_t i
    cdef unsigned char c, e
    cdef char* w
    if o.n + 6 * n > o.cap:
        _grow(o, 6 * n)
    w = o.p + o.n
    for i in range(n):
        c = s[i]
        e = _ESC[c]
        if e == 0:
            w[0] = c
            w += 1
        elif e == 117:
            w[0] = 92
            w[1] = 117
            w[2] = 48
            w[3] = 48
            w[4] = _HEX[c >> 4]
            w[5] = _HEX[c & 15]
            w += 6
        else:
            w[0] = 92
            w[1] = e
            w += 2
    o.n = w - o.p
    return 0


cdef inline int _put_string(_Out* o, const unsigned char* s, Py_ssize_t n) except -1:
    _putc(o, 34)
    _put_chars(o, s, n)
    return _putc(o, 34)


cdef str _jstring(const unsigned char* s, Py_ssize_t n, _Out* o):
    """A BSON string's text as a str, its JSON written to o; one scan finds whether it is ASCII
    (copied into the str as is) and whether it needs escapes (else copied to o as is)."""
    cdef Py_ssize_t i
    cdef unsigned char high = 0, escape = 0
    cdef str text
    for i in range(n):
        high |= s[i]
        escape |= _ESC[s[i]]
    if high < 128:
        text = PyUnicode_New(n, 127)
        memcpy(PyUnicode_1BYTE_DATA(text), s, n)
    else:
        text = PyUnicode_DecodeUTF8(<const char*>s, n, NULL)
    if escape:
        _put_string(o, s, n)
    else:
        if o.n + n + 2 > o.cap:
            _grow(o, n + 2)
        o.p[o.n] = 34
        memcpy(o.p + o.n + 1, s, n)
        o.p[o.n + n + 1] = 34
        o.n += n + 2
    return text


cdef int _put_str(_Out* o, str text) except -1:
    cdef Py_ssize_t n
    cdef const char* utf8 = PyUnicode_AsUTF8AndSize(text, &n)
    return _put_string(o, <const unsigned char*>utf8, n)


cdef int _put_int(_Out* o, int64_t v) except -1:
    cdef char tmp[24]
    cdef int i = 24
    cdef uint64_t u = <uint64_t>v
    if v < 0:
        u = (~u) + 1
    while True:
        i -= 1
        tmp[i] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    if v < 0:
        i -= 1
        tmp[i] = 45
    return _put(o, tmp + i, 24 - i)


cdef int _put_double(_Out* o, double d) except -1:
    # msgspec writes the shortest round-trip digits (as repr), in fixed notation for decimal
    # exponents -5..15 and as 1e16 / 1.5e-7 beyond. Fast path: the fewest decimals f such that
    # N / 10**f (N < 2**50: one candidate per f, exact integers, one correctly rounded
    # division) gives back d; anything else asks repr's algorithm.
    cdef double a, x
    cdef uint64_t N
    cdef int f
    if not isfinite(d):
        return _put(o, "null", 4)
    if d == 0:
        return _put(o, "-0.0", 4) if signbit(d) else _put(o, "0.0", 3)
    a = fabs(d)
    if a >= 1e-5 and a < 1e15:
        for f in range(18):
            x = a * _POW10[f]
            if x >= 1125899906842624.0:  # 2**50
                break
            N = <uint64_t>(x + 0.5)
            if <double>N / _POW10[f] == a:
                return _put_fixed(o, d < 0, N, f)
    return _put_double_slow(o, d)


cdef int _put_fixed(_Out* o, bint negative, uint64_t N, int f) except -1:
    cdef char digits[24]
    cdef char tmp[48]
    cdef int L = 0, i, w = 0
    while True:
        digits[23 - L] = <char>(48 + N % 10)
        L += 1
        N //= 10
        if N == 0:
            break
    cdef const char* s = digits + 24 - L
    if negative:
        tmp[w] = 45
        w += 1
    if f == 0:
        memcpy(tmp + w, s, L)
        w += L
        tmp[w] = 46
        tmp[w + 1] = 48
        w += 2
    elif L > f:
        memcpy(tmp + w, s, L - f)
        w += L - f
        tmp[w] = 46
        w += 1
        memcpy(tmp + w, s + L - f, f)
        w += f
    else:
        tmp[w] = 48
        tmp[w + 1] = 46
        w += 2
        for i in range(f - L):
            tmp[w] = 48
            w += 1
        memcpy(tmp + w, s, L)
        w += L
    return _put(o, tmp, w)


cdef int _put_double_slow(_Out* o, double d) except -1:
    # repr differs from msgspec in notation only: "1e+16" -> "1e16", "1.5e-05" -> "0.000015".
    cdef char* s = PyOS_double_to_string(d, b'r', 0, 0, NULL)
    cdef char* e
    cdef const char* m
    cdef int exp, start
    try:
        e = strchr(s, 101)  # 'e'
        if e == NULL:
            _put(o, s, strlen(s))
            if strchr(s, 46) == NULL:
                _put(o, ".0", 2)
            return 0
        exp = atoi(e + 1)
        if exp != -5:
            _put(o, s, e - s)
            _putc(o, 101)
            return _put_int(o, exp)
        start = 0
        if s[0] == 45:
            _putc(o, 45)
            start = 1
        _put(o, "0.0000", 6)
        m = s + start
        while m < e:
            if m[0] != 46:
                _putc(o, m[0])
            m += 1
        return 0
    finally:
        PyMem_Free(s)


cdef int _put_obj(_Out* o, object value) except -1:
    """Any JSON-ready value (the rarer BSON types, Decimal128's slow path): as msgspec writes it."""
    cdef bytes text
    cdef type t = type(value)
    if value is None:
        return _put(o, "null", 4)
    if t is float:
        return _put_double(o, value)
    if t is str:
        return _put_str(o, value)
    if t is int and -9223372036854775808 <= value <= 9223372036854775807:
        return _put_int(o, value)
    text = _encode(value)
    return _put(o, PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text))


cdef inline int _put_quoted_ascii(_Out* o, str text) except -1:
    # hex, dates, UUIDs, base64: nothing to escape
    cdef Py_ssize_t n
    cdef const char* utf8 = PyUnicode_AsUTF8AndSize(text, &n)
    if o.n + n + 2 > o.cap:
        _grow(o, n + 2)
    o.p[o.n] = 34
    memcpy(o.p + o.n + 1, utf8, n)
    o.p[o.n + n + 1] = 34
    o.n += n + 2
    return 0


cdef object _jvalue(int kind, const unsigned char* buf, Py_ssize_t* pos, Py_ssize_t end, _Out* o):
    """_raw_value, also writing the value's JSON to o."""
    cdef Py_ssize_t p = pos[0]
    cdef int32_t size
    cdef int32_t i32
    cdef int64_t i64
    cdef int64_t ms
    cdef double d
    cdef object value
    cdef char* w
    if kind == 0x02 or kind == 0x0D or kind == 0x0E:  # string, code, symbol
        if p + 4 > end:
            raise InvalidBSON("truncated string")
        size = _i32(buf + p)
        if size < 1 or p + 4 + size > end or buf[p + 3 + size] != 0:
            raise InvalidBSON("bad string length")
        pos[0] = p + 4 + size
        return _jstring(buf + p + 4, size - 1, o)
    if kind == 0x10:
        if p + 4 > end:
            raise InvalidBSON("truncated int32")
        pos[0] = p + 4
        i32 = _i32(buf + p)
        _put_int(o, i32)
        return i32
    if kind == 0x03 or kind == 0x04:
        return _jdocument(buf, pos, end, kind == 0x04, o)
    if kind == 0x01:
        if p + 8 > end:
            raise InvalidBSON("truncated double")
        memcpy(&d, buf + p, 8)
        pos[0] = p + 8
        _put_double(o, d)
        return d
    if kind == 0x07:
        if p + 12 > end:
            raise InvalidBSON("truncated ObjectId")
        pos[0] = p + 12
        value = _hex12(buf + p)
        _put_quoted_ascii(o, value)
        return value
    if kind == 0x09:
        if p + 8 > end:
            raise InvalidBSON("truncated datetime")
        pos[0] = p + 8
        ms = _i64(buf + p)
        if ms < _MIN_RFC3339_MS or ms > _MAX_RFC3339_MS:
            value = _ref_iso_ms(ms)
            _put_quoted_ascii(o, value)
            return value
        if o.n + 26 > o.cap:
            _grow(o, 26)
        w = o.p + o.n
        w[0] = 34
        _iso_ms_chars(w + 1, ms)
        w[25] = 34
        o.n += 26
        return PyUnicode_DecodeASCII(w + 1, 24, NULL)
    if kind == 0x08:
        if p + 1 > end:
            raise InvalidBSON("truncated bool")
        pos[0] = p + 1
        if buf[p] != 0:
            _put(o, "true", 4)
            return True
        _put(o, "false", 5)
        return False
    if kind == 0x0A or kind == 0x06:
        _put(o, "null", 4)
        return None
    if kind == 0x12:
        if p + 8 > end:
            raise InvalidBSON("truncated int64")
        pos[0] = p + 8
        i64 = _i64(buf + p)
        _put_int(o, i64)
        return i64
    if kind == 0x05:
        value = _raw_value(kind, buf, pos, end)  # base64 or UUID text
        _put_quoted_ascii(o, value)
        return value
    value = _raw_value(kind, buf, pos, end)  # decimal128, timestamp, min/max key, regex...
    _put_obj(o, value)
    return value


cdef object _jdocument(const unsigned char* buf, Py_ssize_t* pos, Py_ssize_t end, bint as_list, _Out* o):
    """_raw_document, also writing the document's JSON to o."""
    cdef Py_ssize_t p = pos[0]
    cdef int32_t size
    cdef Py_ssize_t doc_end, count = 0
    cdef Py_ssize_t start = o.n
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
    _putc(o, 91 if as_list else 123)
    while p < doc_end:
        kind = buf[p]
        p += 1
        q = _name_end(buf + p, buf + doc_end)
        if q == NULL:
            raise InvalidBSON("unterminated field name")
        if count:
            _putc(o, 44)
        count += 1
        if as_list:
            p = q - buf + 1
            items.append(_jvalue(kind, buf, &p, doc_end, o))
        else:
            key = _jkey(buf + p, q - buf - p, doc_end - p, o)
            p = q - buf + 1
            fields[key] = _jvalue(kind, buf, &p, doc_end, o)
    if p != doc_end:
        raise InvalidBSON("element overruns its document")
    pos[0] = doc_end + 1
    if as_list:
        _putc(o, 93)
        return items
    if len(fields) != count:  # a repeated field name: the dict keeps one, so must the JSON
        o.n = start
        _put_obj(o, fields)
    else:
        _putc(o, 125)
    return fields


cdef Py_ssize_t _skip(int kind, const unsigned char* buf, Py_ssize_t p, Py_ssize_t end) noexcept:
    """The offset after a value, checking only its length; -1 if malformed."""
    cdef int32_t size
    cdef const unsigned char* q
    if kind == 0x01 or kind == 0x09 or kind == 0x11 or kind == 0x12:
        p += 8
    elif kind == 0x10:
        p += 4
    elif kind == 0x07:
        p += 12
    elif kind == 0x13:
        p += 16
    elif kind == 0x08:
        p += 1
    elif kind == 0x0A or kind == 0x06 or kind == 0xFF or kind == 0x7F:
        pass
    elif kind == 0x02 or kind == 0x0D or kind == 0x0E or kind == 0x03 or kind == 0x04 or kind == 0x05 \
            or kind == 0x0C or kind == 0x0F:
        if p + 4 > end:
            return -1
        size = _i32(buf + p)
        if size < 0:
            return -1
        # in Py_ssize_t: 4 + size overflowed int32 for a length near 2**31 (UBSan)
        if kind == 0x02 or kind == 0x0D or kind == 0x0E:
            p += 4 + <Py_ssize_t>size
        elif kind == 0x05:
            p += 5 + <Py_ssize_t>size
        elif kind == 0x0C:
            p += 4 + <Py_ssize_t>size + 12
        else:
            if size < 5:
                return -1
            p += size
    elif kind == 0x0B:
        for _ in range(2):
            q = <const unsigned char*>memchr(buf + p, 0, end - p) if p < end else NULL
            if q == NULL:
                return -1
            p = q - buf + 1
    else:
        return -1
    return p if p <= end else -1


cdef enum:
    F_ID, F_OP, F_CLUSTER, F_WALL, F_NS, F_KEY, F_FULL, F_BEFORE, F_DESC, F_LSID, F_TXN, F_COUNT
    U_UPDATED = 0, U_REMOVED, U_TRUNCATED, U_COUNT
    OP_INSERT = 0, OP_UPDATE, OP_REPLACE, OP_DELETE


cdef inline bint _is(const unsigned char* name, Py_ssize_t n, const char* want, Py_ssize_t wn) noexcept:
    return n == wn and memcmp(name, want, n) == 0


cdef int _field(const unsigned char* name, Py_ssize_t n) noexcept:
    if _is(name, n, "_id", 3):
        return F_ID
    if _is(name, n, "operationType", 13):
        return F_OP
    if _is(name, n, "clusterTime", 11):
        return F_CLUSTER
    if _is(name, n, "wallTime", 8):
        return F_WALL
    if _is(name, n, "ns", 2):
        return F_NS
    if _is(name, n, "documentKey", 11):
        return F_KEY
    if _is(name, n, "fullDocument", 12):
        return F_FULL
    if _is(name, n, "fullDocumentBeforeChange", 24):
        return F_BEFORE
    if _is(name, n, "updateDescription", 17):
        return F_DESC
    if _is(name, n, "lsid", 4):
        return F_LSID
    if _is(name, n, "txnNumber", 9):
        return F_TXN
    return -1


cdef int _scan(const unsigned char* buf, Py_ssize_t p, Py_ssize_t end, int (*field)(const unsigned char*, Py_ssize_t) noexcept,
               int* kinds, Py_ssize_t* at, int count) noexcept:
    """Where the wanted fields of the document at p are (a repeated name: the last one, as a
    dict keeps); 0 absent. -1 if malformed (the general path then says how)."""
    cdef int32_t size
    cdef Py_ssize_t doc_end
    cdef int kind, fid, i
    cdef const unsigned char* q
    for i in range(count):
        kinds[i] = 0
    if p + 5 > end:
        return -1
    size = _i32(buf + p)
    if size < 5 or p + size > end or buf[p + size - 1] != 0:
        return -1
    doc_end = p + size - 1
    p += 4
    while p < doc_end:
        kind = buf[p]
        p += 1
        q = _name_end(buf + p, buf + doc_end)
        if q == NULL:
            return -1
        fid = field(buf + p, q - buf - p)
        p = q - buf + 1
        if fid >= 0:
            kinds[fid] = kind
            at[fid] = p
        p = _skip(kind, buf, p, doc_end)
        if p < 0:
            return -1
    return 0 if p == doc_end else -1


cdef int _coll_field(const unsigned char* name, Py_ssize_t n) noexcept:
    return 0 if _is(name, n, "coll", 4) else -1


cdef int _data_field(const unsigned char* name, Py_ssize_t n) noexcept:
    return 0 if _is(name, n, "_data", 5) else -1


cdef int _update_field(const unsigned char* name, Py_ssize_t n) noexcept:
    if _is(name, n, "updatedFields", 13):
        return U_UPDATED
    if _is(name, n, "removedFields", 13):
        return U_REMOVED
    if _is(name, n, "truncatedArrays", 15):
        return U_TRUNCATED
    return -1


cdef inline bint _absent(int kind) noexcept:
    return kind == 0 or kind == 0x0A


cdef int _put_update(const unsigned char* buf, Py_ssize_t p, Py_ssize_t end, _Out* o) except -2:
    ""","updateDescription":{...} as the reference builds it; 1 for a shape left to it."""
    cdef int kinds[U_COUNT]
    cdef Py_ssize_t at[U_COUNT]
    cdef Py_ssize_t pos
    if _scan(buf, p, end, _update_field, kinds, at, U_COUNT) < 0:
        return 1
    if not (kinds[U_UPDATED] == 0x03 or _absent(kinds[U_UPDATED])) \
            or not (kinds[U_REMOVED] == 0x04 or _absent(kinds[U_REMOVED])) \
            or not (kinds[U_TRUNCATED] == 0x04 or _absent(kinds[U_TRUNCATED])):
        return 1
    _puts(o, ',"updateDescription":{"updatedFields":')
    if kinds[U_UPDATED] == 0x03:
        pos = at[U_UPDATED]
        _jdocument(buf, &pos, end, False, o)
    else:
        _put(o, "{}", 2)
    _puts(o, ',"removedFields":')
    if kinds[U_REMOVED] == 0x04:
        pos = at[U_REMOVED]
        _jdocument(buf, &pos, end, True, o)
    else:
        _put(o, "[]", 2)
    if kinds[U_TRUNCATED] == 0x04 and _i32(buf + at[U_TRUNCATED]) > 5:  # a non-empty array
        _puts(o, ',"truncatedArrays":')
        pos = at[U_TRUNCATED]
        _jdocument(buf, &pos, end, True, o)
    _putc(o, 125)
    return 0


cdef str _OP_INSERT = "INSERT"
cdef str _OP_UPDATE = "UPDATE"
cdef str _OP_REPLACE = "REPLACE"
cdef str _OP_DELETE = "DELETE"


cdef object _normalize_fast(bytes data, object workspaces, _Out* o):
    """normalize_raw's events, or None for a change event the general path must take."""
    cdef const unsigned char* buf = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef int kinds[F_COUNT]
    cdef Py_ssize_t at[F_COUNT]
    cdef Py_ssize_t pos, size
    cdef int op, kind
    cdef str operation, op_name, collection, correlation
    cdef object record, old = None, lsid, txn, cluster
    cdef char token_digest[30]
    cdef Py_ssize_t i
    if n < 5 or _i32(buf) != n or _scan(buf, 0, n, _field, kinds, at, F_COUNT) < 0:
        return None
    end = n - 1
    # operationType: one of the four data operations, else no event
    if _absent(kinds[F_OP]):
        return []
    if kinds[F_OP] != 0x02:
        return None
    pos = at[F_OP]
    size = _i32(buf + pos)
    if size < 1 or buf[pos + 3 + size] != 0:
        return None
    if _is(buf + pos + 4, size - 1, "insert", 6):
        op, operation, op_name = OP_INSERT, _OP_INSERT, "insert"
    elif _is(buf + pos + 4, size - 1, "update", 6):
        op, operation, op_name = OP_UPDATE, _OP_UPDATE, "update"
    elif _is(buf + pos + 4, size - 1, "replace", 7):
        op, operation, op_name = OP_REPLACE, _OP_REPLACE, "replace"
    elif _is(buf + pos + 4, size - 1, "delete", 6):
        op, operation, op_name = OP_DELETE, _OP_DELETE, "delete"
    else:
        return []
    # ns.coll
    kind = kinds[F_NS]
    if _absent(kind):
        collection = ""
    elif kind == 0x03:
        if _scan(buf, at[F_NS], end, _coll_field, &kind, &pos, 1) < 0:
            return None
        if kind == 0:
            collection = ""
        elif kind == 0x02:
            size = _i32(buf + pos)
            if size < 1 or buf[pos + 3 + size] != 0:
                return None
            collection = _key(buf + pos + 4, size - 1)  # names repeat: the cached str
        else:
            return None
    else:
        return None
    # timestamp: wallTime, else clusterTime's seconds
    cdef char stamp[24]
    cdef int64_t wall
    if kinds[F_WALL] == 0x09:
        wall = _i64(buf + at[F_WALL])
        if wall < _MIN_RFC3339_MS or wall > _MAX_RFC3339_MS:
            return None
        _iso_ms_chars(stamp, wall)
    elif _absent(kinds[F_WALL]) and kinds[F_CLUSTER] == 0x11:
        cluster = _ref_iso_ms(<int64_t><uint32_t>_i32(buf + at[F_CLUSTER] + 4) * 1000)
        if type(cluster) is not str or len(<str>cluster) != 24:
            return None
        memcpy(stamp, PyUnicode_AsUTF8AndSize(cluster, NULL), 24)
    else:
        return None
    # correlationId: the transaction, else a digest of the resume token
    if not _absent(kinds[F_LSID]) and not _absent(kinds[F_TXN]):
        if kinds[F_LSID] != 0x03:
            return None
        pos = at[F_LSID]
        lsid = _raw_document(buf, &pos, end, False)
        pos = at[F_TXN]
        txn = _raw_value(kinds[F_TXN], buf, &pos, end)
        correlation = f"{lsid.get('id')}:{txn}"
    else:
        if kinds[F_ID] != 0x03 or _scan(buf, at[F_ID], end, _data_field, &kind, &pos, 1) < 0 or kind != 0x02:
            return None
        size = _i32(buf + pos)
        if size < 1 or buf[pos + 3 + size] != 0:
            return None
        for i in range(size - 1):
            if buf[pos + 4 + i] >= 128:  # not ASCII (resume tokens are hex): let the decoder judge
                return None
        correlation = None
        memcpy(token_digest, b"mongo-", 6)
        _blake2b_96_chars(buf + pos + 4, size - 1, token_digest + 6)
    # the body, in MongoEventBody's field order
    cdef Py_ssize_t coll_n
    cdef const unsigned char* coll = <const unsigned char*>PyUnicode_AsUTF8AndSize(collection, &coll_n)
    _puts(o, '{"type":"event","channel":"mongo:')
    _put_chars(o, coll, coll_n)
    _puts(o, '","operation":"')
    _puts(o, PyUnicode_AsUTF8AndSize(operation, NULL))
    _puts(o, '","collection":')
    _put_string(o, coll, coll_n)
    _puts(o, ',"document":')
    kind = kinds[F_KEY]
    if not (kind == 0x03 or _absent(kind)):
        return None
    if op == OP_DELETE:
        if kind == 0x03:
            pos = at[F_KEY]
            record = _jdocument(buf, &pos, end, False, o)
        else:
            record = {}
            _puts(o, "{}")
    elif kinds[F_FULL] == 0x03:
        pos = at[F_FULL]
        record = _jdocument(buf, &pos, end, False, o)
    elif _absent(kinds[F_FULL]):  # updateLookup found the document gone: the key is the record
        _puts(o, "null")
        if kind == 0x03:
            pos = at[F_KEY]
            record = _raw_document(buf, &pos, end, False)
        else:
            record = {}
    else:
        return None
    _puts(o, ',"operationType":"')
    _puts(o, PyUnicode_AsUTF8AndSize(op_name, NULL))
    _puts(o, '","timestamp":"')
    _put(o, stamp, 24)
    _puts(o, '","correlationId":')
    if correlation is None:
        _putc(o, 34)
        _put(o, token_digest, 30)
        _putc(o, 34)
    else:
        _put_str(o, correlation)
    if op == OP_UPDATE:
        kind = kinds[F_DESC]
        if kind == 0x03:
            if _put_update(buf, at[F_DESC], end, o) != 0:
                return None
        elif not _absent(kind):
            return None
    kind = kinds[F_BEFORE]
    if kind == 0x03:
        _puts(o, ',"oldDocument":')
        pos = at[F_BEFORE]
        old = _jdocument(buf, &pos, end, False, o)
    elif not _absent(kind):
        return None
    _putc(o, 125)
    if op == OP_DELETE and old is not None:
        record = old  # the pre-image: predicates match the document deleted, not its key alone
    return _events(workspaces, collection, operation, record, PyBytes_FromStringAndSize(o.p, o.n), old)


cdef object _fast(bytes data, object workspaces):
    cdef char stack[4096]
    cdef _Out o
    o.p = stack
    o.n = 0
    o.cap = 4096
    o.heap = False
    try:
        return _normalize_fast(data, workspaces, &o)
    finally:
        if o.heap:
            PyMem_Free(o.p)


def normalize_raw(raw, workspaces):
    """normalize_change of a change event still in BSON (PyMongo's RawBSONDocument or bytes)."""
    if not workspaces:
        return []
    cdef bytes data = _bson_bytes(raw)
    try:
        events = _fast(data, workspaces)
    except UnicodeDecodeError as exc:
        raise _no_utf8(exc) from None
    if events is None:
        return normalize_decoded(decode_raw(data), workspaces)
    return events


def normalize_raw_fast_path(bytes data, workspaces):
    """normalize_raw's one-pass path alone: None for a change event it leaves to the general
    path (for tests: they check which path a shape takes)."""
    return _fast(data, workspaces)
