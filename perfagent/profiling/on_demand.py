"""In ``perfagent run``: profile the server when the console asks for it.

The runner is the server's parent, so py-spy started by it may attach even
where Yama's ``ptrace_scope`` only lets a process trace its own descendants.
A thread polls the console every few seconds (one small POST), and on a
request records the whole process tree (``--subprocesses``: every worker) for
the asked number of seconds, then uploads the collapsed stacks.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.parse
import urllib.request
from typing import Any

POLL_S = 2.0


class ProfileRequests:
    def __init__(self, console_url: str, child_pid: int, service: str) -> None:
        self._url = console_url.rstrip("/")
        self._pid = child_pid
        self._service = service
        self._runner = f"{socket.gethostname()}:{os.getpid()}"
        token = os.environ.get("PERFAGENT_CONSOLE_TOKEN")
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="perfagent-profiles", daemon=True)

    def start(self) -> None:
        if shutil.which("py-spy"):
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _post(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        headers = {**self._headers, "content-type": "application/json"}
        request = urllib.request.Request(self._url + path, data=data or b"", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()

    def _run(self) -> None:
        query = urllib.parse.urlencode({"runner": self._runner, "service": self._service})
        while not self._stop.wait(POLL_S):
            try:
                status, body = self._post(f"/api/profiles/claim?{query}")
                if status != 200:
                    continue  # nothing asked for
                asked = json.loads(body)
                seconds, ask_id = int(asked["seconds"]), int(asked["id"])
            except (OSError, http.client.HTTPException, ValueError, TypeError, KeyError):
                # No console right now, or something else at its URL (not HTTP, not
                # a console's answer): ask again later, never a traceback.
                continue
            result = self._record(seconds)
            try:
                self._post(f"/api/profiles/{ask_id}/result", result)
            except (OSError, http.client.HTTPException):
                pass

    def _record(self, seconds: int) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="perfagent-profile-") as folder:
            output = os.path.join(folder, "stacks.txt")
            argv = [shutil.which("py-spy") or "py-spy", "record", "--pid", str(self._pid)]
            argv += ["--subprocesses", "--duration", str(seconds), "--format", "raw"]
            argv += ["--nonblocking", "-o", output]
            try:
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=seconds + 30, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                return {"error": f"py-spy did not run: {exc}"}
            if done.returncode != 0 or not os.path.exists(output):
                last = (done.stderr.strip().splitlines() or ["py-spy failed"])[-1]
                return {"error": last[:500]}
            with open(output, encoding="utf-8", errors="replace") as handle:
                return {"stacks": handle.read()}
