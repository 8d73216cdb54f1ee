"""The agent's background threads: periodic work on a thread of its own.

Two run: the agent thread (stack samples, log lines, metric merges) and the
export thread (OTLP posts, which may wait on the network). Request threads
never wait on either: they hand work over through bounded deques (``append``
is atomic under the GIL, no lock is taken) and the threads poll. A thread
starts on first use, so a process that never serves a request has none, and
again in a forked child, where threads do not survive.
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
        self._tasks: list[tuple[float, Callable[[], None]]] = []
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # taken at start and stop only
        #: True from the thread's start until stop() or a fork.
        self.running = False

    def every(self, seconds: float, task: Callable[[], None]) -> None:
        """Runs ``task`` about every ``seconds`` on the agent thread."""
        self._tasks.append((seconds, task))

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
        due = [0.0] * len(self._tasks)
        tick = min((interval for interval, _ in self._tasks), default=1.0)
        while not self._stop.wait(tick):
            now = time.monotonic()
            for index, (interval, task) in enumerate(self._tasks):
                if now >= due[index]:
                    due[index] = now + interval
                    try:
                        task()
                    except Exception as exc:
                        self._on_error(getattr(task, "__qualname__", "task"), exc)

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
