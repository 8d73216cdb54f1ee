"""The service's name when the user gave none: the app they would recognise.

Without ``OTEL_SERVICE_NAME`` (or ``service.name``, or ``service_name``) every
app was ``unknown_service:python``, and several apps sending to one console
mixed. The name comes, in this order, from the server command's app
(``uvicorn blog.main:app`` -> ``blog.main``; gunicorn and hypercorn alike;
``fastapi run app.py`` -> ``app``; ``flask --app blog run`` or ``FLASK_APP``
-> ``blog``), then a Flask app's ``import_name`` (given to ``init(app)``), then
the working folder's name. It is read from ``sys.argv`` of the process itself,
so a worker of a pre-fork server names itself as its master would.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

#: ``module:attribute`` (``blog.main:app``, ``app:create_app()``), not ``host:port``.
_APP_SPEC = re.compile(r"^([A-Za-z_][\w.]*):[A-Za-z_]\w*(\(.*\))?$")
#: Options of the servers whose value could look like an app (``-b unix:sock``).
_TAKES_VALUE = frozenset(("-b", "--bind", "--uds", "--host", "-k", "--worker-class"))
_SERVERS = frozenset(("uvicorn", "gunicorn", "hypercorn"))


def _program(argv: Sequence[str]) -> tuple[str, list[str]]:
    """The program's name (``uvicorn``) and its arguments, seen through ``python -m``."""
    if not argv:
        return "", []
    first = argv[0]
    name = os.path.basename(first)
    if name == "__main__.py":  # python -m uvicorn, as sys.argv shows it
        name = os.path.basename(os.path.dirname(first))
    elif name.startswith("python") and len(argv) > 2 and argv[1] == "-m":
        return argv[2], list(argv[3:])
    return name, list(argv[1:])


def _module_of_path(path: str) -> str:
    """``app.py`` -> ``app``; ``blog/main.py`` -> ``blog.main``."""
    parts = Path(path).with_suffix("").parts
    if not parts or Path(path).is_absolute() or ".." in parts:
        return Path(path).stem
    return ".".join(p for p in parts if p != ".")


def from_command(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The app's module named by a server command line, or None."""
    program, args = _program(argv)
    if program in _SERVERS:
        previous = ""
        for arg in args:
            match = _APP_SPEC.match(arg)
            if match and previous not in _TAKES_VALUE:
                return match.group(1)
            previous = arg
        return None
    if program == "fastapi":
        paths = [a for a in args if a.endswith(".py")]
        return _module_of_path(paths[0]) if paths else None
    if program == "flask":
        for i, arg in enumerate(args):
            if arg.startswith("--app="):
                value = arg[len("--app=") :]
            elif arg in ("--app", "-A") and i + 1 < len(args):
                value = args[i + 1]
            else:
                continue
            return _flask_app(value)
        if environ.get("FLASK_APP"):
            return _flask_app(environ["FLASK_APP"])
    return None


def _flask_app(value: str) -> str:
    """``--app blog:create_app()`` -> ``blog``; ``--app examples/flask_app.py`` ->
    ``flask_app``, the module Flask imports from that file."""
    module = value.split(":", 1)[0]
    if "/" in module or module.endswith(".py"):
        return Path(module).stem
    return module


def infer(
    argv: Sequence[str],
    environ: Mapping[str, str],
    app_name: str | None = None,
    cwd: str | None = None,
) -> str:
    """The inferred name: the command's app, else ``app_name``, else the folder's name."""
    named = from_command(argv, environ)
    if named:
        return named
    if app_name and app_name != "__main__":
        return app_name
    return os.path.basename(os.path.abspath(cwd or os.getcwd())) or "unknown_service:python"
