"""The worker's job store rides out Redis connection failures."""

from __future__ import annotations

import pytest
import redis

from shared.ids import new_job_id
from shared.jobstore import JobStore
from tests.support import generation_params
from worker.resilience import RetryingJobStore


def test_claim_is_retried_until_redis_answers_again(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RetryingJobStore(redis_client, patience_s=5)
    job_id = store.create(new_job_id(), "alice", generation_params()).id
    failures = iter([redis.ConnectionError("down"), redis.TimeoutError("slow")])
    original = JobStore.claim_batch  # what claim goes through, batch or not

    def flaky_claim(self: JobStore, *args: object, **kwargs: object) -> object:
        error = next(failures, None)
        if error:
            raise error
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(JobStore, "claim_batch", flaky_claim)
    record = store.claim(job_id, 1, "w1", 3)
    assert record is not None and record.status == "running"


def test_retrying_gives_up_after_its_patience(redis_client: redis.Redis) -> None:
    store = RetryingJobStore(redis.Redis(port=1, socket_connect_timeout=0.1), patience_s=0.3)
    with pytest.raises(redis.ConnectionError):
        store.get(new_job_id())


def test_a_lost_progress_update_is_skipped_and_the_job_goes_on() -> None:
    store = RetryingJobStore(redis.Redis(port=1, socket_connect_timeout=0.1), patience_s=0.3)
    assert store.record_progress(new_job_id(), 1, "w1", 1, 4) == "running"
