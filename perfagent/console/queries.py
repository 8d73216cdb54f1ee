"""What the console's API and pages show, computed from the store.

Route percentiles come from the same histogram buckets Prometheus scrapes,
merged across instances, and are interpolated the way PromQL's
``histogram_quantile`` does, so the console and a Grafana panel agree.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import Any

from perfagent.console import stored
from perfagent.console.store import Store
from perfagent.histogram import quantile

APDEX_T_S = 0.25  # T and 4T (1 s) are both bucket boundaries, so Apdex is exact
_WINDOW = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str | None) -> float | None:
    """'15m' -> 900.0; '' or None -> None (all time). Raises ValueError when malformed."""
    if not text:
        return None
    match = _WINDOW.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ValueError("window must look like 30s, 15m, 6h or 7d")
    return float(match.group(1)) * _UNIT[match.group(2)]


def _at_or_below(limit: float, bounds: list[float], counts: list[int]) -> int:
    return sum(c for b, c in zip(bounds, counts, strict=False) if b <= limit)


def _merge(into: dict[str, Any], count: int, total: float, bounds: list, counts: list) -> None:
    if not into["bounds"]:
        into["bounds"], into["counts"] = bounds, [0] * len(counts)
    if into["bounds"] != bounds:
        return  # a differently bucketed series cannot be merged exactly; left out
    into["count"] += count
    into["sum"] += total
    into["counts"] = [a + b for a, b in zip(into["counts"], counts, strict=True)]


def _series(store: Store, service: str | None, window_s: float | None) -> list[Any]:
    if window_s is None:
        sql = "SELECT service, method, route, status, count, sum, bounds, counts FROM histograms"
        params: list[Any] = []
        if service:
            sql += " WHERE service = ?"
            params.append(service)
        return store.query(sql, params)
    since = int((time.time() - window_s) // 60)
    sql = (
        "SELECT service, method, route, status, count, sum, bounds, counts "
        "FROM route_minutes WHERE minute >= ?"
    )
    params = [since]
    if service:
        sql += " AND service = ?"
        params.append(service)
    return store.query(sql, params)


def routes(store: Store, service: str | None = None, window_s: float | None = None) -> list[dict]:
    groups: dict[tuple[str, str, str], dict[str, Any]] = defaultdict(
        lambda: {"count": 0, "sum": 0.0, "errors": 0, "bounds": [], "counts": []}
    )
    for row in _series(store, service, window_s):
        found = _histogram(row)
        if found is None:
            continue  # not a histogram (a hand-written or damaged row): left out
        key = (stored.text(row["service"]), stored.text(row["route"]), stored.text(row["method"]))
        group = groups[key]
        before = group["count"]
        _merge(group, *found)
        if stored.integer(row["status"], 0) >= 500 and group["count"] > before:
            group["errors"] += found[0]
    queries = _queries_per_request(store, service)
    out = []
    for (svc, route, method), g in groups.items():
        count = g["count"]
        if not count:
            continue
        mean_ms = g["sum"] / count * 1000.0
        satisfied = _at_or_below(APDEX_T_S, g["bounds"], g["counts"])
        tolerating = _at_or_below(4 * APDEX_T_S, g["bounds"], g["counts"]) - satisfied
        rate = count / window_s if window_s else None
        out.append(
            {
                "service": svc,
                "route": route,
                "method": method,
                "count": count,
                "errors": g["errors"],
                "error_rate": g["errors"] / count,
                "rate_per_s": rate,
                "mean_ms": mean_ms,
                "p50_ms": _ms(quantile(0.50, g["bounds"], g["counts"])),
                "p95_ms": _ms(quantile(0.95, g["bounds"], g["counts"])),
                "p99_ms": _ms(quantile(0.99, g["bounds"], g["counts"])),
                "apdex": (satisfied + tolerating / 2) / count,
                "impact_ms": g["sum"] * 1000.0,  # total time spent: rate x mean, over the window
                "queries_per_request": queries.get((svc, route, method)),
            }
        )
    out.sort(key=lambda r: r["impact_ms"], reverse=True)
    return out


def _histogram(row: Any) -> tuple | None:
    return stored.histogram(row["count"], row["sum"], row["bounds"], row["counts"])


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _queries_per_request(store: Store, service: str | None) -> dict[tuple, float]:
    """Mean database queries per kept request, by route; absent where none were seen."""
    sql = "SELECT service, route, method, queries * 1.0 / requests FROM route_queries"
    sql += " WHERE queries > 0" + (" AND service = ?" if service else "")
    rows = store.query(sql, [service] if service else [])
    return {
        (stored.text(r[0]), stored.text(r[1]), stored.text(r[2])): stored.number(r[3]) for r in rows
    }


def services(store: Store) -> list[str]:
    rows = store.query(
        "SELECT service FROM histograms UNION SELECT DISTINCT service FROM spans ORDER BY 1"
    )
    return [stored.text(r[0]) for r in rows]


def overview(store: Store, window_s: float) -> list[dict[str, Any]]:
    """Per service: totals over the window and a per-minute series for charts."""
    since = int((time.time() - window_s) // 60)
    rows = store.query(
        "SELECT minute, service, status, count, sum, bounds, counts FROM route_minutes "
        "WHERE minute >= ? ORDER BY minute",
        [since],
    )
    per_service: dict[str, dict[str, Any]] = {}
    for row in rows:
        found, minute_key = _histogram(row), stored.integer(row["minute"])
        if found is None or minute_key is None:
            continue
        svc = per_service.setdefault(
            stored.text(row["service"]),
            {
                "total": {"count": 0, "sum": 0.0, "bounds": [], "counts": []},
                "errors": 0,
                "minutes": {},
            },
        )
        _merge(svc["total"], *found)
        minute = svc["minutes"].setdefault(
            minute_key, {"count": 0, "sum": 0.0, "bounds": [], "counts": [], "errors": 0}
        )
        _merge(minute, *found)
        if stored.integer(row["status"], 0) >= 500:
            svc["errors"] += found[0]
            minute["errors"] += found[0]
    open_findings = {
        stored.text(r[0]): r[1]
        for r in store.query(
            "SELECT service, count(*) FROM findings WHERE last_seen >= ? GROUP BY service",
            [time.time() - window_s],
        )
    }
    out = []
    for service, data in sorted(per_service.items()):
        total = data["total"]
        count = total["count"] or 1
        satisfied = _at_or_below(APDEX_T_S, total["bounds"], total["counts"])
        tolerating = _at_or_below(4 * APDEX_T_S, total["bounds"], total["counts"]) - satisfied
        out.append(
            {
                "service": service,
                "count": total["count"],
                "rate_per_s": total["count"] / window_s,
                "error_rate": data["errors"] / count,
                "p50_ms": _ms(quantile(0.50, total["bounds"], total["counts"])),
                "p95_ms": _ms(quantile(0.95, total["bounds"], total["counts"])),
                "p99_ms": _ms(quantile(0.99, total["bounds"], total["counts"])),
                "apdex": (satisfied + tolerating / 2) / count,
                "findings": open_findings.get(service, 0),
                "series": [
                    {
                        "minute": minute,
                        "count": m["count"],
                        "errors": m["errors"],
                        "p95_ms": _ms(quantile(0.95, m["bounds"], m["counts"])),
                    }
                    for minute, m in sorted(data["minutes"].items())
                ],
            }
        )
    return out


def route_series(
    store: Store, service: str, route: str, method: str, window_s: float = 86400.0
) -> list[dict[str, Any]]:
    """One route's requests, errors and p50/p95 per minute, for its chart."""
    rows = store.query(
        "SELECT minute, status, count, sum, bounds, counts FROM route_minutes "
        "WHERE service = ? AND route = ? AND method = ? AND minute >= ? ORDER BY minute",
        [service, route, method, int((time.time() - window_s) // 60)],
    )
    minutes: dict[int, dict[str, Any]] = {}
    for row in rows:
        found, minute_key = _histogram(row), stored.integer(row["minute"])
        if found is None or minute_key is None:
            continue
        m = minutes.setdefault(
            minute_key, {"count": 0, "sum": 0.0, "bounds": [], "counts": [], "errors": 0}
        )
        _merge(m, *found)
        if stored.integer(row["status"], 0) >= 500:
            m["errors"] += found[0]
    return [
        {
            "minute": minute,
            "count": m["count"],
            "errors": m["errors"],
            "p50_ms": _ms(quantile(0.50, m["bounds"], m["counts"])),
            "p95_ms": _ms(quantile(0.95, m["bounds"], m["counts"])),
        }
        for minute, m in sorted(minutes.items())
    ]


def flame(store: Store, service: str, route: str, method: str) -> dict[str, int]:
    """Collapsed stack -> samples, over the route's sampled slow requests."""
    rows = store.query(
        "SELECT stack, count FROM route_stacks WHERE service = ? AND route = ? AND method = ?",
        [service, route, method],
    )
    out: dict[str, int] = {}
    for r in rows:
        count = stored.integer(r[1], 0)
        if count > 0:
            stack = stored.text(r[0])
            out[stack] = out.get(stack, 0) + count
    return out


_FINDING_COLUMNS = "kind, service, first_seen, last_seen, occurrences, example_trace_id, data"


def findings(store: Store, kind: str | None = None, route: str | None = None) -> list[dict]:
    sql = f"SELECT {_FINDING_COLUMNS} FROM findings"
    clauses, params = [], []
    if kind:
        clauses.append("kind = ?")
        params.append(kind)
    if route is not None:
        clauses.append("route = ?")
        params.append(route)
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY last_seen DESC LIMIT 500"
    out = []
    for row in store.query(sql, params):
        item = stored.json_object(row["data"])
        item.update(
            kind=stored.text(row["kind"]),
            service=stored.text(row["service"]),
            first_seen=stored.number(row["first_seen"]),
            last_seen=stored.number(row["last_seen"]),
            occurrences=stored.integer(row["occurrences"], 0),
            example_trace_id=stored.text_or_none(row["example_trace_id"]),
        )
        out.append(item)
    return out


_SPAN_COLUMNS = (
    "trace_id, span_id, parent_span_id, service, name, kind, start_ns, end_ns, duration_ms, "
    "route, method, status, error, attributes, events"
)


def _span(row: Any) -> dict[str, Any]:
    start = stored.integer(row["start_ns"], 0)
    return {
        "trace_id": stored.text(row["trace_id"]),
        "span_id": stored.text(row["span_id"]),
        "parent_span_id": stored.text(row["parent_span_id"]),
        "service": stored.text(row["service"]),
        "name": stored.text(row["name"]),
        "kind": stored.integer(row["kind"], 0),
        "start_ns": start,
        "end_ns": stored.integer(row["end_ns"], start),
        "duration_ms": stored.number(row["duration_ms"]) or 0.0,
        "route": stored.text(row["route"]),
        "method": stored.text(row["method"]),
        "status": stored.integer(row["status"]),
        "error": stored.text_or_none(row["error"]),
        "attributes": stored.json_object(row["attributes"]),
        "events": stored.events(row["events"]),
    }


def trace(store: Store, trace_id: str) -> dict[str, Any] | None:
    rows = store.query(
        f"SELECT {_SPAN_COLUMNS} FROM spans WHERE trace_id = ? ORDER BY start_ns", [trace_id]
    )
    if not rows:
        return None
    return {"trace_id": trace_id, "spans": [_span(r) for r in rows]}


def profiled(store: Store, limit: int = 100) -> list[dict[str, Any]]:
    """Kept requests that carry a profile (asked for with the profile header)."""
    rows = store.query(
        f"SELECT {_SPAN_COLUMNS} FROM spans WHERE kind = 2 AND findings > 0 "
        'AND events LIKE \'%"name": "profile"%\' ORDER BY start_ns DESC LIMIT ?',
        [limit],
    )
    return [_span(r) for r in rows]


def profile_requests(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    rows = store.query(
        "SELECT id, created, seconds, service, status, runner, finished, error "
        "FROM profile_requests ORDER BY id DESC LIMIT ?",
        [limit],
    )
    return [_asked(r) for r in rows]


def _asked(row: Any) -> dict[str, Any]:
    """One profile asked for from the console, its columns as the pages expect them."""
    return {
        "id": stored.integer(row["id"], 0),
        "created": stored.number(row["created"]),
        "seconds": stored.integer(row["seconds"]),
        "service": stored.text_or_none(row["service"]),
        "status": stored.text(row["status"]),
        "runner": stored.text_or_none(row["runner"]),
        "finished": stored.number(row["finished"]),
        "error": stored.text_or_none(row["error"]),
    }


def profile_request(store: Store, request_id: int) -> dict[str, Any] | None:
    rows = store.query("SELECT * FROM profile_requests WHERE id = ?", [request_id])
    if not rows:
        return None
    found = _asked(rows[0])
    stacks: dict[str, int] = {}
    for line in stored.text(rows[0]["stacks"]).splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] = stacks.get(stack, 0) + int(count)
    found["stacks"] = stacks
    return found


def requests(
    store: Store,
    *,
    service: str | None = None,
    route: str | None = None,
    status: int | None = None,
    min_ms: float | None = None,
    has_finding: bool | None = None,
    limit: int = 50,
    offset: int = 0,
    slowest: bool = False,
) -> list[dict[str, Any]]:
    clauses, params = ["kind = 2"], []
    for column, value in (("service", service), ("route", route), ("status", status)):
        if value is not None and value != "":
            clauses.append(f"{column} = ?")
            params.append(value)
    if min_ms is not None:
        clauses.append("duration_ms >= ?")
        params.append(min_ms)
    if has_finding is not None:
        clauses.append("findings > 0" if has_finding else "findings = 0")
    sql = (
        f"SELECT {_SPAN_COLUMNS} FROM spans WHERE {' AND '.join(clauses)} "
        f"ORDER BY {'duration_ms' if slowest else 'start_ns'} DESC LIMIT ? OFFSET ?"
    )
    return [_span(r) for r in store.query(sql, [*params, limit, offset])]
