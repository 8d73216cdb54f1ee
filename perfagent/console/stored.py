"""Values read back from the store, made safe to show whatever the file holds.

Ingest checks what it stores, but the file may hold anything: rows written by an
older console, by hand, or by another program (SQLite keeps any type in any
column). Every value a page or the JSON API shows goes through one of these, so a
bad row shows as blank or is left out, and never turns a page into a 500.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

MAX_INT = 2**63 - 1
#: Bounds and sums past this (seconds) are not latencies; ingest refuses them too.
MAX_VALUE = 1e15


def number(value: Any) -> float | int | None:
    """A finite int or float; anything else (text, bytes, NaN, Infinity, a bool) is None."""
    if type(value) is int:
        return value if abs(value) <= MAX_INT else None
    if type(value) is float:
        return value if math.isfinite(value) else None
    return None


def integer(value: Any, default: int | None = None) -> int | None:
    return value if type(value) is int and abs(value) <= MAX_INT else default


def text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def text_or_none(value: Any) -> str | None:
    return None if value is None else text(value)


def _no_constants(_name: str) -> None:
    return None  # NaN, Infinity, -Infinity: not JSON, and not shown as numbers


def loads(value: Any) -> Any:
    """JSON text to a value, NaN and Infinity read as None; None when it is not JSON."""
    try:
        return json.loads(text(value), parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return None


def json_object(value: Any) -> dict[str, Any]:
    found = loads(value)
    return found if isinstance(found, dict) else {}


def events(value: Any) -> list[dict[str, Any]]:
    """A span's events: each with a text name, an int time and a dict of attributes."""
    found = loads(value)
    out = []
    for event in found if isinstance(found, list) else ():
        if isinstance(event, dict):
            attributes = event.get("attributes")
            out.append(
                {
                    "name": text(event.get("name")),
                    "time_ns": integer(event.get("time_ns")),
                    "attributes": attributes if isinstance(attributes, dict) else {},
                }
            )
    return out


def stacks(value: Any) -> dict[str, int]:
    """Sampled stacks ``{"a;b": samples}`` from JSON text or a dict; {} when malformed."""
    found = loads(value) if isinstance(value, (str, bytes)) else value
    if not isinstance(found, dict):
        return {}
    return {k: n for k, n in found.items() if isinstance(k, str) and type(n) is int and n > 0}


def histogram(count: Any, total: Any, bounds: Any, counts: Any) -> tuple | None:
    """``(count, sum, bounds, counts)`` of a stored histogram row, or None if it is not one:
    finite increasing bounds, one more bucket than bounds, non-negative counts adding up."""
    count, total = integer(count), number(total)
    bounds, counts = loads(bounds), loads(counts)
    if count is None or count < 0 or total is None or abs(total) > MAX_VALUE:
        return None
    if not isinstance(bounds, list) or not isinstance(counts, list):
        return None
    if len(counts) != len(bounds) + 1:
        return None
    if not all(type(b) in (int, float) and abs(b) <= MAX_VALUE for b in bounds):
        return None
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        return None
    if not all(type(c) is int and 0 <= c <= MAX_INT for c in counts) or sum(counts) != count:
        return None
    return count, float(total), [float(b) for b in bounds], counts
