"""``sys._current_frames()`` with no garbage collection while it runs.

CPython builds that dict holding the runtime's lock of thread states (3.11 at least:
gh-106883). An allocation there can collect; a finalizer it runs that lets the GIL go
(any query: the app's objects may issue them) then waits for the GIL while holding
that lock, and the thread that took the GIL waits for the lock (starting or ending a
thread takes it): the whole process hangs (bench/stress.py did, in under a minute).
With the collector off for the call, no finalizer runs inside it.
"""

from __future__ import annotations

import gc
import sys
from types import FrameType


def current_frames() -> dict[int, FrameType]:
    """Every thread's top frame, by thread id, as ``sys._current_frames()``."""
    if not gc.isenabled():
        return sys._current_frames()
    gc.disable()
    try:
        return sys._current_frames()
    finally:
        gc.enable()


try:  # built by pip where a C compiler is found (perfagent/_speedups.c)
    from perfagent._speedups import thread_stacks as _compiled_stacks
except ImportError:
    _compiled_stacks = None

Stacks = dict[int, tuple[FrameType, ...]]


def current_stacks(max_depth: int, compiled: bool = True, thread_id: int | None = None) -> Stacks:
    """Each thread's stack (or only ``thread_id``'s), top frame first, ``max_depth`` at most.

    Read another thread's stack only from these tuples, never with ``f_back``: between
    two Python steps of a walk that thread can return from the frames being walked, and
    on 3.11 a later ``f_back`` reads freed memory (the app crashed). The C function reads
    every stack in one call, with no other thread running; the Python twin
    (``PERFAGENT_COMPILED_HOOKS=0``, or no compiler) gives the same tuples one ``f_back``
    at a time, so it keeps that race.
    """
    if not (compiled and _compiled_stacks is not None):
        return _python_stacks(max_depth, thread_id)
    if not gc.isenabled():
        return _compiled_stacks(max_depth, thread_id)
    gc.disable()  # no finalizer runs inside the call (see above: gh-106883)
    try:
        return _compiled_stacks(max_depth, thread_id)
    finally:
        gc.enable()


def _python_stacks(max_depth: int, thread_id: int | None) -> Stacks:
    """``thread_stacks`` of perfagent/_speedups.c in Python: the reference."""
    out = {}
    for ident, frame in current_frames().items():
        if thread_id is not None and ident != thread_id:
            continue
        stack = []
        while frame is not None and len(stack) < max_depth:
            stack.append(frame)
            frame = frame.f_back
        out[ident] = tuple(stack)
    return out
