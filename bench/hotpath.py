"""The agent's own cost per request, in µs, with no server and no network in the way.

    python bench/hotpath.py                     # /hello and /queries, bare vs perfagent
    python bench/hotpath.py --instructions      # the same in CPU instructions (valgrind)
    python bench/hotpath.py --path /queries --profile   # where perfagent's time goes
    SORT=cumtime FILTER=perfagent python bench/hotpath.py --path /hello --profile

Drives the benchmark's FastAPI app as a plain ASGI callable (scope, receive,
send) in a loop, once in a bare interpreter and once with ``perfagent.init()``
run before the app is imported (as ``perfagent run`` does), each in a
subprocess of its own, and prints the CPU time per request of both and the
difference. The load benchmark (``overhead.py``) is what the targets are
judged by; this one is for finding where the agent's microseconds go,
because it is far less noisy on a shared machine.

``--instructions`` counts instructions instead of time, under valgrind's
callgrind: the same from run to run whatever else the machine is doing
(the head sample is seeded), where wall-clock
ratios here move by ±0.03, more than most single changes to the hot path.
Each side runs twice, with N and 5N requests, and the difference is divided
by 4N, so start-up and the warm-up cancel out. The agent's clock-driven work
(its thread, the loop watchdog) is stopped for the count: valgrind makes every
request some fifty times slower, so that work would weigh fifty times too much
per request. The log lines its thread writes are written by the driver
instead, every 100 requests, so their cost is counted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VALGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")

_CHILD = r"""
import asyncio, cProfile, json, os, pstats, sys, time
sys.path.insert(0, {apps!r})
if {agent!r}:
    import perfagent
    import perfagent.agent
    if {clockless!r}:
        # A repeating finding keeps a trace once per 10 s: once per ~1,000 requests
        # under valgrind, against once per ~40,000 at full speed (read at init()).
        perfagent.agent.REPEAT_EVERY_S = float("inf")
    perfagent.init()
    if {clockless!r}:
        # Under valgrind every request runs ~50x slower, so what the agent does per
        # second of wall time (its thread's ticks, the loop watchdog) would weigh ~50x
        # per request: counted per request, only the request path is measured.
        _agent = perfagent._state["agent"]
        _agent.thread.stop()
        _agent.thread.ensure_started = lambda: None
        _agent.loop_watch_pending = False
        # The log lines the agent thread would write, written here in its batches.
        _agent.log.deferred = True
        write_log = _agent.log.write
        # The same head sample each run, so that two runs count the same work.
        import perfagent.record
        perfagent.record.IDS.seed(0)
write_log = locals().get("write_log")
import bench_fastapi

app = bench_fastapi.app
scope_base = {{
    "type": "http", "asgi": {{"version": "3.0"}}, "http_version": "1.1", "method": "GET",
    "scheme": "http", "root_path": "", "query_string": b"",
    "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
    "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")],
}}
body = {{"type": "http.request", "body": b"", "more_body": False}}

async def receive():
    return body

async def send(message):
    pass

async def one(path):
    scope = dict(scope_base, path=path, raw_path=path.encode())
    await app(scope, receive, send)

async def run(path, n):
    for i in range(n):
        await one(path)
        if write_log is not None and i % 100 == 99:
            write_log()

async def main():
    await run({path!r}, 500)  # warm-up: caches, thread pool, lazy imports
    profiler = cProfile.Profile() if {profile!r} else None
    if profiler:
        profiler.enable()
    cpu, main = time.process_time(), time.thread_time()
    await run({path!r}, {n})
    cpu, main = time.process_time() - cpu, time.thread_time() - main
    if profiler:
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats(os.environ.get("SORT", "tottime"))
        stats.print_stats(os.environ.get("FILTER", ""), 40)
    print(json.dumps({{"us": cpu / {n} * 1e6, "main_us": main / {n} * 1e6}}))

asyncio.run(main())
if {agent!r}:
    perfagent.shutdown()
"""


def measure(path: str, agent: bool, n: int, profile: bool, settings: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERFAGENT_", "OTEL_"))}
    env.update(PERFAGENT_METRICS_PORT="0", PERFAGENT_CONSOLE_URL="http://127.0.0.1:9", **settings)
    code = _CHILD.format(
        apps=str(HERE / "apps"), agent=agent, path=path, n=n, profile=profile, clockless=False
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # the agent's log lines, as to a file
        text=True,
        check=True,
    )
    *profiled, last = out.stdout.strip().splitlines()
    if profiled:
        print("\n".join(profiled))
    result = json.loads(last)
    if os.environ.get("HOTPATH_VERBOSE"):
        print(f"  {'agent' if agent else 'bare'}: {result}")
    return result["us"]


def instructions(path: str, agent: bool, n: int, settings: dict[str, str]) -> float:
    """CPU instructions per request (callgrind), start-up and warm-up subtracted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERFAGENT_", "OTEL_"))}
    env.update(PERFAGENT_METRICS_PORT="0", PERFAGENT_CONSOLE_URL="http://127.0.0.1:9", **settings)
    env["PYTHONHASHSEED"] = "0"  # the same dict layouts each run
    totals = []
    for count in (n, 5 * n):
        code = _CHILD.format(
            apps=str(HERE / "apps"), agent=agent, path=path, n=count, profile=False, clockless=True
        )
        out = subprocess.run(
            [*VALGRIND, sys.executable, "-c", code],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=True,
        )
        collected = re.search(r"Collected : (\d+)", out.stderr)
        if collected is None:
            raise RuntimeError(f"no callgrind total in: {out.stderr[-500:]}")
        totals.append(int(collected.group(1)))
    return (totals[1] - totals[0]) / (4 * n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", action="append", help="/hello and /queries unless given")
    parser.add_argument("-n", type=int, help="requests per measurement (default 20,000)")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per side (best kept)")
    parser.add_argument("--profile", action="store_true", help="cProfile the perfagent side")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="CPU instructions per request under valgrind instead of µs (-n defaults to 250)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a PERFAGENT_ setting"
    )
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    if args.instructions:
        n = args.n or 250
        print(f"{'path':<10} {'bare':>11} {'agent':>11} {'added':>11} {'ratio':>6}  instructions")
        for path in args.path or ["/hello", "/queries"]:
            bare = instructions(path, False, n, settings)
            agent = instructions(path, True, n, settings)
            print(
                f"{path:<10} {bare:11,.0f} {agent:11,.0f} {agent - bare:11,.0f} {bare / agent:6.2f}"
            )
        return 0
    args.n = args.n or 20_000
    print(f"{'path':<10} {'bare µs':>9} {'agent µs':>9} {'added µs':>9} {'ratio':>6}")
    for path in args.path or ["/hello", "/queries"]:
        bare = min(measure(path, False, args.n, False, settings) for _ in range(args.repeat))
        agent = min(measure(path, True, args.n, False, settings) for _ in range(args.repeat))
        print(f"{path:<10} {bare:9.1f} {agent:9.1f} {agent - bare:9.1f} {bare / agent:6.2f}")
        if args.profile:
            measure(path, True, args.n, True, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
