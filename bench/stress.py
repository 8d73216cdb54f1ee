"""Stress the agent inside a real app: it must not crash it, and its memory must stay bounded.

Serves bench/apps/stress_app.py (FastAPI, sqlite3) under ``perfagent run`` (uvicorn,
one worker, traces exported to a local OTLP sink) and drives it from several client
threads for ``--duration`` seconds with, all at once:

- threads issuing queries (the thread pool's, and threads a request starts);
- finalizers issuing statements, from garbage most requests leave behind, with the
  collector's threshold low (collections, and finalizers, run inside the hooks);
- a full fingerprint cache (statements with inlined literals, ten new ones a request);
- 1 MiB statements, a new one every ``--big-every`` seconds;
- 200,000 queries in one request, one such request every ``--many-every`` seconds;
- 10,000 distinct routes, walked in turn;
- a fork inside a request every ``--fork-every`` seconds (the child queries, exits 0);
- queries from code made at run time (new code objects, new lines).

Every ``--report-every`` seconds it prints the worker's RSS and its peak so far, and
at the end whether anything crashed: the server (a signal, an exit it was not asked
for), a forked child, a request (5xx, a dropped connection), or a sanitizer report.
With ``--sanitize`` the C extensions are built with ASan and UBSan into a temporary
copy of ``--tree`` (default: this checkout) and the server runs them, as .ci/sanitize
does. Stops early (and says so) when the worker's RSS passes ``--max-rss-mib``.

    python bench/stress.py --duration 120 --sanitize
    python bench/stress.py --duration 120 --sanitize --tree /tmp/main-copy   # before a fix

Exit status 1 when anything crashed or a sanitizer reported.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SANITIZE_FLAGS = "-fsanitize=address,undefined -fno-omit-frame-pointer -fno-wrapv -O1 -g"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    """VmRSS of one process, MiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def sanitized_tree(tree: Path, work: Path, halt: bool = True) -> dict[str, str]:
    """A copy of ``tree`` with its extensions built with ASan and UBSan; the environment
    that runs them."""
    copy = work / "tree"
    shutil.copytree(
        tree,
        copy,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.so", "__pycache__"),
    )
    env = {**os.environ, "CFLAGS": SANITIZE_FLAGS, "LDFLAGS": "-fsanitize=address,undefined"}
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", work / "b"],
        cwd=copy,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    built = glob.glob(str(copy / "perfagent" / "_*.so"))
    if len(built) < 2:
        raise SystemExit(f"stress: the sanitized extensions were not built in {copy}")
    libasan = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    reports = work / "reports"
    reports.mkdir()
    return {
        "PYTHONPATH": str(copy),
        "LD_PRELOAD": libasan,
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": f"detect_leaks=0:log_path={reports}/asan",
        "UBSAN_OPTIONS": f"halt_on_error={int(halt)}:print_stacktrace=1",
    }


class Load:
    """Client threads, each with its own keep-alive connection, and what they saw."""

    def __init__(self, port: int, args: argparse.Namespace) -> None:
        self.port = port
        self.args = args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done: Counter = Counter()
        self.failed: Counter = Counter()
        self.failures: list[str] = []
        self.counter = 0
        self.due = {"big": 0.0, "many": 0.0, "fork": 0.0}
        self.busy = {"big": False, "many": False, "fork": False}

    def next_path(self) -> tuple[str, str]:
        now = time.monotonic()
        with self.lock:
            self.counter += 1
            n = self.counter
            every = {
                "big": self.args.big_every,
                "many": self.args.many_every,
                "fork": self.args.fork_every,
            }
            for kind in ("many", "big", "fork"):
                if not self.busy[kind] and now >= self.due[kind]:
                    self.busy[kind] = True
                    self.due[kind] = now + every[kind]
                    path = {"big": f"/big/{n}", "many": f"/many/{self.args.many}", "fork": "/fork"}
                    return kind, path[kind]
        kind = random.choices(["q", "inline", "route", "dyn", "threads"], weights=[6, 3, 4, 3, 1])[
            0
        ]
        path = {
            "q": "/q",
            "inline": f"/inline/{n}",
            "route": f"/route{n % self.args.routes}/{n}",
            "dyn": f"/dyn/{n}",
            "threads": "/threads",
        }[kind]
        return kind, path

    def client(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        while not self.stop.is_set():
            kind, path = self.next_path()
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                body = response.read()
                ok = response.status == 200 and (kind != "fork" or b'"status":0' in body)
                if not ok:
                    raise RuntimeError(f"{response.status} {body[:200]!r}")
                with self.lock:
                    self.done[kind] += 1
            except Exception as exc:
                with self.lock:
                    self.failed[kind] += 1
                    if len(self.failures) < 20:
                        self.failures.append(f"{path[:40]}: {type(exc).__name__}: {exc}"[:300])
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
                time.sleep(0.2)
            finally:
                if kind in self.busy:
                    with self.lock:
                        self.busy[kind] = False
        connection.close()


def wait_listening(port: int, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"stress: the server exited at start ({server.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"stress: the server did not listen within {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--clients", type=int, default=6, help="client threads (default 6)")
    parser.add_argument("--routes", type=int, default=10_000, help="distinct routes (10,000)")
    parser.add_argument("--many", type=int, default=200_000, help="queries in the big request")
    parser.add_argument("--many-every", type=float, default=20.0, help="seconds between them")
    parser.add_argument("--big-every", type=float, default=1.0, help="s between 1 MiB statements")
    parser.add_argument("--fork-every", type=float, default=5.0, help="s between forks")
    parser.add_argument("--report-every", type=float, default=10.0, help="s between RSS lines")
    parser.add_argument("--max-rss-mib", type=float, default=3072.0, help="stop past this RSS")
    parser.add_argument("--sanitize", action="store_true", help="C built with ASan and UBSan")
    parser.add_argument(
        "--ubsan-keep-going",
        action="store_true",
        help="UBSan reports and goes on (ASan still halts)",
    )
    parser.add_argument("--tree", type=Path, default=ROOT, help="perfagent checkout to run")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="perfagent-stress-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERFAGENT_", "OTEL_"))}
    env["PYTHONPATH"] = str(args.tree)
    if args.sanitize:
        print("stress: building the extensions with ASan and UBSan ...", flush=True)
        env.update(sanitized_tree(args.tree, work, halt=not args.ubsan_keep_going))
    port, metrics_port, sink_port = free_port(), free_port(), free_port()
    env.update(
        STRESS_DB=str(work / "stress.db"),
        STRESS_ROUTES=str(args.routes),
        PERFAGENT_CONSOLE_URL=f"http://127.0.0.1:{sink_port}",
        PYTHONUNBUFFERED="1",
    )
    if not args.sanitize:  # (under ASan its own report says more, and the two collide)
        env["PYTHONFAULTHANDLER"] = "1"  # a crash's Python stacks, into the server's output
    sink = subprocess.Popen([sys.executable, str(HERE / "sink.py"), str(sink_port)])
    log = open(work / "server.log", "w+b")  # noqa: SIM115
    argv = [sys.executable, "-m", "perfagent", "run", "--no-console", "--log-format", "json"]
    argv += ["--console-url", env["PERFAGENT_CONSOLE_URL"], "--metrics-port", str(metrics_port)]
    argv += ["--", sys.executable, "-m", "uvicorn", "stress_app:app", "--port", str(port)]
    argv += ["--log-level", "warning", "--timeout-keep-alive", "600"]
    server = subprocess.Popen(
        argv,
        cwd=HERE / "apps",
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    load = Load(port, args)
    began = time.monotonic()
    samples: list[tuple[float, float]] = []
    stopped_for = ""
    start_rss = 0.0
    try:
        wait_listening(port, server, timeout=300)
        worker = next(iter(children(server.pid)), server.pid)
        took = time.monotonic() - began
        print(f"stress: serving on {port} (worker pid {worker}) in {took:.0f} s")
        start_rss = rss_mib(worker)
        clients = [threading.Thread(target=load.client, daemon=True) for _ in range(args.clients)]
        for thread in clients:
            thread.start()
        began = time.monotonic()
        next_report = began + args.report_every
        last_cpu, last_done = cpu_seconds(worker), 0
        while time.monotonic() - began < args.duration:
            time.sleep(1.0)
            now = time.monotonic()
            samples.append((now - began, rss_mib(worker)))
            if server.poll() is not None:
                stopped_for = f"the server exited ({server.returncode})"
                break
            if samples[-1][1] > args.max_rss_mib:
                stopped_for = f"the worker's RSS passed {args.max_rss_mib:.0f} MiB"
                break
            if now >= next_report:
                next_report += args.report_every
                peak = max(r for _t, r in samples)
                with load.lock:
                    done, failed = sum(load.done.values()), sum(load.failed.values())
                cpu = cpu_seconds(worker)
                busy = (cpu - last_cpu) / args.report_every
                stalled = " (no request done: stalled)" if done == last_done else ""
                last_cpu, last_done = cpu, done
                print(
                    f"t={now - began:5.0f}s rss={samples[-1][1]:7.1f} MiB peak={peak:7.1f} MiB "
                    f"requests={done} failed={failed} worker cpu={busy:4.0%}{stalled}",
                    flush=True,
                )
    finally:
        load.stop.set()
        exited = server.poll()
        if exited is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        sink.kill()
        sink.wait()
    log.seek(0)
    output = log.read().decode(errors="replace")
    ubsan = sorted({line for line in output.splitlines() if "runtime error:" in line})
    crash_lines = [
        line
        for line in output.splitlines()
        if any(
            mark in line
            for mark in (
                "Segmentation fault",
                "Fatal Python error",
                "AddressSanitizer",
                "Traceback (most recent call last)",
            )
        )
    ]
    reports = sorted(glob.glob(str(work / "reports" / "*")))
    peak = max((r for _t, r in samples), default=0.0)
    by_minute = {}
    for t, r in samples:
        by_minute[int(t // 60)] = max(r, by_minute.get(int(t // 60), 0.0))
    crashed = exited is not None or bool(crash_lines) or bool(reports) or bool(load.failed)
    crashed = crashed or bool(ubsan)
    print()
    stopped = f", stopped: {stopped_for}" if stopped_for else ""
    print(f"stress: {samples[-1][0] if samples else 0:.0f} s of load{stopped}")
    print(f"stress: requests done {dict(load.done)}")
    print(f"stress: requests failed {dict(load.failed)}")
    for failure in load.failures[:10]:
        print(f"  {failure}")
    print(f"stress: worker RSS at start {start_rss:.1f} MiB, peak {peak:.1f} MiB")
    minutes = ", ".join(f"{m}: {r:.0f}" for m, r in sorted(by_minute.items()))
    print(f"stress: peak RSS per minute (MiB): {minutes}")
    ended = f"exited by itself ({exited})" if exited is not None else "ran to the end"
    print(f"stress: server {ended}")
    print(f"stress: crash lines in the server's output: {len(crash_lines)}")
    for line in crash_lines[:10]:
        print(f"  {line[:300]}")
    fatal = output.find("Current thread")  # faulthandler: the thread that crashed
    if fatal >= 0:
        print(output[fatal : fatal + 2500])
    print(f"stress: UBSan reports (distinct lines): {len(ubsan)}")
    for line in ubsan[:10]:
        print(f"  {line[:300]}")
    print(f"stress: ASan reports: {len(reports)}")
    for report in reports[:3]:
        text = Path(report).read_text(errors="replace")
        print(f"---- {Path(report).name}\n" + "\n".join(text.splitlines()[:40]))
    if crashed:  # what the server wrote, and the reports, kept for a look
        kept = Path(tempfile.gettempdir()) / "perfagent-stress-last"
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir()
        shutil.copy(work / "server.log", kept)
        for report in reports:
            shutil.copy(report, kept)
        print(f"stress: the server's output and the reports kept in {kept}")
    print(f"stress: {'CRASHED' if crashed else 'nothing crashed'}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
