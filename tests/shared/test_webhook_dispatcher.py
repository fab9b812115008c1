"""The webhook dispatcher: outbox → delivery records → tasks; throttling; recovery after a crash."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from shared.webhook_deliveries import OUTBOX_KEY, RETRIES_KEY, DeliveryStore, deliveries_for_job
from shared.webhook_dispatcher import GROUP, Dispatcher, DispatcherConfig
from tests.webhook_support import hooked_job, run_to_success

URL = "https://hooks.example.com/fluxgate"


class Sent(list[str]):
    def __call__(self, delivery_id: str) -> None:
        self.append(delivery_id)


def dispatcher(client: redis.Redis, sent: Sent, **config: float) -> Dispatcher:
    settings = {"progress_interval_s": 60.0, "block_s": 0.01, "claim_idle_s": 30.0, **config}
    return Dispatcher(client, sent, DispatcherConfig(**settings))  # type: ignore[arg-type]


def pending(client: redis.Redis) -> int:
    summary: Any = client.xpending(OUTBOX_KEY, GROUP)
    return int(summary["pending"])


def types(client: redis.Redis, job_id: str) -> list[str]:
    return [d["type"] for d in deliveries_for_job(client, job_id)]


def test_selected_events_become_pending_deliveries_handed_to_tasks(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.queued", "job.succeeded"))
    run_to_success(redis_client, job_id)
    sent = Sent()
    loop = dispatcher(redis_client, sent)
    loop.ensure_group()
    loop.step()
    loop.step()
    deliveries = deliveries_for_job(redis_client, job_id)
    assert [d["type"] for d in deliveries] == ["job.queued", "job.succeeded"]  # job.started not selected
    assert all(d["status"] == "pending" and d["url"] == URL and d["attempts"] == [] for d in deliveries)
    assert deliveries[0]["webhook_id"] == f"evt_{job_id}_{deliveries[0]['event_id']}"
    assert sorted(sent) == sorted(d["id"] for d in deliveries)
    assert pending(redis_client) == 0


def test_a_handed_off_delivery_is_handed_off_again_only_after_its_lease(redis_client: redis.Redis) -> None:
    hooked_job(redis_client, URL, ("job.queued",))
    sent = Sent()
    loop = dispatcher(redis_client, sent, send_lease_s=0.3)
    loop.ensure_group()
    loop.step()
    loop.step()
    assert len(sent) == 1
    time.sleep(0.35)
    loop.step()
    assert len(sent) == 2  # its task never recorded an attempt: lost message, so it is sent again


def test_a_failed_hand_off_is_retried(redis_client: redis.Redis) -> None:
    hooked_job(redis_client, URL, ("job.queued",))

    def broker_down(delivery_id: str) -> None:
        raise ConnectionError("broker down")

    loop = dispatcher(redis_client, Sent())
    loop.send = broker_down
    loop.ensure_group()
    loop.step()
    loop.step()
    scheduled: Any = redis_client.zrange(RETRIES_KEY, 0, -1, withscores=True)
    [(_, due)] = scheduled
    assert due > time.time() + 1


def test_progress_is_throttled_and_terminal_events_never_are(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL)
    run_to_success(redis_client, job_id, progress_steps=6)
    loop = dispatcher(redis_client, Sent(), progress_interval_s=60.0)
    loop.ensure_group()
    loop.step()
    assert types(redis_client, job_id) == ["job.queued", "job.started", "job.progress", "job.succeeded"]


def test_progress_passes_again_after_the_interval(redis_client: redis.Redis) -> None:
    from shared.jobstore import JobStore

    job_id = hooked_job(redis_client, URL, ("job.progress",))
    store = JobStore(redis_client)
    store.claim(job_id, 1, "worker-1", max_attempts=3)
    loop = dispatcher(redis_client, Sent(), progress_interval_s=0.2)
    loop.ensure_group()
    for step in range(1, 4):
        store.record_progress(job_id, 1, "worker-1", step, 4)
    loop.step()
    time.sleep(0.25)
    store.record_progress(job_id, 1, "worker-1", 4, 4)
    loop.step()
    assert types(redis_client, job_id) == ["job.progress", "job.progress"]


def test_entries_a_crashed_dispatcher_left_pending_are_taken_over(redis_client: redis.Redis) -> None:
    job_ids = [hooked_job(redis_client, URL, ("job.queued",)) for _ in range(3)]
    crashed = dispatcher(redis_client, Sent(), claim_idle_s=0.1)
    crashed.ensure_group()

    def crash(entry_id: str, fields: dict[str, str]) -> None:
        raise SystemExit("killed mid-batch")

    crashed.handle = crash  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        crashed.read_new(block_ms=10)  # read (now pending for it), never acknowledged
    assert pending(redis_client) == 3
    assert all(types(redis_client, job_id) == [] for job_id in job_ids)

    survivor = dispatcher(redis_client, Sent(), claim_idle_s=0.1)
    assert survivor.read_new(block_ms=10) == 0  # new entries only: the crashed one's are not "new"
    time.sleep(0.15)
    assert survivor.claim_stale() == 3
    assert all(types(redis_client, job_id) == ["job.queued"] for job_id in job_ids)
    assert pending(redis_client) == 0


def test_an_entry_handled_twice_yields_one_delivery(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.queued",))
    entries: Any = redis_client.xrange(OUTBOX_KEY)
    [(entry_id, fields)] = entries
    loop = dispatcher(redis_client, Sent())
    loop.handle(entry_id, fields)
    loop.handle(entry_id, fields)
    assert types(redis_client, job_id) == ["job.queued"]


def test_an_entry_for_a_purged_job_is_dropped(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.queued",))
    redis_client.delete(f"fg:job:{job_id}")
    loop = dispatcher(redis_client, Sent())
    loop.ensure_group()
    loop.step()
    assert types(redis_client, job_id) == []
    assert pending(redis_client) == 0


def test_housekeeping_trims_acknowledged_entries_only(redis_client: redis.Redis) -> None:
    for _ in range(3):
        hooked_job(redis_client, URL, ("job.queued",))
    loop = dispatcher(redis_client, Sent())
    loop.ensure_group()
    loop.read_new(block_ms=10)
    late = hooked_job(redis_client, URL, ("job.queued",))
    loop.housekeeping()
    entries: Any = redis_client.xrange(OUTBOX_KEY)
    remaining = [fields["job_id"] for _, fields in entries]
    assert remaining[-1] == late and len(remaining) <= 2  # the last acknowledged entry may stay
    loop.step()
    assert types(redis_client, late) == ["job.queued"]


def test_replay_and_delete(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.queued",))
    loop = dispatcher(redis_client, Sent())
    loop.ensure_group()
    loop.step()
    store = DeliveryStore(redis_client)
    [delivery] = deliveries_for_job(redis_client, job_id)
    assert store.replay(delivery["id"], time.time())
    assert not store.replay("dlv_missing", time.time())
    store.delete_for_job(job_id)
    assert deliveries_for_job(redis_client, job_id) == []
    assert redis_client.zcard(RETRIES_KEY) == 0
