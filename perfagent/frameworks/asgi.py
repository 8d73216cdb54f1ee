"""ASGI adapter: FastAPI, Starlette and FastHTML (a Starlette subclass).

A pure ASGI middleware placed outside the whole middleware stack of the app
(so it also sees the 500s that Starlette's error middleware sends). It wraps
``send`` to see the status, the first and the last body message; it never
reads or buffers the body.

The route template comes from ``scope["route"]``, which Starlette's router
sets to the matched route; mounts add their own template to the record on the
way in (one patched ``Mount.handle``), so ``/api/v1/items/{item_id}`` keeps the
mount prefix as a template even when the mount path has parameters.
"""

from __future__ import annotations

import asyncio.tasks
import hmac
import sys
from asyncio import current_task, get_running_loop
from threading import get_ident
from time import perf_counter
from types import MethodType
from typing import Any

from perfagent.agent import Agent
from perfagent.patching import Patch
from perfagent.record import KNOWN_METHODS, RequestRecord, current, normalize_method

try:  # built by pip where a C compiler is found (perfagent/_perrequest.c)
    from perfagent._perrequest import AsgiBegin, RouteResolver, end_request
except ImportError:
    AsgiBegin = RouteResolver = end_request = None

_SERVER_TIMING = b"server-timing"


class RouteTemplates:
    """Route object -> template, computed once per route (routes live as long as the app)."""

    def __init__(self, compiled: bool = True) -> None:
        self._cache: dict[int, tuple[Any, str]] = {}
        # Made once, so that records point at it without allocating; in C where it was
        # built (``_perrequest.RouteResolver``: a cached route without a Python frame).
        self.resolve = (
            RouteResolver(self._cache, self._resolve)
            if compiled and RouteResolver is not None
            else self._resolve
        )

    def _resolve(self, record: RequestRecord) -> str | None:
        """The route the router has matched so far for this request, or None."""
        route = record.carrier.get("route")
        if route is None:
            return None
        template = self.of(route)
        return record.mount_prefix + template if template else ""

    def forget(self) -> None:
        """Drops every cached template, as an app builds its stack: the cache holds its
        routes, and a FastAPI route holds its app, so a test suite making an app per
        test kept them all alive. A server builds its stacks once; the next requests
        fill the cache again (the C resolver holds the template it read, not the entry).
        """
        self._cache.clear()

    def of(self, route: Any) -> str:
        hit = self._cache.get(id(route))
        if hit is not None and hit[0] is route:
            return hit[1]
        template = self._template(route)
        self._cache[id(route)] = (route, template)  # the route is kept so its id is not reused
        return template

    @staticmethod
    def _template(route: Any) -> str:
        from starlette.routing import Mount

        if isinstance(route, Mount):
            # The mount's own path is already in the record's prefix. A mounted
            # router that matched nothing inside is a 404: no route. A mounted
            # plain app (static files, a WSGI app) answers for the whole subtree.
            return "" if route.routes else "/{path}"
        return getattr(route, "path", "") or ""


class PerfagentASGI:
    """The middleware. One instance per app, created when the app builds its stack.

    A request's start (its record, the context variables, the in-flight entry)
    and its end (the resets and the pipeline) are ``begin`` and ``end``: in C
    where it was built (``_perrequest.AsgiBegin``, ``end_request``), else the
    Python reference below (``_PythonBegin``, ``_python_end``). This coroutine
    stays in Python either way: its frame, with its ``record`` local, is how the
    stack sampler and the loop watchdog tell which request a stack serves.
    """

    def __init__(
        self, app: Any, agent: Agent, templates: RouteTemplates, foreign: bool = False
    ) -> None:
        self.app = app
        self._agent = agent
        token = agent.settings.profile_token
        # OpenTelemetry's middleware is inside (foreign): it makes the server spans.
        options = (
            templates.resolve,
            agent.settings.server_timing,
            foreign,
            token.encode() if token else None,
        )
        if agent.settings.compiled_hooks and AsgiBegin is not None:
            self._begin = _compiled_begin(agent, *options)
            self._end = end_request
        else:
            self._begin = _PythonBegin(agent, *options)
            self._end = _python_end

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._agent.loop_watch_pending:  # once per loop (lifespan or first request)
            self._agent.watch_loop()
        request = self._begin(scope, send)
        if request is None:  # not HTTP, the agent stopped, or an outer adapter times it
            await self.app(scope, receive, send)
            return
        record = request.record  # read by the stack sampler and the loop watchdog
        try:
            await self.app(scope, receive, request)
        except BaseException as exc:
            if record.status is None:
                record.status = 500
            record.error_type = type(exc).__qualname__
            raise
        finally:
            self._end(request)


def _compiled_begin(
    agent: Agent, resolve: Any, server_timing: bool, foreign: bool, profile_token: bytes | None
) -> Any:
    otel = agent.otel
    return AsgiBegin(
        agent=agent,
        current=current,
        record_type=RequestRecord,
        known_methods={method: method for method in KNOWN_METHODS},
        resolve=resolve,
        server_timing=server_timing,
        foreign=foreign,
        profile=(lambda scope: _asks_for_profile(scope, profile_token)) if profile_token else None,
        inflight=agent.inflight,
        get_running_loop=get_running_loop,
        # Python 3.11's current_task() is a Python function over this dict; later ones' is C.
        tasks_by_loop=getattr(asyncio.tasks, "_current_tasks", None)
        if sys.version_info < (3, 12)
        else None,
        current_task=current_task,
        stats=agent.metrics.stats,
        otel=otel,
        otel_variable=None if otel is None else otel.variable,
        otel_shared=None if otel is None else otel.shared,
    )


class _PythonBegin:
    """``begin(scope, send)``: the request's record and send wrapper, or None when this
    adapter does not time the request (the Python reference of ``AsgiBegin``)."""

    def __init__(
        self,
        agent: Agent,
        resolve: Any,
        server_timing: bool,
        foreign: bool,
        profile_token: bytes | None,
    ) -> None:
        self._agent = agent
        self._resolve = resolve
        self._server_timing = server_timing
        self._foreign = foreign
        self._profile_token = profile_token

    def __call__(self, scope: Any, send: Any) -> _Request | None:
        agent = self._agent
        try:
            record = self._record(scope)
        except Exception as exc:  # the agent's error, not the app's: the request goes untimed
            agent.internal_error("asgi.start", exc)
            return None
        if record is None:
            return None
        request = _Request(record, send, self._resolve, self._server_timing, agent)
        request.token = current.set(record)
        agent.inflight[record] = (get_ident(), current_task())  # for the slow-request sampler
        if not agent.thread.running:
            agent.thread.ensure_started()
        # With OpenTelemetry's middleware inside, it must find no span current, or
        # it would make its server span an INTERNAL one.
        otel = None if self._foreign else agent.otel
        try:
            agent.metrics.stats.started(record.method)
            if otel is not None:
                request.otel_token = otel.enter()
                request.otel = otel
        except Exception as exc:
            agent.internal_error("asgi.start", exc)
        return request

    def _record(self, scope: Any) -> RequestRecord | None:
        if scope["type"] != "http" or not self._agent.running:
            return None
        outer = current.get()
        if outer is not None and not outer.done:
            # A mounted app, or a second instrumentation of the same app: the
            # outer adapter already counts this request.
            return None
        record = RequestRecord(normalize_method(scope["method"]), perf_counter(), scope)
        record.resolver = self._resolve
        if self._foreign or "fastapi.telemetry" in scope:
            # FastAPI's built-in telemetry (outside us) or OpenTelemetry's middleware
            # (inside us) makes this request's server span; its ids are the request's.
            record.foreign = True
        if self._profile_token is not None:
            record.profile = _asks_for_profile(scope, self._profile_token)
        return record


class _Request:
    """The send wrapper of one request: sees the status, the first and the last
    body message, and adds Server-Timing; never reads or buffers the body."""

    __slots__ = (
        "_agent",
        "_resolve",
        "_send",
        "_server_timing",
        "otel",
        "otel_token",
        "record",
        "token",
    )

    def __init__(
        self, record: RequestRecord, send: Any, resolve: Any, server_timing: bool, agent: Agent
    ) -> None:
        self.record = record
        self._send = send
        self._resolve = resolve
        self._server_timing = server_timing
        self._agent = agent
        self.token: Any = None
        self.otel: Any = None
        self.otel_token: Any = None

    def __call__(self, message: Any) -> Any:
        record = self.record
        kind = message["type"]
        if kind == "http.response.body":
            if not message.get("more_body", False):
                record.end = perf_counter()
                if record.first_byte is None:
                    record.first_byte = record.end
            elif record.first_byte is None:
                record.first_byte = perf_counter()
                record.streaming = True
        elif kind == "http.response.start":
            try:
                now = record.response_start = perf_counter()
                record.status = message["status"]
                if record.route is None:
                    record.route = self._resolve(record) or ""
                if self._server_timing:
                    value = b"total;dur=%.3f" % ((now - record.start) * 1000.0)
                    if record.queries:
                        n = record.query_count
                        value += b', db;dur=%.3f;desc="%d %s"' % (
                            record.db_time * 1000.0,
                            n,
                            b"query" if n == 1 else b"queries",
                        )
                    message["headers"] = [*message.get("headers", ()), (_SERVER_TIMING, value)]
            except Exception as exc:
                self._agent.internal_error("asgi.response_start", exc)
        return self._send(message)


def _python_end(request: _Request) -> None:
    """The request is over: the context variables reset, then the pipeline (the
    Python reference of ``_perrequest.end_request``)."""
    record = request.record
    if request.otel_token is not None:
        request.otel.exit(request.otel_token)
    try:
        current.reset(request.token)
    except (ValueError, RuntimeError) as exc:  # set in another context: not the app's problem
        request._agent.internal_error("asgi.end", exc)
    if record.route is None:
        record.route = ""
    request._agent.finish(record)


def _asks_for_profile(scope: Any, token: bytes) -> bool:
    for name, value in scope["headers"]:
        if name == b"x-perfagent-profile":
            return hmac.compare_digest(value, token)
    return False


def _mount_handle(agent: Agent, original: Any) -> Any:
    async def handle(self: Any, scope: Any, receive: Any, send: Any) -> None:
        record = current.get()
        if record is not None and not record.done and agent.running:
            record.mount_prefix += self.path
        await original(self, scope, receive, send)

    return handle


def _router_names_route(routing: Any) -> bool:
    """Whether this Starlette's routes put themselves in the scope as ``scope["route"]``
    (asked once, of a route made for the purpose)."""
    try:
        route = routing.Route("/perfagent-probe", lambda request: None)
        scope = {"type": "http", "path": "/perfagent-probe", "method": "GET", "root_path": ""}
        _, child = route.matches(scope)
        return "route" in child
    except Exception:
        return True  # cannot tell: leave the routes alone


def _matches_naming_route(original: Any, no_match: Any) -> Any:
    def matches(self: Any, scope: Any) -> Any:
        match, child_scope = original(self, scope)
        if match is not no_match:
            child_scope["route"] = self
        return match, child_scope

    return matches


def _has_otel_middleware(stack: Any) -> bool:
    """True when OpenTelemetry's ASGI middleware (contrib's or Starlette's) is in the stack."""
    seen: set[int] = set()
    while stack is not None and id(stack) not in seen:
        seen.add(id(stack))
        if type(stack).__name__ == "OpenTelemetryMiddleware":
            return True
        stack = getattr(stack, "app", None)
    return False


def _stack_builder(agent: Agent, templates: RouteTemplates, original: Any) -> Any:
    def build_middleware_stack(self: Any) -> Any:
        stack = original(self)
        if not agent.running:
            return stack
        templates.forget()
        return PerfagentASGI(stack, agent, templates, foreign=_has_otel_middleware(stack))

    return build_middleware_stack


class AsgiInstrumentation:
    """Installs the adapter on Starlette-family apps: all of them, or one."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.templates = RouteTemplates(agent.settings.compiled_hooks)
        self._routing_patched = False

    def patch_routing(self, routing: Any) -> None:
        if self._routing_patched:
            return
        self._routing_patched = True
        mount = routing.Mount
        self.agent.patches.append(Patch(mount, "handle", _mount_handle(self.agent, mount.handle)))
        if not _router_names_route(routing):
            # Starlette before ~0.24 (FastAPI's own routes always did) leaves the
            # matched route out of the scope: name it there, for those versions only.
            for cls in (routing.Route, routing.WebSocketRoute, routing.Mount):
                if "matches" in cls.__dict__:
                    matches = _matches_naming_route(cls.__dict__["matches"], routing.Match.NONE)
                    self.agent.patches.append(Patch(cls, "matches", matches))

    def patch_class(self, cls: Any) -> None:
        """Every app of ``cls`` built from now on gets the adapter."""
        if "build_middleware_stack" not in cls.__dict__:
            return
        original = cls.__dict__["build_middleware_stack"]
        self.agent.patches.append(
            Patch(
                cls, "build_middleware_stack", _stack_builder(self.agent, self.templates, original)
            )
        )

    def instrument_app(self, app: Any) -> None:
        """This one app gets the adapter, even if it has already served requests."""
        import starlette.routing

        self.patch_routing(starlette.routing)
        # Wrap what the app builds now, which may already be another tool's
        # instance-level wrapper (OpenTelemetry's FastAPIInstrumentor makes one).
        current_builder = app.build_middleware_stack
        builder = _stack_builder(self.agent, self.templates, lambda _app: current_builder())
        patch = Patch(app, "build_middleware_stack", MethodType(builder, app))
        app.middleware_stack = None  # rebuilt, with the adapter, on the next request

        def undo() -> None:
            patch.undo()
            app.middleware_stack = None

        self.agent.undo_app(app, undo)
