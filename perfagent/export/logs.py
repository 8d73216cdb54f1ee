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
from typing import Any, TextIO

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

    def __init__(self, colors: bool) -> None:
        self._clock = _Clock()
        self._colors = colors
        self._known: dict[tuple[str, str], str] = {}

    def __call__(self, level: str, event: str, fields: dict[str, Any]) -> str:
        stack = fields.pop("stack", None)
        pairs = _pairs(fields, self._known)
        line = f"{self._clock.now()} {self._head(level, event)}{pairs}"
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
        """``render(values)`` for lines whose ``fields`` repeat but for the keys whose
        value is ``VARIES``, given in that order: the same line ``__call__`` renders."""
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
        clock = self._clock

        def render(values: tuple) -> str:
            line = parts.copy()
            for (index, key), value in zip(slots, values, strict=True):
                line[index] = _pair(key, value)
            return f"{clock.now()} {head}{' '.join(line)}"

        return render


#: In ``EventLog.prepare``'s fields: the value is given at each event.
VARIES: Any = type("Varies", (), {"__repr__": lambda self: "VARIES"})()


class JsonLine:
    """One JSON object: the event's keys plus ``event``, ``level``, ``timestamp``, ``logger``."""

    def __init__(self) -> None:
        self._clock = _Clock()
        self._encode = json.JSONEncoder(default=repr, ensure_ascii=False).encode

    def __call__(self, level: str, event: str, fields: dict[str, Any]) -> str:
        fields["event"] = event
        fields["level"] = level
        fields["timestamp"] = self._clock.now()
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

        def render(values: tuple) -> str:
            line = parts.copy()
            for index, value in zip(slots, values, strict=True):
                cls = value.__class__
                if cls is str:
                    line[index] += _json_string(value)
                elif cls is int or value is None:
                    line[index] += "null" if value is None else int.__repr__(value)
                else:
                    line[index] += encode(value)
            return f'{{{", ".join(line)}, {tail}, "timestamp": "{clock.now()}"{logger}}}'

        return render


class EventLog:
    """``log.warning("n_plus_one", route=..., ...)``: one line per event.

    Safe from any thread: a line is written and flushed under a lock, so lines
    from the loop, the pool threads and the agent's threads never interleave.
    """

    __slots__ = ("_lock", "_render", "_stream")

    def __init__(self, render: Any, stream: TextIO) -> None:
        self._render = render
        self._stream = stream
        self._lock = threading.Lock()

    def _write(self, line: str) -> None:
        with self._lock:
            self._stream.write(line)
            self._stream.flush()

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        self._write(self._render(level, event, fields) + "\n")

    def prepare(self, level: str, event: str, **fields: Any) -> Any:
        """``emit(*values)`` for an event logged again and again with the same fields
        but those given as ``VARIES`` (their values, in order, at each call).

        A finding that repeats on every request of a route repeats its route,
        query, call site and advice: those are rendered once here.
        """
        render = self._render.prepare(level, event, fields)
        write = self._write

        def emit(*values: Any) -> None:
            write(render(values) + "\n")

        return emit

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)


def make_logger(log_format: str, stream: TextIO | None = None) -> EventLog:
    """The agent's logger, configured once at start; ``stream`` defaults to stderr."""
    # No stderr at all (pythonw, some daemons): the events go nowhere rather than fail.
    target = stream or sys.stderr or open(os.devnull, "w")  # noqa: SIM115 - lives as long as the agent
    if log_format == "json":
        return EventLog(JsonLine(), target)
    return EventLog(ConsoleLine(colors=bool(getattr(target, "isatty", bool)())), target)
