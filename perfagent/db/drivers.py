"""Hooks in the database drivers, each feeding ``QueryCapture.add``.

Capture happens at the driver (DB-API) level, so a query is counted once
whether the app issues it directly or through an ORM (SQLAlchemy sync and
async, Flask-SQLAlchemy, fastlite all end in one of these). Outside a request
a hook costs one context-variable read. Each hook is a ``Patch`` undone by
``perfagent.shutdown()``:

- sqlite3: its classes are C types, so ``connect`` is wrapped to pass a
  subclass as ``factory`` (subclassing the app's own factory when it gives one);
- psycopg 3: ``Cursor``/``AsyncCursor`` methods, patched on the classes;
- psycopg2: ``connect`` is wrapped to pass a ``cursor_factory`` subclass;
- asyncpg: ``Connection`` and ``PreparedStatement`` methods (SQLAlchemy's
  asyncpg dialect uses prepared statements);
- APSW (fastlite): a connection hook registers SQLite's profile trace, which
  reports each statement with its duration when it completes.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import sys
from collections.abc import Callable
from time import perf_counter
from types import ModuleType
from typing import Any

from perfagent.db.callsite import origin
from perfagent.db.capture import CallsPastCap, QueryCapture
from perfagent.patching import Patch
from perfagent.record import current

try:  # the sqlite3 hooks in C, built by pip where a C compiler is found (see _speedups.c)
    from perfagent._speedups import SqlHook
except ImportError:
    SqlHook = None

_frame = sys._getframe


def _size(rows: Any) -> int:
    try:
        return len(rows)
    except TypeError:
        return 0


def _timed(capture: QueryCapture, system: str, original: Callable, many: bool = False) -> Any:
    """Wraps a sync ``method(self, sql, [params], ...)``, keeping the driver's own defaults."""

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        record = current.get()
        if record is None or record.done or not args:
            # No statement by position: the driver's to judge (sqlite3 refuses ``sql=``
            # with its own message, which the app must see as it is).
            return original(self, *args, **kwargs)
        sql = args[0]
        start = perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            end = perf_counter()
            params = args[1] if len(args) > 1 else next(iter(kwargs.values()), None)
            if sql.__class__ is not str and hasattr(sql, "as_string"):
                sql = sql.as_string(self)  # psycopg's sql.Composed
            count = _size(params) if many else 0
            capture.add(record, system, sql, params, start, end, sys._getframe(1), count)

    return method


def _timed_async(
    capture: QueryCapture, system: str, original: Callable, text: Callable, many: bool = False
) -> Any:
    """Wraps an async ``method(self, *args, ...)``; ``text(self, args)`` gives (sql, params)."""

    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        record = current.get()
        if record is None or record.done:
            return await original(self, *args, **kwargs)
        start = perf_counter()
        try:
            return await original(self, *args, **kwargs)
        finally:
            sql, params = text(self, args)
            count = _size(params) if many else 0
            capture.add(record, system, sql, params, start, perf_counter(), sys._getframe(1), count)

    return method


def _cursor_subclasses(
    capture: QueryCapture, system: str, timed: Callable = _timed
) -> Callable[[type], type]:
    """For C cursor types (sqlite3, psycopg2): a timed subclass per base, made once."""
    made: dict[type, type] = {}

    def cursor_class(base: type) -> type:
        cls = made.get(base)
        if cls is None:
            cls = made[base] = type(
                base.__name__,
                (base,),
                {
                    "execute": timed(capture, system, base.execute),
                    "executemany": timed(capture, system, base.executemany, many=True),
                    "__module__": base.__module__,
                    "__slots__": (),
                },
            )
        return cls

    return cursor_class


# -- sqlite3 ----------------------------------------------------------------


def _sqlite_hook(
    capture: QueryCapture,
    run: Callable,
    many: bool,
    no_params: Any,
    make_cursor: Callable | None = None,
    cursor_class: type | None = None,
    original: Callable | None = None,
) -> Any:
    """The C hook (``_speedups.SqlHook``) doing what ``_timed`` (no ``make_cursor``) or
    ``_on_new_cursor`` do; None where the module was not built."""
    if SqlHook is None or not capture.compiled:
        return None
    return SqlHook(
        run,
        make_cursor,
        cursor_class,
        "sqlite",
        no_params,
        current,
        perf_counter,
        capture.add,
        capture.fingerprints.cache,
        capture.frames,
        many,
        original,
        capture.max_calls,
        CallsPastCap,
        tuple(capture.bounds),
    )


def _timed_sqlite(
    capture: QueryCapture, system: str, original: Callable, many: bool = False
) -> Any:
    """``_timed`` for sqlite3's cursors, in C where it was built."""
    hook = _sqlite_hook(capture, original, many, None)
    return hook if hook is not None else _timed(capture, system, original, many)


def _on_new_cursor(
    capture: QueryCapture,
    make_cursor: Callable,
    cursor_class: type,
    run: Callable,
    original: Callable,
    many: bool = False,
) -> Any:
    """``Connection.execute``/``executemany``: run on a new cursor of ours, timed here.
    A call the connection's ``original`` method would not take (a keyword, no
    statement, too many arguments) goes to it, so that the app sees its error as it
    is, naming the connection's method rather than our cursor's."""
    hook = _sqlite_hook(capture, run, many, (), make_cursor, cursor_class, original)
    if hook is not None:
        return hook
    add = capture.add

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs or not 1 <= len(args) <= 2:
            return original(self, *args, **kwargs)
        sql = args[0]
        cursor = make_cursor(self, cursor_class)
        record = current.get()
        if record is None or record.done:
            return run(cursor, *args)
        start = perf_counter()
        try:
            return run(cursor, *args)
        finally:
            end = perf_counter()
            params = args[1] if len(args) > 1 else ()  # as sqlite3's own default
            add(record, "sqlite", sql, params, start, end, _frame(1), _size(params) if many else 0)

    return method


def install_sqlite3(module: ModuleType, capture: QueryCapture, patches: list[Patch]) -> None:
    connections: dict[type, type] = {}
    cursor_class = _cursor_subclasses(capture, "sqlite", _timed_sqlite)
    cursor_execute = module.Cursor.execute  # the C methods, called on our cursor subclass
    cursor_executemany = module.Cursor.executemany

    def connection_class(base: type) -> type:
        cls = connections.get(base)
        if cls is None:
            plain_cursor = base.cursor
            default_cursor = cursor_class(module.Cursor)

            class Connection(base):  # type: ignore[misc, valid-type]
                def cursor(self, factory: Any = None) -> Any:
                    if factory is None:
                        return plain_cursor(self, default_cursor)
                    return plain_cursor(self, cursor_class(factory))

                # The C ``Connection.execute`` makes a plain cursor: make ours (so what
                # the app runs on it later is seen too), and time this statement here
                # rather than through the cursor's wrapper: one Python frame less per
                # query (with the call-site cache and the tuple per query, measured on
                # a loop of indexed SELECTs: 2.35 -> 1.45 µs added per query).
                execute = _on_new_cursor(
                    capture, plain_cursor, default_cursor, cursor_execute, base.execute
                )
                executemany = _on_new_cursor(
                    capture,
                    plain_cursor,
                    default_cursor,
                    cursor_executemany,
                    base.executemany,
                    many=True,
                )

            Connection.__module__ = base.__module__
            Connection.__qualname__ = Connection.__name__ = base.__name__
            cls = connections[base] = Connection
        return cls

    original = module.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        if len(args) > 5:  # factory given by position
            args = (*args[:5], connection_class(args[5]), *args[6:])
        else:
            kwargs["factory"] = connection_class(kwargs.get("factory") or module.Connection)
        return original(*args, **kwargs)

    patches.append(Patch(module, "connect", connect))
    dbapi2 = sys.modules.get("sqlite3.dbapi2")
    if dbapi2 is not None and dbapi2.connect is original:
        patches.append(Patch(dbapi2, "connect", connect))


# -- psycopg 3 ----------------------------------------------------------------


def install_psycopg(module: ModuleType, capture: QueryCapture, patches: list[Patch]) -> None:
    system = "postgresql"
    for cls in (module.Cursor, module.ClientCursor):
        if "execute" in cls.__dict__:
            patches.append(Patch(cls, "execute", _timed(capture, system, cls.__dict__["execute"])))
        if "executemany" in cls.__dict__:
            method = _timed(capture, system, cls.__dict__["executemany"], many=True)
            patches.append(Patch(cls, "executemany", method))

    def text(cursor: Any, args: tuple) -> tuple[Any, Any]:
        sql = args[0]
        if not isinstance(sql, (str, bytes)) and hasattr(sql, "as_string"):
            sql = sql.as_string(cursor)
        return sql, args[1] if len(args) > 1 else None

    for cls in (module.AsyncCursor, module.AsyncClientCursor):
        if "execute" in cls.__dict__:
            method = _timed_async(capture, system, cls.__dict__["execute"], text)
            patches.append(Patch(cls, "execute", method))
        if "executemany" in cls.__dict__:
            method = _timed_async(capture, system, cls.__dict__["executemany"], text, many=True)
            patches.append(Patch(cls, "executemany", method))


# -- psycopg2 -----------------------------------------------------------------


def install_psycopg2(module: ModuleType, capture: QueryCapture, patches: list[Patch]) -> None:
    extensions = importlib.import_module("psycopg2.extensions")
    cursor_class = _cursor_subclasses(capture, "postgresql")

    original = module.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        kwargs["cursor_factory"] = cursor_class(kwargs.get("cursor_factory") or extensions.cursor)
        return original(*args, **kwargs)

    patches.append(Patch(module, "connect", connect))


# -- asyncpg ------------------------------------------------------------------


def install_asyncpg(module: ModuleType, capture: QueryCapture, patches: list[Patch]) -> None:
    system = "postgresql"
    connection = module.connection.Connection

    def from_args(_conn: Any, args: tuple) -> tuple[Any, Any]:
        return args[0], args[1:]

    def many_from_args(_conn: Any, args: tuple) -> tuple[Any, Any]:
        return args[0], args[1] if len(args) > 1 else ()

    for name in ("execute", "fetch", "fetchrow", "fetchval"):
        method = _timed_async(capture, system, connection.__dict__[name], from_args)
        patches.append(Patch(connection, name, method))
    method = _timed_async(
        capture, system, connection.__dict__["executemany"], many_from_args, many=True
    )
    patches.append(Patch(connection, "executemany", method))

    statement = module.prepared_stmt.PreparedStatement

    def statement_args(stmt: Any, args: tuple) -> tuple[Any, Any]:
        return stmt.get_query(), args

    def statement_many(stmt: Any, args: tuple) -> tuple[Any, Any]:
        return stmt.get_query(), args[0] if args else ()

    for name in ("fetch", "fetchrow", "fetchval"):
        if name in statement.__dict__:
            method = _timed_async(capture, system, statement.__dict__[name], statement_args)
            patches.append(Patch(statement, name, method))
    if "executemany" in statement.__dict__:
        method = _timed_async(
            capture, system, statement.__dict__["executemany"], statement_many, many=True
        )
        patches.append(Patch(statement, "executemany", method))


# -- aiosqlite -----------------------------------------------------------------


def install_aiosqlite(module: ModuleType, capture: QueryCapture, patches: list[Patch]) -> None:
    """aiosqlite runs each call on its own thread: run it in a copy of the request's
    context (so the sqlite3 hook sees the request) carrying the caller's app frames."""
    connection = module.core.Connection
    original = connection.__dict__["_execute"]

    async def _execute(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        record = current.get()
        if record is None or record.done:
            return await original(self, fn, *args, **kwargs)
        sites, _lazy = capture.frames.capture(sys._getframe(1))
        context = contextvars.copy_context()
        context.run(origin.set, sites)
        return await original(self, functools.partial(context.run, fn), *args, **kwargs)

    patches.append(Patch(connection, "_execute", _execute))


# -- APSW ---------------------------------------------------------------------


class _ApswHook:
    """Registered in ``apsw.connection_hooks``; removed again by ``undo()``.

    SQLite's own profile time has millisecond resolution on common builds, so
    the statement's start (SQLITE_TRACE_STMT) and end (SQLITE_TRACE_PROFILE)
    are timed here with ``perf_counter``. The trace carries no bindings: the
    connection's ``exec_trace``, which APSW calls with them just before the
    statement's first step (so just before its STMT event), leaves them for the
    STMT event to take, as sqlite3's hook records its parameters; without them
    six identical statements would look like one per item (an N+1), not one
    repeated (a duplicate). A connection whose ``exec_trace`` was set before
    (or is set later by the app) keeps it, and its statements' bindings stay
    unknown (None).
    """

    def __init__(self, module: ModuleType, capture: QueryCapture) -> None:
        self._module = module
        self._capture = capture
        self._started: dict[Any, tuple[float, Any]] = {}
        #: id(connection) -> bindings of the statement about to start on it.
        self._bindings: dict[int, Any] = {}

    def __call__(self, connection: Any) -> None:
        mask = self._module.SQLITE_TRACE_STMT | self._module.SQLITE_TRACE_PROFILE
        connection.trace_v2(mask, self._trace, id=self)
        if connection.exec_trace is None:
            connection.exec_trace = self._exec_trace

    def _exec_trace(self, cursor: Any, sql: str, bindings: Any) -> bool:
        if len(self._bindings) < 10_000:  # bounded even if a STMT never comes
            record = current.get()
            if record is not None and not record.done:
                self._bindings[id(cursor.connection)] = () if bindings is None else bindings
        return True  # go on with the statement

    def _trace(self, event: dict) -> None:
        record = current.get()
        if record is None or record.done or event.get("trigger"):
            return
        connection = id(event.get("connection"))
        key = (connection, event["id"])
        if event["code"] == self._module.SQLITE_TRACE_STMT:
            bindings = self._bindings.pop(connection, None)
            if len(self._started) < 10_000:  # bounded even if a PROFILE never comes
                self._started[key] = (perf_counter(), bindings)
            return
        end = perf_counter()
        start, bindings = self._started.pop(key, (end - event["nanoseconds"] / 1e9, None))
        self._capture.add(record, "sqlite", event["sql"], bindings, start, end, sys._getframe(1))

    def undo(self) -> None:
        try:
            self._module.connection_hooks.remove(self)
        except ValueError:
            pass


def install_apsw(module: ModuleType, capture: QueryCapture, patches: list[Patch]) -> Any:
    hook = _ApswHook(module, capture)
    module.connection_hooks.append(hook)
    return hook.undo


INSTALLERS: dict[str, Callable[[ModuleType, QueryCapture, list[Patch]], Any]] = {
    "sqlite3": install_sqlite3,
    "psycopg": install_psycopg,
    "psycopg2": install_psycopg2,
    "asyncpg": install_asyncpg,
    "apsw": install_apsw,
    "aiosqlite": install_aiosqlite,
}
