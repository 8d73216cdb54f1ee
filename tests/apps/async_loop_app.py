"""Async views whose repeats come from a loop over awaited helpers, and from a gather.

Every ``await`` compiles to a small loop of its own from Python 3.11 (SEND ...
JUMP_BACKWARD_NO_INTERRUPT): the call site must still be the view's loop line,
not the helper's ``await``. Lines the tests expect carry a "# MARK name" comment.
"""

import asyncio
import os
import sqlite3

import aiosqlite
from fastapi import FastAPI
from sqlalchemy import ForeignKey, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DB = os.environ["DB_PATH"]
PG = os.environ.get("PG_DSN", "")


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


class Book(Base):
    __tablename__ = "book"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("author.id"))
    title: Mapped[str]


with sqlite3.connect(DB) as setup:
    setup.execute("CREATE TABLE IF NOT EXISTS author (id INTEGER PRIMARY KEY, name TEXT)")
    setup.execute("CREATE TABLE IF NOT EXISTS book (id INTEGER PRIMARY KEY, author_id INT, title)")
    if not setup.execute("SELECT count(*) FROM author").fetchone()[0]:
        setup.executemany("INSERT INTO author VALUES (?, ?)", [(i, f"a{i}") for i in range(1, 9)])
        setup.executemany(
            "INSERT INTO book (author_id, title) VALUES (?, ?)",
            [(i, f"b{i}-{j}") for i in range(1, 9) for j in range(2)],
        )

engine = create_async_engine(f"sqlite+aiosqlite:///{DB}")
Session = async_sessionmaker(engine)
app = FastAPI()


@app.middleware("http")
async def header(request, call_next):
    """The app's own middleware: Starlette runs the view in a task of anyio's making
    below it, which is no loop over the view's queries."""
    response = await call_next(request)
    response.headers["x-app"] = "1"
    return response


async def books_of(session, author_id: int):
    result = await session.execute(select(Book).where(Book.author_id == author_id))
    return result.scalars().all()


@app.get("/orm/loop")
async def orm_loop():
    async with Session() as session:
        authors = (await session.scalars(select(Author))).all()
        total = 0
        for author in authors:
            books = await books_of(session, author.id)  # MARK orm-loop
            total += len(books)
        await session.scalar(select(Author.name).where(Author.id == 1))
    return total


async def one(author_id: int):
    async with Session() as session:
        return await session.get(Author, author_id)


@app.get("/orm/five-lines")
async def orm_five_lines():
    """The same query from five lines, in no loop: no N+1 (each line below the minimum)."""
    await one(1)
    await one(2)
    await one(3)
    await one(4)
    await one(5)
    return "ok"


@app.get("/orm/gather")
async def orm_gather():
    authors = await asyncio.gather(*[one(i) for i in range(1, 9)])  # MARK orm-gather
    return len(authors)


async def count_books(db, author_id: int) -> int:
    async with db.execute("SELECT count(*) FROM book WHERE author_id = ?", (author_id,)) as cur:
        return (await cur.fetchone())[0]


@app.get("/aiosqlite/loop")
async def aiosqlite_loop():
    async with aiosqlite.connect(DB) as db:
        total = 0
        for author_id in range(1, 9):
            total += await count_books(db, author_id)  # MARK aiosqlite-loop
        return total


async def author_ids(db):
    async with db.execute("SELECT id FROM author") as cursor:
        async for (author_id,) in cursor:
            yield author_id


@app.get("/aiosqlite/async-for")
async def aiosqlite_async_for():
    async with aiosqlite.connect(DB) as db:
        ids = [author_id async for author_id in author_ids(db)]
        total, at = 0, 0
        while at < len(ids):
            total += await count_books(db, ids[at])  # MARK aiosqlite-while
            at += 1
        return total


@app.get("/sync-in-async/gather")
async def sync_in_async_gather():
    async def title(book_id: int):
        await asyncio.sleep(0)
        with sqlite3.connect(DB) as conn:
            return conn.execute("SELECT title FROM book WHERE id = ?", (book_id,)).fetchone()

    titles = await asyncio.gather(*(title(i) for i in range(1, 9)))  # MARK sync-gather
    return len(titles)


@app.get("/pg/asyncpg-loop")
async def pg_asyncpg_loop():
    import asyncpg

    async def fetch_one(conn, n: int):
        return await conn.fetchval("SELECT $1::int * 2", n)

    conn = await asyncpg.connect(PG)
    try:
        return [await fetch_one(conn, n) for n in range(8)]  # MARK asyncpg-comprehension
    finally:
        await conn.close()
