# Contract of the compiled subscription index.

from rtcore.predicate cimport Matcher


cdef class Entry:
    # the fields a match reads come first, to share the object's first cache line
    cdef unsigned long long stamp
    cdef readonly object key
    # A residual that is one equality / inequality of a top-level field with a scalar is
    # checked from these (no matcher): rfield the field name (shared_name), rhash the hash of
    # the canonical operand, rkind R_EQ / R_NE (0: use the matcher).
    cdef object rfield
    cdef Py_hash_t rhash
    cdef int rkind
    cdef bint decided           # a bucket hit is a match: the matcher need not run
    cdef object rkey            # the canonical operand (read only when the hashes agree)
    cdef Matcher matcher
    cdef bint transitions
    cdef bint direct            # decided, in one bucket per Table: buckets hold its key itself
    cdef bint everyone          # no filter (and no transitions): in Table.everyone by its key
    cdef object keys            # tuple of (dotted, canonical key), or None: scanned
    cdef list tables            # the Tables the entry is in


# One bucket of a Table's hash table: the entries whose filter implies "attribute `attr`
# equals `key`". Entries are borrowed references (the index's _entries dict owns them).
ctypedef struct Slot:
    Py_hash_t hash              # hash(key)
    void* key                   # owned reference to the canonical key; NULL: empty slot
    void* ptr                   # n == 1: the item; 2..SMALL: an array of items; BIG: a Big.
                                # An item is an Entry, or a direct entry's key with the low
                                # bit set
    int attr                    # AttrTable.id
    int n                       # entries, or BIG (ptr is a Big)


# A BIG bucket's entry as a match reads it: what decides it without its Entry, side by side
# with the others' in one array (see Big). 32 bytes: two to a cache line.
ctypedef struct Rec:
    void* key                   # borrowed: the subscription key (its Entry holds it)
    size_t entry                # borrowed Entry (NULL for K_DIRECT), its K_* kind in the low 2 bits
    void* rfield                # borrowed Entry.rfield for K_EQ / K_NE, else NULL
    Py_hash_t rhash             # Entry.rhash for K_EQ / K_NE


# A BIG bucket: this header, then `cap` Recs, in one allocation that Slot.ptr points to. The
# records are unordered (removal moves the last one into the hole); `where` finds an entry's.
ctypedef struct Big:
    void* where                 # owned dict {Entry, or a direct entry's key: its position}
    Py_ssize_t n                # records in use
    Py_ssize_t cap              # records allocated
    Py_ssize_t unused           # keeps the header 32 bytes, as a record


cdef class AttrTable:
    cdef str dotted
    cdef tuple parts
    cdef tuple indexes
    cdef int id
    cdef Py_ssize_t nkeys       # slots of this attribute in the Table


cdef class Table:
    cdef object slot            # (source, entity, operation or None)
    cdef Py_ssize_t count
    cdef dict scan              # {Entry: None}
    cdef dict everyone          # {key: None} of entries without a filter: all of them match
    cdef list everyone_keys     # list(everyone), rebuilt after a change (None until then)
    cdef list attrs             # [AttrTable]
    cdef dict by_path           # dotted -> AttrTable
    cdef int next_attr
    # open addressing (linear probing, backward-shift deletion), load <= 1/2
    cdef Slot* slots
    cdef size_t mask
    cdef Py_ssize_t used
    cdef Slot* find(self, object key, Py_hash_t h, int attr) except? NULL
    cdef Slot* find_from(self, object key, Py_hash_t h, int attr, size_t i) except? NULL
    cdef int resize(self, size_t capacity) except -1
    cdef Slot* claim(self, object key, Py_hash_t h, int attr) except NULL
    cdef int release(self, Slot* s) except -1


ctypedef struct Probe:
    void* table                 # borrowed (the index holds it)
    void* key                   # borrowed (the record, or Gatherer.hold, keeps it alive)
    Py_hash_t hash
    size_t pos
    Slot* found
    int attr


cdef enum:
    MAX_PROBES = 64             # lookups staged together; more go in rounds


cdef class FieldCache:
    cdef object name
    cdef int n
    cdef object key
    cdef Py_hash_t hash
    cdef list keys
    cdef list hashes
    cdef int load(self, object name, object record) except -1


cdef class Gatherer:
    cdef Probe probes[MAX_PROBES]
    cdef int n
    cdef list hold              # canonical keys that are not the record's own objects
    cdef unsigned long long stamp
    cdef list out               # Entries to check
    cdef list direct            # keys of direct entries hit: matches
    cdef set seen               # buckets taken, once a match needs several rounds
    # match() only (None in match_transitions): a BIG bucket's K_EQ / K_NE records are decided
    # while it is taken, from the record's value of the field (cached here), not via g.out
    cdef FieldCache field
    cdef object record
    cdef void** buf             # collect_big's scratch: what a bucket gives, between two passes
    cdef Py_ssize_t bufcap
    cdef int add(self, Table table, AttrTable attr, object value) except -1
    cdef int run(self, bint more) except -1
    cdef int grow(self, Py_ssize_t n) except -1


cdef class SubscriptionIndex:
    cdef dict _entries          # key -> Entry
    cdef dict _sources          # source -> {entity -> {operation or None -> Table}}
    cdef Py_ssize_t _transitions
    cdef unsigned long long _stamp
    cdef Gatherer _g
    cdef int _gather(self, str source, str entity, str operation, object record, list out, list direct,
                     FieldCache field) except -1
