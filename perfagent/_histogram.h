/*
 * What the compiled modules share about the agent's per-thread histogram tables
 * (perfagent/export/stats.py): an entry is a list
 * [count per bucket ..., +Inf count, sum], keyed by label values in a dict.
 * Included by _speedups.c (the query histogram) and _perrequest.c (the request
 * histograms, the counters).
 */
#ifndef PERFAGENT_HISTOGRAM_H
#define PERFAGENT_HISTOGRAM_H

#include <Python.h>

/* list[index] += 1, the item an int; -1 on error. */
static inline int
list_increment(PyObject *list, Py_ssize_t index)
{
    long long count = PyLong_AsLongLong(PyList_GET_ITEM(list, index));
    if (count == -1 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *value = PyLong_FromLongLong(count + 1);
    return value == NULL ? -1 : PyList_SetItem(list, index, value);
}

/* table[key], made as [0, ..., 0, 0.0] (width + 1 items) when new; a new reference,
 * or NULL with an error set (TypeError for an entry of another size). */
static inline PyObject *
histogram_entry(PyObject *table, PyObject *key, Py_ssize_t width)
{
    PyObject *entry = PyDict_GetItemWithError(table, key);
    if (entry != NULL) {
        Py_INCREF(entry);
    }
    else if (!PyErr_Occurred()) {
        entry = PyList_New(width + 1);
        for (Py_ssize_t j = 0; entry != NULL && j <= width; j++) {
            PyObject *zero = j < width ? PyLong_FromLong(0) : PyFloat_FromDouble(0.0);
            if (zero == NULL) {
                Py_CLEAR(entry);
                break;
            }
            PyList_SET_ITEM(entry, j, zero);
        }
        if (entry != NULL && PyDict_SetItem(table, key, entry) < 0) {
            Py_CLEAR(entry);
        }
    }
    if (entry != NULL && (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) != width + 1)) {
        PyErr_SetString(PyExc_TypeError, "a histogram entry of another size");
        Py_CLEAR(entry);
    }
    return entry;
}

/* list[index] += amount, the item an int; -1 on error. */
static inline int
list_add(PyObject *list, Py_ssize_t index, long long amount)
{
    long long count = PyLong_AsLongLong(PyList_GET_ITEM(list, index));
    if (count == -1 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *value = PyLong_FromLongLong(count + amount);
    return value == NULL ? -1 : PyList_SetItem(list, index, value);
}

/* The bucket of ``value``: ``bisect_left(bounds, value)``. */
static inline Py_ssize_t
bucket_of(const double *bounds, Py_ssize_t nbounds, double value)
{
    Py_ssize_t low = 0, high = nbounds;
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        if (bounds[middle] < value) {
            low = middle + 1;
        }
        else {
            high = middle;
        }
    }
    return low;
}

/* One observation into an entry: the bucket ``bisect_left(bounds, value)`` and the
 * sum, as ``stats._observe`` does; -1 on error. */
static inline int
histogram_add(PyObject *entry, const double *bounds, Py_ssize_t nbounds, double value)
{
    if (list_increment(entry, bucket_of(bounds, nbounds, value)) < 0) {
        return -1;
    }
    double sum = PyFloat_AsDouble(PyList_GET_ITEM(entry, nbounds + 1));
    PyObject *total = sum == -1.0 && PyErr_Occurred() ? NULL : PyFloat_FromDouble(sum + value);
    return total == NULL ? -1 : PyList_SetItem(entry, nbounds + 1, total);
}

#endif
