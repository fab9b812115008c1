"""The job store: transitions, claims, progress, listings and queue positions on a real Redis."""

from __future__ import annotations

import pytest
import redis

from shared.ids import new_job_id
from shared.jobstore import IllegalTransition, JobStore
from shared.schemas import GenerationParams
from shared.workers import alive_key
from tests.support import generation_params


def params(**overrides: object) -> GenerationParams:
    return generation_params(**{**{"num_inference_steps": 4}, **overrides})


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client)


def new_job(store: JobStore, owner: str = "alice") -> str:
    return store.create(new_job_id(), owner, params()).id


def event_types(store: JobStore, job_id: str) -> list[str]:
    return [fields["type"] for _, fields in store.redis.xrange(f"fg:job:{job_id}:events")]


def test_created_job_is_queued_at_attempt_one_with_a_queued_event(store: JobStore) -> None:
    job_id = new_job(store)
    record = store.get(job_id)
    assert record is not None
    assert (record.status, record.attempt, record.owner) == ("queued", 1, "alice")
    assert record.progress.total == 4
    assert event_types(store, job_id) == ["job.queued"]


def test_queue_position_of_one_owners_jobs_is_submission_order_and_clears_once_running(
    store: JobStore,
) -> None:
    first, second, third = new_job(store), new_job(store), new_job(store)
    assert [store.queue_position("flux-tiny", j) for j in (first, second, third)] == [0, 1, 2]
    assert store.claim(first, 1, "w1", max_attempts=3) is not None
    assert store.queue_position("flux-tiny", first) is None
    assert store.queue_position("flux-tiny", third) == 1


def test_transition_outside_the_lifecycle_raises(store: JobStore) -> None:
    job_id = new_job(store)
    with pytest.raises(IllegalTransition):
        store.transition(job_id, "succeeded", allowed_from={"queued"})


def test_transition_from_a_status_the_job_is_not_in_raises(store: JobStore) -> None:
    job_id = new_job(store)
    with pytest.raises(IllegalTransition) as caught:
        store.transition(job_id, "succeeded", allowed_from={"running"})
    assert caught.value.reason == "illegal"
    assert store.get(job_id).status == "queued"  # type: ignore[union-attr]


def test_transition_of_a_missing_job_raises_not_found(store: JobStore) -> None:
    with pytest.raises(IllegalTransition) as caught:
        store.transition(new_job_id(), "running", allowed_from={"queued"})
    assert caught.value.reason == "not_found"


def test_claim_moves_a_queued_job_to_running_for_that_worker(store: JobStore) -> None:
    job_id = new_job(store)
    record = store.claim(job_id, 1, "w1", max_attempts=3)
    assert record is not None
    assert (record.status, record.attempt, record.worker) == ("running", 1, "w1")
    assert record.started_at is not None
    assert event_types(store, job_id) == ["job.queued", "job.started"]


def test_message_of_another_attempt_is_still_a_ticket_for_the_queue(store: JobStore) -> None:
    job_id = new_job(store)
    record = store.claim(job_id, 2, "w1", max_attempts=3)
    assert record is not None and (record.id, record.status, record.attempt) == (job_id, "running", 1)
    assert store.claim(job_id, 3, "w1", max_attempts=3) is None  # nothing left queued: dropped


def test_message_for_a_terminal_job_is_dropped_when_nothing_is_queued(store: JobStore) -> None:
    job_id = new_job(store)
    store.transition(job_id, "canceled", allowed_from={"queued"})
    assert store.claim(job_id, 1, "w1", max_attempts=3) is None
    assert store.get(job_id).status == "canceled"  # type: ignore[union-attr]


def test_redelivered_message_is_dropped_while_its_worker_lives(store: JobStore) -> None:
    job_id = new_job(store)
    store.claim(job_id, 1, "w1", max_attempts=3)
    store.redis.set(alive_key("w1"), "1", ex=30)
    assert store.claim(job_id, 1, "w2", max_attempts=3) is None
    assert store.get(job_id).worker == "w1"  # type: ignore[union-attr]


def test_redelivered_message_of_a_dead_worker_is_claimed_as_the_next_attempt(store: JobStore) -> None:
    job_id = new_job(store)
    store.claim(job_id, 1, "w1", max_attempts=3)
    record = store.claim(job_id, 1, "w2", max_attempts=3)
    assert record is not None
    assert (record.status, record.attempt, record.worker) == ("running", 2, "w2")
    assert event_types(store, job_id)[-2:] == ["job.requeued", "job.started"]


def test_dead_worker_past_max_attempts_fails_the_job_with_worker_lost(store: JobStore) -> None:
    job_id = new_job(store)
    store.claim(job_id, 1, "w1", max_attempts=1)
    assert store.claim(job_id, 1, "w2", max_attempts=1) is None
    record = store.get(job_id)
    assert record is not None and record.error is not None
    assert (record.status, record.error.code) == ("failed", "worker_lost")


def test_old_attempt_cannot_write_a_result_after_a_reclaim(store: JobStore) -> None:
    job_id = new_job(store)
    store.claim(job_id, 1, "w1", max_attempts=3)
    store.claim(job_id, 1, "w2", max_attempts=3)
    with pytest.raises(IllegalTransition) as caught:
        store.transition(job_id, "succeeded", allowed_from={"running"}, expect_attempt=1, expect_worker="w1")
    assert caught.value.reason == "stale"


def test_progress_is_recorded_only_for_the_owning_attempt(store: JobStore) -> None:
    job_id = new_job(store)
    store.claim(job_id, 1, "w1", max_attempts=3)
    assert store.record_progress(job_id, 1, "w1", 2, 4) == "running"
    store.record_progress(job_id, 1, "intruder", 3, 4)
    record = store.get(job_id)
    assert record is not None
    assert (record.progress.step, record.progress.total) == (2, 4)
    assert event_types(store, job_id)[-1] == "job.progress"


def test_listing_pages_newest_first_and_filters_by_status(store: JobStore) -> None:
    ids = [new_job(store) for _ in range(5)]
    new_job(store, owner="bob")
    store.claim(ids[0], 1, "w1", max_attempts=3)
    page, cursor = store.list_for_owner("alice", None, 2, None)
    assert [r.id for r in page] == [ids[4], ids[3]] and cursor == ids[3]
    page, cursor = store.list_for_owner("alice", None, 2, cursor)
    assert [r.id for r in page] == [ids[2], ids[1]]
    page, cursor = store.list_for_owner("alice", None, 2, cursor)
    assert [r.id for r in page] == [ids[0]] and cursor is None
    running, _ = store.list_for_owner("alice", "running", 10, None)
    assert [r.id for r in running] == [ids[0]]
    queued, _ = store.list_for_owner("alice", "queued", 10, None)
    assert len(queued) == 4
