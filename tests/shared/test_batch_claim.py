"""Batch claims: one task message takes the head of its model's queue and the queued jobs that can run in
the same pipeline call, atomically, in fair-share order, keeping every queued job's ticket. Real Redis."""

from __future__ import annotations

import secrets

import pytest
import redis

from shared import jobstore
from shared.ids import new_job_id
from shared.jobstore import JobOptions, JobStore
from shared.queue import create_celery, enqueue_generation
from shared.settings import Settings
from shared.sweeper import sweep_lost_workers
from shared.workers import alive_key
from tests.shared.test_fair_share import MODEL, Broker
from tests.shared.test_jobstore import event_types, params

REFERENCE = {"key": "inputs/x/0.png", "width": 64, "height": 64, "sha256": "0" * 64, "bytes": 10}


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client)


def submit(
    store: JobStore, owner: str = "alice", count: int = 1, priority: str = "normal", **overrides: object
) -> list[str]:
    options = JobOptions(priority=priority)
    return [store.create(new_job_id(), owner, params(**overrides), options).id for _ in range(count)]


def take(store: JobStore, max_batch: int, worker: str = "w1", ticket: str | None = None) -> list[str]:
    """Spend one message with a worker of ``max_batch``; the ids it claimed, in claim order."""
    ticket = ticket or secrets.token_hex(8)
    records = store.claim_batch(
        "hint", 1, worker, max_attempts=3, model=MODEL, ticket=ticket, max_batch=max_batch
    )
    return [record.id for record in records]


def status(store: JobStore, job_id: str) -> str:
    record = store.get(job_id)
    assert record is not None
    return record.status


def test_a_batch_claim_takes_compatible_queued_jobs_up_to_the_batch_size(store: JobStore) -> None:
    jobs = submit(store, count=6)
    assert take(store, max_batch=4) == jobs[:4]
    for job_id in jobs[:4]:
        record = store.get(job_id)
        assert record is not None and (record.status, record.attempt, record.worker) == ("running", 1, "w1")
        assert event_types(store, job_id) == ["job.queued", "job.started"]
    assert [status(store, job_id) for job_id in jobs[4:]] == ["queued", "queued"]
    assert take(store, max_batch=4) == jobs[4:]


def test_a_worker_without_batching_claims_only_the_head(store: JobStore) -> None:
    jobs = submit(store, count=3)
    assert take(store, max_batch=1) == jobs[:1]
    assert store.claim("hint", 1, "w1", max_attempts=3, model=MODEL) is not None  # claim: one job
    assert status(store, jobs[2]) == "queued"


@pytest.mark.parametrize(
    "difference",
    [
        {"width": 128},
        {"height": 128},
        {"num_inference_steps": 8},
        {"guidance_scale": 5.0},
        {"cache": "fast"},
        {"negative_prompt": "blurry", "true_cfg_scale": 2.0},
        {"true_cfg_scale": 2.0},
        {"num_images": 2},
        {"images": [REFERENCE]},
    ],
)
def test_jobs_that_differ_in_more_than_prompt_and_seed_are_skipped_and_keep_their_place(
    store: JobStore, difference: dict[str, object]
) -> None:
    head = submit(store)
    other = submit(store, **difference)
    mates = submit(store, count=2, prompt="another prompt", seed=99, output_format="jpeg")
    assert params(**difference).batch_key() != params().batch_key()  # the rule the engine checks too
    assert take(store, max_batch=4) == head + mates
    assert store.queue_position(MODEL, other[0]) == 0  # first in line for the next message
    assert take(store, max_batch=4) == other


def test_a_job_that_runs_alone_takes_no_mates(store: JobStore) -> None:
    alone = submit(store, num_images=2)
    submit(store, count=2, num_images=2)
    assert take(store, max_batch=4) == alone


def test_batch_mates_are_taken_in_fair_share_order(store: JobStore) -> None:
    alice = submit(store, "alice", 5)
    bob = submit(store, "bob", 2)
    carol = submit(store, "carol", 1, width=128)  # her turn is kept, but she cannot join
    assert take(store, max_batch=4) == [alice[0], bob[0], alice[1], bob[1]]
    assert take(store, max_batch=4) == carol
    assert take(store, max_batch=4) == alice[2:]


def test_batch_mates_come_from_the_heads_priority_band_only(store: JobStore) -> None:
    high = submit(store, "alice", 1, "high")
    wide = submit(store, "alice", 1, "high", width=128)
    normal = submit(store, "bob", 2)
    assert take(store, max_batch=4) == high  # the normal jobs would fit, but a high job still waits
    assert take(store, max_batch=4) == wide
    assert take(store, max_batch=4) == normal


def test_taking_mates_moves_fair_share_on_as_taking_them_one_by_one_would(store: JobStore) -> None:
    alice = submit(store, "alice", 6)
    assert take(store, max_batch=3) == alice[:3]  # alice served up to round 3
    bob = submit(store, "bob", 2)
    assert take(store, max_batch=1) == bob[:1]  # a newcomer joins the round being served
    assert take(store, max_batch=2) == [alice[3], bob[1]]


def test_mates_are_looked_for_within_the_lookahead_only(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobstore, "BATCH_LOOKAHEAD", 3)
    head = submit(store)
    submit(store, count=3, width=128)
    far = submit(store)
    assert take(store, max_batch=4) == head
    assert status(store, far[0]) == "queued"


def test_a_retried_claim_gets_its_whole_batch_back(store: JobStore) -> None:
    jobs = submit(store, count=4)
    assert take(store, max_batch=3, ticket="m1") == jobs[:3]
    assert take(store, max_batch=3, ticket="m1") == jobs[:3]  # the reply was lost: same jobs, no new ones
    assert status(store, jobs[3]) == "queued"
    assert all(event_types(store, job_id).count("job.started") == 1 for job_id in jobs[:3])


def test_a_redelivered_batch_message_is_a_duplicate_while_any_job_of_the_batch_runs(store: JobStore) -> None:
    jobs = submit(store, count=4)
    assert take(store, max_batch=3, ticket="m1") == jobs[:3]
    store.redis.set(alive_key("w1"), "1", ex=30)
    store.transition(jobs[0], "succeeded", allowed_from={"running"}, fields={"images": []})
    store.transition(jobs[1], "canceled", allowed_from={"running"})
    assert store.redis.get("fg:ticket:m1") == jobs[2]
    assert take(store, max_batch=3, worker="w2", ticket="m1") == []  # still the batch's: a duplicate
    assert status(store, jobs[3]) == "queued"
    store.transition(jobs[2], "succeeded", allowed_from={"running"}, fields={"images": []})
    assert store.redis.keys("fg:ticket:*") == []  # spent with the last job of the batch


def test_a_dead_workers_batch_is_requeued_whole(store: JobStore, settings: Settings) -> None:
    jobs = submit(store, count=3)
    assert take(store, max_batch=3, ticket="m1") == jobs  # w1 dies: it never heartbeats
    celery, broker = create_celery(settings), Broker(store.redis)
    assert sweep_lost_workers(store, celery, settings) == 3
    assert [status(store, job_id) for job_id in jobs] == ["queued"] * 3
    assert broker.waiting() == 3  # one new message each
    assert store.redis.keys("fg:ticket:*") == []


def test_a_redelivered_message_of_a_dead_batch_reclaims_one_job_and_the_sweeper_the_others(
    store: JobStore, settings: Settings
) -> None:
    jobs = submit(store, count=3)
    assert take(store, max_batch=3, ticket="m1") == jobs  # w1 dies
    reclaimed = take(store, max_batch=3, worker="w2", ticket="m1")  # Celery redelivers its message
    assert reclaimed == jobs[:1]
    record = store.get(jobs[0])
    assert record is not None and (record.attempt, record.worker) == (2, "w2")
    store.redis.set(alive_key("w2"), "1", ex=30)
    assert sweep_lost_workers(store, create_celery(settings), settings) == 2
    assert [status(store, job_id) for job_id in jobs] == ["running", "queued", "queued"]
    assert store.redis.get("fg:ticket:m1") == jobs[0]


def test_every_queued_job_keeps_a_message_when_batches_take_jobs_of_later_messages(
    store: JobStore, settings: Settings
) -> None:
    celery, broker = create_celery(settings), Broker(store.redis)
    store.redis.set(alive_key("w1"), "1", ex=60)
    store.redis.set(alive_key("w2"), "1", ex=60)

    def holds() -> None:
        assert broker.waiting() >= store.queue_depth(MODEL)

    def submit_with_message(owner: str, **overrides: object) -> str:
        [job_id] = submit(store, owner, **overrides)
        enqueue_generation(celery, f"gen.{MODEL}", job_id, 1)
        holds()
        return job_id

    jobs = [submit_with_message("alice") for _ in range(5)]
    jobs += [submit_with_message("bob", width=128) for _ in range(2)]
    jobs += [submit_with_message("carol") for _ in range(3)]
    ran: list[list[str]] = []
    worker = "w1"
    while (message := broker.pop()) is not None:
        records = store.claim_batch(
            message[2], message[3], worker, max_attempts=3, model=MODEL, ticket=message[1], max_batch=4
        )
        holds()
        if records:
            ran.append([record.id for record in records])
        for record in records:
            store.transition(record.id, "succeeded", allowed_from={"running"}, fields={"images": []})
        worker = "w2" if worker == "w1" else "w1"
        if len(ran) == 1:  # a submission while the later messages wait
            jobs.append(submit_with_message("dave"))
    assert {status(store, job_id) for job_id in jobs} == {"succeeded"}
    assert max(len(batch) for batch in ran) == 4 and sorted(j for batch in ran for j in batch) == sorted(jobs)
    assert store.redis.keys("fg:ticket:*") == []
