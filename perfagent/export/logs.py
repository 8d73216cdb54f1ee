"""The agent's own log events.

The agent logs through a structlog logger of its own, so the app's structlog
configuration is neither read nor changed. With ``log_format="json"`` each event
is one JSON object per line on stderr; otherwise a readable ``key=value`` line.

Why one renderer of our own instead of structlog's processors: an N+1 route
logs a finding on every request, so the log call is on that route's hot path.
Measured per ``n_plus_one`` event (11 keys, to /dev/null): structlog's
``add_log_level`` + ``TimeStamper`` + ``ConsoleRenderer`` chain 30.5 µs, the same
chain with ``JSONRenderer`` 13.5 µs; one processor doing the level, the time
and the rendering 11 µs readable and 9.6 µs JSON (of which ~3 µs is structlog's
own dispatch and ~1.5 µs the write). Remembering the ``key=value`` texts of
repeated strings and binding the logger once took the readable event from 16 to
12 µs on a slower machine (render alone 8.5 -> 6.3 µs).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

import structlog

_LOGGER_NAME = "perfagent"
_COLORS = {"error": "\x1b[31;1m", "warning": "\x1b[33m", "info": "\x1b[32m"}
_RESET = "\x1b[0m"


class _Clock:
    """ISO-8601 UTC timestamps with microseconds; the date part is formatted once a second."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._text}.{int((now - second) * 1e6):06d}Z"


_PLAIN = re.compile(r"[^\s='\"\\]+")


def _value(value: Any) -> str:
    """Strings bare when they read as one token (``/items/{id}``, ``app.py:12``), else quoted."""
    if value.__class__ is str:
        return value if _PLAIN.fullmatch(value) else repr(value)
    return str(value)


def _pairs(event_dict: dict[str, Any], known: dict[tuple[str, str], str]) -> str:
    """``key=value ...`` in key order. The texts of string items are remembered
    (bounded): a finding that repeats on every request repeats its route, query,
    call site and advice, and quoting those (a regex and a ``repr`` each) was a
    third of the line's cost. Numbers and trace ids are new each time."""
    parts = []
    for key, value in sorted(event_dict.items()):
        if value.__class__ is str and key != "trace_id":
            text = known.get((key, value))
            if text is None:
                if len(known) >= 4096:
                    known.clear()
                text = known[(key, value)] = f"{key}={_value(value)}"
        else:
            text = f"{key}={_value(value)}"
        parts.append(text)
    return " ".join(parts)


class ConsoleLine:
    """``2026-11-21T01:03:14.596376Z [warning  ] n_plus_one  [perfagent] key=value ...``;
    a ``stack`` (list of frames) follows on lines of its own."""

    def __init__(self, colors: bool) -> None:
        self._clock = _Clock()
        self._colors = colors
        self._known: dict[tuple[str, str], str] = {}

    def __call__(self, _logger: Any, method: str, event_dict: dict[str, Any]) -> str:
        event = event_dict.pop("event", "")
        event_dict.pop("logger", None)
        stack = event_dict.pop("stack", None)
        level = f"[{method:<9}]"
        if self._colors:
            level = f"{_COLORS.get(method, '')}{level}{_RESET}"
        pairs = _pairs(event_dict, self._known)
        line = f"{self._clock.now()} {level} {event:<30} [{_LOGGER_NAME}] {pairs}"
        if isinstance(stack, list):
            line += "".join(f"\n    {frame}" for frame in stack)
        elif stack is not None:
            line += f"\n{stack}"
        return line


class JsonLine:
    """One JSON object: the event's keys plus ``event``, ``level``, ``timestamp``, ``logger``."""

    def __init__(self) -> None:
        self._clock = _Clock()
        self._encode = json.JSONEncoder(default=repr, ensure_ascii=False).encode

    def __call__(self, _logger: Any, method: str, event_dict: dict[str, Any]) -> str:
        event_dict["level"] = method
        event_dict["timestamp"] = self._clock.now()
        event_dict.setdefault("logger", _LOGGER_NAME)
        return self._encode(event_dict)


def make_logger(log_format: str, stream: TextIO | None = None) -> Any:
    """A structlog logger for the agent's events, configured once at start."""
    target = stream or sys.stderr
    if log_format == "json":
        renderer: Any = JsonLine()
    else:
        renderer = ConsoleLine(colors=bool(getattr(target, "isatty", bool)()))
    # Bound here, once: the lazy proxy that wrap_logger returns would build the
    # bound logger's method again on every call.
    return structlog.wrap_logger(
        structlog.PrintLogger(target),
        processors=[renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    ).bind()
