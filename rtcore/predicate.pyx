# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled predicate engine: turns the validated predicate AST (rtcore.predicate_ast) into a
tree of typed nodes evaluated without Python-level dispatch. Semantics are those of
`rtcore.predicate_ref`; the property tests hold the two to the same answers."""

from cpython.dict cimport PyDict_Check
from cpython.list cimport PyList_Check
from cpython.object cimport Py_EQ, Py_GE, Py_GT, Py_LE, Py_LT, PyObject, PyObject_RichCompareBool
from cpython.set cimport PySet_Contains

from decimal import Decimal

from rtcore.predicate_ast import (
    BOOL,
    FALSE_KEY,
    NAN_KEY,
    NUM,
    STR,
    TRUE_KEY,
    canon,
    is_nan,
    parse,
    shared_name,
    type_class,
)


cdef extern from "Python.h":
    PyObject* PyDict_GetItemWithError(object d, object key) except? NULL
    long long PyLong_AsLongLongAndOverflow(object value, int* overflow) except? -1


cdef object _TRUE_KEY = TRUE_KEY
cdef object _FALSE_KEY = FALSE_KEY
cdef object _NAN_KEY = NAN_KEY
cdef object _Decimal = Decimal
cdef double _INF = float("inf")

DEF C_NONE = 0
DEF C_NUM = 1
DEF C_STR = 2
DEF C_BOOL = 3

DEF K_EQ = 0
DEF K_NE = 1
DEF K_IN = 2
DEF K_NIN = 3
DEF K_RANGE = 4
DEF K_EXISTS = 5
DEF K_NOT = 6


cpdef object scalar_key(object value):
    """canon(value) with fast paths for the exact JSON scalar types (same results)."""
    cdef type t = type(value)
    cdef double d
    cdef int overflow = 0
    if t is str:
        return value
    if t is int:
        PyLong_AsLongLongAndOverflow(value, &overflow)
        return value if overflow == 0 else canon(value)  # beyond int64: a BigKey
    if t is float:
        d = value
        if d != d:
            return _NAN_KEY
        if -9223372036854775808.0 <= d < 9223372036854775808.0 or d == _INF or d == -_INF:
            return value
        return canon(value)  # an integer beyond int64: a BigKey
    if t is bool:
        return _TRUE_KEY if value is True else _FALSE_KEY
    if value is None:
        return None
    return canon(value)


cdef inline int class_of(object value) except -1:
    cdef type t = type(value)
    if t is int or t is float:
        return C_NUM
    if t is str:
        return C_STR
    if t is bool:
        return C_BOOL
    cls = type_class(value)
    if cls is None:
        return C_NONE
    if cls == NUM:
        return C_NUM
    if cls == STR:
        return C_STR
    return C_BOOL


cdef inline bint value_is_nan(object value) except -1:
    cdef double d
    if type(value) is float:
        d = value
        return d != d
    if type(value) is int:
        return False
    return is_nan(value)


cdef class Clause:
    cdef int kind
    cdef object key            # eq/ne: canonical operand key
    cdef bint container        # eq/ne: operand is an object/array; in/nin: some value is
    cdef frozenset keys        # in/nin
    cdef object operand        # range
    cdef int cls               # range: comparison class of the operand
    cdef int op                # range: Py_GT ...
    cdef bint nan_operand      # range: NaN operand, true only of a NaN for $gte/$lte
    cdef bint flag             # exists
    cdef list sub              # not


cdef inline bint is_container(object value):
    return PyList_Check(value) or PyDict_Check(value)


cdef bint test_one(Clause c, object x) except -1:
    """The positive form of the clause on one value (eq for ne, in for nin)."""
    cdef int k = c.kind
    if k == K_EQ or k == K_NE:
        if is_container(x):
            return c.container and PyObject_RichCompareBool(canon(x), c.key, Py_EQ)
        return PyObject_RichCompareBool(scalar_key(x), c.key, Py_EQ)
    if k == K_IN or k == K_NIN:
        if is_container(x):
            return c.container and PySet_Contains(c.keys, canon(x))
        return PySet_Contains(c.keys, scalar_key(x))
    # range
    if class_of(x) != c.cls:
        return False
    if c.cls == C_NUM and (c.nan_operand or value_is_nan(x)):
        # As in MongoDB: NaN is smaller or greater than nothing but equals NaN.
        return c.nan_operand and (c.op == Py_GE or c.op == Py_LE) and value_is_nan(x)
    return PyObject_RichCompareBool(x, c.operand, c.op)


cdef bint any_value(Clause c, object x) except -1:
    if test_one(c, x):
        return True
    if PyList_Check(x):
        for element in <list>x:
            if test_one(c, element):
                return True
    return False


cdef bint clause_ok(Clause c, Py_ssize_t n, object single, list cands) except -1:
    cdef bint found = False
    cdef Clause sub
    if c.kind == K_EXISTS:
        return (n > 0) == c.flag
    if c.kind == K_NOT:
        for sub in c.sub:
            if not clause_ok(sub, n, single, cands):
                return True
        return False
    if cands is None:
        if n == 1:
            found = any_value(c, single)
    else:
        for x in cands:
            if any_value(c, x):
                found = True
                break
    if c.kind == K_NE or c.kind == K_NIN:
        return not found
    return found


cdef int resolve(object value, tuple parts, tuple indexes, Py_ssize_t i, list out) except -1:
    """Appends to `out` every value the path parts[i:] reaches in `value` (as predicate_ref)."""
    cdef Py_ssize_t n = len(parts)
    cdef Py_ssize_t idx
    cdef PyObject* found
    while i < n:
        if PyDict_Check(value):
            found = PyDict_GetItemWithError(value, parts[i])
            if found is NULL:
                return 0
            value = <object>found
            i += 1
        elif PyList_Check(value):
            idx = indexes[i]
            if 0 <= idx < len(<list>value):
                resolve((<list>value)[idx], parts, indexes, i + 1, out)
            for element in <list>value:
                if PyDict_Check(element):
                    resolve(element, parts, indexes, i, out)
            return 0
        else:
            return 0
    out.append(value)
    return 0


cdef extern from *:
    void prefetch_addr "__builtin_prefetch"(const void* addr) nogil


cdef class Node:
    cdef bint match(self, object record) except -1:
        return True

    cdef void prefetch(self) noexcept:
        pass


cdef class AndNode(Node):
    cdef tuple children

    cdef void prefetch(self) noexcept:
        prefetch_addr(<PyObject*>self.children)

    cdef bint match(self, object record) except -1:
        cdef Node child
        for child in self.children:
            if not child.match(record):
                return False
        return True


cdef class OrNode(Node):
    cdef tuple children

    cdef bint match(self, object record) except -1:
        cdef Node child
        for child in self.children:
            if child.match(record):
                return True
        return False


cdef class FieldNode(Node):
    cdef tuple parts
    cdef tuple indexes
    cdef Py_ssize_t nparts
    cdef tuple clauses

    cdef void prefetch(self) noexcept:
        prefetch_addr(<PyObject*>self.parts)
        prefetch_addr(<PyObject*>self.clauses)

    cdef bint match(self, object record) except -1:
        cdef object value = record
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t n = 1
        cdef list cands = None
        cdef PyObject* found
        cdef Clause c
        # Fast path: a chain of objects gives at most one candidate, no list allocated.
        while i < self.nparts:
            if PyDict_Check(value):
                found = PyDict_GetItemWithError(value, self.parts[i])
                if found is NULL:
                    n = 0
                    break
                value = <object>found
                i += 1
            elif PyList_Check(value):
                cands = []
                resolve(value, self.parts, self.indexes, i, cands)
                n = len(cands)
                break
            else:
                n = 0
                break
        for c in self.clauses:
            if not clause_ok(c, n, value, cands):
                return False
        return True


cdef Clause build_clause(tuple spec):
    cdef Clause c = Clause.__new__(Clause)
    kind = spec[0]
    if kind == "eq" or kind == "ne":
        c.kind = K_EQ if kind == "eq" else K_NE
        c.key = spec[1]
        c.container = type(spec[1]) is tuple
    elif kind == "in" or kind == "nin":
        c.kind = K_IN if kind == "in" else K_NIN
        c.keys = spec[1]
        c.container = any(type(k) is tuple for k in spec[1])
    elif kind == "exists":
        c.kind = K_EXISTS
        c.flag = spec[1]
    elif kind == "not":
        c.kind = K_NOT
        c.sub = [build_clause(s) for s in spec[1]]
    else:
        c.kind = K_RANGE
        c.operand = spec[1]
        c.cls = class_of(spec[1])
        c.op = {"gt": Py_GT, "gte": Py_GE, "lt": Py_LT, "lte": Py_LE}[kind]
        c.nan_operand = c.cls == C_NUM and value_is_nan(spec[1])
    return c


cdef Node build_node(tuple ast):
    cdef AndNode and_node
    cdef OrNode or_node
    cdef FieldNode field
    kind = ast[0]
    if kind == "true":
        return Node.__new__(Node)
    if kind == "and":
        and_node = AndNode.__new__(AndNode)
        and_node.children = tuple([build_node(child) for child in ast[1]])
        return and_node
    if kind == "or":
        or_node = OrNode.__new__(OrNode)
        or_node.children = tuple([build_node(child) for child in ast[1]])
        return or_node
    field = FieldNode.__new__(FieldNode)
    # Tuples, not lists: their items sit in the object itself (one cache miss less per hop
    # on a cold matcher); names are shared by the filters on the same field (shared_name).
    field.parts = tuple([shared_name(p) for p in ast[2]])
    field.indexes = ast[3]
    field.nparts = len(ast[2])
    field.clauses = tuple([build_clause(spec) for spec in ast[4]])
    return field


cdef class Matcher:
    """A compiled filter; `matches(record)` evaluates it."""

    def __init__(self, ast):
        # The AST is not kept: an index holds 100k matchers and only needs the nodes.
        self.empty = ast == ("true",)
        self.node = build_node(ast)

    cdef bint _match(self, object record) except -1:
        # A non-object record (a custom event's scalar payload) matches only the empty filter.
        if self.empty:
            return True
        if not PyDict_Check(record):
            return False
        return self.node.match(record)

    cpdef bint matches(self, object record) except -1:
        return self._match(record)


def compile_predicates(predicates):
    """Compiles `predicates` (None, {} or a predicate object); raises FilterError."""
    return Matcher(parse(predicates))
