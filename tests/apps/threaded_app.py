"""Flask app for thread-per-request servers: what the agent keeps per thread."""

import os
import time

from flask import Flask

app = Flask(__name__)


@app.get("/hello")
def hello():
    return "hello"


@app.get("/buffers")
def buffers():
    """The agent's per-thread buffers kept now, and the fastest of twenty merges in ms."""
    import perfagent

    stats = perfagent._state["agent"].metrics.stats
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        stats.flush()
        best = min(best, time.perf_counter() - start)
    return {"buffers": len(stats._buffers), "flush_ms": best * 1000, "pid": os.getpid()}


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
