"""The agent's own log events: one line each on stderr, readable or JSON.

The lines are the ones structlog users know (``key=value`` after the level and
the event; or one JSON object with ``event``, ``level``, ``timestamp`` and
``logger``), written by a small logger of our own rather than through
structlog, for two measured reasons:

- Start-up: ``import structlog`` runs its package ``__init__``, which imports
  ``structlog.dev``, which imports ``rich`` when it is installed (FastAPI's CLI
  brings it). That import added 70-90 ms to starting an app under the agent
  (``-X importtime``: 92 ms of a 257 ms bootstrap, Flask app, rich installed),
  against a budget of 150 ms for the whole agent.
- The request path: an N+1 route logs a finding on every request. structlog's
  own processors cost 30.5 µs per ``n_plus_one`` event (``ConsoleRenderer``),
  its dispatch alone ~3-4 µs. This writer renders and writes the same line in
  9 µs, against 16 µs for the same renderer behind structlog's bound logger
  (readable format, repeated strings' ``key=value`` texts remembered).

Lines are rendered and written off the request path, as logging's
``QueueHandler`` does: an event is a timestamp and its values appended to a
bounded queue, which the agent thread renders and writes every
``WRITE_EVERY_S`` in one write (measured on the benchmark's N+1 route:
rendering and writing its line in place cost 57,000 CPU instructions and ~8 µs
a request; queued and written in batches, 25,000 and ~3 µs, as a batch runs
with warm caches and one system call). A prepared line rendered in C is
rendered in place instead, and queued as text (see ``EventLog.prepare``).
Lines appear at most that much later and in order;
while no agent thread runs (start-up, after shutdown, a forked worker before
its first request) each is written at once, and a request thread writes the
queue itself when it is full, so a stuck agent thread loses no line.

The app's own structlog or logging configuration is neither read nor changed.
"""

from __future__ import annotations

import json
import json.encoder
import os
import re
import sys
import threading
import time
from collections import deque
from typing import Any, TextIO

try:  # built by pip where a C compiler is found (perfagent/_perrequest.c)
    from perfagent._perrequest import PreparedLine, QueuedLine
except ImportError:
    PreparedLine = QueuedLine = None

#: How often the agent thread writes the queued lines.
WRITE_EVERY_S = 0.1
#: Queued lines past which the thread that logs writes them itself.
MAX_QUEUED = 1000

_LOGGER_NAME = "perfagent"
_COLORS = {"error": "\x1b[31;1m", "warning": "\x1b[33m", "info": "\x1b[32m"}
_RESET = "\x1b[0m"


class _Clock:
    """ISO-8601 UTC timestamps with microseconds; the date part is formatted once a second."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def format(self, now: float) -> str:
        """``now`` (a ``time.time()``) as text."""
        second = int(now)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._text}.{int((now - second) * 1e6):06d}Z"


#: What ``json`` itself writes a str as (with ensure_ascii=False).
_json_string = json.encoder.encode_basestring
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
            text = _pair(key, value)
        parts.append(text)
    return " ".join(parts)


def _pair(key: str, value: Any) -> str:
    if key == "trace_id" and value.__class__ is str:
        return f"trace_id={value}"  # 32 hex digits of our own: one token, no regex
    return f"{key}={_value(value)}"


class ConsoleLine:
    """``2026-11-21T01:03:14.596376Z [warning  ] n_plus_one  [perfagent] key=value ...``;
    a ``stack`` (list of frames) follows on lines of its own."""

    def __init__(self, colors: bool, compiled: bool = True) -> None:
        self._clock = _Clock()
        self._colors = colors
        self._known: dict[tuple[str, str], str] = {}
        #: Prepared lines rendered in C where it was built (PERFAGENT_COMPILED_HOOKS).
        self._compiled = compiled and PreparedLine is not None

    def __call__(self, now: float, event: tuple[str, str, dict[str, Any]]) -> str:
        level, name, fields = event
        stack = fields.pop("stack", None)
        pairs = _pairs(fields, self._known)
        line = f"{self._clock.format(now)} {self._head(level, name)}{pairs}"
        if isinstance(stack, list):
            line += "".join(f"\n    {frame}" for frame in stack)
        elif stack is not None:
            line += f"\n{stack}"
        return line

    def _head(self, level: str, event: str) -> str:
        label = f"[{level:<9}]"
        if self._colors:
            label = f"{_COLORS.get(level, '')}{label}{_RESET}"
        return f"{label} {event:<30} [{_LOGGER_NAME}] "

    def prepare(self, level: str, event: str, fields: dict[str, Any]) -> Any:
        """``render(now, values)`` for lines whose ``fields`` repeat but for the keys
        whose value is ``VARIES``, given in that order: the line ``__call__`` renders."""
        head = self._head(level, event)
        parts: list[str] = []
        slots: list[tuple[int, str]] = []
        for key, value in sorted(fields.items()):
            if value is VARIES:
                slots.append((len(parts), key))
                parts.append("")
            else:
                parts.append(_pair(key, value))
        order = [key for key in fields if fields[key] is VARIES]
        slots.sort(key=lambda slot: order.index(slot[1]))
        # Numbers and the trace id are written as _pair writes them, without its calls
        # (the N+1 route's line: 25,200 instructions with them, 22,300 so).
        plan = [(index, f"{key}=", key == "trace_id") for index, key in slots]
        if self._compiled:
            # The same line in C: ~12,000 CPU instructions fewer a line (the N+1 route's;
            # 1.47 -> 0.42 µs in a loop).
            return PreparedLine(head, parts, tuple(plan), _value)
        clock = self._clock

        def render(now: float, values: tuple) -> str:
            line = parts.copy()
            for (index, prefix, trace), value in zip(plan, values, strict=True):
                cls = value.__class__
                if cls is int or cls is float:
                    line[index] = prefix + repr(value)
                elif trace and cls is str:
                    line[index] = prefix + value
                else:
                    line[index] = prefix + _value(value)
            return f"{clock.format(now)} {head}{' '.join(line)}"

        return render


#: In ``EventLog.prepare``'s fields: the value is given at each event.
VARIES: Any = type("Varies", (), {"__repr__": lambda self: "VARIES"})()


class JsonLine:
    """One JSON object: the event's keys plus ``event``, ``level``, ``timestamp``, ``logger``."""

    def __init__(self) -> None:
        self._clock = _Clock()
        self._encode = json.JSONEncoder(default=repr, ensure_ascii=False).encode

    def __call__(self, now: float, event: tuple[str, str, dict[str, Any]]) -> str:
        level, name, fields = event
        fields["event"] = name
        fields["level"] = level
        fields["timestamp"] = self._clock.format(now)
        fields.setdefault("logger", _LOGGER_NAME)
        return self._encode(fields)

    def prepare(self, level: str, event: str, fields: dict[str, Any]) -> Any:
        """As ``ConsoleLine.prepare``: each fixed ``"key": value`` is encoded once."""
        encode = self._encode
        parts: list[str] = []
        slots: list[int] = []
        for key, value in fields.items():
            if value is VARIES:
                slots.append(len(parts))
                parts.append(encode(key) + ": ")
            else:
                parts.append(encode({key: value})[1:-1])
        tail = encode({"event": event, "level": level})[1:-1]
        logger = "" if "logger" in fields else ', "logger": ' + encode(_LOGGER_NAME)
        clock = self._clock

        def render(now: float, values: tuple) -> str:
            line = parts.copy()
            for index, value in zip(slots, values, strict=True):
                cls = value.__class__
                if cls is str:
                    line[index] += _json_string(value)
                elif cls is int or value is None:
                    line[index] += "null" if value is None else int.__repr__(value)
                else:
                    line[index] += encode(value)
            return f'{{{", ".join(line)}, {tail}, "timestamp": "{clock.format(now)}"{logger}}}'

        return render


class EventLog:
    """``log.warning("n_plus_one", route=..., ...)``: one line per event.

    Safe from any thread. Events are queued in order and written by ``write()``,
    under a lock, so lines from the loop, the pool threads and the agent's
    threads never interleave. While ``deferred`` is False (no agent thread to
    call ``write()``) each event is written at once.
    """

    __slots__ = ("_lock", "_queue", "_render", "_stream", "deferred")

    def __init__(self, render: Any, stream: TextIO) -> None:
        self._render = render
        self._stream = stream
        self._lock = threading.Lock()
        #: Each event not yet written: (time.time(), render, its values), or its line.
        self._queue: deque[tuple[float, Any, Any] | str] = deque()
        self.deferred = False

    def _add(self, render: Any, values: Any) -> None:
        queue = self._queue
        queue.append((time.time(), render, values))
        if not self.deferred or len(queue) >= MAX_QUEUED:
            self.write()

    def write(self) -> None:
        """Renders the queued events, oldest first, and writes them in one write.

        An event that fails to render is skipped, the others are written, and
        the first such error is raised after (to the caller's guard).
        """
        error = None
        with self._lock:
            queue = self._queue
            lines = []
            while queue:
                entry = queue.popleft()
                if entry.__class__ is str:
                    lines.append(entry)
                    continue
                now, render, values = entry
                try:
                    lines.append(render(now, values))
                except Exception as exc:
                    error = error or exc
            if lines:
                lines.append("")
                self._stream.write("\n".join(lines))
                self._stream.flush()
        if error is not None:
            raise error

    def prepare(self, level: str, event: str, **fields: Any) -> Any:
        """``emit(*values)`` for an event logged again and again with the same fields
        but those given as ``VARIES`` (their values, in order, at each call).

        A finding that repeats on every request of a route repeats its route,
        query, call site and advice: those are rendered once here.
        """
        render = self._render.prepare(level, event, fields)
        if PreparedLine is not None and render.__class__ is PreparedLine:
            # Rendered in place (~0.4 µs) and queued as text: a str is no work for
            # the garbage collector, where each queued (time, render, values) was a
            # tuple pair living up to WRITE_EVERY_S, traversed by every young
            # collection meanwhile and often promoted to the old generation
            # (measured under uvicorn on the N+1 route, 16 connections: garbage
            # collection took 34.3 µs a request with the tuples, 25.0 with the text;
            # 19.9 without the agent). Rendered and queued in one C call.
            return QueuedLine(render, self._queue, self, MAX_QUEUED)
        add = self._add

        def emit(*values: Any) -> None:
            add(render, values)

        return emit

    def info(self, event: str, **fields: Any) -> None:
        self._add(self._render, ("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self._add(self._render, ("warning", event, fields))

    def error(self, event: str, **fields: Any) -> None:
        self._add(self._render, ("error", event, fields))

    def after_fork_in_child(self) -> None:
        """The parent writes what it had queued; the child starts writing at once."""
        self._queue.clear()
        self._lock = threading.Lock()
        self.deferred = False


def make_logger(log_format: str, stream: TextIO | None = None, compiled: bool = True) -> EventLog:
    """The agent's logger, configured once at start; ``stream`` defaults to stderr;
    ``compiled``: prepared console lines rendered in C where it was built."""
    # No stderr at all (pythonw, some daemons): the events go nowhere rather than fail.
    target = stream or sys.stderr or open(os.devnull, "w")  # noqa: SIM115 - lives as long as the agent
    if log_format == "json":
        return EventLog(JsonLine(), target)
    colors = bool(getattr(target, "isatty", bool)())
    return EventLog(ConsoleLine(colors, compiled), target)
