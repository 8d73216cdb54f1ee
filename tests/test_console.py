"""The console: a real console process fed by a real app under the agent."""

from __future__ import annotations

import gzip
import json
import subprocess
import time

import pytest
import requests
from helpers import PERFAGENT, Server, clean_env, free_port, scrape, wait_for_counts
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span


def start_console(servers, tmp_path, *extra: str) -> Server:
    port = free_port()
    argv = [*PERFAGENT, "console", "--port", str(port), "--db", str(tmp_path / "c.db"), *extra]
    console = servers(argv, port, clean_env())
    console.wait_listening()
    return console


def start_app(servers, console: Server, *extra: str, sample: str = "0"):
    port, metrics_port = free_port(), free_port()
    argv = [*PERFAGENT, "run", "--metrics-port", str(metrics_port), "--console-url", console.base]
    argv += [*extra, "--", "uvicorn", "fastapi_app:app", "--port", str(port), "--workers", "2"]
    env = clean_env(PERFAGENT_EXPORT_INTERVAL_S="0.5", PERFAGENT_TRACE_SAMPLE=sample)
    app = servers(argv, port, env)
    app.wait_listening()
    return app, metrics_port


def poll(fetch, ready, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    value = fetch()
    while not ready(value) and time.monotonic() < deadline:
        time.sleep(0.2)
        value = fetch()
    return value


def promql_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """histogram_quantile over cumulative (le, count) pairs, written out for the test."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    rank = q * total
    previous_le, previous_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return previous_le
            return previous_le + (le - previous_le) * (rank - previous_count) / (
                count - previous_count
            )
        previous_le, previous_count = le, count
    return previous_le


def test_routes_api_agrees_with_prometheus(servers, tmp_path):
    console = start_console(servers, tmp_path)
    app, metrics_port = start_app(servers, console)
    plan = {"/items/{item_id}": 40, "/hello": 25, "/api/v1/users/{user_id}": 10}
    for i in range(40):
        app.get(f"/items/{i}")
    for _ in range(25):
        app.get("/hello")
    for i in range(10):
        app.get(f"/api/v1/users/{i}")
    for _ in range(3):
        app.get("/fail")
    wait_for_counts(metrics_port, 78)

    def counts():
        rows = requests.get(console.base + "/api/routes", timeout=5).json()
        return {r["route"]: r for r in rows}

    routes = poll(counts, lambda r: all(r.get(k, {}).get("count") == v for k, v in plan.items()))
    samples = scrape(metrics_port)
    for route, sent in plan.items():
        assert routes[route]["count"] == sent, routes
        buckets = [
            (float(s.labels["le"]), s.value)
            for s in samples
            if s.name == "http_server_request_duration_seconds_bucket"
            and s.labels["http_route"] == route
        ]
        for q, key in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
            expected_ms = promql_quantile(q, buckets) * 1000
            assert routes[route][key] == pytest.approx(expected_ms, abs=1e-3)  # rounded to 1 µs
    assert routes["/fail"]["errors"] == 3 and routes["/fail"]["error_rate"] == 1.0


def test_findings_link_to_their_trace(servers, tmp_path):
    console = start_console(servers, tmp_path)
    app, _ = start_app(servers, console, "--slow-ms", "300")
    for _ in range(2):
        assert app.get("/sleep?seconds=0.4").status_code == 200

    found = poll(
        lambda: requests.get(console.base + "/api/findings?kind=slow_request", timeout=5).json(),
        lambda f: f and f[0]["occurrences"] == 2,
    )
    (finding,) = found
    assert finding["route"] == "/sleep" and finding["method"] == "GET"
    assert finding["duration_ms"] >= 400 and finding["threshold_ms"] == 300
    assert finding["first_seen"] <= finding["last_seen"]
    trace = poll(
        lambda: requests.get(f"{console.base}/api/traces/{finding['trace_id']}", timeout=5),
        lambda r: r.status_code == 200,
    ).json()
    (span,) = trace["spans"]
    assert span["name"] == "GET /sleep" and span["trace_id"] == finding["trace_id"]
    assert [e["name"] for e in span["events"]] == ["slow_request"]
    assert span["duration_ms"] >= 400 and span["attributes"]["http.route"] == "/sleep"
    assert requests.get(console.base + "/api/findings?kind=bogus", timeout=5).status_code == 422


def test_a_repeating_n_plus_one_keeps_exact_occurrences(servers, tmp_path):
    """The same N+1 on every request is exported once per 10 s with the repeats
    folded in since: the console's occurrences still count every request. The
    export after the pause goes out on a kept-alive connection that the console
    closed meanwhile (uvicorn does after 5 s idle): it must be sent again, not lost."""
    console = start_console(servers, tmp_path)
    port = free_port()
    argv = [*PERFAGENT, "run", "--metrics-port", "0", "--console-url", console.base]
    argv += ["--", "uvicorn", "db_app:app", "--port", str(port)]
    env = clean_env(
        DB_PATH=str(tmp_path / "app.sqlite"), PG_DSN="", PERFAGENT_EXPORT_INTERVAL_S="0.5"
    )
    app = servers(argv, port, env)
    app.wait_listening()

    def n_plus_one():
        return requests.get(console.base + "/api/findings?kind=n_plus_one", timeout=5).json()

    for _ in range(4):
        assert app.get("/raw/nplusone").status_code == 200
    # Logged every time, just after each response went out.
    assert poll(lambda: app.output().count("n_plus_one"), lambda n: n >= 4) >= 4
    first = poll(n_plus_one, lambda f: bool(f))
    time.sleep(1.0)  # nothing more comes within the 10 s: three requests wait to be folded in
    assert [f["occurrences"] for f in n_plus_one()] == [1], first
    time.sleep(10.0)
    assert app.get("/raw/nplusone").status_code == 200
    found = poll(n_plus_one, lambda f: f and f[0]["occurrences"] == 5)
    assert [(f["route"], f["occurrences"], f["count"]) for f in found] == [("/raw/nplusone", 5, 10)]


def _span_request(**overrides) -> ExportTraceServiceRequest:
    fields = {
        "trace_id": bytes.fromhex("0af7651916cd43dd8448eb211c80319c"),
        "span_id": bytes.fromhex("b7ad6b7169203331"),
        "name": "GET /x",
        "kind": Span.SPAN_KIND_SERVER,
        "start_time_unix_nano": 1_700_000_000_000_000_000,
        "end_time_unix_nano": 1_700_000_000_050_000_000,
    }
    fields.update(overrides)
    span = Span(**fields)
    return ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]
    )


def test_hostile_payloads_get_4xx_and_store_nothing(servers, tmp_path):
    console = start_console(servers, tmp_path, "--max-body-mb", "1")
    url = console.base + "/v1/traces"
    proto = {"content-type": "application/x-protobuf"}
    cases = [
        (b"\xff\xfe garbage", proto, 400),
        (b"{not json", {"content-type": "application/json"}, 400),
        (b"x", {"content-type": "text/plain"}, 415),
        (b"\0" * (2 * 1024 * 1024), proto, 413),
        (gzip.compress(b"\0" * (8 * 1024 * 1024)), {**proto, "content-encoding": "gzip"}, 413),
        (b"notgzip", {**proto, "content-encoding": "gzip"}, 400),
        (_span_request(trace_id=b"\0" * 16).SerializeToString(), proto, 400),
        (_span_request(span_id=b"123").SerializeToString(), proto, 400),
        (_span_request(end_time_unix_nano=1).SerializeToString(), proto, 400),
    ]
    for body, headers, status in cases:
        response = requests.post(url, data=body, headers=headers, timeout=10)
        assert response.status_code == status, (headers, response.text)
    assert requests.get(console.base + "/api/requests", timeout=5).json() == []

    deep = json.dumps({"resourceSpans": [{"a": 1}]}).replace("1", "[" * 5000 + "]" * 5000)
    response = requests.post(url, data=deep, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    assert requests.get(console.base + "/api/health", timeout=5).json()["status"] == "ok"


def test_otlp_json_with_hex_ids_is_accepted(servers, tmp_path):
    console = start_console(servers, tmp_path)
    body = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "shop"}}]
                },
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "5b8efff798038103d269b633813fc60c",
                                "spanId": "eee19b7ec3c1b174",
                                "name": "GET /cart",
                                "kind": 2,
                                "startTimeUnixNano": "1700000000000000000",
                                "endTimeUnixNano": "1700000000120000000",
                                "attributes": [
                                    {"key": "http.route", "value": {"stringValue": "/cart"}}
                                ],
                            }
                        ]
                    }
                ],
            }
        ]
    }
    response = requests.post(console.base + "/v1/traces", json=body, timeout=5)
    assert response.status_code == 200, response.text
    trace = requests.get(console.base + "/api/traces/5b8efff798038103d269b633813fc60c").json()
    (span,) = trace["spans"]
    assert span["service"] == "shop" and span["route"] == "/cart"
    assert span["duration_ms"] == pytest.approx(120.0)


def test_console_off_loopback_needs_a_token(servers, tmp_path):
    result = subprocess.run(
        [*PERFAGENT, "console", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert result.returncode == 2
    assert "PERFAGENT_CONSOLE_TOKEN" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    console = start_console(servers, tmp_path, "--token", "s3cret")
    assert requests.get(console.base + "/api/health", timeout=5).status_code == 401
    assert requests.get(console.base + "/routes", timeout=5).status_code == 401
    headers = {"authorization": "Bearer s3cret"}
    assert requests.get(console.base + "/api/health", headers=headers, timeout=5).status_code == 200
    body = _span_request().SerializeToString()
    proto = {"content-type": "application/x-protobuf"}
    assert requests.post(console.base + "/v1/traces", data=body, headers=proto).status_code == 401


def test_retention_keeps_the_file_within_its_limit(tmp_path):
    from perfagent.console.store import Retention, SpanRow, Store

    store = Store(tmp_path / "r.db", Retention(max_age_s=3600, max_mb=2))
    for batch in range(30):
        store.add_spans(
            SpanRow(
                trace_id=f"{batch:08x}{i:024x}",
                span_id=f"{i + 1:016x}",
                parent_span_id="",
                service="s",
                name="GET /x",
                kind=2,
                start_ns=i,
                end_ns=i + 1000,
                route="/x",
                method="GET",
                status=200,
                error=None,
                attributes={"padding": "x" * 300},
                events=[],
            )
            for i in range(500)
        )
    assert store.size_mb() > 2
    store.enforce_retention()
    assert store.size_mb() <= 2
    assert (tmp_path / "r.db").stat().st_size <= 2.5e6
    newest = store.query("SELECT count(*) FROM spans WHERE trace_id LIKE '0000001d%'")[0][0]
    assert newest == 500, "the newest spans are the ones kept"
    store.close()
