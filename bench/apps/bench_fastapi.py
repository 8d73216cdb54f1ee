"""FastAPI app served by the benchmark: /hello, and a route issuing 11 SQLite queries."""

import os
import sqlite3
import tempfile

from fastapi import FastAPI

DB = os.path.join(tempfile.gettempdir(), f"perfagent-bench-{os.getpid()}.sqlite")
app = FastAPI()

if os.environ.get("BENCH_INSTRUMENTATOR"):
    from prometheus_fastapi_instrumentator import Instrumentator

    Instrumentator().instrument(app).expose(app)


def _connect() -> sqlite3.Connection:
    conn = sqlite3.connect(DB, check_same_thread=False)
    conn.execute("CREATE TABLE IF NOT EXISTS item (id INTEGER PRIMARY KEY, name TEXT)")
    if conn.execute("SELECT count(*) FROM item").fetchone()[0] == 0:
        conn.executemany("INSERT INTO item VALUES (?, ?)", [(i, f"item {i}") for i in range(100)])
        conn.commit()
    return conn


CONN = _connect()


@app.get("/hello")
async def hello():
    return {"hello": "world"}


@app.get("/items/{item_id}")
async def item(item_id: int):
    return {"item": item_id}


@app.get("/queries")
def queries():
    rows = CONN.execute("SELECT id FROM item ORDER BY id LIMIT 10").fetchall()
    names = [CONN.execute("SELECT name FROM item WHERE id = ?", row).fetchone()[0] for row in rows]
    return {"names": names}
