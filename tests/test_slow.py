"""Slow requests explained: the line where the time went, flame graphs, profiles on demand."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import requests
from helpers import APPS, PERFAGENT, Server, clean_env, free_port
from test_console import poll

TOKEN = "profile-token-0123456789"


def marks(name: str) -> set[str]:
    """The lines tagged ``# MARK name`` (a hot loop's time is spread over its lines)."""
    lines = (APPS / "slow_app.py").read_text().splitlines()
    found = {
        f"slow_app.py:{number}"
        for number, line in enumerate(lines, start=1)
        if line.rstrip().endswith(f"# MARK {name}")
    }
    assert found, name
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A console, and the slow app under `perfagent run` sending to it."""
    console_port, port = free_port(), free_port()
    db = tmp_path_factory.mktemp("console") / "c.db"
    console = Server(
        [*PERFAGENT, "console", "--port", str(console_port), "--db", str(db)],
        console_port,
        clean_env(),
    )
    argv = [*PERFAGENT, "run", "--metrics-port", "0", "--console-url", console.base]
    argv += ["--slow-ms", "300", "--log-format", "json", "--"]
    argv += ["uvicorn", "slow_app:app", "--port", str(port)]
    env = clean_env(
        PERFAGENT_TRACE_SAMPLE="0",
        PERFAGENT_PROFILE_TOKEN=TOKEN,
        PERFAGENT_SLOW_ROUTES="/slow/lenient=2000",
    )
    app = None
    try:
        # The console first: a runner that finds no console at its URL starts one
        # of its own there (on the default database), which this test would then read.
        console.wait_listening()
        app = Server(argv, port, env)
        app.wait_listening()
        yield console, app
    finally:
        if app is not None:
            app.stop()
        console.stop()


def slow_events(app: Server, route: str, expect: int = 1) -> list[dict]:
    deadline = time.monotonic() + 10
    while True:
        events = [
            json.loads(line)
            for line in app.output().splitlines()
            if line.startswith("{") and '"slow_request"' in line
        ]
        events = [e for e in events if e["route"] == route]
        if len(events) >= expect or time.monotonic() > deadline:
            return events
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("route", "line"),
    [("/slow/async-helper", "pause"), ("/slow/sync-helper", "nap"), ("/slow/cpu", "burn")],
)
def test_slow_request_names_the_line_where_the_time_went(stack, route, line):
    _console, app = stack
    assert app.get(route).status_code == 200
    (event,) = slow_events(app, route)
    assert event["duration_ms"] >= 450 and event["threshold_ms"] == 300
    assert event["callsite"] in marks(line), event


def test_a_route_threshold_overrides_the_default(stack):
    _console, app = stack
    assert app.get("/slow/lenient").status_code == 200  # 0.5 s, under its own 2 s
    assert slow_events(app, "/slow/lenient", expect=0) == []


def test_fast_requests_are_not_reported(stack):
    _console, app = stack
    for _ in range(20):
        assert app.get("/fast").status_code == 200
    assert slow_events(app, "/fast", expect=0) == []


def test_flame_graph_of_a_cpu_bound_route_names_the_hot_function(stack):
    console, app = stack
    assert app.get("/slow/cpu").status_code == 200
    params = {"service": "slow_app", "route": "/slow/cpu", "method": "GET"}
    stacks = poll(
        lambda: requests.get(console.base + "/api/flamegraph", params=params, timeout=5).json()[
            "stacks"
        ],
        lambda found: sum(found.values()) >= 20,
    )
    hot = sum(n for s, n in stacks.items() if s.split(";")[-1].startswith("burn (slow_app.py)"))
    assert hot / sum(stacks.values()) > 0.8, stacks
    collapsed = requests.get(
        console.base + "/api/flamegraph", params={**params, "fmt": "collapsed"}, timeout=5
    ).text
    assert all(line.rsplit(" ", 1)[1].isdigit() for line in collapsed.strip().splitlines())
    page = requests.get(console.base + "/route", params=params, timeout=5).text
    assert '<svg class="flame"' in page and "burn (slow_app.py)" in page


def test_profile_header_works_with_the_token_and_not_without(stack):
    console, app = stack
    route = "/slow/lenient"  # 0.5 s, under its own 2 s threshold: only a profile keeps it
    answers = [
        app.get(route, headers={"x-perfagent-profile": TOKEN}),
        app.get(route, headers={"x-perfagent-profile": "wrong-token-0123456789"}),
        app.get(route),
    ]
    assert {tuple(sorted(k for k in r.headers if k != "server-timing")) for r in answers} == {
        tuple(sorted(k for k in answers[2].headers if k != "server-timing"))
    }, "a wrong or missing token must change nothing the client can see"
    profiled = [
        json.loads(line)
        for line in app.output().splitlines()
        if line.startswith("{") and '"request_profiled"' in line and route in line
    ]
    assert len(profiled) == 1 and profiled[0]["samples"] >= 5
    trace_id = profiled[0]["trace_id"]
    trace = poll(
        lambda: requests.get(f"{console.base}/api/traces/{trace_id}", timeout=5),
        lambda r: r.status_code == 200,
    ).json()
    (event,) = [e for s in trace["spans"] for e in s["events"] if e["name"] == "profile"]
    assert event["attributes"]["route"] == route
    kept = requests.get(console.base + "/api/requests", params={"route": route}, timeout=5)
    assert [r["trace_id"] for r in kept.json()] == [trace_id]
    assert f"/traces/{trace_id}" in requests.get(console.base + "/profiles", timeout=5).text
    trace_page = requests.get(f"{console.base}/traces/{trace_id}", timeout=5).text
    assert '<svg class="flame"' in trace_page and "slow_lenient (slow_app.py)" in trace_page


def test_timed_and_span_become_child_spans(stack):
    console, app = stack
    response = app.get("/timed", headers={"x-perfagent-profile": TOKEN})  # keeps its trace
    assert response.status_code == 200
    time.sleep(0.2)
    profiled = [
        json.loads(line)
        for line in app.output().splitlines()
        if line.startswith("{") and '"request_profiled"' in line and '"/timed"' in line
    ]
    trace = poll(
        lambda: requests.get(f"{console.base}/api/traces/{profiled[-1]['trace_id']}", timeout=5),
        lambda r: r.status_code == 200,
    ).json()
    children = {s["name"]: s for s in trace["spans"] if s["kind"] == 1}  # INTERNAL
    assert set(children) == {"load", "render"}
    server = next(s for s in trace["spans"] if s["kind"] == 2)
    assert all(c["parent_span_id"] == server["span_id"] for c in children.values())
    # asyncio.sleep(0.01) may end a little early (the loop runs timers due within
    # its clock resolution, and epoll waits in whole ms); time.sleep never does.
    assert children["load"]["duration_ms"] >= 9 and children["render"]["duration_ms"] >= 5


def test_perfagent_profile_writes_svg_and_speedscope(servers, tmp_path):
    port = free_port()
    app = servers(
        ["python3", "-m", "uvicorn", "slow_app:app", "--port", str(port)], port, clean_env()
    )
    app.wait_listening()
    pid = app.get("/pid").json()["pid"]
    svg, speedscope = tmp_path / "p.svg", tmp_path / "p.json"
    for output, fmt in ((svg, "flamegraph"), (speedscope, "speedscope")):
        load = subprocess.Popen(
            [
                "python3",
                "-c",
                f"import requests\nfor _ in range(6): requests.get('{app.base}/slow/cpu')",
            ]
        )
        result = subprocess.run(
            [
                *PERFAGENT,
                "profile",
                "--pid",
                str(pid),
                "--duration",
                "2",
                "--format",
                fmt,
                "-o",
                str(output),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        load.wait(30)
        assert result.returncode == 0, result.stderr
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    assert "burn" in svg.read_text()
    data = json.loads(speedscope.read_text())
    assert "speedscope" in data["$schema"] and data["profiles"]

    wrong = subprocess.run(
        [*PERFAGENT, "profile", "--pid", "999999", "--duration", "1", "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert wrong.returncode != 0 and len(wrong.stderr.strip().splitlines()) == 1


def test_a_route_whose_p95_jumps_is_reported_as_a_regression(servers):
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", "0", "--log-format", "json", "--"]
    env = clean_env(PERFAGENT_REGRESSION_WINDOW_S="1", PERFAGENT_SLOW_MS="5000")
    app = servers([*argv, "uvicorn", "slow_app:app", "--port", str(port)], port, env)
    app.wait_listening()
    with requests.Session() as session:
        # Usual windows of quick requests: three full ones are needed, and the first
        # window may be short or partly spent starting up on a busy machine.
        deadline = time.monotonic() + 6.5
        while time.monotonic() < deadline:
            session.get(app.base + "/variable")
    with ThreadPoolExecutor(30) as pool:  # then a window of 0.15 s answers
        list(pool.map(lambda _: requests.get(app.base + "/variable?delay=0.15"), range(120)))

    def regressions() -> list[dict]:
        return [
            json.loads(line)
            for line in app.output().splitlines()
            if line.startswith("{") and '"latency_regression"' in line
        ]

    found = poll(regressions, bool, timeout=5)
    assert len(found) == 1, app.output()[-3000:]
    (event,) = found
    assert event["route"] == "/variable" and event["method"] == "GET"
    assert event["p95_ms"] >= 100 and event["usual_p95_ms"] < 50
    assert event["window_s"] == 1 and event["requests"] >= 20


def test_the_console_can_ask_a_running_server_for_a_profile(servers, tmp_path):
    console_port, port = free_port(), free_port()
    console = servers(
        [*PERFAGENT, "console", "--port", str(console_port), "--db", str(tmp_path / "c.db")],
        console_port,
        clean_env(),
    )
    console.wait_listening()
    argv = [*PERFAGENT, "run", "--metrics-port", "0", "--console-url", console.base, "--"]
    argv += ["uvicorn", "slow_app:app", "--port", str(port), "--workers", "2"]
    app = servers(argv, port, clean_env())
    app.wait_listening()

    asked = requests.post(console.base + "/api/profiles", json={"seconds": 3}, timeout=5).json()
    assert requests.post(console.base + "/api/profiles", json={"seconds": 999}).status_code == 422
    started = time.monotonic()
    while time.monotonic() - started < 8:  # keep the workers busy while py-spy records
        app.get("/slow/cpu")
    done = poll(
        lambda: requests.get(console.base + "/api/profiles", timeout=5).json(),
        lambda rows: rows and rows[0]["status"] in ("done", "failed"),
        timeout=30,
    )
    assert done[0]["id"] == asked["id"] and done[0]["status"] == "done", done
    page = requests.get(f"{console.base}/profiles/{asked['id']}", timeout=5).text
    assert '<svg class="flame"' in page and "burn" in page


def test_a_collector_that_hangs_delays_neither_samples_nor_log_lines(tmp_path):
    """Every request is exported (sample 1) to a collector that accepts connections
    and never answers, so each post waits out its timeout. The slow requests must
    still be sampled (their line named) and logged at once: exports wait on a
    thread of their own."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def hang() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=hang, daemon=True).start()
    port = free_port()
    collector = f"http://127.0.0.1:{listener.getsockname()[1]}"
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", "0", "--console-url", collector]
    argv += ["--slow-ms", "300", "--log-format", "json", "--"]
    argv += ["uvicorn", "slow_app:app", "--port", str(port)]
    app = Server(argv, port, clean_env(PERFAGENT_TRACE_SAMPLE="1"))
    try:
        app.wait_listening()
        assert app.get("/fast").status_code == 200
        time.sleep(1.0)  # its trace is being posted: the post now waits for an answer
        assert held, "the agent never reached the collector"
        for route, line in [("/slow/sync-helper", "nap"), ("/slow/cpu", "burn")]:
            assert app.get(route).status_code == 200
            answered = time.monotonic()
            (event,) = slow_events(app, route)
            assert time.monotonic() - answered < 1.5, "the log line waited on the export"
            assert event["callsite"] in marks(line), event
    finally:
        app.stop()
        listener.close()
        for connection in held:
            connection.close()
