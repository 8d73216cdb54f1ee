"""FastAPI app for the dashboard test: one route that does every bad thing the dashboards show.

``/orders/{order_id}`` always issues an N+1 (one SELECT per line item, from one
line); every even order also sleeps on the event loop (a slow request, tolerated
for Apdex, and an event-loop block); every fifth fails with a 500. ``/ok`` is fast and clean.
One route for everything lets the test pick a single concrete ``$route``
under which every panel of the route dashboard has data.
"""

import sqlite3
import time

from fastapi import FastAPI, HTTPException

app = FastAPI()
ITEMS = 6  # above PERFAGENT_NPLUSONE_MIN (5): one N+1 per order


@app.get("/ok")
async def ok():
    return {"ok": True}


@app.get("/orders/{order_id}")
async def order(order_id: int):
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE item (id INTEGER PRIMARY KEY, price INTEGER)")
    conn.executemany("INSERT INTO item VALUES (?, ?)", [(i, i * 10) for i in range(ITEMS)])
    total = 0
    for (item_id,) in conn.execute("SELECT id FROM item").fetchall():
        total += conn.execute("SELECT price FROM item WHERE id = ?", (item_id,)).fetchone()[0]
    conn.close()
    if order_id % 2 == 0:
        time.sleep(0.3)  # blocks the loop: slow (tolerated for Apdex) and an event-loop block
    if order_id % 5 == 0:
        raise HTTPException(status_code=500, detail="order failed")
    return {"order": order_id, "total": total}
