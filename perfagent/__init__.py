"""perfagent: a performance agent for Flask, FastAPI and FastHTML apps.

``perfagent.init(app)`` instruments one app, ``perfagent.init()`` every app
created afterwards; ``perfagent.shutdown()`` removes every hook. Importing this
package does nothing else.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from perfagent._version import __version__
from perfagent.config import ConfigError
from perfagent.timing import span, timed

__all__ = ["ConfigError", "__version__", "init", "shutdown", "span", "timed"]

_lock = threading.Lock()
_state: dict[str, Any] = {"agent": None, "instrumentations": None, "fork_hook": False}


def init(app: Any = None, **settings: Any) -> None:
    """Start the agent (once per process) and instrument ``app``, or every app if None.

    Keywords override every other source of settings (see ``perfagent.config``).
    A bad setting raises :class:`ConfigError` naming it. Calling ``init`` again
    adds the app but never instruments a request twice.
    """
    from perfagent.agent import Agent
    from perfagent.config import check_overrides, load_settings
    from perfagent.frameworks.autopatch import Instrumentations

    with _lock:
        agent = _state["agent"]
        if agent is None:
            config = load_settings(settings)
            if not config.enabled:
                return
            agent = Agent(config)
            instrumentations = Instrumentations(agent)
            _state["agent"], _state["instrumentations"] = agent, instrumentations
            agent.start()
            instrumentations.instrument_databases()
            if not _state["fork_hook"]:
                os.register_at_fork(after_in_child=_after_fork_in_child)
                _state["fork_hook"] = True
            if app is None:
                instrumentations.instrument_all()
        elif settings:
            check_overrides(settings)  # still reject bad values loudly
        instrumentations = _state["instrumentations"]
        if app is not None:
            if getattr(app, "_perfagent_instrumented", False):
                return
            instrumentations.instrument_app(app)
            try:
                app._perfagent_instrumented = True
                agent.undo_app(app, lambda: _forget(app))
            except AttributeError:
                pass
        elif agent is not None and not agent.import_hooks:
            instrumentations.instrument_all()


def _forget(app: Any) -> None:
    try:
        del app._perfagent_instrumented
    except AttributeError:
        pass


def shutdown() -> None:
    """Remove every hook and patch, stop serving /metrics. Safe to call at any time."""
    with _lock:
        agent = _state["agent"]
        _state["agent"] = _state["instrumentations"] = None
    if agent is not None:
        agent.stop()


def _after_fork_in_child() -> None:
    agent = _state["agent"]
    if agent is not None:
        agent.after_fork_in_child()
