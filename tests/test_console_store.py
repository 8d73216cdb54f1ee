"""The console's store closes every connection it opened, whichever thread opened it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import ROOT

# Readers opened by threads that have ended, then close(), then a collection: any
# connection left open is reported when the collector frees it (ResourceWarning from
# 3.13 on), which -W error turns into an exception handed to sys.unraisablehook.
SCRIPT = """
import gc, sys, threading, warnings
warnings.simplefilter("error")
unraisable = []
sys.unraisablehook = lambda hook: unraisable.append(repr(hook.exc_value))
from perfagent.console.store import Store

store = Store(sys.argv[1])
threads = [threading.Thread(target=store.query, args=("SELECT 1",)) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
store.query("SELECT count(*) FROM spans")
store.close()
del store, threads
gc.collect()
print(unraisable)
sys.exit(1 if unraisable else 0)
"""

PYTHON_313 = Path("/root/.pyenv/versions/3.13.0/bin/python")


def test_close_closes_the_readers_of_every_thread(tmp_path):
    from perfagent.console.store import Store

    store = Store(tmp_path / "s.db")
    readers: list[sqlite3.Connection] = []

    def read() -> None:
        store.query("SELECT 1")
        readers.append(store._reader())

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read()
    assert len({id(c) for c in readers}) == 4
    store.close()
    for conn in readers:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("SELECT 1")
    with pytest.raises(sqlite3.ProgrammingError):
        store.query("SELECT 1")  # closed means closed, not a fresh connection


@pytest.mark.parametrize(
    "python",
    [
        sys.executable,
        pytest.param(
            str(PYTHON_313),
            marks=pytest.mark.skipif(not PYTHON_313.exists(), reason="no Python 3.13 here"),
        ),
    ],
    ids=["this-python", "3.13"],
)
def test_no_connection_is_left_to_the_collector(tmp_path, python):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the store needs nothing but the stdlib
    result = subprocess.run(
        [python, "-W", "error", "-c", SCRIPT, str(tmp_path / "s.db")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
