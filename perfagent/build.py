"""What this install runs: the C speedups or their pure-Python twin.

``pip install`` builds ``perfagent/_speedups.c`` and ``_perrequest.c`` where it
finds a C compiler and installs the package without them where it does not
(``optional=True`` in setup.py). Both paths give the same results, so nothing
would tell a user which one runs: the agent says it once at start, and
``perfagent_build_info{compiled}`` shows it.
"""

from __future__ import annotations

import sys

PURE_PYTHON = (
    "perfagent: the C speedups are not built, so the agent runs its pure-Python path "
    "(same results, more CPU a request); to build them, install a C compiler and Python's "
    "headers (Debian: apt-get install gcc python3-dev) and reinstall perfagent"
)


def speedups_built() -> bool:
    """True when both C modules import (built for this Python)."""
    try:
        import perfagent._perrequest
        import perfagent._speedups  # noqa: F401
    except ImportError:
        return False
    return True


def compiled(compiled_hooks: bool) -> bool:
    """Whether the C speedups run: built, and not turned off (``PERFAGENT_COMPILED_HOOKS=0``)."""
    return compiled_hooks and speedups_built()


def say_if_pure_python() -> None:
    """One line on stderr when the speedups are missing (not when merely turned off)."""
    if not speedups_built():
        sys.stderr.write(PURE_PYTHON + "\n")
        sys.stderr.flush()
