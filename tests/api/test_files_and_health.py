"""The signed file route, health, readiness, metrics and Redis outages."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from shared.signing import sign_file_token
from tests.conftest import make_settings


def stored_file(client: TestClient, key: str, data: bytes) -> str:
    storage = client.app.state.services.storage  # type: ignore[attr-defined]
    storage.put(key, data, "image/png")
    return str(storage.url(key, 60))


def test_signed_link_downloads_the_stored_bytes_without_an_api_key(client: TestClient) -> None:
    url = stored_file(client, "job_x/1/0.png", b"\x89PNG-bytes")
    response = client.get(url.replace("http://testserver", ""))
    assert response.status_code == 200
    assert response.content == b"\x89PNG-bytes"
    assert response.headers["content-type"] == "image/png"


def test_tampered_expired_and_garbage_links_are_404(client: TestClient) -> None:
    url = stored_file(client, "job_x/1/0.png", b"data")
    token = url.rsplit("/", 1)[1]
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    expired = sign_file_token("job_x/1/0.png", int(time.time()) - 1, b"test-signing-key")
    for bad in (tampered, expired, "garbage", "a.b", ""):
        response = client.get(f"/v1/files/{bad}")
        assert response.status_code == 404, bad
        assert response.json()["error"]["code"] in {"file_not_found", "not_found"}


def test_link_to_a_key_outside_storage_is_404(client: TestClient) -> None:
    token = sign_file_token("../../etc/passwd", int(time.time()) + 60, b"test-signing-key")
    assert client.get(f"/v1/files/{token}").status_code == 404


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"redis": "ok", "storage": "ok"}}


def test_metrics_count_requests_by_route(client: TestClient) -> None:
    client.get("/healthz")
    text = client.get("/metrics").text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert any(
        s.name == "fluxgate_http_requests_total" and s.labels["route"] == "/healthz" and s.value >= 1
        for s in samples
    )


def test_redis_down_is_503_with_retry_after_and_not_ready(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/jobs", json={"prompt": "x"}, headers={"Authorization": "Bearer fg_any"})
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        assert response.json()["error"]["code"] == "redis_unavailable"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("unavailable")
