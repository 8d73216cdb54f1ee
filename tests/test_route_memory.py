"""What a route costs: the agent's memory per route against prometheus-client's own.

A real Flask app with 2,000 routes, each requested once, under ``perfagent run``;
the baseline is the same app recording one prometheus-client histogram by method,
route and status itself (multiprocess mode, as under ``perfagent run``), measured
in the same test. The agent keeps two histograms a route (request duration and
queries per request) and must cost no more than that one.
"""

from __future__ import annotations

import time

import requests
from helpers import PERFAGENT, clean_env, free_port, wait_for_counts

ROUTES = 2000
WARM = 20


def _growth_per_route(server) -> float:
    """RSS growth per route, in bytes, over ROUTES - WARM routes requested once each."""
    with requests.Session() as session:
        for i in range(WARM):
            assert session.get(f"{server.base}/r{i}/1", timeout=10).status_code == 200
        time.sleep(1.0)
        before = session.get(server.base + "/rss", timeout=10).json()["rss_kb"]
        for i in range(WARM, ROUTES):
            assert session.get(f"{server.base}/r{i}/1", timeout=10).status_code == 200
        time.sleep(1.0)  # merged into the metrics meanwhile
        after = session.get(server.base + "/rss", timeout=10).json()["rss_kb"]
    return (after - before) * 1024 / (ROUTES - WARM)


def test_a_route_costs_less_than_a_prometheus_client_histogram(servers, tmp_path):
    port = free_port()
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = clean_env(
        PORT=str(port),
        ROUTES=str(ROUTES),
        PROMETHEUS_ONLY="1",
        PROMETHEUS_MULTIPROC_DIR=str(directory),
    )
    baseline = servers(["python", "routes_app.py"], port, env)
    baseline.wait_listening()
    prometheus_only = _growth_per_route(baseline)
    baseline.stop()

    port, metrics_port = free_port(), free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", str(metrics_port), "--"]
    env = clean_env(PORT=str(port), ROUTES=str(ROUTES), PERFAGENT_CONSOLE_URL="http://127.0.0.1:9")
    server = servers([*argv, "python", "routes_app.py"], port, env)
    server.wait_listening()
    agent = _growth_per_route(server)

    assert agent <= prometheus_only, (agent, prometheus_only)
    counted = wait_for_counts(metrics_port, ROUTES + 2)
    assert all(counted[("GET", f"/r{i}/<int:n>", "200")] == 1 for i in range(ROUTES)), counted
