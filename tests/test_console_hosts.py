"""The console against DNS rebinding: on loopback without a token, only its own host names."""

from __future__ import annotations

import subprocess

import pytest
import requests
from helpers import PERFAGENT, clean_env, free_port
from test_console import _span_request, start_console

PROTO = {"content-type": "application/x-protobuf"}


def get(console, path: str, host: str | None = None, **kwargs) -> requests.Response:
    headers = {"host": host} if host else {}
    return requests.get(console.base + path, headers=headers, timeout=5, **kwargs)


def test_a_rebound_host_name_is_refused(servers, tmp_path):
    console = start_console(servers, tmp_path)
    port = console.port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::2]"):
        answer = get(console, "/api/health", host)
        assert answer.status_code == 421, (host, answer.text)
        assert get(console, "/", host).status_code == 421
        assert get(console, "/routes", host).status_code == 421
    posted = requests.post(
        console.base + "/v1/traces",
        data=_span_request().SerializeToString(),
        headers={**PROTO, "host": "evil.example"},
        timeout=5,
    )
    assert posted.status_code == 421
    assert get(console, "/api/requests").json() == [], "nothing stored from a refused host"

    for host in (
        None,  # requests sends 127.0.0.1:PORT, as the agent's exporter does
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        "localhost",
        f"LOCALHOST:{port}",
        f"[::1]:{port}",
        "[::1]",
        f"127.0.0.2:{port}",
    ):
        assert get(console, "/api/health", host).status_code == 200, host


def test_configured_host_names_are_answered(servers, tmp_path):
    port = free_port()
    argv = [*PERFAGENT, "console", "--port", str(port), "--db", str(tmp_path / "c.db")]
    argv += ["--allowed-host", "console.example", "--allowed-host", "Other.Example:8080"]
    env = clean_env(PERFAGENT_CONSOLE_ALLOWED_HOSTS="from-env.example, also.example")
    console = servers(argv, port, env)
    console.wait_listening()
    for host in ("console.example", "console.example:443", "other.example:1", "also.example"):
        assert get(console, "/api/health", host).status_code == 200, host
    assert get(console, "/api/health", "from-env.example").status_code == 200
    assert get(console, "/api/health", "evil.example").status_code == 421
    assert get(console, "/api/health", f"127.0.0.1:{port}").status_code == 200


def test_api_docs_are_served_only_when_asked(servers, tmp_path):
    console = start_console(servers, tmp_path)
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert get(console, path).status_code == 404, path
    asked = start_console(servers, tmp_path / "docs", "--docs")
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert get(asked, path).status_code == 200, path


@pytest.mark.parametrize("token", ["short", "fifteen-chars-1"])
def test_off_loopback_a_short_token_fails_at_start_in_one_line(token):
    result = subprocess.run(
        [*PERFAGENT, "console", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(PERFAGENT_CONSOLE_TOKEN=token),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "at least 16 characters" in lines[0], result.stderr
    assert token not in result.stderr, "the token itself is never printed"


def test_off_loopback_with_a_token_any_host_name_may_ask(servers, tmp_path):
    port = free_port()
    token = "a-token-of-sixteen+"
    argv = [*PERFAGENT, "console", "--host", "0.0.0.0", "--port", str(port)]
    console = servers([*argv, "--db", str(tmp_path / "c.db")], port, clean_env())
    # Without the token in the environment the console refuses to start; with it, it serves.
    assert console.proc.wait(30) == 2
    console = servers(
        [*argv, "--db", str(tmp_path / "c.db")], port, clean_env(PERFAGENT_CONSOLE_TOKEN=token)
    )
    console.wait_listening()
    bearer = {"authorization": f"Bearer {token}"}
    assert get(console, "/api/health", "console.example").status_code == 401
    answer = requests.get(
        console.base + "/api/health", headers={**bearer, "host": "console.example"}, timeout=5
    )
    assert answer.status_code == 200
