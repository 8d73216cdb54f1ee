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

from operator import attrgetter
from typing import Any, NamedTuple

from perfagent.export.logs import VARIES
from perfagent.record import IDS, ROOT_PARENT, RequestRecord

try:  # the grouping in C, built by pip where a C compiler is found (perfagent/_speedups.c)
    from perfagent._speedups import repeats as _compiled_repeats
    from perfagent._speedups import summary as _compiled_summary
except ImportError:
    _compiled_repeats = _compiled_summary = None
try:  # the rest of the common case (perfagent/_perrequest.c)
    from perfagent._perrequest import NPlusOneReporter
except ImportError:
    NPlusOneReporter = None


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


_duration = attrgetter("duration")


def _summary(group: list[Any]) -> tuple[int | None, bool, str | None, float]:
    """(distinct parameter sets or None when none are known, whether every repeat
    was identical, the lazy-loaded attribute or None, total seconds) of one group;
    ``summary`` in ``_speedups.c`` does the same in C."""
    # APSW's statements on a connection whose exec_trace is the app's have no known
    # parameters (None, drivers.py): without them a repeat is never called identical.
    known = [(q.sql, q.params) for q in group if q.params is not None or q.system != "sqlite"]
    try:
        distinct = len(set(known))
    except TypeError:  # unhashable parameters (lists, dicts)
        distinct = len({repr(k) for k in known})
    same_each_time = bool(known) and len(known) == len(group) and distinct == 1
    lazy = next((q.lazy for q in group if q.lazy), None)
    return (distinct if known else None), same_each_time, lazy, sum(map(_duration, group))


class NPlusOneDetector:
    def __init__(self, agent: Any, capture: Any) -> None:
        self._agent = agent
        self._frames = capture.frames
        self._minimum = agent.settings.nplusone_min
        self._count = agent.metrics.stats.count
        use_c = capture.compiled and _compiled_repeats is not None
        self._repeats = _compiled_repeats if use_c else _repeats
        self._summary = _compiled_summary if use_c else _summary
        self._findings: dict[tuple, _Finding] = {}
        #: ``__call__`` in C (``_perrequest.NPlusOneReporter``) where it was built: the
        #: N+1 route's detector step ~35,300 -> ~26,900 CPU instructions a request.
        self.compiled = (
            NPlusOneReporter(
                repeats=_compiled_repeats,
                summary=_compiled_summary,
                python_summary=_summary,
                findings=self._findings,
                make_finding=self._finding,
                send=self._send,
                stats=agent.metrics.stats,
                fresh=agent.fresh,
                recent=agent._recent,
                getrandbits=IDS.getrandbits,
                root_parent=ROOT_PARENT,
                minimum=self._minimum,
                repeat_every=agent.repeat_every_s,
            )
            if use_c and NPlusOneReporter is not None
            else None
        )

    def __call__(self, record: RequestRecord) -> None:
        queries = record.queries
        if queries is None or len(queries) < self._minimum:
            return
        for fingerprint, group in self._repeats(queries, self._minimum):
            self._report(record, fingerprint, group)

    def _report(self, record: RequestRecord, fingerprint: str, group: list[Any]) -> None:
        summary = self._summary(group)
        if summary is NotImplemented:  # the C version met parameters it cannot hash
            summary = _summary(group)
        distinct_parameters, same_each_time, lazy, total_s = summary
        kind = "duplicate_query" if same_each_time else "n_plus_one"
        first = group[0]
        finding = self._finding(kind, record, fingerprint, first, lazy)
        count = len(group)
        total_ms = round(total_s * 1000.0, 3)
        trace_id = record.trace_id
        finding.emit(count, total_ms, trace_id, distinct_parameters)
        if finding.counter is not None:
            self._count(finding.counter)
        repeats = self._agent.fresh(finding.key)
        if repeats is None:
            return  # exported a moment ago: folded into the next export's repeats
        self._send(
            record,
            kind,
            finding,
            fingerprint,
            count,
            total_ms,
            trace_id,
            distinct_parameters,
            first,
            repeats,
        )

    def _send(
        self,
        record: RequestRecord,
        kind: str,
        finding: _Finding,
        fingerprint: str,
        count: int,
        total_ms: float,
        trace_id: str,
        distinct_parameters: int | None,
        first: Any,
        repeats: int,
    ) -> None:
        """A finding due for export: onto the request's trace and to the console."""
        fields: dict[str, Any] = {
            "route": finding.route,
            "method": record.method,
            "fingerprint": fingerprint,
            "count": count,
            "total_ms": total_ms,
            "callsite": finding.callsite,
            "trace_id": trace_id,
            "db_system": first.system,
            "distinct_parameters": distinct_parameters,
            "advice": finding.advice,
        }
        if repeats:
            fields["repeats"] = repeats
        self._agent.send(kind, fields, record)

    def _finding(
        self, kind: str, record: RequestRecord, fingerprint: str, first: Any, lazy: str | None
    ) -> _Finding:
        """What stays the same each time a finding repeats, made once: its call site,
        advice, counter and log line (measured on the benchmark's N+1 route: the
        generic line took ~5 µs of which ~2.4 µs went to sorting and quoting fields
        that are the same on every request)."""
        sites = first.sites
        # The call site is read from the innermost and the last app site: keyed by their
        # code (by id: the entry holds the sites, so the ids stay theirs) and line.
        inner, last = (sites[0], sites[-1]) if sites else ((None, 0, 0), (None, 0, 0))
        key = (kind, record.route, record.method, fingerprint, first.system, lazy)
        key += (id(inner[0]), inner[2], id(last[0]), last[2])
        finding = self._findings.get(key)
        if finding is not None:
            return finding
        route = record.route or ""
        counter = self._agent.metrics.n_plus_one.labels(route) if kind == "n_plus_one" else None
        callsite = self._frames.callsite(first.sites)
        advice = _advice(kind, lazy)
        emit = self._agent.log.prepare(
            "warning",
            kind,
            route=route,
            method=record.method,
            fingerprint=fingerprint,
            count=VARIES,
            total_ms=VARIES,
            callsite=callsite,
            trace_id=VARIES,
            db_system=first.system,
            distinct_parameters=VARIES,
            advice=advice,
        )
        if len(self._findings) >= 4096:
            self._findings.clear()
        finding = self._findings[key] = _Finding(
            sites, route, callsite, advice, counter, emit, (kind, route, fingerprint, callsite)
        )
        return finding


class _Finding(NamedTuple):
    """One finding as it repeats; holds the sites whose code ids key it."""

    sites: Any
    route: str
    callsite: str | None
    advice: str
    counter: Any
    emit: Any
    #: Its key in ``Agent.fresh``.
    key: tuple


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
