"""``perfagent dashboards [--out DIR]``: where the Grafana dashboards and alert rules are.

They ship inside the package (``perfagent/grafana/``) so that people who
installed a wheel, with no checkout of the repository, can still import them
into Grafana or load the rules into Prometheus: the command prints the folder,
or copies the files to one of their choosing.
"""

from __future__ import annotations

import shutil
import sys
from importlib.resources import as_file, files
from pathlib import Path

#: What ``--out`` copies: the dashboards to import, the rules and their tests,
#: and the scrape config that loads the rules.
PATTERNS = ("*.json", "alerts.yml", "alerts.test.yml", "prometheus.yml")


def shipped_files() -> list[Path]:
    """The dashboard and rule files of the installed package, dashboards first."""
    with as_file(files("perfagent") / "grafana") as folder:
        found: list[Path] = []
        for pattern in PATTERNS:
            found.extend(sorted(Path(folder).glob(pattern)))
        return found


def main(out: str | None) -> int:
    """Prints the files' folder, or copies them into ``out`` (created if missing)."""
    sources = shipped_files()
    if not sources:
        sys.stderr.write("perfagent: the dashboards are missing from this installation\n")
        return 1
    if out is None:
        print(sources[0].parent)
        for path in sources:
            print(f"  {path.name}")
        print("Import the .json files in Grafana (Dashboards > New > Import);")
        print("load alerts.yml with rule_files in prometheus.yml (see prometheus.yml).")
        return 0
    target = Path(out)
    try:
        target.mkdir(parents=True, exist_ok=True)
        for path in sources:
            shutil.copyfile(path, target / path.name)
    except OSError as exc:
        sys.stderr.write(f"perfagent: cannot copy the dashboards to {out}: {exc.strerror}\n")
        return 1
    for path in sources:
        print(target / path.name)
    return 0
