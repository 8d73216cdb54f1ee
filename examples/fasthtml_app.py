"""A small FastHTML app to try perfagent on.

pip install python-fasthtml
perfagent run -- uvicorn --app-dir examples fasthtml_app:app
"""

from fasthtml.common import A, Li, P, Titled, Ul, fast_app

app, rt = fast_app()
TODOS = {1: "write the report", 2: "ship it"}


@rt("/")
def get():
    return Titled("Todos", Ul(*[Li(A(text, href=f"/todos/{tid}")) for tid, text in TODOS.items()]))


@rt("/todos/{tid}")
def get(tid: int):  # noqa: F811 - FastHTML takes the method from the handler's name
    return Titled(f"Todo {tid}", P(TODOS.get(tid, "no such todo")))
