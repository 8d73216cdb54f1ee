"""The latency-regression detector on a real agent's request histograms, its clock
injected: windows of quick requests make a route's usual p95, a slow window is
reported once, and again only after the quiet period."""

from __future__ import annotations

import io

from perfagent.agent import Agent
from perfagent.config import load_settings
from perfagent.detectors.regression import QUIET_S, RegressionDetector
from perfagent.record import RequestRecord

_SCOPE = {"type": "http", "headers": [], "method": "GET"}


def _window(agent: Agent, seconds: float, count: int = 40) -> None:
    for _ in range(count):
        record = RequestRecord("GET", 10.0, _SCOPE)
        record.route, record.status, record.end = "/items", 200, 10.0 + seconds
        agent.finish(record)


def test_a_slow_window_is_reported_once_per_quiet_period_from_the_first_second_of_the_clock():
    settings = load_settings(
        {"metrics_port": 0, "console_url": "http://127.0.0.1:9", "trace_sample": 0.0},
        environ={},
    )
    agent = Agent(settings)
    agent.log._stream = stream = io.StringIO()
    now = [0.0]  # a monotonic clock read just after boot: a fresh VM's
    detector = RegressionDetector(agent, 1.0, clock=lambda: now[0])

    def reported() -> int:
        agent.log.write()
        return stream.getvalue().count("latency_regression")

    try:
        for _ in range(4):  # the usual: 4 windows of 3 ms requests
            _window(agent, 0.003)
            detector.tick()
        assert reported() == 0
        _window(agent, 0.3)
        detector.tick()
        assert reported() == 1
        assert "route=/items" in stream.getvalue()
        now[0] = QUIET_S - 1.0  # slow again within the quiet period: not again
        _window(agent, 0.3)
        detector.tick()
        assert reported() == 1
        now[0] = QUIET_S + 1.0
        _window(agent, 0.3)
        detector.tick()
        assert reported() == 2
    finally:
        agent.stop()
