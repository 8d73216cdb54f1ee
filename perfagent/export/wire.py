"""Protobuf's wire format, just what OTLP needs: varints, fixed64s, doubles,
length-delimited fields, and ``KeyValue`` attributes.

Why not opentelemetry-proto's message classes: a kept request of the
benchmark's N+1 route (one server span, 11 query spans) took 150-200 µs to
build as messages and serialize, on the export thread, which shares the app's
core; 1 % of requests kept made that ~20,000 CPU instructions a request on
average, a tenth of all the agent added on that route. Written here as bytes
it takes ~20 µs. And the app's process does not load protobuf at all (see
``otlp.py``). The tests decode what this writes with opentelemetry-proto, so
the library stays the judge of the format.
"""

from __future__ import annotations

import json
import struct
from typing import Any

_MAX_INT64 = (1 << 63) - 1
_MASK_64 = (1 << 64) - 1
_SMALL = [bytes((n,)) for n in range(128)]

fixed64 = struct.Struct("<Q").pack
double = struct.Struct("<d").pack


def varint(value: int) -> bytes:
    """An unsigned varint; a negative int64 as its 64-bit two's complement (10 bytes)."""
    if value < 0:
        value &= _MASK_64
    elif value < 128:
        return _SMALL[value]
    out = bytearray()
    while value > 127:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(key: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its key (field number and wire type 2), length, payload."""
    return key + varint(len(payload)) + payload


def text(key: bytes, value: str) -> bytes:
    # Lone surrogates (from a decoded byte path, say) become "?": a receiver
    # rejects a request whose string fields are not valid UTF-8.
    return field(key, value.encode("utf-8", "replace"))


def any_value(value: Any) -> bytes:
    """The payload of an ``AnyValue``."""
    cls = value.__class__
    if cls is str:
        return text(b"\x0a", value)
    if cls is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if cls is int:
        if -_MAX_INT64 - 1 <= value <= _MAX_INT64:
            return b"\x18" + varint(value)
        return text(b"\x0a", str(value))  # past int64: as its digits, not an error
    if cls is float:
        return b"\x21" + double(value)
    if isinstance(value, (list, tuple)):
        return field(b"\x2a", b"".join(field(b"\x0a", any_value(item)) for item in value))
    for base in (int, float, str):  # subclasses (enums, say) as their base
        if isinstance(value, base):
            return any_value(base(value))
    # Anything else (a dict of stacks, say) as JSON text, not an error.
    return text(b"\x0a", json.dumps(value, default=str))


def key_value(key: str, value: Any) -> bytes:
    """One ``KeyValue``, as an element of a repeated ``attributes`` field (not yet keyed)."""
    return text(b"\x0a", key) + field(b"\x12", any_value(value))


def attributes(key: bytes, items: dict[str, Any]) -> bytes:
    """Each item not None as a ``KeyValue`` in the repeated field ``key``.

    Attributes of text and whole numbers repeat from span to span (the route,
    the host, the status, a finding's query and advice): each is written once
    and remembered, in a bounded table (a kept request of the N+1 route:
    31 µs without it, 23 µs with it). Those that differ from request to request
    (``VARYING``) are written each time, so that the table holds only what
    repeats and does not fill up with raw paths.
    """
    known = _known
    parts = []
    for name, value in items.items():
        cls = value.__class__
        if (cls is str or cls is int) and name not in VARYING:
            item = (key, name, value)  # not bools or floats: 1 == True == 1.0
            data = known.get(item)
            if data is None:
                if len(known) >= _KNOWN_MAX:
                    known.clear()
                data = known[item] = field(key, key_value(name, value))
            parts.append(data)
        elif value is not None:
            parts.append(field(key, key_value(name, value)))
    return b"".join(parts)


#: Attributes whose values are new on most requests (a finding's trace id too):
#: never remembered.
VARYING = frozenset(("url.path", "client.address", "user_agent.original", "trace_id"))
#: (field key, attribute name, value) -> the attribute written.
_known: dict[tuple[bytes, str, Any], bytes] = {}
_KNOWN_MAX = 1024
