"""The package as a user installs it: the built wheel in fresh venvs beside old apps.

The agent goes into the app's own environment, so installing it must change none
of the app's packages (FastAPI 0.79 with pydantic 1, Flask 2.0 with Werkzeug 2.0),
must bring no web stack, and must run there: under ``perfagent run`` and with
``perfagent.init(app)``, without the console extra.

Slow (a wheel build and pip installs from PyPI): marked ``install``; the venvs are
kept under pytest's temporary root, in a folder named after the wheel's hash, so a
second run with the same code reuses them (``.ci/run`` runs these once).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import ROOT, Server, clean_env, free_port, scrape, wait_for_counts

pytestmark = pytest.mark.install

# The oldest versions the README promises, with what they pinned at the time.
FASTAPI_OLD = ["fastapi==0.79.1", "pydantic<2", "uvicorn==0.18.3"]
STARLETTE_OLD = ["starlette==0.20.4", "uvicorn==0.18.3"]
FLASK_OLD = ["flask==2.0.3", "werkzeug==2.0.3"]
#: Older than the adapter supports: the app must run, untouched, after one line.
FLASK_TOO_OLD = [
    "flask==1.1.4",
    "werkzeug==1.0.1",
    "jinja2==2.11.3",
    "markupsafe==2.0.1",
    "itsdangerous==1.1.0",
    "click==7.1.2",
]
#: Changed whenever what is kept of a venv changes, so an older cache is not read.
CACHE_FORMAT = 2
WEB_STACKS = {"fastapi", "starlette", "pydantic", "uvicorn", "anyio", "opentelemetry-sdk"}


def _pip(venv: Path, *args: str, timeout: float = 600) -> str:
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"pip {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _freeze(venv: Path) -> dict[str, str]:
    found = {}
    for line in _pip(venv, "freeze", "--all").splitlines():
        name, sep, version = line.partition("==")
        if not sep:  # perfagent @ file:///...whl
            name, sep, version = line.partition(" @ ")
        if sep:
            found[name.strip().lower().replace("_", "-")] = version.strip()
    return found


def _site_packages_kib(venv: Path) -> int:
    (site,) = venv.glob("lib/python*/site-packages")
    out = subprocess.run(["du", "-sk", str(site)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built once per session from a copy of the tracked sources."""
    base = tmp_path_factory.getbasetemp().parent / "perfagent-install"
    src = base / "src"
    shutil.rmtree(src, ignore_errors=True)
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        path = Path(os.fsdecode(name))
        if (ROOT / path).is_file():
            (src / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, src / path)
    out = base / "dist"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
        env=env,
        timeout=900,
    )
    (built,) = out.glob("perfagent-*.whl")
    return built


def _venv_with(wheel: Path, name: str, app_requirements: list[str]) -> dict:
    """A fresh venv holding ``app_requirements``, then the wheel; what pip changed."""
    digest = hashlib.sha256(wheel.read_bytes() + repr((CACHE_FORMAT, app_requirements)).encode())
    digest = digest.hexdigest()[:16]
    venv = wheel.parent.parent / "venvs" / digest / name
    done = venv / "perfagent-test.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    _pip(venv, "install", "-q", *app_requirements)
    before, size_before = _freeze(venv), _site_packages_kib(venv)
    _pip(venv, "install", "-q", str(wheel))
    after, size_after = _freeze(venv), _site_packages_kib(venv)
    facts = {
        "venv": str(venv),
        "before": before,
        "after": after,
        "kib_before": size_before,
        "kib_after": size_after,
    }
    done.write_text(json.dumps(facts, indent=1))
    return facts


@pytest.fixture(scope="session")
def fastapi_old(wheel) -> dict:
    return _venv_with(wheel, "fastapi-0.79", FASTAPI_OLD)


@pytest.fixture(scope="session")
def starlette_old(wheel) -> dict:
    return _venv_with(wheel, "starlette-0.20", STARLETTE_OLD)


@pytest.fixture(scope="session")
def flask_old(wheel) -> dict:
    return _venv_with(wheel, "flask-2.0", FLASK_OLD)


@pytest.fixture(scope="session")
def flask_too_old(wheel) -> dict:
    return _venv_with(wheel, "flask-1.1", FLASK_TOO_OLD)


def _changed(facts: dict) -> dict[str, tuple[str, str | None]]:
    before, after = facts["before"], facts["after"]
    return {name: (v, after.get(name)) for name, v in before.items() if after.get(name) != v}


def _added(facts: dict) -> set[str]:
    return set(facts["after"]) - set(facts["before"])


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def _no_console_env(**extra: str) -> dict[str, str]:
    """A port nothing answers on: the test never sends to a console of the user's."""
    return clean_env(PERFAGENT_CONSOLE_URL=f"http://127.0.0.1:{free_port()}", **extra)


def _wait_for_line(server: Server, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in server.output():
            return server.output()
        time.sleep(0.1)
    return server.output()


def test_installing_beside_fastapi_079_and_pydantic_1_changes_none_of_the_apps_packages(
    fastapi_old,
):
    assert fastapi_old["before"]["fastapi"] == "0.79.1"
    assert fastapi_old["before"]["pydantic"].startswith("1.")
    assert _changed(fastapi_old) == {}
    assert "perfagent" in _added(fastapi_old)
    assert not _added(fastapi_old) & WEB_STACKS


def test_installing_beside_flask_20_adds_no_web_stack(flask_old):
    assert flask_old["before"]["flask"] == "2.0.3"
    assert _changed(flask_old) == {}
    assert not _added(flask_old) & WEB_STACKS, _added(flask_old)


def test_fastapi_079_app_under_perfagent_run(fastapi_old, tmp_path, servers):
    venv = Path(fastapi_old["venv"])
    _write(
        tmp_path,
        "oldapp.py",
        """
        import fastapi
        import pydantic
        from fastapi import FastAPI

        app = FastAPI()

        @app.get("/items/{item_id}")
        def item(item_id: int):
            return {"id": item_id, "fastapi": fastapi.__version__, "pydantic": pydantic.VERSION}
        """,
    )
    port, metrics = free_port(), free_port()
    argv = [str(venv / "bin" / "perfagent"), "run", "--metrics-port", str(metrics), "--"]
    argv += ["uvicorn", "oldapp:app", "--port", str(port)]  # the venv's, as perfagent runs it
    server = servers(argv, port, _no_console_env(), cwd=tmp_path)
    server.wait_listening()
    answer = server.get("/items/3").json()
    assert answer["id"] == 3 and answer["fastapi"] == "0.79.1", answer  # the venv's own
    assert str(answer["pydantic"]).startswith("1."), answer
    counts = wait_for_counts(metrics, 1)
    assert counts == {("GET", "/items/{item_id}", "200"): 1}, server.output()
    build = [s for s in scrape(metrics) if s.name == "perfagent_build_info"]
    assert build and build[0].labels["compiled"] == "1"
    # The app's own FastAPI 0.79 is not the console's (0.110+): it says so, and runs on.
    out = _wait_for_line(server, "perfagent[console]")
    assert sum("perfagent[console]" in line for line in out.splitlines()) == 1, out


def test_starlette_020_app_under_perfagent_run(starlette_old, tmp_path, servers):
    assert _changed(starlette_old) == {}
    venv = Path(starlette_old["venv"])
    _write(
        tmp_path,
        "oldstarlette.py",
        """
        from importlib.metadata import version

        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def item(request):
            return JSONResponse(
                {"id": int(request.path_params["item_id"]), "starlette": version("starlette")}
            )

        app = Starlette(routes=[Route("/items/{item_id}", item)])
        """,
    )
    port, metrics = free_port(), free_port()
    argv = [str(venv / "bin" / "perfagent"), "run", "--metrics-port", str(metrics), "--"]
    argv += ["uvicorn", "oldstarlette:app", "--port", str(port)]
    server = servers(argv, port, _no_console_env(), cwd=tmp_path)
    server.wait_listening()
    assert server.get("/items/3").json() == {"id": 3, "starlette": "0.20.4"}
    counts = wait_for_counts(metrics, 1)
    assert counts == {("GET", "/items/{item_id}", "200"): 1}, server.output()
    assert "agent_error" not in server.output()


def test_flask_20_app_under_perfagent_run_without_the_console(flask_old, tmp_path, servers):
    venv = Path(flask_old["venv"])
    _write(
        tmp_path,
        "oldflask.py",
        """
        from importlib.metadata import version

        from flask import Flask

        app = Flask(__name__)

        @app.route("/users/<int:user_id>")
        def user(user_id):
            return {"id": user_id, "flask": version("flask")}
        """,
    )
    port, metrics = free_port(), free_port()
    argv = [str(venv / "bin" / "perfagent"), "run", "--metrics-port", str(metrics), "--"]
    argv += ["flask", "run", "--port", str(port)]
    server = servers(argv, port, _no_console_env(FLASK_APP="oldflask"), cwd=tmp_path)
    server.wait_listening()
    assert server.get("/users/7").json() == {"id": 7, "flask": "2.0.3"}  # the venv's own
    counts = wait_for_counts(metrics, 1)
    assert counts == {("GET", "/users/<int:user_id>", "200"): 1}, server.output()
    out = server.output()
    lines = [line for line in out.splitlines() if "perfagent[console]" in line]
    assert len(lines) == 1, out
    assert "not installed" in lines[0]
    assert "agent_error" not in out


def test_flask_20_app_with_init(flask_old, tmp_path, servers):
    venv = Path(flask_old["venv"])
    port, metrics = free_port(), free_port()
    _write(
        tmp_path,
        "initapp.py",
        f"""
        import perfagent
        from flask import Flask

        app = Flask(__name__)

        @app.route("/users/<int:user_id>")
        def user(user_id):
            from importlib.metadata import version

            return {{"id": user_id, "flask": version("flask")}}

        perfagent.init(app, metrics_port={metrics})
        app.run(port={port})
        """,
    )
    argv = [str(venv / "bin" / "python"), "initapp.py"]
    server = servers(argv, port, _no_console_env(), cwd=tmp_path)
    server.wait_listening()
    assert server.get("/users/5").json() == {"id": 5, "flask": "2.0.3"}
    assert wait_for_counts(metrics, 1) == {("GET", "/users/<int:user_id>", "200"): 1}
    assert "agent_error" not in server.output()


FLASK_APP_CODE = """
from importlib.metadata import version

from flask import Flask

app = Flask(__name__)

@app.route("/users/<int:user_id>")
def user(user_id):
    return "user %d, flask %s" % (user_id, version("flask"))
"""


def test_flask_older_than_20_runs_untouched_after_one_line(flask_too_old, tmp_path, servers):
    venv = Path(flask_too_old["venv"])
    _write(tmp_path, "tooold.py", FLASK_APP_CODE)
    _write(
        tmp_path,
        "tooold_init.py",
        "import perfagent\nfrom tooold import app\n\nperfagent.init(app, metrics_port=0)\n"
        "import sys\napp.run(port=int(sys.argv[1]))\n",
    )
    port, metrics = free_port(), free_port()
    run = [str(venv / "bin" / "perfagent"), "run", "--metrics-port", str(metrics), "--"]
    run += ["flask", "run", "--port", str(port)]
    under_run = servers(run, port, _no_console_env(FLASK_APP="tooold"), cwd=tmp_path)
    in_code_port = free_port()
    in_code = [str(venv / "bin" / "python"), "tooold_init.py", str(in_code_port)]
    with_init = servers(in_code, in_code_port, _no_console_env(), cwd=tmp_path)
    for server in (under_run, with_init):
        server.wait_listening()
        assert server.get("/users/4").text == "user 4, flask 1.1.4"
        out = _wait_for_line(server, "is not supported")
        lines = [line for line in out.splitlines() if "is not supported" in line]
        assert len(lines) == 1 and "Flask 1.1.4" in lines[0], out
        assert "agent_error" not in out and "Traceback" not in out, out


def test_console_command_without_the_extra_says_how_to_get_it(flask_old):
    venv = Path(flask_old["venv"])
    result = subprocess.run(
        [str(venv / "bin" / "perfagent"), "console", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env=_no_console_env(),
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "pip install 'perfagent[console]'" in result.stderr
    assert "PERFAGENT_CONSOLE_URL" in result.stderr


def test_report_installed_sizes(flask_old, fastapi_old):
    """Not an assertion of size: prints what the install adds (kept in the test's output)."""
    for facts in (flask_old, fastapi_old):
        added = sorted(_added(facts))
        print(
            f"{Path(facts['venv']).name}: site-packages {facts['kib_before']} KiB -> "
            f"{facts['kib_after']} KiB (+{facts['kib_after'] - facts['kib_before']}); "
            f"added {added}"
        )
