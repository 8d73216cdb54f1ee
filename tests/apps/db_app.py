"""FastAPI app with N+1s and their look-alikes, on SQLite (raw, SQLAlchemy, APSW) and PostgreSQL.

Lines the tests expect as call sites carry a "# MARK name" comment.
"""

import asyncio
import os
import sqlite3

import db_helpers
import jinja2
from fastapi import FastAPI
from sqlalchemy import ForeignKey, create_engine, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
)

DB = os.environ["DB_PATH"]
PG = os.environ.get("PG_DSN", "")  # e.g. postgresql://postgres@127.0.0.1:5432/test


class Base(DeclarativeBase):
    pass


class Post(Base):
    __tablename__ = "post"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    comments: Mapped[list["Comment"]] = relationship(back_populates="post")


class Comment(Base):
    __tablename__ = "comment"
    id: Mapped[int] = mapped_column(primary_key=True)
    post_id: Mapped[int] = mapped_column(ForeignKey("post.id"))
    body: Mapped[str]
    post: Mapped[Post] = relationship(back_populates="comments")


engine = create_engine(f"sqlite:///{DB}")
Base.metadata.create_all(engine)
with Session(engine) as setup:
    if not setup.scalar(select(Post.id).limit(1)):
        for i in range(1, 11):
            setup.add(Post(id=i, title=f"post {i}", comments=[Comment(body="c") for _ in range(3)]))
        setup.commit()
    for i in range(10):  # queries outside any request: charged to nothing
        setup.get(Post, 1 + i % 3)
with sqlite3.connect(DB) as setup_conn:
    for i in range(6):
        setup_conn.execute(f"CREATE TABLE IF NOT EXISTS extra{i} (id INTEGER)")

async_engine = create_async_engine(f"sqlite+aiosqlite:///{DB}")
AsyncSessionLocal = async_sessionmaker(async_engine)
TEMPLATE = jinja2.Environment().from_string(
    "{% for post in posts %}{{ post.title }}: {{ post.comments|length }}\n{% endfor %}"
)
app = FastAPI()
COUNT_SQL = "SELECT count(*) FROM comment WHERE post_id = ?"


def _conn() -> sqlite3.Connection:
    return sqlite3.connect(DB)


@app.get("/raw/nplusone")
def raw_nplusone():
    conn = _conn()
    counts = []
    for (post_id,) in conn.execute("SELECT id FROM post").fetchall():
        row = conn.execute(COUNT_SQL, (post_id,)).fetchone()  # MARK raw
        counts.append(row)
    return len(counts)


@app.get("/raw/fixed")
def raw_fixed():
    sql = (
        "SELECT post.id, count(comment.id) FROM post"
        " LEFT JOIN comment ON comment.post_id = post.id GROUP BY post.id"
    )
    return len(_conn().execute(sql).fetchall())


@app.get("/raw/fstring")
def raw_fstring():
    conn = _conn()
    for post_id in range(1, 11):
        conn.execute(f"SELECT * FROM comment WHERE post_id = {post_id}").fetchall()  # MARK fstring
    return "ok"


@app.get("/raw/two-per-row")
def raw_two_per_row():
    conn = _conn()
    for post_id in range(1, 11):
        conn.execute("SELECT title FROM post WHERE id = ?", (post_id,)).fetchone()  # MARK 2n-a
        conn.execute("SELECT body FROM comment WHERE post_id=?", (post_id,)).fetchall()  # MARK 2n-b
    return "ok"


@app.get("/raw/helper")
def raw_helper():
    conn = _conn()
    return [db_helpers.comment_count(conn, post_id) for post_id in range(1, 11)]  # MARK helper


@app.get("/raw/duplicate")
def raw_duplicate():
    conn = _conn()
    for _ in range(6):
        conn.execute("SELECT title FROM post WHERE id = ?", (1,)).fetchone()  # MARK duplicate
    return "ok"


@app.get("/raw/four")
def raw_four():
    conn = _conn()
    for post_id in range(1, 5):
        conn.execute("SELECT * FROM comment WHERE post_id = ?", (post_id,)).fetchall()
    return "ok"


@app.get("/raw/executemany")
def raw_executemany():
    conn = _conn()
    conn.execute("CREATE TEMP TABLE scratch (n INTEGER)")
    conn.executemany("INSERT INTO scratch VALUES (?)", [(n,) for n in range(1000)])
    return "ok"


@app.get("/raw/two-sites")
def raw_two_sites():
    conn = _conn()
    for post_id in range(1, 4):
        conn.execute("SELECT * FROM comment WHERE post_id = ?", (post_id,)).fetchall()
    for post_id in range(4, 7):
        conn.execute("SELECT * FROM comment WHERE post_id = ?", (post_id,)).fetchall()
    return "ok"


@app.get("/raw/chunks")
def raw_chunks():
    conn = _conn()
    ids = list(range(1, 11))
    for start in range(0, 10, 2):
        chunk = ids[start : start + 2]
        conn.execute("SELECT * FROM comment WHERE post_id IN (?, ?)", chunk).fetchall()
    return "ok"


@app.get("/raw/tables")
def raw_tables():
    conn = _conn()
    for i in range(6):
        conn.execute(f"SELECT * FROM extra{i}").fetchall()
    return "ok"


@app.get("/orm/lazy")
def orm_lazy():
    with Session(engine) as session:
        posts = session.scalars(select(Post)).all()
        return sum(len(post.comments) for post in posts)  # MARK lazy


@app.get("/orm/template")
def orm_template():
    with Session(engine) as session:
        posts = session.scalars(select(Post)).all()
        return len(TEMPLATE.render(posts=posts))


@app.get("/orm/selectin")
def orm_selectin():
    with Session(engine) as session:
        posts = session.scalars(select(Post).options(selectinload(Post.comments))).all()
        return sum(len(post.comments) for post in posts)


@app.get("/orm/joined")
def orm_joined():
    with Session(engine) as session:
        posts = session.scalars(select(Post).options(joinedload(Post.comments))).unique().all()
        return sum(len(post.comments) for post in posts)


@app.get("/orm/savepoints")
def orm_savepoints():
    with Session(engine) as session:
        for _ in range(6):
            with session.begin_nested():
                pass
        return "ok"


@app.get("/orm/identity")
def orm_identity():
    with Session(engine) as session:
        # The identity map holds objects weakly: keep them, as a real view does, so the
        # seven gets after the first are answered from it without any SQL.
        posts = [session.get(Post, 1) for _ in range(8)]
        return [post.title for post in posts]


@app.get("/async/gather")
async def async_gather():
    async def load(post_id: int):
        async with AsyncSessionLocal() as session:
            return await session.get(Post, post_id)

    posts = await asyncio.gather(*(load(i) for i in range(1, 11)))  # MARK gather
    return len(posts)


@app.get("/apsw/nplusone")
def apsw_nplusone():
    import apsw

    conn = apsw.Connection(DB)
    total = 0
    for (post_id,) in list(conn.execute("SELECT id FROM post")):
        rows = list(conn.execute("SELECT * FROM comment WHERE post_id=?", (post_id,)))  # MARK apsw
        total += len(rows)
    return total


# -- PostgreSQL -------------------------------------------------------------------------


@app.get("/pg/psycopg")
def pg_psycopg():
    import psycopg

    with psycopg.connect(PG) as conn:
        for i in range(8):
            conn.execute("SELECT %s::int + 1", (i,)).fetchone()  # MARK psycopg
    return "ok"


@app.get("/pg/psycopg-async")
async def pg_psycopg_async():
    import psycopg

    async with await psycopg.AsyncConnection.connect(PG) as conn:
        for i in range(8):
            await (await conn.execute("SELECT %s::int + 2", (i,))).fetchone()  # MARK psycopg-async
    return "ok"


@app.get("/pg/psycopg2")
def pg_psycopg2():
    import psycopg2

    conn = psycopg2.connect(PG)
    try:
        cursor = conn.cursor()
        for i in range(8):
            cursor.execute("SELECT %s + 3", (i,))  # MARK psycopg2
            cursor.fetchone()
    finally:
        conn.close()
    return "ok"


@app.get("/pg/asyncpg")
async def pg_asyncpg():
    import asyncpg

    conn = await asyncpg.connect(PG)
    try:
        for i in range(8):
            await conn.fetchval("SELECT $1::int + 4", i)  # MARK asyncpg
    finally:
        await conn.close()
    return "ok"


@app.get("/pg/sqlalchemy-async")
async def pg_sqlalchemy_async():
    from sqlalchemy import text

    pg_engine = create_async_engine(PG.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with pg_engine.connect() as conn:
            for i in range(8):
                await conn.execute(text("SELECT :n + 5"), {"n": i})  # MARK sqlalchemy-async
    finally:
        await pg_engine.dispose()
    return "ok"
