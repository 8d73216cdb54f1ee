"""Tasks the app makes during a request carry the app line that made them.

A task's stack ends at its own coroutine: a query in ``one`` run by
``asyncio.gather(*[one(i) for i in ids])`` has no frame of the view above it,
so its call site would be ``one``'s line, and every view's gathered helper
would look like its own N+1. The loop's task factory puts the maker's app
sites into the new task's context (``callsite.spawned``); the call-site walk
goes on there when it finds no loop in the task (``AppFrames.capture``).

Outside a request (under uvicorn: the one task the server makes per request)
the factory costs a call and a context-variable read, ~720 CPU instructions a
task (callgrind: 36,240 -> 36,960 a task made, run and gathered); a task made
inside one, a walk of its maker's frames as well.
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
    make = previous if previous is not None else _task
    running = current.get
    Task = asyncio.Task

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        record = running()
        if record is None or record.done:  # the server's own task of each request
            if previous is None:
                return Task(coro, loop=loop, **kwargs)
            return previous(loop, coro, **kwargs)
        try:
            sites = frames.spawn(_frame(1))
        except Exception as exc:
            on_error("db.tasks", exc)
            sites = None
        if not sites:
            return make(loop, coro, **kwargs)
        context = kwargs.pop("context", None)
        context = context.copy() if context is not None else contextvars.copy_context()
        context.run(spawned.set, sites)
        # A Task copies the context it is made in (3.10 takes no context=).
        return context.run(make, loop, coro, **kwargs)

    factory.__perfagent_original__ = previous  # type: ignore[attr-defined]
    loop.set_task_factory(factory)

    def undo() -> None:
        if loop.get_task_factory() is factory:
            loop.set_task_factory(previous)

    undo.loop = loop  # type: ignore[attr-defined]
    return undo


def _task(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
    return asyncio.Task(coro, loop=loop, **kwargs)
