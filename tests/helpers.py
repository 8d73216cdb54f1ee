"""Real servers as subprocesses, real HTTP, the real /metrics text parsed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
PERFAGENT = [sys.executable, "-m", "perfagent"]


_handed_out: set[int] = set()


def free_port() -> int:
    """A free port never handed out before in this test run (the kernel may repeat one)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


#: Filled by conftest.py for the whole run: a console URL nothing answers on and a data
#: folder of the run's own, so that no server a test starts sends to the user's console
#: (127.0.0.1:6060) or writes the user's ~/.local/share/perfagent/console.db.
ISOLATED: dict[str, str] = {}


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any agent settings leaking in from outside."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PERFAGENT_", "OTEL_", "PROMETHEUS_MULTIPROC"))
    }
    env.update(ISOLATED)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Server:
    """A command started in its own process group, its output kept in a file."""

    def __init__(self, argv: list[str], port: int, env: dict[str, str], cwd: Path = APPS) -> None:
        self.argv = argv
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self._log = tempfile.NamedTemporaryFile(prefix="pa-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Waits for the port to accept connections, without sending a request."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"server not listening after {timeout}s:\n{self.output()}")

    def get(self, path: str, **kwargs: object) -> requests.Response:
        return requests.get(self.base + path, timeout=30, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of the group, if any
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        return self.proc.returncode


def scrape(metrics_port: int) -> list:
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    try:
        return [s for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError as exc:
        raise AssertionError(f"/metrics on {metrics_port} is not valid: {exc}\n{text}") from None


def request_counts(samples: list) -> Counter:
    """(method, route, status) -> requests counted in http_server_request_duration_seconds."""
    counts: Counter = Counter()
    for s in samples:
        if s.name == "http_server_request_duration_seconds_count":
            key = (
                s.labels["http_request_method"],
                s.labels["http_route"],
                s.labels["http_response_status_code"],
            )
            counts[key] += int(s.value)
    return counts


def wait_for_counts(metrics_port: int, total: int, timeout: float = 15.0) -> Counter:
    """Counts once ``total`` requests are in (requests are recorded just after the reply)."""
    deadline = time.monotonic() + timeout
    counts: Counter = Counter()
    while time.monotonic() < deadline:
        try:
            counts = request_counts(scrape(metrics_port))
        except requests.ConnectionError:
            counts = Counter()
        if sum(counts.values()) >= total:
            time.sleep(0.3)  # anything counted twice would show up now
            return request_counts(scrape(metrics_port))
        time.sleep(0.1)
    return counts


def postgres_answers(dsn: str) -> bool:
    """Whether the machine's PostgreSQL answers at ``dsn`` (tests skip with a reason if not)."""
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except Exception:
        return False
