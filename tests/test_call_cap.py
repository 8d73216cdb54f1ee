"""A request past ``max_calls_per_request``: its first calls kept in full, the rest
counted (query count, database histogram, db time), in the C hook and in Python; and
an export that one huge trace cannot take other traces down with."""

from __future__ import annotations

import pytest
import requests
from helpers import PERFAGENT, clean_env, free_port, scrape, wait_for_counts
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from otlp_receiver import Receiver

ROUTE = "/queries/<int:count>"


def _start(servers, **env: str):
    port, metrics_port = free_port(), free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", str(metrics_port), "--"]
    argv += ["python", "many_queries_app.py"]
    environ = clean_env(PORT=str(port), **{"PERFAGENT_CONSOLE_URL": "http://127.0.0.1:9", **env})
    server = servers(argv, port, environ)
    server.wait_listening()
    return server, metrics_port


def _value(samples: list, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.parametrize("compiled", ["1", "0"], ids=["compiled", "python"])
def test_calls_past_the_cap_are_counted_not_kept(servers, compiled):
    server, metrics_port = _start(
        servers,
        PERFAGENT_COMPILED_HOOKS=compiled,
        PERFAGENT_MAX_CALLS_PER_REQUEST="1000",
        PERFAGENT_SLOW_MS="3600000",  # no stack samples of the long requests: calls only
    )
    # The memory a request holds for its calls: 100,000 hold no more than 3,000.
    small = server.get("/traced/3000").json()["held"]
    large = server.get("/traced/100000").json()["held"]
    assert large < 1.5 * small, (small, large)

    response = server.get("/queries/100000")
    assert response.status_code == 200
    assert response.headers["server-timing"].endswith(';desc="100000 queries"')
    assert server.get("/queries/10").status_code == 200

    wait_for_counts(metrics_port, 4)
    samples = scrape(metrics_port)
    queries = "perfagent_request_db_queries"
    assert _value(samples, queries + "_sum", http_route=ROUTE) == 100_010
    assert _value(samples, queries + "_count", http_route=ROUTE) == 2
    assert _value(samples, queries + "_bucket", http_route=ROUTE, le="500.0") == 1
    db = "db_client_operation_duration_seconds_count"
    assert _value(samples, db, db_system_name="sqlite", db_operation_name="SELECT") == 203_010
    dropped = "perfagent_dropped_total"
    assert _value(samples, dropped, what="calls") == 2000 + 99_000 + 99_000
    # The loop is an N+1 in each request, seen in the calls kept.
    assert _value(samples, "perfagent_n_plus_one_total", http_route=ROUTE) == 2


def test_one_huge_trace_takes_no_other_trace_with_it(servers):
    """The receiver refuses a request over 1 MiB, as a collector does past its limit;
    the agent sends at most that, a trace too large alone cut to its first spans."""
    receiver = Receiver(free_port(), max_body=1 << 20)
    try:
        server, metrics_port = _start(
            servers,
            PERFAGENT_CONSOLE_URL=receiver.url,
            PERFAGENT_TRACE_SAMPLE="1",
            PERFAGENT_MAX_CALLS_PER_REQUEST="50000",
            PERFAGENT_MAX_EXPORT_BYTES=str(1 << 20),
        )
        with requests.Session() as session:  # one thread: all in one batch, quickly
            for i in range(40):
                path = "/queries/20000" if i == 20 else "/hello"
                assert session.get(server.base + path, timeout=60).status_code == 200
        spans = receiver.wait_for(40 + 1000, timeout=20)
        assert receiver.refused == 0
        servers_spans = [s for s in spans if s["kind"] == Span.SPAN_KIND_SERVER]
        assert sorted(s["name"] for s in servers_spans) == ["GET /hello"] * 39 + [f"GET {ROUTE}"]
        (big,) = [s for s in servers_spans if s["name"] == f"GET {ROUTE}"]
        kept = [s for s in spans if s["parent_span_id"] == big["span_id"]]
        assert 1000 < len(kept) < 20_000
        cut = _value(scrape(metrics_port), "perfagent_dropped_total", what="trace_spans")
        assert cut == 20_000 - len(kept)
        assert _value(scrape(metrics_port), "perfagent_dropped_total", what="spans") == 0
    finally:
        receiver.stop()
