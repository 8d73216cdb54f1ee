"""Flask app whose one route issues as many SQLite queries as asked, in one request."""

import os
import resource
import sqlite3
import tracemalloc

from flask import Flask

app = Flask(__name__)


@app.get("/hello")
def hello():
    return "hello"


@app.get("/queries/<int:count>")
def queries(count):
    """``count`` queries in a loop, then this process's peak RSS so far (KiB)."""
    conn = sqlite3.connect(":memory:")
    for i in range(count):
        conn.execute("SELECT ?", (i,)).fetchone()
    conn.close()
    return {"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


@app.get("/traced/<int:count>")
def traced(count):
    """``count`` queries in a loop; the memory Python allocated meanwhile and still holds
    at its end, in bytes (tracemalloc: the queries the agent keeps for the request)."""
    conn = sqlite3.connect(":memory:")
    tracemalloc.start()
    try:
        for i in range(count):
            conn.execute("SELECT ?", (i,)).fetchone()
        return {"held": tracemalloc.get_traced_memory()[0]}
    finally:
        tracemalloc.stop()
        conn.close()


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
