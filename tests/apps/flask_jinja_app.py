"""Flask + Flask-SQLAlchemy: a lazy load per row inside a Jinja ``{% for %}``.

The query runs in the template's compiled code, whose line numbers are not the
template's: the call site must be the template's own line, for a file template
(templates/authors.html) and for render_template_string alike.
"""

import os

from flask import Flask, render_template, render_template_string
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, mapped_column, relationship

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{os.environ['DB_PATH']}"
db = SQLAlchemy(app)


class Author(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list["Book"]] = relationship(back_populates="author")


class Book(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("author.id"))
    title: Mapped[str]
    author: Mapped[Author] = relationship(back_populates="books")


with app.app_context():
    db.create_all()
    if not db.session.scalar(db.select(Author.id).limit(1)):
        for i in range(1, 9):
            db.session.add(Author(name=f"a{i}", books=[Book(title=f"b{i}-{j}") for j in range(2)]))
        db.session.commit()


@app.route("/authors")
def authors():
    return render_template("authors.html", authors=db.session.scalars(db.select(Author)).all())


# The template line the tests expect is counted from the line after STRING's quotes.
STRING = """<ul>
{% for author in authors %}
  <li>{{ author.name }}
  ({{ author.books|length }} books)</li>
{% endfor %}
</ul>"""
STRING_LAZY_LINE = 4


@app.route("/authors-string")
def authors_string():
    return render_template_string(STRING, authors=db.session.scalars(db.select(Author)).all())
