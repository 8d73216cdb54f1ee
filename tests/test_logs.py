"""The agent's log lines: queued on the request path, written in order by the agent
thread, and never lost at exit, at shutdown or when a worker forks."""

from __future__ import annotations

import gc
import io
import subprocess
import sys
import time
from datetime import datetime

import pytest
from helpers import clean_env

from perfagent.export.logs import MAX_QUEUED, VARIES, make_logger


class _Writes(io.StringIO):
    """A stream that remembers each write call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def _timestamp(line: str) -> float:
    return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize("compiled", [True, False])
def test_queued_lines_are_written_in_order_in_one_write_with_their_own_time(compiled):
    stream = _Writes()
    log = make_logger("console", stream, compiled=compiled)
    emit = log.prepare("warning", "n_plus_one", route="/r", count=VARIES)
    log.deferred = True
    logged_at = time.time()
    emit(3)
    log.warning("slow_request", route="/s")
    emit(4)
    assert stream.calls == []  # queued, not written on the caller's thread
    time.sleep(0.05)
    log.write()
    assert len(stream.calls) == 1
    lines = stream.getvalue().splitlines()
    assert [line.split()[-1] for line in lines] == ["route=/r", "route=/s", "route=/r"]
    assert [line.split()[-2] for line in lines] == ["count=3", "[perfagent]", "count=4"]
    # Each line carries the time of its event, not of the write.
    assert all(abs(_timestamp(line) - logged_at) < 0.04 for line in lines)


def test_a_line_prepared_in_c_is_queued_as_text():
    """Nothing per event for the garbage collector to track while it waits."""
    from perfagent.export import logs

    assert logs.PreparedLine is not None, "perfagent/_perrequest.c was not built"
    log = make_logger("console", io.StringIO())
    emit = log.prepare("warning", "n_plus_one", route="/r", count=VARIES)
    log.deferred = True
    emit(3)
    (queued,) = log._queue
    assert queued.__class__ is str and not gc.is_tracked(queued)
    assert queued.endswith("[perfagent] count=3 route=/r")


def test_a_full_queue_of_prepared_lines_is_written_by_the_thread_that_logs():
    """The C emitter keeps the queue's bound as ``warning()`` does: with no agent thread
    writing, the line that fills the queue writes it, and nothing is lost."""
    stream = _Writes()
    log = make_logger("console", stream)
    emit = log.prepare("warning", "n_plus_one", route="/r", count=VARIES)
    log.deferred = True
    for n in range(MAX_QUEUED):
        emit(n)
    assert len(stream.calls) == 1
    lines = stream.getvalue().splitlines()
    assert [line.split()[-2] for line in lines] == [f"count={n}" for n in range(MAX_QUEUED)]
    emit(-1)
    assert len(stream.calls) == 1 and len(log._queue) == 1  # queued again


def test_a_line_prepared_in_c_writes_floats_as_repr_does():
    """The C line writes a float of whole thousandths (every duration the agent logs is
    rounded so) digit by digit, and any other float as float.__repr__: the text must
    be repr's either way, across the range where the shortcut applies and past it."""
    import random

    from perfagent.export import logs

    assert logs.PreparedLine is not None, "perfagent/_perrequest.c was not built"
    stream = io.StringIO()
    log = make_logger("console", stream)
    emit = log.prepare("warning", "slow_request", duration_ms=VARIES)
    draw = random.Random(7)
    values = [k / 1000 for k in range(0, 30_000)]
    values += [
        round(draw.uniform(0, 10**exponent), 3) for exponent in range(13) for _ in range(500)
    ]
    values += [draw.uniform(0, 100) for _ in range(500)]  # not whole thousandths
    values += [0.0, -0.0, 0.0005, 1e-7, 999_999_999_999.999, 1e12, 1e15, 1e22, 2.675]
    values += [float("inf"), float("-inf"), float("nan"), 5e-324, -12.5]
    for value in values:
        emit(value)
    written = [line.rsplit("duration_ms=", 1)[1] for line in stream.getvalue().splitlines()]
    assert written == [repr(value) for value in values]


def test_not_deferred_each_line_is_written_at_once():
    stream = _Writes()
    log = make_logger("json", stream)
    log.info("metrics_port_busy", port=9464)
    assert len(stream.calls) == 1 and '"metrics_port_busy"' in stream.getvalue()


def test_a_full_queue_is_written_by_the_thread_that_logs():
    """With no agent thread writing (stuck, or gone), the queue stays bounded and
    loses nothing: the caller that fills it writes it."""
    stream = _Writes()
    log = make_logger("json", stream)
    log.deferred = True
    for n in range(MAX_QUEUED):
        log.warning("n_plus_one", count=n)
    assert len(stream.calls) == 1
    assert len(stream.getvalue().splitlines()) == MAX_QUEUED
    log.warning("n_plus_one", count=-1)
    assert len(stream.calls) == 1  # queued again


_AGENT = """
import os, perfagent
perfagent.init(metrics_port=0, console_url="http://127.0.0.1:9")
agent = perfagent._state["agent"]
agent.log.deferred = True  # as once the agent thread runs, which never wrote here
agent.log.warning("queued_before", n=1)
{rest}
"""


def _run(rest: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _AGENT.format(rest=rest)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_lines_queued_at_exit_are_written():
    assert _run("").count("queued_before") == 1


def test_lines_queued_at_shutdown_are_written():
    stderr = _run("perfagent.shutdown()\nagent.log.warning('after_shutdown', n=2)\nos._exit(0)")
    assert stderr.count("queued_before") == 1
    assert stderr.count("after_shutdown") == 1  # written at once: no thread is left to


def test_a_forked_worker_does_not_write_its_parents_queue_again():
    stderr = _run(
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    agent.log.warning('in_child', n=3)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    assert stderr.count("in_child") == 1
    assert stderr.count("queued_before") == 1
