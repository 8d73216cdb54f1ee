"""Reading other threads' stacks (the slow-request sampler, the event-loop watchdog)
must never crash the app: on 3.11 a walk by ``frame.f_back`` between which the GIL
switches read the freed frames of a thread that had returned from them (segfault)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from helpers import clean_env

from perfagent.profiling.frames import _compiled_stacks, current_stacks

# Threads entering and returning from deep calls, generators and coroutines (and
# starting threads) while the sampler and the watchdog read their stacks back to back.
WALKS_WHILE_THREADS_RETURN = """
import asyncio, sys, threading, time
import perfagent
from perfagent.db.callsite import AppFrames
from perfagent.detectors.eventloop import LoopWatchdog, _Stall
from perfagent.profiling.sampler import StackSampler
from perfagent.record import RequestRecord

sys.setrecursionlimit(5000)
stop = False


def gen(n):
    if n:
        yield from gen(n - 1)
    else:
        yield 1
        yield 2


def rec(n):
    return rec(n - 1) if n else sum(gen(12))


async def coro(n):
    if n:
        return await coro(n - 1)
    await asyncio.sleep(0)
    return rec(8)


def plain():
    while not stop:
        for depth in range(1, 30):
            rec(depth)


def deep():
    while not stop:
        for depth in (50, 400, 900):
            rec(depth)
        thread = threading.Thread(target=rec, args=(300,))
        thread.start()
        thread.join()


def loop_thread():
    async def main():
        while not stop:
            await asyncio.gather(*(coro(d) for d in range(1, 20)))

    asyncio.run(main())


perfagent.init(metrics_port=0, console_url="http://127.0.0.1:9")
workers = [threading.Thread(target=t) for t in (plain, deep, deep, loop_thread, loop_thread)]
for worker in workers:
    worker.start()
inflight = {}
for worker in workers:
    record = RequestRecord("GET", time.perf_counter())
    record.profile = True
    inflight[record] = (worker.ident, None)
sampler = StackSampler(0.001, AppFrames(), inflight)
watchdog = LoopWatchdog(perfagent._state["agent"], asyncio.new_event_loop())
end = time.perf_counter() + float(sys.argv[1])
sys.setswitchinterval(0.000001)
while time.perf_counter() < end:
    sampler.tick()
    for worker in workers:
        watchdog._loop_thread = worker.ident
        watchdog._sample(_Stall(0.0))
sys.setswitchinterval(0.005)
stop = True
for worker in workers:
    worker.join()
perfagent.shutdown()
print("done")
"""


@pytest.mark.skipif(_compiled_stacks is None, reason="perfagent/_speedups.c not built")
def test_reading_stacks_while_their_threads_return_never_crashes(tmp_path):
    """Before: a segfault within seconds (3 of 3 runs, 3.11; the Python twin,
    PERFAGENT_COMPILED_HOOKS=0, keeps that race). Now the stacks are read in one C
    call during which no other thread runs."""
    script = tmp_path / "walks.py"
    script.write_text(WALKS_WHILE_THREADS_RETURN)
    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", str(script), "8"],
        # The C path even in .ci/run's pure-Python pass: the twin keeps the race.
        env=clean_env(PERFAGENT_COMPILED_HOOKS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.split() == ["done"], done.stderr[-3000:]


def _parked(depth: int, ready: threading.Event, release: threading.Event) -> None:
    if depth:
        _parked(depth - 1, ready, release)
    else:
        ready.set()
        release.wait()


@pytest.mark.skipif(_compiled_stacks is None, reason="perfagent/_speedups.c not built")
def test_the_c_stacks_are_the_python_twins():
    """Same frames, same order (top first), same bound, same thread filter."""
    ready, release = threading.Event(), threading.Event()
    thread = threading.Thread(target=_parked, args=(30, ready, release))
    thread.start()
    try:
        ready.wait()
        ident = thread.ident
        for depth in (0, 1, 5, 512):
            c = current_stacks(depth, True, ident)
            python = current_stacks(depth, False, ident)
            assert list(c) == list(python) == [ident]
            assert c[ident] == python[ident]
            # 31 _parked, Event.wait, Condition.wait, run, _bootstrap_inner, _bootstrap
            assert len(c[ident]) == min(depth, 36)
        assert current_stacks(64, True).keys() == current_stacks(64, False).keys()
        assert current_stacks(8, True, -1) == current_stacks(8, False, -1) == {}
        names = [f.f_code.co_name for f in current_stacks(3, True, ident)[ident]]
        assert names == ["wait", "wait", "_parked"]
    finally:
        release.set()
        thread.join()
