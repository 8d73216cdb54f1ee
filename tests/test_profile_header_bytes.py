"""The profile header under WSGI: any bytes a client sends are compared, never raised on."""

from __future__ import annotations

import json
import time

import requests
from helpers import PERFAGENT, clean_env, free_port

TOKEN = "jeton-sécurisé-0123456789"  # printable, and not ASCII


def profiled(output: str) -> list[dict]:
    return [
        json.loads(line)
        for line in output.splitlines()
        if line.startswith("{") and '"request_profiled"' in line
    ]


def test_non_ascii_profile_header_neither_fails_nor_profiles_a_flask_request(servers):
    port = free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", "0", "--log-format", "json"]
    argv += ["--", "flask", "--app", "flask_app", "run", "--port", str(port)]
    app = servers(argv, port, clean_env(PERFAGENT_PROFILE_TOKEN=TOKEN))
    app.wait_listening()
    for value in (b"\xff\xfe\x00garbage", "wrong-sécurisé-0123456789".encode(), b"\xc3"):
        response = requests.get(app.base + "/hello", headers={"x-perfagent-profile": value})
        assert (response.status_code, response.text) == (200, "hello"), app.output()[-2000:]
    assert profiled(app.output()) == []

    # The token's own UTF-8 bytes ask for a profile, as they do under ASGI.
    response = requests.get(app.base + "/hello", headers={"x-perfagent-profile": TOKEN.encode()})
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    while not profiled(app.output()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [e["route"] for e in profiled(app.output())] == ["/hello"], app.output()[-2000:]
