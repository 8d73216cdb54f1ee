"""Side-by-side overhead benchmark: the bare app against the same app instrumented.

    python bench/overhead.py                 # every app, 3 rounds of 5 s
    python bench/overhead.py --apps fastapi-hello --rounds 5 --seconds 10

Each app is served once per configuration, all at the same time, each server
pinned to core 0 and the load generator (wrk) to core 1, with the receivers of
what the servers export (perfagent's console, the OTLP sink of
``opentelemetry-instrument``): core 0 runs nothing but the server measured, and
the console's own CPU time is printed beside the table. Rounds alternate the
configurations so a noisy neighbour hurts them all alike. Figures are medians
over rounds; "ratio" is throughput against the bare app in the same run, and
"rounds" the lowest and highest of that ratio taken round by round.
Also measured: start-up time added to importing the app, and memory (RSS and
PSS of the app's processes) after the run (and, with --memory, after 100,000
and 1,000,000 requests over 10,000 distinct raw paths). With --gc, each server
also counts its garbage collections (``gcwatch/sitecustomize.py``), printed per
1,000 requests with the time they took per request: under load, the objects a
request holds while in flight make young collections more frequent, and every
~11th collection of the middle generation is a full one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
APPS_DIR = HERE / "apps"

APPS = {
    # name: (server command with {port}, path, configurations that apply)
    "fastapi-hello": ("uvicorn bench_fastapi:app", "/hello", "fastapi"),
    "fastapi-11-queries": ("uvicorn bench_fastapi:app", "/queries", "fastapi"),
    "flask-hello": ("gunicorn -w 1 bench_flask:app", "/hello", "flask"),
    "fasthtml-page": ("uvicorn bench_fasthtml:app", "/", "fasthtml"),
}
CONFIGS = ("bare", "opentelemetry-instrument", "instrumentator", "perfagent")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_argv(app: str, port: int) -> list[str]:
    command, _, _ = APPS[app]
    if command.startswith("uvicorn"):
        extra = ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    else:
        extra = ["-b", f"127.0.0.1:{port}", "--log-level", "warning"]
    return [*command.split(), *extra]


@dataclass
class Server:
    config: str
    port: int
    proc: subprocess.Popen
    log: Path
    #: Per round: requests/s, p50 and p99 ms, the server's CPU µs per request.
    runs: list[tuple[float, float, float, float]] = field(default_factory=list)
    requests: int = 0  # served in the measured rounds
    #: With --gc: the collector's totals (young, middle, full, seconds) before the rounds.
    gc_before: list[float] | None = None

    def wait_ready(self, path: str, timeout: float = 60.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise SystemExit(
                    f"{self.config} server exited with {self.proc.returncode}:\n{tail}\n"
                    'are the benchmark\'s extras installed? pip install -e ".[bench]"'
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"{self.config} server not ready after {timeout}s")


def start(
    app: str,
    config: str,
    env: dict[str, str],
    console_url: str,
    sink_url: str,
    settings: dict[str, str] | None = None,
) -> Server:
    port = free_port()
    argv = server_argv(app, port)
    env = dict(env)
    if config == "opentelemetry-instrument":
        argv = ["opentelemetry-instrument", "--traces_exporter", "otlp", *argv]
        env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=sink_url,
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_METRICS_EXPORTER="none",
            OTEL_LOGS_EXPORTER="none",
            OTEL_SERVICE_NAME="bench",
        )
    elif config == "instrumentator":
        env["BENCH_INSTRUMENTATOR"] = "1"
    elif config == "perfagent":
        env.update(settings or {})
        argv = [
            sys.executable,
            "-m",
            "perfagent",
            "run",
            "--metrics-port",
            str(free_port()),
            "--console-url",
            console_url,
            "--",
            *argv,
        ]
    log = Path(tempfile.mkdtemp(prefix="perfagent-bench-")) / f"{config}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", "0", *argv],
            cwd=APPS_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(config, port, proc, log)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(port: int, path: str, seconds: int, connections: int, script: str | None = None) -> tuple:
    argv = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script:
        argv += ["-s", script]
    out = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    latency = {
        pct: float(value) * _UNITS[unit]
        for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    }
    return rps, latency.get("50", float("nan")), latency.get("99", float("nan")), total


def tree_pids(pid: int) -> list[int]:
    """A process and all its descendants (pre-fork workers, the child of perfagent's runner)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return out


def tree_memory_kib(pid: int) -> dict[int, tuple[int, int]]:
    """pid -> (resident KiB, proportional KiB) for a process and all its descendants.

    RSS counts a page shared by a pre-fork server's master and workers once in
    each of them; PSS splits it among them, so the sum over the tree is what
    the server really holds.
    """
    out: dict[int, tuple[int, int]] = {}
    for current in tree_pids(pid):
        try:
            status = Path(f"/proc/{current}/status").read_text()
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            out[current] = (
                int(re.search(r"VmRSS:\s+(\d+)", status).group(1)),
                int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1)),
            )
        except (OSError, AttributeError):
            pass
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU time used so far by a process and all its descendants (perfagent's runner
    included: it shares the server's core)."""
    total = 0.0
    for current in tree_pids(pid):
        try:
            total += cpu_seconds(current)
        except (OSError, IndexError, ValueError):
            pass  # exited meanwhile
    return total


def gc_totals(server: Server, folder: str) -> list[float] | None:
    """The collector's totals (young, middle, full collections; seconds) summed over
    the server's processes, as their ``gcwatch`` callbacks last wrote them; None
    where none wrote any."""
    totals = None
    for pid in tree_pids(server.proc.pid):
        try:
            values = json.loads(Path(folder, str(pid)).read_text())
        except (OSError, ValueError):
            continue
        totals = values if totals is None else [a + b for a, b in zip(totals, values, strict=True)]
    return totals


def gc_report(servers: list[Server], folder: str) -> None:
    print("  garbage collection (--gc): per 1,000 requests, and its time per request")
    time.sleep(0.3)  # past the callbacks' 0.2 s between writes
    for server in servers:
        after = None if server.config == "opentelemetry-instrument" else gc_totals(server, folder)
        if after is None or not server.requests:
            print(f"  {server.config:<26}not counted (its own sitecustomize runs instead)")
            continue
        before = server.gc_before or [0.0, 0.0, 0.0, 0.0]
        young, middle, full, seconds = (a - b for a, b in zip(after, before, strict=True))
        per_k = 1000 / server.requests
        print(
            f"  {server.config:<26}young {young * per_k:6.1f}   middle {middle * per_k:5.2f}"
            f"   full {full * per_k:5.2f}   {seconds / server.requests * 1e6:6.1f} µs a request"
        )


def app_memory_mib(server: Server) -> tuple[float, float, float]:
    """(RSS, PSS of the app's processes, PSS of perfagent's runner) in MiB, for one server."""
    tree = tree_memory_kib(server.proc.pid)
    taskset_or_runner = server.proc.pid  # taskset execs, so this pid is the first real process
    runner = tree.pop(taskset_or_runner, (0, 0)) if server.config == "perfagent" else (0, 0)
    rss = sum(r for r, _ in tree.values()) / 1024
    pss = sum(p for _, p in tree.values()) / 1024
    return rss, pss, runner[1] / 1024


def compile_agent() -> None:
    """Byte-compiles perfagent as ``pip install`` does. From a checkout (an editable
    install) under ``PYTHONDONTWRITEBYTECODE=1`` every start would compile it again:
    measured here, 85 ms of the start-up added to a Flask app."""
    import compileall

    import perfagent

    compileall.compile_dir(os.path.dirname(perfagent.__file__), quiet=1)


def startup_ms(
    app_module: str, configs: list[str], env: dict[str, str], runs: int = 11
) -> dict[str, float]:
    """Median wall time of a process that imports the app and exits, per configuration.

    The configurations take turns run by run, so a machine that gets busier
    or quieter meanwhile weighs on all of them alike.
    """
    commands = {}
    for config in configs:
        argv = [sys.executable, "-c", f"import {app_module}"]
        config_env = dict(env)
        if config == "opentelemetry-instrument":
            argv = ["opentelemetry-instrument", "--traces_exporter", "none", *argv]
            config_env.update(OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")
        elif config == "perfagent":
            from perfagent.bootstrap import SITE_DIR

            config_env["PYTHONPATH"] = os.pathsep.join([SITE_DIR, env.get("PYTHONPATH", "")])
            config_env["PERFAGENT_RUNNER"] = "1"
            config_env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="perfagent-bench-")
        commands[config] = (argv, config_env)
    times: dict[str, list[float]] = {config: [] for config in configs}
    for _ in range(runs):
        for config, (argv, config_env) in commands.items():
            started = time.perf_counter()
            subprocess.run(argv, cwd=APPS_DIR, env=config_env, check=True)
            times[config].append((time.perf_counter() - started) * 1000)
    return {config: statistics.median(values) for config, values in times.items()}


def stop(server: Server) -> None:
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(15)
    except ProcessLookupError:
        pass  # it had exited already
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


def memory_run(app: str, servers: list[Server], targets: list[int], connections: int) -> None:
    script = Path(tempfile.mkdtemp()) / "paths.lua"
    script.write_text(
        "math.randomseed(os.time())\n"
        "request = function()\n"
        '  return wrk.format("GET", "/items/" .. math.random(1, 10000))\n'
        "end\n"
    )
    print(f"\nmemory, {app}: PSS MiB after N requests over 10,000 distinct paths")
    for server in servers:
        done, row = 0, []
        for target in targets:
            while done < target:
                *_, total = wrk(server.port, "/", 10, connections, str(script))
                done += total
            row.append(f"{done:>9,} req: {app_memory_mib(server)[1]:6.1f}")
        print(f"  {server.config:<26}" + "   ".join(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", nargs="+", default=list(APPS), choices=list(APPS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--memory", action="store_true", help="also 100k and 1M requests on 10k paths"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a PERFAGENT_ setting for the perfagent configuration (to see what a feature costs)",
    )
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up timing")
    parser.add_argument(
        "--gc", action="store_true", help="also count each server's garbage collections"
    )
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally blocks still run
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install -y wrk util-linux")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERFAGENT_", "OTEL_"))}
    env["PYTHONPATH"] = str(APPS_DIR)
    gc_folder = tempfile.mkdtemp(prefix="perfagent-bench-gc-") if args.gc else None
    if gc_folder:
        env["PYTHONPATH"] += os.pathsep + str(HERE / "gcwatch")
        env["BENCH_GC_DIR"] = gc_folder
    sink_port, console_port = free_port(), free_port()
    helpers = [
        subprocess.Popen(
            ["taskset", "-c", "1", sys.executable, str(HERE / "sink.py"), str(sink_port)]
        ),
        subprocess.Popen(
            [
                "taskset",
                "-c",
                "1",
                sys.executable,
                "-m",
                "perfagent",
                "console",
                "--port",
                str(console_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    console_url = f"http://127.0.0.1:{console_port}"
    sink_url = f"http://127.0.0.1:{sink_port}"
    try:
        wait_for_console(console_url)
        for app in args.apps:
            _, path, family = APPS[app]
            configs = [c for c in args.configs if c != "instrumentator" or family == "fastapi"]
            servers = [start(app, c, env, console_url, sink_url, settings) for c in configs]
            try:
                for server in servers:
                    server.wait_ready(path)
                for server in servers:  # warm up every server once
                    wrk(server.port, path, 1, args.connections)
                console_cpu = cpu_seconds(helpers[1].pid)
                if gc_folder:
                    time.sleep(0.3)  # past the callbacks' 0.2 s between writes
                    for server in servers:
                        server.gc_before = gc_totals(server, gc_folder)
                for round_no in range(args.rounds):
                    shift = round_no % len(servers)
                    for server in servers[shift:] + servers[:shift]:
                        cpu_before = tree_cpu_seconds(server.proc.pid)
                        try:
                            rps, p50, p99, total = wrk(
                                server.port, path, args.seconds, args.connections
                            )
                        except subprocess.CalledProcessError as exc:
                            tail = server.log.read_text(errors="replace")[-2000:]
                            raise SystemExit(
                                f"wrk failed against {server.config} ({exc.stderr.strip()}):"
                                f"\n{tail}"
                            ) from None
                        cpu_us = (tree_cpu_seconds(server.proc.pid) - cpu_before) / total * 1e6
                        server.runs.append((rps, p50, p99, cpu_us))
                        server.requests += total
                report(app, servers, cpu_seconds(helpers[1].pid) - console_cpu)
                if gc_folder:
                    gc_report(servers, gc_folder)
                if args.memory and app in ("fastapi-hello", "flask-hello"):
                    memory_run(app, servers, [100_000, 1_000_000], args.connections)
            finally:
                for server in servers:
                    stop(server)
        if args.no_startup:
            return 0
        module = {"fastapi": "bench_fastapi", "flask": "bench_flask", "fasthtml": "bench_fasthtml"}
        compile_agent()
        print("\nstart-up: median ms to start Python, import the app and exit")
        for family in sorted({APPS[a][2] for a in args.apps}):
            configs = [c for c in args.configs if c != "instrumentator"]
            times = startup_ms(module[family], configs, env)
            cells = "   ".join(f"{c} {t:6.0f} ({t - times['bare']:+.0f})" for c, t in times.items())
            print(f"  {family:<10} {cells}")
    finally:
        for helper in helpers:
            helper.terminate()
            helper.wait()
    return 0


def wait_for_console(url: str, timeout: float = 60.0) -> None:
    """Until the console answers. perfagent's runner starts a console of its own where
    none answers, on the server's core (it inherits the runner's affinity): had the
    runners' consoles raced this one for its port, the winner could be on core 0."""
    from perfagent.runner import console_answers

    deadline = time.monotonic() + timeout
    while not console_answers(url):
        if time.monotonic() > deadline:
            raise SystemExit(f"the console at {url} is not answering after {timeout:.0f} s")
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(app: str, servers: list[Server], console_cpu_s: float) -> None:
    """Medians over rounds; "rounds" is the spread of the ratio taken round by round
    (each against the bare app's run of the same round), to tell a gap from noise.

    "CPU µs" is the server's CPU time per request (its whole process tree), and
    "CPU ratio" the bare app's over this configuration's: what the throughput
    ratio would be if the server had core 0 to itself. On a shared machine the
    throughput of a round also moves with whatever else gets core 0 meanwhile
    (other processes, the hypervisor's steal), which CPU time leaves out.
    ``console_cpu_s``: what the console used meanwhile, shown per request perfagent served."""
    bare_runs = servers[0].runs
    bare = statistics.median(r[0] for r in bare_runs)
    bare_cpu = statistics.median(r[3] for r in bare_runs)
    print(f"\n{app} ({len(bare_runs)} rounds)")
    header = f"{'req/s':>9}{'ratio':>8}{'rounds':>12}{'p50 ms':>9}{'p99 ms':>9}"
    header += f"{'CPU µs':>9}{'CPU ratio':>10}"
    print(f"  {'configuration':<26}{header}{'RSS MiB':>9}{'PSS MiB':>9}")
    for server in servers:
        rps = statistics.median(r[0] for r in server.runs)
        p50 = statistics.median(r[1] for r in server.runs)
        p99 = statistics.median(r[2] for r in server.runs)
        cpu = statistics.median(r[3] for r in server.runs)
        ratios = [r[0] / b[0] for r, b in zip(server.runs, bare_runs, strict=True)]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        rss, pss, runner = app_memory_mib(server)
        extra = f"  (+ runner PSS {runner:.1f})" if runner else ""
        print(
            f"  {server.config:<26}{rps:>9.0f}{rps / bare:>8.2f}{spread:>12}{p50:>9.2f}{p99:>9.2f}"
            f"{cpu:>9.0f}{bare_cpu / cpu:>10.2f}{rss:>9.1f}{pss:>9.1f}{extra}"
        )
        if server.config == "perfagent" and server.requests:
            print(
                f"  {'':<26}the console receiving its data (on core 1): "
                f"{console_cpu_s / server.requests * 1e6:.1f} µs CPU a request"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
