"""Latency regressions: a route whose p95 in the last window is far above its own usual.

Runs on the agent thread once per window (``regression_window_s``, default
60 s) from the request histogram the agent keeps anyway: nothing per request.
A route's usual p95 is a slow moving average of its past windows (each with
enough requests); a window is a regression when its p95 is at least
``FACTOR`` times the usual and at least 50 ms above it. Each route is
reported at most once per ``QUIET_S``.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic
from typing import Any

from perfagent.export.metrics import DURATION_BUCKETS
from perfagent.histogram import quantile

FACTOR = 2.0
MIN_REQUESTS = 20
WARM_WINDOWS = 3
QUIET_S = 600.0
ALPHA = 0.2


#: ``reported`` of a route never reported. Not 0.0: ``monotonic()`` counts from
#: boot, so a machine up for less than ``QUIET_S`` (a fresh VM or container host)
#: would never have reported its first regression.
NEVER = float("-inf")


class RegressionDetector:
    def __init__(self, agent: Any, window_s: float, clock: Callable[[], float] = monotonic) -> None:
        self._agent = agent
        self.window_s = window_s
        self._clock = clock
        self._usual: dict[tuple[str, str], list[float]] = {}  # key -> [p95, windows, reported]

    def tick(self) -> None:
        for (method, route), counts in self._agent.metrics.stats.take_window().items():
            if sum(counts) < MIN_REQUESTS or not route:
                continue
            p95 = quantile(0.95, DURATION_BUCKETS, counts)
            if p95 is None:
                continue
            usual = self._usual.get((method, route))
            if usual is None:
                self._usual[(method, route)] = [p95, 1, NEVER]
                continue
            if (
                usual[1] >= WARM_WINDOWS
                and p95 >= FACTOR * usual[0]
                and p95 - usual[0] >= 0.05
                and self._clock() - usual[2] >= QUIET_S
            ):
                usual[2] = self._clock()
                self._agent.report(
                    "latency_regression",
                    {
                        "route": route,
                        "method": method,
                        "window_s": self.window_s,
                        "requests": sum(counts),
                        "p95_ms": round(p95 * 1000.0, 3),
                        "usual_p95_ms": round(usual[0] * 1000.0, 3),
                    },
                    None,
                )
                continue  # a regressed window does not become the new usual
            usual[0] += ALPHA * (p95 - usual[0])
            usual[1] += 1
