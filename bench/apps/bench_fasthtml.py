"""FastHTML page served by the benchmark."""

from fasthtml.common import Li, P, Titled, Ul, fast_app

app, rt = fast_app()


@rt("/")
def get():
    return Titled("Bench", P("A small page"), Ul(*[Li(f"row {i}") for i in range(20)]))


@rt("/items/{item_id}")
def get(item_id: int):  # noqa: F811 - FastHTML takes the method from the handler's name
    return Titled(f"Item {item_id}")
