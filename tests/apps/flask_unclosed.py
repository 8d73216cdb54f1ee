"""A Flask test-client suite whose responses are never closed, run under the agent.

Usage: python flask_unclosed.py FEW MANY IDLE_S. Werkzeug's test client, like
others, never calls ``close()`` on the response it returns; a test reads the body
(or not) and drops the response. Prints one JSON line: what the agent counted
(requests, N+1 findings), traced memory after FEW and after MANY requests, and
the CPU the agent's own thread burnt in IDLE_S seconds of idleness after each.
"""

from __future__ import annotations

import gc
import json
import sqlite3
import sys
import threading
import time
import tracemalloc
from pathlib import Path

from flask import Flask
from prometheus_client import generate_latest

import perfagent
from perfagent.export.metrics import serving_registry

app = Flask(__name__)
db: sqlite3.Connection  # opened once the agent runs: its hook sees connections made after


def open_db() -> None:
    global db
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.execute("create table item (id integer primary key, name text)")
    db.executemany("insert into item values (?, ?)", [(i, f"item {i}") for i in range(10)])


@app.get("/items")
def items():
    # One query per item: an N+1 the agent reports on every request.
    names = [db.execute("select name from item where id = ?", (i,)).fetchone()[0] for i in range(8)]
    return {"names": names}


@app.get("/hello")
def hello():
    return "hello"


def thread_cpu(native_id: int) -> float:
    """CPU seconds a thread of this process has run, from /proc (ns resolution)."""
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0]) / 1e9


def agent_thread_cpu(idle_s: float) -> float:
    """The agent thread's CPU over ``idle_s`` seconds in which no request runs."""
    thread = next(t for t in threading.enumerate() if t.name == "perfagent")
    before = thread_cpu(thread.native_id)
    time.sleep(idle_s)
    return thread_cpu(thread.native_id) - before


def run(client, count: int) -> None:
    for index in range(count):
        response = client.get("/items" if index % 2 else "/hello")
        assert response.status_code == 200
        if index % 4 == 1:
            assert len(response.get_json()["names"]) == 8  # body read, never closed
        # otherwise the body is never read: dropped with the response


def main() -> None:
    few, many, idle_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    perfagent.init(app, metrics_port=0, trace_sample=0)
    open_db()
    client = app.test_client()
    tracemalloc.start()
    run(client, few)
    gc.collect()
    memory_few = tracemalloc.get_traced_memory()[0]
    cpu_few = agent_thread_cpu(idle_s)
    run(client, many - few)
    gc.collect()
    memory_many = tracemalloc.get_traced_memory()[0]
    cpu_many = agent_thread_cpu(idle_s)
    text = generate_latest(serving_registry(perfagent._state["agent"].metrics, None)).decode()
    counted = nplusone = 0.0
    for line in text.splitlines():
        if line.startswith("http_server_request_duration_seconds_count{"):
            counted += float(line.rsplit(" ", 1)[1])
        elif line.startswith("perfagent_n_plus_one_total{"):
            nplusone += float(line.rsplit(" ", 1)[1])
    print(
        json.dumps(
            {
                "counted": counted,
                "n_plus_one": nplusone,
                "in_flight": len(perfagent._state["agent"].inflight),
                "memory_few": memory_few,
                "memory_many": memory_many,
                "cpu_few": cpu_few,
                "cpu_many": cpu_many,
            }
        )
    )
    perfagent.shutdown()


if __name__ == "__main__":
    main()
