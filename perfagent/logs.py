"""Tie your app's own log lines to the request they were written in.

Both helpers read the current request's record; outside a request they add
nothing (structlog) or empty strings (stdlib), so they are safe everywhere.
"""

from __future__ import annotations

import logging
from typing import Any

from perfagent import record as _record

__all__ = ["RequestContextFilter", "add_request_context"]


def add_request_context(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: adds ``trace_id``, ``span_id`` and ``route`` of the current request.

    Put it in your own chain, before the renderer::

        structlog.configure(processors=[..., perfagent.logs.add_request_context, renderer])

    Outside a request it adds nothing.
    """
    record = _record.active()
    if record is not None:
        trace_id, span_id = _ids(record)
        event_dict.setdefault("trace_id", trace_id)
        event_dict.setdefault("span_id", span_id)
        event_dict.setdefault("route", record.route_now())
    return event_dict


def _ids(record: _record.RequestRecord) -> tuple[str, str]:
    if record.foreign:  # another instrumentation's span is the request's: use its ids
        from perfagent.export.otel_context import foreign_ids

        ids = foreign_ids()
        if ids is not None:
            return ids
    return record.trace_id, record.span_id


class RequestContextFilter(logging.Filter):
    """stdlib logging filter: sets ``trace_id``, ``span_id`` and ``route`` on each record.

    Outside a request the three attributes are empty strings, so a format such as
    ``"%(message)s trace=%(trace_id)s"`` works everywhere::

        handler.addFilter(perfagent.logs.RequestContextFilter())
    """

    def filter(self, log_record: logging.LogRecord) -> bool:
        record = _record.active()
        if record is None:
            log_record.trace_id = log_record.span_id = log_record.route = ""
        else:
            log_record.trace_id, log_record.span_id = _ids(record)
            log_record.route = record.route_now() or ""
        return True
