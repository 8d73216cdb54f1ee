"""OTLP/HTTP payloads (protobuf or JSON, optionally gzipped) into store rows.

Everything is decoded and checked before anything is stored, so a malformed
or hostile payload is refused whole with a 4xx and leaves the store as it was.
"""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import math
import zlib
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from perfagent.console.store import FindingRow, HistogramPoint, SpanRow

FINDING_KINDS = frozenset(
    (
        "slow_request",
        "n_plus_one",
        "duplicate_query",
        "event_loop_blocked",
        "event_loop_saturated",
        "latency_regression",
    )
)
MAX_STRING = 8192
MAX_ATTRIBUTES = 256
#: SQLite integers are signed 64-bit: a larger one is refused here, not a 500 at insert.
MAX_SQL_INT = 2**63 - 1
#: Requests in one histogram point; far below MAX_SQL_INT so sums over points still fit.
MAX_COUNT = 2**40
MAX_BUCKETS = 512
#: Finding fields shown as numbers: anything else there is refused.
NUMERIC_FIELDS = (
    "duration_ms",
    "threshold_ms",
    "total_ms",
    "saved_ms",
    "count",
    "p95_ms",
    "usual_p95_ms",
    "samples",
    "repeats",
)
TEXT_FIELDS = ("route", "method", "callsite", "fingerprint")


class BadPayload(ValueError):
    """The payload cannot be taken; ``status`` is the HTTP answer (400, 413, 415)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _unzip(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise BadPayload(f"unsupported content-encoding {encoding!r}", 415)
    try:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = inflater.decompress(body, limit + 1)
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise BadPayload(f"bad gzip body: {exc}") from None
    if len(out) > limit:
        raise BadPayload("payload too large once decompressed", 413)
    return out


_HEX_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP/JSON writes ids as hex; protobuf's JSON mapping wants base64."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _HEX_ID_FIELDS and isinstance(value, str):
                try:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError:
                    raise BadPayload(f"{key} is not hex") from None
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)
    return node


def decode(body: bytes, content_type: str, encoding: str, limit: int, message: type) -> Any:
    if len(body) > limit:
        raise BadPayload("payload too large", 413)
    body = _unzip(body, encoding.strip().lower(), limit)
    kind = content_type.split(";")[0].strip().lower()
    try:
        if kind == "application/x-protobuf":
            return message.FromString(body)
        if kind == "application/json":
            data = json.loads(body)
            if not isinstance(data, dict):
                raise BadPayload(f"a {message.__name__} is a JSON object")
            data = _hex_ids_to_base64(data)
            return json_format.ParseDict(data, message(), ignore_unknown_fields=True)
    except BadPayload:
        raise
    except (DecodeError, json_format.ParseError, ValueError, TypeError, AttributeError) as exc:
        # ValueError covers bad JSON and bad UTF-8; the others, shapes protobuf's parser
        # does not expect (null where an object goes, say).
        raise BadPayload(f"cannot decode {message.__name__}: {exc}") from None
    except RecursionError:
        raise BadPayload("payload nested too deeply") from None
    raise BadPayload(f"unsupported content-type {content_type!r}", 415)


def _plain(value: Message) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_plain(v) for v in value.array_value.values[:MAX_ATTRIBUTES]]
    if kind == "kvlist_value":
        return {kv.key: _plain(kv.value) for kv in value.kvlist_value.values[:MAX_ATTRIBUTES]}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    out = getattr(value, kind)
    if kind == "double_value" and not math.isfinite(out):
        return str(out)  # JSON has no NaN or Infinity: kept as text, never as a number
    if isinstance(out, str) and len(out) > MAX_STRING:
        out = out[:MAX_STRING] + "…"
    return out


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key[:256]: _plain(kv.value) for kv in list(items)[:MAX_ATTRIBUTES]}


def _service(resource_attrs: dict[str, Any]) -> str:
    return str(resource_attrs.get("service.name") or "unknown_service")


def _id(raw: bytes, size: int, what: str, allow_empty: bool = False) -> str:
    if not raw and allow_empty:
        return ""
    if len(raw) != size or not any(raw):
        raise BadPayload(f"{what} must be {size} bytes, not all zero")
    return raw.hex()


def _time(value: int, what: str) -> int:
    if value > MAX_SQL_INT:
        raise BadPayload(f"{what} is past 2**63 - 1")
    return int(value)


def _status(value: Any) -> int | None:
    """An HTTP status code, or None (a bool, a string or 12345 is not one)."""
    return value if type(value) is int and 100 <= value <= 999 else None


def _stacks(value: Any, what: str) -> dict[str, int]:
    """Sampled stacks: JSON text of ``{"a;b;c": samples}``; anything else is refused."""
    try:
        stacks = json.loads(value) if isinstance(value, str) else value
    except (ValueError, RecursionError):
        raise BadPayload(f"{what} stacks are not JSON") from None
    if not isinstance(stacks, dict) or not all(
        isinstance(k, str) and type(n) is int and 0 < n <= MAX_COUNT for k, n in stacks.items()
    ):
        raise BadPayload(f"{what} stacks must map stack text to a positive sample count")
    return stacks


def _event(event: Any) -> dict[str, Any]:
    attributes = _attributes(event.attributes)
    if "stacks" in attributes:
        _stacks(attributes["stacks"], "a span event's")
    return {
        "name": event.name[:256],
        "time_ns": _time(event.time_unix_nano, "an event's time"),
        "attributes": attributes,
    }


def spans(request: ExportTraceServiceRequest) -> list[SpanRow]:
    rows = []
    for resource_spans in request.resource_spans:
        service = _service(_attributes(resource_spans.resource.attributes))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attrs = _attributes(span.attributes)
                if span.end_time_unix_nano < span.start_time_unix_nano:
                    raise BadPayload("a span ends before it starts")
                status = attrs.get("http.response.status_code")
                rows.append(
                    SpanRow(
                        trace_id=_id(span.trace_id, 16, "trace_id"),
                        span_id=_id(span.span_id, 8, "span_id"),
                        parent_span_id=_id(span.parent_span_id, 8, "parent_span_id", True),
                        service=service,
                        name=span.name[:512],
                        kind=int(span.kind),
                        start_ns=_time(span.start_time_unix_nano, "a span's start"),
                        end_ns=_time(span.end_time_unix_nano, "a span's end"),
                        route=str(attrs.get("http.route") or ""),
                        method=str(attrs.get("http.request.method") or ""),
                        status=_status(status),
                        error=str(attrs["error.type"]) if "error.type" in attrs else None,
                        attributes=attrs,
                        events=[_event(e) for e in list(span.events)[:MAX_ATTRIBUTES]],
                    )
                )
    _count_db_queries(rows)
    return rows


def _count_db_queries(rows: list[SpanRow]) -> None:
    queries: dict[str, int] = {}
    for row in rows:
        if row.kind == 3 and "db.system.name" in row.attributes:
            queries[row.trace_id] = queries.get(row.trace_id, 0) + 1
    for row in rows:
        if row.kind == 2:
            row.db_queries = queries.get(row.trace_id, 0)


def findings(request: ExportLogsServiceRequest) -> list[FindingRow]:
    rows = []
    for resource_logs in request.resource_logs:
        service = _service(_attributes(resource_logs.resource.attributes))
        for scope_logs in resource_logs.scope_logs:
            for log in scope_logs.log_records:
                kind = log.event_name or _plain(log.body)
                if kind not in FINDING_KINDS:
                    continue  # ordinary logs are accepted but not kept
                when = log.time_unix_nano or log.observed_time_unix_nano
                trace_id = _id(log.trace_id, 16, "trace_id", True)
                fields = _attributes(log.attributes)
                fields.setdefault("trace_id", trace_id or None)
                _check_finding(fields)
                if "stacks" in fields:  # sampled stacks travel as JSON text
                    fields["stacks"] = _stacks(fields["stacks"], "a finding's")
                rows.append(FindingRow(kind, service, when / 1e9, trace_id, fields))
    return rows


def _check_finding(fields: dict[str, Any]) -> None:
    """The fields pages show as numbers are numbers, those stored in columns are text."""
    for name in NUMERIC_FIELDS:
        value = fields.get(name)
        if value is not None and (type(value) not in (int, float) or abs(value) > 1e15):
            raise BadPayload(f"a finding's {name} must be a number")
    for name in TEXT_FIELDS:
        if not isinstance(fields.get(name), (str, type(None))):
            raise BadPayload(f"a finding's {name} must be text")


def _check_point(point: Any) -> None:
    bounds, counts = point.explicit_bounds, point.bucket_counts
    if len(bounds) > MAX_BUCKETS:
        raise BadPayload(f"a histogram has more than {MAX_BUCKETS} buckets")
    if not all(math.isfinite(b) for b in bounds) or not math.isfinite(point.sum):
        raise BadPayload("histogram bounds and sum must be finite")
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        raise BadPayload("histogram bounds are not increasing")
    if point.count > MAX_COUNT or abs(point.sum) > 1e15:
        raise BadPayload("a histogram's count or sum is out of range")
    if len(counts) != len(bounds) + 1 or sum(counts) != point.count:
        raise BadPayload("histogram buckets do not add up to its count")
    _time(point.start_time_unix_nano, "a point's start")
    _time(point.time_unix_nano, "a point's time")


def histograms(request: ExportMetricsServiceRequest) -> list[HistogramPoint]:
    rows = []
    for resource_metrics in request.resource_metrics:
        resource_attrs = _attributes(resource_metrics.resource.attributes)
        service = _service(resource_attrs)
        instance = str(
            resource_attrs.get("service.instance.id") or resource_attrs.get("process.pid") or ""
        )
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name != "http.server.request.duration":
                    continue
                if metric.WhichOneof("data") != "histogram":
                    continue
                for point in metric.histogram.data_points:
                    _check_point(point)
                    bounds, counts = list(point.explicit_bounds), list(point.bucket_counts)
                    attrs = _attributes(point.attributes)
                    status = attrs.get("http.response.status_code")
                    rows.append(
                        HistogramPoint(
                            service=service,
                            instance=instance,
                            start_ns=int(point.start_time_unix_nano),
                            time_ns=int(point.time_unix_nano),
                            method=str(attrs.get("http.request.method") or ""),
                            route=str(attrs.get("http.route") or ""),
                            status=_status(status),
                            count=int(point.count),
                            sum=float(point.sum),
                            bounds=bounds,
                            counts=[int(c) for c in counts],
                        )
                    )
    return rows


MESSAGES = {
    "traces": ExportTraceServiceRequest,
    "metrics": ExportMetricsServiceRequest,
    "logs": ExportLogsServiceRequest,
}
