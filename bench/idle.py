"""What an idle worker costs: CPU instructions per idle second, under valgrind.

    python bench/idle.py                       # bare, perfagent, opentelemetry-instrument
    python bench/idle.py --seconds 20 --configs bare perfagent

Each configuration serves the benchmark's FastAPI app (``apps/bench_fastapi.py``)
with uvicorn under callgrind, takes a few requests (so every lazy part of the
agent has started: its threads, the loop watchdog, the exporter), then idles
and is stopped with SIGTERM. It runs twice, idling S/2 and S seconds; the
difference of the two totals over S/2 is the cost of one idle second, with
start-up, the requests and shutdown cancelled out. Counted in instructions,
not time: the same from run to run whatever else the machine does. The two
runs of every configuration go at once (the count does not depend on speed).

The agent is loaded as ``perfagent run`` loads it (its ``sitecustomize`` on
``PYTHONPATH``), with no /metrics server in the worker (as under ``perfagent
run``, where the runner serves it) and its exports going to a local OTLP sink;
``opentelemetry-instrument``'s ``sitecustomize`` likewise, exporting traces
to the same sink.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VALGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
CONFIGS = ("bare", "perfagent", "opentelemetry-instrument")
WARM_REQUESTS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _otel_site() -> str | None:
    """The folder of opentelemetry-instrument's ``sitecustomize``, if installed."""
    try:
        import opentelemetry.instrumentation.auto_instrumentation as auto
    except ImportError:
        return None
    return str(Path(auto.__file__).parent)


def _env(config: str, sink_url: str) -> dict[str, str] | None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PERFAGENT_", "OTEL_", "PROMETHEUS_MULTIPROC"))
    }
    env["PYTHONHASHSEED"] = "0"  # the same dict layouts each run
    paths = [str(HERE / "apps")]
    if config == "perfagent":
        # This tree's agent, whichever is installed.
        paths[:0] = [str(ROOT / "perfagent" / "bootstrap" / "site"), str(ROOT)]
        env.update(PERFAGENT_METRICS_PORT="0", PERFAGENT_CONSOLE_URL=sink_url)
    elif config == "opentelemetry-instrument":
        site = _otel_site()
        if site is None:
            return None
        paths.insert(0, site)
        env.update(
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_METRICS_EXPORTER="none",
            OTEL_LOGS_EXPORTER="none",
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_ENDPOINT=sink_url,
            OTEL_SERVICE_NAME="bench",
        )
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"not listening after {timeout} s")


def _get(port: int, path: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        while sock.recv(65536):
            pass


class Run:
    """One server under callgrind: started, warmed, left idle, stopped."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "bench_fastapi:app", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*VALGRIND, *argv],
            env=env,
            cwd=HERE / "apps",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def warm(self) -> None:
        _wait_listening(self.proc, self.port, 600.0)
        for index in range(WARM_REQUESTS):
            _get(self.port, "/queries" if index % 2 else "/hello")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=600)
        found = re.search(r"Collected : (\d+)", err)
        if found is None:
            raise RuntimeError(f"no callgrind total in: {err[-800:]}")
        return int(found.group(1))


def per_idle_second(config: str, seconds: float, sink_url: str) -> float | None:
    env = _env(config, sink_url)
    if env is None:
        return None
    short, long = Run(env), Run(env)
    try:
        short.warm()
        long.warm()
        # Warmed at about the same time: stop one after S/2 idle seconds, the other after S.
        time.sleep(seconds / 2)
        few = short.stop()
        time.sleep(seconds / 2)
        many = long.stop()
    finally:
        for run in (short, long):
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
    return (many - few) / (seconds / 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="the longer idle time")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 1
    sink_port = free_port()
    sink = subprocess.Popen(
        [sys.executable, str(HERE / "sink.py"), str(sink_port)], stdin=subprocess.DEVNULL
    )
    try:
        print(f"CPU instructions per idle second (callgrind, {args.seconds:g} s against half)")
        for config in args.configs:
            value = per_idle_second(config, args.seconds, f"http://127.0.0.1:{sink_port}")
            shown = "not installed" if value is None else f"{value:,.0f}"
            print(f"  {config:26} {shown}", flush=True)
    finally:
        sink.kill()
        sink.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
