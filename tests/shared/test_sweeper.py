"""The sweeper: deadlines and jobs whose worker stopped heartbeating."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from shared.ids import new_job_id
from shared.jobstore import JobStore
from shared.queue import create_celery
from shared.settings import Settings
from shared.sweeper import sweep_lost_workers
from shared.workers import alive_key
from tests.conftest import make_settings
from tests.shared.test_jobstore import params


@pytest.fixture
def lost_job(redis_client: redis.Redis) -> tuple[JobStore, str]:
    store = JobStore(redis_client)
    job_id = store.create(new_job_id(), "alice", params(model="flux-tiny")).id
    store.claim(job_id, 1, "w1", max_attempts=3)
    return store, job_id


def sweep(store: JobStore, settings: Settings) -> int:
    return sweep_lost_workers(store, create_celery(settings), settings)


def test_job_of_a_live_worker_is_left_running(lost_job: tuple[JobStore, str], settings: Settings) -> None:
    store, job_id = lost_job
    store.redis.set(alive_key("w1"), "1", ex=30)
    assert sweep(store, settings) == 0
    assert store.get(job_id).status == "running"  # type: ignore[union-attr]


def test_job_of_a_dead_worker_is_requeued_as_the_next_attempt_with_a_message(
    lost_job: tuple[JobStore, str], settings: Settings
) -> None:
    store, job_id = lost_job
    assert sweep(store, settings) == 1
    record = store.get(job_id)
    assert record is not None
    assert (record.status, record.attempt, record.worker) == ("queued", 2, None)
    assert store.queue_position("flux-tiny", job_id) == 0
    assert store.redis.llen("gen.flux-tiny:3") == 1  # the new attempt's message (normal priority)
    assert store.claim(job_id, 1, "w2", max_attempts=3) is None  # the old attempt's message is stale
    assert store.claim(job_id, 2, "w2", max_attempts=3) is not None
    assert sweep(store, settings) == 1  # w2 never heartbeats either


def test_dead_worker_on_the_last_attempt_fails_the_job_with_worker_lost(
    lost_job: tuple[JobStore, str], tmp_path: Path
) -> None:
    store, job_id = lost_job
    assert sweep(store, make_settings(tmp_path, max_attempts=1)) == 1
    record = store.get(job_id)
    assert record is not None and record.error is not None
    assert (record.status, record.error.code) == ("failed", "worker_lost")
    assert store.running_job_ids() == []
