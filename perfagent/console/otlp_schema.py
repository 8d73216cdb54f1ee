"""The OTLP/JSON bodies the receiver reads, as OpenAPI request bodies.

Loose on purpose: it names the fields the console reads (and lets numbers be the
strings OTLP/JSON allows, ``"NaN"`` and ``"Infinity"`` among them) so the API docs
show what to send and a schema fuzzer sends the shapes a hostile client would.
Protobuf bodies (``application/x-protobuf``) are the same messages, binary.
"""

from __future__ import annotations

from typing import Any

from perfagent.console.ingest import FINDING_KINDS, NUMERIC_FIELDS, TEXT_FIELDS

_NUMBER: dict[str, Any] = {
    "anyOf": [{"type": "number"}, {"enum": ["NaN", "Infinity", "-Infinity"]}]
}
_UINT64: dict[str, Any] = {
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": "^[0-9]{1,21}$"}]
}
_HEX = {"type": "string", "pattern": "^[0-9a-f]*$", "maxLength": 32}


def _attributes(keys: list[str] | None = None) -> dict[str, Any]:
    key: dict[str, Any] = {"enum": keys} if keys else {"type": "string"}
    value = {
        "type": "object",
        "properties": {
            "stringValue": {"type": "string"},
            "intValue": _UINT64,
            "doubleValue": _NUMBER,
            "boolValue": {"type": "boolean"},
        },
    }
    item = {"type": "object", "properties": {"key": key, "value": value}, "required": ["key"]}
    return {"type": "array", "items": item, "maxItems": 8}


def _array(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item, "maxItems": 3}


def _object(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


_POINT_KEYS = ["http.route", "http.request.method", "http.response.status_code"]
_RESOURCE = _object(attributes=_attributes(["service.name", "service.instance.id"]))

TRACES = _object(
    resourceSpans=_array(
        _object(
            resource=_RESOURCE,
            scopeSpans=_array(
                _object(
                    spans=_array(
                        _object(
                            traceId=_HEX,
                            spanId=_HEX,
                            parentSpanId=_HEX,
                            name={"type": "string"},
                            kind={"type": "integer", "minimum": 0, "maximum": 5},
                            startTimeUnixNano=_UINT64,
                            endTimeUnixNano=_UINT64,
                            attributes=_attributes(),
                            events=_array(
                                _object(
                                    name={"type": "string"},
                                    timeUnixNano=_UINT64,
                                    attributes=_attributes(["stacks", "route"]),
                                )
                            ),
                        )
                    )
                )
            ),
        )
    )
)

METRICS = _object(
    resourceMetrics=_array(
        _object(
            resource=_RESOURCE,
            scopeMetrics=_array(
                _object(
                    metrics=_array(
                        _object(
                            name={"enum": ["http.server.request.duration"]},
                            histogram=_object(
                                dataPoints=_array(
                                    _object(
                                        attributes=_attributes(_POINT_KEYS),
                                        startTimeUnixNano=_UINT64,
                                        timeUnixNano=_UINT64,
                                        count=_UINT64,
                                        sum=_NUMBER,
                                        bucketCounts=_array(_UINT64),
                                        explicitBounds=_array(_NUMBER),
                                    )
                                )
                            ),
                        )
                    )
                )
            ),
        )
    )
)

LOGS = _object(
    resourceLogs=_array(
        _object(
            resource=_RESOURCE,
            scopeLogs=_array(
                _object(
                    logRecords=_array(
                        _object(
                            timeUnixNano=_UINT64,
                            eventName={"enum": sorted(FINDING_KINDS)},
                            traceId=_HEX,
                            attributes=_attributes(
                                [*NUMERIC_FIELDS, *TEXT_FIELDS, "stacks", "trace_id"]
                            ),
                        )
                    )
                )
            ),
        )
    )
)


def request_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a receiver: its JSON body, or the same message in protobuf."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }
