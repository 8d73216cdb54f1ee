"""Reversible patches, and hooks that run when a module is first imported.

Every patch the agent makes is a :class:`Patch`: it keeps the original, marks
the replacement, and ``undo()`` puts the original back. ``perfagent.shutdown()``
undoes them in reverse order, which the tests check after every test.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

_MISSING = object()
MARK = "__perfagent_original__"


class Patch:
    """``setattr(target, name, value)`` that can be undone."""

    __slots__ = ("name", "original", "target", "value")

    def __init__(self, target: Any, name: str, value: Any) -> None:
        self.target = target
        self.name = name
        self.value = value
        # Read from the object's own __dict__ so undo restores "inherited" faithfully.
        own = getattr(target, "__dict__", {})
        self.original = own.get(name, _MISSING)
        try:
            setattr(value, MARK, getattr(target, name, None))
        except (AttributeError, TypeError):
            pass
        setattr(target, name, value)

    def undo(self) -> None:
        if getattr(self.target, "__dict__", {}).get(self.name, _MISSING) is not self.value:
            return  # someone patched over us; leave theirs in place
        if self.original is _MISSING:
            delattr(self.target, self.name)
        else:
            setattr(self.target, self.name, self.original)


def is_patched(func: Any) -> bool:
    return hasattr(func, MARK)


class _HookedLoader(importlib.abc.Loader):
    """Runs the real loader, then the hook, so the hook sees the finished module."""

    def __init__(self, loader: Any, hook: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._hook(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ...
        return getattr(self._loader, name)


class PostImportHooks(importlib.abc.MetaPathFinder):
    """Calls ``hooks[name](module)`` right after ``name`` is imported, or now if it is."""

    def __init__(self, hooks: dict[str, Callable[[ModuleType], None]]) -> None:
        self._hooks = dict(hooks)
        self._local = threading.local()

    def install(self) -> None:
        for name, hook in list(self._hooks.items()):
            module = sys.modules.get(name)
            if module is not None:
                del self._hooks[name]
                hook(module)
        if self._hooks:
            sys.meta_path.insert(0, self)

    def remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        hook = self._hooks.get(fullname)
        if hook is None or getattr(self._local, "busy", False):
            return None
        self._local.busy = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._local.busy = False
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        self._hooks.pop(fullname, None)
        spec.loader = _HookedLoader(spec.loader, hook)
        if not self._hooks:
            self.remove()
        return spec
