"""Slow routes whose time goes to a known line; lines the tests expect carry "# MARK name"."""

import asyncio
import os
import time

from fastapi import FastAPI

import perfagent

app = FastAPI()


def burn(seconds: float) -> int:
    end = time.perf_counter() + seconds
    turns = 0
    while time.perf_counter() < end:  # MARK burn
        turns += 1  # MARK burn
    return turns


async def pause() -> None:
    await asyncio.sleep(0.5)  # MARK pause


def nap() -> None:
    time.sleep(0.5)  # MARK nap


@perfagent.timed
def render() -> str:
    time.sleep(0.005)
    return "page"


@app.get("/slow/async-helper")
async def slow_async_helper():
    await pause()
    return {}


@app.get("/slow/sync-helper")
def slow_sync_helper():
    nap()
    return {}


@app.get("/slow/cpu")
def slow_cpu():
    return {"turns": burn(0.5)}


@app.get("/slow/lenient")
async def slow_lenient():
    await asyncio.sleep(0.5)
    return {}


@app.get("/variable")
async def variable(delay: float = 0.0):
    await asyncio.sleep(delay)
    return {}


@app.get("/fast")
async def fast():
    return {"fast": True}


@app.get("/timed")
async def timed_route():
    with perfagent.span("load"):
        await asyncio.sleep(0.01)
    return {"page": render()}


@app.get("/pid")
def pid():
    return {"pid": os.getpid()}
