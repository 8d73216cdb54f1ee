"""Traces of the requests worth keeping, over OTLP/HTTP, to a real receiver."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from helpers import PERFAGENT, clean_env, free_port, scrape, wait_for_counts
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from otlp_receiver import Receiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def receiver():
    receiver = Receiver(free_port())
    yield receiver
    receiver.stop()


def _start(servers, receiver, command: list[str], sample: str = "0", **env):
    port, metrics_port = free_port(), free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", str(metrics_port)]
    argv += ["--console-url", receiver.url, "--log-format", "json", "--"]
    argv += [part.format(port=port) for part in command]
    server = servers(argv, port, clean_env(PERFAGENT_TRACE_SAMPLE=sample, **env))
    server.wait_listening()
    return server, metrics_port


UVICORN = ["uvicorn", "fastapi_app:app", "--port", "{port}"]
GUNICORN = ["gunicorn", "-w", "2", "-b", "127.0.0.1:{port}", "flask_app:app"]


def _log_events(server, event: str) -> list[dict]:
    return [
        json.loads(line)
        for line in server.output().splitlines()
        if line.startswith("{") and f'"{event}"' in line
    ]


def test_slow_and_failed_requests_are_kept_and_the_rest_dropped(servers, receiver):
    server, _ = _start(servers, receiver, UVICORN, PERFAGENT_SLOW_MS="300")
    for _ in range(5):
        assert server.get("/hello").status_code == 200
    assert server.get("/sleep?seconds=0.4").status_code == 200
    assert server.get("/fail").status_code == 500

    spans = receiver.wait_for(2)
    assert sorted(s["name"] for s in spans) == ["GET /fail", "GET /sleep"]
    by_name = {s["name"]: s for s in spans}

    slow = by_name["GET /sleep"]
    assert slow["kind"] == Span.SPAN_KIND_SERVER
    assert slow["events"] == ["slow_request"]
    assert 0.4e9 <= slow["end"] - slow["start"] < 5e9
    assert abs(slow["end"] / 1e9 - time.time()) < 60  # real wall-clock times
    attrs = slow["attributes"]
    assert attrs["http.request.method"] == "GET" and attrs["http.route"] == "/sleep"
    assert attrs["http.response.status_code"] == 200 and attrs["url.path"] == "/sleep"
    assert attrs["url.scheme"] == "http" and attrs["server.address"] == "127.0.0.1"
    assert slow["resource"]["service.name"] == "fastapi_app"  # inferred from the command

    failed = by_name["GET /fail"]
    assert failed["status"] == Status.STATUS_CODE_ERROR
    assert failed["attributes"]["error.type"] == "RuntimeError"
    assert failed["attributes"]["http.response.status_code"] == 500

    (event,) = _log_events(server, "slow_request")
    assert event["trace_id"] == slow["trace_id"], "the log line points at the exported trace"


def test_incoming_traceparent_is_continued_and_its_sampled_flag_honoured(servers, receiver):
    server, _ = _start(servers, receiver, UVICORN)
    sampled = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=1"}
    not_sampled = {"traceparent": f"00-{'1' * 32}-{PARENT_ID}-00"}
    answer = server.get("/propagate", headers=sampled).json()
    assert server.get("/hello", headers=not_sampled).status_code == 200

    (span,) = receiver.wait_for(1)
    assert span["name"] == "GET /propagate"
    assert span["trace_id"] == TRACE_ID and span["parent_span_id"] == PARENT_ID
    # What an OpenTelemetry-instrumented client sends downstream continues the trace,
    # with the request's server span as the parent.
    assert answer["traceparent"] == f"00-{TRACE_ID}-{span['span_id']}-01"


def test_head_sample_keeps_complete_traces(servers, receiver):
    server, _ = _start(servers, receiver, UVICORN, sample="1")
    for i in range(10):
        assert server.get(f"/items/{i}").status_code == 200
    spans = receiver.wait_for(10)
    assert len(spans) == 10
    assert {s["name"] for s in spans} == {"GET /items/{item_id}"}
    assert len({s["trace_id"] for s in spans}) == 10
    assert all(s["parent_span_id"] == "" for s in spans)


def test_otel_traces_sampler_variables_are_honoured(servers, receiver):
    server, _ = _start(
        servers, receiver, UVICORN, OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="1"
    )
    for _ in range(3):
        assert server.get("/hello").status_code == 200
    assert len(receiver.wait_for(3)) == 3


def test_flask_under_gunicorn_traces_and_propagates(servers, receiver):
    server, _ = _start(servers, receiver, GUNICORN)
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    answer = server.get("/propagate", headers=headers).json()
    assert server.get("/fail").status_code == 500
    spans = receiver.wait_for(2)
    by_name = {s["name"]: s for s in spans}
    assert set(by_name) == {"GET /propagate", "GET /fail"}
    kept = by_name["GET /propagate"]
    assert kept["trace_id"] == TRACE_ID
    assert answer["traceparent"] == f"00-{TRACE_ID}-{kept['span_id']}-01"
    assert by_name["GET /fail"]["attributes"]["error.type"] == "500"
    assert by_name["GET /fail"]["attributes"]["http.route"] == "/fail"


def test_a_dead_collector_costs_the_app_nothing_but_the_dropped_counter(servers):
    collector_port = free_port()
    collector = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "otlp_receiver.py"), str(collector_port)]
    )
    try:

        class Dead:  # the receiver fixture's interface, for _start
            url = f"http://127.0.0.1:{collector_port}"

        server, metrics_port = _start(servers, Dead, UVICORN, sample="1")
        assert server.get("/hello").status_code == 200
        time.sleep(1.0)  # exported while the collector lives
    finally:
        collector.kill()
        collector.wait()

    started = time.monotonic()
    with requests.Session() as session:
        for i in range(3000):
            assert session.get(f"{server.base}/items/{i}", timeout=10).status_code == 200
    took = time.monotonic() - started
    wait_for_counts(metrics_port, 3001)
    time.sleep(1.5)
    dropped = {
        s.labels["what"]: s.value
        for s in scrape(metrics_port)
        if s.name == "perfagent_dropped_total"
    }
    # Everything not sent is counted; the queue holds at most 2048 records.
    assert dropped["spans"] >= 3000 - 2048, dropped
    assert took < 60, f"3000 requests took {took:.1f}s with the collector down"


def test_each_query_is_a_client_span_of_the_request(servers, receiver, tmp_path):
    """sqlite3 through ``Connection.execute``/``executemany``: one CLIENT span per
    statement under the server span, the SQL as its fingerprint, the batch size."""
    server, _ = _start(
        servers,
        receiver,
        ["uvicorn", "db_app:app", "--port", "{port}"],
        sample="1",
        DB_PATH=str(tmp_path / "app.sqlite"),
        PG_DSN="",
    )
    assert server.get("/raw/nplusone").status_code == 200
    assert server.get("/raw/executemany").status_code == 200
    spans = receiver.wait_for(2 + 11 + 2)
    by_trace: dict[str, list[dict]] = {}
    for span in spans:
        by_trace.setdefault(span["trace_id"], []).append(span)
    traces = {
        next(s["name"] for s in trace if s["kind"] == Span.SPAN_KIND_SERVER): trace
        for trace in by_trace.values()
    }
    assert set(traces) == {"GET /raw/nplusone", "GET /raw/executemany"}

    for name, trace in traces.items():
        (root,) = [s for s in trace if s["kind"] == Span.SPAN_KIND_SERVER]
        queries = [s for s in trace if s["kind"] == Span.SPAN_KIND_CLIENT]
        assert all(q["parent_span_id"] == root["span_id"] for q in queries)
        assert all(root["start"] <= q["start"] <= q["end"] <= root["end"] for q in queries)
        assert all(q["attributes"]["db.system.name"] == "sqlite" for q in queries)
        texts = [q["attributes"]["db.query.text"] for q in queries]
        if name == "GET /raw/nplusone":
            assert (
                texts
                == ["SELECT id FROM post"] + ["SELECT count(*) FROM comment WHERE post_id=?"] * 10
            )
            assert {q["name"] for q in queries} == {"SELECT"}
            assert "n_plus_one" in root["events"]
        else:
            assert [q["name"] for q in queries] == ["CREATE", "INSERT"]
            insert = queries[1]
            assert insert["attributes"]["db.query.text"] == "INSERT INTO scratch VALUES(...)"
            assert insert["attributes"]["db.operation.batch.size"] == 1000


def test_gunicorn_workers_seeding_random_alike_keep_their_numbers_and_distinct_ids(
    servers, receiver
):
    """Each pre-fork worker seeds ``random`` the same way at import. The trace ids
    come from the agent's own generator, seeded again in each worker: no two requests
    share a trace id, and each worker's ``random.random()`` gives exactly the seeded
    sequence, however many ids the agent drew meanwhile."""
    server, _ = _start(servers, receiver, GUNICORN, APP_RANDOM_SEED="99")
    by_worker: dict[int, list[float]] = {}
    trace_ids = []
    for _ in range(400):  # new connections until both workers have answered a few
        answer = requests.get(f"{server.base}/draw", timeout=10).json()
        by_worker.setdefault(answer["pid"], []).append(answer["value"])
        trace_ids.append(answer["traceparent"].split("-")[1])
        if len(by_worker) == 2 and min(map(len, by_worker.values())) >= 3:
            break
    assert len(by_worker) == 2, "one worker answered every request"
    assert len(set(trace_ids)) == len(trace_ids)
    for values in by_worker.values():
        seeded = random.Random(99)
        assert values == [seeded.random() for _ in values]
