"""How long each request waited for a thread of the pool that runs sync code.

FastAPI and Starlette run ``def`` endpoints and sync dependencies through
``anyio.to_thread.run_sync``: the wait is the time between that call and the
function starting on a pool thread. One reversible patch of ``run_sync``;
outside a request it costs a context-variable read, inside one a wrapper.
"""

from __future__ import annotations

from time import perf_counter
from types import ModuleType
from typing import Any

from perfagent.patching import Patch
from perfagent.record import current

try:  # built by pip where a C compiler is found (perfagent/_perrequest.c)
    from perfagent._perrequest import RunSync
except ImportError:
    RunSync = None


def install(module: ModuleType, patches: list[Patch], compiled: bool = True) -> None:
    """Post-import hook for ``anyio.to_thread``; ``compiled``: the patch in C
    (``_perrequest.RunSync``, the same work) where it was built."""
    original = module.run_sync
    if compiled and RunSync is not None:
        # The 11-query route (a ``def`` view): 1,077.3k -> 1,070.2k CPU instructions a
        # request against the closure below.
        patches.append(Patch(module, "run_sync", RunSync(original, current)))
        return

    # A plain function returning anyio's coroutine, not a coroutine of its own: one
    # frame less each time the awaiting task resumes (as the ASGI adapter's send).
    def run_sync(func: Any, *args: Any, **kwargs: Any) -> Any:
        record = current.get()
        if record is None or record.done:
            return original(func, *args, **kwargs)
        queued = perf_counter()

        def started(*inner: Any) -> Any:
            waited = perf_counter() - queued
            record.thread_wait = waited if record.thread_wait < 0 else record.thread_wait + waited
            return func(*inner)

        return original(started, *args, **kwargs)

    patches.append(Patch(module, "run_sync", run_sync))
