"""The app bench/stress.py drives: each route pushes the agent one way an app can.

Sync endpoints, so requests run on the thread pool's threads; each thread has its
own sqlite3 connection to one file. The collector's threshold is low, and most
requests leave garbage in reference cycles whose finalizers issue statements (new
ones too): collections, and the finalizers, then run anywhere, inside the agent's
query hooks included.
"""

from __future__ import annotations

import contextvars
import gc
import os
import sqlite3
import threading

from fastapi import FastAPI
from starlette.responses import PlainTextResponse
from starlette.routing import Route

DB = os.environ["STRESS_DB"]
ROUTES = int(os.environ.get("STRESS_ROUTES", "10000"))
BIG = int(os.environ.get("STRESS_BIG_BYTES", str(1 << 20)))
gc.set_threshold(int(os.environ.get("STRESS_GC_THRESHOLD", "50")), 5, 5)

_local = threading.local()


def conn() -> sqlite3.Connection:
    """This thread's connection (a forked child makes its own)."""
    connection = getattr(_local, "conn", None)
    if connection is None or getattr(_local, "pid", None) != os.getpid():
        connection = _local.conn = sqlite3.connect(DB, timeout=30)
        _local.pid = os.getpid()
    return connection


with sqlite3.connect(DB) as setup:
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE IF NOT EXISTS post (id INTEGER PRIMARY KEY, title TEXT)")
    setup.executemany(
        "INSERT OR IGNORE INTO post VALUES (?, ?)", [(i, f"post {i}") for i in range(100)]
    )

app = FastAPI()


class Finalized:
    """Garbage in a cycle; its finalizer issues statements, one of them new text (a new
    entry in the fingerprint cache)."""

    runs = 0

    def __init__(self) -> None:
        self.cycle = self

    def __del__(self) -> None:
        Finalized.runs += 1
        c = conn()
        c.execute("SELECT title FROM post WHERE id = ?", (Finalized.runs % 100,)).fetchone()
        c.execute(f"SELECT {Finalized.runs} FROM post WHERE id = -1").fetchall()


@app.get("/q")
def queries() -> dict:
    """An N+1 of 20 indexed queries, two finalizers left behind."""
    c = conn()
    titles = [c.execute("SELECT title FROM post WHERE id = ?", (i,)).fetchone() for i in range(20)]
    Finalized()
    Finalized()
    return {"n": len(titles)}


@app.get("/inline/{i}")
def inline(i: int) -> dict:
    """Literals inlined: ten statements the fingerprint cache has not seen (it fills)."""
    c = conn()
    for j in range(10):
        c.execute(f"SELECT title FROM post WHERE id = {i * 10 + j}").fetchone()
    Finalized()
    return {"i": i}


@app.get("/big/{i}")
def big(i: int) -> dict:
    """One statement of STRESS_BIG_BYTES (1 MiB), a different one each time."""
    sql = f"SELECT length('{'x' * BIG}') + {i}"
    (length,) = conn().execute(sql).fetchone()
    return {"length": length}


@app.get("/many/{n}")
def many(n: int) -> dict:
    """n queries in one request (200,000)."""
    cursor = conn().cursor()
    for i in range(n):
        cursor.execute("SELECT ?", (i,))
    return {"n": n}


@app.get("/dyn/{i}")
def dynamic(i: int) -> dict:
    """A query from code made now (as templates are): new code objects, at new lines,
    which the hook's caches keep and let go."""
    lines = [
        "def view(c):",
        *["    pass"] * (i % 50),
        "    return c.execute('SELECT 1').fetchone()",
    ]
    source = "\n".join(lines) + "\n"
    namespace: dict = {}
    exec(compile(source, f"{os.path.dirname(__file__)}/dyn_{i % 500}.py", "exec"), namespace)
    namespace["view"](conn())
    Finalized()
    return {"i": i}


@app.get("/threads")
def threads() -> dict:
    """Four threads of the request's own, each issuing 25 queries in its context."""

    def work() -> None:
        c = sqlite3.connect(DB, timeout=30)
        try:
            for i in range(25):
                c.execute("SELECT title FROM post WHERE id = ?", (i,)).fetchone()
                if i % 5 == 0:
                    Finalized()
        finally:
            c.close()

    started = [
        threading.Thread(target=contextvars.copy_context().run, args=(work,)) for _ in range(4)
    ]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()
    return {"threads": len(started)}


@app.get("/fork")
def fork() -> dict:
    """A fork inside a request: the agent's fork hooks run in both processes, the child
    works a little and exits. It stays off sqlite3: a fork copies a mutex of SQLite's
    held by another thread at that moment, and the child would wait on it for good
    (the whole app then waited on the database)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            sum(len(str(i)) for i in range(10_000))
        except BaseException:
            code = 1
        os._exit(code)
    for _ in range(300):  # 30 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"status": status}
        threading.Event().wait(0.1)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return {"status": "hung"}


@app.get("/stats")
def stats() -> dict:
    return {"finalizers": Finalized.runs, "pid": os.getpid()}


def _route(k: int):
    def handler(request) -> PlainTextResponse:
        conn().execute("SELECT title FROM post WHERE id = ?", (k % 100,)).fetchone()
        return PlainTextResponse(str(k))

    return handler


# ROUTES route templates, as plain Starlette routes (FastAPI's took ~1 ms each to add).
app.router.routes.extend(Route(f"/route{k}/{{x}}", _route(k)) for k in range(ROUTES))
