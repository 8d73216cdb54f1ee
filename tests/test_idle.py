"""An idle worker costs nothing: no agent thread wakes, the loop heartbeat stops, and
the next request re-arms all of it (a block it causes is still reported, with its line)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
from fastapi import FastAPI
from helpers import free_port

import perfagent
from perfagent.background import SETTLE_S
from perfagent.detectors.eventloop import LINGER_S

AGENT_THREADS = ("perfagent", "perfagent-export", "perfagent-loop")


def _switches(native_id: int) -> int:
    """Context switches of one thread of this process: each is a wake-up or a preemption."""
    counts = 0
    for line in Path(f"/proc/self/task/{native_id}/status").read_text().splitlines():
        if "ctxt_switches:" in line:
            counts += int(line.split(":")[1])
    return counts


def _block_line() -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(n for n, text in enumerate(lines, 1) if "# block" + ": idle" in text)


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    async def hello():
        return {"hello": "world"}

    @app.get("/block")
    async def block():
        time.sleep(0.25)  # block: idle
        return {"blocked": True}

    return app


def test_an_idle_worker_wakes_no_agent_thread_and_the_next_request_rearms(capfd):
    app = _app()
    console = f"http://127.0.0.1:{free_port()}"  # nobody listens: nothing is queued
    perfagent.init(app, metrics_port=0, log_format="json", console_url=console, trace_sample=0)
    seen: dict[str, dict[str, int]] = {}

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for _ in range(20):
                assert (await client.get("/hello")).status_code == 200
            await asyncio.sleep(LINGER_S + SETTLE_S + 1.5)  # the threads settle and rest
            threads = {t.name: t.native_id for t in threading.enumerate()}
            assert set(AGENT_THREADS) <= set(threads), threads
            watched = {name: threads[name] for name in AGENT_THREADS}
            watched["loop"] = threading.get_native_id()
            seen["before"] = {name: _switches(tid) for name, tid in watched.items()}
            await asyncio.sleep(1.5)  # idle
            seen["after"] = {name: _switches(tid) for name, tid in watched.items()}
            assert (await client.get("/block")).status_code == 200
            await asyncio.sleep(0.5)  # the monitor judges the stall

    asyncio.run(main())
    woke = {name: seen["after"][name] - seen["before"][name] for name in seen["after"]}
    # The agent's threads never ran; the loop thread woke for the test's own sleep only
    # (a 100-per-second heartbeat before).
    assert all(woke[name] == 0 for name in AGENT_THREADS), woke
    assert woke["loop"] <= 3, woke
    events = [
        json.loads(line)
        for line in capfd.readouterr().err.splitlines()
        if line.startswith("{") and "event_loop_blocked" in line
    ]
    (event,) = events
    assert event["route"] == "/block", event
    assert event["callsite"].endswith(f"test_idle.py:{_block_line()}"), event
