"""FastAPI + async SQLAlchemy: an N+1 and its fix.

    pip install "sqlalchemy[asyncio]" aiosqlite
    perfagent run -- uvicorn --app-dir examples fastapi_nplusone:app

/authors/{id}/books runs one query per book id; /authors/{id}/books/fixed
fetches them in one query.
"""

import contextlib

from fastapi import FastAPI
from sqlalchemy import ForeignKey, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Book(Base):
    __tablename__ = "book"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("author.id"))
    title: Mapped[str]


class Author(Base):
    __tablename__ = "author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


engine = create_async_engine("sqlite+aiosqlite:///perfagent-example-fastapi.sqlite")
Session = async_sessionmaker(engine, expire_on_commit=False)


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI):
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with Session() as session:
        if await session.get(Author, 1) is None:
            session.add(Author(id=1, name="Ursula"))
            session.add_all(Book(id=i, author_id=1, title=f"book {i}") for i in range(1, 21))
            await session.commit()
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


@app.get("/authors/{author_id}/books")
async def books(author_id: int):
    async with Session() as session:
        ids = (await session.scalars(select(Book.id).where(Book.author_id == author_id))).all()
        return [(await session.get(Book, book_id)).title for book_id in ids]  # one query per book


@app.get("/authors/{author_id}/books/fixed")
async def books_fixed(author_id: int):
    async with Session() as session:
        rows = await session.scalars(select(Book).where(Book.author_id == author_id))
        return [book.title for book in rows]
