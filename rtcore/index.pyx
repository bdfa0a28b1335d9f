# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled subscription index: who gets an event, in O(attributes filtered on + matches).

Subscriptions sit in Tables per (source, entity or "*", operation or any). Within a Table a
subscription whose filter implies "attribute A equals one of {v...}" (an equality, an `$in`,
an `$and` containing one, an `$or` whose every branch has one) is put in the hash bucket of
each (A, v); the rest are scanned. A match resolves each attribute of the Table once on the
record, takes the buckets of its values, and runs the compiled matcher of each candidate.
Same structure and answers as `rtcore.index_ref.SubscriptionIndex`.
"""

from cpython.dict cimport PyDict_Check
from cpython.list cimport PyList_Check
from cpython.object cimport PyObject

from rtcore.predicate cimport Matcher, resolve, scalar_key

from rtcore.predicate import Matcher as _MatcherType
from rtcore.predicate_ast import index_keys, keys_decide, parse


cdef extern from "Python.h":
    PyObject* PyDict_GetItemWithError(object d, object key) except? NULL

cdef extern from *:
    # Starting the loads of many candidates before touching any lets their cache misses
    # overlap; with 100k subscriptions the index is far larger than the CPU caches.
    void prefetch "__builtin_prefetch"(const void* addr) nogil


cdef class Entry:
    pass


cdef class AttrTable:
    pass


cdef class Table:
    pass




cdef inline int take_bucket(dict buckets, object value, list hits) except -1:
    cdef PyObject* found
    if PyDict_Check(value) or PyList_Check(value):
        return 0  # index keys are scalars
    found = PyDict_GetItemWithError(buckets, scalar_key(value))
    if found is not NULL:
        prefetch(found)
        hits.append(<object>found)
    return 0


cdef int take_hits(list hits, unsigned long long stamp, list out) except -1:
    """Appends the not-yet-seen entries of the buckets hit (an Entry, or a dict of them)."""
    cdef Entry entry
    for bucket in hits:
        if type(bucket) is Entry:  # most buckets hold one entry: no dict to visit
            entry = <Entry>bucket
            if entry.stamp != stamp:
                entry.stamp = stamp
                out.append(entry)
        else:
            for entry in <dict>bucket:
                if entry.stamp != stamp:
                    entry.stamp = stamp
                    out.append(entry)
    return 0


cdef inline int take_value(dict buckets, object value, list hits) except -1:
    # A value and, when it is an array, its elements (equality matches any element).
    take_bucket(buckets, value, hits)
    if PyList_Check(value):
        for element in <list>value:
            take_bucket(buckets, element, hits)
    return 0


cdef int gather_table(Table table, object record, unsigned long long stamp, list out) except -1:
    """Appends every not-yet-seen Entry of `table` that could match `record`."""
    cdef Entry entry
    cdef AttrTable attr
    cdef object value
    cdef PyObject* found
    cdef Py_ssize_t i, nparts
    cdef list cands
    cdef list hits = []
    for entry in table.scan:
        if entry.stamp != stamp:
            entry.stamp = stamp
            out.append(entry)
    if not PyDict_Check(record):
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
            take_value(attr.buckets, value, hits)
        elif PyList_Check(value):
            cands = []
            resolve(value, attr.parts, attr.indexes, i, cands)
            for value in cands:
                take_value(attr.buckets, value, hits)
    take_hits(hits, stamp, out)
    return 0


cdef class SubscriptionIndex:
    """Every subscription of a process; see the module docstring."""

    def __cinit__(self):
        self._entries = {}
        self._sources = {}
        self._transitions = 0
        self._stamp = 0

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
        entry.keys = None if keys is None else tuple([(k[0], k[3]) for k in keys])
        entry.decided = keys is not None and keys_decide(ast)
        if entry.decided and not entry.transitions:
            entry.matcher = None  # never run: a bucket hit decides; saves ~40% of the memory
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

    cdef int _gather(self, str source, str entity, str operation, object record, list out) except -1:
        cdef PyObject* found
        cdef PyObject* slot
        found = PyDict_GetItemWithError(self._sources, source)
        if found is NULL:
            return 0
        entities = <dict>found
        for ent in (entity, "*"):
            found = PyDict_GetItemWithError(entities, ent)
            if found is not NULL:
                slot = PyDict_GetItemWithError(<dict>found, operation)
                if slot is not NULL:
                    gather_table(<Table>slot, record, self._stamp, out)
                slot = PyDict_GetItemWithError(<dict>found, None)
                if slot is not NULL:
                    gather_table(<Table>slot, record, self._stamp, out)
            if entity == "*":
                break
        return 0

    def match(self, str source, str entity, str operation, record):
        """Keys of the subscriptions that the event matches (no duplicates, any order)."""
        cdef list cands = []
        cdef list out = []
        cdef Entry entry
        self._stamp += 1
        self._gather(source, entity, operation, record, cands)
        for entry in cands:
            prefetch(<PyObject*>entry.key)
            if not entry.decided:
                prefetch(<PyObject*>entry.matcher)  # a decided entry may have no matcher
        for entry in cands:
            if entry.decided or entry.matcher._match(record):
                out.append(entry.key)
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
        self._gather(source, entity, operation, record, cands)
        n_new = len(cands)
        if tracked and self._transitions:
            self._gather(source, entity, operation, old_record, cands)
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
    table.attrs = []
    table.by_path = {}
    return table


cdef _insert(Table table, Entry entry, list keys):
    cdef AttrTable attr
    table.count += 1
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
            attr.buckets = {}
            table.by_path[dotted] = attr
            table.attrs.append(attr)
        else:
            attr = <AttrTable>found
        bucket = attr.buckets.get(key)
        if bucket is None:
            attr.buckets[key] = entry
        elif type(bucket) is Entry:
            attr.buckets[key] = {bucket: None, entry: None}
        else:
            (<dict>bucket)[entry] = None


cdef _delete(Table table, Entry entry):
    cdef AttrTable attr
    table.count -= 1
    if entry.keys is None:
        del table.scan[entry]
        return
    for dotted, key in entry.keys:
        attr = <AttrTable>table.by_path[dotted]
        bucket = attr.buckets[key]
        if type(bucket) is Entry:
            del attr.buckets[key]
        else:
            (<dict>bucket).pop(entry, None)
            if len(<dict>bucket) == 1:
                attr.buckets[key] = next(iter(<dict>bucket))
        if key not in attr.buckets:
            if not attr.buckets:
                del table.by_path[dotted]
                table.attrs.remove(attr)
