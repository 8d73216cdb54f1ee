"""FastAPI app used by the tests: routers, mounts, Flask inside, streams, errors."""

import asyncio
import os
import sys
import time

from a2wsgi import WSGIMiddleware
from fastapi import APIRouter, BackgroundTasks, FastAPI
from fastapi.responses import StreamingResponse
from flask import Flask

app = FastAPI()
router = APIRouter(prefix="/api/v1")


@app.get("/hello")
def hello():
    return {"hello": "world"}


@app.get("/items/{item_id}")
async def item(item_id: int):
    return {"item": item_id}


@app.post("/items")
async def create_item():
    return {"created": True}


@router.get("/users/{user_id}")
def user(user_id: int):
    return {"user": user_id}


app.include_router(router)


@app.get("/fail")
async def fail():
    raise RuntimeError("boom")


@app.get("/sse")
async def sse(events: int = 3, gap: float = 0.5):
    async def stream():
        for i in range(events):
            yield f"data: {i}\n\n"
            await asyncio.sleep(gap)

    return StreamingResponse(stream(), media_type="text/event-stream")


@app.get("/background")
async def background(tasks: BackgroundTasks, seconds: float = 1.0):
    tasks.add_task(time.sleep, seconds)
    return {"queued": True}


@app.get("/sleep")
async def sleep(seconds: float = 0.6):
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@app.get("/propagate")
async def propagate_context():
    """What an OpenTelemetry-instrumented client would send downstream."""
    from opentelemetry import propagate

    carrier: dict = {}
    propagate.inject(carrier)
    return carrier


@app.get("/agent")
def agent():
    return {"perfagent_loaded": "perfagent" in sys.modules, "pid": os.getpid()}


sub = FastAPI()


@sub.get("/ping/{n}")
def ping(n: int):
    return {"pong": n}


app.mount("/sub", sub)

legacy = Flask("legacy")


@legacy.get("/users/<int:uid>")
def legacy_user(uid):
    return {"legacy": uid}


app.mount("/legacy", WSGIMiddleware(legacy))
