"""A small FastAPI + async SQLAlchemy (asyncpg) app, the kind whose own test suite
the agent must not slow down: authors and their books in PostgreSQL."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

DSN = os.environ.get("SUITE_DSN", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
PREFIX = os.environ.get("SUITE_TABLE_PREFIX", "suite")


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = f"{PREFIX}_author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    books: Mapped[list[Book]] = relationship(back_populates="author", lazy="raise")


class Book(Base):
    __tablename__ = f"{PREFIX}_book"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    author_id: Mapped[int] = mapped_column(ForeignKey(f"{PREFIX}_author.id"))
    author: Mapped[Author] = relationship(back_populates="books", lazy="raise")


class NewAuthor(BaseModel):
    name: str
    books: list[str] = []


def create_app() -> FastAPI:
    """A fresh app, its own engine opened and closed by its lifespan (one per test)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = create_async_engine(DSN, pool_size=5)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
        async with app.state.sessions() as session:
            for a in range(10):
                author = Author(name=f"author {a}")
                author.books = [Book(title=f"book {a}.{b}") for b in range(3)]
                session.add(author)
            await session.commit()
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    if os.environ.get("SUITE_AGENT") == "1":
        import perfagent

        perfagent.init(app, metrics_port=0)  # as the README shows, in the app's factory

    async def session_of(request_app: FastAPI = Depends(lambda: app)):
        async with request_app.state.sessions() as session:
            yield session

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/authors")
    async def authors(session: AsyncSession = Depends(session_of)):
        rows = await session.scalars(select(Author).options(selectinload(Author.books)))
        return [{"id": a.id, "name": a.name, "books": len(a.books)} for a in rows]

    @app.get("/authors/{author_id}")
    async def author(author_id: int, session: AsyncSession = Depends(session_of)):
        found = await session.get(Author, author_id, options=[selectinload(Author.books)])
        if found is None:
            raise HTTPException(404)
        return {"id": found.id, "name": found.name, "books": [b.title for b in found.books]}

    @app.get("/authors/{author_id}/books")
    async def books(author_id: int, session: AsyncSession = Depends(session_of)):
        rows = await session.scalars(select(Book).where(Book.author_id == author_id))
        return [b.title for b in rows]

    @app.post("/authors", status_code=201)
    async def add_author(new: NewAuthor, session: AsyncSession = Depends(session_of)):
        author = Author(name=new.name, books=[Book(title=t) for t in new.books])
        session.add(author)
        await session.commit()
        return {"id": author.id}

    @app.get("/shelf")
    async def shelf(session: AsyncSession = Depends(session_of)):
        # One query per author: the N+1 a real app's suite exercises too.
        authors = (await session.scalars(select(Author).order_by(Author.id))).all()
        shelf = {}
        for a in authors:
            shelf[a.name] = len(
                (await session.scalars(select(Book).where(Book.author_id == a.id))).all()
            )
        return shelf

    return app
