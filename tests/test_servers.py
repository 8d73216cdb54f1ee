"""Every framework under every server command: exact counts, right routes and statuses."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import requests
from helpers import PERFAGENT, clean_env, free_port, wait_for_counts

FASTAPI = [
    ("GET", "/hello", "/hello", "200"),
    ("GET", "/items/7", "/items/{item_id}", "200"),
    ("POST", "/items", "/items", "200"),
    ("GET", "/api/v1/users/3", "/api/v1/users/{user_id}", "200"),
    ("GET", "/sub/ping/2", "/sub/ping/{n}", "200"),
    ("GET", "/legacy/users/5", "/legacy/users/<int:uid>", "200"),
    ("GET", "/items/abc", "/items/{item_id}", "422"),
    ("GET", "/fail", "/fail", "500"),
    ("GET", "/no/such/path", "", "404"),
]
FLASK = [
    ("GET", "/hello", "/hello", "200"),
    ("GET", "/users/3", "/users/<int:uid>", "200"),
    ("GET", "/shop/items/tea", "/shop/items/<name>", "200"),
    ("GET", "/things/4", "/things/<int:tid>", "200"),
    ("POST", "/things/4", "/things/<int:tid>", "200"),
    ("GET", "/fail", "/fail", "500"),
    ("GET", "/no/such/path", "", "404"),
]
FASTHTML = [
    ("GET", "/", "/", "200"),
    ("GET", "/todos/3", "/todos/{tid}", "200"),
    ("GET", "/no/such/path", "", "404"),
]

CASES = [
    ("fastapi", "uvicorn fastapi_app:app --port {port}", FASTAPI),
    ("fastapi", "uvicorn fastapi_app:app --port {port} --workers 2", FASTAPI),
    (
        "fastapi",
        "gunicorn -k uvicorn.workers.UvicornWorker -w 2 -b 127.0.0.1:{port} fastapi_app:app",
        FASTAPI,
    ),
    ("fastapi", "hypercorn fastapi_app:app -b 127.0.0.1:{port} -w 2", FASTAPI),
    ("fastapi", "fastapi run fastapi_app.py --host 127.0.0.1 --port {port}", FASTAPI),
    ("fasthtml", "uvicorn fasthtml_app:app --port {port} --workers 2", FASTHTML),
    (
        "fasthtml",
        "gunicorn -k uvicorn.workers.UvicornWorker -w 2 -b 127.0.0.1:{port} fasthtml_app:app",
        FASTHTML,
    ),
    ("fasthtml", "hypercorn fasthtml_app:app -b 127.0.0.1:{port}", FASTHTML),
    ("flask", "gunicorn -w 4 -b 127.0.0.1:{port} flask_app:app", FLASK),
    ("flask", "gunicorn -w 2 --threads 4 -b 127.0.0.1:{port} flask_app:app", FLASK),
    ("flask", "flask --app flask_app run --port {port}", FLASK),
    ("flask", "python flask_app.py", FLASK),
    ("flask", "hypercorn flask_app:app -b 127.0.0.1:{port}", FLASK),
]
REPEAT = 3


def _send(base: str, plan: list) -> Counter:
    sent: Counter = Counter()
    for _ in range(REPEAT):
        for method, path, route, status in plan:
            # A new connection each time, so requests spread over the workers.
            response = requests.request(method, base + path, timeout=30)
            assert str(response.status_code) == status, (path, response.status_code)
            assert response.headers.get("server-timing", "").startswith("total;dur=")
            sent[(method, route, status)] += 1
    return sent


@pytest.mark.parametrize(
    ("framework", "command", "plan"),
    CASES,
    ids=[f"{c[0]}: {c[1].split()[0]}-{i}" for i, c in enumerate(CASES)],
)
def test_exact_counts_per_route_under_each_server(servers, framework, command, plan):
    port, metrics_port = free_port(), free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", str(metrics_port), "--"]
    argv += command.format(port=port).split()
    if argv[-2:] == ["python", "flask_app.py"]:
        argv[-2] = "python3"
    server = servers(argv, port, clean_env(PORT=str(port)))
    server.wait_listening()

    sent = _send(server.base, plan)
    counted = wait_for_counts(metrics_port, sum(sent.values()))

    assert counted == sent, server.output()[-3000:]


def test_random_404_paths_add_no_series(servers):
    port, metrics_port = free_port(), free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", str(metrics_port), "--"]
    server = servers([*argv, "uvicorn", "fastapi_app:app", "--port", str(port)], port, clean_env())
    server.wait_listening()
    with requests.Session() as session:
        for i in range(1000):
            session.get(f"{server.base}/{os.urandom(6).hex()}/{i}", timeout=10)
    counted = wait_for_counts(metrics_port, 1000)
    assert counted == Counter({("GET", "", "404"): 1000})


def test_init_in_code_serves_its_own_metrics(servers):
    port, metrics_port = free_port(), free_port()
    env = clean_env(
        PERFAGENT_METRICS_PORT=str(metrics_port), PERFAGENT_CONSOLE_URL="http://127.0.0.1:9"
    )
    server = servers(["uvicorn", "init_app:app", "--port", str(port)], port, env)
    server.wait_listening()
    for i in range(7):
        assert server.get(f"/orders/{i}").headers["server-timing"].startswith("total;dur=")
    # Served in-process: every scrape merges what was recorded, so it is exact at once.
    assert wait_for_counts(metrics_port, 7, timeout=5) == Counter(
        {("GET", "/orders/{order_id}", "200"): 7}
    )
