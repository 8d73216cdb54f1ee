"""Host-header check: a console on loopback without a token answers only loopback names.

A web page can point a name it controls at 127.0.0.1 (DNS rebinding) and then
read the console as same-origin; the browser still sends that name in ``Host``,
so answering only the loopback names, and those the user configured, closes it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

LOOPBACK_NAMES = frozenset(("localhost", "127.0.0.1", "::1"))


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and any loopback address (127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """``Host`` without its port, lowercased: ``[::1]:6060`` -> ``::1``, ``a:80`` -> ``a``."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        return name if bracket and (not rest or rest.startswith(":")) else ""
    name, _, _port = header.partition(":")
    return name


def allowed_names(extra: Iterable[str]) -> frozenset[str]:
    """The loopback names and the configured ones, in the form ``host_name`` gives."""
    return LOOPBACK_NAMES | {host_name(name) for name in extra if name.strip()}


class HostCheck:
    """Pure ASGI: a request whose ``Host`` names no allowed host gets 421, nothing else."""

    def __init__(self, app: Any, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = next((v for k, v in scope["headers"] if k == b"host"), b"")
            name = host_name(host.decode("latin-1"))
            if name not in self.allowed and not is_loopback(name):  # 127.0.0.2, ...
                await _refuse(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _refuse(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008})
        return
    body = b'{"detail":"this console answers only to its own host names"}'
    await send(
        {
            "type": "http.response.start",
            "status": 421,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
