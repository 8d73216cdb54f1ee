"""The console: a small FastAPI app that receives the agents' data and shows it.

It is the ``console`` extra (``pip install "perfagent[console]"``): the agent
itself goes into the app's own environment and must bring no web stack there,
so importing this package imports nothing of FastAPI; :func:`missing` says
whether the extra is installed without importing it.
"""

from __future__ import annotations

import importlib.util

#: What the console imports that the agent alone does not install.
REQUIRES = ("fastapi", "uvicorn")

NOT_INSTALLED = (
    "the console is not installed: pip install 'perfagent[console]' "
    "(or point PERFAGENT_CONSOLE_URL at a console running elsewhere)"
)


def missing() -> str | None:
    """The first module of the console extra that cannot be imported, or None."""
    for name in REQUIRES:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None
