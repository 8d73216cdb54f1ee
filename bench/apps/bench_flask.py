"""Flask app served by the benchmark under gunicorn."""

from flask import Flask

app = Flask(__name__)


@app.get("/hello")
def hello():
    return {"hello": "world"}


@app.get("/items/<int:item_id>")
def item(item_id):
    return {"item": item_id}
