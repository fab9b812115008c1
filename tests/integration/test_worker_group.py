"""A two-rank worker group (``--num-gpus 2`` on CPU ranks, gloo) behind the real gateway and queue."""

from __future__ import annotations

import io
import os
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from shared.redis_client import connect
from tests.integration.conftest import Stack
from tests.support import wait_for

GROUP_MODEL = "flux-idle"  # the same tiny weights as flux-tiny, served here by the group alone


def start_group(stack: Stack, name: str) -> subprocess.Popen[bytes]:
    process = stack.start(
        name, "worker", "--model-name", GROUP_MODEL, "--device", "cpu", "--num-gpus", "2", "--no-warmup"
    )
    stack.wait_for_workers(GROUP_MODEL, 1)
    return process


def pixels(job: dict[str, object]) -> np.ndarray:
    image = job["result"]["images"][0]  # type: ignore[index]
    data = httpx.get(image["url"], timeout=10).content
    with Image.open(io.BytesIO(data)) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.int16)


def followers_of(process: subprocess.Popen[bytes]) -> list[int]:
    """The group's spawned ranks (multiprocessing's resource tracker is a child too: left out)."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    ranks = []
    for pid in children:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in command and b"resource_tracker" not in command:
            ranks.append(int(pid))
    return ranks


def test_a_group_job_draws_the_one_gpu_image_and_reports_its_layout(file_stack: Stack) -> None:
    group = start_group(file_stack, "group-1")
    body = {"prompt": "two ranks", "seed": 5, "width": 64, "height": 64, "num_inference_steps": 3}
    with file_stack.client() as client:
        split = client.post("/v1/jobs", json={**body, "model": GROUP_MODEL}).json()
        whole = client.post("/v1/jobs", json={**body, "model": "flux-tiny"}).json()
        split_done = file_stack.wait_for_job(split["id"], timeout=120)
        whole_done = file_stack.wait_for_job(whole["id"], timeout=120)
        assert split_done["status"] == whole_done["status"] == "succeeded", split_done["error"]
        assert int(np.abs(pixels(split_done) - pixels(whole_done)).max()) <= 1
        workers = client.get("/v1/admin/workers").json()["data"]
    group_worker = next(w for w in workers if w["model"] == GROUP_MODEL)
    # no Cache-DiT presets on this model: diffusers' runtime ("auto")
    assert group_worker["gpus"] == "2"
    assert group_worker["parallel"] == "ulysses=2,ring=1,tp=1,runtime=diffusers"
    os.killpg(group.pid, signal.SIGTERM)
    assert group.wait(timeout=60) in (0, -signal.SIGTERM)


def test_a_dead_rank_takes_the_group_down_and_its_job_is_requeued(file_stack: Stack) -> None:
    group = start_group(file_stack, "group-2")
    with file_stack.client() as client:
        job = client.post(
            "/v1/jobs",
            json={
                "model": GROUP_MODEL,
                "prompt": "lose a rank",
                "width": 512,
                "height": 512,
                "num_inference_steps": 100,
            },
        ).json()

        def running() -> bool:
            current = client.get(f"/v1/jobs/{job['id']}").json()
            return bool(current["status"] == "running" and current["progress"]["step"] >= 1)

        wait_for(running, 60, "the job to start on the group")
    followers = followers_of(group)
    assert len(followers) == 1
    os.kill(followers[0], signal.SIGKILL)
    assert group.wait(timeout=30) != 0  # rank 0 hands the job back and exits; it never hangs
    with file_stack.client() as client:
        requeued = client.get(f"/v1/jobs/{job['id']}").json()
        assert requeued["status"] == "queued" and requeued["attempt"] == 2
        client.post(f"/v1/jobs/{job['id']}/cancel")  # 100 steps at 512x512 would be slow on one CPU
    redis = connect(file_stack.env["FLUXGATE_REDIS_URL"])
    types = [fields["type"] for _, fields in redis.xrange(f"fg:job:{job['id']}:events")]
    assert types.count("job.requeued") == 1
