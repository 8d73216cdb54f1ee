"""The agent's own cost per request, in µs, with no server and no network in the way.

    python bench/hotpath.py                     # /hello and /queries, bare vs perfagent
    python bench/hotpath.py --path /queries --profile   # where perfagent's time goes
    SORT=cumtime FILTER=perfagent python bench/hotpath.py --path /hello --profile

Drives the benchmark's FastAPI app as a plain ASGI callable (scope, receive,
send) in a loop, once in a bare interpreter and once with ``perfagent.init()``
run before the app is imported (as ``perfagent run`` does), each in a
subprocess of its own, and prints the CPU time per request of both and the
difference. The load benchmark (``overhead.py``) is what the targets are
judged by; this one is for finding where the agent's microseconds go,
because it is far less noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

_CHILD = r"""
import asyncio, cProfile, json, os, pstats, sys, time
sys.path.insert(0, {apps!r})
if {agent!r}:
    import perfagent
    perfagent.init()
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
    for _ in range(n):
        await one(path)

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
    code = _CHILD.format(apps=str(HERE / "apps"), agent=agent, path=path, n=n, profile=profile)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", action="append", help="/hello and /queries unless given")
    parser.add_argument("-n", type=int, default=20_000, help="requests per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per side (best kept)")
    parser.add_argument("--profile", action="store_true", help="cProfile the perfagent side")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a PERFAGENT_ setting"
    )
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
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
