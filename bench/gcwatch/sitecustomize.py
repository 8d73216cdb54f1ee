"""Loaded in every server that ``overhead.py --gc`` starts (its folder is put on
``PYTHONPATH``; under ``perfagent run`` the agent's own ``sitecustomize`` runs it
too): counts the garbage collector's collections by generation and the time they
take, into a file per process that the benchmark reads before and after its
rounds. The file is written from the collector's own callback, at most every
0.2 s: no thread and no signal handler of its own in the server measured.
"""

import gc
import json
import os
import time

_DIR = os.environ.get("BENCH_GC_DIR")


def _install(folder: str) -> None:
    totals = [0, 0, 0, 0.0]  # collections of generations 0, 1 and 2; seconds collecting
    marks = {"start": 0.0, "written": 0.0}

    def watch(phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            marks["start"] = now
            return
        totals[info["generation"]] += 1
        totals[3] += now - marks["start"]
        if now - marks["written"] >= 0.2:
            marks["written"] = now
            path = os.path.join(folder, str(os.getpid()))
            with open(path + ".tmp", "w") as out:
                json.dump(totals, out)
            os.replace(path + ".tmp", path)

    gc.callbacks.append(watch)


if _DIR:
    _install(_DIR)
