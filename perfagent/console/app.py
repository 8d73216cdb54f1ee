"""The console app: OTLP/HTTP receivers, the JSON API, pages and live events."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from perfagent._version import __version__
from perfagent.console import ingest, otlp_schema, pages, queries
from perfagent.console.hosts import HostCheck
from perfagent.console.store import Store

RETENTION_EVERY_S = 30.0
MAX_SQL_INT = 2**62


@dataclass
class RequestFilter:
    """Query parameters that filter the kept requests (API and page alike)."""

    service: str | None = None
    route: str | None = None
    # Bounded: SQLite integers are 64-bit, a larger one would be a 500, not a 422.
    status: Annotated[int | None, Query(ge=0, le=999)] = None
    min_ms: Annotated[float | None, Query(ge=0, le=1e12)] = None
    has_finding: bool | None = None


class ProfileAsk(BaseModel):
    seconds: int = Field(10, ge=1, le=120)
    service: str | None = Field(None, max_length=256)


@dataclass(frozen=True)
class ConsoleConfig:
    token: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    #: Host names answered (any port); None answers any (a token guards the console).
    allowed_hosts: frozenset[str] | None = None
    #: Serve /docs, /redoc and /openapi.json (off unless asked: they map the API out).
    docs: bool = False


class LiveHub:
    """Fans new findings and kept slow or failed requests out to server-sent-event clients."""

    def __init__(self) -> None:
        self._clients: set[asyncio.Queue[str]] = set()

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        message = f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"
        for queue in list(self._clients):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                pass  # a slow client misses events rather than growing memory

    async def stream(self, request: Request) -> AsyncIterator[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=256)
        self._clients.add(queue)
        try:
            yield ": connected\n\n"
            while not await request.is_disconnected():
                try:
                    yield await asyncio.wait_for(queue.get(), timeout=15.0)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            self._clients.discard(queue)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ingest.BadPayload("payload too large", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ingest.BadPayload("payload too large", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(store: Store, config: ConsoleConfig | None = None) -> FastAPI:
    config = config or ConsoleConfig()
    hub = LiveHub()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async def retention() -> None:
            while True:
                await asyncio.sleep(RETENTION_EVERY_S)
                await run_in_threadpool(store.enforce_retention)

        task = asyncio.create_task(retention())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(
        title="perfagent console",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if config.docs else None,
        redoc_url="/redoc" if config.docs else None,
        openapi_url="/openapi.json" if config.docs else None,
    )
    app.state.store = store

    if config.token:
        token = config.token.encode()

        @app.middleware("http")
        async def require_token(request: Request, call_next: Any) -> Response:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            given = given or request.query_params.get("token") or request.cookies.get("token", "")
            if not hmac.compare_digest(given.encode(), token):
                return JSONResponse({"detail": "a token is required"}, status_code=401)
            response = await call_next(request)
            if request.query_params.get("token"):
                response.set_cookie("token", given, httponly=True, samesite="strict")
            return response

    if config.allowed_hosts is not None:  # added last: runs first, before the token
        app.add_middleware(HostCheck, allowed=config.allowed_hosts)

    async def receive(signal: str, request: Request) -> Response:
        try:
            body = await _read_body(request, config.max_body_bytes)
            message = ingest.decode(
                body,
                request.headers.get("content-type", ""),
                request.headers.get("content-encoding", ""),
                config.max_body_bytes,
                ingest.MESSAGES[signal],
            )
            if signal == "traces":
                rows = ingest.spans(message)
                await run_in_threadpool(store.add_spans, rows)
                for row in rows:
                    if row.kind == 2 and (row.events or (row.status or 0) >= 500):
                        hub.publish("request", _live_request(row))
            elif signal == "logs":
                found = ingest.findings(message)
                await run_in_threadpool(store.add_findings, found)
                for finding in found:
                    hub.publish("finding", {"kind": finding.kind, **finding.fields})
            else:
                await run_in_threadpool(store.add_histograms, ingest.histograms(message))
        except ingest.BadPayload as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        if request.headers.get("content-type", "").startswith("application/json"):
            return JSONResponse({})
        return Response(b"", media_type="application/x-protobuf")

    @app.post("/v1/traces", openapi_extra=otlp_schema.request_body(otlp_schema.TRACES))
    async def otlp_traces(request: Request) -> Response:
        return await receive("traces", request)

    @app.post("/v1/metrics", openapi_extra=otlp_schema.request_body(otlp_schema.METRICS))
    async def otlp_metrics(request: Request) -> Response:
        return await receive("metrics", request)

    @app.post("/v1/logs", openapi_extra=otlp_schema.request_body(otlp_schema.LOGS))
    async def otlp_logs(request: Request) -> Response:
        return await receive("logs", request)

    # -- JSON API -----------------------------------------------------------------

    def window(text: str | None) -> float | None:
        try:
            return queries.parse_window(text)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "db": store.path}

    @app.get("/api/services")
    def api_services() -> list[str]:
        return queries.services(store)

    @app.get("/api/routes")
    def api_routes(service: str | None = None, window_: str | None = Query(None, alias="window")):
        return queries.routes(store, service or None, window(window_))

    @app.get("/api/overview")
    def api_overview(window_: str = Query("1h", alias="window")) -> list[dict[str, Any]]:
        return queries.overview(store, window(window_) or 3600.0)

    @app.get("/api/findings")
    def api_findings(kind: str | None = None, route: str | None = None) -> list[dict[str, Any]]:
        if kind and kind not in ingest.FINDING_KINDS:
            raise HTTPException(422, f"kind must be one of {sorted(ingest.FINDING_KINDS)}")
        return queries.findings(store, kind, route)

    @app.get("/api/traces/{trace_id}")
    def api_trace(trace_id: str) -> dict[str, Any]:
        found = queries.trace(store, trace_id.lower())
        if found is None:
            raise HTTPException(404, "no such trace")
        return found

    @app.get("/api/requests")
    def api_requests(
        filters: Annotated[RequestFilter, Depends()],
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0, le=MAX_SQL_INT),
    ) -> list[dict[str, Any]]:
        return queries.requests(store, **asdict(filters), limit=limit, offset=offset)

    @app.get("/api/flamegraph")
    def api_flamegraph(service: str, route: str, method: str = "GET", fmt: str = "json") -> Any:
        """A route's sampled stacks: JSON, or ``fmt=collapsed`` for flamegraph.pl/speedscope."""
        stacks = queries.flame(store, service, route, method)
        if fmt == "collapsed":
            text = "".join(f"{stack} {count}\n" for stack, count in stacks.items())
            return Response(text, media_type="text/plain")
        return {"service": service, "route": route, "method": method, "stacks": stacks}

    @app.post("/api/profiles")
    def api_ask_profile(ask: ProfileAsk) -> dict[str, int]:
        """Ask the processes started by `perfagent run` for a py-spy profile."""
        return {"id": store.ask_profile(ask.seconds, ask.service or None)}

    @app.get("/api/profiles")
    def api_profiles() -> list[dict[str, Any]]:
        return queries.profile_requests(store)

    @app.post("/api/profiles/claim", include_in_schema=False)
    def api_claim_profile(runner: str, service: str) -> Response:
        claimed = store.claim_profile(runner[:128], service[:256])
        if claimed is None:
            return Response(status_code=204)
        return JSONResponse({"id": claimed[0], "seconds": claimed[1]})

    @app.post("/api/profiles/{request_id}/result", include_in_schema=False)
    async def api_profile_result(
        request_id: Annotated[int, Path(ge=1, le=MAX_SQL_INT)], request: Request
    ) -> Response:
        body = await _read_body(request, config.max_body_bytes)
        try:
            result = json.loads(body)
            stacks, error = result.get("stacks"), result.get("error")
            if stacks is not None and not isinstance(stacks, str):
                raise ValueError("stacks must be collapsed-stack text")
        except (ValueError, AttributeError):
            return JSONResponse({"detail": "expected {stacks} or {error}"}, status_code=400)
        done = await run_in_threadpool(store.finish_profile, request_id, stacks, error)
        return Response(status_code=204 if done else 404)

    @app.get("/profiles/{request_id}", response_class=HTMLResponse)
    def profile_page(request_id: Annotated[int, Path(ge=1, le=MAX_SQL_INT)]) -> str:
        found = queries.profile_request(store, request_id)
        if found is None:
            raise HTTPException(404, "no such profile")
        return pages.profile(found)

    @app.get("/api/live", include_in_schema=False)
    async def live(request: Request) -> StreamingResponse:
        return StreamingResponse(hub.stream(request), media_type="text/event-stream")

    # -- pages --------------------------------------------------------------------

    html = HTMLResponse

    @app.get("/", response_class=html)
    def overview_page(window_: str = Query("1h", alias="window")) -> str:
        return pages.overview(queries.overview(store, window(window_) or 3600.0), window_)

    @app.get("/routes", response_class=html)
    def routes_page(
        service: str | None = None, window_: str | None = Query(None, alias="window")
    ) -> str:
        return pages.routes(queries.routes(store, service or None, window(window_)), window_)

    @app.get("/route", response_class=html)
    def route_page(service: str, route: str, method: str) -> str:
        rows = [
            r
            for r in queries.routes(store, service)
            if r["route"] == route and r["method"] == method
        ]
        slowest = queries.requests(store, service=service, route=route, limit=20, slowest=True)
        found = [f for f in queries.findings(store, route=route) if f["service"] == service]
        series = queries.route_series(store, service, route, method)
        stats = rows[0] if rows else None
        stacks = queries.flame(store, service, route, method)
        return pages.route(service, route, method, stats, series, slowest, found, stacks)

    @app.get("/requests", response_class=html)
    def requests_page(
        filters: Annotated[RequestFilter, Depends()], page: int = Query(1, ge=1, le=1_000_000)
    ) -> str:
        rows = queries.requests(store, **asdict(filters), limit=50, offset=(page - 1) * 50)
        return pages.requests(rows, asdict(filters), page)

    @app.get("/traces/{trace_id}", response_class=html)
    def trace_page(trace_id: str) -> str:
        found = queries.trace(store, trace_id.lower())
        if found is None:
            raise HTTPException(404, "no such trace")
        return pages.trace(found)

    @app.get("/profiles", response_class=html)
    def profiles_page() -> str:
        return pages.profiles(queries.profiled(store), queries.profile_requests(store))

    @app.get("/findings", response_class=html)
    def findings_page(kind: str | None = None) -> str:
        return pages.findings(queries.findings(store, kind or None), kind)

    return app


def _live_request(row: Any) -> dict[str, Any]:
    return {
        "trace_id": row.trace_id,
        "service": row.service,
        "name": row.name,
        "route": row.route,
        "status": row.status,
        "duration_ms": round(row.duration_ms, 3),
        "events": [e["name"] for e in row.events],
    }
