from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from helpers import ISOLATED, Server, free_port

#: The user's own console: what no test may reach or write.
USER_CONSOLE_PORT = 6060
USER_DB = (
    Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    / "perfagent"
    / "console.db"
)


def pytest_configure(config):
    """Before any test: every agent and console of the run uses the run's own places."""
    # The README's test command runs .venv/bin/python -m pytest without activating the
    # venv: the programs the tests start (python3, uvicorn, py-spy, schemathesis) are
    # this environment's, as if it were activated, not whatever PATH finds first.
    scripts = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != scripts:
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    data = tempfile.mkdtemp(prefix="perfagent-test-data-")
    ISOLATED["PERFAGENT_CONSOLE_URL"] = f"http://127.0.0.1:{free_port()}"
    ISOLATED["XDG_DATA_HOME"] = data
    if "PERFAGENT_COMPILED_HOOKS" in os.environ:  # .ci/run's pure-Python pass: servers too
        ISOLATED["PERFAGENT_COMPILED_HOOKS"] = os.environ["PERFAGENT_COMPILED_HOOKS"]
    os.environ.update(ISOLATED)  # agents started inside the pytest process, too


def _db_state() -> list:
    found = []
    for suffix in ("", "-wal", "-shm"):
        path = USER_DB.with_name(USER_DB.name + suffix)
        found.append(path.stat().st_mtime_ns if path.exists() else None)
    return found


def _descends_from_us(pid: str) -> bool:
    me = str(os.getpid())
    for _ in range(64):
        if pid == me:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = stat.rsplit(")", 1)[1].split()[1]  # the parent's pid
        if pid in ("0", "1"):
            return False
    return False


def _ours(pid: str) -> bool:
    """Whether a process belongs to this run: pytest itself or a descendant, or one that
    carries the run's data folder (a console the runner started outlives no runner)."""
    if _descends_from_us(pid):
        return True
    marker = f"XDG_DATA_HOME={ISOLATED['XDG_DATA_HOME']}".encode()
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _socket_owner(port: int) -> str | None:
    """The pid whose socket has local port ``port`` on loopback (from /proc)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[9] != "0":
                inode = cols[9]
    if inode is None:
        return None
    return _holder(f"socket:[{inode}]")


def _holder(target: str) -> str | None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                for fd in (proc / "fd").iterdir():
                    if os.readlink(fd) == target:
                        return proc.name
            except OSError:
                continue
    return None


class _Watch:
    """Listens where the user's console would, and looks every second for a process
    holding the user's database open; both count only processes this run started
    (the machine may be shared with other runs, whose processes are not ours)."""

    def __init__(self, port: int) -> None:
        self.ours: list[str] = []
        self.others_held_db = False
        self.unknown = 0
        self._stop = threading.Event()
        self.sock: socket.socket | None = socket.socket()
        try:
            self.sock.bind(("127.0.0.1", port))
            self.sock.listen(16)
            threading.Thread(target=self._accept, daemon=True).start()
        except OSError:  # the user's console runs here: the database check still holds
            self.sock.close()
            self.sock = None
        threading.Thread(target=self._poll_db, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            pid = _socket_owner(peer[1])
            if pid is None:
                self.unknown += 1  # gone before it could be named: not counted against us
            elif _ours(pid):
                self.ours.append(f"pid {pid} connected to the console port")
            conn.close()

    def _poll_db(self) -> None:
        target = str(USER_DB)
        while not self._stop.wait(1.0):
            pid = _holder(target) if USER_DB.exists() else None
            if pid is not None:
                if _ours(pid):
                    self.ours.append(f"pid {pid} opened {target}")
                else:
                    self.others_held_db = True

    def close(self) -> None:
        self._stop.set()
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


@pytest.fixture(scope="session", autouse=True)
def users_console_is_never_touched():
    """Fails the run if a process of it reached 127.0.0.1:6060 or opened the default
    console database, or if that database changed while only this run could have."""
    before = _db_state()
    watch = _Watch(USER_CONSOLE_PORT)
    yield
    watch.close()
    assert watch.ours == [], f"the test run touched the user's console: {watch.ours[:3]}"
    if not watch.others_held_db:
        assert _db_state() == before, f"the test run wrote the user's console database {USER_DB}"


@pytest.fixture
def servers():
    """Starts servers for a test and always stops them."""
    started: list[Server] = []

    def start(argv, port, env, **kwargs) -> Server:
        server = Server(argv, port, env, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(autouse=True)
def agent_leaves_no_hooks():
    """Every test must leave the process as it found it: no agent, no patch, no hook."""
    yield
    import perfagent
    from perfagent.patching import MARK, PostImportHooks

    perfagent.shutdown()
    assert not any(isinstance(f, PostImportHooks) for f in sys.meta_path)
    for module, cls, attr in (
        ("starlette.applications", "Starlette", "build_middleware_stack"),
        ("fastapi.applications", "FastAPI", "build_middleware_stack"),
        ("starlette.routing", "Mount", "handle"),
        ("flask.app", "Flask", "wsgi_app"),
    ):
        if module in sys.modules:
            target = getattr(sys.modules[module], cls).__dict__.get(attr)
            assert not hasattr(target, MARK), f"{cls}.{attr} is still patched"
