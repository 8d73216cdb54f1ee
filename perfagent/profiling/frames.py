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
