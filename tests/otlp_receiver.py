"""A real OTLP/HTTP trace receiver on loopback, decoding with opentelemetry-proto."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def _plain(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_plain(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class Receiver:
    """``max_body``: a larger request is refused with 413 (and all its spans), as a
    collector or the console does past its own limit."""

    def __init__(self, port: int, max_body: int | None = None) -> None:
        self.port = port
        self.refused = 0
        self.url = f"http://127.0.0.1:{port}"
        self.spans: list[dict] = []
        self.resources: list[dict] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                ok = self.path == "/v1/traces"
                status = 200 if ok else 404
                if ok and max_body is not None and len(body) > max_body:
                    status = 413
                    receiver.refused += 1
                elif ok:
                    receiver._take(body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: _plain(a.value) for a in resource_spans.resource.attributes}
                self.resources.append(resource)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            {
                                "name": span.name,
                                "kind": span.kind,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano,
                                "status": span.status.code,
                                "attributes": {a.key: _plain(a.value) for a in span.attributes},
                                "events": [e.name for e in span.events],
                                "resource": resource,
                            }
                        )

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.spans) >= count:
                    break
            time.sleep(0.1)
        time.sleep(0.7)  # one more export period: anything extra would arrive now
        with self._lock:
            return list(self.spans)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


if __name__ == "__main__":  # a receiver in its own process, for tests that kill it
    import sys

    Receiver(int(sys.argv[1]))
    threading.Event().wait()
