"""Flask app used by the tests: blueprints, a MethodView, streaming, errors."""

import os
import random
import sys
import time

from flask import Blueprint, Flask, Response
from flask.views import MethodView

app = Flask(__name__)
if os.environ.get("APP_RANDOM_SEED"):  # an app that seeds random alike in every worker
    random.seed(int(os.environ["APP_RANDOM_SEED"]))
shop = Blueprint("shop", __name__, url_prefix="/shop")


@app.get("/hello")
def hello():
    return "hello"


@app.get("/users/<int:uid>")
def user(uid):
    return {"user": uid}


@shop.get("/items/<name>")
def shop_item(name):
    return {"item": name}


app.register_blueprint(shop)


class ThingView(MethodView):
    def get(self, tid):
        return {"thing": tid}

    def post(self, tid):
        return {"updated": tid}


app.add_url_rule("/things/<int:tid>", view_func=ThingView.as_view("thing"))


@app.get("/fail")
def fail():
    raise RuntimeError("boom")


@app.get("/stream")
def stream():
    def chunks():
        for i in range(3):
            yield f"chunk {i}\n"
            time.sleep(0.3)

    return Response(chunks(), mimetype="text/plain")


@app.get("/propagate")
def propagate_context():
    from opentelemetry import propagate

    carrier: dict = {}
    propagate.inject(carrier)
    return carrier


@app.get("/draw")
def draw():
    """The request's trace context (its ids settled first), then one of the app's own
    random numbers."""
    from opentelemetry import propagate

    carrier: dict = {}
    propagate.inject(carrier)
    return {"pid": os.getpid(), "traceparent": carrier["traceparent"], "value": random.random()}


@app.get("/agent")
def agent():
    return {"perfagent_loaded": "perfagent" in sys.modules, "pid": os.getpid()}


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]))
