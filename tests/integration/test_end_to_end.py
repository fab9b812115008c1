"""A new user's path through the real stack: submit over HTTP, a Celery worker runs the tiny FLUX model,
the images land in local storage and download through signed links."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import httpx
from PIL import Image

from tests.integration.conftest import Stack


def submit(stack: Stack, body: dict[str, object], key: str | None = None) -> dict[str, object]:
    with stack.client(*([key] if key else [])) as client:
        response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == f"/v1/jobs/{response.json()['id']}"
    return response.json()


def download(url: str) -> httpx.Response:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return response


def test_job_goes_from_queued_to_succeeded_with_downloadable_images(file_stack: Stack) -> None:
    job = submit(file_stack, {"prompt": "a lighthouse", "seed": 42, "num_images": 2, "metadata": {"k": "v"}})
    assert job["status"] == "queued"
    done = file_stack.wait_for_job(str(job["id"]))
    assert done["status"] == "succeeded", done["error"]
    assert done["started_at"] and done["finished_at"] and done["queue_position"] is None
    assert done["progress"] == {"step": 3, "total": 3}
    assert done["metadata"] == {"k": "v"}
    metrics = done["metrics"]
    assert metrics["inference_s"] > 0 and metrics["queue_s"] >= 0 and metrics["upload_s"] >= 0
    assert metrics["peak_memory_mb"] > 0 and metrics["cached_steps"] == 0
    images = done["result"]["images"]
    assert [image["seed"] for image in images] == [42, 43]
    for image in images:
        data = download(image["url"]).content
        assert hashlib.sha256(data).hexdigest() == image["sha256"]
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.format == "PNG" and decoded.size == (image["width"], image["height"]) == (64, 64)
    assert done["result"]["expires_at"]


def test_events_record_every_transition(file_stack: Stack) -> None:
    from shared.redis_client import connect

    job = submit(file_stack, {"prompt": "events"})
    file_stack.wait_for_job(str(job["id"]))
    redis = connect(file_stack.env["FLUXGATE_REDIS_URL"])
    types = [fields["type"] for _, fields in redis.xrange(f"fg:job:{job['id']}:events")]
    assert types[:2] == ["job.queued", "job.started"] and types[-1] == "job.succeeded"
    assert types.count("job.progress") == 3


def test_output_formats_download_with_their_content_type(file_stack: Stack) -> None:
    for output_format, pil_format in (("jpeg", "JPEG"), ("webp", "WEBP")):
        job = submit(file_stack, {"prompt": "formats", "output_format": output_format, "output_quality": 70})
        image = file_stack.wait_for_job(str(job["id"]))["result"]["images"][0]
        response = download(image["url"])
        assert response.headers["content-type"] == image["content_type"] == f"image/{output_format}"
        with Image.open(io.BytesIO(response.content)) as decoded:
            assert decoded.format == pil_format


def test_same_seed_and_parameters_give_the_same_bytes(file_stack: Stack) -> None:
    body = {"prompt": "reproducible", "seed": 1234, "width": 80, "height": 64}
    first, second = (file_stack.wait_for_job(str(submit(file_stack, body)["id"])) for _ in range(2))
    assert first["result"]["images"][0]["sha256"] == second["result"]["images"][0]["sha256"]
    other = file_stack.wait_for_job(str(submit(file_stack, {**body, "seed": 1235})["id"]))
    assert other["result"]["images"][0]["sha256"] != first["result"]["images"][0]["sha256"]


def test_job_for_a_model_without_workers_waits_queued(file_stack: Stack) -> None:
    first = submit(file_stack, {"model": "flux-idle", "prompt": "later"})
    second = submit(file_stack, {"model": "flux-idle", "prompt": "later"})
    with file_stack.client() as client:
        assert client.get(f"/v1/jobs/{second['id']}").json()["queue_position"] == 1
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["flux-idle"]["live_workers"] == 0 and models["flux-tiny"]["live_workers"] == 1
        assert client.get(f"/v1/jobs/{first['id']}").json()["status"] == "queued"


def test_keys_cli_creates_a_working_user_key_isolated_from_other_owners(file_stack: Stack) -> None:
    created = subprocess.run(
        [sys.executable, "-m", "shared.cli", "keys", "create", "--owner", "carol"],
        env=file_stack.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    carol = created.stdout.strip().splitlines()[-1]
    job = submit(file_stack, {"prompt": "mine"}, key=carol)
    assert file_stack.wait_for_job(str(job["id"]), key=carol)["status"] == "succeeded"
    with file_stack.client() as admin_as_user:  # the admin key's owner is another owner on user routes
        assert admin_as_user.get(f"/v1/jobs/{job['id']}").status_code == 404
    with file_stack.client(carol) as client:
        assert [j["id"] for j in client.get("/v1/jobs").json()["data"]] == [job["id"]]


def test_worker_refuses_to_start_when_the_pipeline_lacks_configured_capabilities(
    file_stack: Stack, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "worker", "--model-name", "flux-edit", "--no-warmup"],
        env=file_stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "flux-edit" in result.stderr and "edit" in result.stderr
