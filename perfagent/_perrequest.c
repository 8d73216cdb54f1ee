/*
 * Work that runs once per request, in C: the ASGI adapter's start and end
 * (``AsgiBegin``, ``AsgiRequest``, ``end_request``), the end-of-request
 * pipeline's common case (``Finisher``), the N+1 detector's
 * (``NPlusOneReporter``), the thread pool's wait (``RunSync``) and the log line
 * of a finding that repeats (``PreparedLine``).
 *
 * Why C: the agent's per-request Python is what keeps it from its throughput
 * targets (callgrind, the benchmark's routes): the pipeline's loop and its
 * metrics, slow and keep steps cost ~19,000 CPU instructions on FastAPI
 * ``/hello``; the N+1 route's prepared log line ~17,000 to render. Each type
 * says what it costs here. The Python code stays the reference
 * (``Agent.finish``, ``perfagent/export/logs.py``): the package works without
 * this module, ``PERFAGENT_COMPILED_HOOKS=0`` turns it off, and the tests hold
 * the two to the same results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <structmember.h>
#include <time.h>

#include "_histogram.h"
#include "_query.h"
#include "_record_slots.h"

/* ---------------------------------------------------------------------------
 * PreparedLine: ``ConsoleLine.prepare``'s ``render(now, values)`` in C.
 *
 * The line is ``<timestamp> <head><part> <part> ...``: the parts in key order,
 * fixed ones rendered once by ``prepare``, the slots filled per event as the
 * Python ``render`` fills them (ints and floats by ``repr``, a trace id as it
 * is, anything else by the ``value`` function ``prepare`` hands over). The
 * timestamp is ``_Clock.format``'s: UTC, microseconds, its date part made once
 * a second.
 */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *first;    /* head + parts[0] when parts[0] is fixed, else head */
    PyObject *parts;    /* list: the fixed parts, "" in the slots */
    PyObject *value;    /* the Python _value(value) -> str for other values */
    Py_ssize_t nslots;
    Py_ssize_t *slot_of; /* per part: the slot it is, or -1 for a fixed part */
    PyObject **prefix;  /* per slot: "key=" */
    char *trace;        /* per slot: 1 for trace_id */
    long long second;   /* the second ``date`` was made for */
    char date[32];      /* "YYYY-MM-DDTHH:MM:SS." */
    int date_len;
} PreparedLine;

static PyObject *str_space;

/* traverse, clear and dealloc for a type whose object members an X-macro lists. */
#define VISIT_MEMBER(name) Py_VISIT(self->name);
#define CLEAR_MEMBER(name) Py_CLEAR(self->name);
#define GC_TRAVERSE_CLEAR(Type, OBJECTS)                             \
    static int Type##_traverse(Type *self, visitproc visit, void *arg) \
    {                                                                \
        OBJECTS(VISIT_MEMBER)                                        \
        return 0;                                                    \
    }                                                                \
    static int Type##_clear(Type *self)                              \
    {                                                                \
        OBJECTS(CLEAR_MEMBER)                                        \
        return 0;                                                    \
    }
#define GC_METHODS(Type, OBJECTS)                                    \
    GC_TRAVERSE_CLEAR(Type, OBJECTS)                                 \
    static void Type##_dealloc(Type *self)                           \
    {                                                                \
        PyObject_GC_UnTrack(self);                                   \
        Type##_clear(self);                                          \
        Py_TYPE(self)->tp_free((PyObject *)self);                    \
    }


/* The type of a callable object (vectorcall), its objects in the garbage collector's
 * view through ``<Name>_traverse`` and ``<Name>_clear``; the rest as given. */
#define CALLABLE_TYPE(Name, doc, ...)                                                   \
    static PyTypeObject Name##Type = {                                                  \
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "perfagent._perrequest." #Name,       \
        .tp_basicsize = sizeof(Name),                                                   \
        .tp_dealloc = (destructor)Name##_dealloc,                                       \
        .tp_vectorcall_offset = offsetof(Name, vectorcall),                             \
        .tp_call = PyVectorcall_Call,                                                   \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL, \
        .tp_doc = doc,                                                                  \
        .tp_traverse = (traverseproc)Name##_traverse,                                   \
        .tp_clear = (inquiry)Name##_clear,                                              \
        __VA_ARGS__};


/* A few spare objects of each per-request type (AsgiRequest, Started), reused as
 * CPython reuses its lists and tuples: an object taken from here or put back is
 * neither a new allocation nor a deallocation for the garbage collector's count
 * of young objects. Why that count matters: it starts a young collection when
 * the objects allocated since the last one, less those freed, pass 700; under
 * load that is how far the live objects of the requests in flight rise above
 * their low point. Every collector-visible object a request holds from its start
 * to its end adds to that rise (measured on the benchmark's 11-query route under
 * uvicorn, 16 connections: young collections 78-81 per 1,000 requests bare, 91-94
 * with the agent holding six such objects a request, 81-89 holding one; a full
 * collection follows every ~11th of the middle generation, and took 30-45 ms
 * there). Off with free threading: the list relies on the GIL. */
#define RECYCLE_MAX 32
typedef struct {
    PyObject *spare[RECYCLE_MAX];
    int count;
} Recycler;

/* A new object of ``type`` (a GC type), a spare one where there is one. */
static inline PyObject *
recycled_new(Recycler *bin, PyTypeObject *type)
{
#ifndef Py_GIL_DISABLED
    if (bin->count > 0) {
        return PyObject_Init(bin->spare[--bin->count], type);
    }
#endif
    return (PyObject *)PyObject_GC_New(PyObject, type);
}

/* Frees ``obj``, already untracked and cleared, or keeps it as a spare. */
static inline void
recycle(Recycler *bin, PyObject *obj)
{
#ifndef Py_GIL_DISABLED
    if (bin->count < RECYCLE_MAX) {
        bin->spare[bin->count++] = obj;
        return;
    }
#endif
    PyObject_GC_Del(obj);
}

/* GC_METHODS with a dealloc that keeps spares in ``bin``. */
#define RECYCLED_GC_METHODS(Type, OBJECTS, bin)                      \
    static Recycler bin;                                             \
    GC_TRAVERSE_CLEAR(Type, OBJECTS)                                 \
    static void Type##_dealloc(Type *self)                           \
    {                                                                \
        PyObject_GC_UnTrack(self);                                   \
        Type##_clear(self);                                          \
        recycle(&bin, (PyObject *)self);                             \
    }

/* One piece of a line being rendered: a str, or ASCII text (``ascii``, ``len`` bytes). */
typedef struct {
    PyObject *str;   /* a new reference, or NULL for ASCII text */
    char *ascii;     /* PyMem-allocated where ``owned`` */
    Py_ssize_t len;
    int owned;
} Piece;

/* Appends the decimal digits of ``value``, at least ``least`` of them; returns the end. */
static char *
put_digits(char *out, unsigned long long value, int least)
{
    char digits[24];
    int n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value > 0 || n < least);
    while (n > 0) {
        *out++ = digits[--n];
    }
    return out;
}

/* ``repr(value)`` written to ``out`` (24 bytes) for a float that is the double nearest
 * to a number of thousandths (a duration rounded to 3 decimals, as every float the
 * agent logs is) from 0.001 to 10**12: its digits, the trailing zeros after the point
 * dropped but one. Below 10**12 no other number of thousandths is that close to the
 * double, and its repr, the shortest text that reads back as it, is that one. Returns
 * the length, or 0 for any other float (then written by float.__repr__'s code). */
static Py_ssize_t
thousandths_repr(double value, char *out)
{
    if (!(value >= 0.001 && value < 1e12)) {
        return 0;
    }
    double whole = nearbyint(value * 1000.0);
    if (whole / 1000.0 != value) {
        return 0;
    }
    unsigned long long count = (unsigned long long)whole;
    unsigned long long decimals = count % 1000;
    /* The tenths and what follows up to the last decimal that is not zero. */
    int keep = decimals % 10 ? 3 : decimals / 10 % 10 ? 2 : 1;
    char *end = put_digits(out, count / 1000, 1);
    *end++ = '.';
    end = put_digits(end, keep == 3 ? decimals : keep == 2 ? decimals / 10 : decimals / 100, keep);
    return end - out;
}

/* The text of a slot's value: ``repr`` of an exact int or float (as ASCII), ``value``
 * as it is for a trace id, else ``value(value)``; 0, or -1 with an error set. */
static int
slot_text(PreparedLine *self, Py_ssize_t slot, PyObject *value, Piece *piece, char *digits)
{
    PyTypeObject *type = Py_TYPE(value);
    *piece = (Piece){NULL, NULL, 0, 0};
    if (type == &PyLong_Type) {
        int overflow;
        long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (number == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (!overflow) { /* into ``digits`` (24 bytes): a sign and 20 digits at most */
            char *end = digits;
            if (number < 0) {
                *end++ = '-';
            }
            end = put_digits(end, number < 0 ? 0ULL - (unsigned long long)number
                                             : (unsigned long long)number, 1);
            piece->ascii = digits;
            piece->len = end - digits;
            return 0;
        }
        piece->str = PyObject_Repr(value);
    }
    else if (type == &PyFloat_Type) {
        double number = PyFloat_AS_DOUBLE(value);
        Py_ssize_t len = thousandths_repr(number, digits);
        if (len > 0) {
            piece->ascii = digits;
            piece->len = len;
            return 0;
        }
        /* float.__repr__'s own formatting: a shortest-digits conversion, ~2,300 CPU
         * instructions for a value such as a finding's total_ms */
        piece->ascii = PyOS_double_to_string(number, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (piece->ascii == NULL) {
            return -1;
        }
        piece->owned = 1;
        piece->len = (Py_ssize_t)strlen(piece->ascii);
        return 0;
    }
    else if (self->trace[slot] && type == &PyUnicode_Type) {
        piece->str = Py_NewRef(value);
    }
    else {
        piece->str = PyObject_CallOneArg(self->value, value);
        if (piece->str != NULL && !PyUnicode_Check(piece->str)) {
            PyErr_SetString(PyExc_TypeError, "the value function must return str");
            Py_CLEAR(piece->str);
        }
    }
    return piece->str == NULL ? -1 : 0;
}

/* ``_Clock.format(now)``: "YYYY-MM-DDTHH:MM:SS.ffffffZ", written to ``text`` (at least
 * 40 bytes, not terminated); its length, or -1 with an error set. */
static Py_ssize_t
timestamp(PreparedLine *self, double now, char *text)
{
    long long second = (long long)now; /* int(now): toward zero, as Python's */
    if (second != self->second) {
        time_t t = (time_t)second;
        struct tm tm;
        if (gmtime_r(&t, &tm) == NULL) {
            PyErr_SetString(PyExc_OverflowError, "timestamp out of range");
            return -1;
        }
        self->date_len = snprintf(self->date, sizeof(self->date), "%04d-%02d-%02dT%02d:%02d:%02d.",
                                  tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                                  tm.tm_min, tm.tm_sec);
        if (self->date_len <= 0 || self->date_len >= (int)sizeof(self->date) - 8) {
            PyErr_SetString(PyExc_OverflowError, "timestamp out of range");
            return -1;
        }
        self->second = second;
    }
    long micros = (long)((now - (double)second) * 1e6);
    if (micros < 0 || micros > 999999) { /* only a time before 1970 could give this */
        PyErr_SetString(PyExc_OverflowError, "timestamp out of range");
        return -1;
    }
    memcpy(text, self->date, (size_t)self->date_len);
    char *digits = text + self->date_len;
    for (int i = 5; i >= 0; i--) {
        digits[i] = (char)('0' + micros % 10);
        micros /= 10;
    }
    digits[6] = 'Z';
    return self->date_len + 7;
}

/* The line for ``values`` (one per slot) at ``now``: a new str, or NULL with an error set.
 *
 * ``f"{timestamp} {head}{' '.join(parts)}"`` with each slot's part its ``key=`` and
 * its value's text, made as one str: its length and widest character summed over the
 * pieces, then each piece copied in. A list, a join and a str per slot, as before,
 * took ~7,800 CPU instructions for the N+1 line of four slots; ints and floats are
 * written as ASCII rather than through their ``repr`` objects. */
static PyObject *
render_line(PreparedLine *self, double now, PyObject *const *values, Py_ssize_t nvalues)
{
    if (nvalues != self->nslots) {
        PyErr_SetString(PyExc_ValueError, "render: one value per slot");
        return NULL;
    }
    Py_ssize_t nparts = PyList_GET_SIZE(self->parts);
    /* Per part: its text (or, for a slot, its prefix then its value) and a space. */
    Py_ssize_t most = 2 * nparts + 2 * self->nslots + 4;
    Piece small[48], *pieces = most <= 48 ? small : PyMem_Calloc((size_t)most, sizeof(Piece));
    char few_digits[8][24], (*digits)[24] = self->nslots <= 8 ? few_digits
                                          : PyMem_Malloc((size_t)self->nslots * 24);
    PyObject *line = NULL;
    Py_ssize_t count = 0;
    if (pieces == NULL || digits == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    char stamp[40];
    Py_ssize_t stamp_len = timestamp(self, now, stamp);
    if (stamp_len < 0) {
        goto done;
    }
    stamp[stamp_len++] = ' ';
    pieces[count++] = (Piece){NULL, stamp, stamp_len, 0};
    pieces[count++] = (Piece){Py_NewRef(self->first), NULL, 0, 0};
    for (Py_ssize_t at = 0; at < nparts; at++) {
        if (at > 0) {
            pieces[count++] = (Piece){NULL, " ", 1, 0};
        }
        Py_ssize_t slot = self->slot_of[at];
        if (slot >= 0) {
            pieces[count++] = (Piece){Py_NewRef(self->prefix[slot]), NULL, 0, 0};
            if (slot_text(self, slot, values[slot], &pieces[count], digits[slot]) < 0) {
                goto done;
            }
            count++;
        }
        else if (at > 0) { /* part 0, when fixed, is in ``first`` */
            pieces[count++] = (Piece){Py_NewRef(PyList_GET_ITEM(self->parts, at)), NULL, 0, 0};
        }
    }
    Py_ssize_t length = 0;
    Py_UCS4 widest = 127;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (pieces[i].str != NULL) {
            length += PyUnicode_GET_LENGTH(pieces[i].str);
            Py_UCS4 top = PyUnicode_MAX_CHAR_VALUE(pieces[i].str);
            widest = top > widest ? top : widest;
        }
        else {
            length += pieces[i].len;
        }
    }
    line = PyUnicode_New(length, widest);
    if (line == NULL) {
        goto done;
    }
    int kind = PyUnicode_KIND(line);
    void *data = PyUnicode_DATA(line);
    Py_ssize_t to = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (pieces[i].str != NULL) {
            Py_ssize_t n = PyUnicode_GET_LENGTH(pieces[i].str);
            if (kind == PyUnicode_1BYTE_KIND) { /* the line's kind: every piece's too */
                memcpy((char *)data + to, PyUnicode_DATA(pieces[i].str), (size_t)n);
            }
            else if (PyUnicode_CopyCharacters(line, to, pieces[i].str, 0, n) < 0) {
                Py_CLEAR(line);
                goto done;
            }
            to += n;
        }
        else if (kind == PyUnicode_1BYTE_KIND) {
            memcpy((char *)data + to, pieces[i].ascii, (size_t)pieces[i].len);
            to += pieces[i].len;
        }
        else {
            for (Py_ssize_t j = 0; j < pieces[i].len; j++) {
                PyUnicode_WRITE(kind, data, to++, (Py_UCS4)(unsigned char)pieces[i].ascii[j]);
            }
        }
    }
done:
    for (Py_ssize_t i = 0; pieces != NULL && i < count; i++) {
        Py_XDECREF(pieces[i].str);
        if (pieces[i].owned) {
            PyMem_Free(pieces[i].ascii);
        }
    }
    if (pieces != small) {
        PyMem_Free(pieces);
    }
    if (digits != few_digits) {
        PyMem_Free(digits);
    }
    return line;
}

static PyObject *
PreparedLine_vectorcall(PreparedLine *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "render(now, values)");
        return NULL;
    }
    double now = PyFloat_AsDouble(args[0]);
    if (now == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *values = args[1];
    if (!PyTuple_Check(values)) {
        PyErr_SetString(PyExc_TypeError, "render: values must be a tuple");
        return NULL;
    }
    return render_line(self, now, &PyTuple_GET_ITEM(values, 0), PyTuple_GET_SIZE(values));
}

static PyObject *
PreparedLine_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *head, *parts, *plan, *value;
    static char *names[] = {"head", "parts", "plan", "value", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UO!O!O:PreparedLine", names, &head,
                                     &PyList_Type, &parts, &PyTuple_Type, &plan, &value)) {
        return NULL;
    }
    Py_ssize_t nparts = PyList_GET_SIZE(parts), nslots = PyTuple_GET_SIZE(plan);
    if (nparts == 0) {
        PyErr_SetString(PyExc_ValueError, "PreparedLine: no parts");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nparts; i++) {
        if (!PyUnicode_Check(PyList_GET_ITEM(parts, i))) {
            PyErr_SetString(PyExc_TypeError, "PreparedLine: parts must be str");
            return NULL;
        }
    }
    PreparedLine *self = (PreparedLine *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)PreparedLine_vectorcall;
    self->second = -1;
    self->parts = PyList_GetSlice(parts, 0, nparts); /* a copy of its own */
    self->value = Py_NewRef(value);
    self->nslots = nslots;
    self->prefix = PyMem_Calloc((size_t)nslots + 1, sizeof(PyObject *));
    self->trace = PyMem_Calloc((size_t)nslots + 1, 1);
    self->slot_of = PyMem_Malloc((size_t)nparts * sizeof(Py_ssize_t));
    if (self->parts == NULL || self->prefix == NULL || self->trace == NULL ||
        self->slot_of == NULL) {
        Py_DECREF(self);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    for (Py_ssize_t at = 0; at < nparts; at++) {
        self->slot_of[at] = -1;
    }
    int first_varies = 0;
    for (Py_ssize_t slot = 0; slot < nslots; slot++) {
        PyObject *entry = PyTuple_GET_ITEM(plan, slot);
        Py_ssize_t at;
        PyObject *prefix;
        int trace;
        if (!PyTuple_Check(entry) || !PyArg_ParseTuple(entry, "nUp", &at, &prefix, &trace)) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "plan: (index, prefix, is trace id) tuples");
            }
            Py_DECREF(self);
            return NULL;
        }
        if (at < 0 || at >= nparts || self->slot_of[at] >= 0) {
            PyErr_SetString(PyExc_ValueError, "plan: index out of range, or given twice");
            Py_DECREF(self);
            return NULL;
        }
        self->slot_of[at] = slot;
        self->prefix[slot] = Py_NewRef(prefix);
        self->trace[slot] = (char)trace;
        first_varies |= at == 0;
    }
    self->first = first_varies ? Py_NewRef(head)
                               : PyUnicode_Concat(head, PyList_GET_ITEM(self->parts, 0));
    if (self->first == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
PreparedLine_traverse(PreparedLine *self, visitproc visit, void *arg)
{
    Py_VISIT(self->parts);
    Py_VISIT(self->value);
    return 0;
}

static int
PreparedLine_clear(PreparedLine *self)
{
    Py_CLEAR(self->parts);
    Py_CLEAR(self->value);
    Py_CLEAR(self->first);
    if (self->prefix != NULL) {
        for (Py_ssize_t slot = 0; slot < self->nslots; slot++) {
            Py_CLEAR(self->prefix[slot]);
        }
    }
    return 0;
}

static void
PreparedLine_dealloc(PreparedLine *self)
{
    PyObject_GC_UnTrack(self);
    PreparedLine_clear(self);
    PyMem_Free(self->prefix);
    PyMem_Free(self->trace);
    PyMem_Free(self->slot_of);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

CALLABLE_TYPE(PreparedLine,
              "render(now, values): a prepared console log line (perfagent/export/logs.py).",
              .tp_new = PreparedLine_new)

/* ---------------------------------------------------------------------------
 * QueuedLine: ``EventLog.prepare``'s ``emit(*values)`` for a PreparedLine, in C.
 *
 * The line rendered at ``time.time()`` and appended to the log's queue, then the
 * queue written at once when the log is not deferred or holds ``max_queued``
 * lines, as ``EventLog._add_line``. A finding repeated on every request of a
 * route is one of these calls a request; in Python, the two frames of the
 * ``emit_line`` closure and ``_add_line`` took ~1,500 CPU instructions of it.
 */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *render; /* the PreparedLine */
    PyObject *queue;  /* the log's deque of lines */
    PyObject *append; /* its append */
    PyObject *log;    /* the EventLog: ``deferred`` and ``write()`` */
    Py_ssize_t max_queued;
} QueuedLine;

static PyObject *str_deferred, *str_write;

/* ``time.time()``: the system clock, as seconds. */
static int
wall_clock(double *now)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) == 0) {
        *now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        return 0;
    }
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

static PyObject *
QueuedLine_vectorcall(QueuedLine *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames)) {
        PyErr_SetString(PyExc_TypeError, "emit(*values) takes no keywords");
        return NULL;
    }
    double now;
    if (wall_clock(&now) < 0) {
        return NULL;
    }
    PyObject *line = render_line((PreparedLine *)self->render, now, args,
                                 PyVectorcall_NARGS(nargsf));
    if (line == NULL) {
        return NULL;
    }
    PyObject *appended = PyObject_CallOneArg(self->append, line);
    Py_DECREF(line);
    if (appended == NULL) {
        return NULL;
    }
    Py_DECREF(appended);
    PyObject *deferred = PyObject_GetAttr(self->log, str_deferred);
    int later = deferred == NULL ? -1 : PyObject_IsTrue(deferred);
    Py_XDECREF(deferred);
    if (later < 0) {
        return NULL;
    }
    Py_ssize_t queued = later ? PyObject_Size(self->queue) : 0;
    if (queued < 0) {
        return NULL;
    }
    if (!later || queued >= self->max_queued) {
        return PyObject_CallMethodNoArgs(self->log, str_write);
    }
    Py_RETURN_NONE;
}

static PyObject *
QueuedLine_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *render, *queue, *log;
    Py_ssize_t max_queued;
    static char *names[] = {"render", "queue", "log", "max_queued", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OOn:QueuedLine", names, &PreparedLineType,
                                     &render, &queue, &log, &max_queued)) {
        return NULL;
    }
    PyObject *append = PyObject_GetAttrString(queue, "append");
    if (append == NULL) {
        return NULL;
    }
    QueuedLine *self = (QueuedLine *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(append);
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)QueuedLine_vectorcall;
    self->render = Py_NewRef(render);
    self->queue = Py_NewRef(queue);
    self->append = append;
    self->log = Py_NewRef(log);
    self->max_queued = max_queued;
    return (PyObject *)self;
}

#define QUEUEDLINE_OBJECTS(X) X(render) X(queue) X(append) X(log)
GC_METHODS(QueuedLine, QUEUEDLINE_OBJECTS)

CALLABLE_TYPE(QueuedLine,
              "emit(*values): a prepared log line rendered now and queued for the log.",
              .tp_new = QueuedLine_new)

/* ---------------------------------------------------------------------------
 * Finisher: ``Agent.finish(record)`` for the common case, in C.
 *
 * What ``Agent.finish`` and its steps do, in the same order: mark the record
 * done, take it out of the in-flight table, settle its end; the request
 * histograms into the calling thread's buffer (``Metrics.request_ended`` and
 * ``RequestStats.request_ended``); then the Python steps only where they have
 * something to do: ``_detect_slow`` past the slow threshold, the profile step
 * for a request that asked, the N+1 detector for a request with queries, and
 * ``_keep_trace`` for a request that is not another instrumentation's and has
 * findings, failed, or is in the head sample (``head_sampled``, asked once).
 * An error in a step is handed to ``internal_error(where, exc)``, as there.
 */

static PyObject *str_done, *str_end, *str_route, *str_method, *str_status, *str_queries,
    *str_thread_wait, *str_start, *str_streaming, *str_first_byte, *str_profile, *str_foreign,
    *str_findings, *str_error_type, *str_buffer, *str_active, *str_tables, *str_local, *str_sampled, *str_carrier, *str_parent,
    *str_trace_id_slot, *str_http_traceparent;

static PyTypeObject *query_type; /* _speedups.Query, or NULL where it was not built */

/* Field ``index`` of a query (perfagent/db/capture.py: 0 its system, 7 its sites):
 * a new reference, or NULL with an error set. */
static PyObject *
query_field(PyObject *query, Py_ssize_t index)
{
    if (query_type != NULL && Py_IS_TYPE(query, query_type)) {
        QueryObject *fields = (QueryObject *)query;
        if (index == 0) {
            return Py_NewRef(fields->system);
        }
        if (index == 7) {
            return Py_NewRef(fields->sites);
        }
    }
    return PySequence_GetItem(query, index);
}

/* A query's duration in seconds; -1.0 with an error set when it has none. */
static double
query_duration(PyObject *query)
{
    if (query_type != NULL && Py_IS_TYPE(query, query_type)) {
        return ((QueryObject *)query)->duration;
    }
    PyObject *value = PySequence_GetItem(query, 5);
    double duration = value == NULL ? -1.0 : PyFloat_AsDouble(value);
    Py_XDECREF(value);
    return duration;
}

/* ---------------------------------------------------------------------------
 * The record's attributes read and written through their slots: ``RequestRecord``
 * has ``__slots__``, and ``PyObject_GetAttr`` finds each through the type's
 * dictionaries and a descriptor (generic attribute lookups took ~7,000 of the
 * ~35,000 CPU instructions the agent adds to FastAPI ``/hello``). ``record.py``
 * tells this module its class (``use_record_type``); anything else, or a slot
 * not set, goes through ``PyObject_GetAttr`` and ``PyObject_SetAttr``.
 */

#define MAX_RECORD_SLOTS 32
/* Slot names -> offsets in an open-addressing table keyed by the name's address (the
 * names are interned: the module's own ``str_*`` objects): one or two probes a read,
 * where a scan of the slots in declaration order took ~14 comparisons (~3,000 CPU
 * instructions a request on the 11-query route, ~25 reads and writes). */
#define SLOT_TABLE 64 /* a power of two, at least twice MAX_RECORD_SLOTS */
static PyTypeObject *record_type;
/* A record as ``RequestRecord.__init__`` leaves it, made once by ``use_record_type``:
 * a new record copies its slots (then gets its method, start and carrier) instead of
 * running ``__init__`` in Python, 26 attribute stores in a frame of its own. NULL
 * when a slot's default is not an immutable atom (None, bool, int, float, str),
 * which a copy would share between requests. */
static PyObject *record_template;
static Py_ssize_t template_offsets[MAX_RECORD_SLOTS];
static int template_slots;
static struct {
    PyObject *name; /* interned; NULL: empty */
    Py_ssize_t offset;
} record_slots[SLOT_TABLE];

static inline size_t
slot_hash(PyObject *name)
{
    return ((size_t)name >> 4) & (SLOT_TABLE - 1);
}

static inline Py_ssize_t
slot_offset(PyObject *obj, PyObject *name)
{
    if (Py_TYPE(obj) != record_type) {
        return -1;
    }
    for (size_t i = slot_hash(name);; i = (i + 1) & (SLOT_TABLE - 1)) {
        if (record_slots[i].name == name) {
            return record_slots[i].offset;
        }
        if (record_slots[i].name == NULL) {
            return -1;
        }
    }
}

/* ``getattr(obj, name)``: a new reference, or NULL with an error set. */
static PyObject *
get_attr(PyObject *obj, PyObject *name)
{
    Py_ssize_t offset = slot_offset(obj, name);
    if (offset >= 0) {
        PyObject *value = *(PyObject **)((char *)obj + offset);
        if (value != NULL) {
            return Py_NewRef(value);
        }
    }
    return PyObject_GetAttr(obj, name);
}

/* ``setattr(obj, name, value)``: 0, or -1 with an error set. */
static int
set_attr(PyObject *obj, PyObject *name, PyObject *value)
{
    Py_ssize_t offset = slot_offset(obj, name);
    if (offset >= 0) {
        PyObject **slot = (PyObject **)((char *)obj + offset);
        PyObject *old = *slot;
        *slot = Py_NewRef(value);
        Py_XDECREF(old);
        return 0;
    }
    return PyObject_SetAttr(obj, name, value);
}

/* ``use_record_type(RequestRecord)``: its writable object slots, by name. */
static PyObject *
use_record_type(PyObject *module, PyObject *cls)
{
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "use_record_type(a class)");
        return NULL;
    }
    PyObject *slots = PyObject_GetAttrString(cls, "__slots__");
    if (slots == NULL) {
        return NULL;
    }
    PyObject *names = PySequence_Tuple(slots);
    Py_DECREF(slots);
    if (names == NULL) {
        return NULL;
    }
    Py_CLEAR(record_type); /* no direct reads while the table is rebuilt */
    for (int i = 0; i < SLOT_TABLE; i++) {
        Py_CLEAR(record_slots[i].name);
    }
    int n = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names) && n < MAX_RECORD_SLOTS; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        Py_ssize_t offset = slot_member_offset((PyTypeObject *)cls, name);
        if (offset < 0) {
            continue;
        }
        Py_INCREF(name);
        PyUnicode_InternInPlace(&name); /* the same object as the module's own names */
        size_t at = slot_hash(name);
        while (record_slots[at].name != NULL) {
            at = (at + 1) & (SLOT_TABLE - 1);
        }
        record_slots[at].name = name;
        record_slots[at].offset = offset;
        n++;
    }
    int every_slot = n == PyTuple_GET_SIZE(names);
    Py_DECREF(names);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_XSETREF(record_type, (PyTypeObject *)Py_NewRef(cls));
    Py_CLEAR(record_template);
    template_slots = 0;
    if (every_slot && record_type->tp_dictoffset == 0) {
        record_template = PyObject_CallFunction(cls, "sdO", "GET", 0.0, Py_None);
        if (record_template == NULL) {
            return NULL;
        }
        for (int i = 0; i < SLOT_TABLE && record_template != NULL; i++) {
            if (record_slots[i].name == NULL) {
                continue;
            }
            Py_ssize_t offset = record_slots[i].offset;
            PyObject *value = *(PyObject **)((char *)record_template + offset);
            if (value != NULL && value != Py_None && !PyBool_Check(value) &&
                !PyLong_CheckExact(value) && !PyFloat_CheckExact(value) &&
                !PyUnicode_CheckExact(value)) {
                Py_CLEAR(record_template); /* a mutable default: __init__ must run */
                break;
            }
            template_offsets[template_slots++] = offset;
        }
    }
    Py_RETURN_NONE;
}

/* A new record as ``RequestRecord(method, start, carrier)``; NULL with an error set. */
static PyObject *
make_record(PyObject *cls, PyObject *method, PyObject *start, PyObject *carrier)
{
    if (record_template == NULL || cls != (PyObject *)record_type) {
        PyObject *args[3] = {method, start, carrier};
        return PyObject_Vectorcall(cls, args, 3, NULL);
    }
    PyObject *record = record_type->tp_alloc(record_type, 0);
    if (record == NULL) {
        return NULL;
    }
    for (int i = 0; i < template_slots; i++) {
        PyObject *value = *(PyObject **)((char *)record_template + template_offsets[i]);
        *(PyObject **)((char *)record + template_offsets[i]) = Py_XNewRef(value);
    }
    if (set_attr(record, str_method, method) < 0 || set_attr(record, str_start, start) < 0 ||
        set_attr(record, str_carrier, carrier) < 0) {
        Py_DECREF(record);
        return NULL;
    }
    return record;
}

static PyObject *str_headers; /* "headers" (defined with the ASGI adapter's names) */
static PyObject *one, *zero; /* the ints 1 and 0 */
static PyObject *str_trace_id_property, *str_counts;
static PyObject *str_past_cap, *str_count, *str_duration, *str_add_past_cap;
static double attr_double(PyObject *record, PyObject *name, double otherwise);

/* ``record.past_cap`` (db/capture.py ``CallsPastCap``, the calls past the request's
 * cap, counted only): a new reference to it, its count and its summed duration; None
 * and 0 for nearly every request. NULL with an error set on failure. */
static PyObject *
calls_past_cap(PyObject *record, Py_ssize_t *count, double *duration)
{
    *count = 0;
    *duration = 0.0;
    PyObject *past = get_attr(record, str_past_cap);
    if (past == NULL || past == Py_None) {
        return past;
    }
    PyObject *n = get_attr(past, str_count);
    *count = n == NULL ? -1 : PyLong_AsSsize_t(n);
    Py_XDECREF(n);
    *duration = *count < 0 ? -1.0 : attr_double(past, str_duration, 0.0);
    if (*count < 0 || (*duration == -1.0 && PyErr_Occurred())) {
        Py_CLEAR(past);
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "a negative count of calls past the cap");
        }
    }
    return past;
}
static PyObject *bits_128; /* the int 128 */

#define MAX_BOUNDS 32

typedef struct {
    double bounds[MAX_BOUNDS];
    Py_ssize_t width; /* bounds + 1 (the +Inf bucket) */
} Bounds;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *inflight;        /* dict: record -> where it runs */
    PyObject *perf_counter;
    PyObject *stats;           /* RequestStats: its .local.buffer is the thread's */
    PyObject *observe_queries; /* _speedups.observe_queries */
    PyObject *query_bounds;    /* its bounds: a tuple of floats */
    PyObject *slow_routes;     /* dict route -> seconds, or None */
    PyObject *detect_slow, *profile, *nplusone, *keep, *head_sampled, *on_error;
    PyObject *getrandbits;     /* record.IDS.getrandbits: the trace ids' source, as in record.py */
    PyObject *root_parent;     /* record.parent of a request without a caller: (0, None, None) */
    unsigned long long bound;  /* Sampler.bound: kept when the id's low 64 bits are below */
    int bound_all;             /* the bound is 2**64: every trace is kept */
    int parent_based;          /* Sampler.parent_based */
    PyObject *where_metrics, *where_slow, *where_profile, *where_nplusone, *where_keep;
    double slow_s;
    Bounds duration, count, wait;
} Finisher;

/* The histogram entries last found, by table and label values, each compared by
 * identity (a miss looks the entry up by equality, as before): the route is its
 * template's one str, the method the one str of each known method (new_record), a
 * status a small int. Entries stay in their thread's table for good (stats.py merges
 * running totals), and every object of a slot is held, so no other can take its
 * address while cached. Measured on the 11-query route: three lookups by a key tuple
 * made for each, ~1,500 CPU instructions a request. */
#define ENTRY_SLOTS 32
static struct {
    PyObject *table, *a, *b, *c, *entry;
} entry_slots[ENTRY_SLOTS];

/* ``table[(a, b, c)]`` (``(a,)`` where b is NULL), made empty if missing; a new reference. */
static PyObject *
cached_entry(PyObject *table, PyObject *a, PyObject *b, PyObject *c, Py_ssize_t width)
{
    size_t mix = ((size_t)table >> 4) * 31 ^ ((size_t)a >> 4) * 961 ^ ((size_t)b >> 4) * 29791 ^
                 ((size_t)c >> 4);
    size_t at = (mix ^ (mix >> 11)) % ENTRY_SLOTS;
    if (entry_slots[at].table == table && entry_slots[at].a == a && entry_slots[at].b == b &&
        entry_slots[at].c == c) {
        return Py_NewRef(entry_slots[at].entry);
    }
    PyObject *key = b == NULL ? PyTuple_Pack(1, a) : PyTuple_Pack(3, a, b, c);
    PyObject *entry = key == NULL ? NULL : histogram_entry(table, key, width);
    Py_XDECREF(key);
    if (entry == NULL) {
        return NULL;
    }
    PyObject *old[5] = {entry_slots[at].table, entry_slots[at].a, entry_slots[at].b,
                        entry_slots[at].c, entry_slots[at].entry};
    entry_slots[at].table = Py_NewRef(table);
    entry_slots[at].a = Py_NewRef(a);
    entry_slots[at].b = Py_XNewRef(b);
    entry_slots[at].c = Py_XNewRef(c);
    entry_slots[at].entry = Py_NewRef(entry);
    for (int i = 0; i < 5; i++) { /* last: releasing one may run Python code */
        Py_XDECREF(old[i]);
    }
    return entry;
}

/* ``_observe``: one value into ``table[(a, b, c)]`` (``(a,)`` where b is NULL) =
 * [count per bucket ..., +Inf count, sum]. */
static int
observe(PyObject *table, const Bounds *bounds, PyObject *a, PyObject *b, PyObject *c,
        double value)
{
    PyObject *entry = cached_entry(table, a, b, c, bounds->width);
    int result = entry == NULL ? -1 : histogram_add(entry, bounds->bounds, bounds->width - 1, value);
    Py_XDECREF(entry);
    return result;
}

/* The buffers last found per thread, by thread state id and ``stats.local``: reading a
 * ``threading.local`` attribute looks up the thread's dict, then the attribute in it
 * (~700 CPU instructions, three times a request). A slot holds its ``local``, so no
 * other object can take its address while cached; a new ``local`` (after a fork, a new
 * agent) misses. Keyed by ``PyThreadState_GetID``, never reused in a process, not by
 * the OS thread id: a thread id reused by a new thread would find the ended thread's
 * buffer, which stats.py drops once merged (thread-per-request servers), and its
 * counts would be lost. A thread state is what ``threading.local`` keys on too. */
#define BUFFER_SLOTS 16
static struct {
    uint64_t thread;
    PyObject *local;
    PyObject *buffer;
} buffer_slots[BUFFER_SLOTS];

/* ``RequestStats``' buffer of the calling thread (``stats.local.buffer``, else
 * ``stats.buffer()``, which makes it); a new reference. */
static PyObject *
thread_buffer(PyObject *stats)
{
    PyObject *local = get_attr(stats, str_local);
    if (local == NULL) {
        return NULL;
    }
    uint64_t thread = PyThreadState_GetID(PyThreadState_Get()); /* from 1: 0 is no slot */
    size_t at = (size_t)((thread * 0x9E3779B97F4A7C15u) >> 60) % BUFFER_SLOTS;
    if (buffer_slots[at].thread == thread && buffer_slots[at].local == local) {
        Py_DECREF(local);
        return Py_NewRef(buffer_slots[at].buffer);
    }
    PyObject *buffer = get_attr(local, str_buffer);
    if (buffer == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        buffer = PyObject_CallMethodNoArgs(stats, str_buffer);
    }
    if (buffer != NULL) {
        /* All three fields change before any old object is released (which may run
         * Python code, and another thread). */
        PyObject *old_local = buffer_slots[at].local, *old_buffer = buffer_slots[at].buffer;
        buffer_slots[at].local = Py_NewRef(local);
        buffer_slots[at].buffer = Py_NewRef(buffer);
        buffer_slots[at].thread = thread;
        Py_XDECREF(old_local);
        Py_XDECREF(old_buffer);
    }
    Py_DECREF(local);
    return buffer;
}

/* ``request_ended``: in flight no more; duration, query count, pool wait and queries. */
static int
request_metrics(Finisher *self, PyObject *record, double duration)
{
    int result = -1;
    PyObject *buffer = NULL, *active = NULL, *tables = NULL, *method = NULL, *route = NULL,
             *status = NULL, *queries = NULL, *wait = NULL, *past = NULL, *table[4] = {NULL};
    Py_ssize_t past_count;
    double past_duration;
    if ((buffer = thread_buffer(self->stats)) == NULL ||
        (active = get_attr(buffer, str_active)) == NULL ||
        (tables = get_attr(buffer, str_tables)) == NULL ||
        (method = get_attr(record, str_method)) == NULL ||
        (route = get_attr(record, str_route)) == NULL ||
        (status = get_attr(record, str_status)) == NULL ||
        (queries = get_attr(record, str_queries)) == NULL ||
        (wait = get_attr(record, str_thread_wait)) == NULL ||
        (past = calls_past_cap(record, &past_count, &past_duration)) == NULL) {
        goto done;
    }
    if (!PyDict_Check(active) || !PyList_Check(tables) || PyList_GET_SIZE(tables) < 4) {
        PyErr_SetString(PyExc_TypeError, "not a perfagent thread buffer");
        goto done;
    }
    /* Each table held, not borrowed from the buffer's list: observing can collect, and
     * a finalizer (or the agent thread meanwhile) can change what the list holds. */
    for (int i = 0; i < 4; i++) {
        table[i] = Py_NewRef(PyList_GET_ITEM(tables, i));
    }
    int truthy = PyObject_IsTrue(route);
    if (truthy < 0) {
        goto done;
    }
    if (!truthy) {
        Py_SETREF(route, PyUnicode_FromStringAndSize(NULL, 0)); /* record.route or "" */
        if (route == NULL) {
            goto done;
        }
    }
    PyObject *counts = PyDict_GetItemWithError(active, method); /* [started, finished] */
    if (counts != NULL && PyList_CheckExact(counts) && PyList_GET_SIZE(counts) == 2) {
        if (list_increment(counts, 1) < 0) {
            goto done;
        }
    }
    else if (PyErr_Occurred()) {
        goto done;
    }
    if (observe(table[0], &self->duration, method, route, status, duration) < 0) {
        goto done;
    }
    Py_ssize_t n = queries == Py_None ? 0 : PyObject_Length(queries);
    if (n < 0 || observe(table[1], &self->count, route, NULL, NULL, (double)(n + past_count)) < 0) {
        goto done;
    }
    double waited = PyFloat_AsDouble(wait);
    if (waited == -1.0 && PyErr_Occurred()) {
        goto done;
    }
    if (waited >= 0.0 && observe(table[3], &self->wait, route, NULL, NULL, waited) < 0) {
        goto done;
    }
    if (n > 0) {
        PyObject *args[3] = {table[2], self->query_bounds, queries};
        PyObject *none = PyObject_Vectorcall(self->observe_queries, args, 3, NULL);
        if (none == NULL) {
            goto done;
        }
        Py_DECREF(none);
    }
    if (past != Py_None) { /* rare: a request past its cap; stats.add_past_cap in Python */
        PyObject *args[3] = {self->stats, table[2], past};
        PyObject *none = PyObject_VectorcallMethod(str_add_past_cap, args, 3, NULL);
        if (none == NULL) {
            goto done;
        }
        Py_DECREF(none);
    }
    result = 0;
done:
    Py_XDECREF(past);
    Py_XDECREF(buffer);
    Py_XDECREF(active);
    Py_XDECREF(tables);
    Py_XDECREF(method);
    Py_XDECREF(route);
    Py_XDECREF(status);
    Py_XDECREF(queries);
    Py_XDECREF(wait);
    for (int i = 0; i < 4; i++) {
        Py_XDECREF(table[i]);
    }
    return result;
}

/* The error of a step, to ``internal_error(where, exc)``; never fails. */
static void
step_failed(Finisher *self, PyObject *where)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && PyErr_GivenExceptionMatches(value, PyExc_Exception)) {
        PyObject *args[2] = {where, value};
        PyObject *none = PyObject_Vectorcall(self->on_error, args, 2, NULL);
        Py_XDECREF(none);
        PyErr_Clear();
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return;
    }
    PyErr_Restore(type, value, traceback); /* not an Exception (KeyboardInterrupt): let it go */
}

/* ``step(record)``; 0, or -1 with a BaseException that is not an Exception pending. */
static int
run_step(Finisher *self, PyObject *step, PyObject *record, PyObject *where)
{
    PyObject *none = PyObject_CallOneArg(step, record);
    if (none != NULL) {
        Py_DECREF(none);
        return 0;
    }
    step_failed(self, where);
    return PyErr_Occurred() ? -1 : 0;
}

/* A step after its test: run when the test said 1, skipped at 0, the test's own error
 * handed over at -1; -1 when a BaseException that is not an Exception is pending. */
static int
step_if(Finisher *self, int wanted, PyObject *step, PyObject *record, PyObject *where)
{
    if (wanted < 0) {
        step_failed(self, where);
        return PyErr_Occurred() ? -1 : 0;
    }
    return wanted ? run_step(self, step, record, where) : 0;
}

/* A record attribute's truth: 1, 0, or -1 on error. */
static int
attr_true(PyObject *record, PyObject *name)
{
    PyObject *value = get_attr(record, name);
    if (value == NULL) {
        return -1;
    }
    int truth = value == Py_None ? 0 : PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

/* A record attribute as a double (None: ``otherwise``); -1.0 with an error set on failure. */
static double
attr_double(PyObject *record, PyObject *name, double otherwise)
{
    PyObject *value = get_attr(record, name);
    if (value == NULL) {
        return -1.0;
    }
    double result = value == Py_None ? otherwise : PyFloat_AsDouble(value);
    Py_DECREF(value);
    return result;
}

/* ``_detect_slow``'s threshold test: 1 when the step has something to do. */
static int
is_slow(Finisher *self, PyObject *record, double start, double end)
{
    int streaming = attr_true(record, str_streaming);
    if (streaming < 0) {
        return -1;
    }
    if (streaming) { /* a stream is judged by its time to first byte */
        double first = attr_double(record, str_first_byte, 0.0);
        if (first == -1.0 && PyErr_Occurred()) {
            return -1;
        }
        if (first) {
            end = first;
        }
    }
    double threshold = self->slow_s;
    if (self->slow_routes != Py_None) {
        PyObject *route = get_attr(record, str_route);
        if (route == NULL) {
            return -1;
        }
        PyObject *seconds = PyDict_GetItemWithError(self->slow_routes, route);
        Py_DECREF(route);
        if (seconds != NULL) {
            threshold = PyFloat_AsDouble(seconds);
        }
        if (PyErr_Occurred()) {
            return -1;
        }
    }
    return end - start >= threshold;
}

/* 1 when the request's carrier (an ASGI scope or a WSGI environ) may hold a
 * ``traceparent``: then the Python code reads it. */
static int
has_traceparent(PyObject *record)
{
    PyObject *carrier = get_attr(record, str_carrier);
    if (carrier == NULL) {
        return -1;
    }
    int found = 0;
    PyObject *headers = PyDict_Check(carrier) ? PyDict_GetItemWithError(carrier, str_headers)
                                              : NULL;
    if (headers != NULL && PyList_Check(headers)) { /* an ASGI scope, as incoming_headers */
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(headers) && !found; i++) {
            PyObject *pair = PyList_GET_ITEM(headers, i);
            PyObject *name = PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2
                                 ? PyTuple_GET_ITEM(pair, 0)
                                 : NULL;
            found = name == NULL || !PyBytes_Check(name) ||
                    (PyBytes_GET_SIZE(name) == 11 &&
                     memcmp(PyBytes_AS_STRING(name), "traceparent", 11) == 0);
        }
    }
    else if (!PyErr_Occurred() && carrier != Py_None) { /* a WSGI environ, or unknown */
        found = !PyDict_Check(carrier) || PyDict_GetItemWithError(carrier, str_http_traceparent) != NULL;
    }
    Py_DECREF(carrier);
    return PyErr_Occurred() ? -1 : found;
}

/* ``getrandbits(bits) or 1``: a new reference. */
static PyObject *
draw_bits(PyObject *getrandbits, PyObject *bits)
{
    PyObject *value = PyObject_CallOneArg(getrandbits, bits);
    if (value != NULL && PyLong_Check(value) && PyObject_Not(value) == 1) {
        Py_SETREF(value, Py_NewRef(one));
    }
    return value;
}

/* The record's trace id into ``*trace_id`` (a new reference): 1 when settled, drawn
 * here as ``settled_trace_id()`` draws it if the request had none and no caller's
 * ``traceparent`` (then with ``root_parent``; the span id is drawn when first asked
 * for, by ``trace_ids()``); 0 when the ``traceparent`` is there for the Python code
 * to read; -1 on error. */
static int
settled_trace_id(PyObject *record, PyObject *getrandbits, PyObject *root_parent,
                 PyObject **trace_id)
{
    PyObject *id = get_attr(record, str_trace_id_slot);
    int unset = id == NULL ? -1 : PyObject_Not(id);
    if (unset > 0) {
        int given = has_traceparent(record);
        if (given != 0) {
            Py_DECREF(id);
            return given < 0 ? -1 : 0;
        }
        Py_SETREF(id, draw_bits(getrandbits, bits_128));
        int failed = id == NULL || set_attr(record, str_trace_id_slot, id) < 0 ||
                     set_attr(record, str_parent, root_parent) < 0;
        unset = failed ? -1 : 0;
    }
    if (unset < 0) {
        Py_XDECREF(id);
        return -1;
    }
    *trace_id = id;
    return 1;
}

/* ``Agent.head_sampled(record)``: decided here when the request's trace id is settled
 * or needs no caller's ``traceparent`` (drawn here as ``settled_trace_id()`` draws it); else
 * asked of the Python method. 1 or 0, and ``record.sampled`` set; -1 on error. */
static int
head_sampled(Finisher *self, PyObject *record)
{
    PyObject *sampled = get_attr(record, str_sampled);
    if (sampled == NULL) {
        return -1;
    }
    if (sampled != Py_None) {
        int truth = PyObject_IsTrue(sampled);
        Py_DECREF(sampled);
        return truth;
    }
    Py_DECREF(sampled);
    PyObject *trace_id = NULL;
    int settled = settled_trace_id(record, self->getrandbits, self->root_parent, &trace_id);
    if (settled <= 0) {
        if (settled < 0) {
            return -1;
        }
        /* the caller's traceparent: read by the Python method */
        PyObject *answer = PyObject_CallOneArg(self->head_sampled, record);
        int truth = answer == NULL ? -1 : PyObject_IsTrue(answer);
        Py_XDECREF(answer);
        return truth;
    }
    int decision = -1;
    PyObject *parent = get_attr(record, str_parent);
    if (parent == NULL) {
        goto done;
    }
    PyObject *parent_sampled = PyTuple_Check(parent) && PyTuple_GET_SIZE(parent) == 3
                                   ? PyTuple_GET_ITEM(parent, 1)
                                   : Py_None;
    if (self->parent_based && parent_sampled != Py_None) {
        decision = PyObject_IsTrue(parent_sampled); /* Sampler.sampled: the caller's flag */
    }
    else {
        unsigned long long low = PyLong_AsUnsignedLongLongMask(trace_id); /* trace id & MAX_64 */
        decision = low == (unsigned long long)-1 && PyErr_Occurred()
                       ? -1
                       : (self->bound_all || low < self->bound);
    }
    Py_DECREF(parent);
    if (decision >= 0 && set_attr(record, str_sampled, decision ? Py_True : Py_False) < 0) {
        decision = -1;
    }
done:
    Py_DECREF(trace_id);
    return decision;
}

/* ``_keep_trace``'s test: 1 when the request is to be kept (then the step runs). */
static int
is_kept(Finisher *self, PyObject *record)
{
    int truth;
    if ((truth = attr_true(record, str_foreign)) != 0) {
        return truth < 0 ? -1 : 0; /* another instrumentation exports its server span */
    }
    if ((truth = attr_true(record, str_findings)) != 0 ||
        (truth = attr_true(record, str_error_type)) != 0) {
        return truth;
    }
    double status = attr_double(record, str_status, 0.0);
    if (status == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    if (status >= 500) {
        return 1;
    }
    return head_sampled(self, record);
}

static PyObject *
Finisher_vectorcall(Finisher *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "finish(record)");
        return NULL;
    }
    PyObject *record = args[0];
    int done = attr_true(record, str_done);
    if (done != 0) {
        if (done < 0) {
            step_failed(self, self->where_metrics);
            return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
        }
        Py_RETURN_NONE;
    }
    if (set_attr(record, str_done, Py_True) < 0) {
        goto failed_early;
    }
    if (PyDict_DelItem(self->inflight, record) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
            goto failed_early;
        }
        PyErr_Clear();
    }
    double start = attr_double(record, str_start, 0.0);
    if (start == -1.0 && PyErr_Occurred()) {
        goto failed_early;
    }
    PyObject *end_value = get_attr(record, str_end);
    if (end_value == NULL) {
        goto failed_early;
    }
    if (end_value == Py_None) {
        Py_SETREF(end_value, PyObject_CallNoArgs(self->perf_counter));
        if (end_value == NULL || set_attr(record, str_end, end_value) < 0) {
            Py_XDECREF(end_value);
            goto failed_early;
        }
    }
    double end = PyFloat_AsDouble(end_value);
    Py_DECREF(end_value);
    if (end == -1.0 && PyErr_Occurred()) {
        goto failed_early;
    }

    if (request_metrics(self, record, end - start) < 0) {
        step_failed(self, self->where_metrics);
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    if (step_if(self, is_slow(self, record, start, end), self->detect_slow, record,
                self->where_slow) < 0) {
        return NULL;
    }
    if (self->profile != Py_None &&
        step_if(self, attr_true(record, str_profile), self->profile, record,
                self->where_profile) < 0) {
        return NULL;
    }
    if (step_if(self, attr_true(record, str_queries), self->nplusone, record,
                self->where_nplusone) < 0) {
        return NULL;
    }
    if (step_if(self, is_kept(self, record), self->keep, record, self->where_keep) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
failed_early:
    step_failed(self, self->where_metrics);
    return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
}

/* Every object a Finisher holds, for new, traverse and clear. */
#define FINISHER_OBJECTS(X)                                                                   \
    X(inflight) X(perf_counter) X(stats) X(observe_queries) X(query_bounds)                  \
    X(slow_routes) X(detect_slow) X(profile) X(nplusone) X(keep) X(head_sampled) X(on_error) \
    X(where_metrics) X(where_slow) X(where_profile) X(where_nplusone) X(where_keep)        \
    X(getrandbits) X(root_parent)

/* A tuple of numbers, ascending, into ``bounds``; -1 with an error set if it is not one. */
static int
read_bounds(PyObject *tuple, Bounds *bounds)
{
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) >= MAX_BOUNDS) {
        PyErr_SetString(PyExc_TypeError, "bounds: a tuple of at most 31 numbers");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); i++) {
        bounds->bounds[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(tuple, i));
        if (bounds->bounds[i] == -1.0 && PyErr_Occurred()) {
            return -1;
        }
    }
    bounds->width = PyTuple_GET_SIZE(tuple) + 1;
    return 0;
}

static PyObject *
Finisher_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"inflight", "perf_counter", "stats", "observe_queries",
                            "query_bounds", "slow_routes", "detect_slow", "profile", "nplusone",
                            "keep", "head_sampled", "on_error", "where_metrics", "where_slow",
                            "where_profile", "where_nplusone", "where_keep", "slow_s",
                            "duration_bounds", "count_bounds", "wait_bounds", "getrandbits",
                            "root_parent", "sample_bound", "parent_based", NULL};
    PyObject *o[19], *duration, *count, *wait, *bound;
    double slow_s;
    int parent_based;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "$O!OOOO!OOOOOOOUUUUUdO!O!O!OO!O!p:Finisher", names, &PyDict_Type,
            &o[0], &o[1], &o[2], &o[3], &PyTuple_Type, &o[4], &o[5], &o[6], &o[7], &o[8], &o[9],
            &o[10], &o[11], &o[12], &o[13], &o[14], &o[15], &o[16], &slow_s, &PyTuple_Type,
            &duration, &PyTuple_Type, &count, &PyTuple_Type, &wait, &o[17], &PyTuple_Type, &o[18],
            &PyLong_Type, &bound, &parent_based)) {
        return NULL;
    }
    /* Sampler.bound is 0 .. 2**64: below 2**64 a C integer, at 2**64 "all". */
    int overflow = PyLong_AsUnsignedLongLong(bound) == (unsigned long long)-1 && PyErr_Occurred();
    PyErr_Clear();
    unsigned long long bound_value = overflow ? 0 : PyLong_AsUnsignedLongLong(bound);
    if (_PyLong_Sign(bound) < 0) {
        PyErr_SetString(PyExc_ValueError, "sample_bound: 0 to 2**64");
        return NULL;
    }
    if (o[5] != Py_None && !PyDict_Check(o[5])) {
        PyErr_SetString(PyExc_TypeError, "slow_routes: a dict or None");
        return NULL;
    }
    Finisher *self = (Finisher *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)Finisher_vectorcall;
    self->slow_s = slow_s;
    self->bound = bound_value;
    self->bound_all = overflow;
    self->parent_based = parent_based;
    int i = 0;
#define TAKE(name) self->name = Py_NewRef(o[i++]);
    FINISHER_OBJECTS(TAKE)
#undef TAKE
    if (read_bounds(duration, &self->duration) < 0 || read_bounds(count, &self->count) < 0 ||
        read_bounds(wait, &self->wait) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

GC_METHODS(Finisher, FINISHER_OBJECTS)

CALLABLE_TYPE(Finisher,
              "finish(record): Agent.finish for the common case (perfagent/agent.py).",
              .tp_new = Finisher_new)

/* ---------------------------------------------------------------------------
 * NPlusOneReporter: ``NPlusOneDetector.__call__`` and ``_report`` for a finding
 * seen before (perfagent/detectors/nplusone.py), in C: group the request's
 * queries (``_speedups.repeats``), and for each group its summary, the cached
 * finding (made by the Python ``_finding`` when new), the log line, the
 * counter, and, when the finding is due for export, the Python ``_send``.
 */

#define KEY_PARTS 10 /* of a finding's key: see NPlusOneReporter.last_parts */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *repeats;        /* _speedups.repeats */
    PyObject *summary;        /* _speedups.summary */
    PyObject *python_summary; /* nplusone._summary: where the C one returns NotImplemented */
    PyObject *findings;       /* dict: key -> _Finding */
    PyObject *make_finding;   /* NPlusOneDetector._finding */
    PyObject *send;           /* NPlusOneDetector._send */
    PyObject *stats;          /* RequestStats: counters in the thread's buffer */
    PyObject *fresh;          /* Agent.fresh */
    PyObject *recent;         /* Agent._recent: finding key -> [last exported, repeats since] */
    PyObject *getrandbits;
    PyObject *root_parent;
    PyObject *minimum;        /* int */
    PyObject *hex32;          /* "032x" */
    PyObject *kind_n_plus_one, *kind_duplicate;
    /* The last group's key parts (kind, route, method, fingerprint, system, lazy, and
     * the code and line of its first and last app sites) and its finding: an N+1
     * route repeats one group request after request, and an identical set of parts
     * spares the key tuple of ten, its hash and the dict lookup (~1,900 CPU
     * instructions a request). Held, so that no part's address is reused. */
    PyObject *last_parts[KEY_PARTS];
    PyObject *last_finding;
    Py_ssize_t min;
    double repeat_every; /* REPEAT_EVERY_S */
} NPlusOneReporter;

static PyObject *clock_now(void);

/* ``Agent.fresh(key)`` where it returns None (the finding was exported less than
 * ``REPEAT_EVERY_S`` ago: this one is folded into the next export's repeats), done
 * here: a new reference to None. NULL without an error where the Python ``fresh``
 * is to decide; NULL with one on failure. On the N+1 route this is every request
 * but one per 10 s: ~2,500 CPU instructions a request for the Python call. */
static PyObject *
folded(NPlusOneReporter *self, PyObject *key)
{
    PyObject *seen = PyDict_GetItemWithError(self->recent, key);
    if (seen == NULL || !PyList_CheckExact(seen) || PyList_GET_SIZE(seen) != 2 ||
        !PyFloat_CheckExact(PyList_GET_ITEM(seen, 0))) {
        return NULL;
    }
    PyObject *now = clock_now();
    if (now == NULL) {
        return NULL;
    }
    double since = PyFloat_AsDouble(now) - PyFloat_AS_DOUBLE(PyList_GET_ITEM(seen, 0));
    Py_DECREF(now);
    if (!(since < self->repeat_every)) {
        return NULL;
    }
    PyObject *more = PyNumber_Add(PyList_GET_ITEM(seen, 1), one);
    if (more == NULL || PyList_SetItem(seen, 1, more) < 0) { /* SetItem takes more */
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ``round(ms, 3)`` without the call; a new float, or NULL with an error set.
 *
 * Mostly as ``ms * 1000`` to the nearest whole number, over 1000: under 1e9 the
 * product is off the exact one by less than 2**-23, so unless it lies within 1e-6 of
 * a half it rounds to the whole number the exact value rounds to; and that number
 * over 1000, both exact, is divided with one rounding, to the float nearest the
 * decimal, as parsing its digits would give (~1,500 CPU instructions less per N+1
 * line). Else, as ``float.__round__`` does: the value written with three decimals
 * (correctly rounded digits) and read back. */
static PyObject *
round_ms(double ms)
{
    double scaled = ms * 1000.0;
    if (fabs(scaled) < 1e9) {
        double whole = floor(scaled), fraction = scaled - whole;
        if (fabs(fraction - 0.5) > 1e-6) {
            double rounded = (fraction > 0.5 ? whole + 1.0 : whole) / 1000.0;
            return PyFloat_FromDouble(rounded == 0.0 ? copysign(0.0, ms) : rounded);
        }
    }
    char *text = PyOS_double_to_string(ms, 'f', 3, 0, NULL);
    if (text == NULL) {
        return NULL;
    }
    double rounded = PyOS_string_to_double(text, NULL, NULL);
    PyMem_Free(text);
    return rounded == -1.0 && PyErr_Occurred() ? NULL : PyFloat_FromDouble(rounded);
}

/* ``f"{value:032x}"`` for an int from 0 to 2**128 - 1, written here (``format()``
 * took ~4,500 CPU instructions of the N+1 route's ~25,000 a request); OverflowError
 * (or TypeError) for anything else. */
static PyObject *
hex128(PyObject *value)
{
    if (!PyLong_CheckExact(value) || _PyLong_Sign(value) < 0) {
        PyErr_SetString(PyExc_OverflowError, "not an id");
        return NULL;
    }
    unsigned char bytes[16]; /* big-endian: the first byte gives the first two digits */
#if PY_VERSION_HEX >= 0x030D0000
    int failed = _PyLong_AsByteArray((PyLongObject *)value, bytes, 16, 0, 0, 1);
#else
    int failed = _PyLong_AsByteArray((PyLongObject *)value, bytes, 16, 0, 0);
#endif
    if (failed) { /* OverflowError: 2**128 or more */
        return NULL;
    }
    static const char digits[] = "0123456789abcdef";
    char text[32];
    for (int i = 0; i < 16; i++) {
        text[2 * i] = digits[bytes[i] >> 4];
        text[2 * i + 1] = digits[bytes[i] & 15];
    }
    return PyUnicode_FromStringAndSize(text, 32);
}

/* ``record.trace_id``: 32 hex digits, the id drawn here as in ``settled_trace_id()``
 * when the request has none yet and no caller's ``traceparent``; a new reference. */
static PyObject *
trace_hex(NPlusOneReporter *self, PyObject *record)
{
    PyObject *trace_id = NULL;
    int settled = settled_trace_id(record, self->getrandbits, self->root_parent, &trace_id);
    if (settled <= 0) { /* the caller's traceparent: read by the Python property */
        return settled < 0 ? NULL : get_attr(record, str_trace_id_property);
    }
    PyObject *text = hex128(trace_id);
    if (text == NULL && PyErr_ExceptionMatches(PyExc_OverflowError)) {
        PyErr_Clear();
        text = PyObject_Format(trace_id, self->hex32);
    }
    Py_DECREF(trace_id);
    return text;
}

/* ``stats.count(counter)``: one more in the thread's buffer. */
static int
count_in_buffer(PyObject *stats, PyObject *counter)
{
    PyObject *buffer = thread_buffer(stats);
    PyObject *counts = buffer == NULL ? NULL : get_attr(buffer, str_counts);
    Py_XDECREF(buffer);
    if (counts == NULL) {
        return -1;
    }
    int result = -1;
    PyObject *entry = PyDict_GetItemWithError(counts, counter);
    if (entry == NULL) {
        if (!PyErr_Occurred() && (entry = PyList_New(1)) != NULL) {
            PyList_SET_ITEM(entry, 0, Py_NewRef(one));
            result = PyDict_SetItem(counts, counter, entry);
            Py_DECREF(entry);
        }
    }
    else if (PyList_CheckExact(entry) && PyList_GET_SIZE(entry) == 1) {
        result = list_increment(entry, 0);
    }
    else {
        PyErr_SetString(PyExc_TypeError, "not a perfagent counter entry");
    }
    Py_DECREF(counts);
    return result;
}

/* The code and line of a site (None and 0 for no site), borrowed; -1 with an error
 * set for what is not a (code, offset, line) site. */
static int
site_parts(PyObject *site, PyObject **code, PyObject **line)
{
    if (site == NULL) {
        *code = Py_None;
        *line = zero;
        return 0;
    }
    if (!PyTuple_Check(site) || PyTuple_GET_SIZE(site) < 3) {
        PyErr_SetString(PyExc_TypeError, "expected (code, ..., line) sites");
        return -1;
    }
    *code = PyTuple_GET_ITEM(site, 0);
    *line = PyTuple_GET_ITEM(site, 2);
    return 0;
}

/* The finding of a group whose key parts are ``parts``: the last one when the parts
 * are the last group's, else ``findings[key]`` or, for a new key, ``make_finding``'s;
 * the key is ``parts`` with each site's code as its id. A new reference, or NULL. */
static PyObject *
finding_of(NPlusOneReporter *self, PyObject **parts, PyObject *record, PyObject *fingerprint,
           PyObject *first, PyObject *lazy)
{
    int same = self->last_finding != NULL;
    for (int i = 0; same && i < KEY_PARTS; i++) {
        same = parts[i] == self->last_parts[i];
    }
    if (same) {
        return Py_NewRef(self->last_finding);
    }
    PyObject *inner_id = PyLong_FromVoidPtr(parts[6]), *last_id = PyLong_FromVoidPtr(parts[8]);
    PyObject *key = inner_id == NULL || last_id == NULL
                        ? NULL
                        : PyTuple_Pack(KEY_PARTS, parts[0], parts[1], parts[2], parts[3], parts[4],
                                       parts[5], inner_id, parts[7], last_id, parts[9]);
    Py_XDECREF(inner_id);
    Py_XDECREF(last_id);
    if (key == NULL) {
        return NULL;
    }
    PyObject *finding = PyDict_GetItemWithError(self->findings, key);
    Py_DECREF(key);
    if (finding != NULL) {
        Py_INCREF(finding);
    }
    else if (!PyErr_Occurred()) {
        PyObject *args[5] = {parts[0], record, fingerprint, first, lazy};
        finding = PyObject_Vectorcall(self->make_finding, args, 5, NULL);
    }
    if (finding == NULL) {
        return NULL;
    }
    if (!PyTuple_Check(finding) || PyTuple_GET_SIZE(finding) < 7) {
        PyErr_SetString(PyExc_TypeError, "expected a _Finding");
        Py_DECREF(finding);
        return NULL;
    }
    /* The finding goes first, so that no moment sees the new parts with the old one
     * (releasing an old part may run Python code). */
    Py_CLEAR(self->last_finding);
    for (int i = 0; i < KEY_PARTS; i++) {
        Py_XSETREF(self->last_parts[i], Py_NewRef(parts[i]));
    }
    self->last_finding = Py_NewRef(finding);
    return finding;
}

/* One group of repeats: the finding, its line, its counter, and its export when due. */
static int
report(NPlusOneReporter *self, PyObject *record, PyObject *route, PyObject *method,
       PyObject *fingerprint, PyObject *group)
{
    int result = -1;
    PyObject *summary = NULL, *finding = NULL, *total_ms = NULL, *trace = NULL, *line = NULL,
             *repeats = NULL, *sites = NULL, *system = NULL;
    summary = PyObject_CallOneArg(self->summary, group);
    if (summary == Py_NotImplemented) { /* parameters it cannot hash */
        Py_SETREF(summary, PyObject_CallOneArg(self->python_summary, group));
    }
    if (summary == NULL) {
        goto done;
    }
    if (!PyTuple_Check(summary) || PyTuple_GET_SIZE(summary) != 4 || !PyList_Check(group) ||
        PyList_GET_SIZE(group) == 0) {
        PyErr_SetString(PyExc_TypeError, "unexpected summary or group");
        goto done;
    }
    PyObject *distinct = PyTuple_GET_ITEM(summary, 0), *lazy = PyTuple_GET_ITEM(summary, 2);
    int same = PyObject_IsTrue(PyTuple_GET_ITEM(summary, 1));
    if (same < 0) {
        goto done;
    }
    PyObject *kind = same ? self->kind_duplicate : self->kind_n_plus_one;
    PyObject *first = PyList_GET_ITEM(group, 0);
    if ((sites = query_field(first, 7)) == NULL || (system = query_field(first, 0)) == NULL) {
        goto done;
    }
    Py_ssize_t nsites = PyTuple_Check(sites) ? PyTuple_GET_SIZE(sites) : 0;
    PyObject *parts[KEY_PARTS] = {kind, route, method, fingerprint, system, lazy};
    if (site_parts(nsites ? PyTuple_GET_ITEM(sites, 0) : NULL, &parts[6], &parts[7]) < 0 ||
        site_parts(nsites ? PyTuple_GET_ITEM(sites, nsites - 1) : NULL, &parts[8], &parts[9]) < 0 ||
        (finding = finding_of(self, parts, record, fingerprint, first, lazy)) == NULL) {
        goto done;
    }
    PyObject *count = PyLong_FromSsize_t(PyList_GET_SIZE(group));
    if (count == NULL) {
        goto done;
    }
    double seconds = PyFloat_AsDouble(PyTuple_GET_ITEM(summary, 3));
    total_ms = seconds == -1.0 && PyErr_Occurred() ? NULL : round_ms(seconds * 1000.0);
    trace = total_ms == NULL ? NULL : trace_hex(self, record);
    if (trace == NULL) {
        Py_DECREF(count);
        goto done;
    }
    PyObject *emit_args[4] = {count, total_ms, trace, distinct};
    line = PyObject_Vectorcall(PyTuple_GET_ITEM(finding, 5), emit_args, 4, NULL);
    if (line == NULL) {
        Py_DECREF(count);
        goto done;
    }
    PyObject *counter = PyTuple_GET_ITEM(finding, 4);
    if (counter != Py_None && count_in_buffer(self->stats, counter) < 0) {
        Py_DECREF(count);
        goto done;
    }
    repeats = folded(self, PyTuple_GET_ITEM(finding, 6));
    if (repeats == NULL && !PyErr_Occurred()) {
        repeats = PyObject_CallOneArg(self->fresh, PyTuple_GET_ITEM(finding, 6));
    }
    if (repeats != NULL && repeats != Py_None) { /* due for export: the Python _send */
        PyObject *args[10] = {record,   kind,     finding, fingerprint, count,
                              total_ms, trace,    distinct, first,      repeats};
        PyObject *none = PyObject_Vectorcall(self->send, args, 10, NULL);
        if (none == NULL) {
            Py_DECREF(count);
            goto done;
        }
        Py_DECREF(none);
    }
    Py_DECREF(count);
    result = repeats == NULL ? -1 : 0;
done:
    Py_XDECREF(summary);
    Py_XDECREF(finding);
    Py_XDECREF(total_ms);
    Py_XDECREF(trace);
    Py_XDECREF(line);
    Py_XDECREF(repeats);
    Py_XDECREF(sites);
    Py_XDECREF(system);
    return result;
}

static PyObject *
NPlusOneReporter_vectorcall(NPlusOneReporter *self, PyObject *const *args, size_t nargsf,
                            PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "detector(record)");
        return NULL;
    }
    PyObject *record = args[0];
    PyObject *queries = get_attr(record, str_queries);
    if (queries == NULL) {
        return NULL;
    }
    if (!PyList_Check(queries) || PyList_GET_SIZE(queries) < self->min) {
        Py_DECREF(queries);
        Py_RETURN_NONE;
    }
    PyObject *call[2] = {queries, self->minimum};
    PyObject *groups = PyObject_Vectorcall(self->repeats, call, 2, NULL);
    Py_DECREF(queries);
    if (groups == NULL) {
        return NULL;
    }
    PyObject *route = NULL, *method = NULL, *result = NULL;
    if (!PyList_Check(groups)) {
        PyErr_SetString(PyExc_TypeError, "repeats() must return a list");
        goto done;
    }
    if (PyList_GET_SIZE(groups) == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if ((route = get_attr(record, str_route)) == NULL ||
        (method = get_attr(record, str_method)) == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(groups); i++) {
        PyObject *item = PyList_GET_ITEM(groups, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "repeats() gives (fingerprint, group) pairs");
            goto done;
        }
        if (report(self, record, route, method, PyTuple_GET_ITEM(item, 0),
                   PyTuple_GET_ITEM(item, 1)) < 0) {
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    Py_DECREF(groups);
    Py_XDECREF(route);
    Py_XDECREF(method);
    return result;
}

/* The members given to the constructor, in its keywords' order, then the others. */
#define NPLUSONE_GIVEN(X)                                                                  \
    X(repeats) X(summary) X(python_summary) X(findings) X(make_finding) X(send) X(stats) \
    X(fresh) X(recent) X(getrandbits) X(root_parent) X(minimum)
#define NPLUSONE_OBJECTS(X)                                                                  \
    NPLUSONE_GIVEN(X) X(hex32) X(kind_n_plus_one) X(kind_duplicate) X(last_finding)          \
    X(last_parts[0]) X(last_parts[1]) X(last_parts[2]) X(last_parts[3]) X(last_parts[4])     \
    X(last_parts[5]) X(last_parts[6]) X(last_parts[7]) X(last_parts[8]) X(last_parts[9])

static PyObject *
NPlusOneReporter_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"repeats",      "summary", "python_summary", "findings",
                            "make_finding", "send",    "stats",          "fresh",
                            "recent",       "getrandbits", "root_parent", "minimum",
                            "repeat_every", NULL};
    PyObject *o[12];
    double repeat_every;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOOO!OOOOO!OO!O!d:NPlusOneReporter", names,
                                     &o[0], &o[1], &o[2], &PyDict_Type, &o[3], &o[4], &o[5],
                                     &o[6], &o[7], &PyDict_Type, &o[8], &o[9], &PyTuple_Type,
                                     &o[10], &PyLong_Type, &o[11], &repeat_every)) {
        return NULL;
    }
    Py_ssize_t min = PyLong_AsSsize_t(o[11]);
    if (min == -1 && PyErr_Occurred()) {
        return NULL;
    }
    NPlusOneReporter *self = (NPlusOneReporter *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)NPlusOneReporter_vectorcall;
    self->min = min;
    self->repeat_every = repeat_every;
    int i = 0;
#define TAKE(name) self->name = Py_NewRef(o[i++]);
    NPLUSONE_GIVEN(TAKE)
#undef TAKE
    self->hex32 = PyUnicode_FromString("032x");
    self->kind_n_plus_one = PyUnicode_FromString("n_plus_one");
    self->kind_duplicate = PyUnicode_FromString("duplicate_query");
    if (self->hex32 == NULL || self->kind_n_plus_one == NULL || self->kind_duplicate == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

GC_METHODS(NPlusOneReporter, NPLUSONE_OBJECTS)

CALLABLE_TYPE(NPlusOneReporter,
              "detector(record): the N+1 detector's common case (detectors/nplusone.py).",
              .tp_new = NPlusOneReporter_new)

/* ---------------------------------------------------------------------------
 * The ASGI adapter's start and end of a request (perfagent/frameworks/asgi.py):
 * ``AsgiBegin`` is ``_PythonBegin``, ``AsgiRequest`` is ``_Request`` (the send
 * wrapper), ``end_request`` is ``_python_end``. What they do is said there.
 */

static PyObject *str_type, *str_http, *str_other, *str_resolver, *str_running, *str_thread,
    *str_ensure_started, *str_internal_error, *str_fastapi_telemetry, *str_http_body,
    *str_http_start, *str_more_body, *str_response_start, *str_headers, *str_server_timing,
    *str_asgi_start, *str_asgi_response_start, *str_asgi_end, *str_enter, *str_exit,
    *str_finish, *str_empty;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *record;
    PyObject *send;
    PyObject *resolve;
    PyObject *agent;
    PyObject *current;       /* the record's ContextVar */
    /* current's value before the request, set again at its end (a reset would need
     * the set's token, one more object the collector counts while the request
     * runs: see Recycler); NULL when the record was not set. */
    PyObject *previous;
    PyObject *otel;          /* OtelBridge, when its context was entered */
    PyObject *otel_variable; /* its ContextVar, or None: then otel.exit(otel_token) */
    PyObject *otel_previous; /* OpenTelemetry's context before, set again at the end */
    PyObject *otel_token;    /* otel.enter()'s token, or the set's where none was current */
    int server_timing;
} AsgiRequest;

/* ``agent.internal_error(where, <the pending exception>)``; clears it; never fails. */
static void
agent_error(PyObject *agent, PyObject *where)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL) {
        PyObject *args[3] = {agent, where, value};
        PyObject *none = PyObject_VectorcallMethod(str_internal_error, args,
                                                   3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_XDECREF(none);
        PyErr_Clear();
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
}

/* perf_counter() as a float object (the adapters' clock: record.start is one). */
static PyObject *perf_counter_fn;

static PyObject *
clock_now(void)
{
    return PyObject_CallNoArgs(perf_counter_fn);
}

/* Appends ``ms`` with three decimals to ``out``; returns the end. As ``f"{ms:.3f}"``
 * but for a value within an ulp or so of a half-thousandth, whose last digit may be
 * the other one (``ms * 1000.0`` rounds once before the digit is chosen). Written here: ``PyOS_double_to_string`` and
 * ``PyBytes_FromFormat`` took ~3,000 CPU instructions a request for the two numbers.
 * A value out of range (negative, not finite, 10**15 ms or more) is written as 0.000. */
static char *
put_ms(char *out, double ms)
{
    unsigned long long thousandths =
        ms >= 0.0 && ms < 1e15 ? (unsigned long long)(ms * 1000.0 + 0.5) : 0;
    out = put_digits(out, thousandths / 1000, 1);
    *out++ = '.';
    return put_digits(out, thousandths % 1000, 3);
}

/* ``total;dur=<ms>`` and, with queries, ``, db;dur=<ms>;desc="<n> queries"``
 * (``"1 query"``). */
static PyObject *
server_timing_value(PyObject *record, double now)
{
    double start = attr_double(record, str_start, 0.0);
    if (start == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *queries = get_attr(record, str_queries);
    if (queries == NULL) {
        return NULL;
    }
    Py_ssize_t past_count;
    double past_duration;
    PyObject *past = calls_past_cap(record, &past_count, &past_duration);
    if (past == NULL) {
        Py_DECREF(queries);
        return NULL;
    }
    Py_DECREF(past);
    char text[128]; /* the longest: 3 numbers of at most 21 characters, 42 of text */
    char *end = put_ms(memcpy(text, "total;dur=", 10) + 10, (now - start) * 1000.0);
    Py_ssize_t n = PyList_Check(queries) ? PyList_GET_SIZE(queries) : 0;
    if (n > 0) {
        double seconds = past_duration; /* record.db_time: the queries' durations, summed */
        /* The size read again: a query that is not ours is read by its __getitem__. */
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(queries); i++) {
            double duration = query_duration(PyList_GET_ITEM(queries, i));
            if (duration == -1.0 && PyErr_Occurred()) {
                Py_DECREF(queries);
                return NULL;
            }
            seconds += duration;
        }
        end = put_ms(memcpy(end, ", db;dur=", 9) + 9, seconds * 1000.0);
        Py_ssize_t count = n + past_count;
        end = put_digits(memcpy(end, ";desc=\"", 7) + 7, (unsigned long long)count, 1);
        end = count == 1 ? (char *)memcpy(end, " query\"", 7) + 7
                         : (char *)memcpy(end, " queries\"", 9) + 9;
    }
    Py_DECREF(queries);
    return PyBytes_FromStringAndSize(text, end - text);
}

/* The response starts: its time, status, route, and the Server-Timing header. */
static int
response_start(AsgiRequest *self, PyObject *message)
{
    PyObject *record = self->record;
    PyObject *now = clock_now();
    if (now == NULL || set_attr(record, str_response_start, now) < 0) {
        Py_XDECREF(now);
        return -1;
    }
    double at = PyFloat_AsDouble(now);
    Py_DECREF(now);
    PyObject *status = PyObject_GetItem(message, str_status);
    if (status == NULL || set_attr(record, str_status, status) < 0) {
        Py_XDECREF(status);
        return -1;
    }
    Py_DECREF(status);
    PyObject *route = get_attr(record, str_route);
    if (route == NULL) {
        return -1;
    }
    if (route == Py_None) {
        Py_SETREF(route, PyObject_CallOneArg(self->resolve, record));
        if (route == NULL) {
            return -1;
        }
        int truth = PyObject_IsTrue(route);
        if (truth <= 0) { /* resolve(record) or "" */
            Py_SETREF(route, Py_NewRef(str_empty));
        }
        if (truth < 0 || set_attr(record, str_route, route) < 0) {
            Py_DECREF(route);
            return -1;
        }
    }
    Py_DECREF(route);
    if (!self->server_timing) {
        return 0;
    }
    PyObject *value = server_timing_value(record, at);
    if (value == NULL) {
        return -1;
    }
    PyObject *pair = PyTuple_Pack(2, str_server_timing, value);
    Py_DECREF(value);
    if (pair == NULL) {
        return -1;
    }
    PyObject *given = PyMapping_Check(message) ? PyObject_GetItem(message, str_headers) : NULL;
    PyObject *headers;
    if (given == NULL) {
        PyErr_Clear(); /* no headers: the list is ours alone */
        headers = PyList_New(0);
    }
    else {
        headers = PySequence_List(given); /* [*message.get("headers", ()), pair] */
        Py_DECREF(given);
    }
    int failed = headers == NULL || PyList_Append(headers, pair) < 0 ||
                 PyObject_SetItem(message, str_headers, headers) < 0;
    Py_DECREF(pair);
    Py_XDECREF(headers);
    return failed ? -1 : 0;
}

/* A body message: the first byte's time, and the end's at the last one. */
static int
response_body(AsgiRequest *self, PyObject *message)
{
    PyObject *record = self->record;
    int more = 0;
    PyObject *flag = PyDict_Check(message) ? PyDict_GetItemWithError(message, str_more_body)
                                           : NULL;
    if (flag != NULL) {
        more = PyObject_IsTrue(flag);
    }
    if (more < 0 || PyErr_Occurred()) {
        return -1;
    }
    PyObject *first = get_attr(record, str_first_byte);
    if (first == NULL) {
        return -1;
    }
    int unset = first == Py_None;
    Py_DECREF(first);
    if (!more) {
        PyObject *end = clock_now();
        int failed = end == NULL || set_attr(record, str_end, end) < 0 ||
                     (unset && set_attr(record, str_first_byte, end) < 0);
        Py_XDECREF(end);
        return failed ? -1 : 0;
    }
    if (unset) {
        PyObject *now = clock_now();
        int failed = now == NULL || set_attr(record, str_first_byte, now) < 0 ||
                     set_attr(record, str_streaming, Py_True) < 0;
        Py_XDECREF(now);
        return failed ? -1 : 0;
    }
    return 0;
}

static PyObject *
AsgiRequest_vectorcall(AsgiRequest *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        return PyObject_Vectorcall(self->send, args, nargsf, kwnames); /* not ours to judge */
    }
    PyObject *message = args[0];
    PyObject *kind = PyDict_Check(message) ? PyDict_GetItemWithError(message, str_type) : NULL;
    if (kind != NULL && PyUnicode_Check(kind)) {
        if (PyUnicode_Compare(kind, str_http_body) == 0) {
            if (response_body(self, message) < 0) {
                agent_error(self->agent, str_asgi_response_start);
            }
        }
        else if (PyUnicode_Compare(kind, str_http_start) == 0) {
            if (response_start(self, message) < 0) {
                agent_error(self->agent, str_asgi_response_start);
            }
        }
    }
    if (PyErr_Occurred()) {
        agent_error(self->agent, str_asgi_response_start);
    }
    return PyObject_CallOneArg(self->send, message);
}

#define ASGIREQUEST_OBJECTS(X)                                                              \
    X(record) X(send) X(resolve) X(agent) X(current) X(previous) X(otel) X(otel_variable) \
    X(otel_previous) X(otel_token)

RECYCLED_GC_METHODS(AsgiRequest, ASGIREQUEST_OBJECTS, spare_requests)

static PyMemberDef AsgiRequest_members[] = {
    {"record", T_OBJECT_EX, offsetof(AsgiRequest, record), READONLY, "The request's record."},
    {NULL},
};

CALLABLE_TYPE(AsgiRequest,
              "One request's send wrapper (perfagent/frameworks/asgi.py: _Request).",
              .tp_members = AsgiRequest_members)

/* ---------------------------------------------------------------------------
 * RouteResolver: ``RouteTemplates._resolve(record)`` (perfagent/frameworks/asgi.py)
 * for a route whose template is cached: the scope's matched route, its template
 * from the cache, the record's mount prefix before it. Anything else (no scope
 * dict, a route not cached yet) is the Python method's. Called once a request, at
 * the response's start; the two Python frames took ~1,300 CPU instructions.
 */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *cache;   /* RouteTemplates._cache: id(route) -> (route, template) */
    PyObject *resolve; /* RouteTemplates._resolve */
} RouteResolver;

static PyObject *str_mount_prefix;

static PyObject *
RouteResolver_vectorcall(RouteResolver *self, PyObject *const *args, size_t nargsf,
                         PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "resolve(record)");
        return NULL;
    }
    PyObject *record = args[0], *carrier = get_attr(record, str_carrier);
    if (carrier == NULL) {
        return NULL;
    }
    PyObject *template = NULL, *route = NULL;
    if (PyDict_CheckExact(carrier)) {
        route = PyDict_GetItemWithError(carrier, str_route);
        if (route == NULL) {
            Py_DECREF(carrier);
            return PyErr_Occurred() ? NULL : Py_NewRef(Py_None); /* nothing matched yet */
        }
        PyObject *key = PyLong_FromVoidPtr(route);
        PyObject *hit = key == NULL ? NULL : PyDict_GetItemWithError(self->cache, key);
        Py_XDECREF(key);
        if (hit != NULL && PyTuple_CheckExact(hit) && PyTuple_GET_SIZE(hit) == 2 &&
            PyTuple_GET_ITEM(hit, 0) == route && PyUnicode_CheckExact(PyTuple_GET_ITEM(hit, 1))) {
            template = Py_NewRef(PyTuple_GET_ITEM(hit, 1)); /* held: the cache may change */
        }
    }
    Py_DECREF(carrier);
    if (template == NULL) {
        return PyErr_Occurred() ? NULL : PyObject_CallOneArg(self->resolve, record);
    }
    if (PyUnicode_GET_LENGTH(template) == 0) {
        Py_DECREF(template);
        return Py_NewRef(str_empty);
    }
    PyObject *prefix = get_attr(record, str_mount_prefix);
    PyObject *full = prefix == NULL ? NULL
                     : PyUnicode_CheckExact(prefix) && PyUnicode_GET_LENGTH(prefix) == 0
                         ? Py_NewRef(template)
                         : PyNumber_Add(prefix, template);
    Py_XDECREF(prefix);
    Py_DECREF(template);
    return full;
}

static PyObject *
RouteResolver_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *cache, *resolve;
    static char *names[] = {"cache", "resolve", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O:RouteResolver", names, &PyDict_Type,
                                     &cache, &resolve)) {
        return NULL;
    }
    RouteResolver *self = (RouteResolver *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)RouteResolver_vectorcall;
    self->cache = Py_NewRef(cache);
    self->resolve = Py_NewRef(resolve);
    return (PyObject *)self;
}

#define ROUTERESOLVER_OBJECTS(X) X(cache) X(resolve)
GC_METHODS(RouteResolver, ROUTERESOLVER_OBJECTS)

CALLABLE_TYPE(RouteResolver,
              "resolve(record): the route template matched so far (frameworks/asgi.py).",
              .tp_new = RouteResolver_new)

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *agent;
    PyObject *current;
    PyObject *record_type;
    PyObject *known_methods; /* each known method -> itself */
    PyObject *resolve;
    PyObject *profile;          /* scope -> bool, or None without a profile token */
    PyObject *inflight;
    PyObject *get_running_loop; /* asyncio's */
    PyObject *tasks_by_loop;    /* asyncio.tasks._current_tasks where it exists, else None */
    PyObject *current_task;     /* asyncio.current_task, when there is no such dict */
    PyObject *stats;
    PyObject *otel;             /* OtelBridge or None */
    PyObject *otel_variable;    /* its ContextVar or None */
    PyObject *otel_shared;      /* its context holding the request span alone */
    int server_timing;
    int foreign;
} AsgiBegin;

/* ``asyncio.current_task()``, None outside a task; a new reference. */
static PyObject *
running_task(AsgiBegin *self)
{
    PyObject *task;
    if (self->tasks_by_loop != Py_None) {
        PyObject *loop = PyObject_CallNoArgs(self->get_running_loop);
        if (loop == NULL) {
            return NULL;
        }
        task = PyDict_GetItemWithError(self->tasks_by_loop, loop);
        task = task != NULL ? Py_NewRef(task) : PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
        Py_DECREF(loop); /* after: the task was borrowed from a dict the loop keys */
        return task;
    }
    return PyObject_CallNoArgs(self->current_task);
}

/* ``stats.started(method)``: one more request of ``method`` in flight. */
static int
count_started(PyObject *stats, PyObject *method)
{
    PyObject *buffer = thread_buffer(stats);
    if (buffer == NULL) {
        return -1;
    }
    PyObject *active = get_attr(buffer, str_active);
    Py_DECREF(buffer);
    if (active == NULL) {
        return -1;
    }
    int result = -1;
    PyObject *counts = PyDict_GetItemWithError(active, method);
    if (counts == NULL) {
        if (PyErr_Occurred() || (counts = PyList_New(2)) == NULL) {
            goto done;
        }
        PyList_SET_ITEM(counts, 0, PyLong_FromLong(0));
        PyList_SET_ITEM(counts, 1, PyLong_FromLong(0));
        int failed = PyDict_SetItem(active, method, counts);
        Py_DECREF(counts); /* the dict holds it */
        if (failed < 0) {
            goto done;
        }
    }
    if (!PyList_CheckExact(counts) || PyList_GET_SIZE(counts) != 2) {
        PyErr_SetString(PyExc_TypeError, "not a perfagent thread buffer");
        goto done;
    }
    result = list_increment(counts, 0);
done:
    Py_DECREF(active);
    return result;
}

/* OpenTelemetry's current context: the request span attached (``OtelBridge.enter``). */
static int
enter_otel(AsgiBegin *self, AsgiRequest *request)
{
    PyObject *token = NULL;
    if (self->otel_variable != Py_None) {
        PyObject *context = NULL;
        if (PyContextVar_Get(self->otel_variable, NULL, &context) < 0) {
            return -1;
        }
        int empty = context == NULL || (PyDict_Check(context) && PyDict_GET_SIZE(context) == 0);
        if (empty) { /* nothing current: the shared context, as enter() would attach */
            token = PyContextVar_Set(self->otel_variable, self->otel_shared);
            if (token == NULL) {
                Py_XDECREF(context);
                return -1;
            }
            if (context != NULL) { /* set again at the end: no token held meanwhile */
                Py_CLEAR(token);
                request->otel_previous = context;
                context = NULL;
            }
        }
        Py_XDECREF(context);
        if (request->otel_previous != NULL) {
            request->otel = Py_NewRef(self->otel);
            request->otel_variable = Py_NewRef(self->otel_variable);
            return 0;
        }
    }
    if (token == NULL) {
        token = PyObject_CallMethodNoArgs(self->otel, str_enter);
        if (token == NULL) {
            return -1;
        }
        if (token == Py_None) { /* another server span is current: nothing attached */
            Py_DECREF(token);
            return 0;
        }
    }
    request->otel_token = token;
    request->otel = Py_NewRef(self->otel);
    request->otel_variable = Py_NewRef(self->otel_variable);
    return 0;
}

/* The record for a request this adapter times; None (a new reference) when it does not. */
static PyObject *
new_record(AsgiBegin *self, PyObject *scope)
{
    PyObject *kind = PyObject_GetItem(scope, str_type);
    if (kind == NULL) {
        return NULL;
    }
    int http = PyUnicode_Check(kind) && PyUnicode_Compare(kind, str_http) == 0;
    Py_DECREF(kind);
    if (!http) {
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    }
    int running = attr_true(self->agent, str_running);
    if (running <= 0) {
        return running < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyObject *outer = NULL;
    if (PyContextVar_Get(self->current, Py_None, &outer) < 0) {
        return NULL;
    }
    if (outer != Py_None) {
        /* A mounted app, or a second instrumentation of the same app: the outer
         * adapter already counts this request. */
        int done = attr_true(outer, str_done);
        Py_DECREF(outer);
        if (done <= 0) {
            return done < 0 ? NULL : Py_NewRef(Py_None);
        }
    }
    else {
        Py_DECREF(outer);
    }
    PyObject *method = PyObject_GetItem(scope, str_method);
    if (method == NULL) {
        return NULL;
    }
    /* normalize_method, to the one str of each known method: the metric steps find
     * their entries by the identity of the label values (cached_entry). */
    PyObject *known = PyDict_GetItemWithError(self->known_methods, method);
    Py_SETREF(method, known != NULL        ? Py_NewRef(known)
                      : PyErr_Occurred() ? NULL
                                         : Py_NewRef(str_other));
    if (method == NULL) {
        return NULL;
    }
    PyObject *start = clock_now();
    if (start == NULL) {
        Py_DECREF(method);
        return NULL;
    }
    PyObject *record = make_record(self->record_type, method, start, scope);
    Py_DECREF(method);
    Py_DECREF(start);
    if (record == NULL || set_attr(record, str_resolver, self->resolve) < 0) {
        Py_XDECREF(record);
        return NULL;
    }
    int foreign = self->foreign ? 1 : PySequence_Contains(scope, str_fastapi_telemetry);
    if (foreign < 0 || (foreign && set_attr(record, str_foreign, Py_True) < 0)) {
        Py_DECREF(record);
        return NULL;
    }
    if (self->profile != Py_None) {
        PyObject *asked = PyObject_CallOneArg(self->profile, scope);
        if (asked == NULL || set_attr(record, str_profile, asked) < 0) {
            Py_XDECREF(asked);
            Py_DECREF(record);
            return NULL;
        }
        Py_DECREF(asked);
    }
    return record;
}

static PyObject *
AsgiBegin_vectorcall(AsgiBegin *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "begin(scope, send)");
        return NULL;
    }
    PyObject *scope = args[0], *send = args[1];
    PyObject *record = new_record(self, scope);
    if (record == NULL) { /* the agent's error, not the app's: the request goes untimed */
        agent_error(self->agent, str_asgi_start);
        Py_RETURN_NONE;
    }
    if (record == Py_None) {
        return record;
    }
    AsgiRequest *request = (AsgiRequest *)recycled_new(&spare_requests, &AsgiRequestType);
    if (request == NULL) {
        Py_DECREF(record);
        return NULL;
    }
    request->vectorcall = (vectorcallfunc)AsgiRequest_vectorcall;
    request->record = record;
    request->send = Py_NewRef(send);
    request->resolve = Py_NewRef(self->resolve);
    request->agent = Py_NewRef(self->agent);
    request->current = Py_NewRef(self->current);
    request->previous = request->otel = request->otel_variable = NULL;
    request->otel_previous = request->otel_token = NULL;
    request->server_timing = self->server_timing;
    PyObject_GC_Track(request);
    PyObject *previous = NULL;
    PyObject *token = PyContextVar_Get(self->current, Py_None, &previous) < 0
                          ? NULL
                          : PyContextVar_Set(self->current, record);
    if (token == NULL) {
        Py_XDECREF(previous);
        Py_DECREF(request);
        agent_error(self->agent, str_asgi_start);
        Py_RETURN_NONE;
    }
    Py_DECREF(token);
    request->previous = previous;
    /* From here the request is timed; what fails is counted and the rest goes on. */
    PyObject *where = NULL, *task = running_task(self);
    if (task == NULL) {
        PyErr_Clear(); /* outside a task: None, as asyncio.current_task() */
        task = Py_NewRef(Py_None);
    }
    PyObject *thread = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
    where = thread == NULL ? NULL : PyTuple_Pack(2, thread, task);
    Py_XDECREF(thread);
    Py_DECREF(task);
    if (where == NULL || PyDict_SetItem(self->inflight, record, where) < 0) {
        agent_error(self->agent, str_asgi_start);
    }
    Py_XDECREF(where);
    PyObject *agent_thread = get_attr(self->agent, str_thread);
    int started = agent_thread == NULL ? -1 : attr_true(agent_thread, str_running);
    if (started == 0) {
        PyObject *none = PyObject_CallMethodNoArgs(agent_thread, str_ensure_started);
        started = none == NULL ? -1 : 1;
        Py_XDECREF(none);
    }
    Py_XDECREF(agent_thread);
    if (started < 0) {
        agent_error(self->agent, str_asgi_start);
    }
    PyObject *method = get_attr(record, str_method);
    if (method == NULL || count_started(self->stats, method) < 0 ||
        (!self->foreign && self->otel != Py_None && enter_otel(self, request) < 0)) {
        agent_error(self->agent, str_asgi_start);
    }
    Py_XDECREF(method);
    return (PyObject *)request;
}

#define ASGIBEGIN_OBJECTS(X)                                                                  \
    X(agent) X(current) X(record_type) X(known_methods) X(resolve) X(profile) X(inflight) \
    X(get_running_loop) X(tasks_by_loop) X(current_task) X(stats) X(otel) X(otel_variable) \
    X(otel_shared)

static PyObject *
AsgiBegin_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"agent",         "current",       "record_type", "known_methods",
                            "resolve",       "profile",       "inflight",    "get_running_loop",
                            "tasks_by_loop", "current_task",  "stats",       "otel",
                            "otel_variable", "otel_shared",   "server_timing", "foreign",
                            NULL};
    PyObject *o[14];
    int server_timing, foreign;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OO!OO!OOO!OOOOOOOpp:AsgiBegin", names,
                                     &o[0], &PyContextVar_Type, &o[1], &o[2], &PyDict_Type,
                                     &o[3], &o[4], &o[5], &PyDict_Type, &o[6], &o[7], &o[8],
                                     &o[9], &o[10], &o[11], &o[12], &o[13], &server_timing,
                                     &foreign)) {
        return NULL;
    }
    if ((o[8] != Py_None && !PyDict_Check(o[8])) ||
        (o[12] != Py_None && !PyContextVar_CheckExact(o[12]))) {
        PyErr_SetString(PyExc_TypeError, "tasks_by_loop: a dict or None; otel_variable: a "
                                         "ContextVar or None");
        return NULL;
    }
    AsgiBegin *self = (AsgiBegin *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)AsgiBegin_vectorcall;
    self->server_timing = server_timing;
    self->foreign = foreign;
    int i = 0;
#define TAKE(name) self->name = Py_NewRef(o[i++]);
    ASGIBEGIN_OBJECTS(TAKE)
#undef TAKE
    return (PyObject *)self;
}

GC_METHODS(AsgiBegin, ASGIBEGIN_OBJECTS)

CALLABLE_TYPE(AsgiBegin,
              "begin(scope, send): a request's AsgiRequest, or None (asgi.py: _PythonBegin).",
              .tp_new = AsgiBegin_new)

/* ``end_request(request)``: the contexts reset, the route settled, ``agent.finish``. */
static PyObject *
end_request(PyObject *module, PyObject *arg)
{
    if (!Py_IS_TYPE(arg, &AsgiRequestType)) {
        PyErr_SetString(PyExc_TypeError, "end_request(an AsgiRequest)");
        return NULL;
    }
    AsgiRequest *request = (AsgiRequest *)arg;
    PyObject *record = request->record;
    if (request->otel_previous != NULL) {
        PyObject *token = PyContextVar_Set(request->otel_variable, request->otel_previous);
        if (token == NULL) {
            PyErr_Clear(); /* as OtelBridge.exit */
        }
        Py_XDECREF(token);
        Py_CLEAR(request->otel_previous);
    }
    else if (request->otel_token != NULL) {
        if (request->otel_variable != Py_None) {
            if (PyContextVar_Reset(request->otel_variable, request->otel_token) < 0) {
                PyErr_Clear(); /* set in another context, or reset already: as OtelBridge.exit */
            }
        }
        else {
            PyObject *none = PyObject_CallMethodOneArg(request->otel, str_exit, request->otel_token);
            if (none == NULL) {
                agent_error(request->agent, str_asgi_end);
            }
            Py_XDECREF(none);
        }
        Py_CLEAR(request->otel_token);
    }
    if (request->previous != NULL) {
        PyObject *token = PyContextVar_Set(request->current, request->previous);
        if (token == NULL) {
            agent_error(request->agent, str_asgi_end);
        }
        Py_XDECREF(token);
        Py_CLEAR(request->previous);
    }
    PyObject *route = get_attr(record, str_route);
    if (route == NULL || (route == Py_None && set_attr(record, str_route, str_empty) < 0)) {
        agent_error(request->agent, str_asgi_end);
    }
    Py_XDECREF(route);
    PyObject *finish = get_attr(request->agent, str_finish);
    PyObject *none = finish == NULL ? NULL : PyObject_CallOneArg(finish, record);
    Py_XDECREF(finish);
    if (none == NULL) {
        agent_error(request->agent, str_asgi_end);
    }
    Py_XDECREF(none);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------
 * The thread pool's wait (perfagent/frameworks/threadpool.py): ``RunSync`` is the
 * patched ``anyio.to_thread.run_sync``, ``Started`` the wrapper of the function
 * it runs, which adds the time from the call to the start on a pool thread to
 * the request's ``thread_wait``.
 */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *record;
    PyObject *func;
    double queued;
} Started;

static PyObject *
Started_vectorcall(Started *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *now = clock_now();
    if (now != NULL) {
        double waited = PyFloat_AsDouble(now) - self->queued;
        Py_DECREF(now);
        double before = attr_double(self->record, str_thread_wait, -1.0);
        PyObject *total = PyErr_Occurred()
                              ? NULL
                              : PyFloat_FromDouble(before < 0.0 ? waited : before + waited);
        if (total != NULL) {
            set_attr(self->record, str_thread_wait, total);
            Py_DECREF(total);
        }
    }
    PyErr_Clear(); /* a lost wait, never the app's call */
    return PyObject_Vectorcall(self->func, args, nargsf, kwnames);
}

#define STARTED_OBJECTS(X) X(record) X(func)
RECYCLED_GC_METHODS(Started, STARTED_OBJECTS, spare_starts)

CALLABLE_TYPE(Started,
              "A function handed to the thread pool, timed from the call to its start.",
              .tp_new = NULL)

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *original; /* anyio.to_thread.run_sync */
    PyObject *current;  /* the record's ContextVar */
} RunSync;

static PyObject *
RunSync_vectorcall(RunSync *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *record = NULL;
    if (nargs < 1 || PyContextVar_Get(self->current, Py_None, &record) < 0) {
        PyErr_Clear();
        return PyObject_Vectorcall(self->original, args, nargsf, kwnames);
    }
    int done = record == Py_None ? 1 : attr_true(record, str_done);
    if (done != 0) {
        PyErr_Clear();
        Py_DECREF(record);
        return PyObject_Vectorcall(self->original, args, nargsf, kwnames);
    }
    Started *started = (Started *)recycled_new(&spare_starts, &StartedType);
    if (started != NULL) { /* what its dealloc clears, should the clock fail */
        started->record = started->func = NULL;
    }
    PyObject *now = started == NULL ? NULL : clock_now();
    if (now == NULL) {
        Py_XDECREF(started);
        Py_DECREF(record);
        PyErr_Clear();
        return PyObject_Vectorcall(self->original, args, nargsf, kwnames);
    }
    started->vectorcall = (vectorcallfunc)Started_vectorcall;
    started->record = record; /* the reference taken by PyContextVar_Get */
    started->func = Py_NewRef(args[0]);
    started->queued = PyFloat_AsDouble(now);
    Py_DECREF(now);
    PyObject_GC_Track(started);
    /* original(started, *args[1:], **kwargs) */
    Py_ssize_t total = nargs + (kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames));
    PyObject *small[8], **call = total <= 8 ? small : PyMem_Malloc(total * sizeof(PyObject *));
    if (call == NULL) {
        Py_DECREF(started);
        return PyErr_NoMemory();
    }
    call[0] = (PyObject *)started;
    for (Py_ssize_t i = 1; i < total; i++) {
        call[i] = args[i];
    }
    PyObject *result = PyObject_Vectorcall(self->original, call, nargs, kwnames);
    if (call != small) {
        PyMem_Free(call);
    }
    Py_DECREF(started);
    return result;
}

#define RUNSYNC_OBJECTS(X) X(original) X(current)
GC_METHODS(RunSync, RUNSYNC_OBJECTS)

static PyObject *
RunSync_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"original", "current", NULL};
    PyObject *original, *current;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!:RunSync", names, &original,
                                     &PyContextVar_Type, &current)) {
        return NULL;
    }
    RunSync *self = (RunSync *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)RunSync_vectorcall;
    self->original = Py_NewRef(original);
    self->current = Py_NewRef(current);
    return (PyObject *)self;
}

CALLABLE_TYPE(RunSync,
              "anyio.to_thread.run_sync, timing each request's wait for a pool thread.",
              .tp_new = RunSync_new)

static PyMethodDef perrequest_functions[] = {
    {"use_record_type", use_record_type, METH_O, "The record class whose slots are read directly."},
    {"end_request", end_request, METH_O, "The end of an ASGI request (asgi.py: _python_end)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef perrequest_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "perfagent._perrequest",
    .m_doc = "Per-request work in C (see perfagent/_perrequest.c).",
    .m_size = -1,
    .m_methods = perrequest_functions,
};

/* The module's constant objects, made once at import; 0, or -1 with an error set. */
static int
make_constants(void)
{
#define INTERN(name) (str_##name = PyUnicode_InternFromString(#name)) == NULL ||
#define TEXT(name, text) (str_##name = PyUnicode_InternFromString(text)) == NULL ||
#define INT(name, value) (name = PyLong_FromLong(value)) == NULL ||
    if (INTERN(done) INTERN(end) INTERN(route) INTERN(method) INTERN(status) INTERN(queries)
        INTERN(thread_wait) INTERN(start) INTERN(streaming) INTERN(first_byte) INTERN(profile)
        INTERN(foreign) INTERN(findings) INTERN(error_type) INTERN(buffer) INTERN(active)
        INTERN(tables) INTERN(local) INTERN(sampled) INTERN(carrier) INTERN(parent)
        INTERN(counts) INTERN(type) INTERN(http) INTERN(resolver) INTERN(running)
        INTERN(thread) INTERN(ensure_started) INTERN(internal_error) INTERN(more_body)
        INTERN(response_start) INTERN(headers) INTERN(enter) INTERN(exit) INTERN(finish)
        INTERN(deferred) INTERN(write) INTERN(mount_prefix) INTERN(past_cap) INTERN(count)
        INTERN(duration) INTERN(add_past_cap)
        TEXT(space, " ") TEXT(empty, "") TEXT(other, "_OTHER")
        TEXT(trace_id_property, "trace_id") TEXT(trace_id_slot, "_trace_id")
        TEXT(http_traceparent, "HTTP_TRACEPARENT")
        TEXT(fastapi_telemetry, "fastapi.telemetry") TEXT(http_body, "http.response.body")
        TEXT(http_start, "http.response.start") TEXT(asgi_start, "asgi.start")
        TEXT(asgi_response_start, "asgi.response_start") TEXT(asgi_end, "asgi.end")
        INT(zero, 0) INT(one, 1) INT(bits_128, 128)
        (str_server_timing = PyBytes_FromString("server-timing")) == NULL) {
        return -1;
    }
#undef INTERN
#undef TEXT
#undef INT
    /* The queries' type, read through its struct; a module built without it (or a
     * query of another type) is read as a sequence. */
    PyObject *speedups = PyImport_ImportModule("perfagent._speedups");
    PyObject *query_class = speedups == NULL ? NULL : PyObject_GetAttrString(speedups, "Query");
    Py_XDECREF(speedups);
    if (query_class != NULL && PyType_Check(query_class)) {
        query_type = (PyTypeObject *)query_class; /* held for the life of the process */
    }
    else {
        Py_XDECREF(query_class);
        PyErr_Clear();
    }
    PyObject *time_module = PyImport_ImportModule("time");
    perf_counter_fn = time_module == NULL ? NULL : PyObject_GetAttrString(time_module, "perf_counter");
    Py_XDECREF(time_module);
    return perf_counter_fn == NULL ? -1 : 0;
}

PyMODINIT_FUNC
PyInit__perrequest(void)
{
    PyTypeObject *types[] = {&PreparedLineType,     &QueuedLineType,  &FinisherType,
                             &AsgiBeginType,        &AsgiRequestType, &NPlusOneReporterType,
                             &RunSyncType,          &StartedType,     &RouteResolverType};
    if (make_constants() < 0) {
        return NULL;
    }
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (PyType_Ready(types[i]) < 0) {
            return NULL;
        }
    }
    PyObject *module = PyModule_Create(&perrequest_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "PreparedLine", (PyObject *)&PreparedLineType) < 0 ||
        PyModule_AddObjectRef(module, "QueuedLine", (PyObject *)&QueuedLineType) < 0 ||
        PyModule_AddObjectRef(module, "RouteResolver", (PyObject *)&RouteResolverType) < 0 ||
        PyModule_AddObjectRef(module, "Finisher", (PyObject *)&FinisherType) < 0 ||
        PyModule_AddObjectRef(module, "AsgiBegin", (PyObject *)&AsgiBeginType) < 0 ||
        PyModule_AddObjectRef(module, "AsgiRequest", (PyObject *)&AsgiRequestType) < 0 ||
        PyModule_AddObjectRef(module, "NPlusOneReporter", (PyObject *)&NPlusOneReporterType) < 0 ||
        PyModule_AddObjectRef(module, "RunSync", (PyObject *)&RunSyncType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
