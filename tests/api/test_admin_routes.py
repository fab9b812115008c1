"""Admin routes: role checks, keys, queues, workers, job inspection and cancel, delivery replay."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared.jobstore import JobStore
from tests.api.conftest import Keys, auth


def store_of(client: TestClient) -> JobStore:
    return client.app.state.services.store  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/v1/admin/keys"),
        ("post", "/v1/admin/keys"),
        ("delete", "/v1/admin/keys/key_x"),
        ("get", "/v1/admin/queues"),
        ("get", "/v1/admin/workers"),
        ("get", "/v1/admin/jobs/job_x"),
        ("post", "/v1/admin/jobs/job_x/cancel"),
        ("post", "/v1/admin/webhook-deliveries/d/replay"),
    ],
)
def test_user_keys_get_403_and_missing_keys_401_on_admin_routes(
    client: TestClient, keys: Keys, method: str, path: str
) -> None:
    response = client.request(method, path, headers=auth(keys.alice), json={"owner": "x"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"
    assert client.request(method, path).status_code == 401


def test_admin_creates_lists_and_revokes_keys(client: TestClient, keys: Keys) -> None:
    created = client.post("/v1/admin/keys", json={"owner": "carol"}, headers=auth(keys.admin))
    assert created.status_code == 201
    new = created.json()
    assert client.get("/v1/jobs", headers=auth(new["key"])).status_code == 200
    listed = client.get("/v1/admin/keys", headers=auth(keys.admin)).json()["data"]
    carol = next(key for key in listed if key["key_id"] == new["key_id"])
    assert carol["owner"] == "carol" and "key" not in carol and not carol.get("revoked")
    assert client.delete(f"/v1/admin/keys/{new['key_id']}", headers=auth(keys.admin)).status_code == 200
    assert client.get("/v1/jobs", headers=auth(new["key"])).status_code == 401
    assert client.delete("/v1/admin/keys/key_missing", headers=auth(keys.admin)).status_code == 404
    bad = client.post("/v1/admin/keys", json={"owner": "x", "role": "root"}, headers=auth(keys.admin))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "role"


def test_queues_report_depth_by_priority_and_the_oldest_wait(client: TestClient, keys: Keys) -> None:
    for priority in ("high", "low", "low"):
        client.post("/v1/jobs", json={"prompt": "x", "priority": priority}, headers=auth(keys.alice))
    data = client.get("/v1/admin/queues", headers=auth(keys.admin)).json()["data"]
    tiny = next(queue for queue in data if queue["model"] == "flux-tiny")
    assert tiny["depth"] == 3 and tiny["by_priority"] == {"high": 1, "normal": 0, "low": 2}
    assert 0 <= tiny["oldest_waiting_s"] < 60


def test_workers_lists_registered_workers_with_liveness(client: TestClient, keys: Keys) -> None:
    redis = client.app.state.services.redis  # type: ignore[attr-defined]
    redis.sadd("fg:workers", "w1")
    redis.hset("fg:worker:w1", mapping={"model": "flux-tiny", "device": "cuda:0", "current_job": ""})
    redis.set("fg:worker:w1:alive", "1", ex=30)
    workers = client.get("/v1/admin/workers", headers=auth(keys.admin)).json()["data"]
    assert workers == [
        {"id": "w1", "model": "flux-tiny", "device": "cuda:0", "current_job": "", "alive": True}
    ]


def test_admin_inspects_and_cancels_any_owners_job(client: TestClient, keys: Keys) -> None:
    job = client.post("/v1/jobs", json={"prompt": "x"}, headers=auth(keys.alice)).json()
    store_of(client).claim(job["id"], 1, "w1", max_attempts=3)
    view: dict[str, Any] = client.get(f"/v1/admin/jobs/{job['id']}", headers=auth(keys.admin)).json()
    assert view["owner"] == "alice" and view["worker"] == "w1" and view["job"]["status"] == "running"
    assert [event["type"] for event in view["events"]] == ["job.queued", "job.started"]
    assert view["webhook_deliveries"] == []
    canceled = client.post(f"/v1/admin/jobs/{job['id']}/cancel", headers=auth(keys.admin))
    assert canceled.status_code == 200
    assert store_of(client).get(job["id"]).cancel_requested == "canceled"  # type: ignore[union-attr]
    assert client.get("/v1/admin/jobs/job_missing", headers=auth(keys.admin)).status_code == 404


def test_replaying_an_unknown_delivery_is_404(client: TestClient, keys: Keys) -> None:
    response = client.post("/v1/admin/webhook-deliveries/dlv_missing/replay", headers=auth(keys.admin))
    assert response.status_code == 404


def test_admin_retries_a_finished_job_as_its_next_attempt(client: TestClient, keys: Keys) -> None:
    job = client.post("/v1/jobs", json={"prompt": "x"}, headers=auth(keys.alice)).json()
    store = store_of(client)
    store.claim(job["id"], 1, "w1", max_attempts=3)
    store.transition(
        job["id"], "failed", allowed_from={"running"}, fields={"error": {"code": "c", "message": "m"}}
    )
    retried = client.post(f"/v1/admin/jobs/{job['id']}/retry", headers=auth(keys.admin))
    assert retried.status_code == 200
    assert (retried.json()["status"], retried.json()["attempt"], retried.json()["error"]) == (
        "queued",
        2,
        None,
    )
    assert store.claim(job["id"], 2, "w2", max_attempts=3) is not None
    again = client.post(f"/v1/admin/jobs/{job['id']}/retry", headers=auth(keys.admin))
    assert again.status_code == 409


def test_admin_purges_a_finished_job_but_not_an_active_one(client: TestClient, keys: Keys) -> None:
    job = client.post("/v1/jobs", json={"prompt": "x"}, headers=auth(keys.alice)).json()
    assert client.delete(f"/v1/admin/jobs/{job['id']}", headers=auth(keys.admin)).status_code == 409
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(keys.alice))
    assert client.delete(f"/v1/admin/jobs/{job['id']}", headers=auth(keys.admin)).json()["deleted"] is True
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(keys.alice)).status_code == 404
    assert client.get("/v1/jobs", headers=auth(keys.alice)).json()["data"] == []


def test_admin_search_filters_by_status_model_owner_and_time_with_a_cursor(
    client: TestClient, keys: Keys
) -> None:
    import time
    from datetime import UTC, datetime

    ids = [
        client.post("/v1/jobs", json={"prompt": f"a{i}"}, headers=auth(keys.alice)).json()["id"]
        for i in range(3)
    ]
    time.sleep(0.01)
    middle = datetime.now(UTC).isoformat()
    time.sleep(0.01)
    bob = client.post("/v1/jobs", json={"prompt": "b"}, headers=auth(keys.bob)).json()["id"]
    store_of(client).claim(ids[0], 1, "w1", max_attempts=3)

    def search(query: str) -> dict[str, Any]:
        response = client.get(f"/v1/admin/jobs?{query}", headers=auth(keys.admin))
        assert response.status_code == 200, response.text
        return dict(response.json())

    assert [j["id"] for j in search("")["data"]] == [bob, ids[2], ids[1], ids[0]]
    assert [j["id"] for j in search("status=running")["data"]] == [ids[0]]
    assert [j["id"] for j in search("owner=bob")["data"]] == [bob]
    assert search("owner=bob")["data"][0]["owner"] == "bob"
    assert [j["id"] for j in search("owner=alice&status=queued")["data"]] == [ids[2], ids[1]]
    assert search("model=flux-other")["data"] == []
    assert [j["id"] for j in search(f"since={middle.replace('+', '%2B')}")["data"]] == [bob]
    assert [j["id"] for j in search(f"until={middle.replace('+', '%2B')}")["data"]] == [
        ids[2],
        ids[1],
        ids[0],
    ]
    page = search("limit=2")
    assert [j["id"] for j in page["data"]] == [bob, ids[2]]
    rest = search(f"limit=2&cursor={page['next_cursor']}")
    assert [j["id"] for j in rest["data"]] == [ids[1], ids[0]]
    bad = client.get("/v1/admin/jobs?since=yesterday", headers=auth(keys.admin))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
