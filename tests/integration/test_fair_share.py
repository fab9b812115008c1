"""Fair share over the real stack: one owner's burst does not hold another owner's job behind it."""

from __future__ import annotations

from tests.integration.conftest import Stack

BURST = 10


def test_another_owners_job_finishes_before_most_of_a_burst(file_stack: Stack) -> None:
    with file_stack.client() as admin:
        keys = {
            owner: admin.post("/v1/admin/keys", json={"owner": owner}).json()["key"]
            for owner in ("bursting", "waiting")
        }
    burst_body = {"prompt": "burst", "width": 512, "height": 512, "num_inference_steps": 8}
    with file_stack.client(keys["bursting"]) as client:
        burst = [client.post("/v1/jobs", json=burst_body).json() for _ in range(BURST)]
    with file_stack.client(keys["waiting"]) as client:
        job = client.post("/v1/jobs", json={"prompt": "just one"}).json()
    assert job["status"] == "queued" and job["queue_position"] <= 1, job  # not behind the burst
    assert max(j["queue_position"] or 0 for j in burst) >= BURST - 2

    done = file_stack.wait_for_job(job["id"], key=keys["waiting"], timeout=120)
    burst_done = [file_stack.wait_for_job(j["id"], key=keys["bursting"], timeout=120) for j in burst]
    assert done["status"] == "succeeded" and {j["status"] for j in burst_done} == {"succeeded"}
    finished_after = [j["id"] for j in burst_done if j["finished_at"] > done["finished_at"]]
    assert len(finished_after) >= BURST - 2, (done["finished_at"], [j["finished_at"] for j in burst_done])
