"""The one entry point every driver hook calls after a query ran.

A query outside any request (start-up, a background job) is not charged to
anything and costs one context-variable read. Inside a request it becomes one
``Query`` in the request's record: the shape (cached by statement text), the
timing, the parameters (kept only until the request ends, to tell duplicates
from N+1s) and the few app frames it came from.
"""

from __future__ import annotations

from types import CodeType
from typing import Any

from perfagent.db.callsite import AppFrames
from perfagent.db.fingerprint import Fingerprints, Shape
from perfagent.record import current


class Query:
    __slots__ = ("duration", "lazy", "many", "params", "shape", "sites", "sql", "start", "system")

    def __init__(
        self,
        system: str,
        sql: str,
        shape: Shape,
        params: Any,
        start: float,
        duration: float,
        many: int,
        sites: tuple[tuple[CodeType, int, int], ...],
        lazy: str | None,
    ) -> None:
        self.system = system
        #: The statement as sent (literals and all): kept only until the request ends,
        #: to tell a repeated identical query from one per item; never exported.
        self.sql = sql
        self.shape = shape
        self.params = params
        self.start = start
        self.duration = duration
        #: Rows of an executemany (0 for a single execute).
        self.many = many
        self.sites = sites
        #: 'Post.comments' when SQLAlchemy lazy-loaded it.
        self.lazy = lazy


class QueryCapture:
    """Shared by every driver hook; one per agent."""

    def __init__(self, on_error: Any) -> None:
        self.fingerprints = Fingerprints()
        self.frames = AppFrames()
        self._on_error = on_error

    def add(
        self,
        system: str,
        sql: Any,
        params: Any,
        start: float,
        end: float,
        caller: Any,
        many: int = 0,
        record: Any = None,
    ) -> None:
        """Charges a finished query to the running request, if there is one. Never raises.

        Hooks that already read the record pass it, saving a second lookup.
        """
        if record is None:
            record = current.get()
            if record is None or record.done:
                return
        try:
            if sql.__class__ is not str:
                sql = sql.decode() if isinstance(sql, bytes) else str(sql)
            sites, lazy = self.frames.capture(caller)
            query = Query(
                system, sql, self.fingerprints(sql), params, start, end - start, many, sites, lazy
            )
            queries = record.queries
            if queries is None:
                record.queries = [query]
            else:
                queries.append(query)
            record.db_time += end - start
        except Exception as exc:
            self._on_error("db.capture", exc)
