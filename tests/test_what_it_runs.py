"""The agent says what it runs: the C speedups or not, a refused protocol, a misspelt setting."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import APPS, PERFAGENT, clean_env, free_port, scrape

PROBE = (
    "import importlib.util, perfagent; "
    "print('agent', perfagent._state['agent'] is not None); "
    "import perfagent.agent as a; print('finisher', a.Finisher)"
)


#: A sitecustomize that makes the compiled modules fail to import, as where pip found
#: no C compiler (perfagent run's own sitecustomize runs a user's one first).
NO_C = """
import sys


class NoCompiledModules:
    def find_spec(self, name, path=None, target=None):
        if name in ("perfagent._speedups", "perfagent._perrequest"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoCompiledModules())
"""


@pytest.fixture(scope="module")
def without_c(tmp_path_factory):
    folder = tmp_path_factory.mktemp("no-c")
    (folder / "sitecustomize.py").write_text(NO_C)
    return folder


def _run(*args: str, env: dict, cwd=APPS, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PERFAGENT, "run", "--no-console", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _build_info(servers, env: dict) -> dict:
    port, metrics = free_port(), free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", str(metrics), "--"]
    argv += ["uvicorn", "fastapi_app:app", "--port", str(port)]
    server = servers(argv, port, env)
    server.wait_listening()
    (info,) = [s for s in scrape(metrics) if s.name == "perfagent_build_info"]
    server.stop()
    return {"labels": info.labels, "output": server.output()}


def test_without_the_c_speedups_it_says_so_once_and_build_info_says_compiled_0(servers, without_c):
    env = clean_env(PYTHONPATH=str(without_c))
    result = _run("--metrics-port", "0", "--", sys.executable, "-c", PROBE, env=env)
    assert result.returncode == 0, result.stderr
    assert "agent True" in result.stdout and "finisher None" in result.stdout
    lines = [line for line in result.stderr.splitlines() if "pure-Python" in line]
    assert len(lines) == 1, result.stderr
    assert "apt-get install gcc python3-dev" in lines[0]

    found = _build_info(servers, env)
    assert found["labels"]["compiled"] == "0"
    assert found["output"].count("pure-Python") == 1  # the runner's line, not one a process


def test_with_the_c_speedups_it_says_nothing_and_build_info_says_compiled_1(servers):
    found = _build_info(servers, clean_env())
    assert found["labels"]["compiled"] == "1"
    assert "pure-Python" not in found["output"]


def test_c_speedups_turned_off_is_compiled_0_without_the_line(servers):
    found = _build_info(servers, clean_env(PERFAGENT_COMPILED_HOOKS="0"))
    assert found["labels"]["compiled"] == "0"
    assert "pure-Python" not in found["output"]


def test_init_in_code_without_the_c_speedups_says_so_once(without_c):
    code = "import perfagent; perfagent.init(metrics_port=0); perfagent.init(); print('ok')"
    env = clean_env(
        PYTHONPATH=str(without_c), PERFAGENT_CONSOLE_URL=f"http://127.0.0.1:{free_port()}"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr
    assert result.stderr.count("pure-Python") == 1, result.stderr


def test_otlp_over_grpc_is_refused_at_start_with_one_line():
    env = clean_env(OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    result = _run("--metrics-port", "0", "--", sys.executable, "-c", "print('app ran')", env=env)
    assert result.returncode == 2
    assert "app ran" not in result.stdout
    (line,) = result.stderr.splitlines()
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='grpc' is not supported" in line
    assert "http/protobuf" in line


def test_otlp_over_http_is_accepted():
    env = clean_env(OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    result = _run("--metrics-port", "0", "--", sys.executable, "-c", "print('app ran')", env=env)
    assert result.returncode == 0, result.stderr
    assert "app ran" in result.stdout


def test_an_unknown_variable_is_named_once_with_the_nearest_setting():
    env = clean_env(PERFAGENT_SLOWMS="200", PERFAGENT_NO_SUCH_THING_AT_ALL="1")
    code = "import perfagent; print('agent', perfagent._state['agent'] is not None)"
    result = _run("--metrics-port", "0", "--", sys.executable, "-c", code, env=env)
    assert result.returncode == 0, result.stderr
    assert "agent True" in result.stdout  # the app runs with the agent all the same
    warned = [line for line in result.stderr.splitlines() if "unknown variable" in line]
    assert len(warned) == 2, result.stderr  # the runner's lines; no process repeats them
    slowms = next(line for line in warned if "PERFAGENT_SLOWMS" in line)
    assert slowms.endswith("did you mean PERFAGENT_SLOW_MS?")


def test_an_unknown_variable_is_warned_under_init_in_code():
    code = "import perfagent; perfagent.init(metrics_port=0); print('ok')"
    env = clean_env(
        PERFAGENT_LOOPBLOCK_MS="50", PERFAGENT_CONSOLE_URL=f"http://127.0.0.1:{free_port()}"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr
    assert result.stderr.count("did you mean PERFAGENT_LOOP_BLOCK_MS?") == 1, result.stderr
