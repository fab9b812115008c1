"""The jobs routes: submission, validation, reading, listing and owner isolation."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Keys, auth


def submit(client: TestClient, key: str, body: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", json=body, headers=auth(key))


def assert_error(response: Any, status: int, code: str, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"] and error["type"]


def test_submit_returns_202_with_location_and_the_queued_job(client: TestClient, keys: Keys) -> None:
    response = submit(client, keys.alice, {"prompt": "a red fox", "seed": 7, "metadata": {"order": 12}})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert (job["object"], job["status"], job["attempt"], job["queue_position"]) == ("job", "queued", 1, 0)
    assert job["params"] == {
        "model": "flux-tiny",
        "prompt": "a red fox",
        "negative_prompt": None,
        "true_cfg_scale": None,
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "guidance_scale": 3.5,
        "seed": 7,
        "num_images": 1,
        "output_format": "png",
        "output_quality": 90,
        "cache": "off",
    }
    assert job["progress"] == {"step": 0, "total": 2}
    assert job["metadata"] == {"order": 12}
    assert job["result"] is None and job["error"] is None and job["metrics"] is None


def test_submit_without_seed_records_the_resolved_seed(client: TestClient, keys: Keys) -> None:
    seed = submit(client, keys.alice, {"prompt": "x"}).json()["params"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32


def test_submit_enqueues_a_task_naming_job_and_attempt_on_the_model_queue(
    client: TestClient, keys: Keys
) -> None:
    job = submit(client, keys.alice, {"prompt": "x"}).json()
    redis = client.app.state.services.redis  # type: ignore[attr-defined]
    # Priorities live in one list per step: "normal" is step 3 of the model's queue.
    messages = [json.loads(message) for message in redis.lrange("gen.flux-tiny:3", 0, -1)]
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == "fluxgate.generate"
    args = json.loads(base64.b64decode(messages[0]["body"]))[0]
    assert args == [job["id"], 1]


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({}, "missing_parameter", "prompt"),
        ({"prompt": ""}, "invalid_parameter", "prompt"),
        ({"prompt": "x" * 4001}, "invalid_parameter", "prompt"),
        ({"prompt": "x", "width": 100}, "invalid_size", "width"),
        ({"prompt": "x", "height": 32}, "invalid_parameter", "height"),
        ({"prompt": "x", "width": 4096}, "invalid_parameter", "width"),
        ({"prompt": "x", "width": 2048, "height": 2048 + 16}, "invalid_parameter", "height"),
        ({"prompt": "x", "width": "wide"}, "invalid_parameter", "width"),
        ({"prompt": "x", "num_inference_steps": 0}, "invalid_parameter", "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 101}, "invalid_parameter", "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": -1}, "invalid_parameter", "guidance_scale"),
        ({"prompt": "x", "num_images": 0}, "invalid_parameter", "num_images"),
        ({"prompt": "x", "num_images": 5}, "invalid_parameter", "num_images"),
        ({"prompt": "x", "seed": -1}, "invalid_parameter", "seed"),
        ({"prompt": "x", "seed": 2**32}, "invalid_parameter", "seed"),
        ({"prompt": "x", "seed": 1.5}, "invalid_parameter", "seed"),
        ({"prompt": "x", "output_format": "gif"}, "invalid_parameter", "output_format"),
        ({"prompt": "x", "output_quality": 0}, "invalid_parameter", "output_quality"),
        ({"prompt": "x", "metadata": "text"}, "invalid_parameter", "metadata"),
        ({"prompt": "x", "metadata": {"blob": "y" * 5000}}, "invalid_parameter", "metadata"),
        ({"prompt": "x", "surprise": 1}, "unknown_parameter", "surprise"),
        ({"prompt": "x", "negative_prompt": "blurry"}, "unsupported_parameter", "negative_prompt"),
        ({"prompt": "x", "true_cfg_scale": 4}, "unsupported_parameter", "true_cfg_scale"),
        ({"prompt": "x", "images": ["https://example.com/a.png"]}, "unsupported_parameter", "images"),
        ({"prompt": "x", "webhook_events": ["job.succeeded"]}, "invalid_parameter", "webhook_events"),
        (
            {"prompt": "x", "webhook_url": "https://a.example/h", "webhook_events": ["job.x"]},
            "invalid_parameter",
            "webhook_events",
        ),
        (
            {"prompt": "x", "webhook_url": "https://a.example/h", "webhook_events": []},
            "invalid_parameter",
            "webhook_events",
        ),
        ({"prompt": "x", "webhook_url": "ftp://a.example/h"}, "invalid_parameter", "webhook_url"),
        ({"prompt": "x", "webhook_url": "https://"}, "invalid_parameter", "webhook_url"),
        ({"prompt": "x", "webhook_url": "http://10.0.0.5/hook"}, "invalid_parameter", "webhook_url"),
        ({"prompt": "x", "webhook_url": "http://169.254.169.254/latest"}, "invalid_parameter", "webhook_url"),
        ({"prompt": "x", "webhook_url": "http://[::ffff:192.168.1.1]/h"}, "invalid_parameter", "webhook_url"),
        ({"prompt": "x", "priority": "urgent"}, "invalid_parameter", "priority"),
        ({"prompt": "x", "cancel_after": 0}, "invalid_parameter", "cancel_after"),
        ({"prompt": "x", "cancel_after": "soon"}, "invalid_parameter", "cancel_after"),
        ({"prompt": "x", "cache": "fast"}, "invalid_parameter", "cache"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(
    client: TestClient, keys: Keys, body: dict[str, Any], code: str, param: str
) -> None:
    assert_error(submit(client, keys.alice, body), 400, code, param)


def test_pixel_cap_names_the_size(client: TestClient, keys: Keys, settings: Any) -> None:
    settings.limits.max_pixels = 512 * 512
    assert_error(
        submit(client, keys.alice, {"prompt": "x", "width": 1024, "height": 512}),
        400,
        "invalid_size",
        "width",
    )


def test_non_json_and_non_object_bodies_are_400(client: TestClient, keys: Keys) -> None:
    headers = {**auth(keys.alice), "content-type": "application/json"}
    assert_error(client.post("/v1/jobs", content=b"{nope", headers=headers), 400, "invalid_json", None)
    assert_error(client.post("/v1/jobs", content=b"[1, 2]", headers=headers), 400, "invalid_json", None)


def test_oversized_body_is_413(client: TestClient, keys: Keys) -> None:
    response = submit(client, keys.alice, {"prompt": "x", "metadata": {"pad": "y" * 2_000_000}})
    assert_error(response, 413, "request_too_large", "body")


def test_unknown_model_is_404_model_not_found(client: TestClient, keys: Keys) -> None:
    assert_error(
        submit(client, keys.alice, {"model": "flux-huge", "prompt": "x"}), 404, "model_not_found", "model"
    )


def test_routes_need_a_valid_bearer_key(client: TestClient, keys: Keys) -> None:
    assert_error(client.post("/v1/jobs", json={"prompt": "x"}), 401, "missing_api_key", None)
    assert_error(client.get("/v1/jobs", headers=auth("fg_wrong")), 401, "invalid_api_key", None)
    assert_error(client.get("/v1/jobs", headers={"Authorization": "Basic abc"}), 401, "invalid_api_key", None)
    assert_error(client.get("/v1/models"), 401, "missing_api_key", None)


def test_get_job_returns_the_owners_job(client: TestClient, keys: Keys) -> None:
    job = submit(client, keys.alice, {"prompt": "x"}).json()
    response = client.get(f"/v1/jobs/{job['id']}", headers=auth(keys.alice))
    assert response.status_code == 200
    assert response.json()["id"] == job["id"]


def test_another_owners_job_is_404(client: TestClient, keys: Keys) -> None:
    job = submit(client, keys.alice, {"prompt": "x"}).json()
    assert_error(client.get(f"/v1/jobs/{job['id']}", headers=auth(keys.bob)), 404, "job_not_found", "id")
    assert client.get("/v1/jobs", headers=auth(keys.bob)).json()["data"] == []


@pytest.mark.parametrize("job_id", ["nope", "job_", "job_01M8ACK4XKW1JAP1ND5EYSAK1Z", "job_%00", "x" * 500])
def test_malformed_or_unknown_job_ids_are_404(client: TestClient, keys: Keys, job_id: str) -> None:
    assert_error(client.get(f"/v1/jobs/{job_id}", headers=auth(keys.alice)), 404, "job_not_found", "id")


def test_listing_paginates_with_a_cursor_and_filters_by_status(client: TestClient, keys: Keys) -> None:
    ids = [submit(client, keys.alice, {"prompt": f"p{i}"}).json()["id"] for i in range(3)]
    first = client.get("/v1/jobs?limit=2", headers=auth(keys.alice)).json()
    assert first["object"] == "list" and [j["id"] for j in first["data"]] == [ids[2], ids[1]]
    second = client.get(f"/v1/jobs?limit=2&cursor={first['next_cursor']}", headers=auth(keys.alice)).json()
    assert [j["id"] for j in second["data"]] == [ids[0]] and second["next_cursor"] is None
    queued = client.get("/v1/jobs?status=queued", headers=auth(keys.alice)).json()
    assert len(queued["data"]) == 3
    assert client.get("/v1/jobs?status=running", headers=auth(keys.alice)).json()["data"] == []


@pytest.mark.parametrize("query", ["status=done", "limit=0", "limit=101", "limit=x", "cursor=bogus"])
def test_bad_listing_queries_are_400(client: TestClient, keys: Keys, query: str) -> None:
    response = client.get(f"/v1/jobs?{query}", headers=auth(keys.alice))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == query.split("=")[0]


def test_models_lists_configured_models_with_capabilities(client: TestClient, keys: Keys) -> None:
    body = client.get("/v1/models", headers=auth(keys.alice)).json()
    assert body == {
        "object": "list",
        "data": [
            {
                "id": "flux-tiny",
                "object": "model",
                "created": 0,
                "owned_by": "fluxgate",
                "capabilities": {
                    "generate": True,
                    "edit": False,
                    "max_reference_images": 0,
                    "negative_prompt": False,
                },
                "live_workers": 0,
            }
        ],
    }
    assert client.get("/v1/models/flux-tiny", headers=auth(keys.alice)).json()["id"] == "flux-tiny"
    assert_error(client.get("/v1/models/nope", headers=auth(keys.alice)), 404, "model_not_found", "model")


def test_unknown_route_is_a_json_404(client: TestClient) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
