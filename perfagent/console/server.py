"""``perfagent console``: build the app and serve it with uvicorn."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from perfagent._version import __version__

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def default_db() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "perfagent" / "console.db"


def create_app(db: Path) -> Any:
    from fastapi import FastAPI

    app = FastAPI(title="perfagent console", version=__version__)
    app.state.db_path = db

    @app.get("/api/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__, "db": str(db)}

    return app


def serve(host: str = "127.0.0.1", port: int = 6060, db: str | None = None) -> int:
    if host not in _LOOPBACK:
        sys.stderr.write(
            f"perfagent: the console binds to loopback only for now; refusing --host {host}\n"
        )
        return 2
    import uvicorn

    path = Path(db) if db else default_db()
    path.parent.mkdir(parents=True, exist_ok=True)
    uvicorn.run(create_app(path), host=host, port=port, log_level="warning")
    return 0
