"""The line an N+1 is reported at, and what is none.

The loop's line, in async code (loops over awaited helpers, ``async for``,
``while``), comprehensions and tasks the app gathers too; a Jinja template's own
line; APSW's identical repeats are duplicates and fastlite's schema reads no finding.
Real apps under ``perfagent run`` (uvicorn, ``flask run``), real SQLite (and
PostgreSQL where it answers), each served twice: with the C hooks and walk of the
call site and with the Python ones (``PERFAGENT_COMPILED_HOOKS=0``); both must give
the same answer.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import requests
from helpers import APPS, PERFAGENT, Server, clean_env, free_port, postgres_answers

from perfagent.db.loops import loop_ranges

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def mark(name: str, module: str) -> str:
    """``file:LINE`` of the line tagged ``# MARK name`` in a test app (or template)."""
    for number, line in enumerate((APPS / module).read_text().splitlines(), start=1):
        if line.rstrip().endswith((f"# MARK {name}", f"MARK {name} #}}")):
            return f"{module}:{number}"
    raise LookupError(name)


def serve(tmp_path_factory, app: str, compiled: str, server: str = "uvicorn") -> Server:
    """``app`` under ``perfagent run -- uvicorn`` (or ``flask run``), this interpreter's:
    the test may run in a venv of each Python whose packages the ``uvicorn`` on PATH
    would not see."""
    port = free_port()
    db = tmp_path_factory.mktemp("db") / "app.sqlite"
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", "0", "--log-format", "json"]
    if server == "flask":
        argv += ["--", sys.executable, "-m", "flask", "--app", app, "run", "--port", str(port)]
    else:
        argv += ["--", sys.executable, "-m", "uvicorn", app, "--port", str(port)]
    env = clean_env(
        DB_PATH=str(db),
        PG_DSN=PG_DSN,
        PERFAGENT_NPLUSONE_MIN="5",
        PERFAGENT_COMPILED_HOOKS=compiled,
    )
    process = Server(argv, port, env)
    try:
        process.wait_listening()
    except AssertionError:
        process.stop()
        raise
    return process


def events(server: Server, route: str, expect: int = 1, timeout: float = 8.0) -> list[dict]:
    """The N+1 and duplicate findings logged for ``route`` (logged just after the reply)."""
    deadline = time.monotonic() + (timeout if expect else 1.0)
    while True:
        found = [
            event
            for line in server.output().splitlines()
            if line.startswith("{") and '"event"' in line
            for event in [json.loads(line)]
            if event["event"] in ("n_plus_one", "duplicate_query") and event["route"] == route
        ]
        if (expect and len(found) >= expect) or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


def get(server: Server, path: str) -> None:
    response = server.get(path)
    assert response.status_code == 200, (path, response.text[:500], server.output()[-3000:])


@pytest.fixture(scope="module", params=["1", "0"], ids=["c-walk", "python-walk"])
def async_app(request, tmp_path_factory):
    server = serve(tmp_path_factory, "async_loop_app:app", request.param)
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/orm/loop", "orm-loop"),
        ("/orm/gather", "orm-gather"),
        ("/aiosqlite/loop", "aiosqlite-loop"),
        ("/aiosqlite/async-for", "aiosqlite-while"),
        ("/sync-in-async/gather", "sync-gather"),
        pytest.param(
            "/pg/asyncpg-loop",
            "asyncpg-comprehension",
            marks=pytest.mark.skipif(not postgres_answers(PG_DSN), reason="no PostgreSQL answers"),
        ),
    ],
)
def test_async_repeats_are_reported_at_the_loop_line(async_app, path, name):
    get(async_app, path)
    found = events(async_app, path)
    assert [(e["event"], e["callsite"]) for e in found] == [
        ("n_plus_one", mark(name, "async_loop_app.py"))
    ], async_app.output()[-3000:]


def test_a_task_a_library_makes_is_no_loop(async_app):
    """Starlette's BaseHTTPMiddleware (under the app's own middleware) runs the view
    in a task anyio makes: the same query from five lines of the view stays five
    places, none of them a repeat, not one repeat at the middleware's line."""
    get(async_app, "/orm/five-lines")
    assert events(async_app, "/orm/five-lines", expect=0) == []


# -- what the bytecode says is a loop, on the running Python ------------------------

SOURCE = """
def sync(s, authors):
    for a in authors:
        try:
            qa(a)
        except E:
            qb()
    q1()
    with s:
        q2()
    try:
        q3()
    except E:
        for z in s:
            qc()
    q4()
    while x:
        with s:
            qd()
    q5()
    y = [qe(i) for i in authors]
    q6(*(qf(i) for i in authors))
    q7()

async def coroutine(s, authors):
    await q1()
    async for b in s:
        await qa(b)
    await q2()
    while True:
        await qb()
        if s:
            break
    await q3()
    for a in authors:
        await qc(a)
    await q4()
    async with s:
        await q5()
    r = [await qd(i) for i in authors]
    await q6(*[qe(i) for i in authors])
    await q7()
"""


def _calls_in_loops(code) -> dict[str, bool]:
    """Each ``q...()`` called in ``code`` or its comprehensions -> whether the offset
    of its call lies in a loop of the code object that makes it."""
    import dis

    found: dict[str, bool] = {}
    for inner in [code, *(c for c in code.co_consts if hasattr(c, "co_code"))]:
        ranges = loop_ranges(inner)
        names: list[str] = []  # loaded, not called yet (q6's arguments call qe first)
        for instruction in dis.get_instructions(inner):
            opname = instruction.opname
            if opname == "LOAD_GLOBAL" and str(instruction.argval).startswith("q"):
                names.append(instruction.argval)
            elif names and opname.startswith("CALL") and not opname.startswith("CALL_INTR"):
                found[names.pop()] = any(a <= instruction.offset <= b for a, b in ranges)
    return found


def test_the_bytecode_tells_loops_from_awaits_withs_and_handlers():
    """A loop's body and a comprehension are loops; an ``await`` (a SEND loop from
    3.11), the code after a ``with`` or a ``try`` (jumped back to from the end of the
    code from 3.12) and after an ``async for`` are not."""
    module = compile(SOURCE, "app.py", "exec")
    codes = {c.co_name: c for c in module.co_consts if hasattr(c, "co_code")}
    in_loop = {"qa", "qb", "qc", "qd", "qe", "qf"}
    for name in ("sync", "coroutine"):
        found = _calls_in_loops(codes[name])
        assert found == {q: q in in_loop for q in found}, (name, sys.version, found)
        assert set(found) >= {
            "qa",
            "qb",
            "qc",
            "qd",
            "qe",
            "q1",
            "q2",
            "q3",
            "q4",
            "q5",
            "q6",
            "q7",
        }


# -- APSW (fastlite) ------------------------------------------------------------------


@pytest.fixture(scope="module", params=["1", "0"], ids=["c-hooks", "python-hooks"])
def fastlite_app(request, tmp_path_factory):
    server = serve(tmp_path_factory, "fastlite_app:app", request.param)
    yield server
    server.stop()


def test_fastlites_update_route_is_no_finding(fastlite_app):
    """Six identical sqlite_master reads and five PRAGMA table_info in one update,
    no loop: not an N+1 (nor a duplicate: schema introspection is the library's)."""
    response = requests.post(fastlite_app.base + "/todos/3?title=three", timeout=30)
    assert response.status_code == 200, (response.text[:500], fastlite_app.output()[-3000:])
    get(fastlite_app, "/titles")  # logged after: once it is, the update's would be too
    events(fastlite_app, "/titles")
    assert events(fastlite_app, "/todos/{tid}", expect=0) == []


def test_a_loop_over_apsw_is_one_n_plus_one_at_the_loop_line(fastlite_app):
    """Each ``todos[tid]`` reads the schema too: one finding for the loop, not three."""
    before = len(events(fastlite_app, "/titles", expect=0))
    get(fastlite_app, "/titles")
    found = events(fastlite_app, "/titles", expect=before + 1)[before:]
    assert [(e["event"], e["callsite"], e["count"]) for e in found] == [
        ("n_plus_one", mark("titles", "fastlite_app.py"), 8)
    ], fastlite_app.output()[-3000:]
    assert "sqlite_master" not in found[0]["fingerprint"]


@pytest.mark.parametrize(("path", "name"), [("/same", "same"), ("/same-bound", "same-bound")])
def test_identical_apsw_repeats_are_duplicates(fastlite_app, path, name):
    """APSW's bindings are captured (exec_trace): the same statement with the same
    bindings (or none) six times is one query repeated, not one per item."""
    get(fastlite_app, path)
    found = events(fastlite_app, path)
    assert [(e["event"], e["callsite"], e["count"]) for e in found] == [
        ("duplicate_query", mark(name, "fastlite_app.py"), 6)
    ], fastlite_app.output()[-3000:]


# -- Jinja templates ------------------------------------------------------------------


@pytest.fixture(scope="module", params=["1", "0"], ids=["c-walk", "python-walk"])
def jinja_app(request, tmp_path_factory):
    server = serve(tmp_path_factory, "flask_jinja_app", request.param, server="flask")
    yield server
    server.stop()


def _string_template_line() -> int:
    source = (APPS / "flask_jinja_app.py").read_text()
    return int(source.split("STRING_LAZY_LINE = ")[1].split()[0])


@pytest.mark.parametrize(
    ("path", "callsite"),
    [
        ("/authors", mark("file-lazy", "templates/authors.html")),
        ("/authors-string", f"<template>:{_string_template_line()}"),
    ],
)
def test_a_lazy_load_in_a_template_loop_is_reported_at_the_templates_line(
    jinja_app, path, callsite
):
    """Flask-SQLAlchemy lazy-loads ``author.books`` once per row of a ``{% for %}``:
    the template's own line, not the line of the module Jinja compiled it to."""
    get(jinja_app, path)
    found = events(jinja_app, path)
    assert [(e["event"], e["callsite"], e["count"]) for e in found] == [
        ("n_plus_one", callsite, 8)
    ], jinja_app.output()[-3000:]
    assert "Author.books" in found[0]["advice"]
