"""Where in the application's own code a query came from.

A frame is the application's when its file is outside the standard library,
outside site-/dist-packages and outside perfagent; the answer is cached per
code object, so walking a stack costs a dict lookup per frame.

Every cache here is keyed by ``id(code)``, never by the code object: hashing a
code object hashes its bytecode, names and constants (nested code objects
included) on every lookup, 0.26 µs for a small view and 2.9 µs for FastAPI's
request handler, measured here, against 0.14 µs for its id. Each entry holds
its code object, so the id cannot be reused while the entry lives.

At query time the few innermost application frames are captured as
(code, instruction offset, line). The line reported for a repeated query is
the innermost of them that sits inside a loop (a ``for``/``while`` body or a
comprehension, read once per code object from its bytecode): the loop is what
issued the repeats, so a query made in a helper called from a view's loop is
reported at the view's loop line. Without a loop, the innermost app frame.

SQLAlchemy's asyncio layer runs the driver in a greenlet whose stack does not
reach the app's coroutine; there the running task's chain of awaiting
coroutines is walked instead. Drivers that run queries on a thread of their
own (aiosqlite) hand the caller's frames over in ``origin``; a task the app
made (``asyncio.gather``) carries its maker's in ``spawned`` (db/tasks.py).

A Jinja template's compiled code is the app's (when its file is, and for a
string template): its sites carry the template's own line, not the compiled
module's (``_template_line``).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from contextvars import ContextVar
from types import CodeType, FrameType
from typing import Any

from perfagent.db.loops import loop_ranges

Site = tuple[CodeType, int, int]  # code, instruction offset, line
#: id(code) -> (code, what is known of it): the code is held so its id stays its own.
ByCode = dict[int, tuple[CodeType, Any]]

#: App frames of the code that handed a query to another thread (aiosqlite runs
#: sqlite3 on a thread of its own): used when that thread's stack has none.
origin: ContextVar[tuple[Site, ...] | None] = ContextVar("perfagent.db_origin", default=None)
#: App frames of the code that made the running task (AppFrames.spawn), set in the
#: task's own context: where a walk that found no loop in the task goes on.
spawned: ContextVar[tuple[Site, ...] | None] = ContextVar("perfagent.db_spawned", default=None)
MAX_FRAMES = 4
_CODES_MAX = 16_384  # code objects remembered per cache
_LIBRARY_BUDGET = 8
_APP, _LIBRARY, _LAZY_LOAD, _TEMPLATE = 1, 0, 2, 3
_SITE_KINDS = (_APP, _TEMPLATE)  # the code whose lines are call sites


def _library_roots() -> tuple[str, ...]:
    """Folders whose files are not the application's: perfagent, the stdlib, packages,
    and the installed packages' scripts (``bin/uvicorn``, ``bin/gunicorn``: a stack
    sampled while the loop idles starts in one, which is no app line)."""
    roots = {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}  # perfagent itself
    paths = sysconfig.get_paths()
    folders = [paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib", "scripts")]
    try:  # pip install --user puts scripts there
        folders.append(sysconfig.get_path("scripts", f"{os.name}_user"))
    except KeyError:
        pass
    for folder in folders:
        if folder:
            roots.add(os.path.realpath(folder))
            roots.add(os.path.abspath(folder))
    for entry in sys.path:
        if entry.endswith(("site-packages", "dist-packages")):
            roots.add(os.path.realpath(entry))
            roots.add(os.path.abspath(entry))
    return tuple(sorted((root + os.sep for root in roots), key=len, reverse=True))


class AppFrames:
    """The one place that tells the app's own code from the rest (db capture, sampler, watchdog)."""

    def __init__(self) -> None:
        self._roots = _library_roots()
        self._agent_root = os.path.dirname(os.path.abspath(__file__)).rsplit(os.sep, 1)[0] + os.sep
        self.kinds: ByCode = {}  # -> _APP, _LIBRARY, _LAZY_LOAD or _TEMPLATE
        #: -> ((template line, compiled line), ...): a Jinja template's debug_info.
        self.templates: ByCode = {}
        self._files: dict[str, bool] = {}
        self.loops: ByCode = {}  # -> ((start, end) offsets of each loop body, ...)
        #: -> {instruction offset: the answer of a walk that stopped at once} (an app
        #: frame inside a loop: the N+1 shape): such a query costs two dict lookups.
        self.at_loop: ByCode = {}
        self.spawned = spawned  # read by the C walk (_speedups.c)
        self._shown: dict[str, str] = {}  # file name -> as shown in a callsite
        self._asyncio_files: str | None = None  # asyncio's folder, once a task is made
        self._cwd = os.getcwd()

    def _app_path(self, filename: str) -> bool:
        if filename.startswith("<") and filename != "<stdin>":
            return False  # <frozen importlib>, <string>, ...
        parts = filename.replace("\\", "/").split("/")
        if "site-packages" in parts or "dist-packages" in parts:
            return False
        path = os.path.abspath(filename)
        return not (path.startswith(self._roots) or os.path.realpath(path).startswith(self._roots))

    def _classify(self, code: CodeType, frame: FrameType | None = None) -> int:
        filename = code.co_filename
        kind = _APP if self.is_app_file(filename) else _LIBRARY
        if not filename.endswith((".py", ".pyw")) and (kind == _APP or filename == "<template>"):
            # Perhaps a Jinja template's compiled code, whose lines are not the
            # template's: only its frame can tell (its module's globals hold the
            # template), so it is not classified without one.
            if frame is None:
                return kind
            template = frame.f_globals.get("__jinja_template__")
            if template is not None:
                kind = _TEMPLATE
                if len(self.templates) >= _CODES_MAX:
                    self.templates.clear()
                self.templates[id(code)] = (code, _debug_info(template))
        if (
            kind == _LIBRARY
            and code.co_name == "_load_for_state"
            and code.co_filename.endswith(os.path.join("sqlalchemy", "orm", "strategies.py"))
        ):
            kind = _LAZY_LOAD
        if len(self.kinds) >= _CODES_MAX:
            self.kinds.clear()  # code made at run time (exec, templates): stay bounded
        self.kinds[id(code)] = (code, kind)
        return kind

    def kind(self, code: CodeType, frame: FrameType | None = None) -> int:
        known = self.kinds.get(id(code))
        return known[1] if known is not None else self._classify(code, frame)

    def is_app_file(self, filename: str) -> bool:
        """Same answer as for code objects, for places that only kept the file name."""
        known = self._files.get(filename)
        if known is None:
            if len(self._files) > 4096:
                self._files.clear()
            known = self._files[filename] = self._app_path(filename)
        return known

    def is_agent_file(self, filename: str) -> bool:
        return os.path.abspath(filename).startswith(self._agent_root)

    def show(self, filename: str) -> str:
        """Relative to the working directory, or to a library's import root
        (``starlette/routing.py``); as given otherwise."""
        if filename.startswith("<"):
            return filename
        path = os.path.abspath(filename)
        if path.startswith(self._cwd + os.sep):
            return path[len(self._cwd) + 1 :]
        for root in self._roots:
            if path.startswith(root) and not root.startswith(self._agent_root):
                return path[len(root) :]
        return filename

    def capture(self, frame: FrameType | None) -> tuple[tuple[Site, ...], str | None]:
        """The innermost app frames from ``frame`` outwards, and a lazy-load hint.

        The walk stops at the first app frame inside a loop (that is the answer),
        after ``MAX_FRAMES`` app frames, or ``_LIBRARY_BUDGET`` library frames past
        the last app frame: a query from a view's loop costs a frame or two, not
        the whole stack (measured: from ~6 µs to under 1 µs per query), and a
        walk that stops at its first frame is remembered (0.56 -> 0.2 µs).
        """
        if frame is not None:
            known = self.at_loop.get(id(frame.f_code))
            if known is not None:
                answer = known[1].get(frame.f_lasti)
                if answer is not None:
                    return answer
        first = frame
        kinds = self.kinds
        sites: list[Site] = []
        lazy: str | None = None
        budget = _LIBRARY_BUDGET
        looped = False
        while frame is not None:
            code = frame.f_code
            known = kinds.get(id(code))
            kind = known[1] if known is not None else self._classify(code, frame)
            if kind in _SITE_KINDS:
                offset = frame.f_lasti
                line = frame.f_lineno if kind == _APP else self._template_line(code, frame)
                sites.append((code, offset, line))
                looped = self.in_loop(code, offset)
                if looped or len(sites) >= MAX_FRAMES:
                    break
                budget = _LIBRARY_BUDGET
            elif kind == _LAZY_LOAD:
                if lazy is None:
                    lazy = _lazy_attribute(frame)
            elif sites:
                budget -= 1
                if not budget:
                    break
            frame = frame.f_back
        if not sites:
            handed = origin.get()
            if handed:
                return tuple(handed), lazy
            sites = self._from_task()
            looped = bool(sites) and self.in_loop(sites[-1][0], sites[-1][1])
        elif frame is first and lazy is None and looped:
            code, offset = sites[0][0], sites[0][1]
            answer = ((sites[0],), None)
            if len(self.at_loop) >= _CODES_MAX:
                self.at_loop.clear()
            self.at_loop.setdefault(id(code), (code, {}))[1][offset] = answer
            return answer
        if not looped:
            made_by = spawned.get()
            if made_by:  # a task the app made: its maker's line is the loop (spawn())
                sites = [*sites[: max(1, MAX_FRAMES - len(made_by))], *made_by]
        return tuple(sites), lazy

    def spawn(self, frame: FrameType | None) -> tuple[Site, ...] | None:
        """The app sites of the code making a task (``asyncio.gather``, ``create_task``,
        a ``TaskGroup``), for the task's context: a task's stack ends at its own
        coroutine, so a query in ``gather(*[one(i) for i in ids])`` would be put on
        ``one``'s line. The call that made the tasks is that fan-out's loop, whether
        or not it sits in one: its offset is added to its code's loops (a call of
        the code there runs no query of its own in any case but an eager task's,
        whose query that call did make). None when no app code made it.

        Only the app's own call of asyncio counts: a task that a library makes
        for itself (anyio's task group under Starlette's BaseHTTPMiddleware, a
        streaming response) runs the app's view as one unit, and an app
        middleware above it is no loop over its queries.
        """
        asyncio_files = self._asyncio_files
        if asyncio_files is None:
            module = sys.modules.get("asyncio")
            if module is None or not module.__file__:
                return None
            asyncio_files = self._asyncio_files = os.path.dirname(module.__file__) + os.sep
        while frame is not None and frame.f_code.co_filename.startswith(asyncio_files):
            frame = frame.f_back  # create_task, gather, TaskGroup.create_task, ...
        if frame is None or self.kind(frame.f_code, frame) not in _SITE_KINDS:
            return None
        sites, _lazy = self.capture(frame)
        if not sites:
            return None
        code, offset = sites[-1][0], sites[-1][1]
        if not self.in_loop(code, offset):
            ranges = self.loops[id(code)][1]
            self.loops[id(code)] = (code, (*ranges, (offset, offset)))
        return sites

    def _from_task(self) -> list[Site]:
        """App frames of the coroutines the running task is awaiting through (innermost first)."""
        asyncio = sys.modules.get("asyncio")
        if asyncio is None:
            return []
        try:
            task = asyncio.current_task()
        except RuntimeError:
            return []
        if task is None:
            return []
        chain: list[Site] = []
        awaited: Any = task.get_coro()
        for _ in range(64):
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is None:
                break
            code = frame.f_code
            kind = self.kind(code, frame)
            if kind in _SITE_KINDS:
                line = frame.f_lineno if kind == _APP else self._template_line(code, frame)
                chain.append((code, frame.f_lasti, line))
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        chain.reverse()
        return chain[:MAX_FRAMES]

    def is_app(self, code: CodeType) -> bool:
        return self.kind(code) in _SITE_KINDS

    def _template_line(self, code: CodeType, frame: FrameType) -> int:
        """The template's own line of a frame running its compiled code (as Jinja's
        ``Template.get_corresponding_lineno``, from the pairs read once per code)."""
        known = self.templates.get(id(code))
        lineno = frame.f_lineno
        if known is None:
            return lineno
        for template_line, code_line in known[1]:  # the last pair first
            if code_line <= lineno:
                return template_line
        return 1

    def is_agent(self, code: CodeType) -> bool:
        return self.is_agent_file(code.co_filename)

    def in_loop(self, code: CodeType, offset: int) -> bool:
        known = self.loops.get(id(code))
        if known is None:
            if len(self.loops) >= _CODES_MAX:
                self.loops.clear()
            known = self.loops[id(code)] = (code, loop_ranges(code))
        for start, end in known[1]:  # noqa: SIM110 - a plain loop beats any() with a generator
            if start <= offset <= end:
                return True
        return False

    def callsite(self, sites: tuple[Site, ...]) -> str | None:
        """``path/file.py:LINE`` of the line that issued the repeats.

        ``capture`` stops at the first app frame inside a loop, so the last site
        is that loop line when there is one; else the innermost app frame.
        """
        if not sites:
            return None
        last = sites[-1]
        chosen = last if self.in_loop(last[0], last[1]) else sites[0]
        filename = chosen[0].co_filename
        shown = self._shown.get(filename)
        if shown is None:
            if len(self._shown) > 4096:
                self._shown.clear()
            shown = self._shown[filename] = self.show(filename)
        return f"{shown}:{chosen[2]}"


def _debug_info(template: Any) -> tuple[tuple[int, int], ...]:
    """A Jinja template's (template line, compiled line) pairs, the last first."""
    try:
        return tuple(reversed(template.debug_info))
    except Exception:
        return ()


def _lazy_attribute(frame: FrameType) -> str | None:
    """'Post.comments' from SQLAlchemy's LazyLoader frame, for the advice."""
    try:
        prop = frame.f_locals["self"].parent_property
        return f"{prop.parent.class_.__name__}.{prop.key}"
    except Exception:
        return None
