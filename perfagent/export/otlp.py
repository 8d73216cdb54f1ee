"""Kept requests as OTLP protobuf: a SERVER span each, findings as its events.

Spans are built here, on the export thread, straight into opentelemetry-proto
messages from the finished record: no OpenTelemetry SDK span exists on the
request path. An SDK span costs about 20-30 µs to create, fill and end (see
ARCHITECTURE.md); this way a request that is not kept costs nothing at all,
and a kept one costs one deque append on its own thread.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from perfagent._version import __version__
from perfagent.record import RequestRecord

_SCOPE = InstrumentationScope(name="perfagent", version=__version__)


def _value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, (list, tuple)):
        any_value = AnyValue()
        any_value.array_value.values.extend(_value(v) for v in value)
        return any_value
    if isinstance(value, str):
        return AnyValue(string_value=value)
    return AnyValue(string_value=json.dumps(value, default=str))


def attributes(items: Mapping[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_value(v)) for k, v in items.items() if v is not None]


def resource(service_name: str, environ: Mapping[str, str] | None = None) -> Resource:
    environ = os.environ if environ is None else environ
    items: dict[str, Any] = {}
    for pair in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = pair.partition("=")
        if key.strip() and value.strip():
            items[key.strip()] = value.strip()
    items.update(
        {
            "service.name": service_name,
            "telemetry.sdk.name": "perfagent",
            "telemetry.sdk.language": "python",
            "telemetry.sdk.version": __version__,
            "service.instance.id": uuid.uuid4().hex,
            "process.pid": os.getpid(),
        }
    )
    return Resource(attributes=attributes(items))


_ASGI_KEYS = ("type", "headers", "path", "scheme", "http_version", "server", "client")
_WSGI_KEYS = (
    "SCRIPT_NAME",
    "PATH_INFO",
    "wsgi.url_scheme",
    "SERVER_PROTOCOL",
    "HTTP_HOST",
    "SERVER_NAME",
    "SERVER_PORT",
    "REMOTE_ADDR",
    "HTTP_USER_AGENT",
)


def slim_carrier(carrier: Any) -> dict[str, Any] | None:
    """Only what a span needs from an ASGI scope or WSGI environ.

    A queued record would otherwise keep the whole scope alive (the app, its
    router, per-request exit stacks): measured ~6 MiB with the queue full.
    """
    if not isinstance(carrier, dict):
        return None
    keys = _ASGI_KEYS if "type" in carrier and "headers" in carrier else _WSGI_KEYS
    return {key: carrier[key] for key in keys if key in carrier}


def _request_attributes(record: RequestRecord) -> dict[str, Any]:
    carrier = record.carrier or {}
    out: dict[str, Any] = {
        "http.request.method": record.method,
        "http.route": record.route or None,
        "http.response.status_code": record.status,
    }
    if "type" in carrier and "headers" in carrier:  # ASGI scope
        out["url.path"] = carrier.get("path")
        out["url.scheme"] = carrier.get("scheme", "http")
        out["network.protocol.version"] = carrier.get("http_version")
        server = carrier.get("server") or (None, None)
        out["server.address"], out["server.port"] = server[0], server[1]
        client = carrier.get("client")
        out["client.address"] = client[0] if client else None
        for name, value in carrier["headers"]:
            if name == b"user-agent":
                out["user_agent.original"] = value.decode("latin-1")
            elif name == b"host":
                host, _, port = value.decode("latin-1").rpartition(":")
                if host and port.isdigit():
                    out["server.address"], out["server.port"] = host, int(port)
                else:
                    out["server.address"] = value.decode("latin-1")
    else:  # WSGI environ
        out["url.path"] = carrier.get("SCRIPT_NAME", "") + carrier.get("PATH_INFO", "")
        out["url.scheme"] = carrier.get("wsgi.url_scheme", "http")
        protocol = carrier.get("SERVER_PROTOCOL", "")
        out["network.protocol.version"] = protocol.partition("/")[2] or None
        out["server.address"] = carrier.get("HTTP_HOST", "").partition(":")[0] or carrier.get(
            "SERVER_NAME"
        )
        port = carrier.get("SERVER_PORT")
        out["server.port"] = int(port) if port and str(port).isdigit() else None
        out["client.address"] = carrier.get("REMOTE_ADDR")
        out["user_agent.original"] = carrier.get("HTTP_USER_AGENT")
    if record.error_type:
        out["error.type"] = record.error_type
    elif record.status is not None and record.status >= 500:
        out["error.type"] = str(record.status)
    if record.thread_wait >= 0.0:
        out["perfagent.thread_pool_wait_ms"] = round(record.thread_wait * 1e3, 3)
    if record.streaming and record.first_byte is not None:
        out["perfagent.time_to_first_byte_ms"] = round((record.first_byte - record.start) * 1e3, 3)
    return out


def server_span(record: RequestRecord, clock_offset_ns: int) -> Span:
    trace_id, span_id = record.trace_ids()
    parent_span_id, _sampled, trace_state = record.parent or (0, None, None)
    start = int(record.start * 1e9) + clock_offset_ns
    end = int((record.end or record.start) * 1e9) + clock_offset_ns
    span = Span(
        trace_id=trace_id.to_bytes(16, "big"),
        span_id=span_id.to_bytes(8, "big"),
        parent_span_id=parent_span_id.to_bytes(8, "big") if parent_span_id else b"",
        trace_state=trace_state or "",
        flags=0x100 | (0x200 if parent_span_id else 0) | 0x01,
        name=f"{record.method} {record.route}" if record.route else record.method,
        kind=Span.SPAN_KIND_SERVER,
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        attributes=attributes(_request_attributes(record)),
    )
    if record.error_type or (record.status is not None and record.status >= 500):
        span.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR))
    for event, fields in record.findings or ():
        span.events.add(
            time_unix_nano=end,
            name=event,
            attributes=attributes({k: v for k, v in fields.items() if k != "trace_id"}),
        )
    return span


def query_spans(record: RequestRecord, clock_offset_ns: int) -> list[Span]:
    """A CLIENT span per database query, children of the request's server span."""
    trace_id, server_id = record.trace_ids()
    trace_bytes, parent = trace_id.to_bytes(16, "big"), server_id.to_bytes(8, "big")
    spans = []
    for query in record.queries or ():
        shape = query.shape
        start = int(query.start * 1e9) + clock_offset_ns
        spans.append(
            Span(
                trace_id=trace_bytes,
                span_id=(random.getrandbits(64) or 1).to_bytes(8, "big"),
                parent_span_id=parent,
                flags=0x101,
                name=shape.operation or query.system,
                kind=Span.SPAN_KIND_CLIENT,
                start_time_unix_nano=start,
                end_time_unix_nano=start + int(query.duration * 1e9),
                attributes=attributes(
                    {
                        "db.system.name": query.system,
                        "db.operation.name": shape.operation or None,
                        # The fingerprint: literals are placeholders, so no data leaves.
                        "db.query.text": shape.fingerprint,
                        "db.operation.batch.size": query.many or None,
                    }
                ),
            )
        )
    return spans


def app_spans(record: RequestRecord, clock_offset_ns: int) -> list[Span]:
    """An INTERNAL span per ``perfagent.span``/``@perfagent.timed`` block of the request."""
    trace_id, server_id = record.trace_ids()
    out = []
    for name, start, end, error in record.spans or ():
        span = Span(
            trace_id=trace_id.to_bytes(16, "big"),
            span_id=(random.getrandbits(64) or 1).to_bytes(8, "big"),
            parent_span_id=server_id.to_bytes(8, "big"),
            flags=0x101,
            name=name,
            kind=Span.SPAN_KIND_INTERNAL,
            start_time_unix_nano=int(start * 1e9) + clock_offset_ns,
            end_time_unix_nano=int(end * 1e9) + clock_offset_ns,
            attributes=attributes({"error.type": error}),
        )
        if error:
            span.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR))
        out.append(span)
    return out


def clock_offset_ns() -> int:
    """Add to ``perf_counter() * 1e9`` to get Unix nanoseconds."""
    return time.time_ns() - int(time.perf_counter() * 1e9)


def encode(records: Iterable[RequestRecord], res: Resource) -> bytes:
    offset = clock_offset_ns()
    spans = []
    for record in records:
        spans.append(server_span(record, offset))
        if record.queries:
            spans.extend(query_spans(record, offset))
        if record.spans:
            spans.extend(app_spans(record, offset))
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(resource=res, scope_spans=[ScopeSpans(scope=_SCOPE, spans=spans)])
        ]
    )
    return request.SerializeToString()


def encode_request_histogram(histogram: Any, res: Resource, start_ns: int) -> tuple[bytes, int]:
    """This process's ``http.server.request.duration`` as a cumulative OTLP histogram.

    Read from the very prometheus-client histogram ``/metrics`` shows, so the
    console's numbers agree with Prometheus's. Returns (body, total count).
    """
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.metrics.v1.metrics_pb2 import (
        AggregationTemporality,
        Histogram,
        HistogramDataPoint,
        Metric,
        ResourceMetrics,
        ScopeMetrics,
    )

    series: dict[tuple[str, str, str], dict[str, Any]] = {}
    for family in histogram.collect():
        for sample in family.samples:
            labels = sample.labels
            key = (
                labels["http_request_method"],
                labels["http_route"],
                labels["http_response_status_code"],
            )
            point = series.setdefault(key, {"le": [], "count": 0, "sum": 0.0})
            if sample.name.endswith("_bucket"):
                point["le"].append((float(labels["le"]), int(sample.value)))
            elif sample.name.endswith("_count"):
                point["count"] = int(sample.value)
            elif sample.name.endswith("_sum"):
                point["sum"] = float(sample.value)
    now = time.time_ns()
    points, total = [], 0
    for (method, route, status), point in series.items():
        cumulative = sorted(point["le"])
        bounds = [le for le, _ in cumulative if le != float("inf")]
        counts, previous = [], 0
        for _, running in cumulative:
            counts.append(running - previous)
            previous = running
        total += point["count"]
        points.append(
            HistogramDataPoint(
                attributes=attributes(
                    {
                        "http.request.method": method,
                        "http.route": route,
                        "http.response.status_code": int(status) if status else None,
                    }
                ),
                start_time_unix_nano=start_ns,
                time_unix_nano=now,
                count=point["count"],
                sum=point["sum"],
                bucket_counts=counts,
                explicit_bounds=bounds,
            )
        )
    metric = Metric(
        name="http.server.request.duration",
        unit="s",
        description="Duration of HTTP server requests.",
        histogram=Histogram(
            data_points=points,
            aggregation_temporality=AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE,
        ),
    )
    request = ExportMetricsServiceRequest(
        resource_metrics=[
            ResourceMetrics(
                resource=res, scope_metrics=[ScopeMetrics(scope=_SCOPE, metrics=[metric])]
            )
        ]
    )
    return request.SerializeToString(), total


def encode_findings(
    findings: Iterable[tuple[int, str, dict[str, Any], int, int]], res: Resource
) -> bytes:
    """Findings as OTLP log records: one per finding, ``event_name`` = its kind."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs

    records = [
        LogRecord(
            time_unix_nano=when,
            observed_time_unix_nano=when,
            severity_number=13,  # WARN
            severity_text="WARN",
            event_name=kind,
            body=AnyValue(string_value=kind),
            attributes=attributes(fields),
            trace_id=trace_id.to_bytes(16, "big") if trace_id else b"",
            span_id=span_id.to_bytes(8, "big") if span_id else b"",
        )
        for when, kind, fields, trace_id, span_id in findings
    ]
    request = ExportLogsServiceRequest(
        resource_logs=[
            ResourceLogs(resource=res, scope_logs=[ScopeLogs(scope=_SCOPE, log_records=records)])
        ]
    )
    return request.SerializeToString()
