"""N+1 queries: real requests to a real app under the agent, real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time

import pytest
from helpers import APPS, PERFAGENT, Server, clean_env, free_port, postgres_answers, scrape

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
FINDINGS = ("n_plus_one", "duplicate_query")


PG_UP = postgres_answers(PG_DSN)
needs_pg = pytest.mark.skipif(not PG_UP, reason=f"no PostgreSQL answers at {PG_DSN}")


def mark(name: str, module: str = "db_app.py") -> str:
    """``file:LINE`` of the line tagged ``# MARK name`` in a test app."""
    for number, line in enumerate((APPS / module).read_text().splitlines(), start=1):
        if line.rstrip().endswith(f"# MARK {name}"):
            return f"{module}:{number}"
    raise LookupError(name)


def _serve_db_app(tmp_path_factory, **settings: str):
    port, metrics_port = free_port(), free_port()
    db = tmp_path_factory.mktemp("db") / "app.sqlite"
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", str(metrics_port)]
    argv += ["--log-format", "json", "--", "uvicorn", "db_app:app", "--port", str(port)]
    env = clean_env(DB_PATH=str(db), PG_DSN=PG_DSN if PG_UP else "", PERFAGENT_NPLUSONE_MIN="5")
    server = Server(argv, port, {**env, **settings})
    try:
        server.wait_listening()
        server.metrics_port = metrics_port
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    yield from _serve_db_app(tmp_path_factory)


@pytest.fixture(scope="module")
def python_hooks_app(tmp_path_factory):
    """The same app with the sqlite3 hook in Python rather than C (perfagent/_speedups.c)."""
    yield from _serve_db_app(tmp_path_factory, PERFAGENT_COMPILED_HOOKS="0")


def findings(server: Server, route: str, expect: int, timeout: float = 5.0) -> list[dict]:
    """The N+1 findings logged for ``route`` (the finding is logged just after the reply)."""
    deadline = time.monotonic() + (timeout if expect else 0.6)
    while True:
        events = [
            event
            for line in server.output().splitlines()
            if line.startswith("{") and '"event"' in line
            for event in [json.loads(line)]
            if event["event"] in FINDINGS and event["route"] == route
        ]
        if len(events) >= expect and (expect or time.monotonic() >= deadline):
            return events
        if time.monotonic() >= deadline:
            return events
        time.sleep(0.1)


def get(server: Server, path: str):
    response = server.get(path)
    assert response.status_code == 200, (path, response.text[:500], server.output()[-2000:])
    return response


@pytest.mark.parametrize(
    ("path", "kind", "count", "callsite", "fingerprint"),
    [
        (
            "/raw/nplusone",
            "n_plus_one",
            10,
            mark("raw"),
            "SELECT count(*) FROM comment WHERE post_id=?",
        ),
        (
            "/raw/fstring",
            "n_plus_one",
            10,
            mark("fstring"),
            "SELECT * FROM comment WHERE post_id=?",
        ),
        (
            "/raw/helper",
            "n_plus_one",
            10,
            mark("helper"),
            "SELECT count(*) FROM comment WHERE post_id=?",
        ),
        (
            "/raw/duplicate",
            "duplicate_query",
            6,
            mark("duplicate"),
            "SELECT title FROM post WHERE id=?",
        ),
        ("/orm/lazy", "n_plus_one", 10, mark("lazy"), None),
        # A string template (from_string): its own line, named as Jinja names it.
        ("/orm/template", "n_plus_one", 10, "<template>:1", None),
        ("/async/gather", "n_plus_one", 10, mark("gather"), None),
        ("/apsw/nplusone", "n_plus_one", 10, mark("apsw"), "SELECT * FROM comment WHERE post_id=?"),
    ],
)
def test_flags_repeats_with_the_app_line(app, path, kind, count, callsite, fingerprint):
    response = get(app, path)
    route = path
    (event,) = findings(app, route, 1)
    assert event["event"] == kind
    assert event["count"] == count
    assert event["callsite"] == callsite, event
    assert event["method"] == "GET" and len(event["trace_id"]) == 32
    assert event["total_ms"] > 0
    if fingerprint:
        assert event["fingerprint"] == fingerprint
    assert "?" in event["fingerprint"] and "'" not in event["fingerprint"]
    if path.startswith("/orm/"):
        assert "selectinload(Post.comments)" in event["advice"]
    if path != "/apsw/nplusone":  # APSW's trace reports the statement once it is done
        assert "db;dur=" in response.headers["server-timing"]


def test_two_repeated_shapes_per_row_are_two_findings(app):
    get(app, "/raw/two-per-row")
    events = findings(app, "/raw/two-per-row", 2)
    assert sorted(e["callsite"] for e in events) == sorted([mark("2n-a"), mark("2n-b")])
    assert all(e["count"] == 10 for e in events)


@pytest.mark.parametrize(
    "path",
    [
        "/raw/fixed",
        "/raw/four",
        "/raw/executemany",
        "/raw/two-sites",
        "/raw/chunks",
        "/raw/tables",
        "/orm/selectin",
        "/orm/joined",
        "/orm/savepoints",
        "/orm/identity",
    ],
)
def test_does_not_flag_look_alikes(app, path):
    get(app, path)
    assert findings(app, path, 0) == []


def test_the_sqlite3_hook_is_compiled_where_a_compiler_is_found():
    import sqlite3

    import perfagent
    from perfagent.db import drivers

    assert drivers.SqlHook is not None, "perfagent/_speedups.c was not built by pip install"
    from perfagent.record import RequestRecord, current

    perfagent.init(metrics_port=0, compiled_hooks=True)  # the C, whatever the run's setting
    connection = sqlite3.connect(":memory:")
    try:
        connection_class = type(connection)
        assert isinstance(connection_class.__dict__["execute"], drivers.SqlHook)
        assert isinstance(connection_class.__dict__["executemany"], drivers.SqlHook)
        record = RequestRecord("GET", 0.0)
        token = current.set(record)
        before = time.perf_counter()
        try:
            # The driver's own error reaches the app unchanged; the query still counts.
            with pytest.raises(sqlite3.OperationalError, match="syntax error"):
                connection.execute("SELEC 1")
            connection.execute("CREATE TABLE t (id INTEGER)")
            connection.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(7)])
            execute = connection.execute  # bound outside a call, as a method is
            assert execute("SELECT count(*) FROM t").fetchone() == (7,)
        finally:
            current.reset(token)
        after = time.perf_counter()
        # The hook's clock is perf_counter's, as the record's times are.
        starts = [q.start for q in record.queries]
        assert before <= starts[0] and starts == sorted(starts)
        assert starts[-1] + record.queries[-1].duration <= after
        assert record.db_time == pytest.approx(sum(q.duration for q in record.queries))
        assert [(q.sql, q.many) for q in record.queries] == [
            ("SELEC 1", 0),
            ("CREATE TABLE t (id INTEGER)", 0),
            ("INSERT INTO t VALUES (?)", 7),
            ("SELECT count(*) FROM t", 0),
        ]
        assert record.db_time > 0
    finally:
        connection.close()
        perfagent.shutdown()


@pytest.mark.parametrize(
    ("path", "kind", "count", "callsite"),
    [
        ("/raw/nplusone", "n_plus_one", 10, mark("raw")),
        ("/raw/helper", "n_plus_one", 10, mark("helper")),
        ("/raw/duplicate", "duplicate_query", 6, mark("duplicate")),
        ("/orm/lazy", "n_plus_one", 10, mark("lazy")),
        ("/raw/executemany", None, 0, None),
        ("/raw/four", None, 0, None),
    ],
)
def test_the_python_sqlite3_hook_finds_the_same(python_hooks_app, path, kind, count, callsite):
    response = get(python_hooks_app, path)
    assert "db;dur=" in response.headers["server-timing"]
    events = findings(python_hooks_app, path, 1 if kind else 0)
    assert [(e["event"], e["count"], e["callsite"]) for e in events] == (
        [(kind, count, callsite)] if kind else []
    )


def test_queries_outside_requests_are_not_charged_and_metrics_count(app):
    def value(name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    time.sleep(1.5)  # workers merge their counts into /metrics every second
    samples = scrape(app.metrics_port)
    before = value("perfagent_n_plus_one_total", http_route="/raw/nplusone")
    get(app, "/raw/fixed")
    for _ in range(3):
        get(app, "/raw/nplusone")
    time.sleep(1.5)
    samples = scrape(app.metrics_port)

    assert value("perfagent_n_plus_one_total", http_route="/raw/nplusone") == before + 3
    assert value("perfagent_n_plus_one_total", http_route="/raw/fixed") == 0
    # /raw/fixed always issues exactly one query: every such request is in the le="1" bucket.
    fixed = value("perfagent_request_db_queries_count", http_route="/raw/fixed")
    assert fixed >= 1
    assert value("perfagent_request_db_queries_bucket", http_route="/raw/fixed", le="0.0") == 0
    assert value("perfagent_request_db_queries_bucket", http_route="/raw/fixed", le="1.0") == fixed
    assert value("perfagent_request_db_queries_sum", http_route="/raw/nplusone") >= 11
    assert (
        value(
            "db_client_operation_duration_seconds_count",
            db_system_name="sqlite",
            db_operation_name="SELECT",
        )
        >= 12
    )
    # The ten start-up queries of db_app ran outside any request: no finding has an empty route.
    assert not [
        line
        for line in app.output().splitlines()
        if '"n_plus_one"' in line and '"route": ""' in line
    ]


@needs_pg
@pytest.mark.parametrize(
    "path",
    ["/pg/psycopg", "/pg/psycopg-async", "/pg/psycopg2", "/pg/asyncpg", "/pg/sqlalchemy-async"],
)
def test_postgresql_drivers(app, path):
    get(app, path)
    (event,) = findings(app, path, 1)
    assert event["event"] == "n_plus_one" and event["count"] == 8
    assert event["db_system"] == "postgresql"
    assert event["callsite"] == mark(path.removeprefix("/pg/")), event


def test_readable_log_line_by_default(tmp_path):
    """Without ``--log-format json`` the finding is one readable ``key=value`` line."""
    port = free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", "0"]
    argv += ["--", "uvicorn", "db_app:app", "--port", str(port)]
    env = clean_env(DB_PATH=str(tmp_path / "app.sqlite"), PG_DSN="")
    server = Server(argv, port, env)
    try:
        server.wait_listening()
        get(server, "/raw/nplusone")
        get(server, "/raw/nplusone")  # the second line is rendered from remembered texts
        pattern = re.compile(
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \[warning\s*\] n_plus_one\s+\[perfagent\] "
            r"advice=\"one query per item: [^\"]+\" callsite=(\S+) count=10 db_system=sqlite "
            r"distinct_parameters=10 fingerprint=('[^']+') method=GET route=/raw/nplusone "
            r"total_ms=[\d.]+ trace_id=([0-9a-f]{32})$"
        )
        deadline = time.monotonic() + 5.0
        while len(found := [m for m in map(pattern.match, server.output().splitlines()) if m]) < 2:
            assert time.monotonic() < deadline, server.output()[-2000:]
            time.sleep(0.1)
        # Strings with spaces are quoted as Python literals; one-token strings stand bare.
        expected = "'SELECT count(*) FROM comment WHERE post_id=?'"
        assert [m.group(1, 2) for m in found] == [(mark("raw"), expected)] * 2
        assert found[0].group(3) != found[1].group(3)  # a trace id of each request
    finally:
        server.stop()


_NO_STDERR_APP = """
import asyncio, sqlite3, sys
import httpx
assert sys.stderr is None, "stderr should be closed"
import perfagent
perfagent.init(metrics_port=0, console_url="http://127.0.0.1:9")
from fastapi import FastAPI
conn = sqlite3.connect(sys.argv[1], check_same_thread=False)
conn.execute("CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT)")
conn.executemany("INSERT INTO item VALUES (?, ?)", [(i, str(i)) for i in range(10)])
app = FastAPI()

@app.get("/items")
def items():
    return [conn.execute("SELECT name FROM item WHERE id = ?", (i,)).fetchone() for i in range(10)]

async def main():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return (await client.get("/items")).status_code

status = asyncio.run(main())
metrics = perfagent._state["agent"].metrics
metrics.stats.flush()  # what /metrics shows: the request threads' counts merged
print(status, metrics.n_plus_one.labels("/items")._value.get(),
      metrics.dropped.labels("agent_error")._value.get())
"""


def test_a_process_without_stderr_still_gets_its_findings(tmp_path):
    """pythonw and some daemons run with no stderr: the log line goes nowhere, the
    finding is still counted, and nothing fails inside the agent."""
    result = subprocess.run(
        ["bash", "-c", 'exec "$0" -c "$1" "$2" 2>&-', sys.executable, _NO_STDERR_APP, "app.db"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout
    assert result.stdout.split() == ["200", "1.0", "0.0"]


def test_the_compiled_grouping_matches_the_python_one():
    """_speedups.repeats against the detector's Python _repeats on the cases that
    decide a finding: control statements, batched chunks, queries without app
    frames, two call sites, two lines of one code object, below the minimum."""
    from perfagent._speedups import repeats

    from perfagent.db.capture import Query
    from perfagent.db.fingerprint import Fingerprints
    from perfagent.detectors.nplusone import _repeats

    shape = Fingerprints()

    def view():
        pass

    def helper():
        pass

    def query(sql: str, *sites: tuple) -> Query:
        return Query("sqlite", sql, shape(sql), (1,), 0.0, 0.001, 0, sites, None)

    loop, other_line, elsewhere = (
        (view.__code__, 10, 12),
        (view.__code__, 20, 14),
        (helper.__code__, 4, 3),
    )
    queries = (
        [query("SELECT * FROM c WHERE p = ?", elsewhere, loop) for _ in range(6)]
        + [query("SELECT * FROM c WHERE p = ?", other_line) for _ in range(5)]
        + [query("SELECT * FROM d WHERE id = ?", loop) for _ in range(4)]
        + [query("SAVEPOINT sa_1", loop) for _ in range(9)]
        + [query("SELECT * FROM c WHERE p IN (?, ?, ?)", loop) for _ in range(7)]
        + [query(f"SELECT * FROM e WHERE id = {i}") for i in range(5)]
    )
    for minimum in (2, 5, 6):
        expected = _repeats(queries, minimum)
        assert repeats(queries, minimum) == expected
        assert [(f, len(g)) for f, g in expected] == [
            (f, n)
            for f, n in [
                ("SELECT * FROM c WHERE p=?", 6),
                ("SELECT * FROM c WHERE p=?", 5),
                ("SELECT * FROM d WHERE id=?", 4),
                ("SELECT * FROM e WHERE id=?", 5),
            ]
            if n >= minimum
        ]
    # 2N+1 (two shapes interleaved, row after row), and many groups in a shuffled
    # request: each group keeps its queries in order, groups in first-seen order.
    rows = [query("SELECT * FROM a WHERE id = ?", loop) for _ in range(1)]
    for _ in range(8):
        rows += [
            query("SELECT * FROM c WHERE p = ?", loop),
            query("SELECT * FROM d WHERE p = ?", loop),
        ]
    many = [
        query(f"SELECT * FROM t{i % 97} WHERE id = ?", (view.__code__, 1, 10 + i % 5))
        for i in range(3000)
    ]
    random.Random(7).shuffle(many)
    for case in (rows, many, rows + many + rows):
        for minimum in (1, 5, 8, 40):
            assert repeats(case, minimum) == _repeats(case, minimum)
    assert [len(g) for _, g in repeats(rows, 5)] == [8, 8]


@pytest.mark.parametrize(
    ("log_format", "compiled"), [("console", True), ("console", False), ("json", True)]
)
def test_a_prepared_finding_line_is_the_line_the_logger_writes(log_format, compiled):
    """The N+1 detector logs a repeating finding through ``EventLog.prepare``: each
    line must be exactly what ``warning()`` writes for the same fields (quoting,
    braces, escapes, None, bools, NaN, key order), timestamps aside; console lines
    both in C (perfagent/_perrequest.c) and in Python."""
    import io

    from perfagent.export import logs
    from perfagent.export.logs import VARIES, make_logger

    if log_format == "console" and compiled:
        assert logs.PreparedLine is not None, "perfagent/_perrequest.c was not built"
    stream = io.StringIO()
    log = make_logger(log_format, stream, compiled=compiled)
    fixed = {
        "route": "/items/{item_id}",
        "method": "GET",
        "fingerprint": "SELECT name FROM item WHERE id=? AND n='{x}' é \\ \"q\"",
        "callsite": None,
        "advice": 'fetch "them" together\nbefore the loop',
    }
    varies = ("count", "total_ms", "trace_id", "distinct_parameters")
    emit = log.prepare("warning", "n_plus_one", **fixed, **dict.fromkeys(varies, VARIES))
    cases = [
        (10, 0.047, "ab" * 16, 10),
        (3, 12.5, 'cd é"x', None),
        (True, float("nan"), None, [1, "a"]),
        ("a few", -0.0, "ef" * 16, "x 'y'"),  # text where numbers go: quoted as usual
        (2**70, float("inf"), "ab" * 16, -5),  # an int past 64 bits, a negative one
        (-1, 1e22, "é", 1e-7),  # floats that repr writes with an exponent
    ]
    for values in cases:
        emit(*values)
        log.warning("n_plus_one", **fixed, **dict(zip(varies, values, strict=True)))
    lines = [
        re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "TIME", line) for line in stream.getvalue().splitlines()
    ]
    assert len(lines) == 2 * len(cases)
    for prepared, generic in zip(lines[0::2], lines[1::2], strict=True):
        assert prepared == generic


def test_the_compiled_line_has_the_python_lines_timestamp():
    """_perrequest.PreparedLine against ConsoleLine's Python render at the same instant:
    the same date, second and microseconds, across second and year boundaries, with a
    varying first part (the line's date is made once a second, so each instant is
    rendered after a different one); and a wrong number of values is refused."""
    from perfagent.export.logs import VARIES, ConsoleLine

    fields = {"advice": VARIES, "count": VARIES, "route": "/r"}
    compiled = ConsoleLine(False, True).prepare("warning", "n_plus_one", fields)
    python = ConsoleLine(False, False).prepare("warning", "n_plus_one", fields)
    assert type(compiled).__name__ == "PreparedLine"
    instants = [0.0, 0.5, 59.999999, 1767225599.9999995, 1767225600.0, 1763700000.123456]
    instants += [1763700000 + i / 7 for i in range(30)]
    for now in instants + instants[::-1]:
        values = ("a b" if now % 2 < 1 else "ab", int(now))
        assert compiled(now, values) == python(now, values)
    with pytest.raises(ValueError):
        compiled(1.0, (1,))


def test_the_compiled_query_histogram_matches_the_python_one():
    """_speedups.observe_queries against RequestStats' Python loop: the same buckets
    (bounds included, as bisect_left puts them) and sums, per (system, operation)."""
    from perfagent.db.capture import Query
    from perfagent.db.fingerprint import Fingerprints
    from perfagent.export import stats as stats_module
    from perfagent.export.metrics import DB_BUCKETS
    from perfagent.export.stats import Buffered, RequestStats

    assert stats_module._observe_queries is not None, "perfagent/_speedups.c was not built"

    shape = Fingerprints()
    durations = [0.0, 0.0004, 0.0005, 0.00051, 0.003, 0.3, 1.0, 9.99, 10.0, 42.0]
    statements = ["SELECT 1", "INSERT INTO t VALUES (?)", "SELECT 2", "UPDATE t SET a=?"]
    queries = [
        Query(system, sql, shape(sql), None, 0.0, duration, 0, (), None)
        for system in ("sqlite", "postgresql")
        for sql in statements
        for duration in durations
    ]
    tables = []
    for compiled in (False, True):
        stats = RequestStats(None, [Buffered(None, DB_BUCKETS) for _ in range(4)])
        stats.compiled = compiled
        for request in (queries, queries[:7]):  # slot 2: the queries' durations
            stats.request_ended("GET", ("GET", "/r", 200), 0.1, ("/r",), request, -1.0)
        tables.append(stats.buffer().tables[2])
    python, c = tables
    assert c == python
    select = python[("sqlite", "SELECT")]  # two statements, then the first seven again
    assert len(python) == 6 and select[-1] == pytest.approx(2 * sum(durations) + sum(durations[:7]))
    assert sum(select[:-1]) == 27 and select[0] == 3 * 3  # 0, 0.0004, 0.0005 (a bound is le)


def test_counts_from_many_threads_reach_the_counter_once_each():
    """RequestStats.count (the N+1 counter, per thread and lock-free) against the
    prometheus-client counter it feeds: exact after each flush, never added twice."""
    import threading

    from prometheus_client import CollectorRegistry, Counter

    from perfagent.export.stats import RequestStats

    counter = Counter("c", "c", ["http_route"], registry=CollectorRegistry())
    stats = RequestStats(None, [])
    routes = [counter.labels("/a"), counter.labels("/b")]

    def work() -> None:
        for n in range(1000):
            stats.count(routes[n % 2])

    for rounds in (1, 2):
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats.flush()
        stats.flush()
        assert [child._value.get() for child in routes] == [2000.0 * rounds] * 2
    for _ in range(3):  # one thread, counting between flushes
        for _ in range(10):
            stats.count(routes[0])
        stats.flush()
    assert routes[0]._value.get() == 4030.0


def test_the_compiled_group_summary_matches_the_python_one():
    """_speedups.summary against _summary: distinct parameter sets (APSW's queries
    carry none), identical repeats, the lazy-loaded attribute, the total; and
    NotImplemented, for the Python fallback, on parameters that cannot be hashed."""
    from perfagent._speedups import summary

    from perfagent.db.capture import Query
    from perfagent.db.fingerprint import Fingerprints
    from perfagent.detectors.nplusone import _summary

    shape = Fingerprints()

    def query(params, system="sqlite", lazy=None, sql="SELECT * FROM c WHERE p = ?"):
        return Query(system, sql, shape(sql), params, 0.0, 0.0013, 0, (), lazy)

    groups = {
        "one per item": [query((i,)) for i in range(6)],
        "identical": [query((7,)) for _ in range(6)],
        "apsw, no parameters": [query(None) for _ in range(6)],
        "postgresql, no parameters": [query(None, "postgresql") for _ in range(6)],
        "some known": [query((1,)), *[query(None) for _ in range(5)]],
        "lazy load": [query((i,), lazy="Post.comments" if i > 1 else None) for i in range(6)],
        "inlined values": [query(None, sql=f"SELECT * FROM c WHERE p = {i}") for i in range(6)],
        # Equal statements that are not one object, as statements built at run time are.
        "built statements": [query((7,), sql="".join(["SELECT * ", "FROM c"])) for _ in range(6)],
        "nan is never equal": [query((float("nan"),)) for _ in range(6)],
        "many distinct among repeats": [query((i % 37, "x")) for i in range(1000)],
    }
    for name, group in groups.items():
        assert summary(group) == _summary(group), name
    assert summary(groups["identical"])[:2] == (1, True)
    assert summary(groups["apsw, no parameters"])[:2] == (None, False)
    assert summary(groups["lazy load"])[2] == "Post.comments"
    unhashable = [query([i]) for i in range(6)]
    assert summary(unhashable) is NotImplemented
    assert _summary(unhashable)[:2] == (6, False)


def test_a_query_is_none_of_the_garbage_collectors_work():
    """A captured query is not an object the garbage collector counts or tracks: a
    request's queries, held until it ends, no longer bring the next young collection
    nearer (as the tuple per query did, one count each). Its parts of atoms (the
    row's parameters, its Shape, its sites) are untracked by the C hook; parameters
    that hold a list stay tracked, by the list itself."""
    import gc
    import sqlite3

    import perfagent
    from perfagent.db import drivers
    from perfagent.record import RequestRecord, current

    assert drivers.SqlHook is not None, "perfagent/_speedups.c was not built by pip install"
    perfagent.init(metrics_port=0, console_url="http://127.0.0.1:9", compiled_hooks=True)
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER, name TEXT)")
    conn.execute("INSERT INTO t VALUES (1, 'a')")
    cursor = conn.cursor()  # one cursor: no cursor objects made per query
    rows = [(i,) for i in range(100)]  # held by the test, with or without a request

    def view(record: RequestRecord | None) -> None:
        token = current.set(record)
        try:
            first = conn.execute("SELECT id FROM t").fetchone()
            conn.execute("SELECT name FROM t WHERE id = ?", first).fetchone()
            conn.execute("SELECT name FROM t WHERE id = ?", [1]).fetchone()
            for row in rows:
                cursor.execute("SELECT name FROM t WHERE id = ?", row).fetchone()
        finally:
            current.reset(token)

    view(RequestRecord("GET", 0.0, None))  # the first time: shapes and sites cached
    record = RequestRecord("GET", 0.0, None)
    gc.disable()
    try:
        before = gc.get_count()[0]
        view(None)
        outside = gc.get_count()[0] - before
        before = gc.get_count()[0]
        view(record)
        inside = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert len(record.queries) == 103
    # The three conn.execute cursors may leave weak references behind (sqlite3 prunes
    # its list of them now and then): a margin of a few, against 100 queries held.
    assert abs(inside - outside) <= 5, (inside, outside)
    first, by_row, by_list = record.queries[:3]
    assert by_row.params == (1,) and by_list.params == [1]
    for query in record.queries:
        assert not gc.is_tracked(query), query
    for query in (first, by_row):
        assert not gc.is_tracked(query.shape) and not gc.is_tracked(query.sites)
    assert not gc.is_tracked(by_row.params)
    assert gc.is_tracked(by_list.params)
    conn.close()


@pytest.mark.skipif(
    not (3, 11) <= sys.version_info[:2] <= (3, 13),
    reason="frames are objects from the start before 3.11; 3.14's are read through them",
)
def test_the_hook_reads_the_callers_frame_and_sites_without_making_objects():
    """From 3.11 a function's frame has no frame object until something asks for
    one; the C hook reads the interpreter's frame instead (code, offset, line), so no
    frame object is made for the view (one in flight per frame per request, counted
    toward the next young collection, and copied into when the function returns),
    and its sites are the same. Nor is a site made again: the walk up from a query
    outside a loop reuses the site tuple it made for that line before. A frame object
    or a tuple counts one in the collector's young generation when it is made, as
    the cursor and rows here do not."""
    import gc
    import sqlite3

    import perfagent
    from perfagent.db import drivers
    from perfagent.record import RequestRecord, current

    assert drivers.SqlHook is not None, "perfagent/_speedups.c was not built by pip install"
    perfagent.init(metrics_port=0, console_url="http://127.0.0.1:9", compiled_hooks=True)
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER, name TEXT)")
    cursor = conn.cursor()  # one cursor: no cursor objects made per query
    rows = [(i,) for i in range(6)]
    made: list[int] = []

    def view(record: RequestRecord | None) -> None:
        token = current.set(record)
        try:
            before = gc.get_count()[0]
            cursor.execute("SELECT id FROM t")  # not in a loop: the walk goes up the stack
            for row in rows:
                cursor.execute("SELECT name FROM t WHERE id = ?", row)
            made.append(gc.get_count()[0] - before)
        finally:
            current.reset(token)

    record, earlier = RequestRecord("GET", 0.0, None), RequestRecord("GET", 0.0, None)
    try:
        view(earlier)  # the first time: shapes and sites cached
        view(earlier)
        gc.disable()
        try:
            view(None)
            view(record)
        finally:
            gc.enable()
    finally:
        conn.close()
        perfagent.shutdown()
    outside, inside = made[2:]
    assert inside == outside, (inside, outside)
    code = view.__code__
    first = next(q for q in record.queries if q.sql == "SELECT id FROM t").sites[0]
    loop = record.queries[1].sites[0]
    assert first[0] is code and loop[0] is code
    assert loop[2] == first[2] + 2  # the line of each cursor.execute
    assert all(q.sites == record.queries[1].sites for q in record.queries[2:])
    # The walk up from the query outside the loop reads each code and line once: its
    # sites are the ones it found before, not new ones (_speedups.c: site_of).
    again = next(q for q in earlier.queries[7:] if q.sql == "SELECT id FROM t").sites
    assert first is again[0]


def test_an_installed_script_is_not_the_apps_code():
    """``bin/uvicorn`` (a console script of an installed package) heads the stack of a
    loop that idles: a callsite there would name no line of the app. The app's own
    files, here this test file, stay the app's."""
    import os
    import sysconfig

    from perfagent.db.callsite import AppFrames

    frames = AppFrames()
    # This environment's own script, as perfagent run starts it (PATH may hold another
    # one, such as a pyenv shim, when the venv is not activated).
    assert not frames.is_app_file(os.path.join(sysconfig.get_path("scripts"), "uvicorn"))
    assert not frames.is_app_file(os.path.join(sysconfig.get_path("scripts"), "gunicorn"))
    assert frames.is_app_file(__file__)
