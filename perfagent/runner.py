"""``perfagent run -- COMMAND...``: run a server with the agent in every process.

The runner starts COMMAND as a child with the bootstrap ``sitecustomize`` on
``PYTHONPATH`` and a fresh prometheus-client multiprocess folder, serves
``/metrics`` itself (so there is one endpoint however many workers there are),
starts the console unless one answers, and waits.

Signals: the child stays in the runner's process group, so a Ctrl-C typed at
the terminal reaches the server directly, exactly as if it ran alone. A signal
sent to the runner itself (``kill``, a process manager) is forwarded once;
``sigwaitinfo`` tells the two apart (``si_code`` > 0 means the kernel sent it,
to the whole group). The runner exits with the child's exit status, re-raising
the child's fatal signal if it died of one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any
from urllib.parse import urlsplit

from perfagent.bootstrap import RUNNER_ENV, SITE_DIR
from perfagent.build import compiled, say_if_pure_python
from perfagent.config import Settings, settings_to_environ
from perfagent.console import NOT_INSTALLED
from perfagent.console import missing as console_missing
from perfagent.profiling.on_demand import ProfileRequests
from perfagent.service_name import infer

FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGWINCH,
)
_WAITED = (*FORWARDED, signal.SIGCHLD)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def child_environment(settings: Settings, multiprocess_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings_to_environ(settings))
    env[RUNNER_ENV] = "1"
    env["PROMETHEUS_MULTIPROC_DIR"] = multiprocess_dir
    paths = [SITE_DIR]
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(package_parent) not in ("site-packages", "dist-packages"):
        paths.append(package_parent)  # running from a source checkout
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def probe_console(url: str, timeout: float = 0.5) -> str | None:
    """What answers at the console URL: ``None`` for a console (``/api/health`` says 200),
    ``""`` when nothing listens there, else a few words on what does answer.

    Whatever listens there (garbage bytes, a reset, TLS, a server that hangs or
    trickles, a 500), this returns within about ``timeout`` and never raises: it
    reads the status line only, at most 4 KB, against one deadline for all reads.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ValueError):
        return ""
    token = os.environ.get("PERFAGENT_CONSOLE_TOKEN")
    name = f"[{host}]" if ":" in host else host
    ask = f"GET /api/health HTTP/1.0\r\nHost: {name}:{port}\r\nConnection: close\r\n"
    ask += f"Authorization: Bearer {token}\r\n\r\n" if token else "\r\n"
    answer = b""
    try:
        with sock:
            if https:
                import ssl  # only for an https console URL

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            sock.sendall(ask.encode("latin-1", "replace"))
            while b"\n" not in answer and len(answer) < 4096:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as exc:  # a reset, a refused or failed TLS handshake, ...
        return f"the connection failed: {getattr(exc, 'reason', None) or exc.strerror or exc}"
    if not answer:
        return "it closed the connection without answering"
    status = re.match(rb"HTTP/1\.[01] (\d{3})[ \r\n]", answer)
    if status is None:
        return "it does not answer in HTTP"
    if status.group(1) != b"200":
        return f"/api/health answers HTTP {status.group(1).decode()}"
    return None


def console_answers(url: str, timeout: float = 0.5) -> bool:
    return probe_console(url, timeout) is None


def _start_console(url: str, log_path: str) -> int | None:
    """Starts ``perfagent console`` in its own session (Ctrl-C is for the app)."""
    parts = urlsplit(url)
    if parts.hostname not in _LOOPBACK:
        return None
    argv = [
        sys.executable,
        "-m",
        "perfagent",
        "console",
        "--host",
        parts.hostname,
        "--port",
        str(parts.port or 80),
    ]
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return os.posix_spawn(
            sys.executable,
            argv,
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
            setsigmask=(),
        )
    finally:
        os.close(log_fd)


def _stop(pid: int, timeout: float = 5.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _say(message: str) -> None:
    sys.stderr.write(f"perfagent: {message}\n")
    sys.stderr.flush()


def run(command: list[str], settings: Settings, *, console: bool = True) -> int:
    """Runs COMMAND under the agent; returns its exit code (or dies of its signal)."""
    if not settings.enabled:
        os.execvp(command[0], command)  # PERFAGENT_ENABLED=0: the app runs untouched

    multiprocess_dir = tempfile.mkdtemp(prefix="perfagent-metrics-")
    metrics_server: Any = None
    console_pid: int | None = None
    child: int | None = None
    profiles: ProfileRequests | None = None
    signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)  # before any thread starts
    try:
        say_if_pure_python()
        where = []
        if settings.metrics_port:
            from perfagent.export.metrics import serving_registry, start_server

            try:
                metrics_server = start_server(
                    serving_registry(None, multiprocess_dir, compiled(settings.compiled_hooks)),
                    settings.metrics_host,
                    settings.metrics_port,
                )
                where.append(
                    f"metrics at http://{settings.metrics_host}:{settings.metrics_port}/metrics"
                )
            except OSError as exc:
                where.append(f"metrics NOT served (port {settings.metrics_port}: {exc.strerror})")
        if not console:
            where.append("console off")
        elif (found := probe_console(settings.console_url)) is None:
            where.append(f"console at {settings.console_url}")
        elif found:  # the port is taken: starting a console there would fail
            where.append(
                f"console NOT started: {settings.console_url} is not a perfagent console ({found})"
            )
        elif console_missing() is not None:
            where.append(f"no console at {settings.console_url}")
            _say(NOT_INSTALLED)
        else:
            log_path = os.path.join(tempfile.gettempdir(), "perfagent-console.log")
            console_pid = _start_console(settings.console_url, log_path)
            if console_pid is None:
                where.append(f"console at {settings.console_url} is not answering")
            else:
                where.append(f"console at {settings.console_url} (log: {log_path})")
        _say(", ".join(where))

        try:
            child = os.posix_spawnp(
                _beside_python(command[0]),
                command,
                child_environment(settings, multiprocess_dir),
                setsigmask=(),
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        except OSError as exc:
            _say(f"cannot start {command[0]!r}: {exc.strerror}")
            return 127 if isinstance(exc, FileNotFoundError) else 126
        if console:
            service = settings.service_name or infer(command, os.environ)
            profiles = ProfileRequests(settings.console_url, child, service)
            profiles.start()
        status = _wait(child)
        child = None
    finally:
        if profiles is not None:
            profiles.stop()
        if child is not None:  # the runner itself is failing: take the server down with it
            os.kill(child, signal.SIGTERM)
            os.waitpid(child, 0)
        if console_pid is not None:
            _stop(console_pid)
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        shutil.rmtree(multiprocess_dir, ignore_errors=True)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _WAITED)

    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return os.waitstatus_to_exitcode(status)


def _beside_python(program: str) -> str:
    """``program`` from this Python's ``bin/`` when it is there, else from ``PATH``.

    The agent loads only into a Python that has perfagent installed: this one.
    ``.venv/bin/perfagent run -- uvicorn app:app`` then runs the venv's uvicorn,
    activated or not, rather than another one earlier on ``PATH``.
    """
    if os.sep in program:
        return program
    beside = os.path.join(os.path.dirname(sys.executable), program)
    return beside if os.access(beside, os.X_OK) and not os.path.isdir(beside) else program


def _wait(child: int) -> int:
    """Forwards signals until the child exits; returns its wait status."""
    while True:
        info = signal.sigwaitinfo(_WAITED)
        if info.si_signo == signal.SIGCHLD:
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid == child:
                return status
            continue
        if info.si_code <= 0:  # sent by a process (kill, sigqueue), not by the terminal
            try:
                os.kill(child, info.si_signo)
            except ProcessLookupError:
                pass
