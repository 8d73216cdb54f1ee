"""The Grafana dashboards and Prometheus rules: well formed, and every query answers for real.

The structural checks catch what breaks an import or a panel (no unit, a
hard-coded datasource, a duplicate id, an exact matcher on an "All"
variable). The end-to-end test runs Debian's ``prometheus`` against an app
under ``perfagent run`` with two workers and evaluates every panel query and
every alert expression through Prometheus's HTTP API, so a renamed metric, a
missing label or a wrong ``le`` shows up as an empty result.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from helpers import PERFAGENT, ROOT, clean_env, free_port

GRAFANA = ROOT / "perfagent" / "grafana"
DASHBOARD_FILES = sorted(GRAFANA.glob("*.json"))
ALERTS = GRAFANA / "alerts.yml"
VARIABLES = ("job", "instance", "route", "method")
BUILTINS = {"__rate_interval": "1m", "__range": "5m", "__interval": "15s"}
# `${1}` is label_replace's capture group, not a Grafana variable.
KNOWN_NAMES = {*VARIABLES, *BUILTINS, "1"}
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _targets(board: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel in board["panels"] for target in panel.get("targets", [])]


def dashboard_problems(board: dict[str, Any]) -> list[str]:
    """Everything that would make the dashboard fail to import or show a panel badly."""
    problems = []
    if not isinstance(board.get("schemaVersion"), int) or board["schemaVersion"] < 36:
        problems.append("schemaVersion missing or older than Grafana 9")
    for key in ("uid", "title", "description"):
        if not board.get(key):
            problems.append(f"no {key}")
    inputs = {(i.get("name"), i.get("pluginId")) for i in board.get("__inputs", [])}
    if ("DS_PROMETHEUS", "prometheus") not in inputs:
        problems.append("__inputs has no DS_PROMETHEUS prometheus datasource")
    requires = {(r.get("type"), r.get("id")) for r in board.get("__requires", [])}
    for needed in (("grafana", "grafana"), ("datasource", "prometheus")):
        if needed not in requires:
            problems.append(f"__requires lacks {needed}")
    variables = {v.get("name"): v for v in board.get("templating", {}).get("list", [])}
    source = variables.get("datasource", {})
    if source.get("type") != "datasource" or source.get("query") != "prometheus":
        problems.append("no datasource variable of type prometheus")
    for name in VARIABLES:
        var = variables.get(name)
        if var is None:
            problems.append(f"no {name} variable")
            continue
        if not (var.get("includeAll") and var.get("allValue") == ".*"):
            problems.append(f"variable {name}: no All option matching .*")
        if var.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"variable {name} does not use ${{datasource}}")
        if not str(var.get("definition", "")).startswith("label_values("):
            problems.append(f"variable {name} is not a label_values query")
    if "http_route)" not in variables.get("route", {}).get("definition", ""):
        problems.append("route variable does not list http_route")
    ids = [panel.get("id") for panel in board.get("panels", [])]
    if len(ids) != len(set(ids)) or not all(isinstance(i, int) for i in ids):
        problems.append(f"panel ids not unique integers: {ids}")
    for panel in board.get("panels", []):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        for key in ("title", "description"):
            if not panel.get(key):
                problems.append(f"{where}: no {key}")
        if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{where}: no unit")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{where}: datasource is not ${{datasource}}")
        if not panel.get("targets"):
            problems.append(f"{where}: no query")
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"{where}: a query's datasource is not ${{datasource}}")
            if target.get("exemplar"):
                problems.append(f"{where}: exemplars on, but the agent emits none")
            expr = target.get("expr", "")
            for match in VARIABLE.finditer(expr):
                if (match.group(1) or match.group(2)) not in KNOWN_NAMES:
                    problems.append(f"{where}: unknown variable {match.group(0)}")
            for name in VARIABLES:  # "All" and multi-value selections are regexes
                if re.search(rf'(?<![=!])=\s*"\$\{{?{name}\b', expr):
                    problems.append(f"{where}: ${name} used with = instead of =~")
    return problems


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=[p.name for p in DASHBOARD_FILES])
def test_dashboard_structure(path):
    assert dashboard_problems(_load(path)) == []


def test_three_dashboards_with_unique_uids():
    names = {p.name for p in DASHBOARD_FILES}
    assert names == {"perfagent-overview.json", "perfagent-route.json", "perfagent-async.json"}
    uids = [_load(p)["uid"] for p in DASHBOARD_FILES]
    assert len(set(uids)) == len(uids)


def _break(board: dict[str, Any], how: str) -> None:
    panel = board["panels"][1]
    if how == "duplicate id":
        panel["id"] = board["panels"][0]["id"]
    elif how == "no unit":
        del panel["fieldConfig"]["defaults"]["unit"]
    elif how == "no description":
        panel["description"] = ""
    elif how == "hard-coded datasource":
        panel["targets"][0]["datasource"] = {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}
    elif how == "no datasource variable":
        board["templating"]["list"] = board["templating"]["list"][1:]
    elif how == "no inputs":
        del board["__inputs"]
    elif how == "exact matcher":
        panel["targets"][0]["expr"] = 'sum(rate(x{job="$job"}[5m]))'
    elif how == "unknown variable":
        panel["targets"][0]["expr"] = 'sum(rate(x{service=~"$service"}[5m]))'
    elif how == "old schema":
        board["schemaVersion"] = 16


BREAKAGES = [
    "duplicate id",
    "no unit",
    "no description",
    "hard-coded datasource",
    "no datasource variable",
    "no inputs",
    "exact matcher",
    "unknown variable",
    "old schema",
]


@pytest.mark.parametrize("how", BREAKAGES)
def test_structure_check_fails_on_a_broken_dashboard(how):
    board = copy.deepcopy(_load(GRAFANA / "perfagent-overview.json"))
    _break(board, how)
    assert dashboard_problems(board), f"a dashboard with {how} passed the check"


def test_dashboards_match_their_generator():
    """The JSON files are written by dashboards/generate.py; an edit by hand would be lost."""
    spec = importlib.util.spec_from_file_location("generate", ROOT / "dashboards" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for name, board in generate.build().items():
        assert (GRAFANA / name).read_text() == generate.render(board), (
            f"{name} is stale: run python3 dashboards/generate.py"
        )


# -- promtool -------------------------------------------------------------------------


#: Debian's prometheus package gives both programs; without it these tests skip, naming it.
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (apt-get install prometheus)",
)
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None and not Path("/usr/bin/prometheus").exists(),
    reason="prometheus is not installed (apt-get install prometheus)",
)


def _promtool(*args: str) -> None:
    promtool = shutil.which("promtool")
    done = subprocess.run(
        [promtool, *args], cwd=GRAFANA, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_check_rules():
    _promtool("check", "rules", "alerts.yml")


@needs_promtool
def test_promtool_test_rules():
    _promtool("test", "rules", "alerts.test.yml")


@needs_promtool
def test_promtool_check_config():
    _promtool("check", "config", "prometheus.yml")


@needs_promtool
def test_scale_out_prometheus_config():
    _promtool("check", "config", str(ROOT / "examples" / "scale-out" / "prometheus.yml"))


# -- perfagent dashboards ------------------------------------------------------------


def test_dashboards_command_prints_the_folder():
    done = subprocess.run([*PERFAGENT, "dashboards"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.splitlines()[0])
    assert (folder / "perfagent-overview.json").is_file()
    assert (folder / "alerts.yml").is_file()


def test_dashboards_command_copies_valid_files(tmp_path):
    out = tmp_path / "new" / "folder"
    done = subprocess.run(
        [*PERFAGENT, "dashboards", "--out", str(out)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    copied = {p.name for p in out.iterdir()}
    assert {p.name for p in DASHBOARD_FILES} | {"alerts.yml", "prometheus.yml"} <= copied
    for path in out.glob("*.json"):
        assert dashboard_problems(json.loads(path.read_text())) == [], path.name
    rules = yaml.safe_load((out / "alerts.yml").read_text())
    assert len(rules["groups"][0]["rules"]) == 6
    assert yaml.safe_load((out / "prometheus.yml").read_text())["scrape_configs"]


def test_dashboards_command_reports_an_unwritable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run(
        [*PERFAGENT, "dashboards", "--out", str(blocker / "sub")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("perfagent: cannot copy the dashboards to")


# -- the real thing: Prometheus scraping an app under perfagent run --------------------


def _grafana_regex(value: str) -> str:
    """A variable's value as Grafana puts it in a Prometheus regex matcher (escaped)."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variables and built-ins replaced; anything else (``${1}``) left alone."""
    names = {**BUILTINS, **values}

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return names.get(name, match.group(0))

    return VARIABLE.sub(replace, expr)


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = requests.get(f"{self.base}/api/v1/query", params={"query": expr}, timeout=10)
        body = reply.json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        reply = requests.get(
            f"{self.base}/api/v1/label/{label}/values", params={"match[]": match}, timeout=10
        )
        return reply.json()["data"]

    def total_requests(self) -> int:
        result = self.query("sum(http_server_request_duration_seconds_count)")
        return int(float(result[0]["value"][1])) if result else 0

    def wait_total(self, expected: int, timeout: float = 20.0) -> None:
        """Until Prometheus has scraped ``expected`` requests (more fails at once)."""
        seen = -1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.total_requests()
            if seen >= expected:
                break
            time.sleep(0.25)
        assert seen == expected, f"Prometheus counted {seen} requests, the test sent {expected}"

    def wait(self, condition: Any, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"Prometheus: {what} not seen within {timeout}s")


def _start_prometheus(servers, tmp_path: Path, metrics_port: int) -> Prometheus:
    port = free_port()
    target = {"targets": [f"127.0.0.1:{metrics_port}"]}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "perfagent", "static_configs": [target]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    argv = [
        binary,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    server = servers(argv, port, clean_env(), cwd=tmp_path)
    server.wait_listening()
    prometheus = Prometheus(port)
    prometheus.wait(
        lambda: requests.get(f"{prometheus.base}/-/ready", timeout=2).ok, "readiness", 30
    )
    return prometheus


ORDERS = range(1, 41)  # even: slow and blocking; multiple of 5: a 500
ROUTE = "/orders/{order_id}"


def _send(base: str, paths: list[str]) -> int:
    for path in paths:
        # A new connection each time, so requests spread over the two workers.
        status = requests.get(base + path, timeout=30).status_code
        order = int(path.rsplit("/", 1)[1]) if path.startswith("/orders/") else 1
        assert status == (500 if order % 5 == 0 else 200), (path, status)
    return len(paths)


def _panel_queries() -> list[tuple[str, str]]:
    return [
        (f"{path.name} #{panel['id']} {panel['title']}", target["expr"])
        for path in DASHBOARD_FILES
        for panel, target in _targets(_load(path))
    ]


def _rule_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(f"alert {rule['alert']}", rule["expr"]) for g in groups for rule in g["rules"]]


@needs_prometheus
def test_every_query_answers_against_a_real_prometheus(servers, tmp_path):
    if not shutil.which("prometheus") and not Path("/usr/bin/prometheus").exists():
        pytest.fail("prometheus not found: install Debian's prometheus package")
    port, metrics_port, dead = free_port(), free_port(), free_port()
    argv = [*PERFAGENT, "run", "--no-console", "--metrics-port", str(metrics_port)]
    # Nothing listens at the console URL, so the kept traces are dropped and counted.
    argv += ["--console-url", f"http://127.0.0.1:{dead}", "--slow-ms", "250"]
    # JSON logs, as a deployment that ships its logs would run.
    argv += ["--log-format", "json", "--"]
    argv += ["uvicorn", "dash_app:app", "--port", str(port), "--workers", "2"]
    app = servers(argv, port, clean_env())
    app.wait_listening()
    prometheus = _start_prometheus(servers, tmp_path, metrics_port)
    prometheus.wait(lambda: prometheus.query('up{job="perfagent"} == 1'), "the app's /metrics")

    # Phase 1 creates every series (and arms the loop watchdogs); phase 2 runs once
    # Prometheus has them, so rate() and increase() see the rise, not only a first value.
    paths = ["/ok"] * 4 + [f"/orders/{n}" for n in ORDERS]
    sent = _send(app.base, paths[:10])
    prometheus.wait_total(sent)
    sent += _send(app.base, paths[10:])
    prometheus.wait_total(sent)
    time.sleep(2.5)  # two more scrapes: anything counted twice would show up now
    assert prometheus.total_requests() == sent

    # On a healthy app some of these are empty: the alert expressions (they return
    # only what breaks an objective) and the 5xx panels. This app breaks every
    # objective on purpose (20 % errors, p95 and Apdex of /orders/{order_id} over
    # target, an N+1 in every order, event-loop blocks, a console that is down so
    # spans are dropped), so no query is excused from returning data.
    everything = {name: ".*" for name in VARIABLES}
    concrete = {
        "job": _grafana_regex("perfagent"),
        "instance": _grafana_regex(f"127.0.0.1:{metrics_port}"),
        "route": _grafana_regex(ROUTE),
        "method": "GET",
    }
    queries = [
        (f"{name} [{label}]", substitute(expr, values))
        for label, values in (("All", everything), ("one route", concrete))
        for name, expr in _panel_queries()
    ]
    queries += _rule_queries()
    assert len(queries) > 60
    empty = _empty_queries(prometheus, queries)
    assert empty == [], "\n".join(empty) + "\n" + app.output()[-2000:]

    for path in DASHBOARD_FILES:  # the variables' own queries list values
        for var in _load(path)["templating"]["list"][1:]:
            found = re.fullmatch(r"label_values\((.*), (\w+)\)", var["definition"])
            values = prometheus.label_values(found[2], substitute(found[1], everything))
            assert values, (path.name, var["name"])
    routes = prometheus.label_values("http_route", "http_server_request_duration_seconds_count")
    assert ROUTE in routes

    rules = requests.get(f"{prometheus.base}/api/v1/rules", timeout=10).json()
    health = {r["name"]: r["health"] for g in rules["data"]["groups"] for r in g["rules"]}
    assert len(health) == 6
    assert set(health.values()) <= {"ok", "unknown"}, health


def _empty_queries(prometheus: Prometheus, queries: list[tuple[str, str]]) -> list[str]:
    """The queries with no result, retried for a few seconds (a block is counted late)."""
    deadline = time.monotonic() + 10
    while True:
        empty = [f"{name}: {expr}" for name, expr in queries if not prometheus.query(expr)]
        if not empty or time.monotonic() > deadline:
            return empty
        time.sleep(1)
