# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled subscription index: who gets an event, in O(attributes filtered on + matches).

Subscriptions sit in Tables per (source, entity or "*", operation or any). Within a Table a
subscription whose filter implies "attribute A equals one of {v...}" (an equality, an `$in`,
an `$and` containing one, an `$or` whose every branch has one) is put in the hash bucket of
each (A, v); the rest are scanned. A match resolves each attribute of the Table once on the
record, takes the buckets of its values, and runs the compiled matcher of each candidate.
Same structure and answers as `rtcore.index_ref.SubscriptionIndex`.

With 100k subscriptions the index is far larger than the CPU caches, so a match is bound by
memory latency, not by instructions. The buckets of a Table therefore live in one flat
open-addressing array (not a dict per attribute) and a match runs in stages over all the
lookups of an event: compute every slot address and prefetch it, then find the slots, then
compare keys and prefetch the entries, then collect. The cache misses of the lookups overlap
instead of following one another. A subscription that one bucket decides (a plain equality)
sits in that bucket as its subscriber key itself, so a hit never touches its Entry (and the
keys of subscriptions without a filter are copied to the result in one C loop); one that
a bucket hit only narrows keeps a matcher of the rest of its filter (predicate_ast.residual).
A bucket of more than SMALL entries is an array of records (Rec, in index.pxd) holding what
decides most of them, the key and an equality / inequality left after the bucket's: a match
reads that array front to back and touches an Entry only when the record cannot decide.
"""

from cpython.dict cimport PyDict_Check
from cpython.list cimport PyList_Check
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject, PyObject_Hash, PyObject_RichCompareBool, Py_EQ
from cpython.ref cimport Py_DECREF, Py_INCREF

from rtcore.predicate cimport Matcher, resolve, scalar_key

from rtcore.predicate import Matcher as _MatcherType
from rtcore.predicate_ast import index_keys, keys_decide, parse, residual, shared_name


cdef extern from "Python.h":
    PyObject* PyDict_GetItemWithError(object d, object key) except? NULL
    PyObject* PyList_GET_ITEM(object lst, Py_ssize_t i)  # borrowed
    Py_ssize_t PyList_GET_SIZE(object lst)

cdef extern from *:
    void prefetch "__builtin_prefetch"(const void* addr) nogil
    void prefetch_write "__builtin_prefetch"(const void* addr, int rw) nogil


DEF SMALL = 8       # up to this many entries a bucket is a flat array (one cache line)
DEF BIG = -1        # Slot.n of a bucket kept as a Big: records, and a dict for O(1) removal
DEF R_EQ = 1        # Entry.rkind
DEF R_NE = 2
DEF K_ENTRY = 0     # Rec kinds: the Entry is a candidate (g.out), as a small bucket's item
DEF K_DIRECT = 1    # a direct entry: its key is a match
DEF K_EQ = 2        # an entry of one index key with an inline R_EQ residual: in match() the
DEF K_NE = 3        # record decides it; K_NE the same for R_NE
DEF BIG_LINES = 32  # cache lines of a BIG bucket's records asked for when its slot is found


cdef class Entry:
    pass


cdef class AttrTable:
    pass


cdef inline size_t home(Py_hash_t h, int attr) nogil:
    # Python's int hash is the value itself: mix it, and the attribute, over all the bits.
    cdef unsigned long long x = (<unsigned long long>h) ^ ((<unsigned long long>attr + 1) * 0x9E3779B97F4A7C15ULL)
    x ^= x >> 33
    x *= 0xff51afd7ed558ccdULL
    x ^= x >> 33
    x *= 0xc4ceb9fe1a85ec53ULL
    x ^= x >> 33
    return <size_t>x


cdef class Table:
    def __dealloc__(self):
        cdef size_t i
        cdef Slot* s
        if self.slots is NULL:
            return
        for i in range(self.mask + 1):
            s = &self.slots[i]
            if s.key is not NULL:
                _free_bucket(s)
                Py_DECREF(<object>s.key)
        PyMem_Free(self.slots)
        self.slots = NULL

    cdef Slot* find(self, object key, Py_hash_t h, int attr) except? NULL:
        return self.find_from(key, h, attr, home(h, attr) & self.mask)

    cdef Slot* find_from(self, object key, Py_hash_t h, int attr, size_t i) except? NULL:
        """The slot of (attr, key) probing from position i on, or NULL."""
        cdef Slot* s
        if self.slots is NULL:
            return NULL
        while True:
            s = &self.slots[i]
            if s.key is NULL:
                return NULL
            if s.hash == h and s.attr == attr and (
                s.key == <void*>key or PyObject_RichCompareBool(<object>s.key, key, Py_EQ)
            ):
                return s
            i = (i + 1) & self.mask

    cdef int resize(self, size_t capacity) except -1:
        cdef Slot* old = self.slots
        cdef size_t old_cap = self.mask + 1 if old is not NULL else 0
        cdef Slot* fresh = <Slot*>PyMem_Calloc(capacity, sizeof(Slot))
        cdef size_t i, j
        if fresh is NULL:
            raise MemoryError()
        for i in range(old_cap):
            if old[i].key is not NULL:
                j = home(old[i].hash, old[i].attr) & (capacity - 1)
                while fresh[j].key is not NULL:
                    j = (j + 1) & (capacity - 1)
                fresh[j] = old[i]
        self.slots = fresh
        self.mask = capacity - 1
        PyMem_Free(old)
        return 0

    cdef Slot* claim(self, object key, Py_hash_t h, int attr) except NULL:
        """The slot of (attr, key), created empty (n == 0) when absent."""
        cdef Slot* s
        cdef size_t i
        if self.slots is NULL:
            self.resize(8)
        else:
            s = self.find(key, h, attr)
            if s is not NULL:
                return s
            if (self.used + 1) * 2 > <Py_ssize_t>(self.mask + 1):
                self.resize((self.mask + 1) * 2)
        i = home(h, attr) & self.mask
        while self.slots[i].key is not NULL:
            i = (i + 1) & self.mask
        s = &self.slots[i]
        Py_INCREF(key)
        s.key = <void*>key
        s.hash = h
        s.attr = attr
        s.ptr = NULL
        s.n = 0
        self.used += 1
        return s

    cdef int release(self, Slot* s) except -1:
        """Empties slot `s` (its bucket already freed), shifting back the run after it."""
        cdef size_t i = s - self.slots
        cdef size_t j = i
        cdef size_t k
        cdef object key = <object>s.key
        while True:
            j = (j + 1) & self.mask
            if self.slots[j].key is NULL:
                break
            k = home(self.slots[j].hash, self.slots[j].attr) & self.mask
            # slot j stays when its home lies cyclically in (i, j]
            if (i < j and i < k <= j) or (i > j and (k > i or k <= j)):
                continue
            self.slots[i] = self.slots[j]
            i = j
        self.slots[i].key = NULL
        self.slots[i].ptr = NULL
        self.slots[i].n = 0
        self.used -= 1
        Py_DECREF(key)
        if self.used * 8 < <Py_ssize_t>(self.mask + 1) and self.mask + 1 > 8:
            self.resize((self.mask + 1) // 2)
        return 0


cdef inline void _free_bucket(Slot* s):
    if s.n == BIG:
        big_free(<Big*>s.ptr)
    elif s.n > 1:
        PyMem_Free(s.ptr)
    s.ptr = NULL
    s.n = 0


cdef inline void* item_of(Entry entry):
    if entry.direct:
        return <void*>((<size_t><PyObject*>entry.key) | 1)
    return <void*>entry


cdef inline object untag(void* item):
    return <object><PyObject*>((<size_t>item) & ~(<size_t>1))


# ---- BIG buckets: an array of records (see Rec and Big in index.pxd) -------------------------
#
# A match takes every entry of a BIG bucket. Kept as a dict {Entry: ...} that meant the dict's
# entry table, then each Entry object (its stamp and residual), every one a cache miss when the
# fan-out's writes have evicted the index between events (and the Entries, each on a page of
# its own among its connection's objects, a TLB miss too). The records hold what decides most
# entries (a direct key, or the field, operand hash and kind of an inline residual) side by
# side: the match reads contiguous memory, and an Entry only when it must (a matcher to run, an
# entry with several index keys to deduplicate, or operand hashes that agree).

cdef inline Rec* big_recs(Big* b) noexcept nogil:
    return <Rec*>(<char*>b + sizeof(Big))


cdef Big* big_new(Py_ssize_t cap) except NULL:
    cdef Big* b = <Big*>PyMem_Malloc(sizeof(Big) + cap * sizeof(Rec))
    if b is NULL:
        raise MemoryError()
    where = {}
    Py_INCREF(where)
    b.where = <void*>where
    b.n = 0
    b.cap = cap
    b.unused = 0
    return b


cdef inline void big_free(Big* b) noexcept:
    Py_DECREF(<object>b.where)
    PyMem_Free(b)


cdef inline size_t rec_kind(Entry entry) noexcept:
    # Only match() decides K_EQ / K_NE records without the Entry, so only entries that a match
    # reaches once: in one bucket (one index key), like direct entries.
    if entry.rkind and len(entry.keys) == 1:
        return K_EQ if entry.rkind == R_EQ else K_NE
    return K_ENTRY


cdef inline void* rec_to_item(Rec* r) noexcept:
    """The record as a bucket item: its Entry, or a direct entry's key with the low bit set."""
    if r.entry & 3 == K_DIRECT:
        return <void*>((<size_t>r.key) | 1)
    return <void*>(r.entry & ~(<size_t>3))


cdef inline object rec_item(Rec* r):
    """The record's key in Big.where: its item untagged, as a dict bucket's keys were."""
    return untag(rec_to_item(r))


cdef int big_append(Slot* s, void* item) except -1:
    """Adds `item` (an Entry, or a direct entry's key with the low bit set) to BIG bucket `s`."""
    cdef Big* b = <Big*>s.ptr
    cdef Big* grown
    cdef Rec* r
    cdef Entry entry
    cdef size_t kind
    if b.n == b.cap:
        grown = <Big*>PyMem_Realloc(b, sizeof(Big) + 2 * b.cap * sizeof(Rec))
        if grown is NULL:
            raise MemoryError()
        grown.cap *= 2
        b = grown
        s.ptr = <void*>b
    r = &big_recs(b)[b.n]
    r.rfield = NULL
    r.rhash = 0
    if (<size_t>item) & 1:
        r.key = <void*>((<size_t>item) & ~(<size_t>1))
        r.entry = K_DIRECT
    else:
        entry = <Entry>item
        kind = rec_kind(entry)
        r.key = <void*>entry.key
        r.entry = (<size_t>item) | kind
        if kind != K_ENTRY:
            r.rfield = <void*>entry.rfield
            r.rhash = entry.rhash
    (<dict>b.where)[rec_item(r)] = b.n  # before counting it: a failure leaves it out
    b.n += 1
    return 0


cdef int bucket_add(Slot* s, Entry entry) except -1:
    cdef void** items
    cdef Slot fresh
    cdef int i
    cdef void* item = item_of(entry)
    if s.n == 0:
        s.ptr = item
        s.n = 1
    elif s.n == 1:
        items = <void**>PyMem_Malloc(SMALL * sizeof(void*))
        if items is NULL:
            raise MemoryError()
        items[0] = s.ptr
        items[1] = item
        s.ptr = <void*>items
        s.n = 2
    elif s.n == BIG:
        big_append(s, item)
    elif s.n < SMALL:
        (<void**>s.ptr)[s.n] = item
        s.n += 1
    else:
        # full: built aside, so that a failure leaves the small array as it was
        items = <void**>s.ptr
        fresh.ptr = <void*>big_new(2 * SMALL)
        try:
            for i in range(s.n):
                big_append(&fresh, items[i])
            big_append(&fresh, item)
        except BaseException:
            big_free(<Big*>fresh.ptr)
            raise
        s.ptr = fresh.ptr
        s.n = BIG
        PyMem_Free(items)
    return 0


cdef int bucket_remove(Slot* s, Entry entry) except -1:
    """Removes `entry`; returns the entries left."""
    cdef void** items
    cdef Big* b
    cdef Big* shrunk
    cdef Rec* recs
    cdef int i
    cdef Py_ssize_t pos
    cdef void* item = item_of(entry)
    if s.n == 1:
        if s.ptr == item:
            s.ptr = NULL
            s.n = 0
        return s.n
    if s.n == BIG:
        b = <Big*>s.ptr
        recs = big_recs(b)
        found = (<dict>b.where).pop(untag(item), None)
        if found is None:
            return b.n
        # the last record fills the hole
        pos = found
        b.n -= 1
        if pos != b.n:
            recs[pos] = recs[b.n]
            (<dict>b.where)[rec_item(&recs[pos])] = pos
        if b.n > SMALL // 2:
            if b.n * 4 < b.cap and b.cap > 2 * SMALL:
                # a bucket that was crowded once does not keep its memory
                shrunk = <Big*>PyMem_Realloc(b, sizeof(Big) + (b.cap // 2) * sizeof(Rec))
                if shrunk is not NULL:
                    shrunk.cap //= 2
                    s.ptr = <void*>shrunk
            return b.n
        # small again: back to a flat array
        items = <void**>PyMem_Malloc(SMALL * sizeof(void*))
        if items is NULL:
            return b.n
        for i in range(b.n):
            items[i] = rec_to_item(&recs[i])
        s.ptr = <void*>items
        s.n = b.n
        big_free(b)
    else:
        items = <void**>s.ptr
        for i in range(s.n):
            if items[i] == item:
                s.n -= 1
                items[i] = items[s.n]
                break
    if s.n == 1:
        items = <void**>s.ptr
        s.ptr = items[0]
        PyMem_Free(items)
    elif s.n == 0:
        PyMem_Free(s.ptr)
        s.ptr = NULL
    return s.n


cdef inline bint _runs_matcher(Entry entry) noexcept:
    """match() runs the entry's matcher: neither a bucket hit nor the inline residual decides."""
    return not entry.decided and not entry.rkind


cdef inline int candidate(Gatherer g, Entry entry) except -1:
    """Appends `entry` to g.out unless this match has it already."""
    if entry.stamp != g.stamp:
        entry.stamp = g.stamp
        g.out.append(entry)
    return 0


cdef inline int take(void* item, Gatherer g) except -1:
    if (<size_t>item) & 1:
        g.direct.append(untag(item))
    else:
        candidate(g, <Entry>item)
    return 0


cdef int collect_big(Big* b, Gatherer g) except -1:
    """Takes the records of BIG bucket `b`, in two passes. The first reads only the records
    (contiguous) and decides what they decide: a direct key is a match, and in match() (g.field
    set) so is a K_EQ / K_NE entry whose residual holds on the record. It asks for what the
    second pass touches, which appends them: each key given (appending writes its count) and
    each Entry to check (candidate reads its stamp), so that their cache misses overlap."""
    cdef Rec* r = big_recs(b)
    cdef Py_ssize_t i, m = 0, n = b.n
    cdef size_t kind, p
    cdef PyObject* entry
    cdef bint found
    if n > g.bufcap:
        g.grow(n)
    for i in range(n):
        kind = r[i].entry & 3
        entry = <PyObject*>(r[i].entry & ~(<size_t>3))
        if kind == K_ENTRY or (kind != K_DIRECT and g.field is None):
            prefetch(entry)
            g.buf[m] = <void*>((<size_t>entry) | 1)
            m += 1
            continue
        if kind != K_DIRECT:
            found = _field_holds(g.field, g.record, <PyObject*>r[i].rfield, r[i].rhash, entry)
            if found == (kind == K_NE):
                continue  # R_EQ and not found, or R_NE and found: no match
        prefetch_write(r[i].key, 1)
        g.buf[m] = r[i].key
        m += 1
    # Borrowed pointers, valid here: nothing between the passes runs code that could change
    # the index (the comparisons are of canonical scalars).
    for i in range(m):
        p = <size_t>g.buf[i]
        if p & 1:
            candidate(g, <Entry><PyObject*>(p & ~(<size_t>1)))
        else:
            g.direct.append(<object><PyObject*>p)
    return 0


cdef inline int collect(Slot* s, Gatherer g) except -1:
    """Takes the items of bucket `s`: direct keys are matches, Entries (not yet seen in this
    match) candidates."""
    cdef void** items
    cdef int i
    if s.n == 1:
        take(s.ptr, g)
    elif s.n == BIG:
        collect_big(<Big*>s.ptr, g)
    else:
        items = <void**>s.ptr
        for i in range(s.n):
            take(items[i], g)
    return 0


cdef class Gatherer:
    """The lookups of one match, staged so that their cache misses overlap."""

    def __dealloc__(self):
        PyMem_Free(self.buf)
        self.buf = NULL

    cdef int grow(self, Py_ssize_t n) except -1:
        cdef void** grown = <void**>PyMem_Realloc(self.buf, n * sizeof(void*))
        if grown is NULL:
            raise MemoryError()
        self.buf = grown
        self.bufcap = n
        return 0

    cdef int add(self, Table table, AttrTable attr, object value) except -1:
        cdef object key
        cdef Probe* p
        if PyDict_Check(value) or PyList_Check(value):
            return 0  # index keys are scalars
        if self.n == MAX_PROBES:
            self.run(True)
        key = scalar_key(value)
        if key is not value:
            if self.hold is None:
                self.hold = []
            self.hold.append(key)
        p = &self.probes[self.n]
        p.table = <void*>table
        p.key = <void*>key
        p.hash = PyObject_Hash(key)
        p.attr = attr.id
        p.pos = home(p.hash, p.attr) & table.mask
        prefetch(&table.slots[p.pos])
        self.n += 1
        return 0

    cdef int run(self, bint more) except -1:
        """Resolves the staged lookups and takes their buckets. `more`: other rounds follow
        in this match (a direct key sits in one bucket, so taking a bucket twice would
        repeat it: buckets are deduplicated within a round, and across rounds by `seen`)."""
        cdef int j, i
        cdef Probe* p
        cdef Table table
        cdef Slot* s
        cdef void** items
        cdef Big* b
        cdef Py_ssize_t lines
        cdef bint dup
        # 1. find the slot whose hash and attribute agree; prefetch its key and bucket
        for j in range(self.n):
            p = &self.probes[j]
            table = <Table>p.table
            p.found = NULL
            while True:
                s = &table.slots[p.pos]
                if s.key is NULL:
                    break
                if s.hash == p.hash and s.attr == p.attr:
                    p.found = s
                    prefetch(s.key)
                    prefetch(s.ptr)
                    break
                p.pos = (p.pos + 1) & table.mask
        # 2. confirm the key (rarely not: then probe on); prefetch a small bucket's items
        for j in range(self.n):
            p = &self.probes[j]
            s = p.found
            if s is NULL:
                continue
            if not (s.key == <void*>p.key or PyObject_RichCompareBool(<object>s.key, <object>p.key, Py_EQ)):
                table = <Table>p.table
                p.pos = (p.pos + 1) & table.mask
                p.found = table.find_from(<object>p.key, p.hash, p.attr, p.pos)
                s = p.found
                if s is NULL:
                    continue
            if 1 < s.n <= SMALL:
                items = <void**>s.ptr
                for i in range(s.n):
                    prefetch(items[i])
            elif s.n == BIG:
                # its records are read front to back: ask for the lines after the header's
                # (asked for in 1.); the hardware streams the rest of a longer bucket
                b = <Big*>s.ptr
                lines = min(<Py_ssize_t>((sizeof(Big) + b.n * sizeof(Rec) + 63) // 64), BIG_LINES)
                for i in range(1, lines):
                    prefetch(<char*>b + 64 * i)
        if more and self.seen is None:
            self.seen = set()
        # 3. take each bucket once
        for j in range(self.n):
            s = self.probes[j].found
            if s is NULL:
                continue
            dup = False
            for i in range(j):
                if self.probes[i].found == s:
                    dup = True
                    break
            if dup:
                continue
            if self.seen is not None:
                if <size_t>s in self.seen:
                    continue
                self.seen.add(<size_t>s)
            collect(s, self)
        self.n = 0
        return 0


cdef int gather_table(Table table, object record, Gatherer g) except -1:
    """Stages the lookups of every indexed attribute of `table` on `record` into `g`, and
    appends the scanned entries of the table to g.out."""
    cdef Entry entry
    cdef AttrTable attr
    cdef object value
    cdef PyObject* found
    cdef Py_ssize_t i, nparts
    cdef list cands
    if table.everyone:
        # A list copies into the result with one memcpy-like loop; iterating the dict costs
        # ~4x as much per key, and events far outnumber subscription changes.
        if table.everyone_keys is None:
            table.everyone_keys = list(table.everyone)
        g.direct.extend(table.everyone_keys)
    for entry in table.scan:
        candidate(g, entry)
    if not PyDict_Check(record) or table.slots is NULL:
        return 0
    for attr in table.attrs:
        value = record
        nparts = len(attr.parts)
        i = 0
        while i < nparts:
            if PyDict_Check(value):
                found = PyDict_GetItemWithError(value, attr.parts[i])
                if found is NULL:
                    break
                value = <object>found
                i += 1
            else:
                break
        if i == nparts:
            stage_value(g, table, attr, value)
        elif PyList_Check(value):
            cands = []
            resolve(value, attr.parts, attr.indexes, i, cands)
            if g.hold is None:
                g.hold = []
            g.hold.append(cands)
            for value in cands:
                stage_value(g, table, attr, value)
    return 0


cdef inline int stage_value(Gatherer g, Table table, AttrTable attr, object value) except -1:
    # A value and, when it is an array, its elements (equality matches any element).
    g.add(table, attr, value)
    if PyList_Check(value):
        for element in <list>value:
            g.add(table, attr, element)
    return 0


cdef class SubscriptionIndex:
    """Every subscription of a process; see the module docstring."""

    def __cinit__(self):
        self._entries = {}
        self._sources = {}
        self._transitions = 0
        self._stamp = 0
        self._g = Gatherer.__new__(Gatherer)

    def __len__(self):
        return len(self._entries)

    def __contains__(self, key):
        return key in self._entries

    @property
    def has_transitions(self):
        return self._transitions > 0

    def add(self, key, str source, str entity, operations, predicates, transitions=False):
        """Adds or replaces the subscription `key`; raises FilterError, changing nothing."""
        cdef Entry entry
        ast = parse(predicates)
        matcher = _MatcherType(ast)
        entry = Entry.__new__(Entry)
        entry.key = key
        entry.matcher = matcher
        entry.transitions = bool(transitions)
        keys = None if matcher.empty else index_keys(ast)
        if keys is not None:
            # one bucket per (attribute, key) even when the filter names a key twice
            keys = list({(k[0], k[3]): k for k in keys}.values())
        entry.keys = None if keys is None else tuple([(k[0], k[3]) for k in keys])
        entry.decided = keys is not None and keys_decide(ast)
        if entry.decided and not entry.transitions:
            entry.matcher = None  # never run: a bucket hit decides; saves ~40% of the memory
        elif keys is not None and not entry.transitions:
            # Reached only through a bucket hit, which proves the clause the keys came from:
            # check the rest (fewer nodes to walk, and to miss in cache).
            rest = residual(ast)
            if rest is not None:
                entry.matcher = _MatcherType(rest)
                _inline_residual(entry, rest)
        entry.direct = entry.decided and not entry.transitions and len(keys) == 1
        entry.everyone = matcher.empty and not entry.transitions
        entry.tables = []
        ops = (None,) if operations is None else frozenset(operations)
        self.remove(key)
        entities = self._sources.get(source)
        if entities is None:
            entities = self._sources[source] = {}
        slots = entities.get(entity)
        if slots is None:
            slots = entities[entity] = {}
        for op in ops:
            table = slots.get(op)
            if table is None:
                table = slots[op] = _new_table((source, entity, op))
            _insert(<Table>table, entry, keys)
            entry.tables.append(table)
        self._entries[key] = entry
        if entry.transitions:
            self._transitions += 1

    def remove(self, key):
        """Removes the subscription `key` (no-op when absent), in O(its index keys)."""
        cdef Entry entry
        cdef Table table
        found = self._entries.pop(key, None)
        if found is None:
            return
        entry = <Entry>found
        for table in entry.tables:
            _delete(table, entry)
            if table.count == 0:
                source, entity, op = table.slot
                slots = self._sources[source][entity]
                del slots[op]
                if not slots:
                    del self._sources[source][entity]
                    if not self._sources[source]:
                        del self._sources[source]
        entry.tables = []
        if entry.transitions:
            self._transitions -= 1

    cdef int _gather(self, str source, str entity, str operation, object record, list out, list direct,
                     FieldCache field) except -1:
        cdef PyObject* found
        cdef PyObject* slot
        cdef Gatherer g = self._g
        found = PyDict_GetItemWithError(self._sources, source)
        if found is NULL:
            return 0
        g.n = 0
        g.hold = None
        g.seen = None
        g.stamp = self._stamp
        g.out = out
        g.direct = direct
        g.field = field
        g.record = record
        try:
            entities = <dict>found
            for ent in (entity, "*"):
                found = PyDict_GetItemWithError(entities, ent)
                if found is not NULL:
                    slot = PyDict_GetItemWithError(<dict>found, operation)
                    if slot is not NULL:
                        gather_table(<Table>slot, record, g)
                    slot = PyDict_GetItemWithError(<dict>found, None)
                    if slot is not NULL:
                        gather_table(<Table>slot, record, g)
                if entity == "*":
                    break
            g.run(False)
        finally:
            g.n = 0
            g.hold = None
            g.seen = None
            g.out = None
            g.direct = None
            g.field = None
            g.record = None
        return 0

    def match(self, str source, str entity, str operation, record):
        """Keys of the subscriptions that the event matches (no duplicates, any order)."""
        cdef list cands = []
        cdef list out = []
        cdef PyObject* p
        cdef Py_ssize_t i, n
        cdef bint matchers = False
        # The record's value of the field inline residuals read: BIG buckets' records decide
        # theirs as they are taken, the other such entries below.
        cdef FieldCache field = FieldCache.__new__(FieldCache)
        self._stamp += 1
        # A bucket is only hit through a dict's field; were it not, the Entry path below
        # (_inline_match) answers a record of another type as the matcher does.
        self._gather(source, entity, operation, record, cands, out, field if PyDict_Check(record) else None)
        # Borrowed pointers (cands holds every Entry): a reference per candidate and pass would
        # write each Entry's count, in the loops that exist to touch as little as possible.
        n = PyList_GET_SIZE(cands)
        for i in range(n):
            p = PyList_GET_ITEM(cands, i)
            prefetch(<PyObject*>(<Entry>p).key)
            if _runs_matcher(<Entry>p):
                matchers = True
                prefetch(<PyObject*>(<Entry>p).matcher)  # a decided entry may have no matcher
        if matchers:
            for i in range(n):
                p = PyList_GET_ITEM(cands, i)
                if _runs_matcher(<Entry>p):
                    prefetch(<PyObject*>(<Entry>p).matcher.node)
            for i in range(n):
                p = PyList_GET_ITEM(cands, i)
                if _runs_matcher(<Entry>p):
                    (<Entry>p).matcher.node.prefetch()
        for i in range(n):
            p = PyList_GET_ITEM(cands, i)
            if (<Entry>p).decided:
                out.append((<Entry>p).key)
            elif (<Entry>p).rkind:
                if _inline_match(<Entry>p, record, field):
                    out.append((<Entry>p).key)
            elif (<Entry>p).matcher._match(record):
                out.append((<Entry>p).key)
        return out

    def match_transitions(self, str source, str entity, str operation, record, old_record):
        """(deliver, enter, leave): transitions=True subscriptions get enter/leave on an
        UPDATE with a known old record; every other match is delivered."""
        cdef list cands = []
        cdef list deliver = []
        cdef list enter = []
        cdef list leave = []
        cdef Entry entry
        cdef Py_ssize_t n_new
        cdef bint tracked = operation == "UPDATE" and old_record is not None
        cdef bint new, old
        self._stamp += 1
        self._gather(source, entity, operation, record, cands, deliver, None)
        n_new = len(cands)
        if tracked and self._transitions:
            # direct entries (never transitions=True) found through the old record only:
            # not delivered
            self._gather(source, entity, operation, old_record, cands, [], None)
        for i in range(len(cands)):
            entry = <Entry>cands[i]
            if i >= n_new and not entry.transitions:
                continue  # found through the old record only: not a candidate for delivery
            # "decided" holds only for entries found through the new record's buckets
            new = (entry.decided and i < n_new) or entry.matcher._match(record)
            if not (tracked and entry.transitions):
                if new:
                    deliver.append(entry.key)
                continue
            old = entry.matcher._match(old_record)
            if new and old:
                deliver.append(entry.key)
            elif new:
                enter.append(entry.key)
            elif old:
                leave.append(entry.key)
        return deliver, enter, leave


cdef Table _new_table(tuple slot):
    cdef Table table = Table.__new__(Table)
    table.slot = slot
    table.count = 0
    table.scan = {}
    table.everyone = {}
    table.everyone_keys = None
    table.attrs = []
    table.by_path = {}
    table.next_attr = 0
    table.slots = NULL
    table.mask = 0
    table.used = 0
    return table


cdef _insert(Table table, Entry entry, list keys):
    cdef AttrTable attr
    cdef Slot* s
    table.count += 1
    if entry.everyone:
        table.everyone[entry.key] = None
        table.everyone_keys = None
        return
    if entry.keys is None:
        table.scan[entry] = None
        return
    for dotted, parts, indexes, key in keys:
        found = table.by_path.get(dotted)
        if found is None:
            attr = AttrTable.__new__(AttrTable)
            attr.dotted = dotted
            attr.parts = parts
            attr.indexes = indexes
            attr.id = table.next_attr
            attr.nkeys = 0
            table.next_attr += 1
            table.by_path[dotted] = attr
            table.attrs.append(attr)
        else:
            attr = <AttrTable>found
        s = table.claim(key, PyObject_Hash(key), attr.id)
        if s.n == 0:
            attr.nkeys += 1
        bucket_add(s, entry)


cdef _delete(Table table, Entry entry):
    cdef AttrTable attr
    cdef Slot* s
    table.count -= 1
    if entry.everyone:
        del table.everyone[entry.key]
        table.everyone_keys = None
        return
    if entry.keys is None:
        del table.scan[entry]
        return
    for dotted, key in entry.keys:
        attr = <AttrTable>table.by_path[dotted]
        s = table.find(key, PyObject_Hash(key), attr.id)
        if s is NULL:
            continue
        if bucket_remove(s, entry) == 0:
            table.release(s)
            attr.nkeys -= 1
            if attr.nkeys == 0:
                del table.by_path[dotted]
                table.attrs.remove(attr)


cdef int _inline_residual(Entry entry, tuple rest) except -1:
    """Sets entry.rfield/rkind/rhash/rkey when `rest` (a residual AST) is one `eq` or `ne`
    clause on a top-level field with a scalar operand; the matcher stays for the rest."""
    if rest[0] != "field":
        return 0
    _, dotted, parts, indexes, clauses = rest
    if len(parts) != 1 or len(clauses) != 1:
        return 0
    clause = clauses[0]
    if clause[0] != "eq" and clause[0] != "ne":
        return 0
    key = clause[1]
    if type(key) is tuple:
        return 0  # an object or array operand: the matcher's canonical comparison
    entry.rfield = shared_name(parts[0])
    entry.rkey = key
    entry.rhash = PyObject_Hash(key)
    entry.rkind = R_EQ if clause[0] == "eq" else R_NE
    return 0


cdef class FieldCache:
    """The record's value of the field the previous inline residual read: the candidates of
    one event mostly test the same field, so it is resolved (and hashed) once.
    name: the field name (shared_name), or None: nothing resolved yet. n: 0 no scalar there; 1 one
    scalar (key, hash); -1 an array's scalars (keys, and hashes: each computed once per event,
    not per candidate)."""

    cdef int load(self, object name, object record) except -1:
        cdef PyObject* found
        self.name = name
        self.n = 0
        self.key = None
        self.keys = None
        self.hashes = None
        found = PyDict_GetItemWithError(record, name)
        if found is NULL:
            return 0
        value = <object>found
        if PyList_Check(value):
            # an array matches when one of its scalar elements does (as the matcher's any_value)
            self.keys = [scalar_key(e) for e in <list>value if not (PyList_Check(e) or PyDict_Check(e))]
            if self.keys:
                self.hashes = [PyObject_Hash(k) for k in self.keys]
                self.n = -1
        elif not PyDict_Check(value):
            self.key = scalar_key(value)
            self.hash = PyObject_Hash(self.key)
            self.n = 1
        return 0


cdef inline bint _field_holds(FieldCache field, object record, PyObject* rfield, Py_hash_t rhash,
                              PyObject* entry) except -1:
    """Whether `record`'s field `rfield` holds the operand of `entry`'s inline residual (or,
    for an array, one of its scalar elements does), whose hash is `rhash`. The hash decides
    most answers: the Entry (its rkey) is read only when the hashes agree."""
    cdef Py_ssize_t i
    if <PyObject*>field.name != rfield:
        field.load(<object>rfield, record)
    if field.n == 1:
        return field.hash == rhash and PyObject_RichCompareBool(field.key, (<Entry>entry).rkey, Py_EQ)
    if field.n == -1:
        for i in range(len(field.keys)):
            if <Py_hash_t>field.hashes[i] == rhash and PyObject_RichCompareBool(
                field.keys[i], (<Entry>entry).rkey, Py_EQ
            ):
                return True
    return False


cdef inline bint _inline_match(Entry entry, object record, FieldCache field) except -1:
    """The residual of `entry` (see _inline_residual) on `record`, as its Matcher answers:
    for R_EQ the field holds the operand; R_NE the opposite."""
    cdef bint found
    if not PyDict_Check(record):
        return False
    found = _field_holds(field, record, <PyObject*>entry.rfield, entry.rhash, <PyObject*>entry)
    return found if entry.rkind == R_EQ else not found
