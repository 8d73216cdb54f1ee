"""The agent's background threads: periodic work on a thread of its own.

Two run: the agent thread (stack samples, log lines, metric merges) and the
export thread (OTLP posts, which may wait on the network). Request threads
never wait on either: they hand work over through bounded deques (``append``
is atomic under the GIL, no lock is taken) and the threads poll. A thread
starts on first use, so a process that never serves a request has none, and
again in a forked child, where threads do not survive.

A thread sleeps until its next task is due rather than ticking at its
shortest interval: a task may say, through ``idle``, that it has nothing to
do for a while (the stack sampler, while no request is old enough to sample).
Each wake-up takes the GIL from whatever runs and costs a context switch;
on this project's 2-core VMs a wake-up of an idle process cost ~0.1-0.2 ms
of CPU, so the sampler's 100 ticks a second were most of an idle app's
CPU under the agent.

And a thread with no work at all rests: once ``quiet()`` (no request in
flight, nothing queued) has held for ``SETTLE_S``, the tasks marked
``settle`` run one last time (merge the counts, write the log, export what
is left) and the thread waits on an event, with no timeout, until
``ensure_started()`` wakes it. Resting, it sets ``running`` to False, which
request paths already test before calling ``ensure_started()``: the first
request after a rest wakes it at no cost to the others. The thread tests
``quiet()`` again after clearing ``running``, so a request that saw it
still True is seen in flight (both run under the GIL, in that order).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: A thread rests once ``quiet()`` has held this long (two merges of counts at 1 s).
SETTLE_S = 2.0

_Task = tuple[float, Callable[[], None], Callable[[], float] | None, bool]


class AgentThread:
    def __init__(
        self,
        on_error: Callable[[str, BaseException], None],
        name: str = "perfagent",
        quiet: Callable[[], bool] | None = None,
        on_rest: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._tasks: list[_Task] = []
        self._on_error = on_error
        self._quiet = quiet
        self._on_rest = on_rest
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # taken at start and stop only
        #: True while the thread runs and is awake; False before its start, while it
        #: rests, after stop() and in a forked child: then ensure_started() is due.
        self.running = False

    def every(
        self,
        seconds: float,
        task: Callable[[], None],
        idle: Callable[[], float] | None = None,
        settle: bool = False,
    ) -> None:
        """Runs ``task`` about every ``seconds`` on the agent thread; ``idle()``, asked
        after each run, may put the next run off: the seconds it has nothing to do.
        A ``settle`` task also runs once before the thread rests."""
        self._tasks.append((seconds, task, idle, settle))

    def ensure_started(self) -> None:
        """Starts the thread unless it runs, or wakes it from a rest. Request paths
        test ``running`` first: reading an attribute costs less than calling this."""
        if self._thread is not None:
            if not self.running and not self._stop.is_set():
                self.running = True
                self._wake.set()
            return
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self.running = True
                thread.start()
                self._thread = thread

    def _run(self) -> None:
        tasks = self._tasks
        shortest = min((interval for interval, _, _, _ in tasks), default=1.0)
        # Every task runs at the first wake-up, after the shortest interval, then when due.
        due = [time.monotonic() + shortest] * len(tasks)
        quiet_since: float | None = None
        while True:
            self._wake.wait(max(min(due, default=shortest) - time.monotonic(), 0.0))
            if self._stop.is_set():
                return
            self._wake.clear()
            now = time.monotonic()
            for index, (interval, task, idle, _) in enumerate(tasks):
                if now < due[index] - 0.001:  # a wait may end a little early
                    continue
                wait = interval
                try:
                    task()
                    if idle is not None:
                        wait = max(interval, idle())
                except Exception as exc:
                    self._on_error(getattr(task, "__qualname__", "task"), exc)
                due[index] = now + wait
            if self._quiet is None or not self._is_quiet():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= SETTLE_S:
                quiet_since = None
                if self._rest():
                    return
                now = time.monotonic()
                due = [now + interval for interval, _, _, _ in tasks]

    def _is_quiet(self) -> bool:
        try:
            return bool(self._quiet())  # type: ignore[misc]
        except Exception as exc:
            self._on_error("quiet", exc)
            return False

    def _rest(self) -> bool:
        """Settles, then waits until woken; True when woken by stop()."""
        for _, task, _, settle in self._tasks:
            if settle:
                try:
                    task()
                except Exception as exc:
                    self._on_error(getattr(task, "__qualname__", "task"), exc)
        self.running = False
        if not self._is_quiet():  # a request came in meanwhile, and saw running True
            self.running = True
            return False
        if self._on_rest is not None:
            try:
                self._on_rest()
            except Exception as exc:
                self._on_error("rest", exc)
        self._wake.wait()
        self._wake.clear()
        return self._stop.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            thread, self._thread = self._thread, None
            self.running = False
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def after_fork_in_child(self) -> None:
        self._thread = None
        self.running = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
