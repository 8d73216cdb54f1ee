"""The one entry point every driver hook calls after a query ran.

A query outside any request (start-up, a background job) is not charged to
anything and costs its hook one context-variable read. Inside a request it
becomes one ``Query`` in the request's record: the shape (cached by statement text), the
timing, the parameters (kept only until the request ends, to tell duplicates
from N+1s) and the few app frames it came from.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from types import FrameType
from typing import Any, NamedTuple

from perfagent.db.callsite import AppFrames, Site
from perfagent.db.fingerprint import CACHE_BYTES, Fingerprints, Shape
from perfagent.record import RequestRecord


class Query(NamedTuple):
    """One query of a request, made once per query of every request. Where pip
    built ``perfagent/_speedups.c``, its ``Query`` replaces this class: the same
    fields, by name and by position, in a struct the garbage collector does not
    track (``perfagent/_query.h`` says why)."""

    system: str
    #: The statement as sent (literals and all): kept only until the request ends,
    #: to tell a repeated identical query from one per item; never exported.
    sql: str
    shape: Shape
    params: Any
    start: float
    duration: float
    #: Rows of an executemany (0 for a single execute).
    many: int
    sites: tuple[Site, ...]
    #: 'Post.comments' when SQLAlchemy lazy-loaded it.
    lazy: str | None


#: The catalogue a database describes itself in: SQLite's schema table (every name
#: it goes by), the SQL standard's information_schema, PostgreSQL's pg_catalog.
try:
    from perfagent._speedups import Query  # type: ignore[assignment]
except ImportError:
    pass


class CallsPastCap:
    """The calls of one request past the cap: what the metrics need of them, in a
    size that does not grow with their number."""

    __slots__ = ("table",)

    def __init__(self) -> None:
        #: (system, operation) -> [count per bucket ..., +Inf count, sum], as a thread's
        #: table of ``db_client_operation_duration_seconds`` (``export/stats.py``); the
        #: C hook (``_speedups.SqlHook``) adds to it the same way.
        self.table: dict[tuple[str, str], list[Any]] = {}

    @property
    def count(self) -> int:
        """How many calls."""
        return sum(sum(entry[:-1]) for entry in self.table.values())

    @property
    def duration(self) -> float:
        """Their durations, summed (the request's db time)."""
        return sum(entry[-1] for entry in self.table.values())

    def add(self, system: str, operation: str, duration: float, bounds: Sequence[float]) -> None:
        key = (system, operation)
        entry = self.table.get(key)
        if entry is None:
            entry = self.table[key] = [0] * (len(bounds) + 1) + [0.0]
        entry[bisect_left(bounds, duration)] += 1
        entry[-1] += duration


class QueryCapture:
    """Shared by every driver hook; one per agent."""

    def __init__(
        self,
        on_error: Any,
        compiled: bool = True,
        cache_bytes: int = CACHE_BYTES,
        dropped: Any = None,
        max_calls: int = 2000,
        bounds: Sequence[float] = (),
    ) -> None:
        #: Whether the per-query work may run in C (``PERFAGENT_COMPILED_HOOKS``).
        self.compiled = compiled
        #: Calls of a request kept in full (``max_calls_per_request``); the rest counted.
        self.max_calls = max_calls
        #: The database histogram's bounds, for the calls past the cap.
        self.bounds = list(bounds)
        #: ``dropped`` counts the shapes the cache forgets when it is full.
        self.fingerprints = Fingerprints(cache_bytes, dropped)
        self.frames = AppFrames()
        self._shapes = self.fingerprints.cache
        self._on_error = on_error

    def add(
        self,
        record: RequestRecord,
        system: str,
        sql: Any,
        params: Any,
        start: float,
        end: float,
        caller: FrameType | None,
        many: int = 0,
    ) -> None:
        """Charges a finished query to ``record``, a running request. Never raises.

        The hooks read the record themselves (a query outside a request costs
        them one context-variable read and nothing here).
        """
        try:
            if sql.__class__ is not str:
                sql = sql.decode() if isinstance(sql, bytes) else str(sql)
            shape = self._shapes.get(sql) or self.fingerprints(sql, system)
            queries = record.queries
            if queries is not None and len(queries) >= self.max_calls:
                past = record.past_cap
                if past is None:
                    past = record.past_cap = CallsPastCap()
                past.add(system, shape.operation, end - start, self.bounds)
                return
            sites, lazy = self.frames.capture(caller)
            query = Query(system, sql, shape, params, start, end - start, many, sites, lazy)
            queries = record.queries  # again: capturing the sites may have run a query
            if queries is None:
                record.queries = [query]
            else:
                queries.append(query)
        except Exception as exc:
            self._on_error("db.capture", exc)
