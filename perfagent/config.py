"""Settings and where they come from.

Precedence, lowest first: defaults, ``[tool.perfagent]`` in pyproject.toml,
environment (``PERFAGENT_*`` and the standard ``OTEL_*``), then keywords given to
``perfagent.init()`` or options given to ``perfagent run``.

Every value is parsed and checked here, once, at start: a bad value raises
:class:`ConfigError` with one line naming the setting and where it came from, so
no request ever meets a half-configured agent.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting has a value the agent cannot use; the message is one line."""


@dataclass(frozen=True)
class Settings:
    enabled: bool = True
    console_url: str = "http://127.0.0.1:6060"
    metrics_port: int = 9464
    metrics_host: str = "127.0.0.1"
    slow_ms: float = 500.0
    loop_block_ms: float = 100.0
    nplusone_min: int = 5
    log_format: str = "console"
    server_timing: bool = True
    #: The per-query and per-request work in C (perfagent/_speedups.c, _perrequest.c)
    #: where it was built.
    compiled_hooks: bool = True
    trace_sample: float = 0.01
    #: Empty: inferred from the app (see ``perfagent.service_name``).
    service_name: str = ""
    export_interval_s: float = 10.0
    #: With a token, a request sent with ``X-Perfagent-Profile: <token>`` is profiled.
    profile_token: str = ""
    #: Seconds per window when looking for latency regressions per route.
    regression_window_s: float = 60.0
    #: Route template -> its own slow threshold in ms (``/report=2000,/export/{id}=5000``).
    slow_routes: tuple[tuple[str, float], ...] = ()
    #: The SQL fingerprint cache's bound (statement text and shapes, estimated bytes).
    fingerprint_cache_bytes: int = 4 * 1024 * 1024
    #: Calls (queries) of one request kept in full: each holds its statement, parameters
    #: and call site until the request ends (200,000 queries in one request took a
    #: worker from 47 to 281 MiB). Past it a call is only counted: in the query count,
    #: the database histogram and the request's db time, not in spans or findings.
    max_calls_per_request: int = 2000
    #: Bytes of one OTLP request of spans: a collector refuses a larger one and every
    #: trace in it; a trace larger alone is cut to its first spans (counted).
    max_export_bytes: int = 4 * 1024 * 1024
    #: Seconds between merges of the recorded requests into the metrics while requests
    #: finish: what a worker killed with SIGKILL can lose (stats.py).
    metrics_flush_s: float = 0.1


def _parse_bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _number(low: float, high: float, *, integer: bool, unit: str) -> Callable[[Any], Any]:
    def parse(text: Any) -> Any:
        if isinstance(text, bool):
            raise ValueError(f"expected {unit}")
        try:
            value = int(str(text).strip()) if integer else float(str(text).strip())
        except ValueError:
            raise ValueError(f"expected {unit}") from None
        if not low <= value <= high or value != value:
            raise ValueError(f"expected {unit} between {low:g} and {high:g}")
        return value

    return parse


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(text: Any) -> str:
        value = str(text).strip().lower()
        if value not in allowed:
            raise ValueError("expected one of " + ", ".join(allowed))
        return value

    return parse


def _http_url(text: Any) -> str:
    value = str(text).strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("expected an http:// or https:// URL with a valid port") from None
    return value


def _host(text: Any) -> str:
    value = str(text).strip()
    if not value or any(c.isspace() for c in value):
        raise ValueError("expected a host name or IP address")
    return value


def _token(text: Any) -> str:
    value = str(text).strip()
    if value and (len(value) < 16 or any(c.isspace() or not c.isprintable() for c in value)):
        raise ValueError("expected at least 16 printable characters without spaces")
    return value


def _route_thresholds(value: Any) -> tuple[tuple[str, float], ...]:
    """``{"/report": 2000}`` (pyproject) or ``/report=2000,/export/{id}=5000`` (environment)."""
    if isinstance(value, dict):
        pairs = list(value.items())
    else:
        pairs = []
        for item in str(value).split(","):
            if item.strip():
                route, sep, ms = item.rpartition("=")
                if not sep or not route.strip():
                    raise ValueError("expected ROUTE=MS pairs separated by commas")
                pairs.append((route.strip(), ms))
    parse_ms = _number(1, 86_400_000, integer=False, unit="milliseconds per route")
    return tuple((str(route), parse_ms(ms)) for route, ms in pairs)


def _name(text: Any) -> str:
    value = str(text).strip()
    if not value:
        raise ValueError("expected a non-empty name")
    return value


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "enabled": _parse_bool,
    "console_url": _http_url,
    "metrics_port": _number(0, 65535, integer=True, unit="a port number (0 turns /metrics off)"),
    "metrics_host": _host,
    "slow_ms": _number(1, 86_400_000, integer=False, unit="milliseconds"),
    "loop_block_ms": _number(1, 86_400_000, integer=False, unit="milliseconds"),
    "nplusone_min": _number(2, 1_000_000, integer=True, unit="a whole number of queries"),
    "log_format": _choice("console", "json"),
    "server_timing": _parse_bool,
    "compiled_hooks": _parse_bool,
    "trace_sample": _number(0, 1, integer=False, unit="a fraction"),
    "service_name": _name,
    "export_interval_s": _number(0.1, 3600, integer=False, unit="seconds"),
    "profile_token": _token,
    "slow_routes": _route_thresholds,
    "regression_window_s": _number(1, 86400, integer=False, unit="seconds"),
    "fingerprint_cache_bytes": _number(65536, 1 << 34, integer=True, unit="bytes"),
    "max_calls_per_request": _number(1, 10_000_000, integer=True, unit="a number of calls"),
    "max_export_bytes": _number(65_536, 1 << 30, integer=True, unit="bytes"),
    "metrics_flush_s": _number(0.01, 60, integer=False, unit="seconds"),
}
SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Settings))


def env_name(key: str) -> str:
    return "PERFAGENT_" + key.upper()


def _find_pyproject(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _from_pyproject(start: Path) -> tuple[dict[str, Any], str]:
    path = _find_pyproject(start)
    if path is None:
        return {}, ""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"perfagent: cannot read {path}: {exc}") from None
    table = data.get("tool", {}).get("perfagent", {})
    if not isinstance(table, dict):
        raise ConfigError(f"perfagent: [tool.perfagent] in {path} must be a table")
    return table, str(path)


def _otel_service_name(environ: Mapping[str, str]) -> str | None:
    if environ.get("OTEL_SERVICE_NAME", "").strip():
        return environ["OTEL_SERVICE_NAME"].strip()
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "service.name" and value.strip():
            return value.strip()
    return None


def _apply(
    values: dict[str, Any], source: Mapping[str, Any], describe: Callable[[str], str]
) -> None:
    for key, raw in source.items():
        if key not in _PARSERS:
            raise ConfigError(f"perfagent: unknown setting {describe(key)}")
        try:
            values[key] = _PARSERS[key](raw)
        except ValueError as exc:
            raise ConfigError(f"perfagent: {describe(key)}={raw!r} is not valid: {exc}") from None


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Build the settings from every source, checking each value once."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}

    table, pyproject = _from_pyproject(cwd or Path.cwd())
    _apply(values, table, lambda key: f"[tool.perfagent] {key} in {pyproject}")

    service = _otel_service_name(environ)
    if service is not None:
        values["service_name"] = service
    from_env = {key: environ[env_name(key)] for key in SETTING_NAMES if env_name(key) in environ}
    _apply(values, from_env, env_name)

    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    _apply(values, given, lambda key: key)
    settings = replace(Settings(), **values)
    _check_otel(environ, settings)
    if not environ.get("PERFAGENT_RUNNER"):  # the runner already warned, once for the run
        for line in unknown_variables(environ):
            if line not in _warned:
                _warned.add(line)
                sys.stderr.write(line + "\n")
    return settings


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """Raises ConfigError for a bad keyword of ``init()``, reading no other source.

    ``init(app, ...)`` again (an app factory run once per test) only checks its
    keywords: the settings in force were read from every source by the first call,
    and reading pyproject.toml and the environment again cost ~0.7 ms a call.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    _apply({}, given, lambda key: key)


#: ``PERFAGENT_*`` variables read outside the settings (by the console and the runner).
OTHER_VARIABLES = ("PERFAGENT_CONSOLE_TOKEN", "PERFAGENT_RUNNER")
_warned: set[str] = set()


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning line per ``PERFAGENT_*`` variable the agent does not know, naming
    the nearest known one: a misspelt setting would otherwise be ignored in silence."""
    import difflib

    known = [env_name(key) for key in SETTING_NAMES] + list(OTHER_VARIABLES)
    lines = []
    for name in sorted(environ):
        if name.startswith("PERFAGENT_") and name not in known:
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else ""
            lines.append(f"perfagent: unknown variable {name} is ignored{hint}")
    return lines


_PROTOCOL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
)


def _check_otel(environ: Mapping[str, str], settings: Settings) -> None:
    """The standard OTEL_* variables the agent honours are checked at start too."""
    from perfagent.tracecontext import Sampler

    try:
        Sampler.from_environment(settings.trace_sample, environ)
    except ValueError as exc:
        name = environ.get("OTEL_TRACES_SAMPLER", "")
        raise ConfigError(f"perfagent: OTEL_TRACES_SAMPLER={name!r} is not valid: {exc}") from None
    for variable in _PROTOCOL_VARIABLES:
        value = environ.get(variable, "").strip().lower()
        if value and value not in ("http/protobuf", "http/json"):
            raise ConfigError(
                f"perfagent: {variable}={environ[variable]!r} is not supported: perfagent sends "
                "OTLP over HTTP (protobuf); set http/protobuf and the collector's HTTP port (4318)"
            )
    for variable in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
    ):
        value = environ.get(variable, "").strip()
        if value:
            try:
                _http_url(value)
            except ValueError as exc:
                raise ConfigError(f"perfagent: {variable}={value!r} is not valid: {exc}") from None


def settings_to_environ(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process load these same settings."""
    out: dict[str, str] = {}
    for key in SETTING_NAMES:
        value = getattr(settings, key)
        if key == "service_name" and not value:
            continue  # each process infers it from its own command line
        if isinstance(value, bool):
            out[env_name(key)] = "1" if value else "0"
        elif isinstance(value, tuple):
            out[env_name(key)] = ",".join(f"{route}={ms:g}" for route, ms in value)
        else:
            out[env_name(key)] = str(value)
    return out
