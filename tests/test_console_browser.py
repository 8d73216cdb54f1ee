"""The console's pages in a real browser (Debian's Chromium, driven by Playwright)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from test_console import poll, start_app, start_console

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="Debian's chromium is not installed (apt-get install chromium)",
)

XSS = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>"


@pytest.fixture
def page():
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        yield page
        browser.close()


def _hostile_span() -> bytes:
    def kv(key: str, value: str) -> KeyValue:
        return KeyValue(key=key, value=AnyValue(string_value=value))

    span = Span(
        trace_id=bytes.fromhex("1af7651916cd43dd8448eb211c80319c"),
        span_id=bytes.fromhex("c7ad6b7169203331"),
        name=f"GET {XSS}",
        kind=Span.SPAN_KIND_SERVER,
        start_time_unix_nano=time.time_ns() - 50_000_000,
        end_time_unix_nano=time.time_ns(),
        attributes=[
            kv("http.route", XSS),
            kv("http.request.method", "GET"),
            kv("db.query.text", XSS),
        ],
    )
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]
    )
    return request.SerializeToString()


def test_console_pages_in_a_real_browser(servers, tmp_path, page):
    console = start_console(servers, tmp_path)
    app, _ = start_app(servers, console, "--slow-ms", "300")
    for i in range(20):
        app.get(f"/items/{i}")
    app.get("/hello")
    app.get("/sleep?seconds=0.4")
    poll(
        lambda: requests.get(console.base + "/api/findings", timeout=5).json(),
        lambda found: len(found) == 1,
    )
    poll(
        lambda: requests.get(console.base + "/api/routes", timeout=5).json(),
        lambda rows: any(r["route"] == "/items/{item_id}" and r["count"] == 20 for r in rows),
    )

    # Routes: the table shows the routes with their numbers.
    page.goto(console.base + "/routes")
    table = page.locator("table#routes")
    assert "/items/{item_id}" in table.inner_text()
    assert "/sleep" in table.inner_text() and "/hello" in table.inner_text()
    page.screenshot(path=str(ARTIFACTS / "routes.png"), full_page=True)
    page.locator("table#routes a", has_text="/items/{item_id}").click()
    page.wait_for_url("**/route?*")
    assert page.locator("svg[aria-label='p95 ms per minute']").count() == 1
    assert "20" in page.locator("table#routes").inner_text()
    page.screenshot(path=str(ARTIFACTS / "route.png"), full_page=True)

    # Findings: clicking a finding's example opens its trace.
    page.goto(console.base + "/findings")
    assert "slow_request" in page.locator("table#findings").inner_text()
    page.screenshot(path=str(ARTIFACTS / "findings.png"), full_page=True)
    page.locator("table#findings a", has_text="trace").first.click()
    page.wait_for_url("**/traces/*")
    assert "GET /sleep" in page.locator("table#waterfall").inner_text()
    page.screenshot(path=str(ARTIFACTS / "trace.png"), full_page=True)

    # Live: a new finding appears on the overview without a reload.
    page.goto(console.base + "/")
    page.wait_for_timeout(500)  # let the event stream connect
    app.get("/sleep?seconds=0.45")
    page.locator("#live", has_text="slow_request").wait_for(timeout=15000)
    page.screenshot(path=str(ARTIFACTS / "overview-live.png"), full_page=True)

    # Profiles: the button asks the runner for a whole-process profile.
    page.goto(console.base + "/profiles")
    page.fill("#seconds", "2")
    page.click("#ask-profile")
    page.locator("#asked", has_text="asked").wait_for(timeout=5000)
    asked = requests.get(console.base + "/api/profiles", timeout=5).json()
    assert asked and asked[0]["seconds"] == 2
    page.screenshot(path=str(ARTIFACTS / "profiles.png"), full_page=True)

    # A hostile route name is shown as text, never run.
    response = requests.post(
        console.base + "/v1/traces",
        data=_hostile_span(),
        headers={"content-type": "application/x-protobuf"},
        timeout=5,
    )
    assert response.status_code == 200
    for path in ("/requests", "/routes", "/traces/1af7651916cd43dd8448eb211c80319c"):
        page.goto(console.base + path)
        if path != "/routes":  # routes come from per-route stats, which this span has none of
            assert XSS in page.inner_text("main")
        assert page.evaluate("window.pwned") is None, path
    page.screenshot(path=str(ARTIFACTS / "hostile-trace.png"), full_page=True)
