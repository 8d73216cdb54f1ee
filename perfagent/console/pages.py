"""Server-rendered pages. Every value goes through ``h()``; nothing is fetched from outside.

Charts are inline SVG drawn here; the only script is a small table sorter and
the live panel, which inserts text with ``textContent`` (never as HTML).
"""

from __future__ import annotations

import json
import time
from html import escape
from typing import Any
from urllib.parse import urlencode

from perfagent.console import flamegraph, stored

_CSS = """
:root { --fg:#1d2330; --muted:#667085; --line:#e4e7ec; --bg:#f7f8fa; --accent:#3658d8;
        --bad:#c4320a; --warn:#b54708; --good:#067647; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color:var(--fg); background:var(--bg); }
header { background:#101828; color:#fff; padding:10px 24px; display:flex; gap:24px;
         align-items:center; }
header b { font-size:16px; letter-spacing:.3px; }
header a { color:#d0d5dd; text-decoration:none; }
header a.on, header a:hover { color:#fff; }
main { padding:20px 24px; max-width:1280px; }
h1 { font-size:20px; margin:0 0 16px; }
h2 { font-size:16px; margin:24px 0 8px; }
table { border-collapse:collapse; width:100%; background:#fff; border:1px solid var(--line); }
th, td { text-align:left; padding:6px 10px; border-bottom:1px solid var(--line);
         vertical-align:top; }
th { background:#f2f4f7; font-weight:600; cursor:pointer; white-space:nowrap; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
a { color:var(--accent); }
code, pre { font:12px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; }
pre { background:#fff; border:1px solid var(--line); padding:8px; overflow:auto;
      white-space:pre-wrap; }
.cards { display:flex; gap:12px; flex-wrap:wrap; margin-bottom:16px; }
.card { background:#fff; border:1px solid var(--line); padding:10px 14px; min-width:130px; }
.card .v { font-size:20px; font-weight:600; }
.card .k { color:var(--muted); font-size:12px; }
.bad { color:var(--bad); } .warn { color:var(--warn); } .good { color:var(--good); }
.muted { color:var(--muted); }
.wf { position:relative; height:18px; background:#f2f4f7; }
.wf span { position:absolute; top:2px; height:14px; background:var(--accent); min-width:2px; }
.wf span.db { background:#7a5af8; } .wf span.err { background:var(--bad); }
.wf i { position:absolute; top:0; width:2px; height:18px; background:var(--warn); }
form.filters { display:flex; gap:8px; flex-wrap:wrap; margin-bottom:12px; }
form.filters input, form.filters select { padding:4px 6px; }
#live { background:#fff; border:1px solid var(--line); padding:8px; min-height:40px; }
#live div { border-bottom:1px solid var(--line); padding:3px 0; }
svg text { font-size:10px; fill:var(--muted); }
"""

_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, index) => {
  th.addEventListener('click', () => {
    const table = th.closest('table'), body = table.tBodies[0];
    const asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
    const key = row => { const c = row.cells[index]; return c.dataset.v ?? c.textContent; };
    const rows = [...body.rows].sort((a, b) => {
      const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
      const d = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? d : -d; });
    rows.forEach(r => body.appendChild(r));
  });
});
const live = document.getElementById('live');
if (live && window.EventSource) {
  const source = new EventSource('/api/live');
  const add = (text, href) => {
    const line = document.createElement('div');
    const link = document.createElement(href ? 'a' : 'span');
    if (href) link.href = href;
    link.textContent = text; line.appendChild(link);
    live.prepend(line);
    const empty = document.getElementById('live-empty'); if (empty) empty.remove();
  };
  source.addEventListener('finding', e => {
    const f = JSON.parse(e.data);
    add(`${f.kind}  ${f.method || ''} ${f.route || ''}  ${f.duration_ms ?? f.total_ms ?? ''} ms`,
        f.trace_id ? `/traces/${f.trace_id}` : null);
  });
  source.addEventListener('request', e => {
    const r = JSON.parse(e.data);
    add(`${r.name}  ${r.status}  ${r.duration_ms} ms  ${r.events.join(' ')}`,
        `/traces/${r.trace_id}`);
  });
}
"""

_NAV = (
    ("/", "Overview"),
    ("/routes", "Routes"),
    ("/requests", "Requests"),
    ("/findings", "Findings"),
    ("/profiles", "Profiles"),
)


def h(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _ms(value: Any) -> str:
    value = stored.number(value)
    return "-" if value is None else f"{value:,.1f}"


def _pct(value: float | None) -> str:
    value = stored.number(value)
    return "-" if value is None else f"{value * 100:.1f}%"


def _when(seconds: Any, pattern: str = "%Y-%m-%d %H:%M:%S") -> str:
    seconds = stored.number(seconds)
    if not seconds:
        return "-"
    try:
        return time.strftime(pattern, time.localtime(seconds))
    except (OverflowError, OSError, ValueError):  # a time no calendar reaches
        return "-"


def _link(path: str, **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None and v != ""})
    return h(path + ("?" + query if query else ""))


def _table(table_id: str, head: str, rows: list[str]) -> str:
    if not rows:
        rows = ['<tr><td colspan="12" class="muted">Nothing recorded yet.</td></tr>']
    return (
        f'<table class="sortable" id="{table_id}"><thead>{head}</thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def layout(title: str, active: str, body: str) -> str:
    nav = "".join(
        f'<a href="{href}" class="{"on" if href == active else ""}">{label}</a>'
        for href, label in _NAV
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{h(title)} · perfagent</title>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<style>{_CSS}</style></head><body>"
        f"<header><b>perfagent</b>{nav}</header><main>{body}</main>"
        f"<script>{_SCRIPT}</script></body></html>"
    )


def _chart(series: list[dict[str, Any]], key: str, label: str, width: int = 560) -> str:
    """A small SVG area chart of one value per minute, zero-based."""
    points = [(s["minute"], s[key]) for s in series if s.get(key) is not None]
    height, left, bottom = 130, 44, 18
    if not points:
        return f'<p class="muted">{h(label)}: no data in this window yet.</p>'
    if len(points) == 1:  # one minute so far: draw it as a flat line over that minute
        points = [(points[0][0] - 1, points[0][1]), points[0]]
    first, last = points[0][0], points[-1][0]
    top = max(v for _, v in points) or 1.0

    def x(minute: float) -> float:
        return left + (minute - first) / (last - first) * (width - left - 8)

    def y(value: float) -> float:
        return 16 + (1 - value / top) * (height - bottom - 16)

    line = " ".join(f"{x(m):.1f},{y(v):.1f}" for m, v in points)
    area = f"{x(first):.1f},{y(0):.1f} {line} {x(last):.1f},{y(0):.1f}"
    clock = (_when(first * 60, "%H:%M"), _when(last * 60, "%H:%M"))
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="{h(label)}">'
        f'<text x="{left}" y="10">{h(label)}</text>'
        f'<text x="0" y="{y(top) + 4:.0f}">{top:,.1f}</text>'
        f'<text x="0" y="{y(0) + 4:.0f}">0</text>'
        f'<line x1="{left}" x2="{width - 8}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#d0d5dd"/>'
        f'<polygon fill="#3658d8" fill-opacity="0.12" points="{area}"/>'
        f'<polyline fill="none" stroke="#3658d8" stroke-width="1.5" points="{line}"/>'
        f'<text x="{left}" y="{height - 2}">{clock[0]}</text>'
        f'<text x="{width - 40}" y="{height - 2}">{clock[1]}</text></svg>'
    )


def overview(services: list[dict[str, Any]], window: str) -> str:
    parts = [f"<h1>Overview <span class=muted>last {h(window)}</span></h1>"]
    if not services:
        parts.append(
            "<p>No data yet. Run your app with <code>perfagent run -- uvicorn app:app</code>; "
            "per-route figures arrive every few seconds.</p>"
        )
    for s in services:
        apdex_class = "good" if s["apdex"] >= 0.94 else "warn" if s["apdex"] >= 0.85 else "bad"
        cards = [
            ("requests/s", f"{s['rate_per_s']:,.2f}", ""),
            ("errors", _pct(s["error_rate"]), "bad" if s["error_rate"] else ""),
            ("p50 ms", _ms(s["p50_ms"]), ""),
            ("p95 ms", _ms(s["p95_ms"]), ""),
            ("p99 ms", _ms(s["p99_ms"]), ""),
            ("Apdex (T=250 ms)", f"{s['apdex']:.2f}", apdex_class),
            ("active findings", str(s["findings"]), "warn" if s["findings"] else ""),
        ]
        parts.append(
            f'<h2><a href="{_link("/routes", service=s["service"])}">{h(s["service"])}</a></h2>'
        )
        parts.append(
            '<div class="cards">'
            + "".join(
                f'<div class="card"><div class="v {c}">{h(v)}</div>'
                f'<div class="k">{h(k)}</div></div>'
                for k, v, c in cards
            )
            + "</div>"
        )
        parts.append(_chart(s["series"], "count", "requests per minute"))
        parts.append(_chart(s["series"], "p95_ms", "p95 ms per minute"))
    parts.append(
        '<h2>Live</h2><div id="live"><span id="live-empty" class="muted">'
        "New findings and slow or failed requests appear here.</span></div>"
    )
    return layout("Overview", "/", "".join(parts))


def _routes_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th>service</th><th>method</th><th>route</th><th class=num>requests</th>"
        "<th class=num>rate/s</th><th class=num>errors</th><th class=num>p50 ms</th>"
        "<th class=num>p95 ms</th><th class=num>p99 ms</th><th class=num>queries/req</th>"
        "<th class=num>impact s</th></tr>"
    )
    body = []
    for r in rows:
        href = _link("/route", service=r["service"], route=r["route"], method=r["method"])
        route = h(r["route"]) if r["route"] else '<span class="muted">(no route)</span>'
        rate = "-" if r["rate_per_s"] is None else f"{r['rate_per_s']:,.2f}"
        queries = r.get("queries_per_request")
        body.append(
            f"<tr><td>{h(r['service'])}</td><td>{h(r['method'])}</td>"
            f'<td><a href="{href}">{route}</a></td>'
            f"<td class=num>{r['count']:,}</td><td class=num>{rate}</td>"
            f'<td class=num data-v="{r["error_rate"]}">{_pct(r["error_rate"])}</td>'
            f"<td class=num>{_ms(r['p50_ms'])}</td><td class=num>{_ms(r['p95_ms'])}</td>"
            f"<td class=num>{_ms(r['p99_ms'])}</td>"
            f"<td class=num>{'-' if queries is None else f'{queries:.1f}'}</td>"
            f'<td class=num data-v="{r["impact_ms"]}">{r["impact_ms"] / 1000:,.2f}</td></tr>'
        )
    return _table("routes", head, body)


def routes(rows: list[dict[str, Any]], window: str | None) -> str:
    title = f"Routes <span class=muted>{'last ' + h(window) if window else 'since start'}</span>"
    windows = " · ".join(
        f'<a href="{_link("/routes", window=w)}">{w or "all"}</a>' for w in ("15m", "1h", "24h", "")
    )
    empty = "" if rows else "<p>No requests recorded yet.</p>"
    return layout(
        "Routes", "/routes", f"<h1>{title}</h1><p>{windows}</p>{empty}{_routes_table(rows)}"
    )


def _requests_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th>time</th><th>service</th><th>request</th><th class=num>status</th>"
        "<th class=num>ms</th><th>findings</th></tr>"
    )
    body = []
    for r in rows:
        status_class = "bad" if (r["status"] or 0) >= 500 else ""
        events = ", ".join(e["name"] for e in r["events"])
        body.append(
            f"<tr><td>{_when(r['start_ns'] / 1e9)}</td><td>{h(r['service'])}</td>"
            f'<td><a href="/traces/{h(r["trace_id"])}">{h(r["name"])}</a></td>'
            f"<td class='num {status_class}'>{h(r['status'])}</td>"
            f"<td class=num>{_ms(r['duration_ms'])}</td><td class=warn>{h(events)}</td></tr>"
        )
    return _table("requests", head, body)


def route(
    service: str,
    route_name: str,
    method: str,
    stats: dict[str, Any] | None,
    series: list[dict[str, Any]],
    slowest: list[dict[str, Any]],
    found: list[dict[str, Any]],
    stacks: dict[str, int],
) -> str:
    name = h(route_name) or "(no route)"
    parts = [f"<h1>{h(method)} {name} <span class=muted>{h(service)}</span></h1>"]
    if stats:
        parts.append(_routes_table([stats]))
    parts.append("<h2>Latency, last 24 hours</h2>")
    parts.append(_chart(series, "p95_ms", "p95 ms per minute"))
    parts.append(_chart(series, "p50_ms", "p50 ms per minute"))
    parts.append(_chart(series, "count", "requests per minute"))
    parts.append("<h2>Where the time went <span class=muted>(sampled slow requests)</span></h2>")
    parts.append(flamegraph.svg(stacks, label="flame graph of " + route_name))
    parts.append("<h2>Slowest kept requests</h2>" + _requests_table(slowest))
    parts.append("<h2>Findings</h2>" + _findings_table(found))
    return layout(route_name or "route", "/routes", "".join(parts))


def requests(rows: list[dict[str, Any]], filters: dict[str, Any], page: int) -> str:
    has_finding = filters.get("has_finding")
    inputs = "".join(
        f'<input name="{k}" placeholder="{k}" value="{h(v if v is not None else "")}">'
        for k, v in filters.items()
        if k != "has_finding"
    )
    chosen = {None: "", True: "true", False: "false"}[has_finding]
    options = "".join(
        f'<option value="{v}"{" selected" if v == chosen else ""}>{label}</option>'
        for v, label in (("", "any"), ("true", "with findings"), ("false", "without"))
    )
    form = (
        f'<form class="filters" method="get">{inputs}'
        f'<select name="has_finding">{options}</select><button>Filter</button></form>'
    )
    params = {k: v for k, v in filters.items() if v is not None}
    pager = []
    if page > 1:
        pager.append(f'<a href="{_link("/requests", page=page - 1, **params)}">newer</a>')
    if len(rows) == 50:
        pager.append(f'<a href="{_link("/requests", page=page + 1, **params)}">older</a>')
    return layout(
        "Requests",
        "/requests",
        "<h1>Kept requests</h1><p class=muted>Slow, failed and finding-bearing requests, "
        f"and a head sample of the rest; newest first.</p>{form}{_requests_table(rows)}"
        f"<p>{' · '.join(pager)}</p>",
    )


def trace(found: dict[str, Any]) -> str:
    spans = found["spans"]
    start = min(s["start_ns"] for s in spans)
    total = max(max(s["end_ns"] for s in spans) - start, 1)
    depth: dict[str, int] = {}
    for s in spans:
        depth[s["span_id"]] = depth.get(s["parent_span_id"], -1) + 1 if s["parent_span_id"] else 0
    rows = []
    for s in spans:
        left = (s["start_ns"] - start) / total * 100
        width = max((s["end_ns"] - s["start_ns"]) / total * 100, 0.2)
        css = "db" if s["kind"] == 3 else "err" if (s["status"] or 0) >= 500 else ""
        marks = "".join(
            f'<i title="{h(e["name"])}" '
            f'style="left:{(e["time_ns"] - start) / total * 100:.2f}%"></i>'
            for e in s["events"]
            if e["time_ns"] is not None
        )
        indent = depth.get(s["span_id"], 0) * 14
        rows.append(
            f'<tr><td style="padding-left:{10 + indent}px">{h(s["name"])}</td>'
            f"<td class=num>{_ms(s['duration_ms'])}</td>"
            f'<td style="width:55%"><div class="wf"><span class="{css}" '
            f'style="left:{left:.2f}%;width:{width:.2f}%"></span>{marks}</div></td></tr>'
        )
    details = []
    for s in spans:
        attrs = "".join(
            f"<tr><td><code>{h(k)}</code></td><td><code>{h(v)}</code></td></tr>"
            for k, v in sorted(s["attributes"].items())
        )
        events = "".join(_event(e) for e in s["events"])
        where = f"{h(s['service'])} · span {h(s['span_id'])}"
        details.append(
            f"<h2>{h(s['name'])} <span class=muted>{where}</span></h2>"
            f"<table>{attrs}</table>{events}"
        )
    root = spans[0]
    return layout(
        "Trace",
        "/requests",
        f"<h1>Trace <code>{h(found['trace_id'])}</code></h1>"
        f"<p>{h(root['service'])} · {_when(start / 1e9)} · {total / 1e6:,.1f} ms</p>"
        f'<table id="waterfall"><thead><tr><th>span</th><th class=num>ms</th><th>timeline</th></tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table>{''.join(details)}",
    )


def profiles(rows: list[dict[str, Any]], asked: list[dict[str, Any]]) -> str:
    form = (
        "<p><label>Profile the processes started by <code>perfagent run</code> for "
        '<input id="seconds" type="number" min="1" max="120" value="10" style="width:4em"> '
        's</label> <button id="ask-profile">Profile now</button> '
        '<span id="asked" class="muted"></span></p>'
        "<script>document.getElementById('ask-profile').onclick = async () => {"
        "const seconds = parseInt(document.getElementById('seconds').value, 10);"
        "const r = await fetch('/api/profiles', {method: 'POST',"
        "headers: {'content-type': 'application/json'}, body: JSON.stringify({seconds})});"
        "document.getElementById('asked').textContent = r.ok ? 'asked; reload when done' : "
        "'refused: ' + r.status; };</script>"
    )
    head = (
        "<tr><th>#</th><th>asked</th><th class=num>seconds</th><th>status</th>"
        "<th>by</th><th>result</th></tr>"
    )
    body = [
        f"<tr><td>{a['id']}</td><td>{_when(a['created'])}</td><td class=num>{a['seconds']}</td>"
        f"<td>{h(a['status'])}</td><td>{h(a['runner'] or '')}</td>"
        f"<td>{_profile_link(a)}</td></tr>"
        for a in asked
    ]
    return layout(
        "Profiles",
        "/profiles",
        "<h1>Profiles</h1><h2>Whole processes (py-spy)</h2>"
        + form
        + _table("profile-requests", head, body)
        + "<h2>Single requests</h2><p class=muted>Requests profiled on demand (sent with "
        "<code>X-Perfagent-Profile</code>); open one for its flame graph. Flame graphs of "
        "slow requests are on each route's page.</p>" + _requests_table(rows),
    )


def _profile_link(asked: dict[str, Any]) -> str:
    if asked["status"] == "done":
        return f'<a href="/profiles/{asked["id"]}">flame graph</a>'
    return h(asked.get("error") or "")


def profile(found: dict[str, Any]) -> str:
    return layout(
        "Profile",
        "/profiles",
        f"<h1>Profile #{found['id']} <span class=muted>{found['seconds']} s by "
        f"{h(found['runner'] or '')}, {_when(found['created'])}</span></h1>"
        + flamegraph.svg(found["stacks"], label="py-spy profile"),
    )


def _event(event: dict[str, Any]) -> str:
    attributes = dict(event["attributes"])
    stacks = stored.stacks(attributes.pop("stacks", None))
    shown = json.dumps(attributes, indent=2, default=str)
    out = f"<h3 class=warn>{h(event['name'])}</h3><pre>{h(shown)}</pre>"
    if stacks:
        out += flamegraph.svg(stacks, label="samples of this request")
    return out


def _findings_table(found: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th>kind</th><th>service</th><th>where</th><th>what</th><th class=num>seen</th>"
        "<th>first seen</th><th>last seen</th><th>example</th></tr>"
    )
    body = []
    for f in found:
        where = f"{f.get('method') or ''} {f.get('route') or ''}".strip() or "(no request)"
        what = f.get("fingerprint") or f.get("callsite") or ""
        if f["kind"] == "slow_request":
            what = f"{_ms(f.get('duration_ms'))} ms over {_ms(f.get('threshold_ms'))} ms"
        elif f["kind"] == "latency_regression":
            what = f"p95 {_ms(f.get('p95_ms'))} ms, usually {_ms(f.get('usual_p95_ms'))} ms"
        trace_id = f.get("example_trace_id")
        example = f'<a href="/traces/{h(trace_id)}">trace</a>' if trace_id else "-"
        body.append(
            f"<tr><td class=warn>{h(f['kind'])}</td><td>{h(f['service'])}</td><td>{h(where)}</td>"
            f"<td><code>{h(what)}</code></td><td class=num>{f['occurrences']:,}</td>"
            f"<td>{_when(f['first_seen'])}</td><td>{_when(f['last_seen'])}</td>"
            f"<td>{example}</td></tr>"
        )
    return _table("findings", head, body)


def findings(found: list[dict[str, Any]], kind: str | None) -> str:
    kinds = " · ".join(
        f'<a href="{_link("/findings", kind=k)}">{k or "all"}</a>'
        for k in (
            "",
            "slow_request",
            "latency_regression",
            "n_plus_one",
            "duplicate_query",
            "event_loop_blocked",
        )
    )
    return layout(
        "Findings",
        "/findings",
        f"<h1>Findings <span class=muted>{h(kind or 'all')}</span></h1><p>{kinds}</p>"
        f"{_findings_table(found)}"
        '<h2>Live</h2><div id="live"><span id="live-empty" class="muted">'
        "New findings appear here without reloading.</span></div>",
    )
