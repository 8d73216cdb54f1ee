"""``perfagent run``: loading, settings, signals, exit codes, reloaders, the console."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from helpers import APPS, PERFAGENT, clean_env, free_port, scrape, wait_for_counts


def _run(*args: str, env: dict | None = None, cwd: Path = APPS, timeout: float = 60):
    return subprocess.run(
        [*PERFAGENT, "run", *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_agent_is_loaded_and_the_users_sitecustomize_still_runs(tmp_path):
    user_site = tmp_path / "usersite"
    user_site.mkdir()
    marker = tmp_path / "marker"
    (user_site / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    probe = "import sys, perfagent; print('agent', perfagent._state['agent'] is not None)"
    env = clean_env(PYTHONPATH=str(user_site))
    result = _run("--no-console", "--metrics-port", "0", "--", "python3", "-c", probe, env=env)
    assert result.returncode == 0, result.stderr
    assert "agent True" in result.stdout
    assert marker.read_text() == "ran"


def test_bad_setting_fails_at_start_with_one_line_naming_it(tmp_path):
    marker = tmp_path / "started"
    env = clean_env(PERFAGENT_SLOW_MS="abc")
    result = _run("--", "python3", "-c", f"open({str(marker)!r}, 'w')", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "PERFAGENT_SLOW_MS" in lines[0], result.stderr
    assert not marker.exists(), "the command must not start with a bad setting"


def test_bad_option_names_the_option():
    result = _run("--metrics-port", "99999", "--", "true")
    assert result.returncode == 2
    assert "metrics_port" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_exit_code_is_the_commands():
    result = _run(
        "--no-console", "--metrics-port", "0", "--", "python3", "-c", "raise SystemExit(7)"
    )
    assert result.returncode == 7


def test_missing_command_is_a_clear_error():
    result = _run("--no-console", "--metrics-port", "0", "--", "no-such-command-here")
    assert result.returncode == 127
    assert "no-such-command-here" in result.stderr


def test_disabled_agent_leaves_the_app_untouched(servers):
    port, metrics_port = free_port(), free_port()
    argv = [*PERFAGENT, "run", "--metrics-port", str(metrics_port), "--"]
    argv += ["uvicorn", "fastapi_app:app", "--port", str(port)]
    server = servers(argv, port, clean_env(PERFAGENT_ENABLED="0"))
    server.wait_listening()
    response = server.get("/agent")
    assert response.json()["perfagent_loaded"] is False
    assert "server-timing" not in response.headers
    with pytest.raises(requests.ConnectionError):
        scrape(metrics_port)


def test_sigterm_to_the_runner_ends_the_server_as_if_it_ran_alone(servers):
    codes = []
    for wrapper in ([], [*PERFAGENT, "run", "--no-console", "--metrics-port", "0", "--"]):
        port = free_port()
        server = servers(
            [*wrapper, "uvicorn", "fastapi_app:app", "--port", str(port)], port, clean_env()
        )
        server.wait_listening()
        assert server.get("/hello").status_code == 200
        started = time.monotonic()
        codes.append(server.stop(signal.SIGTERM))
        assert time.monotonic() - started < 10
        assert "Shutting down" in server.output()
    bare, wrapped = codes
    assert wrapped == bare  # uvicorn re-raises SIGTERM after its graceful shutdown: -15


def test_sigint_is_forwarded_once(servers):
    port = free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", "0", "--"]
    argv += ["gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "flask_app:app"]
    server = servers(argv, port, clean_env())
    server.wait_listening()
    assert server.stop(signal.SIGINT) == 0, server.output()
    assert server.output().count("Handling signal: int") == 1


@pytest.mark.parametrize(
    ("command", "app_file"),
    [
        ("uvicorn fastapi_app:app --reload --port {port}", "fastapi_app.py"),
        ("flask --app flask_app run --debug --port {port}", "flask_app.py"),
    ],
    ids=["uvicorn-reload", "flask-debug"],
)
def test_reloaded_app_keeps_the_agent(servers, tmp_path, command, app_file):
    for name in ("fastapi_app.py", "flask_app.py"):
        (tmp_path / name).write_text((APPS / name).read_text())
    port, metrics_port = free_port(), free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", str(metrics_port), "--"]
    server = servers(argv + command.format(port=port).split(), port, clean_env(), cwd=tmp_path)
    server.wait_listening()
    first = server.get("/agent").json()
    assert first["perfagent_loaded"] is True

    source = tmp_path / app_file
    source.write_text(source.read_text() + "\n# touched\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            second = server.get("/agent").json()
            if second["pid"] != first["pid"]:
                break
        except requests.RequestException:
            pass
        time.sleep(0.3)
    else:
        pytest.fail(f"the app was not reloaded:\n{server.output()}")
    assert second["perfagent_loaded"] is True
    for _ in range(5):
        assert server.get("/hello").status_code == 200
    # The /agent polling above adds an unknown number of requests: wait for /hello itself.
    deadline = time.monotonic() + 15
    hello = 0
    while time.monotonic() < deadline and hello < 5:
        hello = wait_for_counts(metrics_port, 1)[("GET", "/hello", "200")]
        time.sleep(0.2)
    assert hello == 5


def test_console_is_started_and_stopped_with_the_run(servers):
    port, console_port = free_port(), free_port()
    url = f"http://127.0.0.1:{console_port}"
    argv = [*PERFAGENT, "run", "--console-url", url, "--metrics-port", "0", "--"]
    argv += ["uvicorn", "fastapi_app:app", "--port", str(port)]
    server = servers(argv, port, clean_env())
    server.wait_listening()
    deadline = time.monotonic() + 20
    health = None
    while time.monotonic() < deadline and health is None:
        try:
            health = requests.get(url + "/api/health", timeout=2).json()
        except requests.RequestException:
            time.sleep(0.2)
    assert health is not None and health["status"] == "ok", server.output()
    assert f"console at {url}" in server.output()
    server.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/api/health", timeout=2)


def test_streams_and_background_tasks_are_timed_right(servers):
    port, metrics_port = free_port(), free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", str(metrics_port)]
    argv += ["--slow-ms", "500", "--log-format", "json", "--"]
    argv += ["uvicorn", "fastapi_app:app", "--port", str(port)]
    server = servers(argv, port, clean_env())
    server.wait_listening()
    assert server.get("/sse?events=4&gap=0.4").text.count("data:") == 4
    assert server.get("/background?seconds=1.0").status_code == 200
    assert server.get("/sleep?seconds=0.6").status_code == 200
    wait_for_counts(metrics_port, 3)
    time.sleep(1.2)  # the background task finishes after its response

    sums = {
        s.labels["http_route"]: s.value
        for s in scrape(metrics_port)
        if s.name == "http_server_request_duration_seconds_sum"
    }
    assert sums["/sse"] >= 1.2, "a stream is timed to its last byte"
    assert sums["/background"] < 0.5, "a background task is not the request's time"
    slow = [
        json.loads(line)
        for line in server.output().splitlines()
        if line.startswith("{") and '"slow_request"' in line
    ]
    assert [event["route"] for event in slow] == ["/sleep"], server.output()
    event = slow[0]
    assert event["method"] == "GET" and event["status"] == 200
    assert event["duration_ms"] >= 600 and event["threshold_ms"] == 500
    assert len(event["trace_id"]) == 32
    slow_counter = Counter(
        {
            s.labels["http_route"]: s.value
            for s in scrape(metrics_port)
            if s.name == "perfagent_slow_requests_total"
        }
    )
    assert slow_counter == Counter({"/sleep": 1.0})


def test_server_timing_can_be_turned_off(servers):
    port = free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", "0", "--no-server-timing", "--"]
    server = servers([*argv, "uvicorn", "fastapi_app:app", "--port", str(port)], port, clean_env())
    server.wait_listening()
    assert "server-timing" not in server.get("/hello").headers
