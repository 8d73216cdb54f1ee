"""W3C trace context in, and the head-sampling decision.

Nothing here runs for a request unless something needs its trace: a log line
asking for ``trace_id``, an outgoing call, or the end-of-request keep
decision. The incoming ``traceparent`` is then read once from the request's
headers and cached on the record.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

_MAX_64 = (1 << 64) - 1


def parse_traceparent(value: str) -> tuple[int, int, bool] | None:
    """``00-<32 hex>-<16 hex>-<2 hex>`` -> (trace id, parent span id, sampled), else None."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    version, trace_hex, span_hex, flags_hex = parts[:4]
    if len(trace_hex) != 32 or len(span_hex) != 16 or len(flags_hex) != 2:
        return None
    if version == "00" and len(parts) != 4:
        return None
    try:
        trace_id, span_id, flags = int(trace_hex, 16), int(span_hex, 16), int(flags_hex, 16)
        int(version, 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(flags & 1)


def incoming_headers(carrier: Any) -> tuple[str | None, str | None]:
    """(traceparent, tracestate) from an ASGI scope or a WSGI environ."""
    if carrier is None:
        return None, None
    if "headers" in carrier and "type" in carrier:  # ASGI scope
        parent = state = None
        for name, value in carrier["headers"]:
            if name == b"traceparent":
                parent = value.decode("latin-1")
            elif name == b"tracestate":
                state = value.decode("latin-1")
        return parent, state
    return carrier.get("HTTP_TRACEPARENT"), carrier.get("HTTP_TRACESTATE")


class Sampler:
    """The head sample: ``PERFAGENT_TRACE_SAMPLE``, or ``OTEL_TRACES_SAMPLER`` when set.

    Ratios are taken on the trace id (as OpenTelemetry's TraceIdRatioBased does)
    so every service keeps or drops the same traces; parent-based samplers
    follow the caller's sampled flag.
    """

    CHOICES = (
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    )

    def __init__(self, name: str, ratio: float) -> None:
        if name not in self.CHOICES:
            raise ValueError(f"expected one of {', '.join(self.CHOICES)}")
        self.name = name
        self.parent_based = name.startswith("parentbased_")
        root = name.removeprefix("parentbased_")
        if root == "always_on":
            ratio = 1.0
        elif root == "always_off":
            ratio = 0.0
        self.bound = round(ratio * (_MAX_64 + 1))

    def sampled(self, trace_id: int, parent_sampled: bool | None) -> bool:
        if self.parent_based and parent_sampled is not None:
            return parent_sampled
        return (trace_id & _MAX_64) < self.bound

    @classmethod
    def from_environment(cls, ratio: float, environ: Mapping[str, str] | None = None) -> Sampler:
        environ = os.environ if environ is None else environ
        name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
        if not name:
            return cls("parentbased_traceidratio", ratio)
        arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        if arg:
            try:
                ratio = float(arg)
            except ValueError:
                raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r} is not a number") from None
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r} is not between 0 and 1")
        return cls(name, ratio)
