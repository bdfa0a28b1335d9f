# The contract of the compiled pgoutput decoder (rtcore/pgoutput.pyx): a stateful decoder of
# CopyData frames of a logical replication stream; see rtcore/pgoutput_ref.py for the API.

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


ctypedef struct Reader:
    const uint8_t* buf
    Py_ssize_t pos
    Py_ssize_t end


# The per-row messages are native classes (allocation without __init__, C-typed LSN fields):
# they compare equal to the reference module's classes of the same kind (astuple()).
cdef class _Msg:
    pass


cdef class XLogData(_Msg):
    cdef public uint64_t wal_start
    cdef public uint64_t wal_end
    cdef public int64_t send_time
    cdef public object message


cdef class Keepalive(_Msg):
    cdef public uint64_t wal_end
    cdef public int64_t send_time
    cdef public bint reply_requested


cdef class Begin(_Msg):
    cdef public uint64_t final_lsn
    cdef public int64_t commit_time
    cdef public uint32_t xid


cdef class Commit(_Msg):
    cdef public uint8_t flags
    cdef public uint64_t commit_lsn
    cdef public uint64_t end_lsn
    cdef public int64_t commit_time


cdef class Insert(_Msg):
    cdef public object relation
    cdef public dict new
    cdef public object xid


cdef class Update(_Msg):
    cdef public object relation
    cdef public str old_kind
    cdef public object old
    cdef public dict new
    cdef public object xid


cdef class Delete(_Msg):
    cdef public object relation
    cdef public str old_kind
    cdef public dict old
    cdef public object xid


cdef class _RelInfo:
    # Per-relation decoding state: column names and converter codes as C-friendly bytes.
    cdef object relation
    cdef list columns
    cdef bytes codes
    cdef bytes elems
    cdef bytes is_key
    cdef Py_ssize_t ncols


cdef class Decoder:
    cdef public dict relations
    cdef public dict types
    cdef public dict arrays
    cdef public dict domains
    cdef public list errors
    cdef dict _info
    cdef public bint in_stream

    cdef _RelInfo _build_info(self, rel)
    cdef object _decode(self, const uint8_t* p, Py_ssize_t n, bytes owner)
    cdef _RelInfo _info_for(self, uint32_t relid)
    cdef dict _tuple(self, Reader* r, _RelInfo info, bint key_only)
