"""Client integration over the real stack: cancel a running job, priorities, Prefer: wait, deadlines."""

from __future__ import annotations

from typing import Any

from tests.integration.conftest import Stack
from tests.support import wait_for


def submit(stack: Stack, body: dict[str, Any], **headers: str) -> Any:
    with stack.client() as client:
        return client.post("/v1/jobs", json=body, headers=headers)


def get(stack: Stack, job_id: str) -> dict[str, Any]:
    with stack.client() as client:
        return dict(client.get(f"/v1/jobs/{job_id}").json())


def test_running_job_is_observed_stopping_mid_steps_when_canceled(file_stack: Stack) -> None:
    job = submit(
        file_stack, {"prompt": "long", "width": 1024, "height": 1024, "num_inference_steps": 60}
    ).json()
    wait_for(lambda: get(file_stack, job["id"])["progress"]["step"] >= 2, 60, "the job to run a few steps")
    with file_stack.client() as client:
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    done = file_stack.wait_for_job(job["id"])
    assert done["status"] == "canceled" and done["result"] is None and done["error"] is None
    assert 2 <= done["progress"]["step"] < 60


def test_prefer_wait_returns_the_finished_job(file_stack: Stack) -> None:
    response = submit(file_stack, {"prompt": "quick"}, Prefer="wait=30")
    assert response.status_code == 200 and response.json()["status"] == "succeeded"
    assert response.json()["result"]["images"]


def test_deadline_cancels_a_job_that_waits_without_a_worker(file_stack: Stack) -> None:
    job = submit(file_stack, {"model": "flux-idle", "prompt": "never", "cancel_after": 0.5}).json()
    done = file_stack.wait_for_job(job["id"], timeout=15)
    assert done["status"] == "canceled" and done["error"]["code"] == "deadline_exceeded"


def test_higher_priority_jobs_run_first_fifo_within_a_class(file_stack: Stack) -> None:
    order = ["low", "normal", "high", "normal", "high"]
    ids = [submit(file_stack, {"model": "flux-idle", "prompt": p, "priority": p}).json()["id"] for p in order]
    file_stack.start("idle-worker", "worker", "--model-name", "flux-idle", "--device", "cpu", "--no-warmup")
    finished = [file_stack.wait_for_job(job_id, timeout=120) for job_id in ids]
    started = sorted(range(len(ids)), key=lambda i: finished[i]["started_at"])
    assert [order[i] for i in started] == ["high", "high", "normal", "normal", "low"]
    assert started[:2] == [2, 4] and started[2:4] == [1, 3]


def test_webhook_receives_signed_events_of_a_job_run_by_the_worker(file_stack: Stack) -> None:
    from standardwebhooks import Webhook

    from tests.integration.test_webhooks import Receiver, serve

    receiver = Receiver()
    server = serve(receiver)
    try:
        url = receiver.url("/e2e")
        job = submit(file_stack, {"prompt": "hooked", "webhook_url": url}).json()
        received = wait_for(lambda: receiver.at("/e2e", at_least=3), 60, "three webhook deliveries")
        with file_stack.client() as client:
            secret = client.get("/v1/webhooks/default/secret").json()["key"]
        types = []
        for request in received:
            Webhook(secret).verify(request.body, request.headers)
            assert request.payload["data"]["id"] == job["id"]
            types.append(request.payload["type"])
        assert sorted(types) == ["job.queued", "job.started", "job.succeeded"]
        succeeded = next(r.payload for r in received if r.payload["type"] == "job.succeeded")
        assert succeeded["data"]["status"] == "succeeded" and succeeded["data"]["result"]["images"]
    finally:
        server.shutdown()
        server.server_close()
