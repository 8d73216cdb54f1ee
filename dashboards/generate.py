"""Writes the Grafana dashboards in ``perfagent/grafana/`` from the panel lists below.

Why a generator: three dashboards share the same variables, datasource
wiring, selectors and conventions (every query summed ``by (le, ...)`` so that
many workers and instances aggregate correctly, every panel with a unit and a
description). Writing them from one place keeps those rules in one place;
the JSON files it writes are what users import and what the package ships,
and ``tests/test_dashboards.py`` checks that they match this script.

Run ``python3 dashboards/generate.py`` after changing a panel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "perfagent" / "grafana"
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"

# Label matchers, Grafana variables as regexes ("All" is ".*").
JI = 'job=~"$job", instance=~"$instance"'
ROUTE = f'{JI}, http_route=~"$route"'
SEL = f'{ROUTE}, http_request_method=~"$method"'
DURATION = "http_server_request_duration_seconds"


def _q(quantile: float, metric: str, by: str = "", selector: str = SEL) -> str:
    """A quantile over a classic histogram, summed by ``le`` (and ``by``) across workers."""
    group = f"le, {by}" if by else "le"
    return (
        f"histogram_quantile({quantile}, sum by ({group}) "
        f"(rate({metric}_bucket{{{selector}}}[{RI}])))"
    )


def _rate(metric: str, selector: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({metric}{{{selector}}}[{RI}]))"


def _apdex(by: str = "", selector: str = SEL, window: str = RI) -> str:
    """Apdex with T = 0.25 s: (satisfied + tolerating / 2) / all, exact from the buckets.

    T (0.25 s) and 4T (1 s) are bucket boundaries, so ``le="0.25"`` counts the
    satisfied requests and ``le="1.0"`` the satisfied plus the tolerating ones:
    Apdex = (le=0.25 + le=1) / 2 / count. The ``le`` regexes accept both
    spellings of 1 ("1" and "1.0") that exporters and Prometheus versions use.
    """
    group = f" by ({by})" if by else ""
    bucket = f"{DURATION}_bucket{{{selector}"
    return (
        f'(sum{group} (rate({bucket}, le=~"0\\\\.25"}}[{window}]))'
        f' + sum{group} (rate({bucket}, le=~"1(\\\\.0)?"}}[{window}])))'
        f" / 2 / sum{group} (rate({DURATION}_count{{{selector}}}[{window}]))"
    )


def _error_ratio(by: str = "") -> str:
    errors = _rate(f"{DURATION}_count", f'{SEL}, http_response_status_code=~"5.."', by)
    total = _rate(f"{DURATION}_count", SEL, by)
    if by:  # a route without errors has no 5xx series: it is left out, not shown as 0
        return f"{errors} / {total}"
    return f"({errors} or vector(0)) / {total}"


def target(expr: str, legend: str = "__auto", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
        "range": not extra.get("instant", False),
        "exemplar": False,  # the agent emits no exemplars yet
        **extra,
    }


def panel(
    kind: str,
    title: str,
    description: str,
    unit: str,
    targets: list[dict[str, Any]],
    w: int = 12,
    h: int = 8,
    **options: Any,
) -> dict[str, Any]:
    """One panel; ids and positions are filled in by ``dashboard``."""
    defaults: dict[str, Any] = {"unit": unit}
    defaults.update(options.pop("defaults", {}))
    found = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": targets,
        "gridPos": {"h": h, "w": w, "x": 0, "y": 0},
        "options": options.pop("panel_options", {}),
    }
    found.update(options)
    return found


def stat(title: str, description: str, unit: str, expr: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("panel_options", {"reduceOptions": {"calcs": ["lastNotNull"]}})
    kw.setdefault("w", 6)
    kw.setdefault("h", 4)
    return panel("stat", title, description, unit, [target(expr)], **kw)


def series(title: str, description: str, unit: str, targets: list, **kw: Any) -> dict[str, Any]:
    kw.setdefault(
        "panel_options", {"tooltip": {"mode": "multi"}, "legend": {"displayMode": "list"}}
    )
    return panel("timeseries", title, description, unit, targets, **kw)


def percentiles(metric: str, by: str = "", selector: str = SEL) -> list[dict[str, Any]]:
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        target(_q(q, metric, by, selector), f"{prefix}p{name}", ref)
        for q, name, ref in ((0.5, "50", "A"), (0.95, "95", "B"), (0.99, "99", "C"))
    ]


def variables() -> list[dict[str, Any]]:
    def query(name: str, label: str, source: str, definition: str) -> dict[str, Any]:
        text = f"label_values({source}, {label})"
        return {
            "name": name,
            "label": definition,
            "type": "query",
            "datasource": DS,
            "definition": text,
            "query": text,  # the string form: every Grafana since 7 reads it
            "refresh": 2,
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
            "hide": 0,
            "regex": "",
            "options": [],
        }

    requests = f"{DURATION}_count{{{JI}}}"
    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {"text": "${DS_PROMETHEUS}", "value": "${DS_PROMETHEUS}"},
            "hide": 0,
            "includeAll": False,
            "multi": False,
            "options": [],
            "refresh": 1,
            "regex": "",
        },
        query("job", "job", "perfagent_build_info", "Job"),
        query("instance", "instance", 'perfagent_build_info{job=~"$job"}', "Instance"),
        query("route", "http_route", requests, "Route"),
        query("method", "http_request_method", requests, "Method"),
    ]


def dashboard(uid: str, title: str, description: str, panels: list) -> dict[str, Any]:
    """The dashboard around ``panels``: ids in order, laid out left to right, top to bottom."""
    x = y = row_h = 0
    kinds = set()
    for number, item in enumerate(panels, 1):
        item["id"] = number
        pos = item["gridPos"]
        if x + pos["w"] > 24:
            x, y, row_h = 0, y + row_h, 0
        pos["x"], pos["y"] = x, y
        x, row_h = x + pos["w"], max(row_h, pos["h"])
        kinds.add(item["type"])
    names = {"stat": "Stat", "timeseries": "Time series", "heatmap": "Heatmap", "table": "Table"}
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": "The Prometheus that scrapes perfagent's /metrics",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__elements": {},
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            *(
                {"type": "panel", "id": kind, "name": names[kind], "version": ""}
                for kind in sorted(kinds)
            ),
        ],
        "annotations": {"list": []},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [
            {
                "title": "perfagent dashboards",
                "type": "dashboards",
                "tags": ["perfagent"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["perfagent", "http", "prometheus"],
        "templating": {"list": variables()},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


def overview() -> dict[str, Any]:
    count = f"{DURATION}_count"
    class_expr = (
        f'sum by (status_class) (label_replace(rate({count}{{{SEL}}}[{RI}]), "status_class",'
        f' "${{1}}xx", "http_response_status_code", "([1-5]).."))'
    )
    impact = f"topk(10, sum by (http_route) (increase({DURATION}_sum{{{SEL}}}[$__range])))"
    pct = {"min": 0, "max": 1, "decimals": 2}
    return dashboard(
        "perfagent-overview",
        "perfagent / Overview",
        "Requests served by apps under perfagent: traffic, errors, latency, Apdex and the "
        "routes that cost the most. Latency is the server's own time, arrival to last byte.",
        [
            stat(
                "Request rate",
                "Requests per second, all workers and instances together.",
                "reqps",
                _rate(count, SEL),
            ),
            stat(
                "Error ratio (5xx)",
                "Share of requests answered with a 5xx status.",
                "percentunit",
                _error_ratio(),
                defaults=pct,
            ),
            stat(
                "p95 latency",
                "95th percentile of request duration, interpolated within histogram buckets.",
                "s",
                _q(0.95, DURATION),
            ),
            stat(
                "Apdex (T = 250 ms)",
                "Apdex: (satisfied + tolerating/2) / all, satisfied <= 250 ms, tolerating "
                "<= 1 s. Both are bucket boundaries, so this is exact. Latency only: a fast "
                "5xx counts as satisfied (see the error ratio).",
                "none",
                _apdex(),
                defaults=pct,
            ),
            series(
                "Request rate by status class",
                "Requests per second by status class (2xx, 3xx, 4xx, 5xx).",
                "reqps",
                [target(class_expr, "{{status_class}}")],
            ),
            series(
                "Error ratio by route",
                "Share of each route's requests answered with a 5xx. Routes without any 5xx "
                "are not drawn.",
                "percentunit",
                [target(_error_ratio("http_route"), "{{http_route}}")],
                defaults={"min": 0},
            ),
            series(
                "Latency percentiles",
                "p50, p95 and p99 of request duration over the selected routes, from the "
                "histogram summed by le across workers and instances.",
                "s",
                percentiles(DURATION),
            ),
            series(
                "Apdex (T = 250 ms)",
                "Apdex over time; 1 is every request within 250 ms, below 0.85 alerts.",
                "none",
                [target(_apdex(), "Apdex")],
                defaults=pct,
            ),
            series(
                "Active requests",
                "Requests in flight, summed over live workers, by method.",
                "short",
                [
                    target(
                        f"sum by (http_request_method) (http_server_active_requests{{{JI}, "
                        f'http_request_method=~"$method"}})',
                        "{{http_request_method}}",
                    )
                ],
            ),
            series(
                "Slow requests",
                "Requests per second slower than the agent's slow threshold (PERFAGENT_SLOW_MS, "
                "default 500 ms), by route.",
                "reqps",
                [
                    target(
                        _rate(
                            "perfagent_slow_requests_total", SEL, "http_route, http_request_method"
                        ),
                        "{{http_request_method}} {{http_route}}",
                    )
                ],
            ),
            panel(
                "table",
                "Top routes by impact",
                "Total request time spent per route over the dashboard's time range (count x "
                "mean duration): where optimising pays most.",
                "s",
                [target(impact, "{{http_route}}", instant=True, format="table")],
                w=12,
                h=9,
                transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True}}}],
                panel_options={"sortBy": [{"displayName": "Value", "desc": True}]},
            ),
            series(
                "Data dropped by the agent",
                "Spans, findings or internal errors the agent dropped rather than slow the app "
                "(collector down, queue full). Should stay at 0.",
                "short",
                [
                    target(
                        f"sum by (what) (increase(perfagent_dropped_total{{{JI}}}[{RI}]))",
                        "{{what}}",
                    )
                ],
                h=9,
            ),
        ],
    )


def route() -> dict[str, Any]:
    queries = "perfagent_request_db_queries"
    heatmap = target(
        f"sum by (le) (increase({DURATION}_bucket{{{SEL}}}[{RI}]))",
        "{{le}}",
        format="heatmap",
    )
    mean_queries = (
        f"sum by (http_route) (rate({queries}_sum{{{ROUTE}}}[{RI}]))"
        f" / sum by (http_route) (rate({queries}_count{{{ROUTE}}}[{RI}]))"
    )
    n_plus_one = _rate("perfagent_n_plus_one_total", ROUTE, "http_route")
    n_plus_one_share = f"{n_plus_one} / {_rate(f'{DURATION}_count', ROUTE, 'http_route')}"
    return dashboard(
        "perfagent-route",
        "perfagent / Route",
        "One route (or several) in detail: latency distribution, errors, database queries "
        "per request, N+1 queries and slow requests. Pick the route above.",
        [
            stat("Request rate", "Requests per second.", "reqps", _rate(f"{DURATION}_count", SEL)),
            stat("p95 latency", "95th percentile of request duration.", "s", _q(0.95, DURATION)),
            stat(
                "Error ratio (5xx)",
                "Share of requests answered with a 5xx status.",
                "percentunit",
                _error_ratio(),
                defaults={"min": 0, "max": 1, "decimals": 2},
            ),
            stat(
                "Queries per request (mean)",
                "Mean number of database queries each request issued.",
                "short",
                f"sum (rate({queries}_sum{{{ROUTE}}}[{RI}]))"
                f" / sum (rate({queries}_count{{{ROUTE}}}[{RI}]))",
            ),
            panel(
                "heatmap",
                "Latency heatmap",
                "How many requests fell in each duration bucket, per interval. A second band "
                "higher up is a second code path (a cache miss, a lock, an N+1).",
                "s",
                [heatmap],
                w=24,
                h=9,
                panel_options={
                    "calculate": False,
                    "yAxis": {"unit": "s"},
                    "cellGap": 1,
                    "color": {"mode": "scheme", "scheme": "Oranges", "exponent": 0.5},
                    "tooltip": {"show": True, "yHistogram": True},
                },
            ),
            series(
                "Latency percentiles by route",
                "p50, p95 and p99 of request duration, per route.",
                "s",
                percentiles(DURATION, "http_route"),
            ),
            series(
                "Requests by status",
                "Requests per second by route and status code.",
                "reqps",
                [
                    target(
                        _rate(f"{DURATION}_count", SEL, "http_route, http_response_status_code"),
                        "{{http_response_status_code}} {{http_route}}",
                    )
                ],
            ),
            series(
                "Errors (5xx)",
                "5xx responses per second by route and status. Empty while nothing fails.",
                "reqps",
                [
                    target(
                        _rate(
                            f"{DURATION}_count",
                            f'{SEL}, http_response_status_code=~"5.."',
                            "http_route, http_response_status_code",
                        ),
                        "{{http_response_status_code}} {{http_route}}",
                    )
                ],
            ),
            series(
                "Queries per request",
                "Database queries issued per request: p50 and p95 from the query-count "
                "histogram, and the mean.",
                "short",
                [
                    *percentiles(queries, "http_route", ROUTE)[:2],
                    target(mean_queries, "{{http_route}} mean", "C"),
                ],
            ),
            series(
                "N+1 queries",
                "Requests per second in which one query shape was repeated from one call site "
                "(an N+1). The n_plus_one log event names the call site and the fix.",
                "reqps",
                [target(n_plus_one, "{{http_route}}")],
            ),
            series(
                "Share of requests with an N+1",
                "N+1 requests divided by all requests, per route: 1 means every request of "
                "the route repeats a query per row.",
                "percentunit",
                [target(n_plus_one_share, "{{http_route}}")],
                defaults={"min": 0},
            ),
            series(
                "Slow requests",
                "Requests per second slower than the agent's slow threshold, by route and "
                "method. Each one also logs a slow_request event with its trace id.",
                "reqps",
                [
                    target(
                        _rate(
                            "perfagent_slow_requests_total", SEL, "http_route, http_request_method"
                        ),
                        "{{http_request_method}} {{http_route}}",
                    )
                ],
                w=24,
            ),
        ],
    )


def async_health() -> dict[str, Any]:
    lag = "perfagent_event_loop_lag_seconds"
    db = "db_client_operation_duration_seconds"
    blocks = "perfagent_event_loop_blocks_total"
    return dashboard(
        "perfagent-async",
        "perfagent / Async health",
        "Event-loop health of async apps (FastAPI, Starlette, FastHTML) and database time. "
        "No thread-pool panel yet: the wait for a pool thread is in "
        "perfagent_thread_pool_wait_seconds.",
        [
            series(
                "Event-loop lag percentiles",
                "How late the agent's heartbeat on each event loop ran: p50, p99 and p99.9. "
                "Lag is time every request on that loop waited.",
                "s",
                [
                    target(_q(q, lag, "", JI), f"p{name}", ref)
                    for q, name, ref in ((0.5, "50", "A"), (0.99, "99", "B"), (0.999, "99.9", "C"))
                ],
            ),
            series(
                "Event-loop lag p99 by instance",
                "p99 heartbeat lag per instance: one busy instance stands out here.",
                "s",
                [target(_q(0.99, lag, "instance", JI), "{{instance}}")],
            ),
            series(
                "Event-loop blocks by route",
                "Stalls longer than the block threshold (PERFAGENT_LOOP_BLOCK_MS, default "
                "100 ms) per interval, by the route whose code blocked (empty route: no "
                "request was running). The event_loop_blocked log event has the line.",
                "short",
                [
                    target(
                        f"sum by (http_route) (increase({blocks}{{{ROUTE}}}[{RI}]))",
                        "{{http_route}}",
                    )
                ],
            ),
            stat(
                "Event-loop blocks in range",
                "Blocks over the dashboard's time range, all selected routes.",
                "short",
                f"sum (increase({blocks}{{{ROUTE}}}[$__range]))",
                w=12,
                h=8,
            ),
            series(
                "DB operation duration p95 by operation",
                "95th percentile of database operation time by operation (SELECT, INSERT, ...) "
                "and database system, for queries issued while serving requests.",
                "s",
                [
                    target(
                        _q(0.95, db, "db_system_name, db_operation_name", JI),
                        "{{db_system_name}} {{db_operation_name}}",
                    )
                ],
            ),
            series(
                "DB operations by operation",
                "Database operations per second by operation and system.",
                "ops",
                [
                    target(
                        _rate(f"{db}_count", JI, "db_system_name, db_operation_name"),
                        "{{db_system_name}} {{db_operation_name}}",
                    )
                ],
            ),
        ],
    )


def build() -> dict[str, dict[str, Any]]:
    """File name -> dashboard."""
    return {
        "perfagent-overview.json": overview(),
        "perfagent-route.json": route(),
        "perfagent-async.json": async_health(),
    }


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2) + "\n"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, board in build().items():
        (OUT / name).write_text(render(board))
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
