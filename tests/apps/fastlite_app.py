"""FastHTML + fastlite (APSW) routes: an update as fastlite makes it, and real repeats.

fastlite reads ``sqlite_master`` and ``PRAGMA table_info`` again before each
insert or update: six identical schema reads in one ``update`` route with no
loop. Lines the tests expect carry a "# MARK name" comment.
"""

import os

from fasthtml.common import FastHTML
from fastlite import database

db = database(os.environ["DB_PATH"])


class Todo:
    id: int
    title: str
    done: bool


todos = db.create(Todo, pk="id", transform=True)
if not todos():
    for i in range(1, 9):
        todos.insert(Todo(title=f"todo {i}", done=False))

app = FastHTML()


@app.post("/todos/{tid}")
def update(tid: int, title: str = "renamed"):
    todo = todos[tid]
    todo.title = title
    return str(todos.update(todo))


@app.get("/titles")
def titles():
    out = []
    for tid in range(1, 9):
        out.append(todos[tid].title)  # MARK titles
    return ", ".join(out)


@app.get("/same")
def same():
    return str([db.q("select count(*) as n from todo") for _ in range(6)])  # MARK same


@app.get("/same-bound")
def same_bound():
    return str([todos[1].title for _ in range(6)])  # MARK same-bound
