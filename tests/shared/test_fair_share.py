"""Fair share: which queued job a task message (a ticket for its model's queue) claims, on a real Redis."""

from __future__ import annotations

import base64
import json
import secrets

import pytest
import redis

from shared.ids import new_job_id
from shared.jobstore import JobOptions, JobStore
from shared.queue import broker_lists, create_celery, enqueue_generation, waiting_messages
from shared.settings import Settings
from shared.sweeper import sweep_lost_workers
from shared.workers import alive_key
from tests.shared.test_jobstore import event_types, params

MODEL = "flux-tiny"


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client)


def submit(store: JobStore, owner: str, count: int = 1, priority: str = "normal") -> list[str]:
    options = JobOptions(priority=priority)
    return [store.create(new_job_id(), owner, params(), options).id for _ in range(count)]


def take(store: JobStore, worker: str = "w1", ticket: str | None = None) -> str | None:
    """Spend one message on the model's queue; the id of the job it claimed (None: dropped)."""
    ticket = ticket or secrets.token_hex(8)
    record = store.claim("job_hint", 1, worker, max_attempts=3, model=MODEL, ticket=ticket)
    return None if record is None else record.id


def take_all(store: JobStore) -> list[str]:
    taken: list[str] = []
    while (job_id := take(store)) is not None:
        taken.append(job_id)
    return taken


def test_burst_of_one_owner_does_not_starve_the_next_owner(store: JobStore) -> None:
    alice = submit(store, "alice", 20)
    bob = submit(store, "bob", 2)
    taken = take_all(store)
    assert taken[:4] == [alice[0], bob[0], alice[1], bob[1]]  # not behind alice's twenty
    assert taken[4:] == alice[2:]


def test_owner_arriving_while_a_burst_runs_is_served_next(store: JobStore) -> None:
    alice = submit(store, "alice", 20)
    assert take(store) == alice[0]
    bob = submit(store, "bob", 2)
    assert [take(store) for _ in range(3)] == [bob[0], alice[1], bob[1]]


def test_queue_position_is_the_order_workers_take_jobs_in(store: JobStore) -> None:
    alice, bob, carol = submit(store, "alice", 5), submit(store, "bob", 2), submit(store, "carol")
    by_position = sorted(alice + bob + carol, key=lambda job_id: store.queue_position(MODEL, job_id) or 0)
    assert [store.queue_position(MODEL, job_id) for job_id in by_position] == list(range(8))
    assert by_position == [alice[0], bob[0], carol[0], alice[1], bob[1], *alice[2:]]
    assert take_all(store) == by_position


def test_priority_wins_over_fairness(store: JobStore) -> None:
    low = submit(store, "alice", 2, "low")
    normal = submit(store, "alice", 3)
    high = submit(store, "bob", 1, "high")
    bob_normal = submit(store, "bob")
    assert take_all(store) == [*high, normal[0], *bob_normal, normal[1], normal[2], *low]


def test_jobs_of_one_owner_run_in_submission_order(store: JobStore) -> None:
    alice = submit(store, "alice", 4)
    bob = submit(store, "bob", 4)
    alice += submit(store, "alice", 2)
    taken = take_all(store)
    assert [job_id for job_id in taken if job_id in alice] == alice
    assert [job_id for job_id in taken if job_id in bob] == bob


def test_owner_submitting_one_job_at_a_time_gets_one_turn_per_round(store: JobStore) -> None:
    alice = submit(store, "alice", 4)
    assert take(store) == alice[0]
    taken, bob = [], []
    for _ in range(3):  # bob submits again as soon as his job starts
        bob += submit(store, "bob")
        taken.append(take(store))
    assert taken == [bob[0], alice[1], bob[1]]


def test_idle_owner_banks_no_credit(store: JobStore) -> None:
    submit(store, "bob")
    take(store)
    alice = submit(store, "alice", 6)
    assert [take(store) for _ in range(4)] == alice[:4]
    bob = submit(store, "bob", 3)  # idle for four rounds: his turn comes back, not four turns
    assert take_all(store) == [bob[0], alice[4], bob[1], alice[5], bob[2]]


def test_canceled_jobs_give_their_owner_its_turn_back(store: JobStore) -> None:
    alice = submit(store, "alice", 10)
    bob = submit(store, "bob", 3)
    for job_id in alice[1:]:
        store.cancel(job_id)
    again = submit(store, "alice")
    assert take_all(store) == [alice[0], bob[0], bob[1], *again, bob[2]]


def test_canceled_job_never_runs_and_its_message_takes_the_next_job(store: JobStore) -> None:
    first, second = submit(store, "alice", 2)
    store.cancel(first)
    record = store.claim(first, 1, "w1", max_attempts=3)  # the canceled job's own message
    assert record is not None and record.id == second
    assert store.claim(second, 1, "w1", max_attempts=3) is None  # nothing queued: dropped
    assert store.get(first).status == "canceled"  # type: ignore[union-attr]
    assert "job.started" not in event_types(store, first)


def test_message_finding_nothing_queued_changes_nothing(store: JobStore) -> None:
    assert take(store) is None
    assert store.redis.keys("fg:ticket:*") == []


def test_redelivered_message_whose_job_runs_on_a_live_worker_takes_no_other_job(store: JobStore) -> None:
    first, second = submit(store, "alice", 2)
    assert take(store, "w1", ticket="m1") == first
    store.redis.set(alive_key("w1"), "1", ex=30)
    assert take(store, "w2", ticket="m1") is None
    assert store.get(second).status == "queued"  # type: ignore[union-attr]


def test_redelivered_message_of_a_dead_worker_reclaims_the_job_it_ran_not_the_one_it_names(
    store: JobStore,
) -> None:
    alice, bob = submit(store, "alice"), submit(store, "bob")
    record = store.claim(bob[0], 1, "w1", max_attempts=3, ticket="m-bob")  # alice's turn comes first
    assert record is not None and record.id == alice[0]
    again = store.claim(bob[0], 1, "w2", max_attempts=3, ticket="m-bob")  # w1 died; Celery redelivers
    assert again is not None and (again.id, again.attempt, again.worker) == (alice[0], 2, "w2")
    assert store.get(bob[0]).status == "queued"  # type: ignore[union-attr]


def test_message_naming_a_dead_workers_job_serves_the_queue_and_leaves_that_job_to_the_sweeper(
    store: JobStore,
) -> None:
    first, second = submit(store, "alice", 2)
    taken = store.claim(second, 1, "w1", max_attempts=3, ticket="m-second")
    assert taken is not None and taken.id == first  # w1 then dies (it never heartbeats)
    record = store.claim(first, 1, "w2", max_attempts=3, ticket="m-first")
    assert record is not None and record.id == second  # else second would be left without a message
    assert store.get(first).worker == "w1"  # type: ignore[union-attr]


def test_claim_retried_after_a_lost_reply_gives_the_same_job_back(store: JobStore) -> None:
    first, second = submit(store, "alice", 2)
    assert take(store, "w1", ticket="m1") == first
    assert take(store, "w1", ticket="m1") == first
    assert event_types(store, first).count("job.started") == 1
    assert store.get(second).status == "queued"  # type: ignore[union-attr]


class Broker:
    """The model's Celery queue as kombu keeps it in Redis; a worker's pop, and Celery's redelivery."""

    def __init__(self, client: redis.Redis, queue: str = f"gen.{MODEL}") -> None:
        self.client, self.queue = client, queue

    def waiting(self) -> int:
        return waiting_messages(self.client, self.queue)

    def pop(self) -> tuple[str, str, str, int] | None:
        """The next message by priority: (raw, task id, job id, attempt)."""
        for name in broker_lists(self.queue):
            raw = self.client.rpop(name)
            if raw:
                message = json.loads(str(raw))
                (job_id, attempt), _, _ = json.loads(base64.b64decode(message["body"]))
                return str(raw), message["headers"]["id"], job_id, attempt
        return None

    def redeliver(self, raw: str) -> None:
        self.client.rpush(broker_lists(self.queue)[1], raw)


def test_every_queued_job_keeps_a_message_through_cancel_requeue_and_redelivery(
    store: JobStore, settings: Settings
) -> None:
    celery, broker = create_celery(settings), Broker(store.redis)

    def holds() -> None:
        assert broker.waiting() >= store.queue_depth(MODEL)

    def submit_with_message(owner: str) -> str:
        [job_id] = submit(store, owner)
        enqueue_generation(celery, f"gen.{MODEL}", job_id, 1)
        holds()
        return job_id

    alice = [submit_with_message("alice") for _ in range(6)]
    bob = [submit_with_message("bob") for _ in range(2)]
    message = broker.pop()
    assert message is not None
    lost = store.claim(message[2], message[3], "w1", max_attempts=3, model=MODEL, ticket=message[1])
    assert lost is not None  # w1 dies mid-job: it never heartbeats
    holds()
    assert sweep_lost_workers(store, celery, settings) == 1  # attempt 2, with a new message
    holds()
    broker.redeliver(message[0])  # and Celery redelivers w1's unacknowledged message
    store.cancel(bob[1])
    holds()
    store.redis.set(alive_key("w2"), "1", ex=30)
    while (message := broker.pop()) is not None:
        record = store.claim(message[2], message[3], "w2", max_attempts=3, model=MODEL, ticket=message[1])
        if record is not None:
            store.transition(record.id, "succeeded", allowed_from={"running"}, fields={"images": []})
        holds()
    statuses = {job_id: store.get(job_id).status for job_id in alice + bob}  # type: ignore[union-attr]
    assert statuses == {**{job_id: "succeeded" for job_id in alice + bob[:1]}, bob[1]: "canceled"}
    assert store.get(lost.id).attempt == 2  # type: ignore[union-attr]
    assert store.redis.keys("fg:ticket:*") == []
