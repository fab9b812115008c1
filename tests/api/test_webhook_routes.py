"""The webhook secret routes: per-owner secrets, created on first use, and rotation."""

from __future__ import annotations

from fastapi.testclient import TestClient

from shared.webhook_secrets import WebhookSecrets
from tests.api.conftest import Keys, auth


def test_get_creates_the_owners_secret_once(client: TestClient, keys: Keys) -> None:
    first = client.get("/v1/webhooks/default/secret", headers=auth(keys.alice))
    assert first.status_code == 200
    assert first.headers["cache-control"] == "no-store"
    key = first.json()["key"]
    assert key.startswith("whsec_")
    assert client.get("/v1/webhooks/default/secret", headers=auth(keys.alice)).json() == {"key": key}
    assert client.get("/v1/webhooks/default/secret", headers=auth(keys.bob)).json()["key"] != key


def test_rotate_issues_a_new_secret_and_keeps_the_old_one_signing(client: TestClient, keys: Keys) -> None:
    old = client.get("/v1/webhooks/default/secret", headers=auth(keys.alice)).json()["key"]
    rotated = client.post("/v1/webhooks/default/secret/rotate", headers=auth(keys.alice))
    assert rotated.status_code == 200
    body = rotated.json()
    assert body["key"] != old and body["previous_valid_until"].endswith("Z")
    assert client.get("/v1/webhooks/default/secret", headers=auth(keys.alice)).json() == {"key": body["key"]}
    services = client.app.state.services  # type: ignore[attr-defined]
    secrets = WebhookSecrets(services.redis, services.settings.webhook_secret_overlap_s)
    assert secrets.signing_secrets("alice") == [body["key"], old]


def test_the_secret_routes_need_a_key(client: TestClient) -> None:
    assert client.get("/v1/webhooks/default/secret").status_code == 401
    response = client.post("/v1/webhooks/default/secret/rotate", headers=auth("fg_nope"))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
