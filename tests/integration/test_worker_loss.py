"""A worker killed mid-job: the sweeper requeues the job and another worker completes it."""

from __future__ import annotations

import os
import signal

from shared.redis_client import connect
from tests.integration.conftest import Stack
from tests.support import wait_for


def test_job_of_a_sigkilled_worker_completes_on_another_worker(file_stack: Stack) -> None:
    with file_stack.client() as client:
        job = client.post(
            "/v1/jobs", json={"prompt": "survive", "width": 1024, "height": 1024, "num_inference_steps": 40}
        ).json()

        def running() -> bool:
            current = client.get(f"/v1/jobs/{job['id']}").json()
            return bool(current["status"] == "running" and current["progress"]["step"] >= 1)

        wait_for(running, 60, "the job to start")
    worker = next(p for p in file_stack.processes if "worker" in " ".join(map(str, p.args)))
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
    file_stack.start("worker-2", "worker", "--model-name", "flux-tiny", "--device", "cpu", "--no-warmup")
    done = file_stack.wait_for_job(job["id"], timeout=120)
    assert done["status"] == "succeeded" and done["attempt"] == 2
    redis = connect(file_stack.env["FLUXGATE_REDIS_URL"])
    types = [fields["type"] for _, fields in redis.xrange(f"fg:job:{job['id']}:events")]
    assert types.count("job.requeued") == 1 and types.count("job.succeeded") == 1


def test_sigterm_finishes_the_current_job_then_stops_taking_new_ones(file_stack: Stack) -> None:
    file_stack.start("worker-3", "worker", "--model-name", "flux-idle", "--device", "cpu", "--no-warmup")
    file_stack.wait_for_workers("flux-idle", 1)
    with file_stack.client() as client:
        body = {
            "model": "flux-idle",
            "prompt": "finish me",
            "width": 1024,
            "height": 1024,
            "num_inference_steps": 30,
        }
        first = client.post("/v1/jobs", json=body).json()
        wait_for(
            lambda: client.get(f"/v1/jobs/{first['id']}").json()["status"] == "running",
            60,
            "the job to start",
        )
        second = client.post("/v1/jobs", json=body).json()
    worker = file_stack.processes[-1]
    os.killpg(worker.pid, signal.SIGTERM)
    assert file_stack.wait_for_job(first["id"], timeout=120)["status"] == "succeeded"
    # Celery ends a warm shutdown by re-raising SIGTERM on itself once the worker has stopped.
    assert worker.wait(timeout=60) in (0, -signal.SIGTERM)
    with file_stack.client() as client:
        assert client.get(f"/v1/jobs/{second['id']}").json()["status"] == "queued"
        live = {m["id"]: m["live_workers"] for m in client.get("/v1/models").json()["data"]}
        assert live["flux-idle"] == 0  # deregistered on a clean stop
