"""perfagent.init()/shutdown() in code: idempotent, composable, fully undone."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
import structlog
from fastapi import FastAPI
from flask import Flask
from helpers import request_counts
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import perfagent
from perfagent.export.metrics import serving_registry
from perfagent.logs import RequestContextFilter, add_request_context


def _counts():
    """What /metrics would show for this process (the same registry it serves)."""
    registry = serving_registry(perfagent._state["agent"].metrics, None)
    text = generate_latest(registry).decode()
    return request_counts([s for f in text_string_to_metric_families(text) for s in f.samples])


def _spans_handed_to_the_exporter() -> int:
    """Queued, sent or dropped: every server span perfagent tried to export."""
    agent = perfagent._state["agent"]
    dropped = agent.metrics.dropped.labels("spans")._value.get()
    return len(agent.exporter._traces) + agent.exporter.sent + int(dropped)


def _fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/things/{thing_id}")
    async def thing(thing_id: int):
        return {"thing": thing_id}

    return app


async def _get(app, path: str, times: int = 1) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(times):
            response = await client.get(path)
    return response


def test_init_twice_and_init_all_never_double_count():
    app = _fastapi_app()
    perfagent.init(app, metrics_port=0, trace_sample=1)
    perfagent.init(app, metrics_port=0)
    perfagent.init(metrics_port=0)  # and every app: this one is now wrapped twice
    asyncio.run(_get(app, "/things/1", times=4))
    assert _counts() == {("GET", "/things/{thing_id}", "200"): 4}
    assert _spans_handed_to_the_exporter() == 4  # one server span per request


def test_flask_init_app_and_class_patch_count_once():
    app = Flask("t")

    @app.get("/users/<int:uid>")
    def user(uid):
        return "u"

    perfagent.init(metrics_port=0)
    perfagent.init(app, metrics_port=0)
    client = app.test_client()
    for _ in range(3):
        with client.get("/users/4") as response:  # the server closes the body: end of request
            assert response.headers["Server-Timing"].startswith("total;dur=")
    assert _counts() == {("GET", "/users/<int:uid>", "200"): 3}


def test_flask_server_timing_says_one_query(tmp_path):
    """Issue 24 item 7: "1 query", "2 queries" on a Flask response (WSGI adapter)."""
    import sqlite3

    app = Flask("t")
    db = str(tmp_path / "db.sqlite")

    @app.get("/queries/<int:n>")
    def queries(n):
        conn = sqlite3.connect(db)
        for i in range(n):
            conn.execute("SELECT ?", (i,)).fetchall()
        conn.close()
        return "ok"

    perfagent.init(app, metrics_port=0)
    client = app.test_client()
    with client.get("/queries/1") as one, client.get("/queries/2") as two:
        assert one.headers["Server-Timing"].endswith(';desc="1 query"'), one.headers
        assert two.headers["Server-Timing"].endswith(';desc="2 queries"'), two.headers


def test_shutdown_removes_the_adapter_from_a_running_app():
    app = _fastapi_app()
    perfagent.init(app, metrics_port=0)
    assert "server-timing" in asyncio.run(_get(app, "/things/1")).headers
    perfagent.shutdown()
    assert "server-timing" not in asyncio.run(_get(app, "/things/1")).headers


def test_disabled_init_installs_nothing():
    app = _fastapi_app()
    perfagent.init(app, enabled=False)
    assert perfagent._state["agent"] is None
    assert "server-timing" not in asyncio.run(_get(app, "/things/1")).headers


def test_init_rejects_what_it_cannot_instrument():
    with pytest.raises(TypeError, match="not a Flask, FastAPI, Starlette or FastHTML app"):
        perfagent.init(object(), metrics_port=0)


def test_composes_with_opentelemetry_fastapi_instrumentor():
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = _fastapi_app()
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    try:
        perfagent.init(app, metrics_port=0, trace_sample=1)
        asyncio.run(_get(app, "/things/2", times=3))
        assert _counts() == {("GET", "/things/{thing_id}", "200"): 3}
        server_spans = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
        assert len(server_spans) == 3  # theirs, still SERVER spans, once each
        assert _spans_handed_to_the_exporter() == 0, "perfagent adds no second server span"
    finally:
        FastAPIInstrumentor.uninstrument_app(app)


def test_composes_with_fastapi_builtin_telemetry():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        from fastapi.telemetry import TelemetryConfig
    except ImportError:
        pytest.skip("this FastAPI has no built-in telemetry (0.142+)")
    app = FastAPI(telemetry=TelemetryConfig(tracer_provider=provider))

    @app.get("/orders/{order_id}")
    async def order(order_id: int):
        return {"order": order_id}

    perfagent.init(app, metrics_port=0, trace_sample=1)
    asyncio.run(_get(app, "/orders/9", times=2))
    assert _counts() == {("GET", "/orders/{order_id}", "200"): 2}
    routes = [s.attributes.get("http.route") for s in exporter.get_finished_spans()]
    assert routes.count("/orders/{order_id}") == 2
    assert _spans_handed_to_the_exporter() == 0, "perfagent adds no second server span"


def test_log_processor_and_filter_carry_the_request_context():
    app = FastAPI()
    seen: dict = {}
    handler_records: list = []

    class Keep(logging.Handler):
        def emit(self, record):
            handler_records.append(record)

    stdlib = logging.getLogger("test.app")
    stdlib.addHandler(Keep())
    stdlib.addFilter(RequestContextFilter())
    stdlib.setLevel(logging.INFO)

    @app.get("/orders/{order_id}")
    async def order(order_id: int):
        seen.update(add_request_context(None, "info", {"event": "x"}))
        stdlib.info("in the request")
        return {}

    perfagent.init(app, metrics_port=0)
    asyncio.run(_get(app, "/orders/1"))
    assert seen["route"] == "/orders/{order_id}"
    assert len(seen["trace_id"]) == 32 and len(seen["span_id"]) == 16
    assert handler_records[0].trace_id == seen["trace_id"]
    assert handler_records[0].route == "/orders/{order_id}"
    stdlib.info("outside")
    assert handler_records[1].trace_id == "" and handler_records[1].route == ""
    assert "trace_id" not in add_request_context(None, "info", {"event": "y"})
    structlog.reset_defaults()


def test_the_request_span_is_current_in_the_request_and_gone_after_it():
    """OpenTelemetry code in a view finds the request's span (its ids are the
    request's), and once the request is over the caller's context is as it was."""
    from opentelemetry import trace

    app = FastAPI()
    seen: dict = {}

    @app.get("/inside")
    async def inside():
        seen["context"] = trace.get_current_span().get_span_context()
        return {}

    trace_id = 0x0AF7651916CD43DD8448EB211C80319C
    traceparent = f"00-{trace_id:032x}-b7ad6b7169203331-01"

    async def main():
        before = trace.get_current_span()
        transport = httpx.ASGITransport(app=app)  # the app runs in this task's context
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get("/inside", headers={"traceparent": traceparent})
        return before, trace.get_current_span()

    perfagent.init(app, metrics_port=0)
    before, after = asyncio.run(main())
    assert seen["context"].trace_id == trace_id and seen["context"].is_valid
    assert after is before is trace.INVALID_SPAN


@pytest.mark.parametrize("through_api", [False, True])
def test_the_request_span_is_attached_and_detached_through_the_variable_or_the_api(through_api):
    """OpenTelemetry's default runtime context is set directly; any other through its API."""
    from opentelemetry import trace

    from perfagent.export.otel_context import OtelBridge

    bridge = OtelBridge(lambda record: False)
    if through_api:
        bridge.variable = None  # as with another OTEL_PYTHON_CONTEXT
    else:
        assert bridge.variable is not None
    token = bridge.enter()
    assert token is not None and trace.get_current_span() is bridge._span
    bridge.exit(token)
    assert trace.get_current_span() is trace.INVALID_SPAN
    bridge.exit(token)  # a second reset is refused by the variable: not raised
    other = trace.NonRecordingSpan(trace.SpanContext(1, 2, False))
    with trace.use_span(other):
        assert bridge.enter() is None  # another instrumentation's span stays current
        assert trace.get_current_span() is other
