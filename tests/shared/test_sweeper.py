"""The sweeper: jobs whose worker stopped heartbeating, and queued jobs whose message was lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from shared.ids import new_job_id
from shared.jobstore import JobStore
from shared.queue import create_celery, enqueue_generation, waiting_messages
from shared.settings import Settings
from shared.sweeper import sweep_lost_workers, sweep_tickets
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
    # The old attempt's message, if Celery redelivers it, no longer holds the job: it is a spare ticket
    # that takes what is queued, and the new attempt's message then finds nothing.
    reclaimed = store.claim(job_id, 1, "w2", max_attempts=3)
    assert reclaimed is not None and (reclaimed.attempt, reclaimed.worker) == (2, "w2")
    assert store.claim(job_id, 2, "w3", max_attempts=3) is None
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


def test_queued_jobs_without_a_message_in_two_sweeps_in_a_row_get_one(
    redis_client: redis.Redis, settings: Settings
) -> None:
    store, celery = JobStore(redis_client), create_celery(settings)
    first, second = (store.create(new_job_id(), "alice", params()).id for _ in range(2))
    enqueue_generation(celery, "gen.flux-tiny", first, 1)  # second's message was lost
    missing: dict[str, int] = {}
    assert sweep_tickets(store, celery, settings, missing) == 0  # it might still be on its way
    assert sweep_tickets(store, celery, settings, missing) == 1
    assert waiting_messages(redis_client, "gen.flux-tiny") == 2
    assert sweep_tickets(store, celery, settings, missing) == 0
    assert {store.claim(first, 1, "w1", 3).id, store.claim(second, 1, "w1", 3).id} == {first, second}  # type: ignore[union-attr]


def test_a_message_sent_between_two_sweeps_is_not_sent_again(
    redis_client: redis.Redis, settings: Settings
) -> None:
    store, celery = JobStore(redis_client), create_celery(settings)
    job_id = store.create(new_job_id(), "alice", params()).id
    missing: dict[str, int] = {}
    assert sweep_tickets(store, celery, settings, missing) == 0  # the gateway has not sent it yet
    enqueue_generation(celery, "gen.flux-tiny", job_id, 1)
    assert sweep_tickets(store, celery, settings, missing) == 0
    assert waiting_messages(redis_client, "gen.flux-tiny") == 1
