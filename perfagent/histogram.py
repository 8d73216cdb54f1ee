"""Quantiles from bucketed counts, the way PromQL's ``histogram_quantile`` computes them.

Shared by the agent (latency regressions) and the console (route percentiles),
so both agree with a Grafana panel over ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Sequence


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The q-quantile in seconds; ``counts`` are per bucket (not cumulative), +Inf last."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    running = 0
    for index, count in enumerate(counts):
        if running + count >= rank and count > 0:
            if index == len(bounds):  # the +Inf bucket: the highest finite bound
                return bounds[-1] if bounds else None
            lower = bounds[index - 1] if index > 0 else 0.0
            upper = bounds[index]
            return lower + (upper - lower) * (rank - running) / count
        running += count
    return bounds[-1] if bounds else None
