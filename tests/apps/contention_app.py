"""FastAPI app for the CPU-contention watchdog test: a request that waits, one that spins."""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI

app = FastAPI()


@app.get("/ok")
async def ok():
    return {"ok": True}


@app.get("/wait")
async def wait(seconds: float = 1.0):
    await asyncio.sleep(seconds)  # the loop is free all along
    return {"waited": seconds}


@app.get("/spin")
async def spin(cpu: float = 0.3):
    """Blocks the loop until this thread has burnt ``cpu`` seconds of CPU."""
    started, wall = time.thread_time(), time.perf_counter()
    spins = 0
    while time.thread_time() - started < cpu:  # block: spin
        spins += 1
    return {"cpu": time.thread_time() - started, "wall": time.perf_counter() - wall}
