"""Hostile OTLP is refused whole at ingest, and pages render whatever the store holds."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time

import pytest
import requests
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Histogram,
    HistogramDataPoint,
    Metric,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from test_console import _span_request, start_console

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
NOW_NS = time.time_ns()
PAST_INT64 = 2**64 - 1  # fits OTLP's fixed64, not SQLite's signed 64-bit integers
PAGES = ("/", "/routes", "/routes?window=1h", "/requests", "/findings", "/profiles")
APIS = ("/api/routes", "/api/routes?window=1h", "/api/overview", "/api/findings")


def kv(key: str, value) -> KeyValue:
    if isinstance(value, str):
        return KeyValue(key=key, value=AnyValue(string_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(int_value=value))


def metrics(**point) -> ExportMetricsServiceRequest:
    fields = {
        "attributes": [kv("http.route", "/x"), kv("http.request.method", "GET")],
        "start_time_unix_nano": NOW_NS - 10**9,
        "time_unix_nano": NOW_NS,
        "count": 3,
        "sum": 0.3,
        "bucket_counts": [1, 2, 0],
        "explicit_bounds": [0.1, 0.5],
    }
    fields.update(point)
    metric = Metric(
        name="http.server.request.duration",
        histogram=Histogram(data_points=[HistogramDataPoint(**fields)], aggregation_temporality=2),
    )
    return ExportMetricsServiceRequest(
        resource_metrics=[ResourceMetrics(scope_metrics=[ScopeMetrics(metrics=[metric])])]
    )


def finding(**attributes) -> ExportLogsServiceRequest:
    fields = {"route": "/x", "method": "GET", "duration_ms": 900.0, "threshold_ms": 500.0}
    fields.update(attributes)
    record = LogRecord(
        time_unix_nano=NOW_NS,
        event_name="slow_request",
        attributes=[kv(k, v) for k, v in fields.items()],
    )
    return ExportLogsServiceRequest(
        resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=[record])])]
    )


def span_with_event(stacks: str) -> object:
    event = Span.Event(
        name="profile", time_unix_nano=1_700_000_000_010_000_000, attributes=[kv("stacks", stacks)]
    )
    return _span_request(events=[event])


def as_json(message) -> dict:
    """OTLP/JSON as a client writes it: hex ids, 64-bit integers as strings."""
    data = json_format.MessageToDict(message)

    def hex_ids(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                    node[key] = __import__("base64").b64decode(value).hex()
                else:
                    hex_ids(value)
        elif isinstance(node, list):
            for item in node:
                hex_ids(item)
        return node

    return hex_ids(data)


def post(console, signal: str, message, encoding: str) -> requests.Response:
    if encoding == "protobuf":
        body, kind = message.SerializeToString(), "application/x-protobuf"
    else:
        body, kind = json.dumps(as_json(message)), "application/json"
    return requests.post(
        f"{console.base}/v1/{signal}", data=body, headers={"content-type": kind}, timeout=10
    )


HOSTILE = [
    ("metrics", metrics(explicit_bounds=[0.1, float("inf")]), "infinite bound"),
    ("metrics", metrics(explicit_bounds=[float("nan"), 0.5]), "NaN bound"),
    ("metrics", metrics(sum=float("inf")), "infinite sum"),
    ("metrics", metrics(sum=float("nan")), "NaN sum"),
    ("metrics", metrics(explicit_bounds=[0.5, 0.5]), "bounds not increasing"),
    ("metrics", metrics(count=PAST_INT64, bucket_counts=[PAST_INT64, 0, 0]), "huge count"),
    ("metrics", metrics(time_unix_nano=PAST_INT64), "time past int64"),
    ("metrics", metrics(start_time_unix_nano=PAST_INT64), "start past int64"),
    ("logs", finding(duration_ms="abc"), "duration_ms text"),
    ("logs", finding(threshold_ms=float("nan")), "threshold_ms NaN"),
    ("logs", finding(count="12"), "count text"),
    ("logs", finding(route=7), "route a number"),
    ("logs", finding(stacks="not json"), "stacks not JSON"),
    ("logs", finding(stacks='{"a;b": "x"}'), "stacks not counts"),
    ("logs", finding(stacks="[1, 2]"), "stacks a list"),
    ("traces", span_with_event("not json"), "event stacks not JSON"),
    ("traces", span_with_event('{"a;b": -3}'), "event stacks negative"),
    ("traces", span_with_event('{"a;b": 1.5}'), "event stacks fractional"),
    ("traces", span_with_event('["a;b", 1]'), "event stacks a list"),
    ("traces", _span_request(end_time_unix_nano=PAST_INT64), "end past int64"),
    (
        "traces",
        _span_request(start_time_unix_nano=PAST_INT64 - 1, end_time_unix_nano=PAST_INT64),
        "start past int64",
    ),
]


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_hostile_otlp_gets_4xx_stores_nothing_and_pages_render(servers, tmp_path, encoding):
    console = start_console(servers, tmp_path)
    for signal, message, what in HOSTILE:
        answer = post(console, signal, message, encoding)
        assert 400 <= answer.status_code < 500, (what, answer.status_code, answer.text)
    for path in PAGES + APIS + (f"/traces/{TRACE_ID}", f"/api/traces/{TRACE_ID}"):
        answer = requests.get(console.base + path, timeout=10)
        assert answer.status_code in (200, 404), (path, answer.status_code)
    assert requests.get(console.base + "/api/routes", timeout=5).json() == []
    assert requests.get(console.base + "/api/findings", timeout=5).json() == []
    assert requests.get(console.base + "/api/requests", timeout=5).json() == []
    assert requests.get(console.base + f"/api/traces/{TRACE_ID}", timeout=5).status_code == 404

    # The well-formed versions of the same payloads are taken and shown.
    assert post(console, "metrics", metrics(), encoding).status_code == 200
    assert post(console, "logs", finding(stacks='{"a;b": 3}'), encoding).status_code == 200
    assert post(console, "traces", span_with_event('{"a;b": 3}'), encoding).status_code == 200
    (route,) = requests.get(console.base + "/api/routes", timeout=5).json()
    assert (route["route"], route["count"]) == ("/x", 3)
    (found,) = requests.get(console.base + "/api/findings", timeout=5).json()
    assert found["duration_ms"] == 900.0
    page = requests.get(console.base + f"/traces/{TRACE_ID}", timeout=5)
    assert page.status_code == 200 and '<svg class="flame"' in page.text


def test_a_double_attribute_that_is_not_finite_is_kept_as_text(servers, tmp_path):
    console = start_console(servers, tmp_path)
    message = _span_request(attributes=[kv("ratio", float("nan")), kv("big", float("-inf"))])
    assert post(console, "traces", message, "protobuf").status_code == 200
    (span,) = requests.get(console.base + f"/api/traces/{TRACE_ID}", timeout=5).json()["spans"]
    assert span["attributes"] == {"ratio": "nan", "big": "-inf"}
    assert requests.get(console.base + f"/traces/{TRACE_ID}", timeout=5).status_code == 200


def write_hostile_rows(db: str) -> None:
    """Rows no console would write: wrong types in every column, JSON that is not."""
    minute = int(time.time() // 60)
    bad_hist = [
        ("[Infinity]", "[1, 2]", 3, 1.0),
        ("[NaN]", "[1, 2]", 3, 1.0),
        ("garbage", "[1]", 1, 1.0),
        ("[0.1]", "not json", 1, 1.0),
        ("[0.1]", "[1, 2]", "three", 1.0),
        ("[0.1]", "[1, 2]", 3, "abc"),
        ("[0.1]", "[1, 2]", 3, float("inf")),
        ("[0.1]", "[-1, 4]", 3, 1.0),
        ("[0.5, 0.1]", "[1, 1, 1]", 3, 1.0),
        ("[1e300]", "[1, 2]", 3, 1.0),
        ('{"a": 1}', "[1, 2]", 3, 1.0),
        ("[0.1]", "[1, 2]", 2**63 - 1, 1.0),
    ]
    with sqlite3.connect(db) as conn:
        for i, (bounds, counts, count, total) in enumerate(bad_hist):
            conn.execute(
                "INSERT INTO histograms VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    f"s{i}",
                    "svc",
                    "GET",
                    "/bad",
                    "x" if i % 2 else 500,
                    1,
                    count,
                    total,
                    bounds,
                    counts,
                ),
            )
            conn.execute(
                "INSERT INTO route_minutes VALUES (?,?,?,?,?,?,?,?,?)",
                (minute, "svc", "GET", f"/bad{i}", 500, count, total, bounds, counts),
            )
        conn.execute(
            "INSERT INTO route_minutes VALUES (?,?,?,?,?,?,?,?,?)",
            ("soon", b"\xff\xfe", "GET", "/bytes", "x", 1, 1.0, "[0.1]", "[1, 0]"),
        )
        findings = [
            ('{"duration_ms": "abc", "threshold_ms": [1]}', "slow_request", 3),
            ('{"p95_ms": {"a": 1}, "usual_p95_ms": NaN}', "latency_regression", 1),
            ("not json", "n_plus_one", "many"),
            ("[1, 2, 3]", "slow_request", 2.5),
            ('{"route": ["a"], "method": 5}', "slow_request", 1e300),
        ]
        for i, (data, kind, occurrences) in enumerate(findings):
            conn.execute(
                "INSERT INTO findings VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    f"k{i}",
                    kind,
                    "svc",
                    "/bad",
                    "GET",
                    None,
                    None,
                    "first",
                    1e300,
                    occurrences,
                    TRACE_ID,
                    data,
                ),
            )
        events = [
            '[{"name": "profile", "time_ns": "soon", "attributes": {"stacks": "[1, 2]"}}]',
            '[{"name": "profile", "attributes": {"stacks": "{\\"a\\": \\"x\\"}"}}]',
            '[{"attributes": {"stacks": {"a;b": -1}}}, 5, "x", null]',
            '{"not": "a list"}',
            "not json",
            '[{"name": "slow", "time_ns": 1e400, "attributes": []}]',
        ]
        for i, event_json in enumerate(events):
            conn.execute(
                "INSERT INTO spans VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    TRACE_ID,
                    f"{i + 1:016x}",
                    "" if i == 0 else "0000000000000001",
                    "svc",
                    f"span {i}",
                    2,
                    "start" if i == 1 else 10**18 + i,
                    2**63 - 1 if i == 2 else "later",
                    "slow" if i == 3 else float("inf"),
                    "/bad",
                    "GET",
                    "error" if i else 503,
                    None,
                    "not json" if i % 2 else '{"k": NaN}',
                    event_json,
                    1,
                    0,
                    time.time(),
                ),
            )
        conn.execute(
            "INSERT INTO route_stacks VALUES (?,?,?,?,?)", ("svc", "/bad", "GET", "a;b", "x")
        )
        conn.execute(
            "INSERT INTO route_stacks VALUES (?,?,?,?,?)", ("svc", "/bad", "GET", b"\xff", 2)
        )
        conn.execute(
            "INSERT INTO profile_requests VALUES (?,?,?,?,?,?,?,?,?)",
            (7, "yesterday", "ten", None, "done", 5, "never", b"\xff\xfe a;b 3\nnot-a-line", None),
        )
        conn.execute(
            "INSERT INTO profile_requests VALUES (?,?,?,?,?,?,?,?,?)",
            (8, 1e300, -1, 3, 404, None, None, 42, 3.5),
        )
        conn.execute(
            "INSERT INTO route_queries VALUES (?,?,?,?,?)", ("svc", "/bad0", "GET", 0, "lots")
        )


def test_pages_and_api_render_whatever_the_store_holds(servers, tmp_path):
    console = start_console(servers, tmp_path)
    write_hostile_rows(str(tmp_path / "c.db"))
    paths = [
        *PAGES,
        *APIS,
        "/findings?kind=slow_request",
        "/requests?has_finding=true",
        "/route?service=svc&route=/bad&method=GET",
        "/route?service=svc&route=/bad0&method=GET",
        f"/traces/{TRACE_ID}",
        f"/api/traces/{TRACE_ID}",
        "/api/requests",
        "/api/services",
        "/api/profiles",
        "/profiles/7",
        "/profiles/8",
        "/api/flamegraph?service=svc&route=/bad",
        "/api/flamegraph?service=svc&route=/bad&fmt=collapsed",
    ]
    for path in paths:
        answer = requests.get(console.base + path, timeout=10)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
        if answer.headers["content-type"] == "application/json":
            json.loads(answer.text, parse_constant=pytest.fail)  # no NaN, no Infinity
    assert "span 0" in requests.get(console.base + f"/traces/{TRACE_ID}", timeout=5).text

    # Ingest still works over damaged rows of the same streams.
    assert post(console, "metrics", metrics(), "protobuf").status_code == 200
    routes = requests.get(console.base + "/api/routes", timeout=5).json()
    assert [(r["route"], r["count"]) for r in routes if r["route"] == "/x"] == [("/x", 3)]


def console_schema(path) -> str:
    """The console's OpenAPI, built in-process: a console serves it only with --docs."""
    from perfagent.console.app import create_app
    from perfagent.console.store import Store

    with Store(path.parent / "schema.db") as store:
        path.write_text(json.dumps(create_app(store).openapi()))
    return str(path)


def test_console_answers_a_fuzzer_without_server_errors(servers, tmp_path):
    """schemathesis sends what the console's OpenAPI allows and what it does not (the
    coverage phase: nulls, wrong types, missing fields), then random values (the fuzzing
    phase; OTLP/JSON bodies with NaN, Infinity, 64-bit strings), to the API, the pages and
    the receivers of a console holding good and damaged rows: no answer may be a 5xx."""
    console = start_console(servers, tmp_path)
    assert post(console, "traces", span_with_event('{"a;b": 3}'), "protobuf").status_code == 200
    assert post(console, "metrics", metrics(), "json").status_code == 200
    assert post(console, "logs", finding(), "protobuf").status_code == 200
    write_hostile_rows(str(tmp_path / "c.db"))
    argv = ["schemathesis", "run", console_schema(tmp_path / "openapi.json"), "--url"]
    argv += [console.base, "--checks", "not_a_server_error", "--phases", "coverage,fuzzing"]
    argv += ["--max-examples", "12", "--workers", "2", "--seed", "1"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout
    print(result.stdout[-600:])
