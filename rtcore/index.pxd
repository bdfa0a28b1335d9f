# Contract of the compiled subscription index.

from rtcore.predicate cimport Matcher


cdef class Entry:
    # the fields a match reads come first, to share the object's first cache line
    cdef unsigned long long stamp
    cdef readonly object key
    cdef Matcher matcher
    cdef bint decided           # a bucket hit is a match: the matcher need not run
    cdef bint transitions
    cdef object keys            # tuple of (dotted, canonical key), or None: scanned
    cdef list tables            # the Tables the entry is in


cdef class AttrTable:
    cdef str dotted
    cdef tuple parts
    cdef tuple indexes
    cdef dict buckets           # canonical key -> Entry, or {Entry: None} when several


cdef class Table:
    cdef object slot            # (source, entity, operation or None)
    cdef Py_ssize_t count
    cdef dict scan              # {Entry: None}
    cdef list attrs             # [AttrTable]
    cdef dict by_path           # dotted -> AttrTable


cdef class SubscriptionIndex:
    cdef dict _entries          # key -> Entry
    cdef dict _sources          # source -> {entity -> {operation or None -> Table}}
    cdef Py_ssize_t _transitions
    cdef unsigned long long _stamp
    cdef int _gather(self, str source, str entity, str operation, object record, list out) except -1
