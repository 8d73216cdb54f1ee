"""A small FastAPI shop to try perfagent on.

    perfagent run -- uvicorn --app-dir examples fastapi_app:app

Then open http://127.0.0.1:8000/items/3 and http://127.0.0.1:8000/report (slow
on purpose) and look at http://127.0.0.1:9464/metrics and the agent's log lines.
"""

import asyncio

from fastapi import APIRouter, FastAPI

app = FastAPI(title="perfagent example shop")
admin = APIRouter(prefix="/admin")


@app.get("/")
async def home():
    return {"try": ["/items/3", "/report", "/admin/users/1", "/docs"]}


@app.get("/items/{item_id}")
async def item(item_id: int):
    return {"item": item_id, "name": f"item {item_id}"}


@app.get("/report")
async def report():
    await asyncio.sleep(0.7)  # over the default 500 ms: logged as a slow_request
    return {"rows": 1000}


@admin.get("/users/{user_id}")
def user(user_id: int):
    return {"user": user_id}


app.include_router(admin)
