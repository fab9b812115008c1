"""POST /v1/jobs in one submit script: the queue position it answers, and nothing written when refused."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from shared.queue import broker_lists
from tests.api.conftest import Keys, auth


def submit(client: TestClient, key: str, **headers: str) -> Any:
    return client.post("/v1/jobs", json={"prompt": "x"}, headers={**auth(key), **headers})


def test_submitted_queue_position_is_the_fair_share_rank_a_later_read_reports(
    client: TestClient, keys: Keys
) -> None:
    # alice queues three, then bob one: bob's job is served in round 1 with alice's first, so it goes
    # ahead of her second and third (fair share), and the answer at submission says so.
    alice = [submit(client, keys.alice).json() for _ in range(3)]
    bob = submit(client, keys.bob).json()
    assert [job["queue_position"] for job in alice] == [0, 1, 2]
    assert bob["queue_position"] == 1
    read = {
        job["id"]: client.get(f"/v1/jobs/{job['id']}", headers=auth(key)).json()["queue_position"]
        for job, key in [*((job, keys.alice) for job in alice), (bob, keys.bob)]
    }
    assert read == {alice[0]["id"]: 0, bob["id"]: 1, alice[1]["id"]: 2, alice[2]["id"]: 3}


def test_each_submission_pushes_exactly_one_task_message(client: TestClient, keys: Keys) -> None:
    for priority in ("high", "normal", "low"):
        client.post("/v1/jobs", json={"prompt": "x", "priority": priority}, headers=auth(keys.alice))
    redis = client.app.state.services.redis  # type: ignore[attr-defined]
    assert [redis.llen(name) for name in broker_lists("gen.flux-tiny")] == [1, 1, 1]


def test_a_refused_submission_writes_no_job_and_no_message(
    client: TestClient, keys: Keys, settings: Any
) -> None:
    settings.limits.max_active_jobs_per_owner = 1
    assert submit(client, keys.alice).status_code == 202
    refused = submit(client, keys.alice)
    assert refused.status_code == 429
    assert refused.headers["X-RateLimit-Limit"] == "1" and refused.headers["Retry-After"] == "5"
    redis = client.app.state.services.redis  # type: ignore[attr-defined]
    assert sum(redis.llen(name) for name in broker_lists("gen.flux-tiny")) == 1
    assert redis.zcard("fg:jobs") == 1
    listed = client.get("/v1/jobs", headers=auth(keys.alice)).json()["data"]
    assert len(listed) == 1
