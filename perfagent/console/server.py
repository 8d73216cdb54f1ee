"""``perfagent console``: open the store, build the app, serve it with uvicorn."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from perfagent.console.hosts import allowed_names, is_loopback

MIN_TOKEN = 16


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
    allowed_hosts: Sequence[str] = (),
    docs: bool = False,
) -> int:
    token = token or os.environ.get("PERFAGENT_CONSOLE_TOKEN") or None
    if not is_loopback(host) and not token:
        sys.stderr.write(
            f"perfagent: the console on {host} would be open to the network; "
            "set PERFAGENT_CONSOLE_TOKEN (or --token) and send it as a Bearer token\n"
        )
        return 2
    if not is_loopback(host) and token and len(token) < MIN_TOKEN:
        sys.stderr.write(
            f"perfagent: the console on {host} needs a token of at least {MIN_TOKEN} characters "
            f"(PERFAGENT_CONSOLE_TOKEN or --token has {len(token)})\n"
        )
        return 2
    extra = [*allowed_hosts, *os.environ.get("PERFAGENT_CONSOLE_ALLOWED_HOSTS", "").split(",")]
    extra = [name.strip() for name in extra if name.strip()]
    import uvicorn

    from perfagent.console.app import ConsoleConfig, create_app
    from perfagent.console.store import Retention, Store

    path = Path(db) if db else default_db()
    path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(path, Retention(max_age_s=retention_hours * 3600.0, max_mb=max_mb))
    config = ConsoleConfig(
        token=token,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        # Without a token, only the names of this machine (and the configured ones) are
        # answered, so a rebound DNS name cannot read the console from a web page.
        allowed_hosts=allowed_names(extra) if extra or not token else None,
        docs=docs,
    )
    sys.stderr.write(f"perfagent: console on http://{host}:{port}, data in {path}\n")
    try:
        uvicorn.run(create_app(store, config), host=host, port=port, log_level="warning")
    finally:
        store.close()
    return 0
