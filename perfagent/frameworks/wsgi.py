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
import sys
from threading import get_ident
from time import perf_counter
from typing import Any

from perfagent.agent import Agent
from perfagent.patching import Patch
from perfagent.record import RequestRecord, current, normalize_method

#: The oldest Flask the adapter supports (what it reads of Flask exists from there on).
OLDEST_FLASK = (2, 0)


def flask_version() -> tuple[tuple[int, ...], str]:
    """The installed Flask's version, as numbers and as written (``flask.__version__``
    warns from Flask 3.0 on, so it is read from the package's metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("flask")
    except PackageNotFoundError:
        return (), "unknown"
    numbers = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers), text


def _flask_rule_reader() -> Any:
    """A function returning the matched ``url_rule`` of the current Flask request, or None.

    Flask 2.2 keeps its contexts in context variables (``_cv_request``, or
    ``_cv_app`` alone from 3.2, which merged the two); Flask 2.0 and 2.1 in
    ``_request_ctx_stack``, a werkzeug ``LocalStack`` (deprecated, with a
    warning, from 2.2: read only where the variables are missing).
    """
    from flask import globals as flask_globals

    names = vars(flask_globals)
    request_var = names.get("_cv_request")
    if request_var is not None:

        def read() -> Any:
            ctx = request_var.get(None)
            return None if ctx is None else ctx.request.url_rule

        return read
    app_var = names.get("_cv_app")
    if app_var is not None:  # Flask versions that merged the two contexts

        def read_merged() -> Any:
            ctx = app_var.get(None)
            request = getattr(ctx, "_request", None) or getattr(ctx, "request", None)
            return None if request is None else request.url_rule

        return read_merged
    stack = names["_request_ctx_stack"]  # Flask 2.0 and 2.1

    def read_stack() -> Any:
        ctx = stack.top
        return None if ctx is None else ctx.request.url_rule

    return read_stack


class _Body:
    """The response iterable, passed through; the request's record ends when the body
    is exhausted, when ``close()`` is called, or when the response is collected.

    PEP 3333 asks servers to call ``close()``, and the duration runs until then.
    Test clients (Werkzeug's, Flask's) never close: a test reads the body or not
    and drops the response. Ending at ``StopIteration`` (for a list or tuple body,
    at its last item, which a client taking ``len`` items never goes past) and,
    failing that, in ``__del__`` keeps such records from staying in flight for
    ever (each held its environ; the sampler kept looking at all of them).
    """

    __slots__ = ("_agent", "_items", "_iterable", "_left", "_record")

    def __init__(self, iterable: Any, record: RequestRecord, agent: Agent) -> None:
        self._iterable = iterable
        self._record = record
        self._agent = agent
        self._items: Any = None
        #: Items left in a list or tuple body; -1 for any other iterable.
        self._left = len(iterable) if type(iterable) in (list, tuple) else -1

    def __iter__(self) -> Any:
        if self._items is None:
            self._items = iter(self._iterable)
        return self

    def __next__(self) -> Any:
        items = self._items
        if items is None:
            items = self._items = iter(self._iterable)
        try:
            item = next(items)
        except StopIteration:
            self._agent.finish(self._record)
            raise
        left = self._left
        if left > 0:
            self._left = left = left - 1
            if not left:
                self._agent.finish(self._record)
        return item

    def close(self) -> None:
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        finally:
            self._agent.finish(self._record)

    def __del__(self) -> None:
        # Never closed nor exhausted (a test client that dropped the response).
        try:
            record = self._record
            if not record.done:
                self._agent.finish(record)
        except Exception:  # at interpreter exit, or a half-made body: nothing to end
            pass


class FlaskInstrumentation:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._read_rule: Any = None
        self._resolve: Any = None
        self._supported: bool | None = None

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
            # Bytes against bytes, as under ASGI: WSGI hands the header over as latin-1
            # text, and compare_digest raises on non-ASCII text.
            try:
                given = environ["HTTP_X_PERFAGENT_PROFILE"].encode("latin-1")
                record.profile = hmac.compare_digest(given, profile_token.encode())
            except (AttributeError, UnicodeError):  # not a PEP 3333 string: no profile
                record.profile = False
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
                        db_ms, n = record.db_time * 1000.0, record.query_count
                        what = "query" if n == 1 else "queries"
                        value += f', db;dur={db_ms:.3f};desc="{n} {what}"'
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

    def supported(self) -> bool:
        """False, after one log line naming the version, on a Flask older than 2.0."""
        if self._supported is None:
            numbers, text = flask_version()
            self._supported = not numbers or numbers >= OLDEST_FLASK
            if not self._supported:
                # Straight to stderr: the agent's log is written by its thread, which
                # starts with the first request the adapter sees, and none will come.
                sys.stderr.write(
                    f"perfagent: Flask {text} is not supported (Flask 2.0 or newer): "
                    "this app runs without the agent\n"
                )
                sys.stderr.flush()
        return self._supported

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
        if not self.supported():
            return
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
        if not self.supported():
            return
        if self.agent.app_name is None:
            self.agent.app_name = getattr(app, "import_name", None)
        self._ensure_reader()
        inner = app.wsgi_app
        serve = self._serve

        def wsgi_app(environ: Any, start_response: Any) -> Any:
            if not self.agent.running:
                return inner(environ, start_response)
            return serve(app, inner, environ, start_response)

        patch = Patch(app, "wsgi_app", wsgi_app)
        self.agent.undo_app(app, patch.undo)
