"""What ``perfagent run`` loads into the server's processes.

``site/`` holds only ``sitecustomize.py``; the runner puts that folder on
``PYTHONPATH`` (see :data:`SITE_DIR`).
"""

from __future__ import annotations

import os
import sys

SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site")
#: Set by ``perfagent run`` in the server's environment: the runner serves /metrics.
#: Here, not in ``agent``, so the runner does not import the agent (protobuf,
#: OpenTelemetry, structlog): measured, its process went from 37.5 to 25 MiB RSS (PSS 26 to 18).
RUNNER_ENV = "PERFAGENT_RUNNER"


def autostart() -> None:
    """Start the agent in this process; never stops the app from starting."""
    import perfagent
    from perfagent.config import ConfigError

    try:
        perfagent.init()
    except ConfigError as exc:  # the runner checked the same settings; this is a backstop
        sys.stderr.write(f"{exc}\n")
    except Exception as exc:
        sys.stderr.write(f"perfagent: agent not started: {exc!r}\n")
