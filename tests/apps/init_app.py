"""An app that starts the agent itself, in code, as a user would without `perfagent run`."""

from fastapi import FastAPI

import perfagent

app = FastAPI()


@app.get("/orders/{order_id}")
async def order(order_id: int):
    return {"order": order_id}


perfagent.init(app)
