"""Responses a test client never closes: their records end, and cost nothing after."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import APPS, clean_env, free_port


def test_a_flask_test_client_suite_of_unclosed_responses_ends_every_record():
    few, many, idle_s = 10, 1000, 1.5
    env = clean_env(PERFAGENT_CONSOLE_URL=f"http://127.0.0.1:{free_port()}")  # nobody listens
    done = subprocess.run(
        [sys.executable, "flask_unclosed.py", str(few), str(many), str(idle_s)],
        cwd=APPS,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # Every request ended: counted, judged (every other one is an N+1), none in flight.
    assert seen["counted"] == many
    assert seen["n_plus_one"] == many // 2
    assert seen["in_flight"] == 0
    # Memory flat: the later requests keep less than the first few did (warm-up included);
    # held records kept ~16 kB each.
    assert seen["memory_many"] - seen["memory_few"] < seen["memory_few"], seen
    # The agent thread's idle CPU does not grow with the requests served.
    assert seen["cpu_many"] <= 2 * seen["cpu_few"] + 0.02 * idle_s, seen
