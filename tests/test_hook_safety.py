"""The sqlite3 hook never hurts the app nor shows itself to it: not when a finalizer
issues statements in the middle of a query's capture, not in an error message.

Run by .ci/sanitize under ASan and UBSan too, where a use-after-free is a report
rather than a segfault that depends on what reuses the freed memory.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
from helpers import clean_env

# A request's queries, each at a line of new code, while the fingerprint cache is
# full. A parameter's adapter leaves behind garbage in a reference cycle whose
# finalizer issues more distinct statements than the fingerprint cache keeps; the
# driver has bound the parameters by then, and the collector's threshold is set so
# that the next allocation it counts collects: the C hook's, as it walks the stack
# and makes the view's site (a new line of the app's). The finalizer's
# statements empty the cache, and with it the Shape the hook found there and held
# without a reference: it then read freed memory (a segfault on 3.10 and 3.11, where
# an allocation can collect; ASan: heap-use-after-free).
FINALIZER_DURING_THE_WALK = """
import gc, sqlite3, sys
import perfagent
from perfagent.record import RequestRecord, current

# The C hook itself, also in a run of the suite with PERFAGENT_COMPILED_HOOKS=0.
perfagent.init(metrics_port=0, console_url="http://127.0.0.1:9", compiled_hooks=True)
conn = sqlite3.connect(":memory:")
conn.execute("CREATE TABLE t (id INTEGER, x INTEGER)")
cursor = conn.cursor()
SQL = "UPDATE t SET x = x + 1 WHERE id = ?"
flooded = []
THRESHOLD = gc.get_threshold()


class Flood:
    def __del__(self):
        gc.set_threshold(*THRESHOLD)
        for i in range(5000):
            conn.execute(f"SELECT {i} WHERE 0 = 1")
        flooded.append(sys._getframe(1).f_code.co_filename)


class Marker:
    pass


armed = []
kept = []


def adapt(marker):
    if armed:
        armed.clear()
        gc.set_threshold(1_000_000)  # no collection while the garbage is made
        flood = Flood()
        flood.cycle = flood
        del flood
        # Tuples of three that stay: the interpreter's spare ones (up to 2,000) used
        # up, the next one (a site the hook makes) is a new object the collector
        # counts, and the count stays above 1 whatever the driver frees next: that
        # allocation collects.
        kept.append([(i, i, i) for i in range(2100)])
        gc.set_threshold(1)
    return 1


sqlite3.register_adapter(Marker, adapt)


def new_view(n, target):
    # New code each time, in a file of the app's: in none of the hook's caches.
    source = "def view(params):\\n    target.execute(SQL, params)\\n"
    namespace = {"target": target, "SQL": SQL}
    exec(compile(source, f"{sys.argv[1]}/view_{n}.py", "exec"), namespace)
    return namespace["view"]


for n in range(3):
    for target in (cursor, conn):
        view = new_view(n, target)
        token = current.set(RequestRecord("GET", 0.0, None))
        view((1,))  # the shape cached, the view's code classified (by the Python walk)
        current.reset(token)
        record = RequestRecord("GET", 0.0, None)
        token = current.set(record)
        armed.append(1)
        view((Marker(),))
        gc.set_threshold(*THRESHOLD)
        current.reset(token)
        assert SQL in [q.sql for q in record.queries]  # the view's query, captured
print("flooded", len(flooded), "in views", sum("view_" in f for f in flooded))
"""


def test_a_finalizer_that_empties_the_fingerprint_cache_during_a_capture(tmp_path):
    """Fails before the fix with a segfault (3.10, 3.11) or an ASan report."""
    pytest.importorskip("perfagent._speedups", reason="a test of the C hook: not built")
    script = tmp_path / "finalizer.py"
    script.write_text(FINALIZER_DURING_THE_WALK)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-4000:])
    # Every finalizer ran, each inside a view's query (from the hook).
    assert done.stdout.split() == ["flooded", "6", "in", "views", "6"], done.stdout


# Calls sqlite3 refuses, each with its own message (which names Connection or Cursor).
REFUSED = {
    "conn.execute(sql=...)": lambda conn: conn.execute(sql="SELECT 1"),
    "conn.execute(sql, parameters=...)": lambda conn: conn.execute("SELECT ?", parameters=(1,)),
    "conn.executemany(sql=..., ...)": lambda conn: conn.executemany(
        sql="SELECT ?", parameters=[(1,)]
    ),
    "conn.execute()": lambda conn: conn.execute(),
    "conn.execute(sql, params, extra)": lambda conn: conn.execute("SELECT ?", (1,), 3),
    "cursor.execute(sql=...)": lambda conn: conn.cursor().execute(sql="SELECT 1"),
    "cursor.execute()": lambda conn: conn.cursor().execute(),
    "cursor.executemany(sql=...)": lambda conn: conn.cursor().executemany(
        sql="SELECT ?", seq_of_parameters=[(1,)]
    ),
}


def _answers(conn: sqlite3.Connection) -> dict[str, tuple[str, str]]:
    answers = {}
    for name, call in REFUSED.items():
        try:
            answers[name] = ("returned", repr(call(conn)))
        except Exception as exc:
            answers[name] = (type(exc).__name__, str(exc))
    return answers


@pytest.mark.parametrize("compiled", [True, False], ids=["C-hook", "Python-hook"])
def test_a_call_sqlite3_refuses_gets_sqlite3s_own_error(compiled):
    """``conn.execute(sql=...)`` raised our cursor's error (``Cursor.execute() takes no
    keyword arguments``) where sqlite3 names ``Connection.execute()``; the Python hook
    even ran it. In a request or not, the app sees what it sees without the agent."""
    import perfagent
    from perfagent.db import drivers
    from perfagent.record import RequestRecord, current

    bare = sqlite3.connect(":memory:")
    expected = _answers(bare)
    bare.close()
    assert all(kind == "TypeError" for kind, _message in expected.values()), expected
    perfagent.init(metrics_port=0, console_url="http://127.0.0.1:9", compiled_hooks=compiled)
    conn = sqlite3.connect(":memory:")
    try:
        hook = type(conn).__dict__["execute"]
        assert isinstance(hook, drivers.SqlHook) == compiled, hook
        assert _answers(conn) == expected
        record = RequestRecord("GET", 0.0, None)
        token = current.set(record)
        try:
            assert _answers(conn) == expected
            # What it takes is still timed, by position as sqlite3 takes it.
            assert conn.execute("SELECT ?", (1,)).fetchone() == (1,)
            assert conn.cursor().execute("SELECT 2").fetchone() == (2,)
        finally:
            current.reset(token)
        captured = [(q.sql, q.params) for q in record.queries]
        assert captured == [("SELECT ?", (1,)), ("SELECT 2", None)]
    finally:
        conn.close()
        perfagent.shutdown()


# The event-loop watchdog samples the loop thread's stack while garbage whose finalizer
# lets the GIL go (as a query does) is collected, and another thread starts threads.
SAMPLING_AND_FINALIZERS = """
import asyncio, gc, threading, time
import perfagent
from perfagent.detectors.eventloop import LoopWatchdog, _Stall


class Slow:
    def __init__(self):
        self.cycle = self

    def __del__(self):
        time.sleep(0.0005)


stop = False


def churn():
    while not stop:
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()


perfagent.init(metrics_port=0, console_url="http://127.0.0.1:9")
watchdog = LoopWatchdog(perfagent._state["agent"], asyncio.new_event_loop())
watchdog._loop_thread = threading.get_ident()
threading.Thread(target=churn, daemon=True).start()
gc.set_threshold(1)
for _ in range(3000):
    Slow()
    Slow()
    watchdog._sample(_Stall(0.0))
stop = True
gc.set_threshold(700)
perfagent.shutdown()
print("done")
"""


def test_sampling_stacks_never_hangs_the_process_on_a_finalizer(tmp_path):
    """``sys._current_frames()`` holds the interpreter's lock of thread states while it
    allocates: a collection there ran a finalizer that let the GIL go and waited for
    it holding the lock, while a thread starting a thread held the GIL waiting for the
    lock (CPython gh-106883): the process hung for good (bench/stress.py's app stopped
    answering within a minute). The watchdog and the slow-request sampler now read
    stacks with the collector off. Fails before with a timeout."""
    script = tmp_path / "sampling.py"
    script.write_text(SAMPLING_AND_FINALIZERS)
    try:
        done = subprocess.run(
            [sys.executable, str(script)],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung: a finalizer let the GIL go inside _current_frames")
    assert done.returncode == 0 and done.stdout.split() == ["done"], done
