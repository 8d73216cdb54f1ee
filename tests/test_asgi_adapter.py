"""The ASGI adapter's start and end of a request, in C (``_perrequest.AsgiBegin``,
``AsgiRequest``, ``end_request``) and in Python (``_PythonBegin``, ``_Request``,
``_python_end``): the same records, headers and clean-up from both, on a real
FastAPI app called in-process."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from opentelemetry import trace

import perfagent
from perfagent.frameworks import asgi
from perfagent.record import current


def _app(db: str) -> tuple[FastAPI, dict]:
    app = FastAPI()
    sub = FastAPI()
    seen: dict = {}

    @app.get("/items/{item_id}")
    async def item(item_id: int):
        seen["span"] = trace.get_current_span().get_span_context()
        seen["record"] = current.get()
        with contextlib.closing(sqlite3.connect(db)) as conn:  # `with conn` only commits
            conn.execute("SELECT 1").fetchall()
            conn.execute("SELECT 2").fetchall()
        return {"item": item_id}

    @app.get("/one")
    async def one():
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("SELECT 1").fetchall()
        return {}

    @app.get("/stream")
    async def stream():
        async def chunks():
            for chunk in (b"a", b"b", b"c"):
                yield chunk
                await asyncio.sleep(0.005)

        return StreamingResponse(chunks())

    @app.get("/boom")
    async def boom():
        raise LookupError("the view failed")

    @sub.get("/inner")
    async def inner():
        return {}

    app.mount("/sub", sub)
    return app, seen


@pytest.mark.parametrize("compiled", [True, False])
def test_the_adapter_records_each_request_once_and_cleans_up(tmp_path, compiled):
    app, seen = _app(str(tmp_path / "db.sqlite"))
    perfagent.init(app, metrics_port=0, compiled_hooks=compiled)
    agent = perfagent._state["agent"]
    begin = next(a for a in _adapters(app))._begin
    assert type(begin).__name__ == ("AsgiBegin" if compiled else "_PythonBegin")
    finished = []
    finish = agent.finish

    def spy(record):  # watches what reaches the pipeline; changes nothing
        finished.append(record)
        finish(record)

    agent.finish = spy

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = {}
            for path in ("/items/3", "/stream", "/boom", "/sub/inner"):
                responses[path] = await client.get(path)
            responses["FOO"] = await client.request("FOO", "/items/3")
        return responses, trace.get_current_span(), current.get()

    responses, span_after, record_after = asyncio.run(main())
    by_path = {r.carrier["path"]: r for r in finished if r.method == "GET"}
    assert len(finished) == 5, "each request once, the mounted app's too"
    assert span_after is trace.INVALID_SPAN and record_after is None
    assert not agent.inflight

    item = by_path["/items/3"]
    assert seen["record"] is item and item.done
    assert seen["span"].trace_id == item.trace_ids()[0]
    assert (item.method, item.route, item.status, item.error_type) == (
        "GET",
        "/items/{item_id}",
        200,
        None,
    )
    assert item.start <= item.response_start <= item.first_byte == item.end
    assert not item.streaming and len(item.queries) == 2
    timing = responses["/items/3"].headers["server-timing"]
    total = re.fullmatch(r'total;dur=(\d+\.\d{3}), db;dur=(\d+\.\d{3});desc="2 queries"', timing)
    assert total is not None, timing
    assert total.group(2) == f"{item.db_time * 1000:.3f}"
    assert float(total.group(1)) <= (item.end - item.start) * 1000 + 0.001

    stream = by_path["/stream"]
    assert stream.streaming and stream.first_byte < stream.end
    assert responses["/stream"].content == b"abc"
    assert "db;" not in responses["/stream"].headers["server-timing"]

    boom = by_path["/boom"]
    assert (boom.status, boom.error_type, boom.route) == (500, "LookupError", "/boom")
    assert responses["/boom"].status_code == 500

    assert by_path["/sub/inner"].route == "/sub/inner"
    other = [r for r in finished if r.method == "_OTHER"]
    assert len(other) == 1 and other[0].status == 405

    buffer = agent.metrics.stats.buffer()
    assert {method: started - ended for method, (started, ended) in buffer.active.items()} == {
        "GET": 0,
        "_OTHER": 0,
    }


@pytest.mark.parametrize("compiled", [True, False])
def test_server_timing_says_one_query_and_n_queries(tmp_path, compiled):
    """Issue 24 item 7: "1 query" (it said "1 queries"), "2 queries", from the C
    header writer and from its Python twin."""
    app, _ = _app(str(tmp_path / "db.sqlite"))
    perfagent.init(app, metrics_port=0, compiled_hooks=compiled)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                (await client.get(path)).headers["server-timing"] for path in ("/one", "/items/1")
            ]

    one, two = asyncio.run(main())
    assert re.fullmatch(r'total;dur=\d+\.\d{3}, db;dur=\d+\.\d{3};desc="1 query"', one), one
    assert two.endswith(';desc="2 queries"'), two


@pytest.mark.parametrize("compiled", [True, False])
def test_the_agents_own_failure_at_the_start_leaves_the_request_untimed(
    tmp_path, monkeypatch, compiled
):
    """A record that cannot be made (the record class broken on purpose) is an internal
    error of the agent: the app still answers, untimed."""
    app, _ = _app(str(tmp_path / "db.sqlite"))
    monkeypatch.setattr(asgi, "RequestRecord", _Broken)
    perfagent.init(app, metrics_port=0, compiled_hooks=compiled)
    agent = perfagent._state["agent"]

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/items/1")

    response = asyncio.run(main())
    assert response.status_code == 200 and "server-timing" not in response.headers
    assert "asgi.start" in agent._errors_logged
    assert not agent.inflight and current.get() is None


class _Broken:
    def __init__(self, *args: object) -> None:
        raise RuntimeError("a bug in the agent")


def _adapters(app):
    """The perfagent adapters in an app's built middleware stack."""
    if app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()
    stack = app.middleware_stack
    while stack is not None:
        if isinstance(stack, asgi.PerfagentASGI):
            yield stack
        stack = getattr(stack, "app", None)


def _finished_records(agent) -> list:
    """The records that reach the agent's pipeline, in order; the pipeline unchanged."""
    finished = []
    finish = agent.finish
    agent.finish = lambda record: (finished.append(record), finish(record))
    return finished


async def _get(app, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path)


@pytest.mark.parametrize("compiled", [True, False])
def test_a_request_that_waits_for_a_pool_thread_has_its_wait_recorded(compiled):
    """``def`` views run on anyio's pool: with one thread, the third of three requests
    waits for the two before it (``RunSync`` in C, the closure in Python)."""
    import anyio.to_thread

    app = FastAPI()

    @app.get("/sync")
    def sync_view():
        time.sleep(0.05)
        return {}

    perfagent.init(app, metrics_port=0, compiled_hooks=compiled)
    agent = perfagent._state["agent"]
    assert type(anyio.to_thread.run_sync).__name__ == ("RunSync" if compiled else "function")
    finished = _finished_records(agent)

    async def main():
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await asyncio.gather(*(client.get("/sync") for _ in range(3)))
        # Outside a request the pool is used as it is, with nothing recorded.
        return await anyio.to_thread.run_sync(lambda x: x * 2, 21)

    assert asyncio.run(main()) == 42
    waits = sorted(record.thread_wait for record in finished)
    assert len(waits) == 3 and 0.0 <= waits[0] < 0.04
    assert waits[-1] >= 0.08  # two 50 ms views ran before it


def test_a_request_in_flight_holds_few_objects_the_young_collections_count():
    """The collector starts a young collection when the objects it tracks, allocated
    less freed, rise 700 above their low point; under load the requests in flight
    make that rise, so what each holds from its start to its end decides how often
    it collects (``Recycler`` in _perrequest.c). The compiled start holds its record
    and the context's own objects: no context-variable token (the values before are
    set again at the end) and no request object of its own (reused)."""
    import gc

    app = FastAPI()

    @app.get("/x")
    def view():
        return {}

    perfagent.init(app, metrics_port=0, compiled_hooks=True)  # the C, whatever the run's
    adapter = next(_adapters(app))
    assert type(adapter._begin).__name__ == "AsgiBegin"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/x",
        "raw_path": b"/x",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
    }

    async def send(message):
        pass

    async def main():
        held = []
        for _ in range(3):  # the first request leaves its request object to reuse
            before = gc.get_count()[0]
            request = adapter._begin(scope, send)
            held.append(gc.get_count()[0] - before)
            assert current.get() is request.record
            adapter._end(request)
            assert current.get() is None and trace.get_current_span() is trace.INVALID_SPAN
            del request
        return held

    gc.disable()
    try:
        held = asyncio.run(main())
    finally:
        gc.enable()
    assert max(held[1:]) <= 2, held


@pytest.mark.parametrize("compiled", [True, False])
def test_the_apps_random_numbers_stay_its_own(compiled):
    """Trace ids come from the agent's own generator: an app that seeds ``random``
    (test data, a reproducible simulation) gets the same numbers with the agent as
    without it, though every request's ids are drawn (for the head sample)."""
    import random

    app = FastAPI()

    @app.get("/draw")
    async def draw():
        return {"value": random.random()}

    perfagent.init(app, metrics_port=0, compiled_hooks=compiled)
    agent = perfagent._state["agent"]
    finished = _finished_records(agent)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [(await client.get("/draw")).json()["value"] for _ in range(5)]

    random.seed(1234)
    values = asyncio.run(main())
    expected = random.Random(1234)
    assert values == [expected.random() for _ in range(5)]
    assert len(finished) == 5 and all(record.sampled is not None for record in finished)
    assert len({record.trace_ids()[0] for record in finished}) == 5


@pytest.mark.parametrize("compiled", [True, False])
def test_the_span_id_is_drawn_only_when_something_asks_for_it(compiled):
    """The head sample and a finding's log line need the trace id alone: a request
    that nothing exports ends with its trace id drawn and its span id not; asked for
    later (an export, OpenTelemetry code, a log record), the span id is drawn then,
    once."""
    app = FastAPI()

    @app.get("/x")
    async def view():
        return {}

    perfagent.init(app, metrics_port=0, compiled_hooks=compiled, trace_sample=0.0)
    agent = perfagent._state["agent"]
    finished = _finished_records(agent)

    asyncio.run(_get(app, "/x"))
    (record,) = finished
    assert record.sampled is False and not record.keep
    assert record._trace_id != 0 and record._span_id == 0
    trace_id, span_id = record.trace_ids()
    assert trace_id == record._trace_id and span_id != 0
    assert record.trace_ids() == (trace_id, span_id)


def test_a_forked_worker_draws_trace_ids_of_its_own():
    """A pre-fork server's workers must not repeat each other's trace ids: the agent's
    generator is seeded again in each child, even where the app seeds ``random`` alike
    in every worker."""
    import os
    import random

    from perfagent.record import RequestRecord

    perfagent.init(metrics_port=0)

    def next_id() -> int:
        random.seed(99)  # what an app might do in each worker
        return RequestRecord("GET", 0.0, {}).trace_ids()[0]

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, to the parent
        try:
            os.write(write, next_id().to_bytes(16, "big"))
        finally:
            os._exit(0)
    os.close(write)
    child = int.from_bytes(os.read(read, 16), "big")
    os.close(read)
    os.waitpid(pid, 0)
    assert child and child != next_id()
