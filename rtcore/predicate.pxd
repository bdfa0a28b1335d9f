# Contract of the compiled predicate engine: a Matcher evaluates one compiled filter.

cdef class Node:
    cdef bint match(self, object record) except -1
    # Asks the CPU for what match() reads first (an index warming many cold matchers at once).
    cdef void prefetch(self) noexcept


cdef class Matcher:
    cdef Node node
    cdef readonly bint empty
    cdef bint _match(self, object record) except -1
    cpdef bint matches(self, object record) except -1


cpdef object scalar_key(object value)

# Appends every value a dotted path reaches (shared with the index's bucket lookups).
cdef int resolve(object value, tuple parts, tuple indexes, Py_ssize_t i, list out) except -1
