"""The agent's state: one object, created by ``init()`` and torn down by ``shutdown()``.

It owns the settings, the metrics, the logger, the end-of-request pipeline and
every patch, so nothing about the agent lives in mutable module globals.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Callable
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry

from perfagent.background import AgentThread
from perfagent.bootstrap import RUNNER_ENV
from perfagent.build import say_if_pure_python
from perfagent.config import Settings
from perfagent.db.capture import QueryCapture
from perfagent.detectors.nplusone import NPlusOneDetector
from perfagent.detectors.regression import RegressionDetector
from perfagent.export.exporter import Exporter
from perfagent.export.logs import WRITE_EVERY_S, make_logger
from perfagent.export.metrics import Metrics, serving_registry, start_server
from perfagent.patching import Patch, PostImportHooks
from perfagent.profiling.sampler import StackSampler, summarize
from perfagent.record import IDS, ROOT_PARENT, RequestRecord
from perfagent.tracecontext import Sampler

try:  # built by pip where a C compiler is found (perfagent/_perrequest.c, _speedups.c)
    from perfagent._perrequest import Finisher
    from perfagent._speedups import observe_queries
except ImportError:
    Finisher = observe_queries = None

#: Query findings of one kind, route, shape and call site are exported at most this often.
REPEAT_EVERY_S = 10.0
#: With no request finished, the next merge check waits this long: the stack sampler's
#: wait at the default slow threshold, so an idle agent thread wakes no more often.
QUIET_MERGE_WAIT_S = 0.25
_THROTTLED = frozenset(("n_plus_one", "duplicate_query"))
_UNDO = "_perfagent_undo"  # an instrumented app's own list of undos


Step = Callable[[RequestRecord], None]


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running = True
        self.log = make_logger(settings.log_format, compiled=settings.compiled_hooks)
        self.metrics = Metrics(CollectorRegistry(auto_describe=False))
        self.metrics.stats.compiled = settings.compiled_hooks
        self.patches: list[Patch] = []
        self.import_hooks: list[PostImportHooks] = []
        self.apps: list[Any] = []  # undos to run on shutdown (drivers hooked late)
        #: Apps given to init(app), held weakly: each holds its own undos (``undo_app``),
        #: so a test suite that makes an app per test does not keep every app alive.
        self._apps: weakref.WeakSet[Any] = weakref.WeakSet()
        self._metrics_server: Any = None
        self._errors_logged: set[str] = set()
        self._recent: dict[tuple, list] = {}  # finding key -> [last exported, repeats since]
        self.repeat_every_s = REPEAT_EVERY_S
        #: True while the loop that serves requests has no watchdog yet, or has one
        #: whose heartbeat went idle: the ASGI adapter reads this one attribute per
        #: call and calls watch_loop() then (starts one, or re-arms it).
        self.loop_watch_pending = True
        self.loop_watchdog: Any = None
        #: Undo of the task factory set on each loop that served requests (db/tasks.py).
        self._task_factories: list[Callable[[], None]] = []
        self._watch_lock = threading.Lock()
        self._slow_s = settings.slow_ms / 1000.0  # read per request: a plain attribute
        self._slow_routes = {route: ms / 1000.0 for route, ms in settings.slow_routes}
        self.sampler = Sampler.from_environment(settings.trace_sample)
        # Both threads rest while there is no work (background.py): the agent thread
        # once no request is in flight, the export thread once nothing is queued.
        self.thread = AgentThread(self.internal_error, quiet=self._quiet, on_rest=self._rest)
        self.thread.every(WRITE_EVERY_S, self._write_log, settle=True)
        # Recorded requests reach the metrics (and under ``perfagent run`` the workers'
        # files) every metrics_flush_s while requests finish: what SIGKILL can lose.
        stats, flush_s = self.metrics.stats, settings.metrics_flush_s
        self.thread.every(
            flush_s,
            lambda: stats.merge_recent(flush_s, QUIET_MERGE_WAIT_S),
            stats.merge_wait,
            settle=True,
        )
        # Exports wait on the network (up to TIMEOUT_S a post against a collector that
        # hangs): on a thread of their own, so that the stack sampler and the log writer
        # keep their pace whatever the collector does. The agent thread starts (and
        # wakes) it.
        self.export_thread = AgentThread(
            self.internal_error, "perfagent-export", quiet=lambda: self.exporter.quiet()
        )
        self.thread.every(1.0, self.export_thread.ensure_started, settle=True)
        #: A Flask app's ``import_name``, given to ``init(app)``: a name when none is set.
        self.app_name: str | None = None
        self.exporter = Exporter(
            settings.console_url,
            self.service_name,
            self.metrics,
            self.export_thread,
            settings.export_interval_s,
            settings.max_export_bytes,
        )
        self.otel = self._otel_bridge()
        self.capture = QueryCapture(
            self.internal_error,
            settings.compiled_hooks,
            settings.fingerprint_cache_bytes,
            self.metrics.dropped.labels("fingerprint_cache"),
            settings.max_calls_per_request,
            self.metrics.stats.histograms[2].bounds,
        )
        #: Requests in flight -> (thread id, asyncio task or None), for the sampler.
        self.inflight: dict[RequestRecord, tuple[int, Any]] = {}
        self.stack_sampler = StackSampler(
            min([self._slow_s, *self._slow_routes.values()]),
            self.capture.frames,
            self.inflight,
            settings.compiled_hooks,
        )
        # With a profile token, a request may ask to be sampled from its start: then the
        # sampler ticks at its interval; otherwise only once a request is old enough.
        self.thread.every(
            self.stack_sampler.interval,
            self.stack_sampler.tick,
            None if settings.profile_token else self.stack_sampler.idle,
        )
        regressions = RegressionDetector(self, settings.regression_window_s)
        self.thread.every(regressions.window_s, regressions.tick)
        # The end-of-request pipeline. Steps that would return at once are left out
        # (a call each, ~600 CPU instructions): the profile step when no token can ask
        # for a profile, the N+1 detector for a request that issued no query.
        profile = [self._attach_profile] if settings.profile_token else []
        first = [self.metrics.request_ended, self._detect_slow, *profile]
        last = [self._keep_trace]  # last: every finding before makes the request's trace kept
        self.steps: list[Step] = first + last
        self._nplusone = NPlusOneDetector(self, self.capture)
        self.steps_with_queries: list[Step] = [*first, self._nplusone, *last]
        self._compile_finish()

    def _compile_finish(self) -> None:
        if self.settings.compiled_hooks and Finisher is not None:
            self.finish = self._compiled_finish()  # type: ignore[method-assign]

    def _compiled_finish(self) -> Any:
        """``finish`` in C: the same steps, each called only when it has work to do
        (measured in a loop: 0.82 -> 0.54 µs a request without a head-sample draw)."""
        stats, histograms = self.metrics.stats, self.metrics.stats.histograms
        return Finisher(
            inflight=self.inflight,
            perf_counter=perf_counter,
            stats=stats,
            observe_queries=observe_queries,
            query_bounds=histograms[2].float_bounds,
            slow_routes=self._slow_routes or None,
            detect_slow=self._detect_slow,
            profile=self._attach_profile if self.settings.profile_token else None,
            nplusone=getattr(self._nplusone, "compiled", None) or self._nplusone,
            keep=self._keep_trace,
            head_sampled=self.head_sampled,
            on_error=self.internal_error,
            where_metrics="Metrics.request_ended",
            where_slow="Agent._detect_slow",
            where_profile="Agent._attach_profile",
            where_nplusone="NPlusOneDetector",
            where_keep="Agent._keep_trace",
            slow_s=self._slow_s,
            duration_bounds=histograms[0].float_bounds,
            count_bounds=histograms[1].float_bounds,
            wait_bounds=histograms[3].float_bounds,
            getrandbits=IDS.getrandbits,
            root_parent=ROOT_PARENT,
            sample_bound=self.sampler.bound,
            parent_based=self.sampler.parent_based,
        )

    def _otel_bridge(self) -> Any:
        try:
            from perfagent.export.otel_context import OtelBridge

            return OtelBridge(self.head_sampled)
        except ImportError:  # opentelemetry-api is a dependency, but be safe without it
            return None

    def service_name(self) -> str:
        """The configured name, else one inferred from this process's command line,
        the Flask app given to ``init(app)`` or the working folder (read at the first
        export, once the app is known)."""
        if self.settings.service_name:
            return self.settings.service_name
        import sys

        from perfagent.service_name import infer

        return infer(sys.argv, os.environ, self.app_name)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        atexit.register(self._at_exit)
        if os.environ.get(RUNNER_ENV):
            return  # the runner serves /metrics and said what it runs
        if Finisher is None:
            say_if_pure_python()
        if not self.settings.metrics_port:
            return
        registry = serving_registry(
            self.metrics,
            os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
            self.settings.compiled_hooks and Finisher is not None,
        )
        try:
            self._metrics_server = start_server(
                registry, self.settings.metrics_host, self.settings.metrics_port
            )
        except OSError as exc:
            # Another worker of this app serves it, or the port is taken: the app runs on.
            self.log.info(
                "metrics_port_busy",
                port=self.settings.metrics_port,
                error=str(exc),
                pid=os.getpid(),
            )

    def stop(self) -> None:
        self.running = False
        self.loop_watch_pending = False
        watchdog, self.loop_watchdog = self.loop_watchdog, None
        if watchdog is not None:
            watchdog.stop()
        atexit.unregister(self._at_exit)
        self.thread.stop()
        self.export_thread.stop()
        self._at_exit()
        self.exporter.close()
        for hooks in self.import_hooks:
            hooks.remove()
        for patch in reversed(self.patches):
            patch.undo()
        self.patches.clear()
        for undo in reversed(self.apps):
            undo()
        self.apps.clear()
        for app in list(self._apps):
            for undo in reversed(app.__dict__.pop(_UNDO, [])):
                undo()
        self._apps = weakref.WeakSet()
        for undo in self._task_factories:
            undo()
        self._task_factories.clear()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    def _write_log(self) -> None:
        """Agent-thread task: writes the queued log lines. From its first run until
        the agent stops, log events queue for it rather than being written in place."""
        self.log.deferred = self.running
        self.log.write()

    def undo_app(self, app: Any, undo: Callable[[], None]) -> None:
        """Runs ``undo`` on shutdown if ``app`` is still alive; the app holds it."""
        try:
            app.__dict__.setdefault(_UNDO, []).append(undo)
            self._apps.add(app)
        except (AttributeError, TypeError):  # no __dict__ or no weak reference
            self.apps.append(undo)

    def _quiet(self) -> bool:
        """Agent thread: nothing for it to do until a request starts."""
        return not self.inflight

    def _rest(self) -> None:
        """Agent thread, before it rests: log lines are written where they are logged."""
        self.log.deferred = False
        self.log.write()

    def _at_exit(self) -> None:
        """What the last moments recorded: metrics merged, log lines written."""
        self.log.deferred = False
        self.log.write()
        self.metrics.stats.flush()

    def after_fork_in_child(self) -> None:
        # The parent keeps serving /metrics; a forked worker must not try to.
        self._metrics_server = None
        self.loop_watchdog = None  # its thread and its loop stayed in the parent
        self.loop_watch_pending = self.running
        self._watch_lock = threading.Lock()
        self.metrics.stats.after_fork_in_child()
        self.log.after_fork_in_child()
        self.thread.after_fork_in_child()
        self.export_thread.after_fork_in_child()
        self.exporter.after_fork_in_child()

    def watch_loop(self) -> None:
        """Starts the event-loop watchdog on the running loop, or re-arms its idle
        heartbeat; never raises.

        Called by the ASGI adapter on the loop's own thread (lifespan or a
        request), so it watches the loop that serves requests, in every worker.
        """
        old = None
        try:
            with self._watch_lock:
                if not self.loop_watch_pending:
                    return
                self.loop_watch_pending = False
                if not self.running:
                    return
                watchdog = self.loop_watchdog
                if watchdog is not None and watchdog.rearm():  # idle since the last request
                    return
                old, self.loop_watchdog = watchdog, None
                from perfagent.db import tasks
                from perfagent.detectors.eventloop import watch_running_loop

                self.loop_watchdog = watch_running_loop(self)
                if self.loop_watchdog is not None:
                    # Loops closed since (a test client's each) need no undo: let them go.
                    factories = [u for u in self._task_factories if not u.loop.is_closed()]
                    factories.append(
                        tasks.install(
                            self.loop_watchdog.loop, self.capture.frames, self.internal_error
                        )
                    )
                    self._task_factories = factories
        except Exception as exc:
            self.internal_error("watch_loop", exc)
        if old is not None:  # it watched a loop that no longer serves (outside the lock:
            old.stop()  # its monitor ends through loop_watchdog_ended, which takes it)

    def loop_watchdog_ended(self, watchdog: Any) -> None:
        """The watchdog's loop closed: the next loop to serve a request gets a new one."""
        with self._watch_lock:
            if self.loop_watchdog is watchdog:
                self.loop_watchdog = None
                self.loop_watch_pending = self.running

    # -- per request -------------------------------------------------------

    def finish(self, record: RequestRecord) -> None:
        """Runs the pipeline once for a request; never raises."""
        if record.done:
            return
        record.done = True
        self.inflight.pop(record, None)
        if record.end is None:
            record.end = perf_counter()
        for step in self.steps_with_queries if record.queries else self.steps:
            try:
                step(record)
            except Exception as exc:
                self.internal_error(getattr(step, "__qualname__", repr(step)), exc)

    def internal_error(self, where: str, exc: BaseException) -> None:
        """Counts an error inside the agent and logs it once per place; never raises."""
        try:
            self.metrics.dropped.labels("agent_error").inc()
            if where not in self._errors_logged:
                self._errors_logged.add(where)
                self.log.error("agent_error", where=where, error=repr(exc))
        except Exception:
            pass

    def head_sampled(self, record: RequestRecord) -> bool:
        """The head-sampling decision for a request, taken once."""
        if record.sampled is None:
            trace_id = record.settled_trace_id()
            parent_sampled = record.parent[1] if record.parent else None
            record.sampled = self.sampler.sampled(trace_id, parent_sampled)
        return record.sampled

    def _detect_slow(self, record: RequestRecord) -> None:
        # A stream (SSE, a long download) is judged by its time to first byte.
        end = (record.first_byte or record.end) if record.streaming else record.end
        took = end - record.start
        threshold = (
            self._slow_routes.get(record.route, self._slow_s) if self._slow_routes else self._slow_s
        )
        if took < threshold:
            return
        self.metrics.count_slow(record)
        callsite, stacks = summarize(record.samples) if record.samples else (None, None)
        fields = {
            "route": record.route or "",
            "method": record.method,
            "status": record.status,
            "duration_ms": round(took * 1000.0, 3),
            "threshold_ms": round(threshold * 1000.0, 3),
            "trace_id": record.trace_id,
            "callsite": callsite,
        }
        # The stacks go to the console (the route's flame graph), not into the log line.
        self.report("slow_request", fields, record, {"stacks": stacks} if stacks else None)

    def report(
        self,
        kind: str,
        fields: dict[str, Any],
        record: RequestRecord | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """A finding: in the log every time; on the trace and to the console when fresh."""
        self.log.warning(kind, **fields)
        if kind in _THROTTLED:
            key = (kind, fields.get("route"), fields.get("fingerprint"), fields.get("callsite"))
            repeats = self.fresh(key)
            if repeats is None:
                return
            if repeats:
                fields = {**fields, "repeats": repeats}
        self.send(kind, {**fields, **extra} if extra else fields, record)

    def fresh(self, key: tuple) -> int | None:
        """For a query finding (kind, route, fingerprint, call site): None while it was
        exported less than ``repeat_every_s`` ago (this one is folded in), else how
        many occurrences the export stands for (0: just this one).

        Query findings (N+1, duplicates) repeat on every request of a route until
        the code is fixed; after the first, the same finding is exported and keeps
        its trace at most once per ``REPEAT_EVERY_S``, with ``repeats`` counting
        what was folded in, so the console's occurrence totals stay exact without a
        trace per request.
        """
        now = perf_counter()
        seen = self._recent.get(key)
        if seen is not None and now - seen[0] < self.repeat_every_s:
            seen[1] += 1
            return None
        if len(self._recent) >= 10_000:
            self._recent.clear()
        self._recent[key] = [now, 0]
        return seen[1] + 1 if seen is not None and seen[1] else 0

    def send(self, kind: str, fields: dict[str, Any], record: RequestRecord | None) -> None:
        """A finding onto its request's trace and to the console."""
        if record is not None:
            record.add_finding(kind, fields)
        self.exporter.submit_finding(kind, fields, record)

    def _attach_profile(self, record: RequestRecord) -> None:
        """A request that asked for a profile keeps its trace, with the samples on it."""
        if not record.profile:
            return
        callsite, stacks = summarize(record.samples) if record.samples else (None, {})
        fields = {
            "route": record.route or "",
            "method": record.method,
            "duration_ms": round((record.end - record.start) * 1000.0, 3),
            "samples": sum(stacks.values()),
            "callsite": callsite,
        }
        self.log.info("request_profiled", trace_id=record.trace_id, **fields)
        record.add_finding("profile", {**fields, "stacks": stacks})

    def _keep_trace(self, record: RequestRecord) -> None:
        """Keeps slow, failed and finding-bearing requests, and the head sample."""
        if record.foreign:
            return  # the other instrumentation exports this request's server span
        status = record.status or 0
        if record.findings or record.error_type or status >= 500 or self.head_sampled(record):
            record.keep = True
            self.exporter.submit(record)
