"""Everything the agent sends over OTLP, written as protobuf bytes (``wire.py``).

Kept requests become spans, written on the export thread straight from the
finished record: no OpenTelemetry SDK span exists on the request path. An SDK
span costs about 20-30 µs to create, fill and end (see ARCHITECTURE.md); this
way a request that is not kept costs nothing at all, and a kept one costs one
deque append on its own thread. Findings go as log records, the request
histogram as an OTLP histogram.

None of it imports opentelemetry-proto (or protobuf) into the app's process:
those modules added ~3,000 objects for every full garbage collection of the
app to walk, 16 ms to its start and 3.5 MiB to each worker (measured beside a
FastAPI app). The tests decode all of it with opentelemetry-proto.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from perfagent._version import __version__
from perfagent.export import wire
from perfagent.record import IDS, RequestRecord

getrandbits = IDS.getrandbits  # span ids of the child spans

#: ``InstrumentationScope``: name, version.
_SCOPE_BYTES = wire.text(b"\x0a", "perfagent") + wire.text(b"\x12", __version__)


def resource(service_name: str, environ: Mapping[str, str] | None = None) -> bytes:
    """The ``Resource`` message of this process: ``OTEL_RESOURCE_ATTRIBUTES`` and ours."""
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
    return b"".join(wire.field(b"\x0a", wire.key_value(k, v)) for k, v in items.items())


def _resource_and_scope(res: bytes, items: bytes) -> bytes:
    """One ``Resource{Spans,Metrics,Logs}`` in its request: the resource, then one
    ``Scope*`` of ours holding ``items`` (each a field 2 of the scope message)."""
    scoped = wire.field(b"\x0a", _SCOPE_BYTES) + items
    return wire.field(b"\x0a", wire.field(b"\x0a", res) + wire.field(b"\x12", scoped))


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
    if record.past_cap is not None:  # calls past the request's cap: counted, no span
        out["perfagent.calls_not_kept"] = record.past_cap.count
    if record.thread_wait >= 0.0:
        out["perfagent.thread_pool_wait_ms"] = round(record.thread_wait * 1e3, 3)
    if record.streaming and record.first_byte is not None:
        out["perfagent.time_to_first_byte_ms"] = round((record.first_byte - record.start) * 1e3, 3)
    return out


_SERVER = b"\x30\x02"  # kind: SPAN_KIND_SERVER
_CLIENT = b"\x30\x03"
_INTERNAL = b"\x30\x01"
_ERROR = b"\x7a\x02\x18\x02"  # status: {code: STATUS_CODE_ERROR}
_times = struct.Struct("<BQBQ").pack  # start_time_unix_nano, end_time_unix_nano (fixed64)
_flags = struct.Struct("<BBI").pack  # flags: field 16, fixed32
# W3C sampled, and whether the parent is remote is known: it is not, or it is.
_LOCAL = _flags(0x85, 0x01, 0x101)
_REMOTE = _flags(0x85, 0x01, 0x301)
_QUERY_ATTRIBUTES_MAX = 1024


class SpanWriter:
    """Kept requests as one ``ExportTraceServiceRequest``, in protobuf bytes.

    What repeats from span to span is written once: the attributes and name of
    a query span per statement shape, in a bounded cache.
    """

    def __init__(self) -> None:
        self._query_parts: dict[tuple[Any, str, int], bytes] = {}

    def encode(self, records: Iterable[RequestRecord], res: bytes) -> bytes:
        offset = clock_offset_ns()
        spans = []
        for record in records:
            spans.extend(self.record_spans(record, offset))
        return _resource_and_scope(res, b"".join(spans))

    def record_spans(self, record: RequestRecord, clock_offset_ns: int) -> list[bytes]:
        """The request's spans, its server span first."""
        spans = [self.server_span(record, clock_offset_ns)]
        if record.queries:
            spans.extend(self.query_spans(record, clock_offset_ns))
        if record.spans:
            spans.extend(app_spans(record, clock_offset_ns))
        return spans

    def encode_bounded(
        self, records: Iterable[RequestRecord], res: bytes, max_bytes: int
    ) -> Iterator[tuple[bytes, int, int]]:
        """The records as requests of at most ``max_bytes`` each (a collector refuses a
        larger one, and all its traces with it: one request of 200,000 queries made a
        batch of 40 traces drop). Yields (body, records in it, spans cut): a trace too
        large alone goes alone, cut to its first spans (its server span first)."""
        offset = clock_offset_ns()
        # The envelope: resource, scope and the length prefixes (at most 5 bytes each).
        budget = max_bytes - len(res) - len(_SCOPE_BYTES) - 32
        batch: list[bytes] = []
        size = count = 0
        for record in records:
            spans = self.record_spans(record, offset)
            total = sum(map(len, spans))
            cut = 0
            if total > budget:
                kept = 0
                total = 0
                for span in spans:
                    if total + len(span) > budget:
                        break
                    total += len(span)
                    kept += 1
                cut, spans = len(spans) - kept, spans[:kept]
            if batch and size + total > budget:
                yield _resource_and_scope(res, b"".join(batch)), count, 0
                batch, size, count = [], 0, 0
            if cut:  # alone, so that a failed post of it takes no other trace along
                yield _resource_and_scope(res, b"".join(spans)), 1 if spans else 0, cut
                continue
            batch.extend(spans)
            size += total
            count += 1
        if batch:
            yield _resource_and_scope(res, b"".join(batch)), count, 0

    @staticmethod
    def server_span(record: RequestRecord, clock_offset_ns: int) -> bytes:
        """The request's SERVER span, its findings as events, as a ``spans`` element."""
        trace_id, span_id = record.trace_ids()
        parent_span_id, _sampled, trace_state = record.parent or (0, None, None)
        start = int(record.start * 1e9) + clock_offset_ns
        end = int((record.end or record.start) * 1e9) + clock_offset_ns
        name = f"{record.method} {record.route}" if record.route else record.method
        parts = [
            b"\x0a\x10",
            trace_id.to_bytes(16, "big"),
            b"\x12\x08",
            span_id.to_bytes(8, "big"),
        ]
        if trace_state:
            parts.append(wire.text(b"\x1a", trace_state))
        if parent_span_id:
            parts += (b"\x22\x08", parent_span_id.to_bytes(8, "big"))
        parts += (
            wire.text(b"\x2a", name),
            _SERVER,
            _times(0x39, start, 0x41, end),
            wire.attributes(b"\x4a", _request_attributes(record)),
        )
        for event, fields in record.findings or ():
            attributes = {k: v for k, v in fields.items() if k != "trace_id"}
            body = b"\x09" + wire.fixed64(end) + wire.text(b"\x12", event)
            parts.append(wire.field(b"\x5a", body + wire.attributes(b"\x1a", attributes)))
        if record.error_type or (record.status is not None and record.status >= 500):
            parts.append(_ERROR)
        parts.append(_REMOTE if parent_span_id else _LOCAL)
        return wire.field(b"\x12", b"".join(parts))

    def query_spans(self, record: RequestRecord, clock_offset_ns: int) -> list[bytes]:
        """A CLIENT span per database query, children of the request's server span."""
        head, parent = _child_fields(record)
        cache = self._query_parts
        spans = []
        for query in record.queries or ():
            shape = query.shape
            key = (shape, query.system, query.many)
            tail = cache.get(key)
            if tail is None:
                tail = self._query_tail(*key)
                if len(cache) >= _QUERY_ATTRIBUTES_MAX:
                    cache.clear()
                cache[key] = tail
            start = int(query.start * 1e9) + clock_offset_ns
            body = b"".join(
                (
                    head,
                    (getrandbits(64) or 1).to_bytes(8, "big"),
                    parent,
                    _times(0x39, start, 0x41, start + int(query.duration * 1e9)),
                    tail,
                )
            )
            spans.append(wire.field(b"\x12", body))
        return spans

    @staticmethod
    def _query_tail(shape: Any, system: str, many: int) -> bytes:
        """Name, kind, attributes and flags of a query span: the same for every query of
        a shape. (Field order within a message is free in protobuf.)"""
        attributes = {
            "db.system.name": system,
            "db.operation.name": shape.operation or None,
            # The fingerprint: literals are placeholders, so no data leaves.
            "db.query.text": shape.fingerprint,
            "db.operation.batch.size": many or None,
        }
        return b"".join(
            (
                wire.text(b"\x2a", shape.operation or system),
                _CLIENT,
                wire.attributes(b"\x4a", attributes),
                _LOCAL,
            )
        )


def _child_fields(record: RequestRecord) -> tuple[bytes, bytes]:
    """For a span under the request's server span: its trace id and the key of its
    span id (which follows), and its parent span id."""
    trace_id, server_id = record.trace_ids()
    return (
        b"\x0a\x10" + trace_id.to_bytes(16, "big") + b"\x12\x08",
        b"\x22\x08" + server_id.to_bytes(8, "big"),
    )


def app_spans(record: RequestRecord, clock_offset_ns: int) -> list[bytes]:
    """An INTERNAL span per ``perfagent.span``/``@perfagent.timed`` block of the request."""
    head, parent = _child_fields(record)
    out = []
    for name, start, end, error in record.spans or ():
        start_ns, end_ns = int(start * 1e9) + clock_offset_ns, int(end * 1e9) + clock_offset_ns
        parts = [
            head,
            (getrandbits(64) or 1).to_bytes(8, "big"),
            parent,
            wire.text(b"\x2a", name),
            _INTERNAL,
            _times(0x39, start_ns, 0x41, end_ns),
        ]
        if error:
            parts += (wire.attributes(b"\x4a", {"error.type": error}), _ERROR)
        parts.append(_LOCAL)
        out.append(wire.field(b"\x12", b"".join(parts)))
    return out


def clock_offset_ns() -> int:
    """Add to ``perf_counter() * 1e9`` to get Unix nanoseconds."""
    return time.time_ns() - int(time.perf_counter() * 1e9)


def encode_request_histogram(histogram: Any, res: bytes, start_ns: int) -> tuple[bytes, int]:
    """This process's ``http.server.request.duration`` as a cumulative OTLP histogram.

    Read from the very prometheus-client histogram ``/metrics`` shows, so the
    console's numbers agree with Prometheus's. Returns (body, total count).
    """
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
    times = b"\x11" + wire.fixed64(start_ns) + b"\x19" + wire.fixed64(time.time_ns())
    points, total = [], 0
    for (method, route, status), point in series.items():
        cumulative = sorted(point["le"])
        bounds = [le for le, _ in cumulative if le != float("inf")]
        counts, previous = [], 0
        for _, running in cumulative:
            counts.append(running - previous)
            previous = running
        total += point["count"]
        labels = {
            "http.request.method": method,
            "http.route": route,
            "http.response.status_code": int(status) if status else None,
        }
        parts = [wire.attributes(b"\x4a", labels), times]
        if point["count"]:
            parts.append(b"\x21" + wire.fixed64(point["count"]))
        parts.append(b"\x29" + wire.double(point["sum"]))  # optional: present even at 0.0
        if counts:
            parts.append(wire.field(b"\x32", struct.pack(f"<{len(counts)}Q", *counts)))
        if bounds:
            parts.append(wire.field(b"\x3a", struct.pack(f"<{len(bounds)}d", *bounds)))
        points.append(wire.field(b"\x0a", b"".join(parts)))  # Histogram.data_points
    # Aggregation temporality 2: cumulative.
    histogram_body = b"".join(points) + b"\x10\x02"
    metric = (
        wire.text(b"\x0a", "http.server.request.duration")
        + wire.text(b"\x12", "Duration of HTTP server requests.")
        + wire.text(b"\x1a", "s")
        + wire.field(b"\x4a", histogram_body)
    )
    return _resource_and_scope(res, wire.field(b"\x12", metric)), total


def encode_findings(
    findings: Iterable[tuple[int, str, dict[str, Any], int, int]], res: bytes
) -> bytes:
    """Findings as OTLP log records: one per finding, ``event_name`` = its kind."""
    records = []
    for when, kind, fields, trace_id, span_id in findings:
        stamp = wire.fixed64(when)
        parts = [
            b"\x09" + stamp,  # time
            b"\x59" + stamp,  # observed time
            _WARN,
            wire.field(b"\x2a", wire.any_value(kind)),  # body
            wire.attributes(b"\x32", fields),
            wire.text(b"\x62", kind),  # event_name
        ]
        if trace_id:
            parts.append(b"\x4a\x10" + trace_id.to_bytes(16, "big"))
        if span_id:
            parts.append(b"\x52\x08" + span_id.to_bytes(8, "big"))
        records.append(wire.field(b"\x12", b"".join(parts)))  # ScopeLogs.log_records
    return _resource_and_scope(res, b"".join(records))


#: Severity number 13 (WARN) and its text.
_WARN = b"\x10\x0d" + wire.text(b"\x1a", "WARN")
