"""FastAPI app for the event-loop watchdog tests: routes that block the loop, and some that don't.

Lines marked ``# block: NAME`` are the callsites the tests expect; the tests
read their numbers from this file.
"""

import asyncio
import json
import os
import re
import sqlite3
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fastapi import FastAPI

app = FastAPI()


class _SlowHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(0.25)
        body = json.dumps({"slow": True}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


_slow_server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
threading.Thread(target=_slow_server.serve_forever, daemon=True).start()
SLOW_URL = f"http://127.0.0.1:{_slow_server.server_address[1]}/"


@app.get("/pid")
async def pid():
    return {"pid": os.getpid()}


@app.get("/ok")
async def ok():
    return {"ok": True}


# -- must be flagged ---------------------------------------------------------


def _took(wall0: float, cpu0: float, **fields) -> dict:
    """What the block took by its own clocks: the tests compare the reported duration
    with these, never with a fixed figure (a loaded machine stretches the wall time)."""
    return {"wall": time.perf_counter() - wall0, "cpu": time.thread_time() - cpu0, **fields}


@app.get("/sleep")
async def sleep_in_async_route():
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    time.sleep(0.2)  # block: sleep
    return _took(wall0, cpu0, slept=0.2)


COUNT_TO = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
COUNT_TO += "SELECT count(*) FROM c"


@app.get("/sqlite")
async def sync_sqlite_in_async_route():
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    conn = sqlite3.connect(":memory:")
    cursor = conn.execute(COUNT_TO, (2_000_000,))  # block: sqlite
    (count,) = cursor.fetchone()
    conn.close()
    return _took(wall0, cpu0, count=count)


@app.get("/cpu")
async def cpu_in_async_route():
    # 200 ms of this thread's CPU: what the watchdog reports, even on a busy machine
    # (where 200 ms of wall time may hold much less CPU, the rest spent waiting for a core).
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    deadline = cpu0 + 0.2
    spins = 0
    while time.thread_time() < deadline:  # block: cpu
        spins += 1
    return _took(wall0, cpu0, spins=spins)


@app.get("/regex")
async def regex_holding_the_gil(n: int = 25):
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    matched = re.match(r"(a+)+$", "a" * n + "b")  # block: regex
    return _took(wall0, cpu0, matched=matched is not None)


@app.get("/library")
async def sync_http_call_in_async_route():
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    with urllib.request.urlopen(SLOW_URL, timeout=5) as response:  # block: library
        return _took(wall0, cpu0, **json.loads(response.read()))


HOG_TOOK: list[dict] = []


def _hog():
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    time.sleep(0.25)  # block: callback
    HOG_TOOK.append(_took(wall0, cpu0))


@app.get("/callback-took")
async def callback_took():
    return HOG_TOOK[-1] if HOG_TOOK else {}


@app.get("/callback")
async def schedules_a_blocking_callback():
    asyncio.get_running_loop().call_soon(_hog)
    return {"scheduled": True}


@app.get("/wait")
async def waits_politely(seconds: float = 0.6):
    await asyncio.sleep(seconds)
    return {"waited": seconds}


# An app whose HTTP middleware (BaseHTTPMiddleware) runs the endpoint in a task of its own.
behind_middleware = FastAPI()


@behind_middleware.middleware("http")
async def passthrough(request, call_next):
    return await call_next(request)


@behind_middleware.get("/sleep")
async def sleep_behind_middleware():
    time.sleep(0.2)  # block: middleware
    return {"slept": 0.2}


app.mount("/mw", behind_middleware)


# -- must not be flagged -----------------------------------------------------


@app.get("/async-sleep")
async def async_sleep():
    await asyncio.sleep(1)
    return {"slept": 1}


@app.get("/to-thread")
async def blocking_work_in_a_thread():
    await asyncio.to_thread(time.sleep, 0.3)
    return {"slept": 0.3}


@app.get("/short")
async def short_block():
    time.sleep(0.04)
    return {"slept": 0.04}


@app.get("/sync-sleep")
def sync_endpoint_sleeps(seconds: float = 0.3):
    time.sleep(seconds)  # a def endpoint: runs in the thread pool, not on the loop
    return {"slept": seconds}


async def _short_task():
    time.sleep(0.003)


_running: set = set()


@app.get("/saturate")
async def many_short_callbacks(tasks: int = 150):
    for _ in range(tasks):
        task = asyncio.ensure_future(_short_task())
        _running.add(task)
        task.add_done_callback(_running.discard)
    return {"tasks": tasks}
