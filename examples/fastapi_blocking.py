"""Blocking calls in ``async def`` routes, each with its fixed twin.

    perfagent run -- uvicorn --app-dir examples fastapi_blocking:app

Request http://127.0.0.1:8000/blocking/sleep (or /cpu, /db) and the agent logs
``event_loop_blocked`` naming the route and the line below that blocked the
loop; http://127.0.0.1:9464/metrics counts it in
``perfagent_event_loop_blocks_total``. The ``/fixed/...`` twins do the same
work without stopping the loop, and are never flagged.
"""

import asyncio
import sqlite3
import time

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

app = FastAPI(title="perfagent example: blocking the event loop")

REPORT = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 2000000) "
REPORT += "SELECT count(*) FROM n"


def crunch(seconds: float = 0.3) -> int:
    """CPU work in plain Python: holds the loop for as long as it runs."""
    deadline, spins = time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline:
        spins += 1
    return spins


def run_report() -> int:
    """A slow query through a sync driver."""
    with sqlite3.connect(":memory:") as conn:
        return conn.execute(REPORT).fetchone()[0]


@app.get("/")
async def home():
    return {
        "blocking": ["/blocking/sleep", "/blocking/cpu", "/blocking/db"],
        "fixed": ["/fixed/sleep", "/fixed/cpu", "/fixed/db"],
    }


@app.get("/blocking/sleep")
async def blocking_sleep():
    time.sleep(0.3)  # blocks every request on this worker for 300 ms
    return {"slept": 0.3}


@app.get("/fixed/sleep")
async def fixed_sleep():
    await asyncio.sleep(0.3)  # the loop serves other requests meanwhile
    return {"slept": 0.3}


@app.get("/blocking/cpu")
async def blocking_cpu():
    return {"spins": crunch()}


@app.get("/fixed/cpu")
async def fixed_cpu():
    # In a worker thread the loop keeps going (the GIL is still shared: for
    # long CPU work use a process pool).
    return {"spins": await run_in_threadpool(crunch)}


@app.get("/blocking/db")
async def blocking_db():
    return {"rows": run_report()}


@app.get("/fixed/db")
async def fixed_db():
    # Or an async driver (aiosqlite, asyncpg, psycopg's AsyncConnection).
    return {"rows": await asyncio.to_thread(run_report)}


@app.get("/sync/sleep")
def sync_endpoint():
    # A plain ``def`` endpoint runs in the thread pool: not a loop block.
    time.sleep(0.3)
    return {"slept": 0.3}
