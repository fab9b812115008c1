"""The OpenAI Images routes on a real Redis, with an in-process fake worker running each job."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from api.openai_jobs import ClientDisconnected, wait_for_job, waiters_key
from shared.ids import new_job_id
from shared.jobstore import JobOptions, JobStore
from shared.keys import KeyStore
from shared.schemas import GenerationParams
from shared.settings import ModelCapabilities, ModelConfig, ModelDefaults, Settings
from shared.storage import LocalStorage
from tests.conftest import make_settings
from tests.support import generation_params, wait_for
from worker.runner import WorkerRuntime, run_job
from worker.types import GenerationOutput, StepCallback

DEFAULTS = ModelDefaults(width=64, height=64, num_inference_steps=2)


class FakeEditingEngine:
    """Solid images (red channel = seed); remembers the reference images each job received."""

    def __init__(self) -> None:
        self.references: list[list[Image.Image]] = []
        self.fail = False

    def generate(
        self, params: GenerationParams, on_step: StepCallback, references: Sequence[Image.Image] = ()
    ) -> GenerationOutput:
        self.references.append(list(references))
        for step in range(1, params.num_inference_steps + 1):
            on_step(step, params.num_inference_steps)
        if self.fail:
            raise RuntimeError("boom")
        images = [
            Image.new("RGB", (params.width, params.height), (params.image_seed(i) % 256, 0, 0))
            for i in range(params.num_images)
        ]
        return GenerationOutput(images=images)


class FakeWorker:
    """Runs every queued job of the served models in a thread, as a Celery worker would."""

    def __init__(self, settings: Settings, models: Sequence[str]) -> None:
        client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        storage = LocalStorage(Path(settings.storage_url.removeprefix("file://")), "http://t", b"k")
        self.engine = FakeEditingEngine()
        self.runtime = WorkerRuntime(JobStore(client), storage, self.engine, "fake-worker", max_attempts=3)
        self.models, self.client = models, client
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(0.02):
            for model in self.models:
                for job_id in self.client.zrange(f"fg:queue:{model}", 0, -1):
                    run_job(job_id, 1, self.runtime)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def openai_settings(tmp_path: Path, **overrides: object) -> Settings:
    models = [
        ModelConfig(name="flux-tiny", path="unused", defaults=DEFAULTS),
        ModelConfig(name="flux-idle", path="unused", defaults=DEFAULTS),  # no worker serves it
        ModelConfig(
            name="flux-kontext",
            path="unused",
            defaults=DEFAULTS,
            capabilities=ModelCapabilities(edit=True, max_reference_images=1, negative_prompt=True),
        ),
        ModelConfig(
            name="flux2",
            path="unused",
            defaults=DEFAULTS,
            capabilities=ModelCapabilities(edit=True, max_reference_images=8),
        ),
    ]
    values: dict[str, Any] = {"models": models, "openai_timeout_s": 10.0, **overrides}
    return make_settings(tmp_path, **values)


@pytest.fixture
def app_settings(tmp_path: Path, redis_client: redis.Redis) -> Settings:
    return openai_settings(tmp_path)


@pytest.fixture
def worker(app_settings: Settings) -> Iterator[FakeWorker]:
    fake = FakeWorker(app_settings, ["flux-tiny", "flux-kontext", "flux2"])
    yield fake
    fake.close()


@pytest.fixture
def api(app_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings)) as client:
        store = KeyStore(client.app.state.services.redis)  # type: ignore[attr-defined]
        client.headers["Authorization"] = f"Bearer {store.create('alice')}"
        yield client


def png(size: tuple[int, int] = (64, 64), color: Any = (0, 128, 255), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_error(response: Any, status: int, code: str, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    return error


def job_of(api: TestClient, response: Any) -> dict[str, Any]:
    job: dict[str, Any] = api.get(f"/v1/jobs/{response.headers['X-Fluxgate-Job-Id']}").json()
    return job


def test_generate_b64_json_returns_the_jobs_images(api: TestClient, worker: FakeWorker) -> None:
    body = {"model": "flux-tiny", "prompt": " a cat ", "n": 2, "size": "80x64", "response_format": "b64_json"}
    response = api.post("/v1/images/generations", json={**body, "seed": 5, "quality": "hd"})
    assert response.status_code == 200, response.text
    result = response.json()
    assert set(result) == {"created", "data", "background", "output_format", "quality", "size"}
    assert (result["size"], result["output_format"], result["quality"]) == ("80x64", "png", "hd")
    assert [set(image) for image in result["data"]] == [{"b64_json", "revised_prompt"}] * 2
    assert result["data"][0]["revised_prompt"] == "a cat"
    for index, image in enumerate(result["data"]):
        with Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))) as decoded:
            assert decoded.size == (80, 64) and decoded.getpixel((0, 0)) == (5 + index, 0, 0)
    job = job_of(api, response)
    assert job["status"] == "succeeded" and job["params"]["num_images"] == 2
    assert job["metadata"] == {"openai_endpoint": "images/generations"}
    assert result["created"] > 1_700_000_000


def test_generate_url_returns_signed_links(api: TestClient, worker: FakeWorker) -> None:
    response = api.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
    assert response.status_code == 200, response.text
    (image,) = response.json()["data"]
    assert "b64_json" not in image and image["url"].startswith("http://testserver/v1/files/")
    download = api.get(image["url"].removeprefix("http://testserver"), headers={"Authorization": ""})
    assert download.status_code == 200 and download.content.startswith(b"\x89PNG")


def test_openai_fields_map_onto_the_job(api: TestClient, worker: FakeWorker) -> None:
    body = {
        "model": "flux-kontext",
        "prompt": "a fox",
        "width": 96,
        "height": 64,
        "num_inference_steps": 3,
        "guidance_scale": 2.5,
        "negative_prompt": "blurry",
        "true_cfg_scale": 2.0,
        "output_format": "webp",
        "output_compression": 0,
        "user": "user-42",
        "safety_identifier": "sid-1",
        "quality": "xhigh",
        "background": "opaque",
        "moderation": "low",
        "stream": False,
    }
    response = api.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    params = job_of(api, response)["params"]
    assert (params["width"], params["height"], params["num_inference_steps"]) == (96, 64, 3)
    assert (params["output_format"], params["output_quality"], params["negative_prompt"]) == (
        "webp",
        1,
        "blurry",
    )
    metadata = {"openai_endpoint": "images/generations", "user": "user-42", "safety_identifier": "sid-1"}
    assert job_of(api, response)["metadata"] == metadata
    assert response.json()["size"] == "96x64" and response.json()["output_format"] == "webp"


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"prompt": "x", "n": 0}, 400, "invalid_parameter", "n"),
        ({"prompt": "x", "n": 5}, 400, "invalid_parameter", "n"),
        ({"prompt": "x", "size": "1000x1000"}, 400, "invalid_size", "size"),
        ({"prompt": "x", "size": "big"}, 400, "invalid_size", "size"),
        ({"prompt": "x", "size": "64x64", "width": 128}, 400, "invalid_size", "size"),
        ({"prompt": "x", "width": 100}, 400, "invalid_size", "width"),
        ({"prompt": "x", "response_format": "png"}, 400, "invalid_parameter", "response_format"),
        ({"prompt": "x", "output_format": "gif"}, 400, "invalid_parameter", "output_format"),
        ({"prompt": "x", "output_compression": 101}, 400, "invalid_parameter", "output_compression"),
        ({"prompt": "x", "quality": "ultra"}, 400, "invalid_parameter", "quality"),
        ({"prompt": "x", "stream": True}, 400, "unsupported_parameter", "stream"),
        ({"prompt": "x", "background": "transparent"}, 400, "invalid_parameter", "background"),
        ({"prompt": "x", "style": "vivid"}, 400, "unknown_parameter", "style"),
        ({"prompt": "x", "negative_prompt": "blurry"}, 400, "unsupported_parameter", "negative_prompt"),
        ({"prompt": "x", "user": "u" * 300}, 400, "invalid_parameter", "user"),
        ({"prompt": ""}, 400, "invalid_parameter", "prompt"),
        ({"n": 1}, 400, "missing_parameter", "prompt"),
        ({"prompt": "x", "model": "dall-e-3"}, 404, "model_not_found", "model"),
    ],
)
def test_bad_generation_requests_name_the_openai_field(
    api: TestClient, body: dict[str, Any], status: int, code: str, param: str
) -> None:
    error = assert_error(api.post("/v1/images/generations", json=body), status, code, param)
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_missing_or_wrong_key_is_401(api: TestClient) -> None:
    response = api.post(
        "/v1/images/generations", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}
    )
    assert_error(response, 401, "invalid_api_key", None)
    assert response.json()["error"]["type"] == "authentication_error"


def test_timeout_cancels_the_job_and_answers_504(tmp_path: Path, redis_client: redis.Redis) -> None:
    with TestClient(create_app(openai_settings(tmp_path, openai_timeout_s=0.5))) as client:
        key = KeyStore(client.app.state.services.redis).create("alice")  # type: ignore[attr-defined]
        client.headers["Authorization"] = f"Bearer {key}"
        response = client.post("/v1/images/generations", json={"model": "flux-idle", "prompt": "x"})
        error = assert_error(response, 504, "generation_timeout", None)
        job = job_of(client, response)
    assert job["id"] in error["message"] and response.headers["x-should-retry"] == "false"
    assert job["status"] == "canceled" and job["error"]["code"] == "deadline_exceeded"


def test_a_job_that_fails_on_the_worker_is_503_with_retry_after(api: TestClient, worker: FakeWorker) -> None:
    worker.engine.fail = True
    response = api.post("/v1/images/generations", json={"prompt": "x"})
    error = assert_error(response, 503, "generation_failed", None)
    assert response.headers["Retry-After"] and response.headers["X-Fluxgate-Job-Id"] in error["message"]


def test_same_idempotency_key_runs_one_job(api: TestClient, worker: FakeWorker) -> None:
    headers = {"Idempotency-Key": "order-1"}
    first = api.post("/v1/images/generations", json={"prompt": "x", "seed": 3}, headers=headers)
    second = api.post("/v1/images/generations", json={"prompt": "x", "seed": 3}, headers=headers)
    assert first.status_code == second.status_code == 200, second.text
    assert first.headers["X-Fluxgate-Job-Id"] == second.headers["X-Fluxgate-Job-Id"]
    assert first.json()["data"] == second.json()["data"]
    assert len(api.get("/v1/jobs").json()["data"]) == 1
    other = api.post("/v1/images/generations", json={"prompt": "y"}, headers=headers)
    assert_error(other, 409, "idempotency_conflict", "Idempotency-Key")


def _queued_job(settings: Settings) -> tuple[JobStore, Any]:
    store = JobStore(redis.Redis.from_url(settings.redis_url, decode_responses=True))
    params = generation_params(model="flux-idle", prompt="x")
    return store, store.create(new_job_id(), "alice", params, JobOptions())


def test_a_client_that_disconnects_cancels_its_job(app_settings: Settings) -> None:
    from api.services import Services

    store, record = _queued_job(app_settings)

    async def scenario() -> None:
        services = Services(app_settings)
        try:

            async def gone() -> bool:
                return True

            with pytest.raises(ClientDisconnected):
                await wait_for_job(services, record, 5.0, gone)
        finally:
            await services.aclose()

    asyncio.run(scenario())
    canceled = store.get(record.id)
    assert canceled is not None and canceled.status == "canceled" and canceled.error is None


def test_a_disconnect_leaves_the_job_to_another_waiter(app_settings: Settings) -> None:
    from api.services import Services

    store, record = _queued_job(app_settings)
    store.redis.incr(waiters_key(record.id))  # a retry with the same Idempotency-Key still waits

    async def scenario() -> None:
        services = Services(app_settings)
        try:

            async def gone() -> bool:
                return True

            with pytest.raises(ClientDisconnected):
                await wait_for_job(services, record, 5.0, gone)
        finally:
            await services.aclose()

    asyncio.run(scenario())
    still = store.get(record.id)
    assert still is not None and still.status == "queued"


# --- edits ------------------------------------------------------------------------------------------


def edit(api: TestClient, files: list[tuple[str, Any]], **fields: Any) -> Any:
    data = {"prompt": "make it blue", **{k: str(v) for k, v in fields.items()}}
    return api.post("/v1/images/edits", data=data, files=files)


def test_edit_with_one_image_stores_it_and_hands_it_to_the_worker(
    api: TestClient, worker: FakeWorker, app_settings: Settings
) -> None:
    files = [("image", ("cat.png", png((128, 64), (255, 0, 0, 0), "RGBA"), "image/png"))]
    response = edit(api, files, model="flux-kontext", response_format="b64_json", seed=1)
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "96x64"  # size=auto: the model's area at the reference's 2:1
    job = job_of(api, response)
    (reference,) = job["params"]["images"]
    assert reference["key"] == f"inputs/{job['id']}/0.png" and (reference["width"], reference["height"]) == (
        128,
        64,
    )
    stored = Path(app_settings.storage_url.removeprefix("file://"), reference["key"]).read_bytes()
    (received,) = worker.engine.references[-1]
    assert received.size == (128, 64) and received.getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    assert len(stored) == reference["bytes"]
    assert job["metadata"] == {"openai_endpoint": "images/edits"}


def test_edit_size_auto_follows_the_reference_aspect_ratio(api: TestClient, worker: FakeWorker) -> None:
    files = [("image", ("wide.png", png((256, 128)), "image/png"))]
    response = edit(api, files, model="flux2", size="auto")
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "96x64"  # 4096 px at 2:1 → 90.5x45.3, in multiples of 16, min side 64


def test_edit_with_several_images_on_flux2(api: TestClient, worker: FakeWorker) -> None:
    files = [("image[]", (f"{i}.png", png((64 + 16 * i, 64)), "image/png")) for i in range(3)]
    response = edit(api, files, model="flux2", size="64x64", response_format="url")
    assert response.status_code == 200, response.text
    assert [image.size for image in worker.engine.references[-1]] == [(64, 64), (80, 64), (96, 64)]
    assert [ref["width"] for ref in job_of(api, response)["params"]["images"]] == [64, 80, 96]


@pytest.mark.parametrize(
    ("files", "fields", "code", "param"),
    [
        ([("image[]", png())] * 2, {"model": "flux-kontext"}, "too_many_images", "image"),
        ([("image", png())], {"model": "flux-tiny"}, "unsupported_parameter", "image"),
        ([("image", b"not an image")], {"model": "flux2"}, "invalid_image", "image"),
        ([("image", png((32, 32)))], {"model": "flux2"}, "image_too_small", "image"),
        ([("image", png((64, 64), 0, "I;16"))], {"model": "flux2"}, "unsupported_image_mode", "image"),
        ([("image", png()), ("mask", png())], {"model": "flux2"}, "unsupported_parameter", "mask"),
        ([("image", png()), ("extra", png())], {"model": "flux2"}, "unknown_parameter", "extra"),
        ([("image", png())], {"model": "flux2", "n": "two"}, "invalid_parameter", "n"),
        ([("image", png())], {"model": "flux2", "colour": "blue"}, "unknown_parameter", "colour"),
        ([("image", png())], {"model": "flux2", "size": "63x64"}, "invalid_parameter", "size"),
        ([("image", png())], {"model": "nope"}, "model_not_found", "model"),
    ],
)
def test_bad_edit_requests_name_the_field(
    api: TestClient, files: list[tuple[str, bytes]], fields: dict[str, str], code: str, param: str
) -> None:
    response = edit(api, [(name, ("f.png", data, "image/png")) for name, data in files], **fields)
    assert_error(response, 404 if code == "model_not_found" else 400, code, param)


def test_edit_without_an_image_is_400(api: TestClient) -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n'
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    assert_error(
        api.post("/v1/images/edits", content=body, headers=headers), 400, "missing_parameter", "image"
    )
    garbled = {"Content-Type": "multipart/form-data; boundary=b"}
    response = api.post("/v1/images/edits", content=b"--b\r\nnonsense", headers=garbled)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_edit_image_given_as_text_or_as_json_is_400(api: TestClient) -> None:
    response = api.post("/v1/images/edits", data={"prompt": "x", "image": "https://example.com/a.png"})
    assert_error(response, 400, "invalid_image", "image")
    response = api.post("/v1/images/edits", json={"prompt": "x"})
    assert_error(response, 400, "invalid_content_type", None)


def test_edits_wait_for_their_job_like_generations(tmp_path: Path, redis_client: redis.Redis) -> None:
    with TestClient(create_app(openai_settings(tmp_path, openai_timeout_s=0.3))) as client:
        key = KeyStore(client.app.state.services.redis).create("alice")  # type: ignore[attr-defined]
        client.headers["Authorization"] = f"Bearer {key}"
        response = edit(client, [("image", ("a.png", png(), "image/png"))], model="flux2")
        assert_error(response, 504, "generation_timeout", None)
        wait_for(lambda: job_of(client, response)["status"] == "canceled", 5, "the job to be canceled")


def test_edits_default_to_the_first_editing_model(api: TestClient, worker: FakeWorker) -> None:
    response = edit(api, [("image", ("a.png", png(), "image/png"))])
    assert response.status_code == 200, response.text
    assert job_of(api, response)["model"] == "flux-kontext"


def test_an_edit_retried_with_another_image_under_the_same_key_is_409(
    api: TestClient, worker: FakeWorker
) -> None:
    headers = {"Idempotency-Key": "edit-1"}
    first = api.post(
        "/v1/images/edits",
        data={"prompt": "x", "model": "flux2"},
        files=[("image", ("a.png", png(), "image/png"))],
        headers=headers,
    )
    again = api.post(
        "/v1/images/edits",
        data={"prompt": "x", "model": "flux2"},
        files=[("image", ("a.png", png(), "image/png"))],
        headers=headers,
    )
    assert first.status_code == again.status_code == 200
    assert first.headers["X-Fluxgate-Job-Id"] == again.headers["X-Fluxgate-Job-Id"]
    other = api.post(
        "/v1/images/edits",
        data={"prompt": "x", "model": "flux2"},
        files=[("image", ("b.png", png(color=(1, 2, 3)), "image/png"))],
        headers=headers,
    )
    assert_error(other, 409, "idempotency_conflict", "Idempotency-Key")
