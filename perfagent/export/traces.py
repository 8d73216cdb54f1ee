"""Sends kept requests as OTLP/HTTP protobuf, in batches, from the agent thread.

Bounded everywhere: at most ``MAX_QUEUED`` records wait; past that a kept
request is dropped and counted in ``perfagent_dropped_total{what="spans"}``.
A collector that is down, slow or answering errors costs the app nothing but
that counter: each POST has a timeout, and after a failure the exporter backs
off (1 s doubling to 30 s) while the queue stays bounded.
"""

from __future__ import annotations

import http.client
import os
import time
from collections import deque
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from perfagent.export.otlp import encode, resource
from perfagent.record import RequestRecord

MAX_QUEUED = 2048
BATCH = 256
TIMEOUT_S = 3.0


def traces_endpoint(console_url: str, environ: Mapping[str, str] | None = None) -> str:
    """Where traces go: the OTLP variables when set, else the console."""
    environ = os.environ if environ is None else environ
    specific = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if specific:
        return specific
    general = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip().rstrip("/")
    return (general or console_url.rstrip("/")) + "/v1/traces"


def otlp_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    raw = environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or environ.get(
        "OTEL_EXPORTER_OTLP_HEADERS", ""
    )
    headers = {}
    for pair in raw.split(","):
        key, _, value = pair.partition("=")
        if key.strip() and value.strip():
            headers[unquote(key.strip())] = unquote(value.strip())
    return headers


class TraceExporter:
    def __init__(self, endpoint: str, service_name: str, dropped: Any, thread: Any) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {endpoint!r}")
        self.endpoint = endpoint
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path or "/v1/traces"
        self._headers = {"Content-Type": "application/x-protobuf", **otlp_headers()}
        self._service_name = service_name
        self._resource: Any = None
        self._resource_pid = 0
        self._queue: deque[RequestRecord] = deque()
        self._dropped = dropped.labels("spans")
        self._thread = thread
        self._conn: http.client.HTTPConnection | None = None
        self._failures = 0
        self._retry_at = 0.0
        self.sent = 0
        thread.every(0.5, self.flush)

    def submit(self, record: RequestRecord) -> None:
        """Called on the request's thread: an append, or a counted drop."""
        if len(self._queue) >= MAX_QUEUED:
            self._dropped.inc()
            return
        self._queue.append(record)
        self._thread.ensure_started()

    def flush(self) -> None:
        """Agent thread: send what is queued, in batches, unless backing off."""
        while self._queue:
            if time.monotonic() < self._retry_at:
                return
            batch = []
            while self._queue and len(batch) < BATCH:
                batch.append(self._queue.popleft())
            if not self._send(batch):
                self._dropped.inc(len(batch))

    def _send(self, batch: list[RequestRecord]) -> bool:
        if self._resource is None or self._resource_pid != os.getpid():
            self._resource, self._resource_pid = resource(self._service_name), os.getpid()
        body = encode(batch, self._resource)
        try:
            conn = self._connection()
            conn.request("POST", self._path, body=body, headers=self._headers)
            response = conn.getresponse()
            response.read()
            ok = 200 <= response.status < 300
            retry = response.status in (429, 502, 503, 504)
        except (OSError, http.client.HTTPException):
            self._close()
            ok, retry = False, True
        if ok:
            self._failures = 0
            self.sent += len(batch)
        elif retry:
            self._failures += 1
            self._retry_at = time.monotonic() + min(30.0, 2.0 ** (self._failures - 1))
        return ok

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=TIMEOUT_S)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self, deadline_s: float = 2.0) -> None:
        """Last flush at shutdown, bounded in time."""
        end = time.monotonic() + deadline_s
        self._retry_at = 0.0
        while self._queue and time.monotonic() < end:
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            if not self._send(batch):
                self._dropped.inc(len(batch) + len(self._queue))
                self._queue.clear()
        self._close()

    def after_fork_in_child(self) -> None:
        self._queue.clear()
        self._conn = None
        self._resource = None
