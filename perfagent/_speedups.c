/*
 * The sqlite3 query hook in C, the one piece of the agent that runs once per
 * query rather than once per request, and the N+1 detector's grouping of a
 * request's queries.
 *
 * Why C: in Python, the wrapper around ``Connection.execute`` and the call to
 * ``QueryCapture.add`` cost ~12,000 instructions per query (callgrind, a view
 * issuing 11 SELECTs by primary key, each ~16,600 on its own); in C, ~3,700.
 * This file does the same work for the common case; see ``SqlHook_vectorcall`` for what it is. Everything else
 * (a statement seen for the first time, a call site not yet cached, bytes
 * statements) goes to the Python code in
 * ``perfagent/db/drivers.py`` and ``perfagent/db/capture.py``, which stays the
 * reference: the package works without this module, only slower. A call sqlite3
 * itself refuses (keyword arguments) goes to the driver's own method, untimed.
 *
 * Anything that can run Python code (an allocation the collector counts, which can
 * collect and so run any finalizer; releasing an object; a call) can issue a
 * statement, through this hook again, and change what the caches hold: what is
 * read across such a call is held by a reference of our own, never borrowed from
 * a cache or a list (issue 30: a Shape borrowed from the fingerprint cache across
 * the stack walk was freed when a finalizer's statement emptied the cache).
 *
 * Like every hook of the agent, nothing here raises into the app: the app
 * sees exactly what the driver returned or raised; an error of the agent's
 * own is cleared and the query is handed to the Python path, which counts it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <time.h>

#include "_histogram.h"
#include "_query.h"
#include "_record_slots.h"
#if PY_VERSION_HEX < 0x030B0000
#include <frameobject.h> /* PyFrame_GetBack: in Python.h from 3.11 */
#endif
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000
/* The interpreter's own frames, read where no frame object exists yet (see Cursor). */
#define INTERPRETER_FRAMES 1
#define Py_BUILD_CORE 1
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE
#endif

static PyObject *str_done, *str_queries, *str_past_cap, *str_table, *str_operation;

/* The record's ``done`` and ``queries`` read and written through their slots
 * (``RequestRecord`` has ``__slots__``): ``PyObject_GetAttr`` finds each through the
 * type's dictionaries and a descriptor, twice a query (~7,000 CPU instructions a
 * request on the 11-query route, with the cache misses of that generic path).
 * ``record.py`` tells this module its class (``use_record_type``); any other
 * object, or a slot not set, goes through ``PyObject_GetAttr``/``SetAttr``. */
static PyTypeObject *record_type;
static Py_ssize_t done_offset = -1, queries_offset = -1;

/* ``record.<name>`` (``done`` or ``queries``, ``offset`` its slot): a new reference,
 * or NULL with an error set. */
static inline PyObject *
record_attr(PyObject *record, PyObject *name, Py_ssize_t offset)
{
    if (Py_TYPE(record) == record_type && offset >= 0) {
        PyObject *value = *(PyObject **)((char *)record + offset);
        if (value != NULL) {
            return Py_NewRef(value);
        }
    }
    return PyObject_GetAttr(record, name);
}

/* ``use_record_type(RequestRecord)``: the class whose slots are read directly. */
static PyObject *
use_record_type(PyObject *module, PyObject *cls)
{
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "use_record_type(a class)");
        return NULL;
    }
    Py_CLEAR(record_type);
    done_offset = slot_member_offset((PyTypeObject *)cls, str_done);
    queries_offset = slot_member_offset((PyTypeObject *)cls, str_queries);
    if (PyErr_Occurred()) {
        return NULL;
    }
    record_type = (PyTypeObject *)Py_NewRef(cls);
    Py_RETURN_NONE;
}

#define SITE_CACHE 8  /* entries of SqlHook.recent; a power of two */
#define CODE_CACHE 64 /* entries of SqlHook.kinds_seen and sites_seen; a power of two */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *run;          /* the driver's own Cursor.execute or executemany */
    PyObject *make_cursor;  /* Connection.cursor for the connection's methods, else NULL */
    PyObject *original;     /* the connection's own method (with make_cursor), else NULL */
    PyObject *cursor_class; /* the cursor class make_cursor is given */
    PyObject *system;       /* "sqlite" */
    PyObject *no_params;    /* what the params of a call without any are recorded as */
    PyObject *current;      /* perfagent.record.current, the request's ContextVar */
    PyObject *perf_counter; /* time.perf_counter: record.start comes from it */
    PyObject *slow_add;     /* QueryCapture.add: the reference path */
    PyObject *shapes;       /* statement text -> Shape, the fingerprint cache */
    /* AppFrames' caches (perfagent/db/callsite.py), each id(code) -> (code, value): */
    PyObject *kinds;        /* -> APP, LIBRARY or LAZY_LOAD */
    PyObject *loops;        /* -> ((start, end) offsets of each loop body, ...) */
    PyObject *at_loop;      /* -> {offset: (sites, lazy)} of walks that stopped at once */
    PyObject *spawned;      /* callsite.spawned, the ContextVar of a task's maker's sites */
    int many;
    Py_ssize_t max_calls;   /* calls of a request kept in full; past it, only counted */
    PyObject *past_cap;     /* capture.CallsPastCap, made for a request's first call past it */
    double bounds[32];      /* the database histogram's bounds, for the calls past the cap */
    Py_ssize_t nbounds;
    /* The last answers of ``cached_sites``, by caller code and offset: a query in a
     * loop comes from the same place again and again, and these spare the two
     * id-keyed dict lookups (and the two int objects made for them) of at_loop
     * (measured: ~400 instructions a query). The code and answer are held. */
    struct {
        PyObject *code;
        int lasti;
        PyObject *answer;
    } recent[SITE_CACHE];
    /* What the walk read of each code it passed and of each app line: the code's
     * kind, and the line's site and whether it lies in a loop. A query outside a
     * loop walks up the stack every time (its callers decide its sites): on the
     * benchmark's 11-query route, 7 frames, each kind an id-keyed dict lookup and
     * an int made for it, and a site tuple and a line-table read per app frame,
     * ~2,500 CPU instructions a request. None of these answers ever changes for a
     * code and offset (callsite.py: a kind is its file's; the loops are its
     * bytecode's), and the code is held, so its address stays its own. */
    struct {
        PyObject *code;
        long kind;
    } kinds_seen[CODE_CACHE];
    struct {
        PyObject *code;
        int offset;
        int loop;
        PyObject *site;
    } sites_seen[CODE_CACHE];
} SqlHook;

/* 1 where time.perf_counter() is clock_gettime(CLOCK_MONOTONIC) (Linux; the module
 * asks time.get_clock_info at import): the hook then reads that clock itself, as
 * perf_counter converts it (nanoseconds / 1e9), without a call and a float object
 * each time (measured: ~600 instructions less per query). */
static int monotonic_is_perf_counter;

static double
now(SqlHook *self)
{
#ifdef CLOCK_MONOTONIC
    struct timespec ts;
    if (monotonic_is_perf_counter && clock_gettime(CLOCK_MONOTONIC, &ts) == 0) {
        return (double)((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec) / 1e9;
    }
#endif
    PyObject *value = PyObject_CallNoArgs(self->perf_counter);
    if (value == NULL) {
        PyErr_Clear();
        return 0.0;
    }
    double seconds = PyFloat_AsDouble(value);
    Py_DECREF(value);
    return seconds;
}

/* The request's record when one is running in this context, else NULL; a new reference. */
static PyObject *
running_record(SqlHook *self)
{
    PyObject *record = NULL;
    if (PyContextVar_Get(self->current, Py_None, &record) < 0) {
        PyErr_Clear();
        return NULL;
    }
    if (record == Py_None) {
        Py_DECREF(record);
        return NULL;
    }
    PyObject *done = record_attr(record, str_done, done_offset);
    if (done != Py_False) {
        if (done == NULL) {
            PyErr_Clear();
        }
        Py_XDECREF(done);
        Py_DECREF(record);
        return NULL;
    }
    Py_DECREF(done);
    return record;
}

/* Kinds of code in AppFrames (callsite.py: _LIBRARY, _APP, _LAZY_LOAD). */
#define KIND_LIBRARY 0
#define KIND_APP 1
#define MAX_FRAMES 4      /* callsite.MAX_FRAMES */
#define LIBRARY_BUDGET 8  /* callsite._LIBRARY_BUDGET */

/* What an id(code)-keyed cache holds for code, borrowed; NULL if nothing. */
static PyObject *
by_code(PyObject *cache, PyCodeObject *code)
{
    PyObject *key = PyLong_FromVoidPtr(code);
    if (key == NULL) {
        return NULL;
    }
    PyObject *entry = PyDict_GetItemWithError(cache, key);
    Py_DECREF(key);
    if (entry == NULL || !PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2 ||
        PyTuple_GET_ITEM(entry, 0) != (PyObject *)code) {
        return NULL;
    }
    return PyTuple_GET_ITEM(entry, 1);
}

/*
 * A Cursor is a frame of the running thread's stack, read for its code, offset and
 * line: the walk of the call site needs nothing else. From Python 3.11 a function's
 * frame has no frame object until something asks for one, and asking
 * (``PyEval_GetFrame``, ``PyFrame_GetBack``) makes it: an object the collector
 * tracks, whose frame is copied into it when the function returns. The hook asked
 * for 3 a request on the benchmark's 11-query route (the view's, its list
 * comprehension's and one more up the walk), each in flight for the rest of the view.
 * On 3.11 to 3.13 a Cursor is the interpreter's frame itself, read as CPython's
 * own ``PyFrame_GetLasti`` and ``PyEval_GetFrame`` read it, and no object is made;
 * elsewhere it is the frame object, borrowed (a running frame's object is held by
 * its interpreter frame, or on 3.10 by the frame it called).
 */
#ifdef INTERPRETER_FRAMES
typedef _PyInterpreterFrame *Cursor;

static inline Cursor
complete_frame(Cursor frame)
{
    while (frame != NULL && _PyFrame_IsIncomplete(frame)) {
        frame = frame->previous;
    }
    return frame;
}

static Cursor
cursor_here(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    return complete_frame(PyThreadState_Get()->current_frame);
#else
    return complete_frame(PyThreadState_Get()->cframe->current_frame);
#endif
}

static Cursor
cursor_back(Cursor frame)
{
    return complete_frame(frame->previous);
}

/* The frame's code, borrowed; NULL where it runs none (3.13: not a code object). */
static PyCodeObject *
cursor_code(Cursor frame)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyCode_Check(frame->f_executable) ? (PyCodeObject *)frame->f_executable : NULL;
#else
    return frame->f_code;
#endif
}

/* As ``frame.f_lasti``: the offset in bytes of the instruction running, -1 if none. */
static int
cursor_lasti(Cursor frame)
{
    int lasti = _PyInterpreterFrame_LASTI(frame);
    return lasti < 0 ? -1 : lasti * (int)sizeof(_Py_CODEUNIT);
}

static int
cursor_line(Cursor frame)
{
    return PyCode_Addr2Line(cursor_code(frame), cursor_lasti(frame));
}
#else
typedef PyFrameObject *Cursor;

static Cursor
cursor_here(void)
{
    return PyEval_GetFrame();
}

static Cursor
cursor_back(Cursor frame)
{
    PyFrameObject *back = PyFrame_GetBack(frame);
    Py_XDECREF(back); /* held by the frame it called, or by its own running frame */
    return back;
}

static PyCodeObject *
cursor_code(Cursor frame)
{
    PyCodeObject *code = PyFrame_GetCode(frame);
    Py_DECREF(code); /* held by the frame */
    return code;
}

static int
cursor_lasti(Cursor frame)
{
#if PY_VERSION_HEX >= 0x030B0000
    return PyFrame_GetLasti(frame);
#else
    int lasti = -1;
    PyObject *value = PyObject_GetAttrString((PyObject *)frame, "f_lasti");
    if (value != NULL) {
        lasti = (int)PyLong_AsLong(value);
        Py_DECREF(value);
    }
    return lasti;
#endif
}

static int
cursor_line(Cursor frame)
{
    return PyFrame_GetLineNumber(frame);
}
#endif

/* AppFrames.in_loop from its cache: 1 or 0; -1 when the code's loops are not known yet. */
static int
in_loop(SqlHook *self, PyCodeObject *code, long offset)
{
    PyObject *ranges = by_code(self->loops, code);
    if (ranges == NULL || !PyTuple_CheckExact(ranges)) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(ranges); i++) {
        PyObject *range = PyTuple_GET_ITEM(ranges, i);
        if (!PyTuple_CheckExact(range) || PyTuple_GET_SIZE(range) != 2) {
            return -1;
        }
        long start = PyLong_AsLong(PyTuple_GET_ITEM(range, 0));
        long end = PyLong_AsLong(PyTuple_GET_ITEM(range, 1));
        if (PyErr_Occurred()) {
            return -1;
        }
        if (start <= offset && offset <= end) {
            return 1;
        }
    }
    return 0;
}

/* The walk's caches (SqlHook.kinds_seen, sites_seen) are sets of two entries (at and
 * at ^ 1), the last one put in first, into an empty entry where there is one: two
 * codes or lines the same walk passes that fall on one set do not push each other
 * out at every walk. */

/* The kind of ``code`` (KIND_APP, KIND_LIBRARY, or another AppFrames knows), -1 when
 * it is not classified yet. */
static long
kind_of(SqlHook *self, PyCodeObject *code)
{
    size_t at = ((size_t)code >> 4) & (CODE_CACHE - 1);
    if (self->kinds_seen[at].code == (PyObject *)code) {
        return self->kinds_seen[at].kind;
    }
    if (self->kinds_seen[at ^ 1].code == (PyObject *)code) {
        return self->kinds_seen[at ^ 1].kind;
    }
    PyObject *known = by_code(self->kinds, code);
    long kind = known != NULL && PyLong_CheckExact(known) ? PyLong_AsLong(known) : -1;
    if (kind >= 0) {
        PyObject *gone = NULL;
        if (self->kinds_seen[at].code != NULL) { /* the older entry gives way */
            gone = self->kinds_seen[at ^ 1].code;
            self->kinds_seen[at ^ 1] = self->kinds_seen[at];
        }
        self->kinds_seen[at].code = Py_NewRef((PyObject *)code);
        self->kinds_seen[at].kind = kind;
        /* Released once both entries are whole again: freeing a code object can run
         * Python code (a weak reference's callback), which can query, and walk. */
        Py_XDECREF(gone);
    }
    return kind;
}

/* The site (code, offset, line) of an app frame, a new reference, with whether its
 * line is in a loop of its code into ``*loop``; NULL when its loops are not known yet. */
static PyObject *
site_of(SqlHook *self, Cursor frame, PyCodeObject *code, int offset, int *loop)
{
    size_t at = (((size_t)code >> 4) ^ (size_t)offset) & (CODE_CACHE - 1);
    for (int way = 0; way < 2; way++, at ^= 1) { /* at is at again after the loop */
        if (self->sites_seen[at].code == (PyObject *)code &&
            self->sites_seen[at].offset == offset) {
            *loop = self->sites_seen[at].loop;
            return Py_NewRef(self->sites_seen[at].site);
        }
    }
    int in = in_loop(self, code, offset);
    /* An allocation the collector counts: it can collect, and a finalizer can run
     * anything, this hook included (which changes these entries: read after). */
    PyObject *site = in < 0 ? NULL : Py_BuildValue("(Oii)", code, offset, cursor_line(frame));
    if (site == NULL) {
        return NULL;
    }
    PyObject *gone_code = NULL, *gone_site = NULL;
    if (self->sites_seen[at].code != NULL) { /* the older entry gives way */
        gone_code = self->sites_seen[at ^ 1].code;
        gone_site = self->sites_seen[at ^ 1].site;
        self->sites_seen[at ^ 1] = self->sites_seen[at];
    }
    self->sites_seen[at].code = Py_NewRef((PyObject *)code);
    self->sites_seen[at].site = Py_NewRef(site);
    self->sites_seen[at].offset = offset;
    self->sites_seen[at].loop = *loop = in;
    /* Released once both entries are whole again (as in kind_of). */
    Py_XDECREF(gone_code);
    Py_XDECREF(gone_site);
    return site;
}

/*
 * AppFrames.capture's walk, for stacks whose every frame's kind is already known
 * and holds no lazy load: the app sites as a new tuple; NULL (no error set) for
 * whatever the Python walk must see (new code, a lazy load, no app frame, or a
 * walk that stops at once, which the Python walk caches in at_loop).
 *
 * kind_of and site_of can run any Python code (an allocation can collect; releasing
 * a cache entry can free a code object): the sites found are held across them, and
 * the frames walked are the running thread's callers, alive until the hook returns.
 */
static PyObject *
walk(SqlHook *self, Cursor first)
{
    PyObject *sites[MAX_FRAMES];
    int count = 0, budget = LIBRARY_BUDGET, ok = 1, at_once = 0, looped = 0;
    Cursor frame = first;
    while (frame != NULL && ok) {
        PyCodeObject *code = cursor_code(frame);
        long kind = code == NULL ? -1 : kind_of(self, code);
        int stop = 0;
        if (kind == KIND_APP) {
            int offset = cursor_lasti(frame), loop = 0;
            PyObject *site = offset < 0 ? NULL : site_of(self, frame, code, offset, &loop);
            if (site == NULL) {
                ok = 0;
            }
            else {
                sites[count++] = site; /* a new reference (site_of) */
                looped = loop == 1;
                stop = count >= MAX_FRAMES || looped;
                at_once = stop && frame == first;
                budget = LIBRARY_BUDGET;
            }
        }
        else if (kind == KIND_LIBRARY) {
            stop = count > 0 && --budget == 0;
        }
        else {
            ok = 0; /* not classified yet, a lazy load, or a Jinja template's code (whose
                     * line the Python walk maps to the template's: callsite.py) */
        }
        frame = stop ? NULL : cursor_back(frame);
    }
    /* No loop in a task the app made (asyncio.gather): the walk goes on at its
     * maker's sites, in the task's context (callsite.spawned; AppFrames.capture). */
    if (ok && count > 0 && !looped && self->spawned != NULL) {
        PyObject *made_by = NULL;
        if (PyContextVar_Get(self->spawned, NULL, &made_by) < 0 || made_by != Py_None) {
            ok = 0;
        }
        Py_XDECREF(made_by);
    }
    PyObject *result = NULL;
    if (ok && count > 0 && !at_once) {
        result = PyTuple_New(count);
        for (int i = 0; result != NULL && i < count; i++) {
            PyTuple_SET_ITEM(result, i, Py_NewRef(sites[i]));
        }
    }
    for (int i = 0; i < count; i++) {
        Py_DECREF(sites[i]);
    }
    PyErr_Clear();
    return result;
}

/* (sites, lazy) cached for the caller's code and offset, a new reference; NULL if not
 * cached. */
static PyObject *
cached_sites(SqlHook *self, Cursor frame)
{
    PyCodeObject *code = frame == NULL ? NULL : cursor_code(frame);
    if (code == NULL) {
        return NULL;
    }
    int lasti = cursor_lasti(frame);
    if (lasti < 0) {
        return NULL;
    }
    size_t at = (((size_t)code >> 4) ^ (size_t)lasti) & (SITE_CACHE - 1);
    if (self->recent[at].code == (PyObject *)code && self->recent[at].lasti == lasti) {
        return Py_NewRef(self->recent[at].answer);
    }
    PyObject *offsets = by_code(self->at_loop, code);
    if (offsets == NULL || !PyDict_CheckExact(offsets)) {
        return NULL;
    }
    PyObject *offset = PyLong_FromLong(lasti);
    if (offset == NULL) {
        return NULL;
    }
    PyObject *answer = PyDict_GetItemWithError(offsets, offset);
    Py_DECREF(offset);
    if (answer == NULL || !PyTuple_CheckExact(answer) || PyTuple_GET_SIZE(answer) != 2) {
        return NULL;
    }
    /* What at_loop says of a code and offset never changes: kept, it stays right. The
     * entry is whole before the old one is released (as in kind_of), and the answer
     * returned is held: releasing can run code that changes the entry again. */
    Py_INCREF(answer);
    PyObject *gone_code = self->recent[at].code, *gone_answer = self->recent[at].answer;
    self->recent[at].code = Py_NewRef((PyObject *)code);
    self->recent[at].answer = Py_NewRef(answer);
    self->recent[at].lasti = lasti;
    Py_XDECREF(gone_code);
    Py_XDECREF(gone_answer);
    return answer;
}

/* Untracks ``obj``, a tuple (or a tuple subclass without a ``__dict__``, such as a
 * NamedTuple) none of whose items the garbage collector tracks: no reference cycle
 * can pass through it. CPython's collector makes the same check before it untracks a
 * plain tuple, lazily, at a collection; it never untracks a NamedTuple. A query's
 * parts of atoms (its row's parameters, its Shape, its sites) are then none of the
 * collector's work while its request runs (the Query itself is not a type it
 * tracks: _query.h). Under uvicorn each young collection found the in-flight
 * requests' queries, then tuples, and promoted them, and full collections (~20 ms
 * each) came more often (measured on the 11-query route, 16 connections: young
 * collections 0.107 -> 0.085 a request, bare 0.091; full ones 0.89 -> 0.71 per
 * 1,000 requests, bare 0.75). */
static void
untrack_atoms(PyObject *obj)
{
    if (obj == NULL || !PyTuple_Check(obj) || !PyObject_GC_IsTracked(obj) ||
        Py_TYPE(obj)->tp_dictoffset != 0) {
        return;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(obj); i++) {
        PyObject *item = PyTuple_GET_ITEM(obj, i);
        if (item == NULL || PyObject_GC_IsTracked(item)) {
            return;
        }
    }
    PyObject_GC_UnTrack(obj);
}

/* -- Query ---------------------------------------------------------------------
 * One query of a request (the layout and the why: _query.h). Read-only fields by
 * name (``query.duration``) and, as the NamedTuple it replaced, by position
 * (``query[5]``, unpacking). */

static PyTypeObject QueryType;

static QueryObject *
query_new(PyObject *system, PyObject *sql, PyObject *shape, PyObject *params, double start,
          double duration, Py_ssize_t many, PyObject *sites, PyObject *lazy)
{
    QueryObject *query = PyObject_New(QueryObject, &QueryType);
    if (query == NULL) {
        return NULL;
    }
    query->system = Py_NewRef(system);
    query->sql = Py_NewRef(sql);
    query->shape = Py_NewRef(shape);
    query->params = Py_NewRef(params);
    query->start = start;
    query->duration = duration;
    query->many = many;
    query->sites = Py_NewRef(sites);
    query->lazy = Py_NewRef(lazy);
    return query;
}

static PyObject *
Query_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"system", "sql", "shape", "params", "start", "duration",
                            "many",   "sites", "lazy", NULL};
    PyObject *system, *sql, *shape, *params, *sites, *lazy;
    double start, duration;
    Py_ssize_t many;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOddnOO:Query", names, &system, &sql,
                                     &shape, &params, &start, &duration, &many, &sites, &lazy)) {
        return NULL;
    }
    return (PyObject *)query_new(system, sql, shape, params, start, duration, many, sites, lazy);
}

static void
Query_dealloc(QueryObject *self)
{
    Py_DECREF(self->system);
    Py_DECREF(self->sql);
    Py_DECREF(self->shape);
    Py_DECREF(self->params);
    Py_DECREF(self->sites);
    Py_DECREF(self->lazy);
    PyObject_Free(self);
}

static Py_ssize_t
Query_length(PyObject *self)
{
    return QUERY_FIELDS;
}

static PyObject *
Query_item(QueryObject *self, Py_ssize_t i)
{
    switch (i) {
    case 0: return Py_NewRef(self->system);
    case 1: return Py_NewRef(self->sql);
    case 2: return Py_NewRef(self->shape);
    case 3: return Py_NewRef(self->params);
    case 4: return PyFloat_FromDouble(self->start);
    case 5: return PyFloat_FromDouble(self->duration);
    case 6: return PyLong_FromSsize_t(self->many);
    case 7: return Py_NewRef(self->sites);
    case 8: return Py_NewRef(self->lazy);
    default:
        PyErr_SetString(PyExc_IndexError, "Query index out of range");
        return NULL;
    }
}

static PyObject *
Query_repr(QueryObject *self)
{
    PyObject *start = PyFloat_FromDouble(self->start);
    PyObject *duration = PyFloat_FromDouble(self->duration);
    PyObject *text = start == NULL || duration == NULL
                         ? NULL
                         : PyUnicode_FromFormat(
                               "Query(system=%R, sql=%R, shape=%R, params=%R, start=%R, "
                               "duration=%R, many=%zd, sites=%R, lazy=%R)",
                               self->system, self->sql, self->shape, self->params, start,
                               duration, self->many, self->sites, self->lazy);
    Py_XDECREF(start);
    Py_XDECREF(duration);
    return text;
}

static PySequenceMethods Query_as_sequence = {
    .sq_length = Query_length,
    .sq_item = (ssizeargfunc)Query_item,
};

#define QUERY_MEMBER(name, kind, doc) \
    {#name, kind, offsetof(QueryObject, name), READONLY, doc},
static PyMemberDef Query_members[] = {
    QUERY_MEMBER(system, T_OBJECT, "The database system: 'sqlite', 'postgresql', ...")
    QUERY_MEMBER(sql, T_OBJECT, "The statement as sent, literals and all: never exported.")
    QUERY_MEMBER(shape, T_OBJECT, "Its Shape (perfagent/db/fingerprint.py).")
    QUERY_MEMBER(params, T_OBJECT, "Its parameters, or None where the driver gives none.")
    QUERY_MEMBER(start, T_DOUBLE, "perf_counter() when it was sent.")
    QUERY_MEMBER(duration, T_DOUBLE, "Seconds it took.")
    QUERY_MEMBER(many, T_PYSSIZET, "Rows of an executemany (0 for a single execute).")
    QUERY_MEMBER(sites, T_OBJECT, "The app's frames it came from: ((code, offset, line), ...).")
    QUERY_MEMBER(lazy, T_OBJECT, "'Post.comments' when SQLAlchemy lazy-loaded it, else None.")
    {NULL},
};
#undef QUERY_MEMBER

static PyTypeObject QueryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "perfagent._speedups.Query",
    .tp_basicsize = sizeof(QueryObject),
    .tp_dealloc = (destructor)Query_dealloc,
    .tp_repr = (reprfunc)Query_repr,
    .tp_as_sequence = &Query_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Query(system, sql, shape, params, start, duration, many, sites, lazy): one "
              "query of a request.",
    .tp_members = Query_members,
    .tp_new = Query_new,
};

/* ``query`` as a Query, or NULL with TypeError set. */
static inline QueryObject *
as_query(PyObject *query)
{
    if (!Py_IS_TYPE(query, &QueryType)) {
        PyErr_SetString(PyExc_TypeError, "expected a list of perfagent Query");
        return NULL;
    }
    return (QueryObject *)query;
}

/* A call past the request's cap, as ``QueryCapture.add`` counts it: into
 * ``record.past_cap.table[(system, operation)]``, the database histogram's buckets and
 * sum, nothing else of it kept. 0 if counted, -1 if the Python path is to count it
 * (nothing counted here then). */
static int
add_past_cap(SqlHook *self, PyObject *record, PyObject *sql, double duration)
{
    if (self->past_cap == NULL || self->nbounds == 0) {
        return -1;
    }
    PyObject *shape = PyDict_GetItemWithError(self->shapes, sql);
    if (shape == NULL) {
        PyErr_Clear();
        return -1;
    }
    Py_INCREF(shape); /* held: nothing below may free it under us */
    PyObject *operation = PyObject_GetAttr(shape, str_operation);
    Py_DECREF(shape);
    PyObject *past = operation == NULL ? NULL : PyObject_GetAttr(record, str_past_cap);
    if (past == Py_None) {
        Py_SETREF(past, PyObject_CallNoArgs(self->past_cap));
        if (past != NULL && PyObject_SetAttr(record, str_past_cap, past) < 0) {
            Py_CLEAR(past);
        }
    }
    PyObject *table = past == NULL ? NULL : PyObject_GetAttr(past, str_table);
    PyObject *key = table == NULL || !PyDict_Check(table)
                        ? NULL
                        : PyTuple_Pack(2, self->system, operation);
    PyObject *entry = key == NULL ? NULL : histogram_entry(table, key, self->nbounds + 1);
    int result = -1;
    if (entry != NULL) {
        /* From here on the call is counted, whole or in part: never again by Python. */
        histogram_add(entry, self->bounds, self->nbounds, duration);
        result = 0;
    }
    PyErr_Clear();
    Py_XDECREF(operation);
    Py_XDECREF(past);
    Py_XDECREF(table);
    Py_XDECREF(key);
    Py_XDECREF(entry);
    return result;
}

/* QueryCapture.add for a query whose shape and call site are cached; 0 if done, -1 if not. */
static int
add_fast(SqlHook *self, PyObject *record, PyObject *sql, PyObject *params, double start,
         double end, Cursor frame, Py_ssize_t many)
{
    if (!PyUnicode_CheckExact(sql)) {
        return -1;
    }
    PyObject *kept = record_attr(record, str_queries, queries_offset);
    if (kept == NULL) {
        PyErr_Clear();
        return -1;
    }
    Py_ssize_t nkept = PyList_CheckExact(kept) ? PyList_GET_SIZE(kept) : 0;
    Py_DECREF(kept);
    if (nkept >= self->max_calls) {
        return add_past_cap(self, record, sql, end - start);
    }
    /* The Shape is held, not borrowed from the cache: the walk below can collect (an
     * allocation), a finalizer can then issue a statement, and a statement new to a
     * full cache empties it, which freed a borrowed Shape (issue 30: a segfault). */
    PyObject *shape = PyDict_GetItemWithError(self->shapes, sql);
    if (shape == NULL) {
        return -1;
    }
    Py_INCREF(shape);
    PyObject *sites, *lazy;
    PyObject *answer = cached_sites(self, frame);
    if (answer != NULL) {
        sites = Py_NewRef(PyTuple_GET_ITEM(answer, 0));
        lazy = Py_NewRef(PyTuple_GET_ITEM(answer, 1));
        Py_DECREF(answer);
    }
    else if ((sites = walk(self, frame)) != NULL) {
        lazy = Py_NewRef(Py_None);
    }
    else {
        Py_DECREF(shape);
        return -1;
    }
    if (PyTuple_Check(sites) && PyObject_GC_IsTracked(sites)) { /* a new walk's, not cached */
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(sites); i++) {
            untrack_atoms(PyTuple_GET_ITEM(sites, i));
        }
        untrack_atoms(sites);
    }
    untrack_atoms(shape);
    untrack_atoms(params);
    PyObject *query = (PyObject *)query_new(self->system, sql, shape, params, start,
                                            end - start, many, sites, lazy);
    Py_DECREF(shape);
    Py_DECREF(sites);
    Py_DECREF(lazy);
    if (query == NULL) {
        return -1;
    }
    int failed = -1;
    PyObject *queries = record_attr(record, str_queries, queries_offset);
    if (queries == NULL) {
        goto done;
    }
    if (PyList_CheckExact(queries)) {
        if (PyList_Append(queries, query) < 0) {
            goto done;
        }
    }
    else if (queries == Py_None) {
        PyObject *fresh = PyList_New(1);
        if (fresh == NULL) {
            goto done;
        }
        Py_INCREF(query);
        PyList_SET_ITEM(fresh, 0, query);
        int set;
        if (Py_TYPE(record) == record_type && queries_offset >= 0) {
            PyObject **slot = (PyObject **)((char *)record + queries_offset);
            Py_XSETREF(*slot, Py_NewRef(fresh));
            set = 0;
        }
        else {
            set = PyObject_SetAttr(record, str_queries, fresh);
        }
        Py_DECREF(fresh);
        if (set < 0) {
            goto done;
        }
    }
    else {
        goto done; /* someone else's list type: the Python path knows what to do */
    }
    failed = 0;
done:
    if (PyErr_Occurred()) {
        PyErr_Clear();
    }
    Py_XDECREF(queries);
    Py_DECREF(query);
    return failed;
}

static Py_ssize_t
size_of(PyObject *rows)
{
    Py_ssize_t size = PyObject_Size(rows);
    if (size < 0) {
        PyErr_Clear();
        return 0;
    }
    return size;
}

/*
 * ``connection.execute(sql, params)`` (make_cursor set: run on a new cursor of
 * ours, as the Python ``_on_new_cursor``) or ``cursor.execute(sql, params)``
 * (as ``_timed``): the driver's call, timed, and the query charged to the
 * running request. Called with self first, as a method (METHOD_DESCRIPTOR).
 */
static PyObject *
SqlHook_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    SqlHook *self = (SqlHook *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "execute() needs the connection or cursor");
        return NULL;
    }
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *small[8];
    PyObject **call = small;
    if (nargs + nkw > 8) {
        call = PyMem_Malloc((nargs + nkw) * sizeof(PyObject *));
        if (call == NULL) {
            return PyErr_NoMemory();
        }
    }
    for (Py_ssize_t i = 1; i < nargs + nkw; i++) {
        call[i] = args[i];
    }
    if (self->original != NULL && (nkw > 0 || nargs < 2 || nargs > 3)) {
        /* Not a call the connection's method takes (a keyword, no statement, too many
         * arguments): its own answer, its error naming Connection, not our cursor's;
         * the agent shows nowhere, not in an error message (issue 30, item 14). */
        PyObject *own = PyObject_Vectorcall(self->original, args, nargsf, kwnames);
        if (call != small) {
            PyMem_Free(call);
        }
        return own;
    }
    PyObject *target = args[0];
    Py_INCREF(target);
    if (self->make_cursor != NULL) {
        PyObject *pair[2] = {args[0], self->cursor_class};
        Py_SETREF(target, PyObject_Vectorcall(self->make_cursor, pair, 2, NULL));
        if (target == NULL) {
            goto out; /* the driver's own error (a closed connection): the app's to see */
        }
    }
    call[0] = target;

    PyObject *result;
    PyObject *record = (nargs >= 2 && nkw == 0) ? running_record(self) : NULL;
    if (record == NULL) {
        result = PyObject_Vectorcall(self->run, call, nargs, kwnames);
        Py_DECREF(target);
        goto out_result;
    }
    double start = now(self);
    result = PyObject_Vectorcall(self->run, call, nargs, kwnames);
    PyObject *exc_type = NULL, *exc_value = NULL, *exc_tb = NULL;
    if (result == NULL) {
        PyErr_Fetch(&exc_type, &exc_value, &exc_tb); /* the driver's error, kept aside */
    }
    double end = now(self);
    Py_DECREF(target);

    PyObject *sql = args[1];
    PyObject *params = nargs > 2 ? args[2] : self->no_params;
    Py_ssize_t many = self->many ? size_of(params) : 0;
    if (add_fast(self, record, sql, params, start, end, cursor_here(), many) < 0) {
        /* The caller's frame (this function has none), made here only for Python. */
        PyObject *frame = (PyObject *)PyEval_GetFrame();
        PyObject *py_start = PyFloat_FromDouble(start), *py_end = PyFloat_FromDouble(end);
        PyObject *py_many = PyLong_FromSsize_t(many);
        if (py_start != NULL && py_end != NULL && py_many != NULL) {
            PyObject *add_args[8] = {record, self->system, sql, params, py_start, py_end,
                                     frame != NULL ? frame : Py_None, py_many};
            PyObject *added = PyObject_Vectorcall(self->slow_add, add_args, 8, NULL);
            Py_XDECREF(added);
        }
        Py_XDECREF(py_start);
        Py_XDECREF(py_end);
        Py_XDECREF(py_many);
        PyErr_Clear();
    }
    if (result == NULL) {
        PyErr_Restore(exc_type, exc_value, exc_tb);
    }
    Py_DECREF(record);
out_result:
    if (call != small) {
        PyMem_Free(call);
    }
    return result;
out:
    if (call != small) {
        PyMem_Free(call);
    }
    return NULL;
}

static PyObject *
SqlHook_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"run",          "make_cursor", "cursor_class", "system",
                            "no_params",    "current",     "perf_counter", "slow_add",
                            "shapes",       "frames",      "many",         "original",
                            "max_calls",    "past_cap",    "bounds",       NULL};
    PyObject *run, *make_cursor, *cursor_class, *system, *no_params, *current, *perf_counter;
    PyObject *slow_add, *shapes, *frames, *original = Py_None, *past_cap = NULL, *bounds = NULL;
    int many = 0;
    Py_ssize_t max_calls = PY_SSIZE_T_MAX;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOUOOOOO!O|pOnOO!", names, &run, &make_cursor,
                                     &cursor_class, &system, &no_params, &current, &perf_counter,
                                     &slow_add, &PyDict_Type, &shapes, &frames, &many, &original,
                                     &max_calls, &past_cap, &PyTuple_Type, &bounds)) {
        return NULL;
    }
    if (bounds != NULL && PyTuple_GET_SIZE(bounds) > 32) {
        PyErr_SetString(PyExc_ValueError, "at most 32 bounds");
        return NULL;
    }
    if (!PyContextVar_CheckExact(current)) {
        PyErr_SetString(PyExc_TypeError, "current must be a ContextVar");
        return NULL;
    }
    PyObject *caches[3] = {PyObject_GetAttrString(frames, "kinds"),
                           PyObject_GetAttrString(frames, "loops"),
                           PyObject_GetAttrString(frames, "at_loop")};
    SqlHook *self = NULL;
    for (int i = 0; i < 3; i++) {
        if (caches[i] != NULL && !PyDict_CheckExact(caches[i])) {
            PyErr_SetString(PyExc_TypeError, "frames' caches must be dicts");
        }
    }
    if (!PyErr_Occurred()) {
        self = (SqlHook *)type->tp_alloc(type, 0);
    }
    if (self == NULL) {
        for (int i = 0; i < 3; i++) {
            Py_XDECREF(caches[i]);
        }
        return NULL;
    }
    self->kinds = caches[0];
    self->loops = caches[1];
    self->at_loop = caches[2];
    self->spawned = PyObject_GetAttrString(frames, "spawned");
    if (self->spawned != NULL && !PyContextVar_CheckExact(self->spawned)) {
        Py_CLEAR(self->spawned);
    }
    PyErr_Clear(); /* no spawned: tasks' walks end at their own frames */
    self->vectorcall = SqlHook_vectorcall;
    self->run = Py_NewRef(run);
    self->make_cursor = make_cursor == Py_None ? NULL : Py_NewRef(make_cursor);
    self->original = original == Py_None || self->make_cursor == NULL ? NULL
                                                                       : Py_NewRef(original);
    self->cursor_class = Py_NewRef(cursor_class);
    self->system = Py_NewRef(system);
    self->no_params = Py_NewRef(no_params);
    self->current = Py_NewRef(current);
    self->perf_counter = Py_NewRef(perf_counter);
    self->slow_add = Py_NewRef(slow_add);
    self->shapes = Py_NewRef(shapes);
    self->many = many;
    self->max_calls = max_calls;
    self->past_cap = past_cap == Py_None ? NULL : Py_XNewRef(past_cap);
    for (Py_ssize_t i = 0; bounds != NULL && i < PyTuple_GET_SIZE(bounds); i++) {
        self->bounds[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (self->bounds[i] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(self);
            return NULL;
        }
        self->nbounds = i + 1;
    }
    return (PyObject *)self;
}

/* Every object a hook holds (the site cache's too), for traverse and clear. */
#define SQLHOOK_OBJECTS(X)                                                                   \
    X(run) X(make_cursor) X(original) X(cursor_class) X(system) X(no_params) X(current)     \
    X(perf_counter) X(slow_add) X(shapes) X(kinds) X(loops) X(at_loop) X(spawned)          \
    X(past_cap)                                                                              \
    for (int i = 0; i < SITE_CACHE; i++) {                                                  \
        X(recent[i].code) X(recent[i].answer)                                               \
    }                                                                                       \
    for (int i = 0; i < CODE_CACHE; i++) {                                                  \
        X(kinds_seen[i].code) X(sites_seen[i].code) X(sites_seen[i].site)                   \
    }

static int
SqlHook_traverse(SqlHook *self, visitproc visit, void *arg)
{
#define VISIT(name) Py_VISIT(self->name);
    SQLHOOK_OBJECTS(VISIT)
#undef VISIT
    return 0;
}

static int
SqlHook_clear(SqlHook *self)
{
#define CLEAR(name) Py_CLEAR(self->name);
    SQLHOOK_OBJECTS(CLEAR)
#undef CLEAR
    return 0;
}

static void
SqlHook_dealloc(SqlHook *self)
{
    PyObject_GC_UnTrack(self);
    SqlHook_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ``instance.execute`` outside a call (``f = conn.execute``): a bound method, as for a function. */
static PyObject *
SqlHook_get(PyObject *self, PyObject *instance, PyObject *owner)
{
    if (instance == NULL || instance == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, instance);
}

static PyTypeObject SqlHookType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "perfagent._speedups.SqlHook",
    .tp_basicsize = sizeof(SqlHook),
    .tp_dealloc = (destructor)SqlHook_dealloc,
    .tp_vectorcall_offset = offsetof(SqlHook, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "A sqlite3 execute/executemany timed into the running request's record.",
    .tp_traverse = (traverseproc)SqlHook_traverse,
    .tp_clear = (inquiry)SqlHook_clear,
    .tp_descr_get = SqlHook_get,
    .tp_new = SqlHook_new,
};

/* A Query's Shape (fingerprint, operation, batched, control), borrowed; NULL with
 * TypeError set when ``query`` is not a Query with one. */
static PyObject *
shape_of(QueryObject *query)
{
    PyObject *shape = query->shape;
    if (!PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) < 4) {
        PyErr_SetString(PyExc_TypeError, "expected a Query with a Shape");
        return NULL;
    }
    return shape;
}

/* 1 when ``flag`` (a Shape's bool field) is true, 0 when false, -1 on error. */
static inline int
truth(PyObject *flag)
{
    return flag == Py_True ? 1 : flag == Py_False ? 0 : PyObject_IsTrue(flag);
}

/* An open-addressing table of small indices (index + 1; 0 is empty), sized for
 * ``n`` entries: what ``repeats`` and ``summary`` group with, so that no Python
 * object (key tuple, dict, set) is made per query. */
typedef struct {
    Py_ssize_t *slots;
    size_t mask;
} IndexTable;

static int
table_init(IndexTable *table, Py_ssize_t n)
{
    size_t size = 8;
    while (size < (size_t)n * 2) {
        size <<= 1;
    }
    table->slots = PyMem_Calloc(size, sizeof(Py_ssize_t));
    table->mask = size - 1;
    if (table->slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* 1 when a and b are the same string (or equal ones), 0 when not, -1 on error. */
static inline int
same_text(PyObject *a, PyObject *b)
{
    return a == b ? 1 : PyObject_RichCompareBool(a, b, Py_EQ);
}

/* The ``n`` items of ``list``, each held, in an array for ``release_items``; NULL with
 * MemoryError set. What repeats, summary and observe_queries read of a query (its
 * Shape, sites, parameters) is held by the query; the queries are held here, not
 * borrowed from the list, because these functions call code that can do anything
 * to it: a parameter's ``__hash__`` or ``__eq__``, an allocation that collects and
 * runs a finalizer (a request's queries are the app's to reach: record.queries). */
static PyObject **
hold_items(PyObject *list, Py_ssize_t n)
{
    PyObject **items = PyMem_Malloc((n ? n : 1) * sizeof(PyObject *));
    if (items == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        items[i] = Py_NewRef(PyList_GET_ITEM(list, i));
    }
    return items;
}

static void
release_items(PyObject **items, Py_ssize_t n)
{
    if (items != NULL) {
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_DECREF(items[i]);
        }
        PyMem_Free(items);
    }
}

typedef struct {
    PyObject *fingerprint; /* borrowed from the first query's Shape */
    void *code;            /* the last app site's code object, or NULL */
    long line;
    Py_hash_t hash;
    Py_ssize_t count, first, last;
    int all_batched;
} Group;

/*
 * ``repeats(queries, minimum)``: the N+1 detector's grouping (see
 * ``perfagent/detectors/nplusone.py``, whose ``_repeats`` is the reference):
 * the queries of a request by (fingerprint, code and line of the last app
 * site), leaving out transaction control; [(fingerprint, group), ...] for each
 * group of at least ``minimum`` whose statements are not all batched, in the
 * order each group was first seen. Measured on the benchmark's 11-query route:
 * ~40,000 instructions in Python, ~14,600 in C with a key tuple and a dict
 * entry per query, ~4,800 here (each figure with the call itself).
 */
static PyObject *
repeats(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "repeats(queries: list, minimum: int)");
        return NULL;
    }
    PyObject *queries = args[0];
    Py_ssize_t minimum = PyLong_AsSsize_t(args[1]);
    if (minimum == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(queries), used = 0;
    PyObject *found = NULL;
    IndexTable table = {NULL, 0};
    PyObject **items = hold_items(queries, n);
    Group *groups = PyMem_Malloc((n ? n : 1) * sizeof(Group));
    Py_ssize_t *next = PyMem_Malloc((n ? n : 1) * sizeof(Py_ssize_t));
    if (items == NULL) {
        goto done;
    }
    if (groups == NULL || next == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (table_init(&table, n) < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        QueryObject *query = as_query(items[i]);
        PyObject *shape = query == NULL ? NULL : shape_of(query);
        if (shape == NULL) {
            goto done;
        }
        int control = truth(PyTuple_GET_ITEM(shape, 3));
        int batched = truth(PyTuple_GET_ITEM(shape, 2));
        if (control < 0 || batched < 0) {
            goto done;
        }
        if (control) {
            continue;
        }
        PyObject *fingerprint = PyTuple_GET_ITEM(shape, 0);
        PyObject *sites = query->sites;
        void *code = NULL;
        long line = 0;
        if (PyTuple_Check(sites) && PyTuple_GET_SIZE(sites) > 0) {
            PyObject *site = PyTuple_GET_ITEM(sites, PyTuple_GET_SIZE(sites) - 1);
            if (PyTuple_Check(site) && PyTuple_GET_SIZE(site) >= 3) {
                code = PyTuple_GET_ITEM(site, 0);
                line = PyLong_AsLong(PyTuple_GET_ITEM(site, 2));
                if (line == -1 && PyErr_Occurred()) {
                    goto done;
                }
            }
        }
        Py_hash_t hash = PyObject_Hash(fingerprint);
        if (hash == -1) {
            goto done;
        }
        /* Unsigned: the products overflow, which a signed type may not do. */
        hash = (Py_hash_t)((Py_uhash_t)hash ^ ((Py_uhash_t)code >> 4) * 1000003u ^
                           (Py_uhash_t)line * 31u);
        size_t slot = (size_t)hash & table.mask;
        Group *group = NULL;
        for (; table.slots[slot]; slot = (slot + 1) & table.mask) {
            Group *candidate = &groups[table.slots[slot] - 1];
            if (candidate->hash != hash || candidate->code != code || candidate->line != line) {
                continue;
            }
            int same = same_text(candidate->fingerprint, fingerprint);
            if (same < 0) {
                goto done;
            }
            if (same) {
                group = candidate;
                break;
            }
        }
        next[i] = -1;
        if (group == NULL) {
            group = &groups[used++];
            table.slots[slot] = used;
            *group = (Group){fingerprint, code, line, hash, 1, i, i, batched};
        }
        else {
            next[group->last] = i;
            group->last = i;
            group->count++;
            group->all_batched &= batched;
        }
    }
    found = PyList_New(0);
    for (Py_ssize_t g = 0; found != NULL && g < used; g++) {
        Group *group = &groups[g];
        if (group->count < minimum || group->all_batched) {
            continue;
        }
        PyObject *members = PyList_New(group->count);
        if (members == NULL) {
            Py_CLEAR(found);
            break;
        }
        Py_ssize_t at = 0;
        for (Py_ssize_t i = group->first; i >= 0; i = next[i]) {
            PyList_SET_ITEM(members, at++, Py_NewRef(items[i]));
        }
        PyObject *pair = PyTuple_Pack(2, group->fingerprint, members);
        Py_DECREF(members);
        if (pair == NULL || PyList_Append(found, pair) < 0) {
            Py_XDECREF(pair);
            Py_CLEAR(found);
            break;
        }
        Py_DECREF(pair);
    }
done:
    release_items(items, n);
    PyMem_Free(groups);
    PyMem_Free(next);
    PyMem_Free(table.slots);
    return found;
}

/* ``*total += x`` as the built-in ``sum()`` of floats adds: from Python 3.12 with
 * Neumaier's compensation, kept in ``*compensation`` (added once at the end, when
 * finite), before that plainly; so the total is the Python twin's to the last bit. */
static inline void
add_up(double *total, double *compensation, double x)
{
#if PY_VERSION_HEX >= 0x030C0000
    double t = *total + x;
    *compensation += fabs(*total) >= fabs(x) ? (*total - t) + x : (x - t) + *total;
    *total = t;
#else
    (void)compensation;
    *total += x;
#endif
}

/*
 * ``summary(group)``: (distinct parameter sets or None when none are known,
 * whether every repeat was identical, the lazy-loaded attribute or None, total
 * seconds) of one group of repeats, as ``_summary`` in
 * ``perfagent/detectors/nplusone.py``; NotImplemented when a parameter set
 * cannot be hashed (that function then falls back to their repr). Distinct
 * (statement, parameters) pairs are counted in an IndexTable: measured on the
 * benchmark's 11-query route, ~8,000 instructions with a tuple per query in a
 * set, ~3,800 here.
 */
static PyObject *
summary(PyObject *module, PyObject *group)
{
    if (!PyList_Check(group)) {
        PyErr_SetString(PyExc_TypeError, "summary() takes a list of Query");
        return NULL;
    }
    Py_ssize_t size = PyList_GET_SIZE(group), known = 0, distinct = 0;
    IndexTable table = {NULL, 0};
    /* The hash of each known query's pair, by its index in the group. */
    Py_hash_t *hashes = PyMem_Malloc((size ? size : 1) * sizeof(Py_hash_t));
    PyObject *result = NULL, *lazy = Py_None;
    double total = 0.0, compensation = 0.0;
    if (hashes == NULL) {
        return PyErr_NoMemory();
    }
    /* Held: a parameter's __hash__ and __eq__ below are the app's code. */
    PyObject **items = hold_items(group, size);
    if (items == NULL || table_init(&table, size) < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        QueryObject *query = as_query(items[i]);
        if (query == NULL || shape_of(query) == NULL) {
            goto done;
        }
        PyObject *system = query->system, *params = query->params, *sql = query->sql;
        /* APSW's trace gives no parameters (None, system "sqlite"): not known. */
        int apsw = params == Py_None && PyUnicode_Check(system) &&
                   PyUnicode_CompareWithASCIIString(system, "sqlite") == 0;
        if (!apsw) {
            Py_hash_t sql_hash = PyObject_Hash(sql), params_hash = PyObject_Hash(params);
            if (sql_hash == -1 || params_hash == -1) {
                if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                    PyErr_Clear();
                    result = Py_NewRef(Py_NotImplemented);
                }
                goto done;
            }
            /* Unsigned: the product overflows, which a signed type may not do. */
            Py_hash_t hash =
                (Py_hash_t)((Py_uhash_t)sql_hash * 1000003u ^ (Py_uhash_t)params_hash);
            size_t slot = (size_t)hash & table.mask;
            int seen = 0;
            for (; !seen && table.slots[slot]; slot = (slot + 1) & table.mask) {
                Py_ssize_t j = table.slots[slot] - 1;
                if (hashes[j] != hash) {
                    continue;
                }
                QueryObject *other = (QueryObject *)items[j];
                int same = same_text(other->sql, sql);
                if (same > 0) {
                    PyObject *other_params = other->params;
                    same = other_params == params
                               ? 1
                               : PyObject_RichCompareBool(other_params, params, Py_EQ);
                }
                if (same < 0) {
                    goto done;
                }
                seen = same;
            }
            if (!seen) {
                hashes[i] = hash;
                table.slots[slot] = i + 1;
                distinct++;
            }
            known++;
        }
        PyObject *attribute = query->lazy;
        if (lazy == Py_None && attribute != Py_None) {
            int truth = PyObject_IsTrue(attribute);
            if (truth < 0) {
                goto done;
            }
            if (truth) {
                lazy = attribute;
            }
        }
        add_up(&total, &compensation, query->duration);
    }
    if (compensation != 0.0 && isfinite(compensation)) {
        total += compensation;
    }
    int same = known > 0 && known == size && distinct == 1;
    PyObject *count = known ? PyLong_FromSsize_t(distinct) : Py_NewRef(Py_None);
    PyObject *seconds = count == NULL ? NULL : PyFloat_FromDouble(total);
    result = seconds == NULL ? NULL : PyTuple_New(4);
    if (result == NULL) {
        Py_XDECREF(count);
        Py_XDECREF(seconds);
        goto done;
    }
    PyTuple_SET_ITEM(result, 0, count);
    PyTuple_SET_ITEM(result, 1, Py_NewRef(same ? Py_True : Py_False));
    PyTuple_SET_ITEM(result, 2, Py_NewRef(lazy));
    PyTuple_SET_ITEM(result, 3, seconds);
done:
    release_items(items, size);
    PyMem_Free(hashes);
    PyMem_Free(table.slots);
    return result;
}

/* Observations of one histogram entry gathered in C: its bucket counts and its sum,
 * added to the entry's own in ``flush_entry``. */
typedef struct {
    PyObject *entry; /* a new reference; NULL when none is open */
    long long added[65];
    double sum; /* the entry's sum, each value added in turn (as the Python loop adds) */
} Pending;

/* Writes what ``pending`` gathered into its entry and closes it; -1 on error. */
static int
flush_entry(Pending *pending, Py_ssize_t nbounds)
{
    PyObject *entry = pending->entry;
    if (entry == NULL) {
        return 0;
    }
    pending->entry = NULL;
    int failed = 0;
    for (Py_ssize_t j = 0; j <= nbounds && !failed; j++) {
        failed = pending->added[j] && list_add(entry, j, pending->added[j]) < 0;
    }
    PyObject *total = failed ? NULL : PyFloat_FromDouble(pending->sum);
    failed = total == NULL || PyList_SetItem(entry, nbounds + 1, total) < 0;
    Py_DECREF(entry);
    return failed ? -1 : 0;
}

/*
 * ``observe_queries(table, bounds, queries)``: each query's duration into the
 * per-thread histogram table of ``db_client_operation_duration_seconds``,
 * keyed by (db system, operation), as ``RequestStats.observe_queries`` does in
 * Python: entry = [count per bucket ..., +Inf count, sum]; ``bounds`` is a
 * tuple of floats. Measured on the 11-query route: ~25,000 instructions per
 * request in Python (a bisect over Python floats and a key tuple per query);
 * ~6,300 here with the entry's int and float objects replaced at every query,
 * fewer with consecutive queries of one entry counted in C and written once.
 */
static PyObject *
observe_queries(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_Check(args[0]) || !PyTuple_Check(args[1]) ||
        !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "observe_queries(table: dict, bounds: tuple, queries: list)");
        return NULL;
    }
    PyObject *table = args[0], *bounds = args[1], *queries = args[2];
    double limits[64];
    Py_ssize_t nbounds = PyTuple_GET_SIZE(bounds);
    if (nbounds > 64) {
        PyErr_SetString(PyExc_ValueError, "at most 64 bounds");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nbounds; i++) {
        if (!PyFloat_CheckExact(PyTuple_GET_ITEM(bounds, i))) {
            PyErr_SetString(PyExc_TypeError, "bounds must be a tuple of floats");
            return NULL;
        }
        limits[i] = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(bounds, i));
    }
    Pending pending = {NULL};
    /* Held: an entry made below can collect, and a finalizer can do anything to the
     * list; last_system and last_operation, compared by identity, stay these objects. */
    Py_ssize_t n = PyList_GET_SIZE(queries);
    PyObject **items = hold_items(queries, n);
    if (items == NULL) {
        return NULL;
    }
    PyObject *last_system = NULL, *last_operation = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        QueryObject *query = as_query(items[i]);
        PyObject *shape = query == NULL ? NULL : shape_of(query);
        if (shape == NULL) {
            goto fail;
        }
        PyObject *system = query->system, *operation = PyTuple_GET_ITEM(shape, 1);
        if (pending.entry == NULL || system != last_system || operation != last_operation) {
            if (flush_entry(&pending, nbounds) < 0) {
                goto fail;
            }
            PyObject *key = PyTuple_Pack(2, system, operation);
            PyObject *entry = key == NULL ? NULL : histogram_entry(table, key, nbounds + 1);
            Py_XDECREF(key);
            if (entry == NULL) {
                goto fail;
            }
            double sum = PyFloat_AsDouble(PyList_GET_ITEM(entry, nbounds + 1));
            if (sum == -1.0 && PyErr_Occurred()) {
                Py_DECREF(entry);
                goto fail;
            }
            memset(pending.added, 0, sizeof(pending.added));
            pending.entry = entry;
            pending.sum = sum;
            last_system = system;
            last_operation = operation;
        }
        pending.added[bucket_of(limits, nbounds, query->duration)]++;
        pending.sum += query->duration;
    }
    release_items(items, n);
    if (flush_entry(&pending, nbounds) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
fail: {
    /* What was counted before the bad query is written, as one at a time would have. */
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    release_items(items, n);
    if (flush_entry(&pending, nbounds) < 0) {
        PyErr_Clear();
    }
    PyErr_Restore(type, value, traceback);
    return NULL;
}
}

/* thread_stacks(max_depth, thread_id=None) -> {thread id: (frame, its caller, ...)}: each
 * thread's stack, top frame first, at most max_depth frames, read in ONE call.
 *
 * Why in C: walking another thread's stack in Python (frame.f_back, one bytecode at a
 * time) lets the GIL go between two steps; that thread then returns from, or suspends,
 * the frames being walked, and a later f_back reads its freed interpreter frame (ASan:
 * SEGV in _PyFrame_MakeAndSetFrameObject, bench/stress.py --sanitize, 3.11). Here no
 * bytecode runs from the first frame to the last, so no other thread moves meanwhile;
 * every frame object of the stack is made at once, and each then keeps its own f_back
 * when its frame ends. The caller turns the collector off around the call
 * (profiling/frames.py, gh-106883): then no allocation here runs a finalizer either.
 * perfagent/profiling/frames.py _python_stacks is the Python twin. */
static PyObject *
thread_stacks(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "thread_stacks(max_depth, thread_id=None)");
        return NULL;
    }
    Py_ssize_t max_depth = PyLong_AsSsize_t(args[0]);
    if (max_depth < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "max_depth < 0");
        }
        return NULL;
    }
    PyObject *only = nargs == 2 && args[1] != Py_None ? args[1] : NULL;
    PyObject *tops = _PyThread_CurrentFrames();
    if (tops == NULL) {
        return NULL;
    }
    PyObject *out = PyDict_New();
    PyObject *thread_id, *top;
    Py_ssize_t pos = 0;
    while (out != NULL && PyDict_Next(tops, &pos, &thread_id, &top)) {
        if (only != NULL) {
            int same = PyObject_RichCompareBool(thread_id, only, Py_EQ); /* two ints */
            if (same < 0) {
                Py_CLEAR(out);
                break;
            }
            if (!same) {
                continue;
            }
        }
        PyObject *stack = PyTuple_New(max_depth);
        if (stack == NULL) {
            Py_CLEAR(out);
            break;
        }
        Py_ssize_t depth = 0;
        PyFrameObject *frame = (PyFrameObject *)Py_NewRef(top);
        while (frame != NULL && depth < max_depth) {
            PyTuple_SET_ITEM(stack, depth++, (PyObject *)frame); /* the reference moves */
            frame = PyFrame_GetBack(frame);                      /* a new reference */
        }
        Py_XDECREF(frame);
        if (PyErr_Occurred() || _PyTuple_Resize(&stack, depth) < 0 ||
            PyDict_SetItem(out, thread_id, stack) < 0) {
            Py_XDECREF(stack);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(stack);
    }
    Py_DECREF(tops);
    return out;
}

static PyMethodDef speedups_functions[] = {
    {"repeats", (PyCFunction)(void (*)(void))repeats, METH_FASTCALL,
     "The N+1 detector's grouping of a request's queries."},
    {"observe_queries", (PyCFunction)(void (*)(void))observe_queries, METH_FASTCALL,
     "Query durations into a histogram table."},
    {"summary", summary, METH_O, "What one group of repeats says: distinct, identical, lazy, total."},
    {"use_record_type", use_record_type, METH_O, "The record class whose slots are read directly."},
    {"thread_stacks", (PyCFunction)(void (*)(void))thread_stacks, METH_FASTCALL,
     "Each thread's stack as a tuple of frames, top first, read with no other thread running."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "perfagent._speedups",
    .m_doc = "The per-query hook of sqlite3 in C (see perfagent/_speedups.c).",
    .m_size = -1,
    .m_methods = speedups_functions,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    str_done = PyUnicode_InternFromString("done");
    str_queries = PyUnicode_InternFromString("queries");
    str_past_cap = PyUnicode_InternFromString("past_cap");
    str_table = PyUnicode_InternFromString("table");
    str_operation = PyUnicode_InternFromString("operation");
    if (str_done == NULL || str_queries == NULL || str_past_cap == NULL || str_table == NULL ||
        str_operation == NULL) {
        return NULL;
    }
    if (PyType_Ready(&SqlHookType) < 0 || PyType_Ready(&QueryType) < 0) {
        return NULL;
    }
    PyObject *time_module = PyImport_ImportModule("time");
    PyObject *info = time_module == NULL ? NULL
                                         : PyObject_CallMethod(time_module, "get_clock_info",
                                                               "s", "perf_counter");
    PyObject *implementation = info == NULL ? NULL
                                            : PyObject_GetAttrString(info, "implementation");
    monotonic_is_perf_counter =
        implementation != NULL && PyUnicode_Check(implementation) &&
        PyUnicode_CompareWithASCIIString(implementation, "clock_gettime(CLOCK_MONOTONIC)") == 0;
    Py_XDECREF(implementation);
    Py_XDECREF(info);
    Py_XDECREF(time_module);
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "SqlHook", (PyObject *)&SqlHookType) < 0 ||
        PyModule_AddObjectRef(module, "Query", (PyObject *)&QueryType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
