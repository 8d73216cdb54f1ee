"""FastHTML: a handler that blocks the event loop, and its fixed twin.

    perfagent run -- uvicorn --app-dir examples fasthtml_blocking:app

/blocking sleeps with time.sleep inside an async handler: every other request
on the worker waits, and the agent logs event_loop_blocked naming this line.
/fixed awaits asyncio.sleep instead; /offloaded runs the blocking call in a thread.
"""

import asyncio
import time

from fasthtml.common import P, Titled, fast_app

app, rt = fast_app()


@rt("/blocking")
async def get():
    time.sleep(0.3)  # blocks the loop: every request on this worker waits
    return Titled("Blocking", P("done, the slow way"))


@rt("/fixed")
async def get():  # noqa: F811 - FastHTML takes the method from the handler's name
    await asyncio.sleep(0.3)  # the loop serves other requests meanwhile
    return Titled("Fixed", P("done, without blocking"))


@rt("/offloaded")
async def get():  # noqa: F811
    await asyncio.to_thread(time.sleep, 0.3)  # blocking work moved to a thread
    return Titled("Offloaded", P("done on a thread"))
