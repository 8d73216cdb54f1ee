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

import hmac
from asyncio import current_task
from threading import get_ident
from time import perf_counter
from types import MethodType
from typing import Any

from perfagent.agent import Agent
from perfagent.patching import Patch
from perfagent.record import RequestRecord, current, normalize_method

_SERVER_TIMING = b"server-timing"


class RouteTemplates:
    """Route object -> template, computed once per route (routes live as long as the app)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[Any, str]] = {}
        self.resolve = self._resolve  # bound once: records point at it without allocating

    def _resolve(self, record: RequestRecord) -> str | None:
        """The route the router has matched so far for this request, or None."""
        route = record.carrier.get("route")
        if route is None:
            return None
        template = self.of(route)
        return record.mount_prefix + template if template else ""

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
    """The middleware. One instance per app, created when the app builds its stack."""

    def __init__(
        self, app: Any, agent: Agent, templates: RouteTemplates, foreign: bool = False
    ) -> None:
        self.app = app
        self._agent = agent
        self._templates = templates
        self._server_timing = agent.settings.server_timing
        #: OpenTelemetry's middleware is inside: it makes the server spans.
        self._foreign = foreign
        token = agent.settings.profile_token
        self._profile_token = token.encode() if token else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._agent.loop_watch_pending:  # once per loop (lifespan or first request)
            self._agent.watch_loop()
        if scope["type"] != "http" or not self._agent.running:
            await self.app(scope, receive, send)
            return
        outer = current.get()
        if outer is not None and not outer.done:
            # A mounted app, or a second instrumentation of the same app: the
            # outer adapter already counts this request.
            await self.app(scope, receive, send)
            return

        agent = self._agent
        record = RequestRecord(normalize_method(scope["method"]), perf_counter(), scope)
        record.resolver = resolve = self._templates.resolve
        if self._foreign or "fastapi.telemetry" in scope:
            # FastAPI's built-in telemetry (outside us) or OpenTelemetry's middleware
            # (inside us) makes this request's server span; its ids are the request's.
            record.foreign = True
        if self._profile_token is not None:
            record.profile = _asks_for_profile(scope, self._profile_token)
        token = current.set(record)
        agent.inflight[record] = (get_ident(), current_task())  # for the slow-request sampler
        if not agent.thread.running:
            agent.thread.ensure_started()
        # With OpenTelemetry's middleware inside, it must find no span current, or
        # it would make its server span an INTERNAL one.
        otel = None if self._foreign else agent.otel
        otel_token = None
        try:
            agent.metrics.stats.started(record.method)
            if otel is not None:
                otel_token = otel.enter()
        except Exception as exc:
            agent.internal_error("asgi.start", exc)
        server_timing = self._server_timing

        # A plain function returning send's awaitable, not a coroutine of its own:
        # one frame less on every send (measured: ~1.5 µs per request on /hello).
        def send_wrapper(message: Any) -> Any:
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
                        record.route = resolve(record) or ""
                    if server_timing:
                        value = b"total;dur=%.3f" % ((now - record.start) * 1000.0)
                        if record.queries:
                            value += b', db;dur=%.3f;desc="%d queries"' % (
                                record.db_time * 1000.0,
                                len(record.queries),
                            )
                        message["headers"] = [*message.get("headers", ()), (_SERVER_TIMING, value)]
                except Exception as exc:
                    agent.internal_error("asgi.response_start", exc)
            return send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            if record.status is None:
                record.status = 500
            record.error_type = type(exc).__qualname__
            raise
        finally:
            if otel_token is not None:
                otel.exit(otel_token)
            current.reset(token)
            if record.route is None:
                record.route = ""
            agent.finish(record)


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
        return PerfagentASGI(stack, agent, templates, foreign=_has_otel_middleware(stack))

    return build_middleware_stack


class AsgiInstrumentation:
    """Installs the adapter on Starlette-family apps: all of them, or one."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.templates = RouteTemplates()
        self._routing_patched = False

    def patch_routing(self, routing: Any) -> None:
        if self._routing_patched:
            return
        self._routing_patched = True
        mount = routing.Mount
        self.agent.patches.append(Patch(mount, "handle", _mount_handle(self.agent, mount.handle)))

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

        self.agent.apps.append(undo)
