"""``@perfagent.timed`` and ``with perfagent.span("name"):`` for the app's own code.

Each use records (name, start, end, error) in the current request's record;
kept traces carry them as INTERNAL spans under the request's server span.
Outside a request, or with the agent off, they cost a context-variable read
and record nothing. One decorator serves sync and async functions alike.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from time import perf_counter
from typing import Any, TypeVar

from perfagent.record import current

F = TypeVar("F", bound=Callable[..., Any])


class span:
    """Times a block of the app's code as a child span of the current request."""

    __slots__ = ("_record", "_start", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._record: Any = None
        self._start = 0.0

    def __enter__(self) -> span:
        record = current.get()
        self._record = None if record is None or record.done else record
        self._start = perf_counter()
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        record = self._record
        if record is not None:
            end = perf_counter()
            item = (self.name, self._start, end, None if kind is None else kind.__qualname__)
            if record.spans is None:
                record.spans = [item]
            else:
                record.spans.append(item)

    def __call__(self, func: F) -> F:
        return timed(func, name=self.name)


def timed(func: F | None = None, *, name: str | None = None) -> Any:
    """Decorator: ``@perfagent.timed`` or ``@perfagent.timed(name="render")``."""
    if func is None:
        return lambda f: timed(f, name=name)
    label = name or func.__qualname__
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            with span(label):
                return await func(*args, **kwargs)

        return run_async

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        with span(label):
            return func(*args, **kwargs)

    return run
