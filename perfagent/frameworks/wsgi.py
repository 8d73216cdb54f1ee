"""WSGI adapter: Flask, blueprints and class-based views included.

The request is timed from the call into ``Flask.wsgi_app`` until the server
closes the response body, so a streamed body counts in full. The route
template is read from Flask's request context while it is still pushed, in
``start_response``: ``/users/<int:id>``, with a blueprint's prefix already in it.

When Flask runs inside an ASGI app (mounted with ``WSGIMiddleware`` or
a2wsgi), the ASGI adapter already holds a record for the request; the Flask
adapter then only names the route, so the request is counted once.
"""

from __future__ import annotations

import hmac
from threading import get_ident
from time import perf_counter
from typing import Any

from perfagent.agent import Agent
from perfagent.patching import Patch
from perfagent.record import RequestRecord, current, normalize_method


def _flask_rule_reader() -> Any:
    """A function returning the matched ``url_rule`` of the current Flask request, or None."""
    from flask import globals as flask_globals

    request_var = getattr(flask_globals, "_cv_request", None)
    if request_var is not None:

        def read() -> Any:
            ctx = request_var.get(None)
            return None if ctx is None else ctx.request.url_rule

        return read
    app_var = flask_globals._cv_app  # Flask versions that merged the two contexts

    def read_merged() -> Any:
        ctx = app_var.get(None)
        request = getattr(ctx, "_request", None) or getattr(ctx, "request", None)
        return None if request is None else request.url_rule

    return read_merged


class _Body:
    """The response iterable, passed through; ``close()`` ends the request's record."""

    __slots__ = ("_agent", "_iterable", "_record")

    def __init__(self, iterable: Any, record: RequestRecord, agent: Agent) -> None:
        self._iterable = iterable
        self._record = record
        self._agent = agent

    def __iter__(self) -> Any:
        return iter(self._iterable)

    def close(self) -> None:
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        finally:
            self._agent.finish(self._record)


class FlaskInstrumentation:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._read_rule: Any = None
        self._resolve: Any = None

    def _serve(self, app: Any, wsgi_app: Any, environ: Any, start_response: Any) -> Any:
        """Wraps one call of a Flask app's ``wsgi_app``."""
        agent = self.agent
        read_rule = self._read_rule
        outer = current.get()
        if outer is not None and not outer.done:
            if outer.route is not None:  # already named: a second adapter on the same app
                return wsgi_app(environ, start_response)

            def name_route(status: str, headers: Any, exc_info: Any = None) -> Any:
                try:
                    rule = read_rule()
                    outer.route = outer.mount_prefix + rule.rule if rule is not None else ""
                except Exception as exc:
                    agent.internal_error("flask.nested_route", exc)
                return start_response(status, headers, exc_info)

            return wsgi_app(environ, name_route)

        record = RequestRecord(
            normalize_method(environ.get("REQUEST_METHOD", "")), perf_counter(), environ
        )
        record.resolver = self._resolve
        otel = agent.otel
        if getattr(app, "_is_instrumented_by_opentelemetry", False):
            # OpenTelemetry's FlaskInstrumentor makes this request's server span.
            record.foreign = True
            otel = None
        profile_token = agent.settings.profile_token
        if profile_token and "HTTP_X_PERFAGENT_PROFILE" in environ:
            record.profile = hmac.compare_digest(environ["HTTP_X_PERFAGENT_PROFILE"], profile_token)
        token = current.set(record)
        agent.inflight[record] = (get_ident(), None)  # for the slow-request sampler
        if not agent.thread.running:
            agent.thread.ensure_started()
        server_timing = agent.settings.server_timing
        otel_token = None
        try:
            agent.metrics.stats.started(record.method)
            if otel is not None:
                otel_token = otel.enter()
        except Exception as exc:
            agent.internal_error("flask.start", exc)

        def start_response_wrapper(status: str, headers: Any, exc_info: Any = None) -> Any:
            try:
                now = record.response_start = record.first_byte = perf_counter()
                record.status = int(status[:3])
                rule = read_rule()
                record.route = rule.rule if rule is not None else ""
                streaming = True
                for name, _ in headers:
                    if name.lower() == "content-length":
                        streaming = False
                        break
                record.streaming = streaming
                if server_timing:
                    value = f"total;dur={(now - record.start) * 1000.0:.3f}"
                    if record.queries:
                        db_ms = record.db_time * 1000.0
                        value += f', db;dur={db_ms:.3f};desc="{record.query_count} queries"'
                    headers.append(("Server-Timing", value))
            except Exception as exc:
                agent.internal_error("flask.start_response", exc)
            return start_response(status, headers, exc_info)

        try:
            body = wsgi_app(environ, start_response_wrapper)
        except BaseException as exc:
            if record.status is None:
                record.status = 500
            record.error_type = type(exc).__qualname__
            agent.finish(record)
            raise
        finally:
            if otel_token is not None:
                otel.exit(otel_token)
            current.reset(token)
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(body, file_wrapper):
            agent.finish(record)  # keep the server's sendfile path; the file goes out after
            return body
        return _Body(body, record, agent)

    def _ensure_reader(self) -> None:
        if self._read_rule is None:
            self._read_rule = _flask_rule_reader()
            read_rule = self._read_rule

            def resolve(record: RequestRecord) -> str | None:
                rule = read_rule()
                return None if rule is None else rule.rule

            self._resolve = resolve

    def patch_class(self, flask_cls: Any) -> None:
        """Every Flask app, created before or after, gets the adapter."""
        self._ensure_reader()
        original = flask_cls.__dict__["wsgi_app"]
        serve = self._serve

        def wsgi_app(app: Any, environ: Any, start_response: Any) -> Any:
            if not self.agent.running:
                return original(app, environ, start_response)
            return serve(app, original.__get__(app), environ, start_response)

        self.agent.patches.append(Patch(flask_cls, "wsgi_app", wsgi_app))

    def instrument_app(self, app: Any) -> None:
        """This one Flask app gets the adapter."""
        self._ensure_reader()
        inner = app.wsgi_app
        serve = self._serve

        def wsgi_app(environ: Any, start_response: Any) -> Any:
            if not self.agent.running:
                return inner(environ, start_response)
            return serve(app, inner, environ, start_response)

        patch = Patch(app, "wsgi_app", wsgi_app)
        self.agent.apps.append(patch.undo)
