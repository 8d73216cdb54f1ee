"""Which patches make every app instrumented, and ``init(app)`` for one app.

The framework modules are patched when they are first imported (or at once if
they already are), so importing perfagent never imports a framework the app
does not use.
"""

from __future__ import annotations

from functools import cached_property
from types import ModuleType
from typing import TYPE_CHECKING, Any

from perfagent.agent import Agent
from perfagent.db.drivers import INSTALLERS
from perfagent.frameworks import threadpool
from perfagent.patching import PostImportHooks

if TYPE_CHECKING:
    from perfagent.frameworks.asgi import AsgiInstrumentation
    from perfagent.frameworks.wsgi import FlaskInstrumentation


class Instrumentations:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._pool_hooked = False

    # Each adapter is imported when its framework is: the ASGI one imports asyncio,
    # which a Flask app would otherwise not load (measured: ~30 ms of start-up).
    @cached_property
    def asgi(self) -> AsgiInstrumentation:
        from perfagent.frameworks.asgi import AsgiInstrumentation

        return AsgiInstrumentation(self.agent)

    @cached_property
    def flask(self) -> FlaskInstrumentation:
        from perfagent.frameworks.wsgi import FlaskInstrumentation

        return FlaskInstrumentation(self.agent)

    def _hooks(self, patches: dict[str, Any]) -> None:
        """Runs each patch when its module is imported (now, if it is), guarded."""

        def guarded(name: str, patch: Any) -> Any:
            def hook(module: ModuleType) -> None:
                try:
                    patch(module)
                except Exception as exc:
                    self.agent.internal_error(f"patch {name}", exc)

            return hook

        hooks = PostImportHooks({name: guarded(name, patch) for name, patch in patches.items()})
        self.agent.import_hooks.append(hooks)
        hooks.install()

    def instrument_all(self) -> None:
        """Every Flask, FastAPI, Starlette and FastHTML app, created before or after."""
        self._hooks(
            {
                "starlette.routing": lambda m: self.asgi.patch_routing(m),
                "starlette.applications": lambda m: self.asgi.patch_class(m.Starlette),
                "fastapi.applications": lambda m: self.asgi.patch_class(m.FastAPI),
                "flask.app": lambda m: self.flask.patch_class(m.Flask),
            }
        )
        self.thread_pool()

    def thread_pool(self) -> None:
        """Each request's wait for a pool thread (see threadpool.py); once per agent."""
        if not self._pool_hooked:
            self._pool_hooked = True
            self._hooks(
                {
                    "anyio.to_thread": lambda m: threadpool.install(
                        m, self.agent.patches, self.agent.settings.compiled_hooks
                    )
                }
            )

    def instrument_databases(self) -> None:
        """Query capture in every supported driver, imported now or later."""
        agent = self.agent

        def installer(install: Any) -> Any:
            def hook(module: ModuleType) -> None:
                undo = install(module, agent.capture, agent.patches)
                if callable(undo):
                    agent.apps.append(undo)

            return hook

        self._hooks({name: installer(install) for name, install in INSTALLERS.items()})

    def instrument_app(self, app: Any) -> None:
        self.thread_pool()
        kind = framework_of(app)
        if kind is not None:
            try:  # an app of a version the adapter cannot read must still start
                if kind == "flask":
                    self.flask.instrument_app(app)
                else:
                    self.asgi.instrument_app(app)
            except Exception as exc:
                self.agent.internal_error(f"instrument {kind} app", exc)
        else:
            raise TypeError(
                f"perfagent.init(app): {type(app).__qualname__} is not a Flask, FastAPI, "
                "Starlette or FastHTML app"
            )


def framework_of(app: Any) -> str | None:
    """'flask', 'starlette' or None, by class, without importing either framework."""
    for cls in type(app).__mro__:
        if cls.__module__ == "flask.app" and cls.__name__ == "Flask":
            return "flask"
        if cls.__module__ == "starlette.applications" and cls.__name__ == "Starlette":
            return "starlette"
    return None
