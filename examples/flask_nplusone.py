"""Flask + Flask-SQLAlchemy: an N+1 and its fix.

    pip install flask-sqlalchemy
    perfagent run -- flask --app examples/flask_nplusone run

/posts lazy-loads each post's comments in the loop (one query per post: the
agent logs an n_plus_one naming the loop line); /posts/fixed loads them with
selectinload in one extra query.
"""

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ForeignKey, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///perfagent-example-flask.sqlite"
db.init_app(app)


class Post(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    comments: Mapped[list["Comment"]] = relationship(back_populates="post")


class Comment(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    post_id: Mapped[int] = mapped_column(ForeignKey("post.id"))
    body: Mapped[str]
    post: Mapped[Post] = relationship(back_populates="comments")


with app.app_context():
    db.create_all()
    if db.session.scalar(select(Post.id).limit(1)) is None:
        for i in range(20):
            db.session.add(Post(title=f"post {i}", comments=[Comment(body="nice")] * 1))
        db.session.commit()


@app.get("/posts")
def posts():
    rows = db.session.scalars(select(Post)).all()
    return {post.title: len(post.comments) for post in rows}  # one query per post


@app.get("/posts/fixed")
def posts_fixed():
    rows = db.session.scalars(select(Post).options(selectinload(Post.comments))).all()
    return {post.title: len(post.comments) for post in rows}
