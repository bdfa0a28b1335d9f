"""The fan-out hot loops, compiled (reference: rtcore/fanout_ref.py, same API and effects).

Queue one event's frame on the outbox of every matching subscription, then write each dirty
outbox's pending frames in one transport write. `Outbox` and `SubKey` are extension types, so
the loops read their fields as C struct members, and an outbox keeps its frames in a C array
(see Outbox). `python -m benchmarks.fanout.microbench` (1000 loopback connections, ns per
delivery): queueing 27-30 here, 93-119 for the same loops in Python; queueing + write ~5,500
vs ~6,200. The write (the system call) is most of it, and only coalescing removes it.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.object cimport PyObject, PyTypeObject
from libc.string cimport memcpy


cdef extern from "Python.h":
    object PyObject_CallOneArg(object callable, object arg)
    void incref "Py_INCREF"(PyObject* o)
    void decref "Py_DECREF"(PyObject* o)
    PyObject* PyList_GET_ITEM(object lst, Py_ssize_t i)  # borrowed
    bint PyObject_TypeCheck(PyObject* o, PyTypeObject* t)
    Py_ssize_t PY_SSIZE_T_MAX


DEF FIRST_CAPACITY = 4   # frames an outbox holds before its array first grows
DEF KEEP_CAPACITY = 64   # an array grown past this is freed when written (a burst's, not the norm)


cdef class Outbox:
    """What a connection exposes to fan-out: pending frames, closed, its transport's write.

    The frames are a C array of references kept in the object, with the last frame queued
    beside the count: queueing reads this object's own memory and writes one slot of the
    array, where a Python list would cost two more dependent reads (the list, then its items),
    each a cache miss at thousands of connections. `pending` shows them as fanout_ref does:
    None, one frame (bytes), or a list."""

    cdef PyObject** frames   # owned references, n of them
    cdef Py_ssize_t n
    cdef Py_ssize_t cap
    cdef PyObject* last      # frames[n - 1], or NULL: the repeat check reads only this object
    cdef public bint closed
    cdef public object write     # the transport's write; None until connected
    # A write holding a frame larger than `big` calls on_big(its size) first: the connection
    # lets its send buffer hold that frame beyond its limit (a 9 MiB row is no slow reader).
    cdef public Py_ssize_t big
    cdef public object on_big
    cdef Py_ssize_t taken_max    # the largest frame of the last take()

    def __init__(self):
        self.closed = False
        self.write = None
        self.big = PY_SSIZE_T_MAX
        self.on_big = None

    def __dealloc__(self):
        self._clear()
        PyMem_Free(self.frames)
        self.frames = NULL

    @property
    def pending(self):
        if self.n == 0:
            return None
        if self.n == 1:
            return <object>self.frames[0]
        return [<object>self.frames[i] for i in range(self.n)]

    cdef inline void _clear(self) noexcept:
        cdef Py_ssize_t i
        for i in range(self.n):
            decref(self.frames[i])
        self.n = 0
        self.last = NULL

    cdef int _grow(self) except -1:
        cdef Py_ssize_t cap = self.cap * 2 if self.cap else FIRST_CAPACITY
        cdef PyObject** grown = <PyObject**>PyMem_Realloc(self.frames, cap * sizeof(PyObject*))
        if grown is NULL:
            raise MemoryError()
        self.frames = grown
        self.cap = cap
        return 0

    cdef object take(self):
        """The pending frames as one bytes object (None if none), and the outbox emptied."""
        cdef Py_ssize_t i, size = 0
        cdef object data
        cdef char* dst
        if self.n == 0:
            return None
        if self.n == 1:
            data = <object>self.frames[0]  # a reference of its own: _clear drops the array's
            self.taken_max = PyBytes_GET_SIZE(data)
        else:
            self.taken_max = 0
            for i in range(self.n):
                size += PyBytes_GET_SIZE(<object>self.frames[i])
            data = PyBytes_FromStringAndSize(NULL, size)
            dst = PyBytes_AS_STRING(data)
            for i in range(self.n):
                size = PyBytes_GET_SIZE(<object>self.frames[i])
                if size > self.taken_max:
                    self.taken_max = size
                memcpy(dst, PyBytes_AS_STRING(<object>self.frames[i]), size)
                dst += size
        self._clear()
        if self.cap > KEEP_CAPACITY:
            PyMem_Free(self.frames)
            self.frames = NULL
            self.cap = 0
        return data


cdef class SubKey:
    """A subscription key as the index returns it: `out` is its connection's outbox."""

    cdef public Outbox out

    def __init__(self, Outbox out=None):
        self.out = out


DEF SKIPPED = 0   # _queue: nothing queued (closed, or this frame is already the last one)
DEF ADDED = 1     # queued after frames already pending
DEF FIRST = 2     # queued on an outbox that had nothing pending: it must be scheduled


cdef inline int _queue(Outbox out, bytes frame) except -1:
    """Queue `frame` on `out` (the same frame twice in a row once): SKIPPED, ADDED or FIRST."""
    cdef PyObject* f = <PyObject*>frame
    cdef int how = ADDED
    if out.n == 0:
        if out.closed:
            return SKIPPED
        how = FIRST
    elif out.last == f:
        return SKIPPED
    if out.n == out.cap:
        out._grow()
    incref(f)
    out.frames[out.n] = f
    out.n += 1
    out.last = f
    return how


cpdef bint queue_one(Outbox out, bytes frame) except -1:
    """Queue `frame` on `out`; True when `out` had nothing queued (the caller schedules it)."""
    return _queue(out, frame) == FIRST


cdef extern from *:
    void prefetch "__builtin_prefetch"(const void* addr) nogil
    void prefetch_write "__builtin_prefetch"(const void* addr, int rw) nogil


DEF BLOCK = 128  # subscriptions whose memory is asked for together


cdef inline void _prefetch_hop(PyObject* sub, int hops) noexcept:
    # Borrowed pointers only: taking a reference would write the object's count, which is
    # the very miss this is to avoid. Reads only what the pass before asked for.
    cdef PyObject* out
    if not PyObject_TypeCheck(sub, <PyTypeObject*>SubKey):
        return  # the checked cast in push_all raises for it
    out = <PyObject*>(<SubKey>sub).out
    if out == <PyObject*>None:
        return
    if hops == 1:
        prefetch(out)
    elif (<Outbox>out).n < (<Outbox>out).cap:
        prefetch_write(&(<Outbox>out).frames[(<Outbox>out).n], 1)  # the slot the frame goes to


def push_all(list subs, bytes frame, list dirty):
    """Queue `frame` on the outbox of every subscription key in `subs`; outboxes that had
    nothing queued go to `dirty`. Returns the number of frames queued (see fanout_ref)."""
    cdef Py_ssize_t queued = 0
    cdef Py_ssize_t i, hop, base, end, n = len(subs)
    cdef Outbox out
    cdef int queued_how
    # With thousands of connections, subscriptions and outboxes are cold in cache, and each
    # hop (subscription -> outbox -> its frame array) would wait for the one before. So, per
    # block of subscriptions, one pass per hop asks for the next object of every subscription
    # (independent loads, in flight together), and the last pass works.
    for base in range(0, n, BLOCK):
        end = min(base + BLOCK, n)
        if end - base > 8:
            for i in range(base, end):
                prefetch(PyList_GET_ITEM(subs, i))
            for hop in range(1, 3):
                for i in range(base, end):
                    _prefetch_hop(PyList_GET_ITEM(subs, i), hop)
        for i in range(base, end):
            out = (<SubKey?>subs[i]).out
            if out is None:
                continue  # a key not attached to a connection (yet)
            queued_how = _queue(out, frame)
            if queued_how == FIRST:
                dirty.append(out)
            if queued_how != SKIPPED:
                queued += 1
    return queued


cdef extern from "Python.h":
    bint PyCFunction_Check(PyObject* o)
    PyObject* PyCFunction_GET_SELF(PyObject* o)
    bint PyMethod_Check(PyObject* o)
    PyObject* PyMethod_GET_SELF(PyObject* o)


DEF TRANSPORT_LINES = 4  # cache lines of a transport object asked for ahead of its write


cdef inline void _prefetch_writer(PyObject* o, int hop) noexcept:
    # As _prefetch_hop: borrowed pointers, and each pass reads only what the one before asked
    # for. hop 1: the outbox's write (a bound method) and frame array; hop 2: the transport the
    # write is bound to.
    cdef PyObject* w
    cdef PyObject* transport
    cdef int line
    if not PyObject_TypeCheck(o, <PyTypeObject*>Outbox):
        return  # the checked cast in flush_all raises for it
    w = <PyObject*>(<Outbox>o).write
    if hop == 1:
        prefetch(w)
        if (<Outbox>o).frames != NULL:
            prefetch((<Outbox>o).frames)  # take() reads the pending frames from it
        return
    if PyCFunction_Check(w):  # a compiled transport's method (uvloop)
        transport = PyCFunction_GET_SELF(w)
    elif PyMethod_Check(w):
        transport = PyMethod_GET_SELF(w)
    else:
        return
    if transport != NULL:
        for line in range(TRANSPORT_LINES):
            prefetch(<char*>transport + 64 * line)


def flush_all(list dirty):
    """One write per outbox of all its pending frames. Returns (writes, frames written)."""
    cdef Py_ssize_t writes = 0, frames = 0, n, i, hop, count = len(dirty)
    cdef Outbox out
    cdef object data
    # Outbox, its bound write (and frame array), the transport: dependent hops, each a cache
    # miss for a connection written once per event. Asked for in passes over the batch, they
    # load together: in a paced fan-out to 1,000 connections (one write per delivery) this loop
    # and uvloop's write went from 9-10% of the gateway's CPU samples to 6% (perf).
    if count > 2:
        for i in range(count):
            prefetch(PyList_GET_ITEM(dirty, i))
        for hop in range(1, 3):
            for i in range(count):
                _prefetch_writer(PyList_GET_ITEM(dirty, i), hop)
    for o in dirty:
        out = <Outbox?>o
        n = out.n
        if n == 0:
            continue
        if out.closed or out.write is None:
            out._clear()
            continue
        # Emptied before the write: a write that ends the connection may queue on it again.
        data = out.take()
        if out.taken_max > out.big and out.on_big is not None:
            PyObject_CallOneArg(out.on_big, out.taken_max)
        PyObject_CallOneArg(out.write, data)
        frames += n
        writes += 1
    return writes, frames
