"""The one record each request gets, and the context variable that holds it.

Every feature writes into the current record (the adapter its timing, the DB
hooks their queries, the watchdog its stalls) and reads it when the request
ends. A context variable rather than a thread-local so that the record follows
the request into ``asyncio`` tasks, ``asyncio.gather`` and thread pools.
"""

from __future__ import annotations

import random
from contextvars import ContextVar
from typing import Any

#: The record of the request being served in this context, or None.
current: ContextVar[RequestRecord | None] = ContextVar("perfagent.request", default=None)

KNOWN_METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY")
)


def normalize_method(method: str) -> str:
    """The method as a metric label: one of the known methods or ``_OTHER``.

    Unknown methods are folded (as the OpenTelemetry HTTP conventions say) so a
    client cannot create a new time series per made-up method.
    """
    return method if method in KNOWN_METHODS else "_OTHER"


class RequestRecord:
    """What the agent knows about one request; plain attributes, no logic."""

    __slots__ = (
        "_span_id",
        "_trace_id",
        "carrier",
        "done",
        "end",
        "error_type",
        "first_byte",
        "method",
        "mount_prefix",
        "resolver",
        "response_start",
        "route",
        "start",
        "status",
        "streaming",
    )

    def __init__(self, method: str, start: float, carrier: Any = None) -> None:
        self.method = method
        #: perf_counter() when the request reached the agent.
        self.start = start
        #: The ASGI scope or WSGI environ, kept to read headers only when needed.
        self.carrier = carrier
        #: Route template; None until the adapter has settled it at response start.
        self.route: str | None = None
        #: The adapter's ``resolver(record)``: the route matched so far, or None.
        self.resolver: Any = None
        #: Route templates of the mounts passed on the way in, joined.
        self.mount_prefix = ""
        self.status: int | None = None
        self.error_type: str | None = None
        self.response_start: float | None = None
        self.first_byte: float | None = None
        self.end: float | None = None
        #: True when the body went out in more than one piece (streaming, SSE).
        self.streaming = False
        self.done = False
        self._trace_id = 0
        self._span_id = 0

    @property
    def duration(self) -> float:
        """Seconds from arrival to the last byte (or to now, while running)."""
        return (self.end or 0.0) - self.start

    def route_now(self) -> str | None:
        """The route template, asked of the framework if the response has not started."""
        if self.route is None and self.resolver is not None:
            try:
                return self.resolver(self)
            except Exception:
                return None
        return self.route

    @property
    def trace_id(self) -> str:
        """32 hex digits; chosen on first use so requests that never need one pay nothing."""
        if not self._trace_id:
            self._trace_id = random.getrandbits(128) or 1
        return f"{self._trace_id:032x}"

    @property
    def span_id(self) -> str:
        if not self._span_id:
            self._span_id = random.getrandbits(64) or 1
        return f"{self._span_id:016x}"


def active() -> RequestRecord | None:
    """The record of the request running in this context, if it is still running."""
    record = current.get()
    if record is None or record.done:
        return None
    return record
