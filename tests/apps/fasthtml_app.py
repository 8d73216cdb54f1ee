"""FastHTML app used by the tests, built with fast_app() as FastHTML users do."""

import os
import sys

from fasthtml.common import P, Titled, fast_app

app, rt = fast_app()


@rt("/")
def get():
    return Titled("Home", P("hello"))


@rt("/todos/{tid}")
def get(tid: int):  # noqa: F811 - FastHTML picks the handler by its name (the method)
    return Titled(f"Todo {tid}", P("one todo"))


@rt("/agent")
def get():  # noqa: F811
    return {"perfagent_loaded": "perfagent" in sys.modules, "pid": os.getpid()}
