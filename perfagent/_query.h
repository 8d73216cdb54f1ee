/*
 * The layout of ``_speedups.Query``, one query of a request (perfagent/db/capture.py
 * documents its fields), shared by both compiled modules: _speedups.c makes them and
 * groups them, _perrequest.c sums their durations for Server-Timing and reads the
 * first of a group when it reports an N+1.
 *
 * A struct and not a NamedTuple: the durations stay C doubles (no float object
 * made per query and unboxed again by every reader), and the type is not one the
 * garbage collector tracks. A tuple, tracked or not, counts toward the young
 * generation's threshold when it is made; the 11 tuples a request of the
 * benchmark's 11-query route held from its first query to its end were, measured
 * under uvicorn, the agent's whole excess of young collections. No reference cycle
 * can pass through a Query: nothing the app holds refers to it.
 */
#ifndef PERFAGENT_QUERY_H
#define PERFAGENT_QUERY_H

#include <Python.h>

typedef struct {
    PyObject_HEAD
    PyObject *system; /* "sqlite", "postgresql", ... */
    PyObject *sql;    /* the statement as sent */
    PyObject *shape;  /* its Shape (fingerprint, operation, batched, control) */
    PyObject *params; /* the parameters, or None */
    double start;     /* perf_counter() when it was sent */
    double duration;  /* seconds */
    Py_ssize_t many;  /* rows of an executemany, 0 for an execute */
    PyObject *sites;  /* the app's frames it came from: ((code, offset, line), ...) */
    PyObject *lazy;   /* 'Post.comments' when SQLAlchemy lazy-loaded it, or None */
} QueryObject;

/* The number of fields, as a sequence (``query[5]`` is the duration, as it was for
 * the NamedTuple). */
#define QUERY_FIELDS 9

#endif
