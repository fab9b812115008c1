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
