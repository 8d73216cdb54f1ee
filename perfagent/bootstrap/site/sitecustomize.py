"""Loaded at interpreter start in every process ``perfagent run`` starts.

``perfagent run`` puts this folder (which holds nothing else, so no other
name is shadowed) first on ``PYTHONPATH``, so every Python
process of the server (workers, reloader children) loads the agent before the
app is imported. A ``sitecustomize`` the user already had still runs: it is
found further along ``sys.path`` and executed first, as if we were not here.
"""

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _run_user_sitecustomize() -> None:
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


def _start_agent() -> None:
    try:
        from perfagent.bootstrap import autostart
    except ImportError as exc:
        sys.stderr.write(f"perfagent: not loaded in {sys.executable}: {exc}\n")
        return
    autostart()


_run_user_sitecustomize()
_start_agent()
