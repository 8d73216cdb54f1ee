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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class AgentThread:
    def __init__(
        self, on_error: Callable[[str, BaseException], None], name: str = "perfagent"
    ) -> None:
        self.name = name
        self._tasks: list[tuple[float, Callable[[], None], Callable[[], float] | None]] = []
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # taken at start and stop only
        #: True from the thread's start until stop() or a fork.
        self.running = False

    def every(
        self,
        seconds: float,
        task: Callable[[], None],
        idle: Callable[[], float] | None = None,
    ) -> None:
        """Runs ``task`` about every ``seconds`` on the agent thread; ``idle()``, asked
        after each run, may put the next run off: the seconds it has nothing to do."""
        self._tasks.append((seconds, task, idle))

    def ensure_started(self) -> None:
        """Starts the thread unless it runs. Request paths test ``running`` first:
        reading an attribute costs less than calling this each time."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                thread.start()
                self._thread = thread
                self.running = True

    def _run(self) -> None:
        tasks = self._tasks
        # Every task runs at the first wake-up, after the shortest interval, then when due.
        first = time.monotonic() + min((interval for interval, _, _ in tasks), default=1.0)
        due = [first] * len(tasks)
        while not self._stop.wait(max(min(due, default=first) - time.monotonic(), 0.0)):
            now = time.monotonic()
            for index, (interval, task, idle) in enumerate(tasks):
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

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
            self.running = False
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def after_fork_in_child(self) -> None:
        self._thread = None
        self.running = False
        self._lock = threading.Lock()
