"""Histograms recorded in plain Python, merged into prometheus-client later.

Why not ``Histogram.observe`` per request: measured under uvicorn on FastAPI
``/hello``, prometheus-client's histogram observe plus the in-flight gauge's
inc and dec cost about 10 µs per request (a lock and, in multiprocess mode,
an mmap write per value). Here an observation costs a thread-local lookup, a
dict lookup, a ``bisect`` and two list increments (well under 1 µs).

Each thread writes only its own buffer, so no update is lost and no lock is
taken on the request path. The agent thread merges what changed into the
prometheus-client values every ``metrics_flush_s`` (0.1 s) while requests
finish (so multiprocess files and the runner's ``/metrics`` lag by at most
that, and a worker killed with SIGKILL loses at most the requests of that
long), and so does every in-process scrape and OTLP export just before
reading, so those are exact. ``flush()`` at shutdown and at exit writes the
rest. A merge of a process with many series takes longer (~0.5 µs a series):
the next one then waits 50 times its duration, so merging takes at most 2% of
the agent thread's time; with no request finished the check costs a few
dictionary reads and waits for the next as long as the stack sampler does.

A buffer lives as long as its thread. Thread-per-request servers (``flask run``,
``app.run()``, threaded werkzeug) start a thread for every request: kept for good,
30,000 requests made 30,000 buffers (+20 MiB) and a merge that took 78-208 ms
holding the GIL. A thread's ``local`` also holds a ``_ThreadEnd``, freed with the
thread's local dict when the thread ends; it hands the buffer to the next flush,
which merges it one last time and drops it.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from time import perf_counter
from typing import Any

try:  # built by pip where a C compiler is found (perfagent/_speedups.c)
    from perfagent._speedups import observe_queries as _observe_queries
except ImportError:
    _observe_queries = None


class Buffered:
    """One histogram (``series.HistogramSeries``), fed through per-thread buffers."""

    def __init__(self, histogram: Any, bounds: Sequence[float]) -> None:
        self.histogram = histogram
        self.bounds = list(bounds)
        self.float_bounds = tuple(float(bound) for bound in bounds)
        self.width = len(self.bounds) + 1
        #: label values as recorded -> as shown (str): each converted once.
        self.labels: dict[tuple, tuple[str, ...]] = {}


class _ThreadBuffer:
    """One thread's running totals; written by that thread only."""

    __slots__ = ("active", "counts", "tables")

    def __init__(self, slots: int) -> None:
        #: method -> [started, finished]
        self.active: dict[str, list[int]] = {}
        #: prometheus-client counter child -> [count]
        self.counts: dict[Any, list[int]] = {}
        #: per histogram: label values -> [count per bucket ..., +Inf count, sum]
        self.tables: list[dict[tuple, list[Any]]] = [{} for _ in range(slots)]


class _ThreadEnd:
    """Beside a thread's buffer in ``RequestStats.local``: freed when the thread ends
    (its local dict goes with it), it queues the buffer for a last merge. Nothing else
    holds it, so ``__del__`` runs then, on the ending thread, after its last write."""

    __slots__ = ("buffer", "ended")

    def __init__(self, buffer: _ThreadBuffer, ended: deque) -> None:
        self.buffer = buffer
        self.ended = ended

    def __del__(self) -> None:
        self.ended.append(self.buffer)  # atomic under the GIL; no lock on a dying thread


def _observe(table: dict[tuple, list[Any]], histogram: Buffered, key: tuple, value: float) -> None:
    """One observation into a thread's table for ``histogram``."""
    entry = table.get(key)
    if entry is None:
        entry = table[key] = [0] * histogram.width + [0.0]
    entry[bisect_left(histogram.bounds, value)] += 1
    entry[-1] += value


class RequestStats:
    """The request histograms (by slot number) and the in-flight gauge."""

    def __init__(self, gauge: Any, histograms: Sequence[Buffered]) -> None:
        #: Whether the C version of ``observe_queries`` may be used (PERFAGENT_COMPILED_HOOKS).
        self.compiled = True
        self._gauge = gauge
        self._histograms = list(histograms)
        #: ``perfagent_dropped_total{what="calls"}``: calls of a request past its cap.
        self.dropped_calls: Any = None
        #: What holds each thread's ``buffer``; a new one after a fork.
        self.local = threading.local()
        self._buffers: list[_ThreadBuffer] = []
        #: Buffers of threads that ended, to merge a last time and drop (``_ThreadEnd``).
        self._ended: deque[_ThreadBuffer] = deque()
        self._register = threading.Lock()  # once per thread, never per request
        self._flush_lock = threading.Lock()  # agent thread and scrapes; never a request
        #: id(entry) -> what was merged of it already (a histogram entry's copy, a count)
        self._merged: dict[int, Any] = {}
        self._gauge_children: dict[str, Any] = {}
        #: (method, route) -> request counts per duration bucket since ``take_window()``.
        self._window: dict[tuple[str, str], list[int]] = {}
        #: Requests finished in the buffers kept, at the end of the last flush.
        self._finished_then = 0
        #: Seconds until the next ``merge_recent`` (``merge_wait``): its interval, or more.
        self._wait = 0.0

    @property
    def histograms(self) -> list[Buffered]:
        """The histograms, by slot: duration, query count, queries, pool wait."""
        return self._histograms

    def buffer(self) -> _ThreadBuffer:
        try:
            return self.local.buffer
        except AttributeError:
            buffer = _ThreadBuffer(len(self._histograms))
            with self._register:
                self._buffers.append(buffer)
            self.local.buffer = buffer
            self.local.end = _ThreadEnd(buffer, self._ended)
            return buffer

    @property
    def live_buffers(self) -> int:
        """How many threads' buffers are kept (merged at each flush)."""
        return len(self._buffers)

    # -- request path -------------------------------------------------------

    def started(self, method: str) -> None:
        try:
            buffer = self.local.buffer  # ``buffer()`` inlined: this runs per request
        except AttributeError:
            buffer = self.buffer()
        counts = buffer.active.get(method)
        if counts is None:
            counts = buffer.active[method] = [0, 0]
        counts[0] += 1

    def request_ended(
        self,
        method: str,
        duration_key: tuple,
        duration: float,
        route_key: tuple,
        queries: list[Any] | None,
        thread_wait: float,
        past_cap: Any = None,
    ) -> None:
        """A finished request: no longer in flight, its duration (slot 0), query
        count (1), queries (2) and wait for a pool thread (3, when it had one).

        One call and one buffer lookup for all (measured on the benchmark's
        11-query route: 17,000 instructions as five calls, each finding the
        thread's buffer again; 11,000 so)."""
        try:
            buffer = self.local.buffer  # ``buffer()`` inlined: this runs per request
        except AttributeError:
            buffer = self.buffer()
        counts = buffer.active.get(method)
        if counts is not None:
            counts[1] += 1
        tables, histograms = buffer.tables, self._histograms
        _observe(tables[0], histograms[0], duration_key, duration)
        count = len(queries) if queries else 0
        if past_cap is not None:
            count += past_cap.count
        _observe(tables[1], histograms[1], route_key, count)
        if thread_wait >= 0.0:
            _observe(tables[3], histograms[3], route_key, thread_wait)
        if queries:
            self._observe_queries(tables[2], histograms[2], queries)
        if past_cap is not None:
            self.add_past_cap(tables[2], past_cap)

    def add_past_cap(self, table: dict, past_cap: Any) -> None:
        """A request's calls past the cap (``db.capture.CallsPastCap``) into the calling
        thread's query ``table``, and counted as dropped calls. The C ``finish`` calls
        it too, for the rare request that went past the cap."""
        for key, counts in past_cap.table.items():
            entry = table.get(key)
            if entry is None:
                table[key] = list(counts)
            else:
                for index, value in enumerate(counts):
                    entry[index] += value
        if self.dropped_calls is not None and past_cap.count:
            try:
                totals = self.local.buffer.counts
            except AttributeError:
                totals = self.buffer().counts
            entry = totals.get(self.dropped_calls)
            if entry is None:
                totals[self.dropped_calls] = [past_cap.count]
            else:
                entry[0] += past_cap.count

    def count(self, child: Any) -> None:
        """``child.inc()`` for a counter that may go up on every request (an N+1
        route's ``perfagent_n_plus_one_total``): counted in the thread's buffer
        and added at the next flush, as the histograms are. prometheus-client's
        ``inc()`` takes a lock, and under ``perfagent run`` writes its file
        (measured: 0.24 µs in-process, 0.77 µs in multiprocess mode)."""
        try:
            counts = self.local.buffer.counts
        except AttributeError:
            counts = self.buffer().counts
        entry = counts.get(child)
        if entry is None:
            counts[child] = [1]
        else:
            entry[0] += 1

    def _observe_queries(self, table: dict, histogram: Buffered, queries: list[Any]) -> None:
        """Each query's duration, keyed by (db system, operation): ``_observe`` inlined
        for the queries of a request (measured: 0.40 -> 0.27 µs per query), in C
        where it was built (``_speedups.observe_queries``)."""
        if self.compiled and _observe_queries is not None:
            _observe_queries(table, histogram.float_bounds, queries)
            return
        bounds = histogram.bounds
        for query in queries:
            key = (query.system, query.shape.operation)
            entry = table.get(key)
            if entry is None:
                entry = table[key] = [0] * histogram.width + [0.0]
            duration = query.duration
            entry[bisect_left(bounds, duration)] += 1
            entry[-1] += duration

    # -- agent thread, scrapes, exports ----------------------------------------

    def _finished(self) -> int:
        """Requests finished in the buffers kept: a few dictionary reads a thread."""
        total = 0
        for buffer in list(self._buffers):
            for counts in list(buffer.active.values()):
                total += counts[1]
        return total

    def merge_recent(self, interval: float, quiet_wait: float) -> None:
        """Agent-thread task, every ``interval`` (``metrics_flush_s``): a flush when a
        request finished since the last one. ``merge_wait`` then says how long the next
        may wait: ``quiet_wait`` after a check that found nothing, 50 times this
        flush's duration when that is longer than ``interval``."""
        if not self._ended and self._finished() == self._finished_then:
            self._wait = max(interval, quiet_wait)
            return
        start = perf_counter()
        self.flush()
        self._wait = max(interval, 50.0 * (perf_counter() - start))

    def merge_wait(self) -> float:
        return self._wait

    def flush(self) -> None:
        """Adds what every thread recorded since the last flush to the prometheus values."""
        with self._flush_lock:
            # Taken before the merge: a buffer queued from here on is merged now and
            # dropped at the next flush, so each is merged once more after its thread
            # ended, never lost and never counted twice.
            ended = []
            while self._ended:
                ended.append(self._ended.popleft())
            in_flight: dict[str, int] = {}
            for buffer in list(self._buffers):
                for method, (started, finished) in list(buffer.active.items()):
                    in_flight[method] = in_flight.get(method, 0) + started - finished
                for slot, table in enumerate(buffer.tables):
                    for key, entry in list(table.items()):
                        self._merge(self._histograms[slot], key, entry)
                for child, entry in list(buffer.counts.items()):
                    now = entry[0]
                    before = self._merged.get(id(entry), 0)
                    if now != before:
                        child.inc(now - before)
                        self._merged[id(entry)] = now
            for method, value in in_flight.items():
                child = self._gauge_children.get(method)
                if child is None:
                    child = self._gauge_children[method] = self._gauge.labels(method)
                child.set(value)
            for buffer in ended:
                self._drop(buffer)
            self._finished_then = self._finished()

    def _drop(self, buffer: _ThreadBuffer) -> None:
        """Forgets a merged buffer of an ended thread, and what was merged of it (keyed by
        ``id``: a later entry may get the same address)."""
        with self._register:
            try:
                self._buffers.remove(buffer)
            except ValueError:
                return  # not ours: a buffer of before a fork
        merged = self._merged
        for table in buffer.tables:
            for entry in table.values():
                merged.pop(id(entry), None)
        for entry in buffer.counts.values():
            merged.pop(id(entry), None)

    def _merge(self, histogram: Buffered, key: tuple, entry: list[Any]) -> None:
        now = list(entry)  # one snapshot; the owner thread may be adding to it
        before = self._merged.get(id(entry))
        if before is None:
            before = [0] * histogram.width + [0.0]
        if now == before:
            return
        labels = histogram.labels.get(key)
        if labels is None:
            labels = histogram.labels[key] = tuple(
                "" if value is None else str(value) for value in key
            )
        totals = histogram.histogram.series(labels)
        window = None
        if histogram is self._histograms[0]:  # request durations: also kept per window
            route_key = (key[0], key[1])
            window = self._window.get(route_key)
            if window is None:
                window = self._window[route_key] = [0] * histogram.width
        changed = []
        for index in range(histogram.width):
            delta = now[index] - before[index]
            if delta:
                totals[index] += delta
                changed.append(index)
                if window is not None:
                    window[index] += delta
        totals[-1] += now[-1] - before[-1]
        changed.append(histogram.width)
        histogram.histogram.written(labels, changed)
        self._merged[id(entry)] = now

    def take_window(self) -> dict[tuple[str, str], list[int]]:
        """Request durations per (method, route) since the last call, bucketed."""
        self.flush()
        with self._flush_lock:
            window, self._window = self._window, {}
        return window

    def after_fork_in_child(self) -> None:
        """A forked worker starts from zero: its parent's counts are the parent's."""
        for histogram in self._histograms:
            histogram.histogram.reset()
        self._ended = deque()  # before the new local: the old one's ends go to the old deque
        self.local = threading.local()
        self._buffers = []
        self._merged = {}
        self._window = {}
        self._finished_then = 0
        self._register = threading.Lock()
        self._flush_lock = threading.Lock()
