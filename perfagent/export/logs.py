"""The agent's own log events.

The agent logs through a structlog logger of its own, so the app's structlog
configuration is neither read nor changed. With ``log_format="json"`` each event
is one JSON object per line on stderr; otherwise a readable line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


def make_logger(log_format: str, stream: TextIO | None = None) -> Any:
    """A structlog logger for the agent's events, configured once at start."""
    renderer: Any
    extra: list[Any] = []
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        target = stream or sys.stderr
        renderer = structlog.dev.ConsoleRenderer(colors=bool(getattr(target, "isatty", bool)()))
        extra.append(_stack_as_text)
    return structlog.wrap_logger(
        structlog.PrintLogger(stream or sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_logger_name,
            *extra,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )


def _stack_as_text(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """ConsoleRenderer prints a ``stack`` key as text; findings carry a list of frames."""
    stack = event_dict.get("stack")
    if isinstance(stack, list):
        event_dict["stack"] = "\n".join(str(frame) for frame in stack)
    return event_dict


def _add_logger_name(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict.setdefault("logger", "perfagent")
    return event_dict
