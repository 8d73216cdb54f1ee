"""Sends kept traces, findings and per-route stats over OTLP/HTTP, from a thread of its own.

Bounded everywhere: at most ``MAX_QUEUED`` items of each kind wait; past that
they are dropped and counted in ``perfagent_dropped_total{what=...}``. A
collector that is down, slow or answering errors costs the app nothing but
that counter: each POST has a timeout, and after a failure that signal backs
off (1 s doubling to 30 s) while its queue stays bounded.

Per-route stats go as a cumulative OTLP histogram read from the same
prometheus-client histogram that ``/metrics`` shows, every ``interval_s``.
"""

from __future__ import annotations

import http.client
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from perfagent.export.otlp import (
    SpanWriter,
    encode_findings,
    encode_request_histogram,
    resource,
    slim_carrier,
)
from perfagent.record import RequestRecord

MAX_QUEUED = 2048
BATCH = 256
TIMEOUT_S = 3.0
#: Bytes of one OTLP request of spans (``max_export_bytes``): the console takes up to
#: 8 MiB, gRPC collectors 4 MiB by default.
MAX_EXPORT_BYTES = 4 * 1024 * 1024


def signal_endpoint(signal: str, console_url: str, environ: Mapping[str, str] | None = None) -> str:
    """Where a signal goes: the OTLP variables when set, else the console."""
    environ = os.environ if environ is None else environ
    specific = environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT", "").strip()
    if specific:
        return specific
    general = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip().rstrip("/")
    return (general or console_url.rstrip("/")) + f"/v1/{signal}"


def otlp_headers(signal: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    raw = environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_HEADERS") or environ.get(
        "OTEL_EXPORTER_OTLP_HEADERS", ""
    )
    headers = {}
    for pair in raw.split(","):
        key, _, value = pair.partition("=")
        if key.strip() and value.strip():
            headers[unquote(key.strip())] = unquote(value.strip())
    return headers


class _Target:
    """One signal's endpoint: a kept-alive connection and its own back-off."""

    def __init__(self, signal: str, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path or f"/v1/{signal}"
        self._headers = {"Content-Type": "application/x-protobuf", **otlp_headers(signal)}
        self._conn: http.client.HTTPConnection | None = None
        self._failures = 0
        self.retry_at = 0.0

    def post(self, body: bytes) -> bool:
        ok, retry = False, True
        for _ in range(2):
            # A kept-alive connection the server closed while idle (uvicorn does after
            # 5 s) fails at once: such a post goes again, once, on a new connection.
            reused = self._conn is not None
            try:
                if self._conn is None:
                    cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                    self._conn = cls(self._host, self._port, timeout=TIMEOUT_S)
                self._conn.request("POST", self._path, body=body, headers=self._headers)
                response = self._conn.getresponse()
                response.read()
                ok = 200 <= response.status < 300
                retry = response.status in (429, 502, 503, 504)
                break
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if not reused or isinstance(exc, TimeoutError):
                    break
        if ok:
            self._failures = 0
        elif retry:
            self._failures += 1
            self.retry_at = time.monotonic() + min(30.0, 2.0 ** (self._failures - 1))
        return ok

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Exporter:
    def __init__(
        self,
        console_url: str,
        service_name: Callable[[], str],
        metrics: Any,
        thread: Any,
        interval_s: float,
        max_bytes: int = MAX_EXPORT_BYTES,
    ) -> None:
        self._targets = {s: _Target(s, signal_endpoint(s, console_url)) for s in SIGNALS}
        self._service_name = service_name
        self._metrics = metrics
        self._resource: bytes | None = None
        self._resource_pid = 0
        self._start_ns = time.time_ns()
        self._spans = SpanWriter()
        self._traces: deque[RequestRecord] = deque()
        self._findings: deque[tuple[int, str, dict[str, Any], int, int]] = deque()
        self._dropped_spans = metrics.dropped.labels("spans")
        self._dropped_findings = metrics.dropped.labels("findings")
        #: Spans of a trace too large for one request, cut from its end.
        self._cut_spans = metrics.dropped.labels("trace_spans")
        self._max_bytes = max_bytes
        self._last_total = -1
        self.sent = 0
        thread.every(0.5, self.flush, settle=True)
        thread.every(interval_s, self.export_stats, settle=True)

    @property
    def traces_url(self) -> str:
        return self._targets["traces"].url

    # -- request threads: an append, or a counted drop ------------------------

    def submit(self, record: RequestRecord) -> None:
        if len(self._traces) >= MAX_QUEUED:
            self._dropped_spans.inc()
            return
        record.trace_ids()  # read the incoming traceparent while the full headers are here
        record.carrier = slim_carrier(record.carrier)
        record.resolver = None
        self._traces.append(record)

    def submit_finding(self, kind: str, fields: dict[str, Any], record: Any) -> None:
        if len(self._findings) >= MAX_QUEUED:
            self._dropped_findings.inc()
            return
        trace_id, span_id = record.trace_ids() if record is not None else (0, 0)
        self._findings.append((time.time_ns(), kind, fields, trace_id, span_id))

    # -- export thread --------------------------------------------------------

    def quiet(self) -> bool:
        """Nothing queued: the export thread may rest (after a last ``export_stats``)."""
        return not self._traces and not self._findings

    def _res(self) -> bytes:
        if self._resource is None or self._resource_pid != os.getpid():
            self._resource, self._resource_pid = resource(self._service_name()), os.getpid()
        return self._resource

    def flush(self) -> None:
        self._drain_traces()
        self._drain(self._findings, "logs", self._dropped_findings, encode_findings)

    def _drain_traces(self) -> None:
        """Kept traces, in requests of at most ``max_bytes``: a refused request loses
        only the traces in it. Once the target asks to back off, the rest of the batch
        is dropped rather than each post waiting on it."""
        target, queue = self._targets["traces"], self._traces
        while queue and time.monotonic() >= target.retry_at:
            batch = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
            bodies = self._spans.encode_bounded(batch, self._res(), self._max_bytes)
            for body, count, cut in bodies:
                if cut:
                    self._cut_spans.inc(cut)
                if not count:
                    continue
                if time.monotonic() >= target.retry_at and target.post(body):
                    self.sent += count
                else:
                    self._dropped_spans.inc(count)

    def _drain(
        self, queue: deque, signal: str, dropped: Any, encoder: Any, count_sent: bool = False
    ) -> None:
        target = self._targets[signal]
        while queue and time.monotonic() >= target.retry_at:
            batch = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
            if target.post(encoder(batch, self._res())):
                if count_sent:
                    self.sent += len(batch)
            else:
                dropped.inc(len(batch))

    def export_stats(self) -> None:
        target = self._targets["metrics"]
        if time.monotonic() < target.retry_at:
            return
        self._metrics.stats.flush()
        body, total = encode_request_histogram(
            self._metrics.request_duration, self._res(), self._start_ns
        )
        if total != self._last_total and target.post(body):
            self._last_total = total

    def close(self, deadline_s: float = 2.0) -> None:
        """Last flush at shutdown, bounded in time."""
        end = time.monotonic() + deadline_s
        for target in self._targets.values():
            target.retry_at = 0.0
        while (self._traces or self._findings) and time.monotonic() < end:
            self.flush()
            if any(t.retry_at for t in self._targets.values()):
                break
        self._dropped_spans.inc(len(self._traces))
        self._dropped_findings.inc(len(self._findings))
        self._traces.clear()
        self._findings.clear()
        if time.monotonic() < end:
            self.export_stats()
        for target in self._targets.values():
            target.close()

    def after_fork_in_child(self) -> None:
        self._traces.clear()
        self._findings.clear()
        self._resource = None
        self._start_ns = time.time_ns()
        self._last_total = -1
        for target in self._targets.values():
            target._conn = None


SIGNALS = ("traces", "metrics", "logs")
