"""The official OpenAI SDK against the real stack: generations and edits over the job queue, run by
Celery workers serving the tiny FLUX.1, FLUX.1 Kontext and FLUX.2 pipelines."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from api import quotas
from shared.keys import KeyStore
from shared.redis_client import connect
from tests.integration.conftest import Stack, start_stack
from tests.support import free_port, wait_for

TINY_DEFAULTS = {"width": 64, "height": 64, "num_inference_steps": 3}
EDIT_DEFAULTS = {"width": 64, "height": 64, "num_inference_steps": 2}
# The stack's OpenAI wait: far above a tiny job, far below the SDK's 600 s. A second gateway waits less.
OPENAI_TIMEOUT_S = 60
# the second gateway's wait: long enough for the quota test's two tiny images on a loaded 2-core CI machine
# (2 s ran out there once), short enough for the test that waits it out
SHORT_TIMEOUT_S = 8
SHORT_GATEWAY_RATE = 2  # submissions a minute per key on the second gateway (the quota test)


@dataclass
class OpenAIStack:
    stack: Stack
    short_gateway_url: str
    key: str  # a user key of its own owner, so that listings hold only this module's jobs

    def client(self, base_url: str | None = None, **options: Any) -> OpenAI:
        base = base_url or self.stack.base_url
        return OpenAI(api_key=self.key, base_url=f"{base}/v1", max_retries=0, **{"timeout": 60, **options})

    def jobs(self) -> list[dict[str, Any]]:
        with self.stack.client(self.key) as client:
            data: list[dict[str, Any]] = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
            return data


def models_config(tiny: Path, kontext: Path, flux2: Path) -> str:
    return json.dumps(
        [
            {"name": "flux-tiny", "path": str(tiny), "defaults": TINY_DEFAULTS},
            {"name": "flux-idle", "path": str(tiny), "defaults": TINY_DEFAULTS},  # no worker: jobs wait
            {
                "name": "flux-kontext-tiny",
                "path": str(kontext),
                "defaults": EDIT_DEFAULTS,
                "capabilities": {"edit": True, "max_reference_images": 1, "negative_prompt": True},
            },
            {
                "name": "flux2-tiny",
                "path": str(flux2),
                "defaults": EDIT_DEFAULTS,
                "capabilities": {"edit": True, "max_reference_images": 8},
            },
        ]
    )


@pytest.fixture(scope="module")
def openai_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[OpenAIStack]:
    from worker.tiny_model import save_tiny_model

    tmp = tmp_path_factory.mktemp("openai-stack")
    kontext = save_tiny_model(tmp / "models" / "kontext", kind="kontext")
    flux2 = save_tiny_model(tmp / "models" / "flux2", kind="flux2")
    env = {
        "FLUXGATE_MODELS": models_config(tiny_model_dir, kontext, flux2),
        "FLUXGATE_OPENAI_TIMEOUT_S": str(OPENAI_TIMEOUT_S),
    }
    stack = start_stack(tmp, tiny_model_dir, f"file://{tmp / 'files'}", env)
    try:
        for model in ("flux-kontext-tiny", "flux2-tiny"):
            stack.start(f"worker-{model}", "worker", "--model-name", model, "--device", "cpu")
        port = free_port()
        short = f"http://127.0.0.1:{port}"
        short_env = {
            "FLUXGATE_OPENAI_TIMEOUT_S": str(SHORT_TIMEOUT_S),
            "FLUXGATE_PUBLIC_BASE_URL": short,
            "FLUXGATE_LIMITS__SUBMISSIONS_PER_MINUTE": str(SHORT_GATEWAY_RATE),
        }
        stack.start("gateway-short", "serve", "--port", str(port), env=short_env)
        wait_for(lambda: _ready(short), 30, "the second gateway", interval=0.2)
        stack.wait_for_workers("flux-kontext-tiny", 1)
        stack.wait_for_workers("flux2-tiny", 1)
        key = KeyStore(connect(stack.env["FLUXGATE_REDIS_URL"])).create("sdk-user")
        yield OpenAIStack(stack, short, key)
    finally:
        stack.stop()


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_b64(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_models_list_parses_with_capabilities(openai_stack: OpenAIStack) -> None:
    models = {model.id: model for model in openai_stack.client().models.list()}
    assert set(models) == {"flux-tiny", "flux-idle", "flux-kontext-tiny", "flux2-tiny"}
    flux2 = models["flux2-tiny"]
    assert (flux2.object, flux2.owned_by) == ("model", "fluxgate")
    assert flux2.model_extra is not None and flux2.model_extra["capabilities"]["max_reference_images"] == 8


def test_the_issues_snippet_returns_b64_json(openai_stack: OpenAIStack) -> None:
    client = openai_stack.client()
    r = client.images.generate(
        model="flux-tiny",
        prompt="A cat holding a sign that says hello world",
        size="1024x1024",
        n=1,
        response_format="b64_json",
    )
    assert r.created > 0 and r.data is not None and len(r.data) == 1
    assert r.data[0].revised_prompt == "A cat holding a sign that says hello world"
    with decode_b64(r.data[0].b64_json) as image:
        assert (image.format, image.size) == ("PNG", (1024, 1024))
    assert (r.size, r.output_format) == ("1024x1024", "png")


def test_generate_with_url_links_to_the_jobs_result(openai_stack: OpenAIStack) -> None:
    raw = openai_stack.client().images.with_raw_response.generate(
        model="flux-tiny", prompt="a lighthouse", n=2, response_format="url", extra_body={"seed": 7}
    )
    r = raw.parse()
    job_id = raw.headers["x-fluxgate-job-id"]
    assert r.data is not None and all(image.url for image in r.data)
    job = next(job for job in openai_stack.jobs() if job["id"] == job_id)
    assert job["status"] == "succeeded" and job["metadata"] == {"openai_endpoint": "images/generations"}
    for image, stored in zip(r.data, job["result"]["images"], strict=True):
        assert image.url is not None
        data = httpx.get(image.url, timeout=10).content
        assert hashlib.sha256(data).hexdigest() == stored["sha256"]
    assert [stored["seed"] for stored in job["result"]["images"]] == [7, 8]


def test_edit_with_one_image_on_tiny_kontext(openai_stack: OpenAIStack) -> None:
    raw = openai_stack.client().images.with_raw_response.edit(
        model="flux-kontext-tiny",
        image=("cat.png", png((96, 64), (200, 30, 30)), "image/png"),
        prompt="make the cat blue",
        size="64x64",
        response_format="b64_json",
    )
    r = raw.parse()
    assert r.data is not None
    with decode_b64(r.data[0].b64_json) as image:
        assert image.size == (64, 64)
    job = next(job for job in openai_stack.jobs() if job["id"] == raw.headers["x-fluxgate-job-id"])
    assert [(ref["width"], ref["height"]) for ref in job["params"]["images"]] == [(96, 64)]


def test_edit_with_several_images_on_tiny_flux2(openai_stack: OpenAIStack) -> None:
    images = [(f"{i}.png", png((64 + 16 * i, 64), (40 * i, 90, 200)), "image/png") for i in range(3)]
    raw = openai_stack.client().images.with_raw_response.edit(
        model="flux2-tiny", image=images, prompt="combine them", n=2, response_format="b64_json"
    )
    r = raw.parse()
    assert r.data is not None and len(r.data) == 2
    assert r.size == "64x64"  # size auto: the model's default area at the first image's (square) shape
    job = next(job for job in openai_stack.jobs() if job["id"] == raw.headers["x-fluxgate-job-id"])
    assert [ref["width"] for ref in job["params"]["images"]] == [64, 80, 96]
    assert job["metadata"] == {"openai_endpoint": "images/edits"}


def test_bad_requests_raise_bad_request_error(openai_stack: OpenAIStack) -> None:
    client = openai_stack.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="flux-tiny", prompt="x", n=0)
    assert (caught.value.status_code, caught.value.code, caught.value.param) == (
        400,
        "invalid_parameter",
        "n",
    )
    two = [("a.png", png((64, 64), (0, 0, 0)), "image/png")] * 2
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="flux-kontext-tiny", image=two, prompt="x")
    assert (caught.value.code, caught.value.param) == ("too_many_images", "image")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="flux2-tiny", image=("a.png", b"GIF89a broken", "image/png"), prompt="x")
    assert (caught.value.code, caught.value.param) == ("invalid_image", "image")


def test_a_wrong_key_raises_authentication_error(openai_stack: OpenAIStack) -> None:
    client = OpenAI(api_key="fg_wrong", base_url=f"{openai_stack.stack.base_url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.images.generate(model="flux-tiny", prompt="x")
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_an_unknown_model_raises_not_found_error(openai_stack: OpenAIStack) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        openai_stack.client().images.generate(model="dall-e-3", prompt="x")
    assert (caught.value.code, caught.value.param) == ("model_not_found", "model")


def test_a_wait_that_runs_out_is_504_and_cancels_the_job(openai_stack: OpenAIStack) -> None:
    # A key of its own: submission counters are per key across gateways, and this gateway allows 2 a minute.
    key = KeyStore(connect(openai_stack.stack.env["FLUXGATE_REDIS_URL"])).create("sdk-timeout")
    own = OpenAIStack(openai_stack.stack, openai_stack.short_gateway_url, key)
    client = own.client(openai_stack.short_gateway_url)
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(model="flux-idle", prompt="nobody serves this")
    error = caught.value
    assert (error.status_code, error.code) == (504, "generation_timeout")
    job_id = error.response.headers["x-fluxgate-job-id"]
    assert job_id in error.message
    job = next(job for job in own.jobs() if job["id"] == job_id)
    assert job["status"] == "canceled" and job["error"]["code"] == "deadline_exceeded"


def test_a_client_that_disconnects_cancels_its_job(openai_stack: OpenAIStack) -> None:
    before = {job["id"] for job in openai_stack.jobs()}
    with pytest.raises(openai.APITimeoutError):
        openai_stack.client(timeout=1.0).images.generate(model="flux-idle", prompt="impatient")

    def canceled() -> dict[str, Any] | None:
        new = [job for job in openai_stack.jobs() if job["id"] not in before]
        return new[0] if new and new[0]["status"] == "canceled" else None

    job = wait_for(canceled, 10, "the abandoned job to be canceled", interval=0.2)
    assert job["error"] is None and job["metadata"]["openai_endpoint"] == "images/generations"


def test_a_retry_with_the_same_idempotency_key_reuses_the_job(openai_stack: OpenAIStack) -> None:
    client = openai_stack.client()
    headers = {"Idempotency-Key": "sdk-retry-1"}
    ids = []
    for _ in range(2):
        raw = client.images.with_raw_response.generate(
            model="flux-tiny", prompt="once only", response_format="url", extra_headers=headers
        )
        ids.append(raw.headers["x-fluxgate-job-id"])
    assert ids[0] == ids[1]
    assert sum(job["params"]["prompt"] == "once only" for job in openai_stack.jobs()) == 1


def test_a_submission_quota_raises_rate_limit_error(openai_stack: OpenAIStack) -> None:
    key = KeyStore(connect(openai_stack.stack.env["FLUXGATE_REDIS_URL"])).create("sdk-quota")
    client = OpenAI(api_key=key, base_url=f"{openai_stack.short_gateway_url}/v1", max_retries=0, timeout=60)
    # the quota counts submissions in fixed one-minute windows (api.quotas): all three must fall in one, so
    # start with at least half a window left (the two images within quota take seconds each)
    left = quotas.WINDOW_S - time.time() % quotas.WINDOW_S
    if left < quotas.WINDOW_S / 2:
        time.sleep(left + 0.5)
    for _ in range(SHORT_GATEWAY_RATE):
        assert client.images.generate(model="flux-tiny", prompt="within quota").data
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(model="flux-tiny", prompt="one too many")
    assert caught.value.code == "rate_limit_exceeded"
    assert int(caught.value.response.headers["retry-after"]) > 0
