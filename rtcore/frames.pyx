# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled WebSocket frame building (server to client, unmasked): each frame is built in one
allocation. Byte-identical to `rtcore.frames_ref`; the tests compare the two."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

from rtcore import frames_ref as _ref

cdef extern from "Python.h":
    int64_t PyLong_AsLongLongAndOverflow(object value, int* overflow) except? -1


cdef inline Py_ssize_t header_size(Py_ssize_t n):
    if n < 126:
        return 2
    if n < 65536:
        return 4
    return 10


cdef inline void write_header(char* out, Py_ssize_t n):
    cdef int i
    out[0] = <char>0x81
    if n < 126:
        out[1] = <char>n
    elif n < 65536:
        out[1] = <char>0x7e
        out[2] = <char>((n >> 8) & 0xff)
        out[3] = <char>(n & 0xff)
    else:
        out[1] = <char>0x7f
        for i in range(8):
            out[2 + i] = <char>((<uint64_t>n >> (8 * (7 - i))) & 0xff)


cdef inline int format_int(int64_t value, char* buf) noexcept:
    """Writes the decimal digits of `value` at buf (21 bytes suffice); returns their count."""
    cdef char tmp[24]
    cdef int n = 0, i
    cdef uint64_t v
    cdef bint negative = value < 0
    if negative:
        v = <uint64_t>(-(value + 1)) + 1
    else:
        v = <uint64_t>value
    while True:
        tmp[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    if negative:
        tmp[n] = b'-'
        n += 1
    for i in range(n):
        buf[i] = tmp[n - 1 - i]
    return n


def text_frame(payload):
    """A complete, final, unmasked text frame carrying `payload`."""
    if type(payload) is not bytes:
        return _ref.text_frame(payload)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t h = header_size(n)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, h + n)
    cdef char* p = PyBytes_AS_STRING(out)
    write_header(p, n)
    memcpy(p + h, PyBytes_AS_STRING(payload), n)
    return out


def close_frame(code, reason=""):
    """A close frame with `code` and a UTF-8 `reason` (truncated to fit 125 bytes)."""
    return _ref.close_frame(code, reason)


cdef bytes splice(bytes body, bytes extra, int64_t seq, bint framed):
    cdef char digits[24]
    cdef int nd = format_int(seq, digits)
    cdef Py_ssize_t nb = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t ne = PyBytes_GET_SIZE(extra)
    if nb > 0:
        nb -= 1  # drop the closing brace
    cdef Py_ssize_t n = nb + ne + 7 + nd + 1  # ,"seq": is 7 bytes
    cdef Py_ssize_t h = header_size(n) if framed else 0
    cdef bytes out = PyBytes_FromStringAndSize(NULL, h + n)
    cdef char* p = PyBytes_AS_STRING(out)
    if framed:
        write_header(p, n)
        p += h
    memcpy(p, PyBytes_AS_STRING(body), nb)
    p += nb
    memcpy(p, PyBytes_AS_STRING(extra), ne)
    p += ne
    memcpy(p, b',"seq":', 7)
    p += 7
    memcpy(p, digits, nd)
    p[nd] = b'}'
    return out


cdef inline bint fast_args(body, extra, seq, int64_t* value) except -1:
    cdef int overflow = 0
    if type(body) is not bytes or type(extra) is not bytes or type(seq) is not int:
        return False
    value[0] = PyLong_AsLongLongAndOverflow(seq, &overflow)
    return overflow == 0


def with_seq(body, seq, extra=b""):
    """Splice `extra` members and `"seq": seq` into the encoded JSON object `body`."""
    cdef int64_t value
    if fast_args(body, extra, seq, &value):
        return splice(body, extra, value, False)
    return _ref.with_seq(body, seq, extra)


def event_frame(body, seq, extra=b""):
    """The complete WebSocket frame of an event body at position `seq`."""
    cdef int64_t value
    if fast_args(body, extra, seq, &value):
        return splice(body, extra, value, True)
    return _ref.event_frame(body, seq, extra)


def json_tokens(body):
    """How many `,` `:` and `[` the JSON `body` holds: what the objects it decodes to weigh
    grows with (rtserver.history.retained_size)."""
    cdef const unsigned char* p
    cdef Py_ssize_t i, n
    cdef Py_ssize_t count = 0
    cdef unsigned char c
    if type(body) is not bytes:
        return _ref.json_tokens(body)
    p = <const unsigned char*>PyBytes_AS_STRING(body)
    n = PyBytes_GET_SIZE(body)
    for i in range(n):
        c = p[i]
        if c == 0x2c or c == 0x3a or c == 0x5b:  # , : [
            count += 1
    return count
