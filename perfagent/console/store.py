"""The console's SQLite store: spans, findings and per-route histograms.

One file in WAL mode, created on first run. Writes go through one connection
under a lock (each OTLP request is one transaction, all or nothing); reads use
a connection per thread, which WAL lets run beside the writer. Retention is
bounded by age and by file size, enforced on a timer.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perfagent.console import stored

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    parent_span_id TEXT NOT NULL,
    service TEXT NOT NULL,
    name TEXT NOT NULL,
    kind INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    duration_ms REAL NOT NULL,
    route TEXT NOT NULL,
    method TEXT NOT NULL,
    status INTEGER,
    error TEXT,
    attributes TEXT NOT NULL,
    events TEXT NOT NULL,
    findings INTEGER NOT NULL,
    db_queries INTEGER NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS spans_requests ON spans (kind, start_ns);
CREATE INDEX IF NOT EXISTS spans_route ON spans (service, route, kind);
CREATE INDEX IF NOT EXISTS spans_received ON spans (received);

CREATE TABLE IF NOT EXISTS route_queries (
    service TEXT NOT NULL,
    route TEXT NOT NULL,
    method TEXT NOT NULL,
    requests INTEGER NOT NULL,
    queries INTEGER NOT NULL,
    PRIMARY KEY (service, route, method)
);

CREATE TABLE IF NOT EXISTS route_stacks (
    service TEXT NOT NULL,
    route TEXT NOT NULL,
    method TEXT NOT NULL,
    stack TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (service, route, method, stack)
);

CREATE TABLE IF NOT EXISTS profile_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    seconds INTEGER NOT NULL,
    service TEXT,
    status TEXT NOT NULL,
    runner TEXT,
    finished REAL,
    stacks TEXT,
    error TEXT
);

CREATE TABLE IF NOT EXISTS findings (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    service TEXT NOT NULL,
    route TEXT,
    method TEXT,
    callsite TEXT,
    fingerprint TEXT,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    occurrences INTEGER NOT NULL,
    example_trace_id TEXT,
    data TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS histograms (
    stream TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    method TEXT NOT NULL,
    route TEXT NOT NULL,
    status INTEGER,
    time_ns INTEGER NOT NULL,
    count INTEGER NOT NULL,
    sum REAL NOT NULL,
    bounds TEXT NOT NULL,
    counts TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS route_minutes (
    minute INTEGER NOT NULL,
    service TEXT NOT NULL,
    method TEXT NOT NULL,
    route TEXT NOT NULL,
    status INTEGER NOT NULL,
    count INTEGER NOT NULL,
    sum REAL NOT NULL,
    bounds TEXT NOT NULL,
    counts TEXT NOT NULL,
    PRIMARY KEY (minute, service, method, route, status)
);
"""


@dataclass(frozen=True)
class Retention:
    max_age_s: float = 7 * 86400.0
    max_mb: float = 512.0


@dataclass
class SpanRow:
    trace_id: str
    span_id: str
    parent_span_id: str
    service: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    route: str
    method: str
    status: int | None
    error: str | None
    attributes: dict[str, Any]
    events: list[dict[str, Any]]
    #: Database CLIENT spans under this span in the same payload (an agent sends a
    #: request's spans together); counted at ingest so no page has to join spans.
    db_queries: int = 0

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6


@dataclass
class FindingRow:
    kind: str
    service: str
    time_s: float
    trace_id: str
    fields: dict[str, Any]

    @property
    def key(self) -> str:
        """What makes two findings the same one: N+1s by route, query shape and call site;
        loop blocks by the line that blocked, whatever was running; slow requests by route."""
        f = self.fields
        if self.kind == "event_loop_blocked":
            return json.dumps((self.kind, self.service, f.get("callsite")))
        parts = (self.kind, self.service, f.get("route"), f.get("method"))
        return json.dumps((*parts, f.get("fingerprint"), f.get("callsite")))


@dataclass
class HistogramPoint:
    service: str
    instance: str
    start_ns: int
    time_ns: int
    method: str
    route: str
    status: int | None
    count: int
    sum: float
    bounds: list[float]
    counts: list[int]

    @property
    def stream(self) -> str:
        return json.dumps(
            [self.service, self.instance, self.start_ns, self.method, self.route, self.status]
        )


def _repeats(fields: dict[str, Any]) -> int:
    """How many occurrences one finding stands for (agents fold repeats together)."""
    value = fields.get("repeats", 1)
    return value if isinstance(value, int) and 1 <= value <= 1_000_000_000 else 1


class Store:
    def __init__(self, path: Path | str, retention: Retention | None = None) -> None:
        self.path = str(path)
        self.retention = retention or Retention()
        self._lock = threading.Lock()
        self._writer = self._connect(new_file_pragma="PRAGMA auto_vacuum=INCREMENTAL")
        self._writer.executescript(_SCHEMA)
        self._local = threading.local()
        # Every thread's reader, so close() can close them all: a reader left to the
        # collector is a ResourceWarning (an error under -W error on 3.13).
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False

    def _connect(self, new_file_pragma: str = "") -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if new_file_pragma:
            # Before anything writes the header: lets deletions give space back to the disk.
            conn.execute(new_file_pragma)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            with self._readers_lock:
                if self._closed:
                    raise sqlite3.ProgrammingError("the store is closed")
                conn = self._local.conn = self._connect()
                conn.row_factory = sqlite3.Row
                self._readers.append(conn)
        return conn

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._reader().execute(sql, params).fetchall()

    # -- writes -------------------------------------------------------------

    def add_spans(self, spans: list[SpanRow]) -> int:
        now = time.time()
        rows = [
            (
                s.trace_id,
                s.span_id,
                s.parent_span_id,
                s.service,
                s.name,
                s.kind,
                s.start_ns,
                s.end_ns,
                s.duration_ms,
                s.route,
                s.method,
                s.status,
                s.error,
                json.dumps(s.attributes),
                json.dumps(s.events),
                len(s.events),
                s.db_queries,
                now,
            )
            for s in spans
        ]
        with self._lock, self._writer:
            self._writer.execute("BEGIN")
            self._writer.executemany(
                "INSERT OR REPLACE INTO spans VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows
            )
            # Queries per kept request, kept per route so the routes page reads one small table.
            self._writer.executemany(
                "INSERT INTO route_queries VALUES (?,?,?,1,?) ON CONFLICT DO UPDATE SET "
                "requests = requests + 1, queries = queries + excluded.queries",
                [(s.service, s.route, s.method, s.db_queries) for s in spans if s.kind == 2],
            )
        return len(rows)

    def add_findings(self, findings: Iterable[FindingRow]) -> None:
        with self._lock, self._writer:
            self._writer.execute("BEGIN")
            for f in findings:
                fields = f.fields
                stacks = fields.pop("stacks", None)
                if isinstance(stacks, dict):
                    self._add_stacks(f.service, fields, stacks)
                self._writer.execute(
                    """
                    INSERT INTO findings VALUES (?,?,?,?,?,?,?,?,?,?,?,?)
                    ON CONFLICT (key) DO UPDATE SET
                        last_seen = max(last_seen, excluded.last_seen),
                        first_seen = min(first_seen, excluded.first_seen),
                        occurrences = occurrences + excluded.occurrences,
                        example_trace_id = coalesce(excluded.example_trace_id, example_trace_id),
                        data = excluded.data
                    """,
                    (
                        f.key,
                        f.kind,
                        f.service,
                        fields.get("route"),
                        fields.get("method"),
                        fields.get("callsite"),
                        fields.get("fingerprint"),
                        f.time_s,
                        f.time_s,
                        _repeats(fields),
                        f.trace_id or None,
                        json.dumps(fields),
                    ),
                )

    def _add_stacks(self, service: str, fields: dict[str, Any], stacks: dict) -> None:
        """Sampled stacks of a slow request, added to its route's flame graph."""
        rows = [
            (
                service,
                str(fields.get("route") or ""),
                str(fields.get("method") or ""),
                stack[:8192],
                n,
            )
            for stack, n in list(stacks.items())[:500]
            if isinstance(stack, str) and isinstance(n, int) and 0 < n < 1_000_000
        ]
        self._writer.executemany(
            "INSERT INTO route_stacks VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET "
            "count = count + excluded.count",
            rows,
        )

    def add_histograms(self, points: Iterable[HistogramPoint]) -> None:
        """Keeps the latest cumulative point per stream, and per-minute deltas for windows."""
        with self._lock, self._writer:
            self._writer.execute("BEGIN")
            for p in points:
                before = self._writer.execute(
                    "SELECT count, sum, bounds, counts FROM histograms WHERE stream = ?",
                    (p.stream,),
                ).fetchone()
                before = before and stored.histogram(*before)  # a damaged row counts as none
                delta_count, delta_sum, delta_counts = p.count, p.sum, p.counts
                if before is not None:
                    old_counts = before[3]
                    if p.count < before[0] or len(old_counts) != len(p.counts):
                        continue  # out of order, or a stale point: keep the newer one
                    delta_count, delta_sum = p.count - before[0], p.sum - before[1]
                    delta_counts = [a - b for a, b in zip(p.counts, old_counts, strict=True)]
                    if min(delta_counts) < 0:
                        continue  # a bucket went down while the count went up: not this stream
                self._writer.execute(
                    "INSERT OR REPLACE INTO histograms VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        p.stream,
                        p.service,
                        p.method,
                        p.route,
                        p.status,
                        p.time_ns,
                        p.count,
                        p.sum,
                        json.dumps(p.bounds),
                        json.dumps(p.counts),
                    ),
                )
                if delta_count <= 0:
                    continue
                minute = p.time_ns // 60_000_000_000
                key = (minute, p.service, p.method, p.route, p.status or 0)
                row = self._writer.execute(
                    "SELECT count, sum, bounds, counts FROM route_minutes WHERE minute=? "
                    "AND service=? AND method=? AND route=? AND status=?",
                    key,
                ).fetchone()
                row = row and stored.histogram(*row)
                if row is not None and row[2] == p.bounds:
                    merged = [a + b for a, b in zip(row[3], delta_counts, strict=True)]
                    delta_count, delta_sum = delta_count + row[0], delta_sum + row[1]
                    delta_counts = merged
                self._writer.execute(
                    "INSERT OR REPLACE INTO route_minutes VALUES (?,?,?,?,?,?,?,?,?)",
                    (*key, delta_count, delta_sum, json.dumps(p.bounds), json.dumps(delta_counts)),
                )

    # -- profiles asked for from the console ----------------------------------

    def ask_profile(self, seconds: int, service: str | None) -> int:
        with self._lock:
            cursor = self._writer.execute(
                "INSERT INTO profile_requests (created, seconds, service, status) "
                "VALUES (?, ?, ?, 'pending')",
                (time.time(), seconds, service),
            )
            return int(cursor.lastrowid)

    def claim_profile(self, runner: str, service: str) -> tuple[int, int] | None:
        """The oldest pending request for this service (or for any), now the runner's."""
        with self._lock, self._writer:
            self._writer.execute("BEGIN IMMEDIATE")
            row = self._writer.execute(
                "SELECT id, seconds FROM profile_requests WHERE status = 'pending' "
                "AND (service IS NULL OR service = ?) ORDER BY id LIMIT 1",
                (service,),
            ).fetchone()
            if row is None:
                return None
            self._writer.execute(
                "UPDATE profile_requests SET status = 'running', runner = ? WHERE id = ?",
                (runner, row[0]),
            )
            return int(row[0]), int(row[1])

    def finish_profile(self, request_id: int, stacks: str | None, error: str | None) -> bool:
        with self._lock:
            cursor = self._writer.execute(
                "UPDATE profile_requests SET status = ?, finished = ?, stacks = ?, error = ? "
                "WHERE id = ? AND status = 'running'",
                ("failed" if error else "done", time.time(), stacks, error, request_id),
            )
            return cursor.rowcount == 1

    # -- retention ----------------------------------------------------------

    def size_mb(self) -> float:
        pages = self._writer.execute("PRAGMA page_count").fetchone()[0]
        page_size = self._writer.execute("PRAGMA page_size").fetchone()[0]
        free = self._writer.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * page_size / 1e6

    def enforce_retention(self) -> int:
        """Deletes what is too old, then the oldest spans until the file fits. Returns rows."""
        removed = 0
        cutoff = time.time() - self.retention.max_age_s
        with self._lock:
            removed += self._writer.execute(
                "DELETE FROM spans WHERE received < ?", (cutoff,)
            ).rowcount
            self._writer.execute("DELETE FROM findings WHERE last_seen < ?", (cutoff,))
            self._writer.execute("DELETE FROM route_minutes WHERE minute < ?", (int(cutoff // 60),))
            while self.size_mb() > self.retention.max_mb:
                total = self._writer.execute("SELECT count(*) FROM spans").fetchone()[0]
                deleted = self._writer.execute(
                    "DELETE FROM spans WHERE rowid IN "
                    "(SELECT rowid FROM spans ORDER BY received LIMIT ?)",
                    (max(100, total // 20),),  # oldest 5% at a time
                ).rowcount
                removed += deleted
                if not deleted:
                    break
            # It frees one page per step; executescript() steps it to the end.
            self._writer.executescript("PRAGMA incremental_vacuum;")
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed

    def close(self) -> None:
        """Closes the writer and every thread's reader; the store cannot be used after."""
        with self._lock, self._readers_lock:
            self._closed = True
            readers, self._readers = self._readers, []
            for conn in readers:
                conn.close()
            self._writer.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
