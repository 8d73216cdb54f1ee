"""Each test gets a new app (with SUITE_AGENT=1 its factory calls ``perfagent.init(app)``)."""

from __future__ import annotations

import pytest
from app import create_app
from fastapi.testclient import TestClient


@pytest.fixture
def client():
    """A new app per test, its lifespan run, as many FastAPI suites do."""
    with TestClient(create_app()) as test_client:
        yield test_client
