"""Settings: sources, precedence, and one clear line for every bad value."""

from __future__ import annotations

import pytest

from perfagent.config import ConfigError, Settings, load_settings, settings_to_environ


def test_defaults_match_the_contract(tmp_path):
    settings = load_settings(environ={}, cwd=tmp_path)
    assert settings == Settings()
    assert (settings.console_url, settings.metrics_port, settings.slow_ms) == (
        "http://127.0.0.1:6060",
        9464,
        500.0,
    )
    assert (settings.loop_block_ms, settings.nplusone_min, settings.log_format) == (
        100.0,
        5,
        "console",
    )


def test_precedence_defaults_pyproject_environment_keywords(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        "[tool.perfagent]\nslow_ms = 200\nnplusone_min = 7\nlog_format = 'json'\n"
    )
    nested = tmp_path / "src" / "app"
    nested.mkdir(parents=True)
    environ = {"PERFAGENT_SLOW_MS": "300", "PERFAGENT_NPLUSONE_MIN": "8"}
    settings = load_settings({"slow_ms": 400}, environ=environ, cwd=nested)
    assert settings.slow_ms == 400  # keyword beats environment
    assert settings.nplusone_min == 8  # environment beats pyproject
    assert settings.log_format == "json"  # pyproject beats default, found from a subfolder


def test_otel_service_name_is_honoured(tmp_path):
    environ = {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=shop"}
    assert load_settings(environ=environ, cwd=tmp_path).service_name == "shop"
    environ["OTEL_SERVICE_NAME"] = "checkout"
    assert load_settings(environ=environ, cwd=tmp_path).service_name == "checkout"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PERFAGENT_SLOW_MS", "abc"),
        ("PERFAGENT_SLOW_MS", "-5"),
        ("PERFAGENT_METRICS_PORT", "70000"),
        ("PERFAGENT_ENABLED", "maybe"),
        ("PERFAGENT_LOG_FORMAT", "xml"),
        ("PERFAGENT_CONSOLE_URL", "ftp://x"),
        ("PERFAGENT_NPLUSONE_MIN", "1.5"),
        ("PERFAGENT_TRACE_SAMPLE", "2"),
        ("PERFAGENT_FINGERPRINT_CACHE_BYTES", "4MB"),
        ("PERFAGENT_FINGERPRINT_CACHE_BYTES", "1000"),
        ("PERFAGENT_MAX_CALLS_PER_REQUEST", "0"),
        ("PERFAGENT_MAX_CALLS_PER_REQUEST", "many"),
        ("PERFAGENT_MAX_EXPORT_BYTES", "1000"),
        ("PERFAGENT_METRICS_FLUSH_S", "0"),
    ],
)
def test_bad_environment_value_is_one_line_naming_it(tmp_path, variable, value):
    with pytest.raises(ConfigError) as error:
        load_settings(environ={variable: value}, cwd=tmp_path)
    message = str(error.value)
    assert variable in message and repr(value) in message and "\n" not in message


def test_bad_pyproject_value_and_unknown_key_name_the_file(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.perfagent]\nslow_ms = 'fast'\n")
    with pytest.raises(ConfigError, match=r"\[tool.perfagent\] slow_ms in .*pyproject.toml"):
        load_settings(environ={}, cwd=tmp_path)
    (tmp_path / "pyproject.toml").write_text("[tool.perfagent]\nslow_msec = 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting .*slow_msec"):
        load_settings(environ={}, cwd=tmp_path)


def test_unknown_keyword_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting slowms"):
        load_settings({"slowms": 3}, environ={}, cwd=tmp_path)


def test_settings_round_trip_through_the_environment(tmp_path):
    settings = load_settings({"slow_ms": 250, "server_timing": False}, environ={}, cwd=tmp_path)
    again = load_settings(environ=settings_to_environ(settings), cwd=tmp_path)
    assert again == settings


def test_per_route_slow_thresholds_from_environment_and_pyproject(tmp_path):
    environ = {"PERFAGENT_SLOW_ROUTES": "/report=2000, /export/{id}=5000"}
    settings = load_settings(environ=environ, cwd=tmp_path)
    assert settings.slow_routes == (("/report", 2000.0), ("/export/{id}", 5000.0))
    assert load_settings(environ=settings_to_environ(settings), cwd=tmp_path) == settings
    (tmp_path / "pyproject.toml").write_text('[tool.perfagent.slow_routes]\n"/report" = 1500\n')
    assert load_settings(environ={}, cwd=tmp_path).slow_routes == (("/report", 1500.0),)
    with pytest.raises(ConfigError, match="PERFAGENT_SLOW_ROUTES"):
        load_settings(environ={"PERFAGENT_SLOW_ROUTES": "/report=fast"}, cwd=tmp_path)
