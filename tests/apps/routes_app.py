"""Flask app with ROUTES distinct routes (``/r{i}/<int:n>``), and this process's RSS."""

import os

from flask import Flask

app = Flask(__name__)


def _view(n):
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
