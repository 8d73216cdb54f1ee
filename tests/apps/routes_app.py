"""Flask app with ROUTES distinct routes (``/r{i}/<int:n>``), and this process's RSS.

With PROMETHEUS_ONLY=1 (run without the agent, PROMETHEUS_MULTIPROC_DIR set) each
request is observed in one prometheus-client histogram by method, route and status,
the way an app instrumented by hand would: the baseline of what a route costs.
"""

import os

from flask import Flask, request

app = Flask(__name__)
_histogram = None
if os.environ.get("PROMETHEUS_ONLY") == "1":
    from prometheus_client import Histogram

    _histogram = Histogram(
        "http_server_request_duration_seconds",
        "Duration of HTTP server requests, from arrival to the last byte sent.",
        ["http_request_method", "http_route", "http_response_status_code"],
        buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10),
    )


def _view(n):
    if _histogram is not None:
        _histogram.labels("GET", request.url_rule.rule, "200").observe(0.001)
    return "ok"


for _i in range(int(os.environ.get("ROUTES", "1000"))):
    app.add_url_rule(f"/r{_i}/<int:n>", f"r{_i}", _view)


@app.get("/rss")
def rss():
    """Resident memory of this process now, in KiB, and its pid."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return {"rss_kb": int(line.split()[1]), "pid": os.getpid()}
    return {"rss_kb": 0, "pid": os.getpid()}


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
