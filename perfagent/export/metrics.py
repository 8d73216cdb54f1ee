"""The contract's Prometheus metrics, and the endpoint that serves them.

Requests are recorded in plain Python first (see ``stats.py``: a lock-free
per-thread buffer, well under 1 µs) and merged off the request path, the
request histograms into series of totals of our own (``series.py``: what a
route costs), the rest into these prometheus-client objects. Under
``perfagent run`` each worker writes its values to prometheus-client's
multiprocess files and the runner alone serves ``/metrics``, so counts are
exact across workers.
"""

from __future__ import annotations

import glob
import os
import struct
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric

from perfagent._version import __version__
from perfagent.export.series import HistogramSeries, ProcessFile, SeriesCollector
from perfagent.export.stats import Buffered, RequestStats
from perfagent.record import RequestRecord

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
QUERY_COUNT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The agent's metric objects, registered in a registry of its own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_duration = HistogramSeries(
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests, from arrival to the last byte sent.",
            ["http_request_method", "http_route", "http_response_status_code"],
            DURATION_BUCKETS,
        )
        self.active_requests = Gauge(
            "http_server_active_requests",
            "Number of HTTP server requests in flight.",
            ["http_request_method"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.slow_requests = Counter(
            "perfagent_slow_requests",
            "Requests slower than the slow threshold (time to first byte for streams).",
            ["http_request_method", "http_route"],
            registry=registry,
        )
        self.dropped = Counter(
            "perfagent_dropped",
            "Data the agent dropped rather than slow the app, by what was dropped.",
            ["what"],
            registry=registry,
        )
        self.request_db_queries = HistogramSeries(
            "perfagent_request_db_queries",
            "Database queries issued per request.",
            ["http_route"],
            QUERY_COUNT_BUCKETS,
        )
        self.db_duration = HistogramSeries(
            "db_client_operation_duration_seconds",
            "Duration of database queries issued while serving requests.",
            ["db_system_name", "db_operation_name"],
            DB_BUCKETS,
        )
        self.loop_lag = Histogram(
            "perfagent_event_loop_lag_seconds",
            "How late the event-loop heartbeat ran, once per heartbeat tick.",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self.loop_blocks = Counter(
            "perfagent_event_loop_blocks",
            "Event-loop stalls longer than the block threshold, by the route that blocked.",
            ["http_route"],
            registry=registry,
        )
        self.n_plus_one = Counter(
            "perfagent_n_plus_one",
            "Requests in which one query shape was repeated from one call site (N+1).",
            ["http_route"],
            registry=registry,
        )
        self.thread_pool_wait = HistogramSeries(
            "perfagent_thread_pool_wait_seconds",
            "Time requests waited for a thread of the pool running sync endpoints.",
            ["http_route"],
            DB_BUCKETS,
        )
        series = [
            self.request_duration,
            self.request_db_queries,
            self.db_duration,
            self.thread_pool_wait,
        ]
        registry.register(SeriesCollector(series))
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory and getattr(values.ValueClass, "_multiprocess", False):
            shared = ProcessFile(directory)  # the runner reads it with the workers' files
            for histogram in series:
                histogram.file = shared
        self.stats = RequestStats(
            self.active_requests,
            [
                Buffered(self.request_duration, DURATION_BUCKETS),
                Buffered(self.request_db_queries, QUERY_COUNT_BUCKETS),
                Buffered(self.db_duration, DB_BUCKETS),
                Buffered(self.thread_pool_wait, DB_BUCKETS),
            ],
        )
        self.stats.dropped_calls = self.dropped.labels("calls")
        self._slow_children: dict[tuple[str, str], Any] = {}

    def request_ended(self, record: RequestRecord) -> None:
        """Pipeline step: the request's duration, queries, and that it is no longer in flight."""
        route = record.route or ""
        self.stats.request_ended(
            record.method,
            (record.method, route, record.status),
            record.end - record.start,
            (route,),
            record.queries,
            record.thread_wait,
            record.past_cap,
        )

    def count_slow(self, record: RequestRecord) -> None:
        key = (record.method, record.route or "")
        child = self._slow_children.get(key)
        if child is None:
            child = self._slow_children[key] = self.slow_requests.labels(*key)
        child.inc()


class BuildInfo:
    """``perfagent_build_info{version, compiled}``, served by whichever process serves
    /metrics; ``compiled`` is "1" when the C speedups run, "0" on the pure-Python path."""

    def __init__(self, compiled: bool) -> None:
        self._labels = [__version__, "1" if compiled else "0"]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "perfagent_build_info",
            "The perfagent version serving these metrics, and whether its C speedups run.",
            labels=["version", "compiled"],
        )
        family.add_metric(self._labels, 1)
        yield family


class LiveMultiProcessCollector:
    """Reads the workers' multiprocess files, first retiring the workers that died.

    prometheus-client keeps a dead worker's ``livesum`` gauge files until
    ``mark_process_dead`` is called; doing it at scrape time means a worker that
    gunicorn replaced stops counting in ``http_server_active_requests``.
    """

    def __init__(self, path: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.path = path
        self._inner = MultiProcessCollector(None, path=path)

    def collect(self) -> Iterator[Metric]:
        self._retire_dead_workers()
        # A worker that is just starting has created its file but not yet sized
        # it (seen under Flask's reloader): such a file holds no values yet.
        files = []
        for path in glob.glob(os.path.join(self.path, "*.db")):
            try:
                if os.path.getsize(path) >= 8:
                    files.append(path)
            except OSError:
                pass  # removed since the listing: a worker retired just now
        try:
            metrics = self._inner.merge(files, accumulate=True)
        except (OSError, RuntimeError, struct.error):
            metrics = self._inner.merge(self._readable(files), accumulate=True)
        yield from metrics

    @staticmethod
    def _readable(files: list[str]) -> list[str]:
        from prometheus_client.mmap_dict import MmapedDict

        good = []
        for path in files:
            try:
                MmapedDict.read_all_values_from_file(path)
                good.append(path)
            except (OSError, RuntimeError, struct.error):
                pass
        return good

    def _retire_dead_workers(self) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        pids = set()
        for name in os.listdir(self.path):
            if name.startswith("gauge_live") and name.endswith(".db"):
                pid = name[:-3].rpartition("_")[2]
                if pid.isdigit():
                    pids.add(int(pid))
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                mark_process_dead(pid, self.path)
            except PermissionError:
                pass


def serving_registry(
    own: Metrics | None, multiprocess_dir: str | None, compiled: bool = False
) -> CollectorRegistry:
    """The registry /metrics shows: the workers' files when there are several, else ours."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir:
        if own is not None:  # this process's own recent requests reach its file first
            registry.register(_FlushFirst(own, None))
        registry.register(LiveMultiProcessCollector(multiprocess_dir))
    elif own is not None:
        registry.register(_FlushFirst(own, own.registry))
    registry.register(BuildInfo(compiled))
    return registry


class _FlushFirst:
    """Merges this process's recorded requests, then shows ``registry`` (if any)."""

    def __init__(self, metrics: Metrics, registry: CollectorRegistry | None) -> None:
        self._metrics = metrics
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        self._metrics.stats.flush()
        if self._registry is not None:
            yield from self._registry.collect()


def start_server(registry: CollectorRegistry, host: str, port: int) -> Any:
    """Serve /metrics on a daemon thread; returns the server (``.shutdown()`` stops it)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
