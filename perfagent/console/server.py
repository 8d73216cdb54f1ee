"""``perfagent console``: open the store, build the app, serve it with uvicorn."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def default_db() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "perfagent" / "console.db"


def serve(
    host: str = "127.0.0.1",
    port: int = 6060,
    db: str | None = None,
    token: str | None = None,
    retention_hours: float = 168.0,
    max_mb: float = 512.0,
    max_body_mb: float = 8.0,
) -> int:
    token = token or os.environ.get("PERFAGENT_CONSOLE_TOKEN") or None
    if host not in _LOOPBACK and not token:
        sys.stderr.write(
            f"perfagent: the console on {host} would be open to the network; "
            "set PERFAGENT_CONSOLE_TOKEN (or --token) and send it as a Bearer token\n"
        )
        return 2
    import uvicorn

    from perfagent.console.app import ConsoleConfig, create_app
    from perfagent.console.store import Retention, Store

    path = Path(db) if db else default_db()
    path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(path, Retention(max_age_s=retention_hours * 3600.0, max_mb=max_mb))
    config = ConsoleConfig(token=token, max_body_bytes=int(max_body_mb * 1024 * 1024))
    sys.stderr.write(f"perfagent: console on http://{host}:{port}, data in {path}\n")
    try:
        uvicorn.run(create_app(store, config), host=host, port=port, log_level="warning")
    finally:
        store.close()
    return 0
