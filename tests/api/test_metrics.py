"""The gateway's /metrics: submissions by model, queue depth per model and priority, Redis down."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from tests.api.conftest import Keys, auth
from tests.conftest import make_settings


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape, keyed by name and sorted labels."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def submitted(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], model: str) -> float:
    return samples.get(("fluxgate_jobs_submitted_total", (("model", model),)), 0.0)


def test_submissions_are_counted_by_model(client: TestClient, keys: Keys) -> None:
    before = submitted(scrape(client), "flux-tiny")
    for _ in range(2):
        response = client.post("/v1/jobs", json={"prompt": "x"}, headers=auth(keys.alice))
        assert response.status_code == 202
    assert submitted(scrape(client), "flux-tiny") == before + 2


def test_idempotent_replay_is_not_counted_twice(client: TestClient, keys: Keys) -> None:
    headers = {**auth(keys.alice), "Idempotency-Key": "once"}
    for _ in range(2):
        assert client.post("/v1/jobs", json={"prompt": "x"}, headers=headers).status_code in (200, 202)
    assert submitted(scrape(client), "flux-tiny") == 1


def test_queue_depth_per_priority_and_running_jobs(client: TestClient, keys: Keys) -> None:
    for priority in ("high", "low", "low", "normal"):
        client.post("/v1/jobs", json={"prompt": "x", "priority": priority}, headers=auth(keys.alice))
    samples = scrape(client)
    depth = {
        priority: samples[("fluxgate_queue_depth", (("model", "flux-tiny"), ("priority", priority)))]
        for priority in ("high", "normal", "low")
    }
    assert depth == {"high": 1.0, "normal": 1.0, "low": 2.0}
    assert samples[("fluxgate_redis_up", ())] == 1.0
    assert samples[("fluxgate_jobs_running", (("model", "flux-tiny"),))] == 0.0

    queued = client.get("/v1/jobs", headers=auth(keys.alice)).json()["data"][0]["id"]
    client.app.state.services.store.claim(queued, 1, "w1", max_attempts=3)  # type: ignore[attr-defined]
    samples = scrape(client)
    assert samples[("fluxgate_jobs_running", (("model", "flux-tiny"),))] == 1.0


def test_redis_down_still_scrapes_with_redis_up_zero(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    with TestClient(create_app(settings)) as client:
        scrape(client)
        samples = scrape(client)  # the first scrape is counted once it has been answered
    assert samples[("fluxgate_redis_up", ())] == 0.0
    assert not any(name == "fluxgate_queue_depth" for name, _ in samples)
    assert any(name == "fluxgate_http_requests_total" for name, _ in samples)
