"""The end-of-request pipeline in C (``_perrequest.Finisher``) against ``Agent.finish``
in Python: the same records through both give the same histograms, the same kept
traces, findings, slow counts and head-sampling draws, and the same internal errors."""

from __future__ import annotations

import io
import random
import sys
from time import perf_counter

import pytest

from perfagent.agent import Agent
from perfagent.config import load_settings
from perfagent.record import IDS, ROOT_PARENT, RequestRecord

_SCOPE = {"type": "http", "headers": [(b"host", b"x")], "method": "GET"}
_PARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-"


def _agent(compiled: bool, sample: float = 0.3) -> Agent:
    settings = load_settings(
        {
            "compiled_hooks": compiled,
            "metrics_port": 0,
            "console_url": "http://127.0.0.1:9",
            "profile_token": "a-token-of-16-chars",
            "slow_ms": 100,
            "slow_routes": "/report=50,/now=5000",
            "trace_sample": sample,
        },
        environ={},
    )
    return Agent(settings)


class _Unreadable:
    def __bool__(self) -> bool:
        raise RuntimeError("a bug in the agent")


def _records(agent: Agent) -> list[RequestRecord]:
    """One record per case the pipeline tells apart."""

    def record(route: str | None = "/r", took: float = 0.01, **fields: object) -> RequestRecord:
        carrier = fields.pop("carrier", _SCOPE)
        made = RequestRecord(str(fields.pop("method", "GET")), 100.0, carrier)
        made.route, made.status, made.end = route, 200, 100.0 + took
        for name, value in fields.items():
            setattr(made, name, value)
        agent.inflight[made] = (0, None)
        return made

    cases = [record() for _ in range(40)]  # the head sample draws for each
    cases += [
        record(route=None),
        record(method="POST", took=0.2),  # slow
        record(route="/report", took=0.06),  # slow for its own threshold only
        record(route="/report", took=0.04),
        record(took=0.5, streaming=True, first_byte=100.01),  # a stream: its first byte
        record(took=0.5, streaming=True, first_byte=100.2),
        record(status=503),
        record(error_type="ValueError", status=500),
        record(profile=True),
        record(foreign=True, status=500),
        record(sampled=True),
        record(sampled=False, status=404),
        # Ends when finished: 1.2 s and a little, the little differing between the two
        # sides, so on a route of its own, mid-bucket and under its slow threshold.
        record(route="/now", end=None, start=perf_counter() - 1.2),
        record(done=True),
        record(thread_wait=0.003),
        record(findings=_Unreadable()),  # _keep_trace fails: an internal error, not the app's
        # The head sample follows a caller's sampled flag (parent-based by default).
        record(carrier={**_SCOPE, "headers": [(b"traceparent", _PARENT + b"01")]}),
        record(carrier={**_SCOPE, "headers": [(b"traceparent", _PARENT + b"00")]}),
        record(carrier={"HTTP_TRACEPARENT": (_PARENT + b"01").decode()}),  # WSGI
        record(carrier={"REQUEST_METHOD": "GET"}),
        record(carrier=None),
    ]
    frame = sys._getframe()
    n_plus_one, two_queries = cases[-7], cases[-11]
    for item in range(6):
        sql = f"SELECT 1 FROM t WHERE id = {item}"
        agent.capture.add(n_plus_one, "sqlite", sql, None, 0.0, 1e-3, frame)
    for item in range(2):
        agent.capture.add(two_queries, "sqlite", "SELECT 2", (item,), 0.0, 2e-3, None)
    for trace_id in (1, 2**128 - 1):  # ids at both ends, in the N+1 line's trace_id
        settled = record(_trace_id=trace_id, _span_id=1, parent=ROOT_PARENT)
        for item in range(5):
            sql = f"SELECT 3 FROM t WHERE id = {item}"
            agent.capture.add(settled, "sqlite", sql, None, 0.0, 1e-3, frame)
        cases.append(settled)
    return cases


def _kinds(findings: object) -> list[str] | None:
    return [kind for kind, _ in findings] if isinstance(findings, list) else None


def _ids(record: RequestRecord) -> tuple:
    return record._trace_id, record._span_id, record.parent


def _outcome(agent: Agent, records: list[RequestRecord]) -> dict[str, object]:
    IDS.seed(7)
    agent.log._stream = stream = io.StringIO()
    for record in records:
        agent.finish(record)
    buffer = agent.metrics.stats.buffer()
    lines = [line.split(" ", 1)[1] for line in stream.getvalue().splitlines()]  # timestamp off
    # The "/now" request ends when finished: its sums differ by the time between.
    tables = [
        {
            key: [*entry[:-1], pytest.approx(entry[-1], abs=0.5 if "/now" in key else 1e-9)]
            for key, entry in table.items()
        }
        for table in buffer.tables
    ]
    return {
        "tables": tables,
        "active": buffer.active,
        "records": [
            (r.done, r.keep, r.end is not None, r.sampled, _kinds(r.findings), *_ids(r))
            for r in records
        ],
        "inflight": len(agent.inflight),
        "slow": {key: child._value.get() for key, child in agent.metrics._slow_children.items()},
        "errors": sorted(agent._errors_logged),
        "drawn": IDS.random(),  # as many head-sample draws on both sides
        "lines": lines,
        "counters": sorted(entry[0] for entry in buffer.counts.values()),
        "exported": [(kind, fields) for _, kind, fields, *_ in agent.exporter._findings],
    }


@pytest.mark.parametrize("sample", [0.3, 1.0, 0.0])
def test_the_compiled_finish_does_what_agent_finish_does(sample):
    python, compiled = _agent(False, sample), _agent(True, sample)
    try:
        assert type(compiled.finish).__name__ == "Finisher", "perfagent/_perrequest.c not built"
        assert type(python.finish).__name__ == "method"
        expected = _outcome(python, _records(python))
        got = _outcome(compiled, _records(compiled))
        assert got == expected
        # The cases did what they are for.
        kept = [keep for _, keep, *_ in expected["records"]]
        expected_kept = {1.0: range(40, 41), 0.0: range(1)}.get(sample, range(1, 40))
        assert sum(kept[:40]) in expected_kept
        assert expected["errors"] == ["Agent._keep_trace"]
        assert sum(expected["slow"].values()) == 3
        assert expected["inflight"] == 1  # the one that was done already: left alone
        assert expected["records"][-9][4] == ["n_plus_one"]
        assert sum("n_plus_one" in line for line in expected["lines"]) == 3
        assert f"trace_id={1:032x}" in "".join(expected["lines"])
        assert f"trace_id={2**128 - 1:032x}" in "".join(expected["lines"])
        assert expected["counters"] == [3]  # the route's one counter
        assert [kind for kind, _ in expected["exported"]].count("n_plus_one") == 2
        caller = 0x0AF7651916CD43DD8448EB211C80319C
        assert [r[3] for r in expected["records"][-7:-4]] == [True, False, True]
        assert [r[5] for r in expected["records"][-7:-4]] == [caller] * 3
    finally:
        python.stop()
        compiled.stop()


def test_a_step_that_raises_is_counted_and_the_next_steps_run():
    agent = _agent(True)
    try:
        records = _records(agent)

        def broken(record: RequestRecord) -> None:
            raise RuntimeError("detector bug")

        agent._nplusone = broken
        agent._compile_finish()
        for record in records:
            agent.finish(record)
        assert "NPlusOneDetector" in agent._errors_logged
        assert records[-9].sampled is not None  # the keep step ran after the broken one
    finally:
        agent.stop()


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_an_exit_raised_in_a_step_is_not_swallowed(error):
    """As ``except Exception`` in Agent.finish: only the agent's own errors are caught."""
    agent = _agent(True)
    try:

        def stop(record: RequestRecord) -> None:
            raise error

        agent._detect_slow = stop
        agent._compile_finish()
        record = RequestRecord("GET", 1.0, _SCOPE)
        record.end = 5.0
        with pytest.raises(error):
            agent.finish(record)
    finally:
        agent.stop()


def test_each_thread_finishes_into_its_own_buffer_and_a_fork_into_a_new_one():
    """The compiled finisher keeps each thread's histogram buffer at hand (cached by
    thread id): requests finished on many threads at once land in a buffer each, and
    once a fork has given the stats a new ``threading.local``, the next in a new one."""
    import threading

    agent = _agent(True, 0.0)
    assert type(agent.finish).__name__ == "Finisher"
    stats = agent.metrics.stats

    def finish(count: int) -> object:
        for _ in range(count):
            made = RequestRecord("GET", 100.0, _SCOPE)
            made.route, made.status, made.end = "/t", 200, 100.01
            agent.inflight[made] = (0, None)
            agent.finish(made)
        return stats.buffer()

    def finished(buffer: object) -> int:
        return sum(sum(entry[:-1]) for entry in buffer.tables[0].values())

    main = finish(3)
    # More threads alive at once than the cache has slots: some share a slot.
    threads, together = 20, threading.Barrier(20)
    buffers: list[object] = []
    lock = threading.Lock()

    def on_a_thread() -> None:
        together.wait()
        with lock:
            buffers.append(finish(1))
        together.wait()  # no thread ends (and frees its id) before all have finished

    pool = [threading.Thread(target=on_a_thread) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert finish(1) is main and finished(main) == 4
    assert len({id(buffer) for buffer in buffers}) == threads and main not in buffers
    assert [finished(buffer) for buffer in buffers] == [1] * threads
    stats.after_fork_in_child()
    fresh = finish(1)
    assert fresh is not main and (finished(fresh), finished(main)) == (1, 4)


def test_the_total_ms_of_an_n_plus_one_line_is_what_round_gives():
    """The compiled reporter rounds ``total_ms`` without calling ``round()``: mostly
    as whole thousandths, near a half by the digits. Either way, the same float as
    ``round(ms, 3)``, over durations of every size and at the halves."""
    import re

    agent = _agent(True, 0.0)
    agent.log._stream = stream = io.StringIO()
    frame = sys._getframe()
    draw = random.Random(11)
    totals = [0.0, 1e-9, 2.5e-7, 5e-7, 1.5e-6, 0.0125, 0.0625, 1e3, 123456.789]
    totals += [-0.0, -1e-9, -4e-7, -6e-7, -0.0125]  # a clock that went back: its sign kept
    totals += [draw.uniform(0, 10) ** draw.choice((1, 3, 6)) / 1e6 for _ in range(3000)]
    # At the halves: a thousandth and a half, then a little either side.
    for _ in range(3000):
        half = (draw.randrange(10**7) + 0.5) / 1e6
        totals.append(half * (1 + draw.choice((0.0, 1e-15, -1e-15, 1e-12, -1e-12))))
    for total in totals:
        record = RequestRecord("GET", 100.0, _SCOPE)
        record.route, record.status, record.end = "/t", 200, 100.01
        agent.inflight[record] = (0, None)
        for item in range(5):  # the first one takes the whole total; the rest none
            sql = f"SELECT 1 FROM t WHERE id = {item}"
            agent.capture.add(record, "sqlite", sql, None, 0.0, total if item == 0 else 0.0, frame)
        agent.finish(record)
    agent.log.write()
    written = re.findall(r"total_ms=(\S+)", stream.getvalue())
    summed = [sum((total, 0.0, 0.0, 0.0, 0.0)) for total in totals]  # as the summary adds
    assert written == [repr(round(total * 1000.0, 3)) for total in summed]
