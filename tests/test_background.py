"""The agent thread sleeps until a task is due: a task with nothing to do (the stack
sampler while no request is old enough to sample) does not wake it at its interval."""

from __future__ import annotations

import threading
import time
from time import perf_counter

from perfagent.background import AgentThread
from perfagent.db.callsite import AppFrames
from perfagent.profiling.sampler import StackSampler
from perfagent.record import RequestRecord


def _runs_in(seconds: float, idle: float | None) -> int:
    """How often a task due every 10 ms ran in ``seconds``, its ``idle()`` saying ``idle``."""
    runs = []
    errors: list[BaseException] = []
    thread = AgentThread(lambda where, exc: errors.append(exc), name="perfagent-test")
    thread.every(0.01, lambda: runs.append(1), None if idle is None else (lambda: idle))
    thread.ensure_started()
    time.sleep(seconds)
    thread.stop()
    assert errors == []
    return len(runs)


def test_a_task_with_nothing_to_do_does_not_wake_the_thread_at_its_interval():
    # Sleeping 0.4 s between runs: at most 2 runs in 0.6 s (the first after 10 ms).
    assert _runs_in(0.6, idle=0.4) <= 2
    # The same task without idle() runs at its interval (60 times in 0.6 s on an idle
    # machine; far fewer on a loaded one, never as few as 2).
    assert _runs_in(0.6, idle=None) > 5


def test_a_due_task_still_runs_while_another_sleeps():
    runs: list[str] = []
    thread = AgentThread(lambda where, exc: None, name="perfagent-test")
    thread.every(0.01, lambda: runs.append("sampler"), lambda: 60.0)
    thread.every(0.05, lambda: runs.append("log writer"))
    thread.ensure_started()
    time.sleep(0.5)
    thread.stop()
    assert runs.count("sampler") == 1
    assert runs.count("log writer") >= 3


def test_the_sampler_sleeps_until_the_oldest_request_in_flight_is_old_enough():
    inflight: dict[RequestRecord, tuple[int, None]] = {}
    sampler = StackSampler(0.5, AppFrames(), inflight)  # samples requests from 250 ms
    assert sampler.idle() == 0.25  # none in flight: a new one needs all of that
    older = RequestRecord("GET", perf_counter() - 0.1)
    inflight[older] = (threading.get_ident(), None)
    inflight[RequestRecord("GET", perf_counter())] = (threading.get_ident(), None)
    assert 0.13 <= sampler.idle() <= 0.15  # the older one's 150 ms, not the newer's 250
    del inflight[older]
    assert 0.23 <= sampler.idle() <= 0.25
