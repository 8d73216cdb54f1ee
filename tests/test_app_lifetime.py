"""``perfagent.init(app)`` in an app factory, once per test: the agent keeps no app alive
(each stayed referenced from the agent until shutdown, and its routes from the route
cache: FastAPI routes hold their app), and
shutdown still undoes the apps that live on."""

from __future__ import annotations

import asyncio
import gc
import weakref

import httpx
from fastapi import FastAPI
from flask import Flask

import perfagent


def _fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    async def hello():
        return {"hello": "world"}

    return app


def _flask_app() -> Flask:
    app = Flask(__name__)

    @app.get("/hello")
    def hello():
        return "hello"

    return app


async def _get(app: FastAPI) -> int:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return (await client.get("/hello")).status_code


def test_apps_given_to_init_are_not_kept_alive_by_the_agent():
    perfagent.init(metrics_port=0, console_url="http://127.0.0.1:9")
    gone = []
    for _ in range(3):  # one app per test, as a factory fixture makes them
        app, flask_app = _fastapi_app(), _flask_app()
        perfagent.init(app)
        perfagent.init(flask_app)
        assert asyncio.run(_get(app)) == 200
        assert flask_app.test_client().get("/hello").status_code == 200
        gone += [weakref.ref(app), weakref.ref(flask_app)]
        del app, flask_app
    # The next test's app: from here on none of the earlier ones may be kept.
    assert asyncio.run(_get(_fastapi_app())) == 200
    gc.collect()
    assert [ref for ref in gone if ref() is not None] == []


def test_shutdown_still_undoes_an_app_that_lives_on():
    app, flask_app = _fastapi_app(), _flask_app()
    plain_wsgi = flask_app.wsgi_app
    perfagent.init(app, metrics_port=0, console_url="http://127.0.0.1:9")
    perfagent.init(flask_app)
    assert "build_middleware_stack" in app.__dict__
    assert flask_app.wsgi_app != plain_wsgi
    perfagent.shutdown()
    assert "build_middleware_stack" not in app.__dict__
    assert not getattr(app, "_perfagent_instrumented", False)
    assert flask_app.wsgi_app == plain_wsgi
    assert asyncio.run(_get(app)) == 200


def test_init_again_in_an_app_factory_checks_only_its_keywords():
    """Reading every source of settings (pyproject.toml) again cost ~0.7 ms a call."""
    from time import process_time

    from perfagent.config import ConfigError, load_settings

    perfagent.init(_fastapi_app(), metrics_port=0, console_url="http://127.0.0.1:9")
    apps = [_fastapi_app() for _ in range(20)]
    started = process_time()
    for app in apps:
        perfagent.init(app, metrics_port=0)
    inits = process_time() - started
    started = process_time()
    for _ in apps:
        load_settings({"metrics_port": 0})
    loads = process_time() - started
    assert inits < loads / 2, (inits, loads)
    try:
        perfagent.init(_fastapi_app(), slow_ms="soon")
    except ConfigError as error:
        assert "slow_ms" in str(error)
    else:
        raise AssertionError("a bad keyword was accepted")
