"""Worker registration: what the admin workers view reads from each beat."""

from __future__ import annotations

import redis

from shared.workers import live_workers
from worker.heartbeat import Heartbeat


def test_every_job_a_worker_ends_counts_in_jobs_done_at_the_next_beat(redis_client: redis.Redis) -> None:
    heartbeat = Heartbeat(redis_client, "w1", {"model": "flux-tiny", "gpus": "2"}, 60, 120)
    heartbeat.start()
    try:
        for job_id in ("job-1", "job-2"):
            heartbeat.set_current_job(job_id)
            heartbeat.beat()
            assert live_workers(redis_client)[0]["current_job"] == job_id
            heartbeat.set_current_job(None)
        heartbeat.set_current_job(None)  # clearing twice counts once
        heartbeat.beat()
        worker = live_workers(redis_client)[0]
        assert worker["jobs_done"] == "2" and worker["current_job"] == "" and worker["gpus"] == "2"
    finally:
        heartbeat.stop()
    assert live_workers(redis_client) == []
