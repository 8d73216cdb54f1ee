"""The watchdog on a busy machine: waiting for a CPU is not a block, and a block's
duration is the time the loop thread spent in it, not the time it waited for a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from helpers import PERFAGENT, Server, clean_env, free_port

BLOCKED = "event_loop_blocked"


def _blocks(server: Server) -> list[dict]:
    found = []
    for line in server.output().splitlines():
        if line.startswith("{") and BLOCKED in line:
            event = json.loads(line)
            if event.get("event") == BLOCKED:
                found.append(event)
    return found


def _hogs(count: int) -> list[subprocess.Popen]:
    """Processes that keep every core busy (more runnable threads than cores)."""
    return [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(count)
    ]


def test_cpu_contention_is_not_a_block_and_a_real_block_reports_its_own_cpu(servers):
    port = free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", str(free_port())]
    argv += ["--log-format", "json", "--", "uvicorn", "contention_app:app", "--port", str(port)]
    server = servers(argv, port, clean_env(PERFAGENT_CONSOLE_URL=f"http://127.0.0.1:{free_port()}"))
    server.wait_listening()
    assert server.get("/ok").status_code == 200
    time.sleep(0.3)
    hogs = _hogs(max(3, (os.cpu_count() or 2) + 1))
    try:
        time.sleep(3.0)  # idle while the machine is busy
        # A request in flight that only awaits: the heartbeat runs, the loop is free.
        waiting = threading.Thread(target=server.get, args=("/wait?seconds=5",))
        waiting.start()
        waiting.join()
        time.sleep(0.5)
        assert _blocks(server) == [], "waiting for a CPU reported as a block"
        # A real block, under the same load: the route measures its own CPU time.
        spun = server.get("/spin?cpu=0.3").json()
        deadline = time.monotonic() + 5
        while not _blocks(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    (event,) = _blocks(server)
    assert event["route"] == "/spin", event
    assert event["callsite"] and event["callsite"].startswith("contention_app.py:"), event
    cpu_ms = spun["cpu"] * 1000.0
    assert abs(event["duration_ms"] - cpu_ms) <= 0.3 * cpu_ms, (event, spun)
