/*
 * What the compiled modules share about ``RequestRecord`` (perfagent/record.py):
 * it has ``__slots__``, and both read and write some of them directly rather than
 * through ``PyObject_GetAttr`` (the type's dictionaries, then a descriptor).
 * Included by _speedups.c (``done`` and ``queries``, per query) and _perrequest.c
 * (every slot the request's start and end touch).
 */
#ifndef PERFAGENT_RECORD_SLOTS_H
#define PERFAGENT_RECORD_SLOTS_H

#include <Python.h>
#include <structmember.h>

/* The offset of ``cls``'s writable object slot ``name``, or -1 when ``name`` is not
 * one (or with an error set, from the dictionary lookup). */
static inline Py_ssize_t
slot_member_offset(PyTypeObject *cls, PyObject *name)
{
    PyObject *descr = PyUnicode_Check(name) ? PyDict_GetItemWithError(cls->tp_dict, name) : NULL;
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        return -1;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    return member->type == T_OBJECT_EX && !(member->flags & READONLY) ? member->offset : -1;
}

#endif
