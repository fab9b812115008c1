"""Batching over the real stack: a worker started with --max-batch-size 4 finds compatible jobs waiting,
runs them in one pipeline call, and each job ends with the image it gets alone."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tests.integration.conftest import Stack

BATCHING_MODEL = "flux-idle"  # no worker of its own in the stack: jobs wait until the test starts one


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def pixels(url: str) -> np.ndarray:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(response.content)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_a_batching_worker_runs_waiting_compatible_jobs_together_with_each_jobs_own_image(
    file_stack: Stack,
) -> None:
    bodies = [{"prompt": f"a lighthouse, take {n}", "seed": 100 + n} for n in range(5)]
    odd = {"prompt": "more steps", "num_inference_steps": 4}  # not compatible: runs alone
    with file_stack.client() as client:
        ids = [submit(client, {"model": BATCHING_MODEL, **body}) for body in bodies[:2]]
        odd_id = submit(client, {"model": BATCHING_MODEL, **odd})
        ids += [submit(client, {"model": BATCHING_MODEL, **body}) for body in bodies[2:]]
        alone = [submit(client, {"model": "flux-tiny", **body}) for body in bodies[:4]]  # same weights
    worker = ["worker", "--model-name", BATCHING_MODEL, "--device", "cpu", "--max-batch-size", "4"]
    file_stack.start("batching-worker", *worker)
    file_stack.wait_for_workers(BATCHING_MODEL, 1)

    done = [file_stack.wait_for_job(job_id, timeout=90) for job_id in ids]
    odd_done = file_stack.wait_for_job(odd_id, timeout=90)
    assert [job["status"] for job in [*done, odd_done]] == ["succeeded"] * 6, [j["error"] for j in done]
    # The first message took the head and the next three compatible jobs, skipping the odd one.
    assert [job["metrics"]["batch_size"] for job in done] == [4, 4, 4, 4, 1]
    assert odd_done["metrics"]["batch_size"] == 1 and odd_done["progress"] == {"step": 4, "total": 4}
    for job, body, reference_id in zip(done, bodies, alone, strict=False):
        [image] = job["result"]["images"]
        assert image["seed"] == body["seed"] and job["progress"] == {"step": 3, "total": 3}
        reference = file_stack.wait_for_job(reference_id, timeout=60)
        assert reference["metrics"]["batch_size"] == 1
        batched, single = pixels(image["url"]), pixels(reference["result"]["images"][0]["url"])
        assert np.abs(batched - single).max() <= 2, job["id"]
    with file_stack.client() as client:
        workers = client.get("/v1/admin/workers").json()["data"]
    assert any(w["model"] == BATCHING_MODEL and w["max_batch_size"] == "4" for w in workers), workers
