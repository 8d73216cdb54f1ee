"""The console: a small FastAPI app that receives the agents' data and shows it.

It is the ``console`` extra (``pip install "perfagent[console]"``): the agent
itself goes into the app's own environment and must bring no web stack there,
so importing this package imports nothing of FastAPI; :func:`missing` says
whether the extra is installed without importing it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

#: What the console imports that the agent alone does not install, and the oldest
#: release it works with (as in pyproject.toml's ``console`` extra): an app's own
#: older FastAPI does not make the console installed.
REQUIRES = (("fastapi", (0, 110)), ("uvicorn", (0, 29)))

NOT_INSTALLED = (
    "the console is not installed: pip install 'perfagent[console]' "
    "(or point PERFAGENT_CONSOLE_URL at a console running elsewhere)"
)


def _release(text: str) -> tuple[int, ...]:
    numbers = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers)


def missing() -> str | None:
    """The first requirement of the console extra not met (``fastapi>=0.110``), or None."""
    for name, oldest in REQUIRES:
        try:
            found = _release(version(name))
        except PackageNotFoundError:
            found = ()
        if found < oldest:
            return f"{name}>={'.'.join(map(str, oldest))}"
    return None
