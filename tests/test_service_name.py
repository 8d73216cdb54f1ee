"""The service's name, inferred from what the user started, read from the agent's export.

With no OTEL_SERVICE_NAME every app used to be ``unknown_service:python``; now
each real server command names the app's module, a Flask app given to
``init(app)`` its ``import_name``, anything else the working folder.
"""

from __future__ import annotations

import textwrap

import pytest
from helpers import APPS, PERFAGENT, clean_env, free_port
from otlp_receiver import Receiver


@pytest.fixture
def receiver():
    receiver = Receiver(free_port())
    yield receiver
    receiver.stop()


def _exported_name(servers, receiver, command: str, cwd=APPS, path="/hello", **env) -> str:
    port = free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", "0"]
    argv += ["--console-url", receiver.url, "--"]
    argv += command.format(port=port).split()
    server = servers(argv, port, clean_env(PERFAGENT_TRACE_SAMPLE="1", **env), cwd=cwd)
    server.wait_listening()
    assert server.get(path).status_code == 200
    spans = receiver.wait_for(1)
    assert spans, server.output()
    return spans[0]["resource"]["service.name"]


@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("uvicorn fastapi_app:app --port {port}", "fastapi_app"),
        ("python -m uvicorn fastapi_app:app --port {port}", "fastapi_app"),
        ("gunicorn -w 2 -b 127.0.0.1:{port} flask_app:app", "flask_app"),
        (
            "gunicorn -w 1 -k uvicorn.workers.UvicornWorker -b 127.0.0.1:{port} fastapi_app:app",
            "fastapi_app",
        ),
        ("hypercorn -b 127.0.0.1:{port} fastapi_app:app", "fastapi_app"),
        ("fastapi run fastapi_app.py --port {port}", "fastapi_app"),
        ("flask --app flask_app run --port {port}", "flask_app"),
    ],
)
def test_a_server_command_names_the_apps_module(servers, receiver, command, name):
    assert _exported_name(servers, receiver, command) == name


def test_flask_app_env_names_the_app(servers, receiver):
    name = _exported_name(servers, receiver, "flask run --port {port}", FLASK_APP="flask_app")
    assert name == "flask_app"


def test_a_plain_script_is_named_after_its_folder(servers, receiver, tmp_path):
    folder = tmp_path / "bookshop"
    folder.mkdir()
    (folder / "serve.py").write_text(
        textwrap.dedent(
            """
            import sys
            import uvicorn
            from fastapi import FastAPI

            app = FastAPI()

            @app.get("/hello")
            def hello():
                return "hi"

            uvicorn.run(app, port=int(sys.argv[1]))
            """
        )
    )
    name = _exported_name(servers, receiver, "python serve.py {port}", cwd=folder)
    assert name == "bookshop"


def test_a_flask_app_given_to_init_is_named_by_its_import_name(servers, receiver, tmp_path):
    port = free_port()
    (tmp_path / "serve.py").write_text(
        textwrap.dedent(
            f"""
            import perfagent
            from flask import Flask

            app = Flask("blog")

            @app.get("/hello")
            def hello():
                return "hi"

            perfagent.init(app, metrics_port=0, console_url={receiver.url!r}, trace_sample=1)
            app.run(port={port})
            """
        )
    )
    import sys

    server = servers([sys.executable, "serve.py"], port, clean_env(), cwd=tmp_path)
    server.wait_listening()
    assert server.get("/hello").status_code == 200
    spans = receiver.wait_for(1)
    assert spans and spans[0]["resource"]["service.name"] == "blog", server.output()


def test_a_name_given_wins(servers, receiver):
    command = "uvicorn fastapi_app:app --port {port}"
    assert _exported_name(servers, receiver, command, OTEL_SERVICE_NAME="shop") == "shop"
