"""The app's own test suite: ~40 tests, a few hundred requests, each test on a new app."""

from __future__ import annotations

import pytest


def test_health(client):
    for _ in range(5):
        assert client.get("/health").json() == {"ok": True}


@pytest.mark.parametrize("author_id", range(1, 11))
def test_author(client, author_id):
    body = client.get(f"/authors/{author_id}").json()
    assert body["name"] == f"author {author_id - 1}" and len(body["books"]) == 3
    assert len(client.get(f"/authors/{author_id}/books").json()) == 3
    assert client.get("/authors").json()[author_id - 1]["books"] == 3


def test_missing_author(client):
    assert client.get("/authors/999").status_code == 404


@pytest.mark.parametrize("books", [0, 1, 5])
def test_add_author(client, books):
    for n in range(3):
        made = client.post("/authors", json={"name": f"new {n}", "books": ["t"] * books})
        assert made.status_code == 201
        got = client.get(f"/authors/{made.json()['id']}").json()
        assert len(got["books"]) == books
    assert len(client.get("/authors").json()) == 13


@pytest.mark.parametrize("round_", range(20))
def test_listing_and_shelf(client, round_):
    for _ in range(4):
        assert len(client.get("/authors").json()) == 10
    assert sum(client.get("/shelf").json().values()) == 30
    assert client.get(f"/authors/{round_ % 10 + 1}/books").status_code == 200
