"""Stack samples of the requests that run long, taken from the agent thread.

Nothing is sampled while every request is quick: each tick the agent thread
compares the start time of the few in-flight requests with half the slow
threshold, and only past it does it look at a stack. Where the request is:

- sync code (Flask, a thread): the stack of its thread;
- async code running on the loop right now: the loop thread's stack, when it
  holds this request's adapter frame;
- a FastAPI ``def`` endpoint: the pool thread whose stack holds that endpoint;
- async code waiting (``await``): the task's chain of awaiting coroutines,
  which ends where it waits.

Each sample is kept as a collapsed stack (``frame;frame;...`` root first,
perfagent's own frames left out) with the innermost app line, so a slow
request's ``callsite`` is the app line with the most samples, and the stacks
make the route's flame graph.
"""

from __future__ import annotations

from itertools import islice
from time import perf_counter
from types import FrameType
from typing import Any

from perfagent.db.callsite import AppFrames
from perfagent.profiling.frames import Stacks, current_stacks
from perfagent.record import RequestRecord

MAX_DEPTH = 64
#: Frames read per thread: the ASGI adapter's frame is looked for below the ones kept.
STACK_DEPTH = 512
MAX_STACKS_PER_REQUEST = 200
#: In-flight entries a tick looks at (newest first) and requests it samples: a tick
#: costs the same with 10 or 10,000 requests in flight (long polls, streams, or
#: responses a client never closed).
MAX_EXAMINED = 256
MAX_SAMPLED = 32


class StackSampler:
    def __init__(
        self, slow_s: float, frames: AppFrames, inflight: dict, compiled: bool = True
    ) -> None:
        self.compiled = compiled  # stacks read by perfagent/_speedups.c (False: the twin)
        self._after = slow_s * 0.5
        self.interval = min(max(slow_s / 50.0, 0.005), 0.02)
        self._frames = frames
        self._inflight = inflight
        self._adapter_code: Any = None
        self._endpoint_codes: dict[int, Any] = {}
        self._labels: dict[int, tuple[Any, str]] = {}  # id(code) -> (code, label)

    def idle(self) -> float:
        """Seconds until the oldest request in flight is old enough to sample (the
        agent thread sleeps that long); the whole wait while none is in flight.

        The in-flight dict keeps arrival order, so its first record is the oldest;
        a request that asked for a profile (``record.profile``) is sampled from its
        start, so the agent does not ask this while a profile token is set.
        """
        try:
            oldest = next(iter(self._inflight))
        except StopIteration:
            return self._after
        except RuntimeError:  # changed by a request thread meanwhile: ask again soon
            return self.interval
        return self._after - (perf_counter() - oldest.start)

    def tick(self) -> None:
        """Agent thread: sample the requests that have been running long enough.

        Newest first, at most ``MAX_EXAMINED`` entries and ``MAX_SAMPLED`` samples;
        of the sync requests of one thread only the newest, the one that thread
        can be running (an older one's body waits on a client, off its stack).
        """
        inflight = self._inflight
        if not inflight:
            return
        try:  # one C call: no request thread runs while the entries are copied
            newest = list(islice(reversed(inflight.items()), MAX_EXAMINED))
        except RuntimeError:  # changed meanwhile by a request thread: next tick
            return
        now = perf_counter()
        after = self._after
        due = []
        threads_seen = set()
        for record, where in newest:
            if where[1] is None:  # a sync request: its thread runs one at a time
                if where[0] in threads_seen:
                    continue
                threads_seen.add(where[0])
            if record.profile or now - record.start >= after:
                due.append((record, where))
                if len(due) >= MAX_SAMPLED:
                    break
        if not due:
            return
        threads = current_stacks(STACK_DEPTH, self.compiled)  # read once, no f_back after
        for record, (thread_id, task) in due:
            if record.done:
                continue
            frames = self._locate(record, thread_id, task, threads)
            if frames:
                self._keep(record, frames)

    # -- where the request is -----------------------------------------------

    def _locate(
        self, record: RequestRecord, thread_id: int, task: Any, threads: Stacks
    ) -> list[Any]:
        stack = threads.get(thread_id, ())
        if task is None:
            return _chain(stack)
        if self._holds(stack, record):
            return _chain(stack)  # running on the loop right now
        endpoint = self._endpoint_code(record)
        if endpoint is not None:
            for other_id, other in threads.items():
                if other_id != thread_id and _contains(other, endpoint):
                    return _chain(other)  # a `def` endpoint in the thread pool
        return _awaiting(task)

    def _holds(self, stack: tuple[FrameType, ...], record: RequestRecord) -> bool:
        if self._adapter_code is None:
            from perfagent.frameworks.asgi import PerfagentASGI

            self._adapter_code = PerfagentASGI.__call__.__code__
        for frame in stack:
            if frame.f_code is self._adapter_code:
                return frame.f_locals.get("record") is record
        return False

    def _endpoint_code(self, record: RequestRecord) -> Any:
        carrier = record.carrier
        endpoint = carrier.get("endpoint") if isinstance(carrier, dict) else None
        if endpoint is None:
            return None
        code = self._endpoint_codes.get(id(endpoint))
        if code is None:
            code = getattr(getattr(endpoint, "__wrapped__", endpoint), "__code__", None)
            if len(self._endpoint_codes) < 10_000:
                self._endpoint_codes[id(endpoint)] = code
        return code

    # -- what is kept -------------------------------------------------------

    def _keep(self, record: RequestRecord, frames: list[Any]) -> None:
        frames_of = self._frames
        parts, app_line = [], None
        for frame in frames:  # root first
            code, line = frame[0], frame[1]
            known = self._labels.get(id(code))  # by id: see db/callsite.py
            if known is None:
                label = f"{code.co_name} ({frames_of.show(code.co_filename)})"
                if len(self._labels) < 50_000:
                    self._labels[id(code)] = (code, label)
            else:
                label = known[1]
            if frames_of.is_agent(code):
                continue
            parts.append(label)
            if frames_of.is_app(code):
                app_line = f"{frames_of.show(code.co_filename)}:{line}"
        if not parts:
            return
        key = (";".join(parts), app_line)
        samples = record.samples
        if samples is None:
            samples = record.samples = {}
        if key in samples or len(samples) < MAX_STACKS_PER_REQUEST:
            samples[key] = samples.get(key, 0) + 1


def _chain(stack: tuple[FrameType, ...]) -> list[Any]:
    """(code, line) pairs of the top ``MAX_DEPTH`` frames of ``stack``, root first."""
    out = [(frame.f_code, frame.f_lineno) for frame in stack[:MAX_DEPTH]]
    out.reverse()
    return out


def _contains(stack: tuple[FrameType, ...], code: Any) -> bool:
    """Whether one of the top ``MAX_DEPTH`` frames of ``stack`` runs ``code``."""
    return any(frame.f_code is code for frame in stack[:MAX_DEPTH])


def _awaiting(task: Any) -> list[Any]:
    """(code, line) pairs of the coroutines a task is awaiting through, outermost first."""
    out = []
    try:
        awaited = task.get_coro()
    except Exception:
        return out
    while awaited is not None and len(out) < MAX_DEPTH:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        out.append((frame.f_code, frame.f_lineno))
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return out


def summarize(samples: dict[tuple[str, str | None], int]) -> tuple[str | None, dict[str, int]]:
    """(the app line with most samples, collapsed stack -> count)."""
    lines: dict[str, int] = {}
    stacks: dict[str, int] = {}
    for (stack, line), count in samples.items():
        stacks[stack] = stacks.get(stack, 0) + count
        if line is not None:
            lines[line] = lines.get(line, 0) + count
    callsite = max(lines, key=lines.__getitem__) if lines else None
    return callsite, stacks
