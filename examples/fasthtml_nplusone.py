"""FastHTML + fastlite: an N+1 and its fix.

    perfagent run -- uvicorn --app-dir examples fasthtml_nplusone:app

/ looks up each todo's owner with its own query; /fixed joins them in one.
"""

from fasthtml.common import Li, Titled, Ul, fast_app

app, rt, todos, Todo = fast_app(
    "perfagent-example-fasthtml.db", todos=dict(id=int, title=str, owner_id=int, pk="id")
)
users = todos.db.t.users
if users not in todos.db.t:
    users.create(id=int, name=str, pk="id")
    for i in range(1, 4):
        users.insert(dict(id=i, name=f"user {i}"))
    for i in range(1, 21):
        todos.insert(Todo(title=f"todo {i}", owner_id=1 + i % 3))
User = users.dataclass()


@rt("/")
def get():
    items = [Li(f"{t.title} ({users[t.owner_id].name})") for t in todos()]  # one query per todo
    return Titled("Todos", Ul(*items))


@rt("/fixed")
def get():  # noqa: F811 - FastHTML takes the method from the handler's name
    rows = todos.db.q(
        "SELECT todos.title, users.name FROM todos JOIN users ON users.id = todos.owner_id"
    )
    return Titled("Todos", Ul(*[Li(f"{r['title']} ({r['name']})") for r in rows]))
