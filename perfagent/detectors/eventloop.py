"""Event-loop watchdog: finds the callbacks that block an asyncio or uvloop loop.

Two halves, so that requests pay nothing:

* A heartbeat on the loop: one callback re-armed with ``loop.call_later``
  (any loop has it, uvloop included). Each tick it notes the time, the
  process's CPU time, the loop thread's scheduler statistics and how late it
  ran (the loop's lag, counted into plain lists that the monitor merges into
  the histogram). A tick that is late by about the threshold leaves a *gap*
  for the monitor.
* A monitor thread (``perfagent-loop``). While the heartbeat is stale it
  samples the loop thread's stack (``sys._current_frames()``) every few ms;
  each gap the heartbeat reports is judged once, so a block gives one event.

Armed only while there is work: the heartbeat runs while requests are in
flight and for ``LINGER_S`` after the last one (so the block of a callback a
request left behind is still caught); then it stops re-arming itself, the
monitor waits on an event, and an idle worker wakes for nothing (100 ticks
and 40 monitor wake-ups a second were most of an idle app's CPU under the
agent). The next request re-arms both through ``agent.loop_watch_pending``,
which the ASGI adapter reads on every call anyway. What this gives up: a
callback or background task that blocks the loop while no request has run
for ``LINGER_S`` is not reported, and the lag histogram is not fed then. No
request waited on such a block, except one arriving during it, whose own
duration starts only once the loop takes it.

Judging a gap:

* Duration: the heartbeat's lateness plus half its interval (the block
  started at an unknown point of the last interval; the midpoint makes the
  error at most half an interval either way).
* Waiting for a CPU is not blocked: on a busy machine a loop thread that is
  ready to run may wait on the kernel's run queue; its tick is late though
  nothing held the loop. ``/proc/self/task/TID/schedstat`` gives the time a
  thread waited on a run queue: the gap's share of it is taken off the
  duration, which is then the time the loop thread ran or slept inside a
  callback (a CPU-bound block reports its CPU time, whatever the load).
  Without schedstat (not Linux), nothing is taken off.
* Paused, not blocked: when the whole process is stopped (SIGSTOP, a VM
  pause) the monitor wakes late too. Its oversleep, less the time it waited
  for a CPU (its own schedstat), is time it could not run; less the CPU the
  process burnt and the loop thread's wait for a CPU meanwhile, it is time
  nobody ran, taken off the duration.
  A C call holding the GIL (a catastrophic regex) also makes the monitor
  oversleep, but the loop thread burnt CPU or waited for one all along, so
  nothing is taken off: the block is reported late, with the time the loop
  thread spent in it.
* Blocked or saturated: each sample is keyed by the frame object of the
  callback the loop is running (the outermost frame above the loop's own
  dispatch frame, learnt from the heartbeat's caller). One key in at least
  half of the samples is one callback holding the loop: a block. Otherwise
  many short callbacks ran back to back (a busy tick): ``event_loop_saturated``.
* The request: the adapter's ``PerfagentASGI.__call__`` frame is on the
  blocking task's stack; its ``record`` local is the request. When the app
  runs the endpoint in a task of its own (``BaseHTTPMiddleware``), the ASGI
  ``scope`` on the stack leads to the task whose coroutines hold the adapter
  frame. A bare callback has neither: route null.
* The thread pool (``PoolWatch``): the same monitor reads anyio's default
  thread limiter, and logs ``thread_pool_starved`` when sync endpoints queue
  for a thread longer than the threshold.

Findings are handed to the loop thread (``call_soon_threadsafe``), where the
request's record lives, so attaching them never races the end of a request.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from bisect import bisect_left
from collections import Counter, deque
from time import perf_counter, process_time, sleep
from types import CodeType, FrameType
from typing import Any

from perfagent.export.metrics import LOOP_LAG_BUCKETS as LAG_BUCKETS
from perfagent.profiling.frames import current_stacks

MAX_SAMPLES = 400  # per stall: 2 s at 5 ms; a longer stall keeps its first samples
MAX_DEPTH = 128  # frames per sample
STACK_DEPTH = 512  # frames read when looking for the adapter's frame on the loop's stack
MAX_STACK_LINES = 40  # frames per event: the innermost ones
#: The heartbeat stays armed this long after the last request in flight ended.
LINGER_S = 1.0


def _schedstat(tid: int) -> int:
    """A read-only descriptor of a thread's ``schedstat``, or -1 (not Linux, no schedstats)."""
    try:
        fd = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
    except OSError:
        return -1
    try:
        os.pread(fd, 64, 0)
    except OSError:
        os.close(fd)
        return -1
    return fd


def _queued_s(before: bytes | None, after: bytes | None) -> float:
    """Seconds a thread waited on a run queue between two reads of its schedstat."""
    if not before or not after:
        return 0.0
    try:
        return max(0, int(after.split()[1]) - int(before.split()[1])) / 1e9
    except (IndexError, ValueError):
        return 0.0


def _interval(threshold: float) -> float:
    """Heartbeat period: a tenth of the threshold, 1 to 10 ms (100 ticks/s by default)."""
    return min(max(threshold / 10.0, 0.001), 0.010)


class _Stall:
    """What the monitor saw while the heartbeat was stale since ``beat``."""

    __slots__ = ("beat", "records", "samples")

    def __init__(self, beat: float) -> None:
        self.beat = beat
        #: (key frame or None, stack as (file, line, function) innermost first)
        self.samples: list[tuple[Any, tuple[tuple[str, int, str], ...]]] = []
        #: key frame -> (the request's record, or the route when only that is known)
        self.records: dict[Any, tuple[Any, str | None]] = {}


class LoopWatchdog:
    """Heartbeat on ``loop`` plus the monitor thread; ``start()`` on the loop's thread."""

    def __init__(self, agent: Any, loop: asyncio.AbstractEventLoop) -> None:
        from perfagent.frameworks.asgi import PerfagentASGI

        self.agent = agent
        self.loop = loop
        self.threshold = agent.settings.loop_block_ms / 1000.0
        self.interval = _interval(self.threshold)
        #: Monitor period while all is well, and while sampling a stall.
        self.idle_period = min(max(self.threshold / 4.0, 0.001), 0.025)
        self.sample_period = min(max(self.threshold / 20.0, 0.001), 0.005)
        #: Sampling starts once the heartbeat is this late.
        self.sample_after = self.threshold / 4.0
        #: A monitor wake-up later than this is time the monitor did not run.
        self.oversleep = max(self.threshold / 4.0, 0.005)
        self.frames = agent.capture.frames  # the agent's one app/library classifier
        self.compiled = agent.settings.compiled_hooks  # stacks read in C (False: the twin)
        self._adapter_code: CodeType = PerfagentASGI.__call__.__code__
        self._loop_thread = threading.get_ident()
        self._sched_fd = _schedstat(threading.get_native_id())
        self._running = False
        self._handle: Any = None
        # Written by the heartbeat, read by the monitor (single attribute stores).
        self._beat: float | None = None  # None until the first tick: not armed
        self._due = 0.0
        self._cpu = 0.0
        self._sched: bytes | None = None  # the loop thread's schedstat at the last tick
        self._busy = 0.0  # when the heartbeat last saw a request in flight
        self._dispatch: CodeType | None = None  # the loop's frame that runs callbacks
        self._rearm = False  # set by the monitor when the loop stopped running
        self._gaps: deque[tuple[float, float, float, float, float]] = deque(maxlen=32)
        self._lag_counts = [0] * (len(LAG_BUCKETS) + 1)
        self._lag_sum = 0.0
        # Monitor thread only.
        self._merged_counts = [0] * (len(LAG_BUCKETS) + 1)
        self._merged_sum = 0.0
        self._dead: deque[tuple[float, float]] = deque(maxlen=64)
        self._ended: deque[_Stall] = deque(maxlen=4)
        self._stop = threading.Event()
        #: Set while the heartbeat runs; the monitor waits on it while the loop is idle.
        self._armed = threading.Event()
        self._thread: threading.Thread | None = None
        self.pool: PoolWatch | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Arms the heartbeat and starts the monitor; call on the loop's own thread."""
        self._running = True
        self._busy = perf_counter()
        self._armed.set()
        self._handle = self.loop.call_soon(self._first_tick)
        self.pool = PoolWatch.of_running_loop(self.agent, self.threshold, self._adapter_code)
        thread = threading.Thread(target=self._monitor, name="perfagent-loop", daemon=True)
        thread.start()
        self._thread = thread

    def stop(self, timeout: float = 2.0) -> None:
        """Stops the monitor and cancels the heartbeat; safe from any thread, twice."""
        self._running = False
        self._stop.set()
        self._armed.set()  # wakes an idle monitor, which then sees the stop
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                if threading.get_ident() == self._loop_thread:
                    handle.cancel()
                elif not self.loop.is_closed():
                    self.loop.call_soon_threadsafe(handle.cancel)
            except RuntimeError:
                pass  # the loop closed meanwhile: its timers are gone with it
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._merge_lag()
        fd, self._sched_fd = self._sched_fd, -1
        if fd >= 0:
            os.close(fd)

    def rearm(self) -> bool:
        """On the loop thread, as a request arrives: arms an idle heartbeat again.
        False when this watchdog does not watch the running loop (a new one is needed)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if loop is not self.loop or not self._running or not self.alive:
            return False
        self._busy = perf_counter()
        if not self._armed.is_set():
            self._rearm = True
            self._tick()
            self._armed.set()
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- loop thread -------------------------------------------------------

    def _first_tick(self) -> None:
        try:
            caller = sys._getframe(1)
            self._dispatch = caller.f_code  # asyncio: Handle._run; uvloop: who ran the loop
        except ValueError:
            self._dispatch = None
        self._rearm = True
        self._tick()

    def _tick(self) -> None:
        """The heartbeat: a few attribute stores, a bisect and ``call_later``."""
        if not self._running:
            return
        try:
            now = perf_counter()
            cpu = process_time()
            sched = os.pread(self._sched_fd, 64, 0) if self._sched_fd >= 0 else None
            if self._rearm:  # first tick, or the loop was stopped and runs again
                self._rearm = False
            else:
                lag = now - self._due
                if lag < 0.0:
                    lag = 0.0
                self._lag_counts[bisect_left(LAG_BUCKETS, lag)] += 1
                self._lag_sum += lag
                if lag + self.interval / 2.0 >= self.threshold:
                    queued = _queued_s(self._sched, sched)
                    self._gaps.append((self._beat or now, now, lag, cpu - self._cpu, queued))
                    self._busy = now  # judged with the stall's samples: stay armed
            self._cpu = cpu
            self._sched = sched
            if self.agent.inflight:
                self._busy = now
            elif now - self._busy > LINGER_S:
                self._disarm()
                return
            self._due = now + self.interval
            self._beat = now
            self._handle = self.loop.call_later(self.interval, self._tick)
        except Exception as exc:
            self.agent.internal_error("eventloop.heartbeat", exc)

    def _disarm(self) -> None:
        """Loop thread: no request for ``LINGER_S``; the next one re-arms (``rearm``)."""
        self._handle = None
        self._beat = None
        self._armed.clear()
        self.agent.loop_watch_pending = True

    def _deliver(self, kind: str, fields: dict[str, Any], record: Any) -> None:
        """Runs on the loop thread: the finding, the counter, the kept trace."""
        agent = self.agent
        try:
            if not agent.running:
                return
            if record is not None:
                fields["route"] = record.route_now() or ""  # a request, no route matched yet
                fields["method"] = record.method
                fields["trace_id"] = record.trace_id
            agent.thread.ensure_started()
            agent.report(kind, fields, record)
            agent.metrics.loop_blocks.labels(fields["route"] or "").inc()
            # A request that already ended was judged without this finding: keep it now.
            if record is not None and record.done and not record.keep and not record.foreign:
                record.keep = True
                agent.exporter.submit(record)
        except Exception as exc:
            agent.internal_error("eventloop.deliver", exc)

    # -- monitor thread ----------------------------------------------------

    def _monitor(self) -> None:
        try:
            self._watch()
        except Exception as exc:
            self.agent.internal_error("eventloop.monitor", exc)
        finally:
            self._running = False  # the heartbeat stops at its next tick
            self.agent.loop_watchdog_ended(self)

    def _watch(self) -> None:
        period = self.idle_period
        stall: _Stall | None = None
        next_merge = perf_counter() + 1.0
        expected = perf_counter() + period
        fd = _schedstat(threading.get_native_id())
        sched = os.pread(fd, 64, 0) if fd >= 0 else None
        try:
            while True:
                if not self._armed.is_set():  # the loop is idle: sleep until a request
                    stall, next_merge = self._step(perf_counter(), stall, next_merge)
                    self._merge_lag()
                    stall = None
                    self._ended.clear()
                    self._armed.wait()
                    if self._stop.is_set():  # stop() sets it too: no last sleep to join
                        return
                    if fd >= 0:
                        sched = os.pread(fd, 64, 0)
                    period = self.idle_period
                    expected = perf_counter() + period
                sleep(period)  # cheaper than Event.wait; stop() waits at most one period
                if self._stop.is_set():
                    return
                now = perf_counter()
                before, sched = sched, os.pread(fd, 64, 0) if fd >= 0 else None
                # Overslept, less the time spent waiting for a CPU: time it could not run.
                missed = now - expected - _queued_s(before, sched)
                if missed > self.oversleep:
                    self._dead.append((now - missed, now))
                if self.loop.is_closed():
                    return
                stall, next_merge = self._step(now, stall, next_merge)
                period = self.sample_period if stall is not None else self.idle_period
                expected = perf_counter() + period
        finally:
            if fd >= 0:
                os.close(fd)

    def _step(self, now: float, stall: _Stall | None, next_merge: float) -> tuple[Any, float]:
        """One monitor wake-up: the stall, its gaps, the pool, the lag merge."""
        try:
            stall = self._check(now, stall)
            while self._gaps:
                self._judge(self._gaps.popleft(), stall)
            # The heartbeat leaves a stall's gap before it beats again, so an
            # ended stall has been judged by now (or was too short): let its
            # frames, and the locals they hold, go.
            self._ended.clear()
        except Exception as exc:  # a bug here must not end the watch
            self.agent.internal_error("eventloop.judge", exc)
            stall = None
        if self.pool is not None:
            self.pool.check(now)
        if now >= next_merge:
            next_merge = now + 1.0
            self._merge_lag()
        return stall, next_merge

    def _check(self, now: float, stall: _Stall | None) -> _Stall | None:
        """Starts, continues (one sample) or ends the stall the heartbeat shows."""
        beat = self._beat
        if not self.loop.is_running():
            self._rearm = True  # a loop run again later must not look blocked
            return None
        if beat is None:
            return None  # not armed: the loop has not ticked yet
        if stall is not None and stall.beat != beat:
            self._ended.append(stall)
            stall = None
        if stall is None and now - beat - self.interval >= self.sample_after:
            stall = _Stall(beat)
        if stall is not None and len(stall.samples) < MAX_SAMPLES:
            self._sample(stall)
        return stall

    def _sample(self, stall: _Stall) -> None:
        # The loop thread's frames read in one call, never by f_back: see current_stacks.
        loop_thread = self._loop_thread
        stack = current_stacks(MAX_DEPTH + 1, self.compiled, loop_thread).get(loop_thread, ())
        dispatch = self._dispatch
        frames: list[FrameType] = []
        below = False  # a frame below the ones kept: the dispatch frame, or past MAX_DEPTH
        for frame in stack:
            if frame.f_code is dispatch or len(frames) >= MAX_DEPTH:
                below = True
                break
            frames.append(frame)
        # Outside a callback (no dispatch frame below), the loop was waiting.
        key = frames[-1] if frames and below else None
        stack = tuple((f.f_code.co_filename, f.f_lineno, _name(f.f_code)) for f in frames)
        stall.samples.append((key, stack))
        if key is not None and key not in stall.records:
            stall.records[key] = self._request_of(frames)

    def _request_of(self, frames: list[FrameType]) -> tuple[Any, str | None]:
        """(record, None) of the request these frames serve, or (None, route), or (None, None).

        The adapter's frame is on the stack unless the app runs the endpoint
        in a task of its own (Starlette's ``BaseHTTPMiddleware`` does): then
        the ASGI ``scope`` on the stack leads to the request task, whose
        awaited coroutines run through the adapter's frame.
        """
        for frame in frames:
            if frame.f_code is self._adapter_code:
                record = _record_of(frame)
                if record is not None:
                    return record, None
        for frame in frames:
            if "scope" not in frame.f_code.co_varnames:
                continue
            scope = _local(frame, "scope")
            if isinstance(scope, dict) and scope.get("type") == "http":
                record = self._record_for_scope(scope)
                if record is not None:
                    return record, None
                return None, getattr(scope.get("route"), "path", None)
        return None, None

    def _record_for_scope(self, scope: dict[str, Any]) -> Any:
        try:
            tasks = asyncio.all_tasks(self.loop)
        except RuntimeError:
            return None
        for task in tasks:
            record = _task_record(task, self._adapter_code, self._loop_thread, self.compiled)
            if record is not None and record.carrier is scope:
                return record
        return None

    def _judge(self, gap: tuple[float, float, float, float], live: _Stall | None) -> None:
        start, end, lag, cpu, queued = gap
        # The loop thread's wait for a CPU is nobody's block.
        duration = lag + self.interval / 2.0 - queued
        dead = sum(max(0.0, min(woke, end) - max(due, start)) for due, woke in self._dead)
        # The monitor overslept: a stopped process (no CPU burnt meanwhile) or a
        # GIL held by busy C code (CPU burnt, or the loop thread waiting for a CPU
        # to burn it on). What neither explains is time nobody ran.
        nobody = dead - cpu - queued
        paused = nobody if nobody > self.oversleep else 0.0
        blocked = duration - paused
        if blocked < self.threshold:
            return
        stall = next((s for s in (live, *self._ended) if s is not None and s.beat == start), None)
        fields: dict[str, Any] = {
            "duration_ms": round(blocked * 1000.0, 1),
            "route": None,
            "callsite": None,
            "stack": [],
            "trace_id": None,
            "threshold_ms": self.agent.settings.loop_block_ms,
        }
        if paused > 0.0:
            fields["paused_ms"] = round(paused * 1000.0, 1)
        # The monitor could not run during the block (C code held the GIL): its
        # first sample came when the GIL was released, so the stack is best effort.
        late = dead > 0.0 and paused == 0.0
        if late:
            fields["late"] = True
        record = None
        if stall is not None and stall.samples:
            counts = Counter(key for key, _ in stall.samples)
            key, hits = counts.most_common(1)[0]
            if len(stall.samples) >= 3 and hits * 2 < len(stall.samples):
                self._saturated(fields["duration_ms"], len(stall.samples), len(counts))
                return
            stacks = Counter(stack for k, stack in stall.samples if k is key)
            stack = stacks.most_common(1)[0][0]
            record, route = stall.records.get(key, (None, None))
            fields["route"] = route
            fields["callsite"] = self._callsite(stack, app_only=late)
            fields["stack"] = self._format(stack)
            if stack:
                fields["task"] = stack[-1][2]
        self._hand_over(fields, record)

    def _saturated(self, duration_ms: float, samples: int, callbacks: int) -> None:
        """No callback held the loop: many ran back to back. A log line, not a block."""
        try:
            self.agent.log.warning(
                "event_loop_saturated",
                duration_ms=duration_ms,
                samples=samples,
                callbacks=callbacks,
                threshold_ms=self.agent.settings.loop_block_ms,
            )
        except Exception as exc:
            self.agent.internal_error("eventloop.saturated", exc)

    def _hand_over(self, fields: dict[str, Any], record: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver, "event_loop_blocked", fields, record)
        except RuntimeError:  # the loop closed: report from here
            self._deliver("event_loop_blocked", fields, record)

    def _callsite(self, stack: tuple[tuple[str, int, str], ...], app_only: bool) -> str | None:
        """The innermost app frame; else the innermost frame that is not the agent's."""
        frames = self.frames
        for filename, line, _ in stack:
            if frames.is_app_file(filename):
                return f"{frames.show(filename)}:{line}"
        if app_only:
            return None
        for filename, line, _ in stack:
            if not frames.is_agent_file(filename):
                return f"{frames.show(filename)}:{line}"
        return None

    def _format(self, stack: tuple[tuple[str, int, str], ...]) -> list[str]:
        frames = self.frames
        lines = [
            f"{frames.show(filename)}:{line} {name}"
            for filename, line, name in stack[:MAX_STACK_LINES]
            if not frames.is_agent_file(filename)
        ]
        lines.reverse()  # innermost last, as in a traceback
        return lines

    def _merge_lag(self) -> None:
        """Adds the heartbeat's lag counts since the last merge to the histogram."""
        try:
            histogram = self.agent.metrics.loop_lag
            counts, total = list(self._lag_counts), self._lag_sum
            for index, (now, before) in enumerate(zip(counts, self._merged_counts, strict=True)):
                if now != before:
                    histogram._buckets[index].inc(now - before)
            if total != self._merged_sum:
                histogram._sum.inc(total - self._merged_sum)
            self._merged_counts, self._merged_sum = counts, total
        except Exception as exc:
            self.agent.internal_error("eventloop.lag", exc)


class PoolWatch:
    """Starvation of the thread pool that runs sync (``def``) endpoints, seen from the monitor.

    FastAPI and Starlette run ``def`` endpoints and dependencies through
    anyio's default thread limiter (40 threads). The monitor reads that
    limiter every wake-up: while requests queue for a thread, it notes how many
    and, at the peak, the routes of the tasks holding the threads (from each
    task's chain of awaited coroutines, which runs through the adapter's
    frame). A queue that lasts longer than the threshold is one
    ``thread_pool_starved`` log event. Requests pay nothing for this.
    """

    def __init__(self, agent: Any, limiter: Any, threshold: float, adapter: CodeType) -> None:
        self._loop_thread = threading.get_ident()  # made on the loop's thread
        self.agent = agent
        self.limiter = limiter
        self.threshold = threshold
        self._adapter = adapter
        self._since: float | None = None
        self._peak = 0
        self._holders: dict[str, int] = {}

    @classmethod
    def of_running_loop(cls, agent: Any, threshold: float, adapter: CodeType) -> PoolWatch | None:
        """The watch of this loop's default anyio limiter; None without anyio (never imported)."""
        to_thread = sys.modules.get("anyio.to_thread")
        if to_thread is None:
            return None
        try:
            limiter = to_thread.current_default_thread_limiter()
            limiter._wait_queue  # noqa: B018 - the asyncio backend's queue, read by check()
        except Exception:
            return None
        return cls(agent, limiter, threshold, adapter)

    def check(self, now: float) -> None:
        try:
            waiting = len(self.limiter._wait_queue)
            if waiting:
                if self._since is None:
                    self._since, self._peak = now, 0
                if waiting > self._peak:
                    self._peak = waiting
                    self._holders = self._routes(tuple(self.limiter._borrowers))
            elif self._since is not None:
                took, self._since = now - self._since, None
                if took >= self.threshold:
                    self.agent.log.warning(
                        "thread_pool_starved",
                        duration_ms=round(took * 1000.0, 1),
                        waiting=self._peak,
                        threads=self.limiter.total_tokens,
                        holders=self._holders,
                        threshold_ms=round(self.threshold * 1000.0, 3),
                    )
        except Exception as exc:
            self.agent.internal_error("eventloop.pool", exc)

    def _routes(self, tasks: tuple[Any, ...]) -> dict[str, int]:
        """Route -> how many of ``tasks`` serve it ("" for tasks that serve no request)."""
        routes: dict[str, int] = {}
        for task in tasks:
            record = _task_record(
                task, self._adapter, self._loop_thread, self.agent.settings.compiled_hooks
            )
            route = (record.route_now() or "") if record is not None else ""
            routes[route] = routes.get(route, 0) + 1
        return routes


def _name(code: CodeType) -> str:
    return getattr(code, "co_qualname", code.co_name)


def _local(frame: FrameType, name: str) -> Any:
    try:
        return frame.f_locals.get(name)
    except Exception:
        return None


def _record_of(frame: FrameType) -> Any:
    """The ``record`` local of an adapter frame (absent in a mounted app's inner adapter)."""
    return _local(frame, "record")


def _task_record(task: Any, adapter: CodeType, loop_thread: int, compiled: bool = True) -> Any:
    """The request record of a task whose awaited coroutines run through the adapter."""
    awaited = task.get_coro() if hasattr(task, "get_coro") else None
    for _ in range(MAX_DEPTH):
        frame = getattr(awaited, "cr_frame", None)
        if frame is None:
            return None
        if frame.f_code is adapter:
            record = _record_of(frame)
            if record is not None:
                return record
        if getattr(awaited, "cr_running", False):
            # Running now, so not awaiting anything: the rest is on the loop's stack.
            # Read in one call, never by f_back (the loop thread may be another thread).
            stack = current_stacks(STACK_DEPTH, compiled, loop_thread).get(loop_thread, ())
            for frame in stack:
                if frame.f_code is adapter:
                    record = _record_of(frame)
                    if record is not None:
                        return record
            return None
        awaited = getattr(awaited, "cr_await", None)
    return None


def watch_running_loop(agent: Any) -> LoopWatchdog | None:
    """Starts a watchdog on the running loop; None when no asyncio loop runs (trio)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    watchdog = LoopWatchdog(agent, loop)
    watchdog.start()
    return watchdog
