"""A small Flask app to try perfagent on.

perfagent run -- gunicorn -w 2 --chdir examples flask_app:app
perfagent run -- flask --app examples/flask_app run
"""

import time

from flask import Blueprint, Flask

app = Flask(__name__)
blog = Blueprint("blog", __name__, url_prefix="/blog")


@app.get("/")
def home():
    return {"try": ["/users/1", "/blog/posts/hello", "/report"]}


@app.get("/users/<int:user_id>")
def user(user_id):
    return {"user": user_id}


@blog.get("/posts/<slug>")
def post(slug):
    return {"post": slug}


@app.get("/report")
def report():
    time.sleep(0.7)  # over the default 500 ms: logged as a slow_request
    return {"rows": 1000}


app.register_blueprint(blog)
