"""A FastAPI + async SQLAlchemy (asyncpg) app's own pytest suite costs at most 10 % more
CPU with the agent loaded (``perfagent.init()`` in its conftest) than without."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys

from helpers import APPS, ROOT, clean_env, free_port

SUITE = APPS / "suite_app"


def _suite_cpu(agent: bool, prefix: str) -> float:
    """CPU seconds (user + system) one run of the suite took, in a child process."""
    env = clean_env(
        SUITE_AGENT="1" if agent else "0",
        SUITE_TABLE_PREFIX=prefix,
        PERFAGENT_CONSOLE_URL=f"http://127.0.0.1:{free_port()}",  # nobody listens
        PYTHONPATH=os.pathsep.join([str(ROOT), str(SUITE)]),
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, "-m", "pytest"],
        cwd=SUITE,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_the_agent_adds_at_most_ten_percent_to_an_async_apps_test_suite():
    prefix = f"pa_suite_{os.getpid()}"  # tables of our own in the shared database
    ratios = []
    for _ in range(3):  # alternating pairs: a noisy neighbour hurts both sides alike
        bare = _suite_cpu(False, prefix)
        agent = _suite_cpu(True, prefix)
        ratios.append(agent / bare)
    assert statistics.median(ratios) <= 1.10, ratios
