"""``perfagent run`` starts the app whatever answers at the console URL, and says what it found."""

from __future__ import annotations

import http.server
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import APPS, PERFAGENT, clean_env, free_port

APP = "print('app started', flush=True)"


class Listener:
    """A raw TCP server on a free port, each connection handed to ``answer`` in a thread."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self.port = free_port()
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._answer = answer
        self._open: list[socket.socket] = []
        self._stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._open.append(conn)
            threading.Thread(target=self._answer_safely, args=(conn,), daemon=True).start()

    def _answer_safely(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        except OSError:
            pass

    def close(self) -> None:
        self._stopped.set()
        self._sock.close()
        for conn in self._open:
            conn.close()


def garbage(conn: socket.socket) -> None:
    conn.recv(1024)
    conn.sendall(b"\x00\xff\xfe-ERR unknown command\r\n")
    time.sleep(0.5)


def reset(conn: socket.socket) -> None:
    conn.recv(1024)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def close(conn: socket.socket) -> None:
    conn.recv(1024)  # read first: closing on unread data would send a reset
    conn.shutdown(socket.SHUT_RDWR)
    time.sleep(0.5)


def hang(conn: socket.socket) -> None:
    time.sleep(60)


def trickle(conn: socket.socket) -> None:
    """A status line that never ends, a byte at a time: a per-read timeout never fires."""
    for _ in range(600):
        conn.sendall(b"H")
        time.sleep(0.1)


def run_app(url: str, app: str = APP) -> subprocess.CompletedProcess:
    argv = [*PERFAGENT, "run", "--console-url", url, "--metrics-port", "0"]
    return subprocess.run(
        [*argv, "--", "python3", "-c", app],
        cwd=APPS,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_started_and_said(result: subprocess.CompletedProcess, url: str, why: str) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "app started", result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("perfagent:")]
    assert len(said) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"console NOT started: {url} is not a perfagent console" in said[0], said
    assert why in said[0], said


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (garbage, "does not answer in HTTP"),
        (reset, "connection failed: Connection reset"),
        (close, "closed the connection without answering"),
        (hang, "no answer within 0.5 s"),
        (trickle, "no answer within 0.5 s"),
    ],
    ids=["garbage", "reset", "close", "hang", "trickle"],
)
def test_the_app_starts_whatever_raw_socket_answers(answer, why):
    listener = Listener(answer)
    try:
        url = f"http://127.0.0.1:{listener.port}"
        assert_started_and_said(run_app(url), url, why)
    finally:
        listener.close()


@pytest.mark.skipif(shutil.which("py-spy") is None, reason="the runner asks only with py-spy")
def test_the_runner_keeps_asking_for_profiles_without_a_traceback():
    """While the app runs, the runner asks the console URL for profiles every 2 s:
    garbage there is one more 'no console right now', not a traceback."""
    listener = Listener(garbage)
    try:
        url = f"http://127.0.0.1:{listener.port}"
        app = "import time; time.sleep(2 * 2.0 + 0.5); print('app started', flush=True)"
        assert_started_and_said(run_app(url, app), url, "does not answer in HTTP")
    finally:
        listener.close()


class _Fails(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(500)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_500() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Fails)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_app_starts_when_the_console_url_answers_500(http_500):
    url = f"http://127.0.0.1:{http_500}"
    assert_started_and_said(run_app(url), url, "/api/health answers HTTP 500")


@pytest.fixture
def tls_port(tmp_path) -> Iterator[int]:
    """A TLS server with a self-signed certificate."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subprocess.run(
        [*openssl, "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def handshake(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1024)

    listener = Listener(lambda conn: _quietly(handshake, conn))
    try:
        yield listener.port
    finally:
        listener.close()


def _quietly(step: Callable[[socket.socket], None], conn: socket.socket) -> None:
    try:
        step(conn)
    except (OSError, ssl.SSLError):
        pass


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_app_starts_when_a_tls_server_answers(tls_port, scheme):
    url = f"{scheme}://127.0.0.1:{tls_port}"
    # Plain HTTP into a TLS server: it hangs up or resets, depending on timing.
    why = "(" if scheme == "http" else "CERTIFICATE_VERIFY_FAILED"
    assert_started_and_said(run_app(url), url, why)


def test_the_app_starts_when_redis_is_at_the_console_url():
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    url = "http://127.0.0.1:6379"
    result = run_app(url)
    assert result.returncode == 0 and result.stdout.strip() == "app started", result.stderr
    assert f"console NOT started: {url} is not a perfagent console" in result.stderr, result.stderr
