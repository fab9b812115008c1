"""Gateway fixtures: the app on a real Redis, with keys for two owners and an admin."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from shared.keys import KeyStore
from shared.settings import Settings


@dataclass
class Keys:
    alice: str
    bob: str
    admin: str


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def keys(client: TestClient) -> Keys:
    store = KeyStore(client.app.state.services.redis)  # type: ignore[attr-defined]
    return Keys(store.create("alice"), store.create("bob"), store.create("root", "admin"))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
