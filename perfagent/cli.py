"""The ``perfagent`` command: run, console, profile."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from perfagent._version import __version__
from perfagent.config import ConfigError, load_settings

_RUN_EPILOG = """\
examples:
  perfagent run -- uvicorn app:app
  perfagent run -- gunicorn -w 4 -k uvicorn.workers.UvicornWorker app:app
  perfagent run --slow-ms 200 -- flask --app app run
  perfagent run --no-console -- python app.py

Every Python process the command starts (workers, reloader children) loads the
agent; /metrics is served once, by perfagent itself, with exact counts across
workers. Settings also come from PERFAGENT_* variables and [tool.perfagent] in
pyproject.toml; the options here win.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perfagent",
        description="A performance agent for Flask, FastAPI and FastHTML apps.",
    )
    parser.add_argument("--version", action="version", version=f"perfagent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a server command with the agent loaded in every process",
        description="Run a Python server command with the agent loaded in every process.",
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="perfagent run [OPTIONS] -- COMMAND...",
    )
    run.add_argument("--no-console", action="store_true", help="do not start the console")
    run.add_argument("--console-url", help="where to send data (default http://127.0.0.1:6060)")
    run.add_argument("--metrics-port", help="port of /metrics, 0 for none (default 9464)")
    run.add_argument("--metrics-host", help="address /metrics binds to (default 127.0.0.1)")
    run.add_argument("--slow-ms", help="a request slower than this is slow (default 500)")
    run.add_argument("--loop-block-ms", help="an event-loop stall longer than this is a block")
    run.add_argument("--nplusone-min", help="repeats of one query shape that make an N+1")
    run.add_argument("--log-format", help="console (default) or json")
    run.add_argument("--service-name", help="service name in traces (default OTEL_SERVICE_NAME)")
    run.add_argument(
        "--no-server-timing",
        dest="server_timing",
        action="store_false",
        default=None,
        help="do not add the Server-Timing response header",
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    console = commands.add_parser(
        "console",
        help="serve the console (OTLP receiver, API and pages)",
        description="Serve the console: an OTLP/HTTP receiver, a JSON API and web pages.",
    )
    console.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    console.add_argument("--port", type=int, default=6060, help="port (default 6060)")
    console.add_argument("--db", default=None, help="SQLite file (default: in the user data dir)")
    console.add_argument(
        "--token", default=None, help="required of every caller (default PERFAGENT_CONSOLE_TOKEN)"
    )
    console.add_argument(
        "--retention-hours", type=float, default=168.0, help="keep data this long (default 168)"
    )
    console.add_argument(
        "--max-mb", type=float, default=512.0, help="largest the database may grow (default 512)"
    )
    console.add_argument(
        "--max-body-mb", type=float, default=8.0, help="largest OTLP payload taken (default 8)"
    )
    console.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the console answers to besides localhost, 127.0.0.1 and [::1] "
        "(repeatable; also PERFAGENT_CONSOLE_ALLOWED_HOSTS, comma-separated)",
    )
    console.add_argument(
        "--docs", action="store_true", help="serve the API docs at /docs, /redoc, /openapi.json"
    )

    dashboards = commands.add_parser(
        "dashboards",
        help="show or copy the Grafana dashboards and Prometheus alert rules",
        description="Print where the Grafana dashboards and Prometheus alert rules shipped "
        "with perfagent are, or copy them into a folder.",
    )
    dashboards.add_argument("--out", metavar="DIR", help="copy the files into DIR")

    profile = commands.add_parser(
        "profile",
        help="profile a running process with py-spy",
        description="Record a profile of a running Python process with py-spy.",
    )
    profile.add_argument("--pid", type=int, required=True, help="process to profile")
    profile.add_argument("--duration", type=int, default=10, help="seconds (default 10)")
    profile.add_argument("-o", "--output", required=True, help="file to write")
    profile.add_argument(
        "--format",
        choices=("flamegraph", "speedscope", "raw"),
        default="flamegraph",
        help="flamegraph (SVG, default), speedscope (JSON) or raw (collapsed stacks)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "run":
        return _run(parser, args)
    if args.command == "console":
        from perfagent.console import NOT_INSTALLED, missing

        if missing() is not None:
            sys.stderr.write(f"perfagent: {NOT_INSTALLED}\n")
            return 2
        from perfagent.console.server import serve

        return serve(
            host=args.host,
            port=args.port,
            db=args.db,
            token=args.token,
            retention_hours=args.retention_hours,
            max_mb=args.max_mb,
            max_body_mb=args.max_body_mb,
            allowed_hosts=args.allowed_host,
            docs=args.docs,
        )
    if args.command == "dashboards":
        from perfagent.dashboards_cmd import main as dashboards_main

        return dashboards_main(args.out)
    if args.command == "profile":
        from perfagent.profiling.pyspy import profile_pid

        return profile_pid(args.pid, args.duration, args.output, args.format)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from perfagent.runner import run

    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("run: give the server command after --, e.g. perfagent run -- uvicorn app:app")
    options = {
        key: getattr(args, key)
        for key in (
            "console_url",
            "metrics_port",
            "metrics_host",
            "slow_ms",
            "loop_block_ms",
            "nplusone_min",
            "log_format",
            "service_name",
            "server_timing",
        )
    }
    try:
        settings = load_settings(options)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    return run(command, settings, console=not args.no_console)
