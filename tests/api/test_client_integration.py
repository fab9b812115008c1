"""Cancellation, deadlines, idempotency, Prefer: wait, priority and webhook options on the gateway."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared.jobstore import JobStore
from shared.sweeper import sweep_deadlines
from tests.api.conftest import Keys, auth


def store_of(client: TestClient) -> JobStore:
    return client.app.state.services.store  # type: ignore[attr-defined, no-any-return]


def submit(client: TestClient, key: str, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/v1/jobs", json=body, headers={**auth(key), **headers})


def cancel(client: TestClient, key: str, job_id: str) -> Any:
    return client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))


def test_canceling_a_queued_job_means_it_never_runs(client: TestClient, keys: Keys) -> None:
    job = submit(client, keys.alice, {"prompt": "x"}).json()
    response = cancel(client, keys.alice, job["id"])
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["error"]) == ("canceled", None)
    assert store_of(client).claim(job["id"], 1, "w1", max_attempts=3) is None
    assert cancel(client, keys.alice, job["id"]).status_code == 200  # canceling again is fine


def test_canceling_a_running_job_flags_it_for_its_worker(client: TestClient, keys: Keys) -> None:
    job = submit(client, keys.alice, {"prompt": "x"}).json()
    store = store_of(client)
    store.claim(job["id"], 1, "w1", max_attempts=3)
    assert cancel(client, keys.alice, job["id"]).json()["status"] == "running"
    assert store.record_progress(job["id"], 1, "w1", 1, 2) == "cancel"


def test_finished_jobs_cannot_be_canceled_and_others_jobs_are_404(client: TestClient, keys: Keys) -> None:
    job = submit(client, keys.alice, {"prompt": "x"}).json()
    store = store_of(client)
    store.claim(job["id"], 1, "w1", max_attempts=3)
    store.transition(job["id"], "succeeded", allowed_from={"running"}, fields={"images": []})
    response = cancel(client, keys.alice, job["id"])
    assert response.status_code == 409 and response.json()["error"]["code"] == "job_not_cancelable"
    assert cancel(client, keys.bob, job["id"]).status_code == 404


def test_deadline_cancels_a_queued_job_with_deadline_exceeded(client: TestClient, keys: Keys) -> None:
    job = submit(client, keys.alice, {"prompt": "x", "cancel_after": 5}).json()
    store = store_of(client)
    assert sweep_deadlines(store, now=time.time()) == 0
    assert sweep_deadlines(store, now=time.time() + 6) == 1
    record = client.get(f"/v1/jobs/{job['id']}", headers=auth(keys.alice)).json()
    assert record["status"] == "canceled" and record["error"]["code"] == "deadline_exceeded"
    assert sweep_deadlines(store, now=time.time() + 60) == 0  # handled once


def test_same_idempotency_key_and_body_returns_the_same_job_once(client: TestClient, keys: Keys) -> None:
    body = {"prompt": "once", "seed": 1}
    first = submit(client, keys.alice, body, **{"Idempotency-Key": "order-17"})
    again = submit(client, keys.alice, body, **{"Idempotency-Key": "order-17"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    listed = client.get("/v1/jobs", headers=auth(keys.alice)).json()["data"]
    assert len(listed) == 1
    other_owner = submit(client, keys.bob, body, **{"Idempotency-Key": "order-17"})
    assert other_owner.status_code == 202 and other_owner.json()["id"] != first.json()["id"]


def test_same_idempotency_key_with_another_body_is_409(client: TestClient, keys: Keys) -> None:
    submit(client, keys.alice, {"prompt": "one"}, **{"Idempotency-Key": "k"})
    response = submit(client, keys.alice, {"prompt": "two"}, **{"Idempotency-Key": "k"})
    assert response.status_code == 409
    assert response.json()["error"] == {
        "message": "This Idempotency-Key was used with a different request body.",
        "type": "conflict_error",
        "param": "Idempotency-Key",
        "code": "idempotency_conflict",
    }


def test_prefer_wait_returns_202_when_the_job_is_not_done_in_time(client: TestClient, keys: Keys) -> None:
    started = time.monotonic()
    response = submit(client, keys.alice, {"prompt": "x"}, Prefer="wait=1")
    assert response.status_code == 202 and response.json()["status"] == "queued"
    assert response.headers["Preference-Applied"] == "wait=1"
    assert 0.9 < time.monotonic() - started < 5


def test_prefer_wait_returns_200_with_the_finished_job(client: TestClient, keys: Keys) -> None:
    store = store_of(client)

    def finish_next_job() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            jobs, _ = store.list_for_owner("alice", "queued", 1, None)
            if jobs:
                store.claim(jobs[0].id, 1, "w1", max_attempts=3)
                time.sleep(0.2)
                store.transition(jobs[0].id, "succeeded", allowed_from={"running"}, fields={"images": []})
                return
            time.sleep(0.05)

    worker = threading.Thread(target=finish_next_job)
    worker.start()
    response = submit(client, keys.alice, {"prompt": "x"}, Prefer="respond-async, wait=10")
    worker.join(timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "succeeded"


@pytest.mark.parametrize("prefer", ["wait=soon", "wait=-1"])
def test_bad_prefer_wait_is_400(client: TestClient, keys: Keys, prefer: str) -> None:
    response = submit(client, keys.alice, {"prompt": "x"}, Prefer=prefer)
    assert response.status_code == 400 and response.json()["error"]["param"] == "Prefer"


def test_priority_orders_the_queue_and_the_broker_lists(client: TestClient, keys: Keys) -> None:
    ids = {
        p: submit(client, keys.alice, {"prompt": p, "priority": p}).json()["id"]
        for p in ("low", "normal", "high")
    }
    positions = {
        p: client.get(f"/v1/jobs/{i}", headers=auth(keys.alice)).json()["queue_position"]
        for p, i in ids.items()
    }
    assert positions == {"high": 0, "normal": 1, "low": 2}
    redis = client.app.state.services.redis  # type: ignore[attr-defined]
    lists = {name: redis.llen(name) for name in ("gen.flux-tiny", "gen.flux-tiny:3", "gen.flux-tiny:6")}
    assert lists == {"gen.flux-tiny": 1, "gen.flux-tiny:3": 1, "gen.flux-tiny:6": 1}


def test_webhook_options_are_recorded_with_default_events(client: TestClient, keys: Keys) -> None:
    job = submit(client, keys.alice, {"prompt": "x", "webhook_url": "http://127.0.0.1:9/fg"}).json()
    record = store_of(client).get(job["id"])
    assert record is not None and record.webhook_url == "http://127.0.0.1:9/fg"
    assert "job.progress" not in record.webhook_events and "job.succeeded" in record.webhook_events
    chosen = submit(
        client,
        keys.alice,
        {
            "prompt": "x",
            "webhook_url": "http://127.0.0.1:9/fg",
            "webhook_events": ["job.succeeded", "job.progress"],
        },
    ).json()
    assert store_of(client).get(chosen["id"]).webhook_events == ["job.succeeded", "job.progress"]  # type: ignore[union-attr]
    assert json.dumps(job).count("webhook") == 0  # the job object does not echo the webhook URL


def test_queue_positions_stay_exact_under_concurrent_submissions(client: TestClient, keys: Keys) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        jobs = list(pool.map(lambda i: submit(client, keys.alice, {"prompt": f"p{i}"}).json(), range(24)))
    positions = sorted(
        client.get(f"/v1/jobs/{job['id']}", headers=auth(keys.alice)).json()["queue_position"] for job in jobs
    )
    assert positions == list(range(24))


def test_full_queue_is_429_with_retry_after_and_stores_nothing(
    client: TestClient, keys: Keys, settings: Any
) -> None:
    settings.limits.max_queued_jobs_per_model = 2
    assert [submit(client, keys.alice, {"prompt": "x"}).status_code for _ in range(2)] == [202, 202]
    response = submit(client, keys.alice, {"prompt": "x"})
    assert response.status_code == 429 and response.headers["Retry-After"] == "30"
    assert response.json()["error"]["code"] == "queue_full"
    assert len(client.get("/v1/jobs", headers=auth(keys.alice)).json()["data"]) == 2
    store_of(client).claim(
        client.get("/v1/jobs", headers=auth(keys.alice)).json()["data"][0]["id"], 1, "w", 3
    )
    assert submit(client, keys.alice, {"prompt": "x"}).status_code == 202  # room again once one runs


def test_submission_rate_per_key_is_429_with_rate_limit_headers(
    client: TestClient, keys: Keys, settings: Any
) -> None:
    settings.limits.submissions_per_minute = 3
    codes = [submit(client, keys.alice, {"prompt": f"p{i}"}).status_code for i in range(3)]
    refused = submit(client, keys.alice, {"prompt": "one too many"})
    assert codes == [202, 202, 202] and refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["X-RateLimit-Limit"] == "3" and refused.headers["X-RateLimit-Remaining"] == "0"
    assert 0 < int(refused.headers["Retry-After"]) <= 61
    assert submit(client, keys.bob, {"prompt": "another key"}).status_code == 202
    assert client.get("/v1/jobs", headers=auth(keys.alice)).status_code == 200  # reads are not limited


def test_active_jobs_per_owner_are_capped_and_replays_still_answer(
    client: TestClient, keys: Keys, settings: Any
) -> None:
    settings.limits.max_active_jobs_per_owner = 2
    first = submit(client, keys.alice, {"prompt": "a"}, **{"Idempotency-Key": "k1"})
    submit(client, keys.alice, {"prompt": "b"})
    refused = submit(client, keys.alice, {"prompt": "c"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_active_jobs"
    replay = submit(client, keys.alice, {"prompt": "a"}, **{"Idempotency-Key": "k1"})
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    cancel(client, keys.alice, first.json()["id"])
    assert submit(client, keys.alice, {"prompt": "c"}).status_code == 202
