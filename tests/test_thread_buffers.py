"""Thread-per-request servers: a thread's stats buffer goes when the thread ends.

``flask run`` and ``app.run(threaded=True)`` serve each connection on a new thread;
a buffer kept per thread for good made 30,000 buffers for 30,000 requests and a
once-a-second merge that grew with them. Real server, real connections, one each.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import PERFAGENT, clean_env, free_port, wait_for_counts

MANY = 3000


def _hello(base: str, count: int) -> None:
    def one(_: int) -> int:
        # A new connection each time: the dev server starts a thread per connection.
        response = requests.get(base + "/hello", headers={"Connection": "close"}, timeout=30)
        return response.status_code

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(one, range(count))) == {200}


@pytest.mark.parametrize(
    ("command", "compiled"),
    [("flask --app threaded_app run --port {port}", "1"), ("python threaded_app.py", "0")],
    ids=["flask-run-compiled", "app-run-python"],
)
def test_buffers_of_ended_threads_are_merged_and_dropped(servers, command, compiled):
    port, metrics_port = free_port(), free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", str(metrics_port), "--"]
    argv += command.format(port=port).split()
    env = clean_env(PORT=str(port), PERFAGENT_COMPILED_HOOKS=compiled)
    server = servers(argv, port, env)
    server.wait_listening()

    _hello(server.base, 30)
    small = server.get("/buffers").json()
    _hello(server.base, MANY)
    large = server.get("/buffers").json()

    # Kept: the threads alive or just ending, not one per request served.
    assert large["buffers"] <= 40, (small, large)
    # The merge does not grow with the requests served (fastest of twenty each time;
    # measured before: 0.05 ms after 30 requests, 7.2 ms after 3,030).
    assert large["flush_ms"] < 10 * small["flush_ms"], (small, large)
    counted = wait_for_counts(metrics_port, MANY + 32)
    assert counted[("GET", "/hello", "200")] == MANY + 30, server.output()[-3000:]
    assert counted[("GET", "/buffers", "200")] == 2
