"""Spans written as protobuf bytes (perfagent/export/wire.py), judged by opentelemetry-proto.

The server tests send real traces to a real receiver; these take the values
those rarely meet (negative and huge numbers, non-ASCII and broken text,
arrays, a remote parent with tracestate, app spans, errors) and check that
the library decodes exactly what the record held.
"""

from __future__ import annotations

import enum

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from perfagent.db.capture import Query
from perfagent.db.fingerprint import Fingerprints
from perfagent.export import wire
from perfagent.export.otlp import SpanWriter, resource
from perfagent.record import RequestRecord


class Color(enum.IntEnum):
    RED = 7


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", AnyValue(string_value="")),
        ("héllo ☃ 𝄞", AnyValue(string_value="héllo ☃ 𝄞")),
        (0, AnyValue(int_value=0)),
        (127, AnyValue(int_value=127)),
        (128, AnyValue(int_value=128)),
        (300, AnyValue(int_value=300)),
        (-1, AnyValue(int_value=-1)),
        (-(2**63), AnyValue(int_value=-(2**63))),
        (2**63 - 1, AnyValue(int_value=2**63 - 1)),
        (True, AnyValue(bool_value=True)),
        (False, AnyValue(bool_value=False)),
        (1.5, AnyValue(double_value=1.5)),
        (-0.0, AnyValue(double_value=-0.0)),
        (1e300, AnyValue(double_value=1e300)),
        (Color.RED, AnyValue(int_value=7)),
        (
            [1, "a", [2.5, False]],
            AnyValue(
                array_value=ArrayValue(
                    values=[
                        AnyValue(int_value=1),
                        AnyValue(string_value="a"),
                        AnyValue(
                            array_value=ArrayValue(
                                values=[AnyValue(double_value=2.5), AnyValue(bool_value=False)]
                            )
                        ),
                    ]
                )
            ),
        ),
        ((), AnyValue(array_value=ArrayValue())),
    ],
)
def test_attribute_values_are_written_as_opentelemetry_proto_writes_them(value, expected):
    written = wire.key_value("k", value)
    assert written == KeyValue(key="k", value=expected).SerializeToString()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (2**63, str(2**63)),  # past int64: its digits
        (-(2**63) - 1, str(-(2**63) - 1)),
        ({"a": 1}, '{"a": 1}'),
        (None, "null"),
        ("a\ud800b", "a?b"),  # a lone surrogate is not valid UTF-8
    ],
)
def test_values_protobuf_has_no_type_for_go_as_text(value, text):
    assert KeyValue.FromString(wire.key_value("k", value)).value == AnyValue(string_value=text)


def test_remembered_attributes_keep_their_type():
    """1, True and 1.0 are equal (and hash alike) in Python, not in OTLP."""
    for _ in range(2):  # the second time from the table
        written = wire.attributes(b"\x0a", {"a": 1, "b": True, "c": 1.0, "d": "1", "e": None})
        decoded = Resource.FromString(written).attributes  # its field 1: KeyValues
        assert [(kv.key, kv.value) for kv in decoded] == [
            ("a", AnyValue(int_value=1)),
            ("b", AnyValue(bool_value=True)),
            ("c", AnyValue(double_value=1.0)),
            ("d", AnyValue(string_value="1")),
        ]
        assert wire.attributes(b"\x0a", {"x": True}) != wire.attributes(b"\x0a", {"x": 1})


def test_remembered_attributes_keep_their_field():
    """The same attribute on a span (field 9) and on an event (field 3)."""
    assert wire.attributes(b"\x4a", {"route": "/a"})[0] == 0x4A
    assert wire.attributes(b"\x1a", {"route": "/a"})[0] == 0x1A


def _record() -> RequestRecord:
    scope = {
        "type": "http",
        "path": "/posts/7",
        "scheme": "https",
        "http_version": "2",
        "server": ("10.0.0.1", 8443),
        "client": ("10.0.0.9", 5555),
        "headers": [(b"host", b"example.org:8443"), (b"user-agent", "tëst/1".encode("latin-1"))],
    }
    record = RequestRecord("POST", 100.0, scope)
    record.route, record.status, record.end = "/posts/{id}", 503, 100.25
    record.error_type = "TimeoutError"
    record._trace_id, record._span_id = (1 << 127) | 5, (1 << 63) | 9
    record.parent = (0x00F067AA0BA902B7, True, "vendor=x,other=y")
    shapes = Fingerprints()
    select = "SELECT * FROM comment WHERE post_id = ?"
    record.queries = [
        Query("sqlite", select, shapes(select), (i,), 100.01 + i / 100, 0.002, 0, (), None)
        for i in range(3)
    ]
    insert = "INSERT INTO tag VALUES (?, ?)"
    record.queries.append(
        Query("postgresql", insert, shapes(insert), None, 100.2, 0.01, 1000, (), None)
    )
    record.spans = [("render", 100.1, 100.15, None), ("cache", 100.15, 100.16, "KeyError")]
    record.findings = [
        ("n_plus_one", {"route": "/posts/{id}", "count": 3, "total_ms": 6.0, "trace_id": "x"}),
        ("slow_request", {"callsite": None, "stacks": {"a;b": 2}}),
    ]
    return record


def _attributes(message) -> dict:
    out = {}
    for kv in message.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind)
    return out


def test_a_kept_request_decodes_to_what_its_record_holds():
    record = _record()
    body = SpanWriter().encode([record], resource("svc"))
    (resource_spans,) = ExportTraceServiceRequest.FromString(body).resource_spans
    assert _attributes(resource_spans.resource)["service.name"] == "svc"
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "perfagent"
    server, *children = scope_spans.spans
    assert len(children) == 4 + 2

    trace_id = ((1 << 127) | 5).to_bytes(16, "big")
    assert server.trace_id == trace_id
    assert server.span_id == ((1 << 63) | 9).to_bytes(8, "big")
    assert server.parent_span_id == bytes.fromhex("00f067aa0ba902b7")
    assert server.trace_state == "vendor=x,other=y"
    assert server.flags == 0x301  # sampled, parent remote
    assert (server.name, server.kind) == ("POST /posts/{id}", Span.SPAN_KIND_SERVER)
    offset = server.start_time_unix_nano - int(100.0 * 1e9)
    assert server.end_time_unix_nano == int(100.25 * 1e9) + offset
    assert server.status.code == Status.STATUS_CODE_ERROR
    assert _attributes(server) == {
        "http.request.method": "POST",
        "http.route": "/posts/{id}",
        "http.response.status_code": 503,
        "url.path": "/posts/7",
        "url.scheme": "https",
        "network.protocol.version": "2",
        "server.address": "example.org",
        "server.port": 8443,
        "client.address": "10.0.0.9",
        "user_agent.original": "tëst/1",
        "error.type": "TimeoutError",
    }
    assert [(e.name, e.time_unix_nano) for e in server.events] == [
        ("n_plus_one", server.end_time_unix_nano),
        ("slow_request", server.end_time_unix_nano),
    ]
    assert _attributes(server.events[0]) == {"route": "/posts/{id}", "count": 3, "total_ms": 6.0}
    assert _attributes(server.events[1]) == {"stacks": '{"a;b": 2}'}

    queries, app = children[:4], children[4:]
    for query, captured in zip(queries, record.queries, strict=True):
        assert query.trace_id == trace_id
        assert query.parent_span_id == server.span_id
        assert len(query.span_id) == 8 and query.span_id != server.span_id
        assert query.kind == Span.SPAN_KIND_CLIENT and query.flags == 0x101
        assert query.start_time_unix_nano == int(captured.start * 1e9) + offset
        assert query.end_time_unix_nano == query.start_time_unix_nano + int(captured.duration * 1e9)
    assert len({q.span_id for q in queries}) == 4
    assert [q.name for q in queries] == ["SELECT"] * 3 + ["INSERT"]
    assert _attributes(queries[0]) == {
        "db.system.name": "sqlite",
        "db.operation.name": "SELECT",
        "db.query.text": "SELECT * FROM comment WHERE post_id=?",
    }
    assert _attributes(queries[3]) == {
        "db.system.name": "postgresql",
        "db.operation.name": "INSERT",
        "db.query.text": "INSERT INTO tag VALUES(...)",
        "db.operation.batch.size": 1000,
    }
    assert [(s.name, s.kind, s.status.code) for s in app] == [
        ("render", Span.SPAN_KIND_INTERNAL, Status.STATUS_CODE_UNSET),
        ("cache", Span.SPAN_KIND_INTERNAL, Status.STATUS_CODE_ERROR),
    ]
    assert _attributes(app[1]) == {"error.type": "KeyError"}
    assert app[0].start_time_unix_nano == int(100.1 * 1e9) + offset
    assert all(s.parent_span_id == server.span_id for s in app)


def test_a_root_span_without_findings_or_error_writes_no_parent_status_or_events():
    record = RequestRecord("GET", 5.0, None)
    record.route, record.status, record.end = "", 200, 5.5
    record._trace_id, record._span_id = 3, 4
    body = SpanWriter().encode([record, record], resource("svc"))
    spans = ExportTraceServiceRequest.FromString(body).resource_spans[0].scope_spans[0].spans
    assert len(spans) == 2
    span = spans[0]
    assert (span.name, span.parent_span_id, span.trace_state, span.flags) == ("GET", b"", "", 0x101)
    assert not span.events and span.status == Status()
    assert not span.HasField("status")


def test_the_table_of_written_attributes_keeps_what_repeats_and_stays_bounded():
    """Raw paths (one per request on a site with ids in its URLs) are not remembered;
    anything else is, up to a bound."""
    before = len(wire._known)
    for n in range(3000):
        written = wire.attributes(b"\x4a", {"http.route": "/items/{id}", "url.path": f"/items/{n}"})
        assert written.endswith(wire.field(b"\x4a", wire.key_value("url.path", f"/items/{n}")))
    assert len(wire._known) <= before + 1
    for n in range(3000):
        wire.attributes(b"\x4a", {"db.query.text": f"SELECT {n}"})
    assert 0 < len(wire._known) <= wire._KNOWN_MAX


def test_the_resource_holds_the_service_and_the_otel_resource_attributes():
    environ = {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=staging, team = web ,bad"}
    decoded = Resource.FromString(resource("shop", environ))
    attributes = _attributes(decoded)
    assert attributes["service.name"] == "shop"
    assert attributes["deployment.environment"] == "staging" and attributes["team"] == "web"
    assert attributes["telemetry.sdk.name"] == "perfagent"
    assert (
        isinstance(attributes["process.pid"], int) and len(attributes["service.instance.id"]) == 32
    )
    assert "bad" not in attributes


def test_the_request_histogram_decodes_to_what_opentelemetry_proto_would_write():
    """Each series of the prometheus-client histogram as a cumulative data point, the
    message equal to the one built with the library's own classes."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
    from opentelemetry.proto.metrics.v1.metrics_pb2 import (
        AggregationTemporality,
        Histogram,
        HistogramDataPoint,
        Metric,
        ResourceMetrics,
        ScopeMetrics,
    )
    from prometheus_client import CollectorRegistry
    from prometheus_client import Histogram as PrometheusHistogram

    from perfagent._version import __version__
    from perfagent.export.otlp import encode_request_histogram

    labels = ("http_request_method", "http_route", "http_response_status_code")
    histogram = PrometheusHistogram(
        "http_server_request_duration_seconds",
        "d",
        labels,
        registry=CollectorRegistry(),
        buckets=(0.005, 0.1, 1.0),
    )
    for value in (0.001, 0.002, 0.05, 3.0):
        histogram.labels("GET", "/items/{id}", "200").observe(value)
    histogram.labels("POST", "", "").observe(0.2)
    res = resource("svc")
    body, total = encode_request_histogram(histogram, res, 1_700_000_000_000_000_000)
    assert total == 5
    decoded = ExportMetricsServiceRequest.FromString(body)
    now = decoded.resource_metrics[0].scope_metrics[0].metrics[0].histogram.data_points[0]

    def point(labels: dict, count: int, total: float, counts: list[int]) -> HistogramDataPoint:
        return HistogramDataPoint(
            attributes=[KeyValue(key=k, value=AnyValue(**v)) for k, v in labels.items()],
            start_time_unix_nano=1_700_000_000_000_000_000,
            time_unix_nano=now.time_unix_nano,
            count=count,
            sum=total,
            bucket_counts=counts,
            explicit_bounds=[0.005, 0.1, 1.0],
        )

    get = {
        "http.request.method": {"string_value": "GET"},
        "http.route": {"string_value": "/items/{id}"},
        "http.response.status_code": {"int_value": 200},
    }
    post = {"http.request.method": {"string_value": "POST"}, "http.route": {"string_value": ""}}
    expected_points = [
        point(get, 4, 0.001 + 0.002 + 0.05 + 3.0, [2, 1, 0, 1]),  # added up as observed
        point(post, 1, 0.2, [0, 0, 1, 0]),
    ]
    metric = Metric(
        name="http.server.request.duration",
        unit="s",
        description="Duration of HTTP server requests.",
        histogram=Histogram(
            data_points=expected_points,
            aggregation_temporality=AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE,
        ),
    )
    scope = InstrumentationScope(name="perfagent", version=__version__)
    expected = ExportMetricsServiceRequest(
        resource_metrics=[
            ResourceMetrics(
                resource=Resource.FromString(res),
                scope_metrics=[ScopeMetrics(scope=scope, metrics=[metric])],
            )
        ]
    )
    assert decoded == expected
    assert now.HasField("sum")


def test_findings_decode_to_the_log_records_opentelemetry_proto_would_write():
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
    from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs

    from perfagent._version import __version__
    from perfagent.export.otlp import encode_findings

    fields = {"route": "/r", "count": 7, "total_ms": 1.5, "stack": ["a.py:1 f"], "gone": None}
    findings = [
        (1_700_000_000_123_456_789, "n_plus_one", fields, (1 << 127) | 3, 9),
        (1_700_000_001_000_000_000, "event_loop_blocked", {"route": None}, 0, 0),
    ]
    res = resource("svc")
    decoded = ExportLogsServiceRequest.FromString(encode_findings(findings, res))

    def log(when: int, kind: str, **more: object) -> LogRecord:
        return LogRecord(
            time_unix_nano=when,
            observed_time_unix_nano=when,
            severity_number=13,
            severity_text="WARN",
            event_name=kind,
            body=AnyValue(string_value=kind),
            **more,
        )

    stack = AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a.py:1 f")]))
    first = log(
        1_700_000_000_123_456_789,
        "n_plus_one",
        attributes=[
            KeyValue(key="route", value=AnyValue(string_value="/r")),
            KeyValue(key="count", value=AnyValue(int_value=7)),
            KeyValue(key="total_ms", value=AnyValue(double_value=1.5)),
            KeyValue(key="stack", value=stack),
        ],
        trace_id=((1 << 127) | 3).to_bytes(16, "big"),
        span_id=(9).to_bytes(8, "big"),
    )
    second = log(1_700_000_001_000_000_000, "event_loop_blocked")
    scope = InstrumentationScope(name="perfagent", version=__version__)
    expected = ExportLogsServiceRequest(
        resource_logs=[
            ResourceLogs(
                resource=Resource.FromString(res),
                scope_logs=[ScopeLogs(scope=scope, log_records=[first, second])],
            )
        ]
    )
    assert decoded == expected


def test_the_app_process_never_loads_protobuf():
    """The agent in the app's process writes its OTLP itself: serving a request that is
    kept, with a finding, and exporting spans, findings and stats loads neither
    opentelemetry-proto nor protobuf there."""
    import subprocess
    import sys

    from helpers import APPS, clean_env

    code = """
import asyncio, sys, httpx, perfagent
from fastapi import FastAPI
app = FastAPI()

@app.get("/boom")
async def boom():
    raise RuntimeError("kept: it failed")

perfagent.init(app, metrics_port=0, console_url="http://127.0.0.1:9")
agent = perfagent._state["agent"]

async def main():
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/boom")).status_code == 500
asyncio.run(main())
agent.report("slow_request", {"route": "/boom"}, None)
assert agent.exporter._traces and agent.exporter._findings
agent.exporter.flush()
agent.exporter.export_stats()
assert not agent.exporter._traces and not agent.exporter._findings
loaded = sorted(m for m in sys.modules if m.startswith(("google.protobuf", "opentelemetry.proto")))
print(loaded)
perfagent.shutdown()
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=APPS,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
