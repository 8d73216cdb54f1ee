"""The one record each request gets, and the context variable that holds it.

Every feature writes into the current record (the adapter its timing, the DB
hooks their queries, the watchdog its stalls) and reads it when the request
ends. A context variable rather than a thread-local so that the record follows
the request into ``asyncio`` tasks, ``asyncio.gather`` and thread pools.
"""

from __future__ import annotations

import os
import random
from contextvars import ContextVar
from importlib import import_module
from operator import itemgetter
from typing import Any

from perfagent.tracecontext import incoming_headers, parse_traceparent

#: The record of the request being served in this context, or None.
current: ContextVar[RequestRecord | None] = ContextVar("perfagent.request", default=None)

_duration = itemgetter(5)  # Query.duration (perfagent/db/capture.py)

#: Where trace and span ids come from: a generator of the agent's own, never the
#: ``random`` module's, whose sequence is the app's (an app that seeds it for
#: reproducible data would get other numbers with the agent, which draws ids for
#: every request's head sample). Seeded again in every forked child, so workers that
#: seed ``random`` alike still draw ids of their own.
IDS = random.Random()
os.register_at_fork(after_in_child=IDS.seed)

#: ``RequestRecord.parent`` of a request whose caller sent no trace context.
ROOT_PARENT: tuple[int, None, None] = (0, None, None)

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
    """What the agent knows about one request: plain attributes, filled as it runs."""

    __slots__ = (
        "_span_id",
        "_trace_id",
        "carrier",
        "done",
        "end",
        "error_type",
        "findings",
        "first_byte",
        "foreign",
        "keep",
        "method",
        "mount_prefix",
        "otel_context",
        "parent",
        "past_cap",
        "profile",
        "queries",
        "resolver",
        "response_start",
        "route",
        "sampled",
        "samples",
        "spans",
        "start",
        "status",
        "streaming",
        "thread_wait",
    )

    def __init__(self, method: str, start: float, carrier: Any = None) -> None:
        # The compiled adapter makes records by copying the slots of one record made
        # here at import (``_perrequest.make_record``): a default that is not None, a
        # bool, an int, a float or a str makes it run this method instead.
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
        #: True when another instrumentation (OpenTelemetry's, FastAPI's) makes the
        #: server span: the agent then neither exports one nor invents trace ids.
        self.foreign = False
        #: Collapsed stacks sampled while the request ran long -> count; None if never sampled.
        self.samples: dict[str, int] | None = None
        #: The app's own timed blocks: (name, start, end, error type or None); None if none.
        self.spans: list[tuple[str, float, float, str | None]] | None = None
        #: Sample this request from its start (asked for with the profile header).
        self.profile = False
        #: Database queries issued while serving the request; None while there are none.
        self.queries: list[Any] | None = None
        #: The calls past ``max_calls_per_request`` (``db.capture.CallsPastCap``): counted,
        #: not kept; None while there are none.
        self.past_cap: Any = None
        #: Seconds spent waiting for a thread of the sync-code pool; -1.0 if never used.
        self.thread_wait = -1.0
        #: Findings of the detectors, as (event name, fields) pairs; None while there are none.
        self.findings: list[tuple[str, dict[str, Any]]] | None = None
        #: True once the request is to be exported as a trace.
        self.keep = False
        #: (parent span id, sampled flag, tracestate) of the caller; None until read.
        self.parent: tuple[int, bool | None, str | None] | None = None
        #: The head-sampling decision; None until asked.
        self.sampled: bool | None = None
        #: This request's OpenTelemetry SpanContext, once OpenTelemetry code asked for it.
        self.otel_context: Any = None
        self._trace_id = 0
        self._span_id = 0

    @property
    def duration(self) -> float:
        """Seconds from arrival to the last byte (or to now, while running)."""
        return (self.end or 0.0) - self.start

    @property
    def db_time(self) -> float:
        """Seconds spent in the request's queries so far (the ``db`` part of
        Server-Timing): summed when asked, once per request, rather than kept up
        to date by every query (~700 CPU instructions a query in the C hook)."""
        queries = self.queries
        seconds = sum(map(_duration, queries)) if queries else 0.0
        past = self.past_cap
        return seconds if past is None else seconds + past.duration

    @property
    def query_count(self) -> int:
        """Queries issued so far: those kept and those past the cap."""
        queries, past = self.queries, self.past_cap
        return (len(queries) if queries else 0) + (0 if past is None else past.count)

    def route_now(self) -> str | None:
        """The route template, asked of the framework if the response has not started."""
        if self.route is None and self.resolver is not None:
            try:
                return self.resolver(self)
            except Exception:
                return None
        return self.route

    def settled_trace_id(self) -> int:
        """The trace id, settled on first use: the caller's ``traceparent`` gives it
        (and ``parent``); otherwise it is random. Requests that never need one pay
        nothing."""
        if not self._trace_id:
            raw_parent, state = incoming_headers(self.carrier)
            parsed = parse_traceparent(raw_parent) if raw_parent else None
            if parsed is None:
                self._trace_id = IDS.getrandbits(128) or 1
                self.parent = ROOT_PARENT
            else:
                self._trace_id = parsed[0]
                self.parent = (parsed[1], parsed[2], state)
        return self._trace_id

    def trace_ids(self) -> tuple[int, int]:
        """(trace id, span id) of this request's server span, each settled on first use.

        The span id is drawn only when something asks for it (an export, OpenTelemetry
        code, a log record): the head sample and the findings' log lines need the
        trace id alone (a draw less a request: ~650 CPU instructions).
        """
        trace_id = self.settled_trace_id()
        if not self._span_id:
            self._span_id = IDS.getrandbits(64) or 1
        return trace_id, self._span_id

    @property
    def trace_id(self) -> str:
        """32 hex digits."""
        return f"{self.settled_trace_id():032x}"

    @property
    def span_id(self) -> str:
        """16 hex digits."""
        return f"{self.trace_ids()[1]:016x}"

    def add_finding(self, event: str, fields: dict[str, Any]) -> None:
        if self.findings is None:
            self.findings = []
        self.findings.append((event, fields))


# The compiled per-request and per-query code (where pip built it) read and write the
# record's slots directly.
for _compiled in ("perfagent._perrequest", "perfagent._speedups"):
    try:
        import_module(_compiled).use_record_type(RequestRecord)
    except ImportError:
        pass


def active() -> RequestRecord | None:
    """The record of the request running in this context, if it is still running."""
    record = current.get()
    if record is None or record.done:
        return None
    return record
