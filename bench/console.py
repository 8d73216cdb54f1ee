"""Console speed: OTLP ingest rate on one core, and page times with many stored requests.

    python bench/console.py                      # 100,000 requests, batches of 512
    python bench/console.py --requests 20000

The console runs pinned to core 0; this script (the sender) runs on core 1.
Each request is a SERVER span with two CLIENT (database) children; about a
tenth carry a slow_request event. Prints spans per second ingested, then the
median time of each page and API call over 5 tries, and the database size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

ROUTES = ["/items/{item_id}", "/users/{user_id}", "/report", "/search", "/orders/{order_id}"]


def _kv(key: str, value: object) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def batch(start_index: int, size: int) -> bytes:
    spans = []
    now = time.time_ns()
    for i in range(start_index, start_index + size):
        trace_id = random.getrandbits(128).to_bytes(16, "big")
        server_id = random.getrandbits(64).to_bytes(8, "big")
        route = ROUTES[i % len(ROUTES)]
        begin = now - random.randint(1, 3_600_000) * 1_000_000
        length = random.randint(1, 900) * 1_000_000
        server = Span(
            trace_id=trace_id,
            span_id=server_id,
            name=f"GET {route}",
            kind=Span.SPAN_KIND_SERVER,
            start_time_unix_nano=begin,
            end_time_unix_nano=begin + length,
            attributes=[
                _kv("http.request.method", "GET"),
                _kv("http.route", route),
                _kv("http.response.status_code", 500 if i % 50 == 0 else 200),
                _kv("url.path", route.replace("{", "").replace("}", "")),
            ],
        )
        if i % 10 == 0:
            server.events.add(
                name="slow_request",
                time_unix_nano=begin + length,
                attributes=[_kv("route", route), _kv("duration_ms", length // 1_000_000)],
            )
        spans.append(server)
        for q in range(2):
            spans.append(
                Span(
                    trace_id=trace_id,
                    span_id=random.getrandbits(64).to_bytes(8, "big"),
                    parent_span_id=server_id,
                    name="SELECT item",
                    kind=Span.SPAN_KIND_CLIENT,
                    start_time_unix_nano=begin + q * 1000,
                    end_time_unix_nano=begin + q * 1000 + 500_000,
                    attributes=[
                        _kv("db.system.name", "sqlite"),
                        _kv("db.query.text", "SELECT * FROM item WHERE id = ?"),
                    ],
                )
            )
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[_kv("service.name", "bench")]),
                scope_spans=[ScopeSpans(spans=spans)],
            )
        ]
    )
    return request.SerializeToString()


def history(minutes: int, instances: int) -> list[bytes]:
    """Cumulative per-route histograms, one post per instance per minute, as agents send."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.metrics.v1.metrics_pb2 import (
        Histogram,
        HistogramDataPoint,
        Metric,
        ResourceMetrics,
        ScopeMetrics,
    )

    bounds = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]
    start = time.time_ns() - minutes * 60_000_000_000
    totals = {(i, r, s): [0] * 15 for i in range(instances) for r in ROUTES for s in (200, 500)}
    bodies = []
    for minute in range(minutes):
        for instance in range(instances):
            points = []
            for route in ROUTES:
                for status in (200, 500):
                    counts = totals[(instance, route, status)]
                    for _ in range(30 if status == 200 else 1):
                        counts[random.randint(0, 9)] += 1
                    points.append(
                        HistogramDataPoint(
                            attributes=[
                                _kv("http.request.method", "GET"),
                                _kv("http.route", route),
                                _kv("http.response.status_code", status),
                            ],
                            start_time_unix_nano=start,
                            time_unix_nano=start + (minute + 1) * 60_000_000_000,
                            count=sum(counts),
                            sum=sum(counts) * 0.05,
                            bucket_counts=list(counts),
                            explicit_bounds=bounds,
                        )
                    )
            metric = Metric(
                name="http.server.request.duration",
                histogram=Histogram(data_points=points, aggregation_temporality=2),
            )
            resource = Resource(
                attributes=[_kv("service.name", "bench"), _kv("service.instance.id", instance)]
            )
            bodies.append(
                ExportMetricsServiceRequest(
                    resource_metrics=[
                        ResourceMetrics(
                            resource=resource, scope_metrics=[ScopeMetrics(metrics=[metric])]
                        )
                    ]
                ).SerializeToString()
            )
    return bodies


def post(url: str, body: bytes) -> None:
    request = urllib.request.Request(
        url, data=body, headers={"content-type": "application/x-protobuf"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()


def timed_get(url: str, tries: int = 5) -> float:
    times = []
    for _ in range(tries):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as response:
            response.read()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=512, help="requests per OTLP post")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    # A SIGTERM (timeout, Ctrl-C in a pipeline) still runs the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db = Path(tempfile.mkdtemp(prefix="perfagent-console-bench-")) / "console.db"
    console = subprocess.Popen(
        [
            *("taskset", "-c", "0", sys.executable, "-m", "perfagent", "console"),
            *("--port", str(port), "--db", str(db), "--max-mb", "4096"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                timed_get(base + "/api/health", tries=1)
                break
            except OSError:
                time.sleep(0.1)
        bodies = [batch(i, args.batch) for i in range(0, args.requests, args.batch)]
        spans = sum(
            3 * min(args.batch, args.requests - i) for i in range(0, args.requests, args.batch)
        )
        started = time.perf_counter()
        for body in bodies:
            post(base + "/v1/traces", body)
        took = time.perf_counter() - started
        print(f"ingest: {spans:,} spans ({args.requests:,} requests) in {took:.1f} s")
        print(f"        {spans / took:,.0f} spans/s on one core")
        metric_bodies = history(minutes=240, instances=4)
        started = time.perf_counter()
        for body in metric_bodies:
            post(base + "/v1/metrics", body)
        took = time.perf_counter() - started
        print(f"stats:  4 instances x 240 minutes of per-route histograms in {took:.1f} s")

        one = urllib.request.urlopen(base + "/api/requests?limit=1", timeout=60)
        first = json.loads(one.read())[0]["trace_id"]
        print(f"\npages and API with {args.requests:,} stored requests (median of 5, ms)")
        for path in (
            "/",
            "/routes",
            "/requests",
            "/requests?has_finding=true&page=3",
            "/findings",
            f"/traces/{first}",
            "/route?service=bench&route=/report&method=GET",
            "/api/requests?route=/report&min_ms=500",
            f"/api/traces/{first}",
            "/api/findings",
            "/api/routes",
        ):
            print(f"  {timed_get(base + path):8.1f}  {path}")
        print(f"\ndatabase: {db.stat().st_size / 1e6:.1f} MB")
    finally:
        console.terminate()
        console.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
