"""N+1 queries: one query shape issued again and again from one place in one request.

Queries are grouped by fingerprint and by the app line that issued them (the
loop line, see ``db/callsite.py``); a group of at least ``nplusone_min`` is a
finding. Repeats whose parameters are all identical are reported as
``duplicate_query`` (the same row fetched again: cache it) rather than
``n_plus_one`` (one row per item: fetch them together). Not findings:
transaction control (SAVEPOINT, BEGIN, ...), and statements that each carry a
list of values (a batch loader sending ``IN (...)`` in chunks).

Concurrent repeats (``asyncio.gather``, threads) count too: every query of the
request lands in the same record whatever task or thread issued it.
"""

from __future__ import annotations

from typing import Any

from perfagent.record import RequestRecord

try:  # the grouping in C, built by pip where a C compiler is found (perfagent/_speedups.c)
    from perfagent._speedups import repeats as _compiled_repeats
except ImportError:
    _compiled_repeats = None


def _repeats(queries: list[Any], minimum: int) -> list[tuple[str, list[Any]]]:
    """(fingerprint, queries) of each group of at least ``minimum`` repeats.

    Grouped by fingerprint and by the last app site (the loop line when there is
    one: ``capture`` stops there), keyed by id(code) since the request's queries
    hold their code objects and hashing one hashes its bytecode (db/callsite.py).
    ``repeats`` in ``_speedups.c`` does the same in C.
    """
    groups: dict[tuple[str, int, int], list[Any]] = {}
    for query in queries:
        if query.shape.control:
            continue
        site = query.sites[-1] if query.sites else None
        key = (
            (query.shape.fingerprint, 0, 0)
            if site is None
            else (query.shape.fingerprint, id(site[0]), site[2])
        )
        group = groups.get(key)
        if group is None:
            groups[key] = [query]
        else:
            group.append(query)
    return [
        (fingerprint, group)
        for (fingerprint, _code, _line), group in groups.items()
        if len(group) >= minimum and not all(q.shape.batched for q in group)
    ]


class NPlusOneDetector:
    def __init__(self, agent: Any, capture: Any) -> None:
        self._agent = agent
        self._frames = capture.frames
        self._minimum = agent.settings.nplusone_min
        use_c = capture.compiled and _compiled_repeats is not None
        self._repeats = _compiled_repeats if use_c else _repeats
        self._counters: dict[str, Any] = {}

    def __call__(self, record: RequestRecord) -> None:
        queries = record.queries
        if queries is None or len(queries) < self._minimum:
            return
        for fingerprint, group in self._repeats(queries, self._minimum):
            self._report(record, fingerprint, group)

    def _report(self, record: RequestRecord, fingerprint: str, group: list[Any]) -> None:
        # APSW's trace gives no parameters: without them a repeat is never called identical.
        known = [(q.sql, q.params) for q in group if q.params is not None or q.system != "sqlite"]
        try:
            distinct = len(set(known))
        except TypeError:  # unhashable parameters (lists, dicts)
            distinct = len({repr(k) for k in known})
        same_each_time = bool(known) and len(known) == len(group) and distinct == 1
        kind = "duplicate_query" if same_each_time else "n_plus_one"
        route = record.route or ""
        lazy = None
        for query in group:
            if query.lazy:
                lazy = query.lazy
                break
        fields: dict[str, Any] = {
            "route": route,
            "method": record.method,
            "fingerprint": fingerprint,
            "count": len(group),
            "total_ms": round(sum(q.duration for q in group) * 1000.0, 3),
            "callsite": self._frames.callsite(group[0].sites),
            "trace_id": record.trace_id,
            "db_system": group[0].system,
            "distinct_parameters": distinct if known else None,
            "advice": _advice(kind, lazy),
        }
        if kind == "n_plus_one":
            counter = self._counters.get(route)
            if counter is None:
                counter = self._counters[route] = self._agent.metrics.n_plus_one.labels(route)
            counter.inc()
        self._agent.report(kind, fields, record)


def _advice(kind: str, lazy: str | None) -> str:
    if kind == "duplicate_query":
        return (
            "the same query with the same parameters runs again and again: "
            "run it once and reuse the result"
        )
    if lazy:
        return (
            f"{lazy} is lazy-loaded once per row: load it with selectinload({lazy}) "
            "(or joinedload) in the query that fetched the rows"
        )
    return (
        "one query per item: fetch the items together (WHERE ... IN (...), a JOIN, "
        "or your ORM's eager loading) before the loop"
    )
