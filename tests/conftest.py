from __future__ import annotations

import sys

import pytest
from helpers import Server


@pytest.fixture
def servers():
    """Starts servers for a test and always stops them."""
    started: list[Server] = []

    def start(argv, port, env, **kwargs) -> Server:
        server = Server(argv, port, env, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(autouse=True)
def agent_leaves_no_hooks():
    """Every test must leave the process as it found it: no agent, no patch, no hook."""
    yield
    import perfagent
    from perfagent.patching import MARK, PostImportHooks

    perfagent.shutdown()
    assert not any(isinstance(f, PostImportHooks) for f in sys.meta_path)
    for module, cls, attr in (
        ("starlette.applications", "Starlette", "build_middleware_stack"),
        ("fastapi.applications", "FastAPI", "build_middleware_stack"),
        ("starlette.routing", "Mount", "handle"),
        ("flask.app", "Flask", "wsgi_app"),
    ):
        if module in sys.modules:
            target = getattr(sys.modules[module], cls).__dict__.get(attr)
            assert not hasattr(target, MARK), f"{cls}.{attr} is still patched"
