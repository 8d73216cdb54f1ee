"""Tasks the app makes during a request carry the app line that made them.

A task's stack ends at its own coroutine: a query in ``one`` run by
``asyncio.gather(*[one(i) for i in ids])`` has no frame of the view above it,
so its call site would be ``one``'s line, and every view's gathered helper
would look like its own N+1. The loop's task factory puts the maker's app
sites into the new task's context (``callsite.spawned``); the call-site walk
goes on there when it finds no loop in the task (``AppFrames.capture``).

Outside a request the factory costs a context-variable read on top of the
task it makes; a task made inside one, a walk of its maker's frames (cached
like any walk that stops at a loop).
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Callable
from typing import Any

from perfagent.db.callsite import AppFrames, spawned
from perfagent.record import current

_frame = sys._getframe


def install(
    loop: asyncio.AbstractEventLoop, frames: AppFrames, on_error: Callable[[str, Exception], Any]
) -> Callable[[], None]:
    """Sets the factory on ``loop`` (over any the app set, which it calls); returns the
    undo, which puts the previous one back if ours is still in place."""
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        record = current.get()
        if record is not None and not record.done:
            try:
                sites = frames.spawn(_frame(1))
            except Exception as exc:
                on_error("db.tasks", exc)
                sites = None
            if sites:
                context = kwargs.pop("context", None)
                context = context.copy() if context is not None else contextvars.copy_context()
                context.run(spawned.set, sites)
                # A Task copies the context it is made in (3.10 takes no context=).
                return context.run(_make, previous, loop, coro, kwargs)
        return _make(previous, loop, coro, kwargs)

    factory.__perfagent_original__ = previous  # type: ignore[attr-defined]
    loop.set_task_factory(factory)

    def undo() -> None:
        if loop.get_task_factory() is factory:
            loop.set_task_factory(previous)

    undo.loop = loop  # type: ignore[attr-defined]
    return undo


def _make(previous: Any, loop: asyncio.AbstractEventLoop, coro: Any, kwargs: dict) -> Any:
    if previous is not None:
        return previous(loop, coro, **kwargs)
    return asyncio.Task(coro, loop=loop, **kwargs)
