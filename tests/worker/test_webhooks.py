"""One webhook attempt: signing, classification, retries, Retry-After, stale and duplicate messages."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
import redis
from standardwebhooks import Webhook

from shared.jobrecord import JobRecord
from shared.jobstore import JobStore
from shared.outbound import OutboundRefused
from shared.outbound_http import OutboundError, OutboundResponse
from shared.webhook_deliveries import DeliveryStore, deliveries_for_job
from shared.webhook_dispatcher import Dispatcher, DispatcherConfig
from shared.webhook_retry import RetryPolicy
from shared.webhook_secrets import WebhookSecrets
from tests.webhook_support import hooked_job, run_to_success
from worker.webhooks import WebhookRuntime, deliver_webhook

URL = "https://hooks.example.com/fluxgate"


class Receiver:
    """A fake receiver: answers from a script of responses (or raises), records what it got."""

    def __init__(self, *answers: OutboundResponse | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []

    def __call__(self, url: str, body: bytes, headers: dict[str, str]) -> OutboundResponse:
        self.calls.append((url, body, headers))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def render(record: JobRecord) -> dict[str, Any]:
    return {"id": record.id, "object": "job", "status": record.status}


def runtime(
    client: redis.Redis, receiver: Receiver, schedule: tuple[float, ...] = (0.0, 0.0)
) -> WebhookRuntime:
    return WebhookRuntime(
        deliveries=DeliveryStore(client),
        jobs=JobStore(client),
        secrets=WebhookSecrets(client, overlap_s=60),
        retry=RetryPolicy(schedule, jitter=0),
        render_job=render,
        post=receiver,
        rng=random.Random(0),
    )


def delivery_ids(client: redis.Redis, job_id: str, events: tuple[str, ...] = ("job.succeeded",)) -> list[str]:
    """Run the job to success and dispatch its outbox: the ids of its deliveries."""
    run_to_success(client, job_id, progress_steps=2)
    loop = Dispatcher(client, lambda _: None, DispatcherConfig(block_s=0.01, progress_interval_s=60))
    loop.ensure_group()
    loop.step()
    return [d["id"] for d in deliveries_for_job(client, job_id) if d["type"] in events]


def only_delivery(client: redis.Redis, job_id: str) -> dict[str, Any]:
    [delivery] = deliveries_for_job(client, job_id)
    return delivery


def test_a_2xx_succeeds_with_a_signed_standard_webhook(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.succeeded",))
    [delivery_id] = delivery_ids(redis_client, job_id)
    receiver = Receiver(OutboundResponse(204))
    assert deliver_webhook(delivery_id, runtime(redis_client, receiver)) == "succeeded"
    [(url, body, headers)] = receiver.calls
    assert url == URL
    secret = WebhookSecrets(redis_client, 60).current("alice")
    payload = Webhook(secret).verify(body, headers)
    assert payload["type"] == "job.succeeded"
    assert payload["data"] == {"id": job_id, "object": "job", "status": "succeeded"}
    assert payload["timestamp"].endswith("Z")
    delivery = only_delivery(redis_client, job_id)
    assert headers["webhook-id"] == delivery["webhook_id"]
    assert (delivery["status"], delivery["attempt_count"], delivery["last_status_code"]) == (
        "succeeded",
        1,
        204,
    )
    [attempt] = delivery["attempts"]
    assert attempt["n"] == 1 and attempt["status_code"] == 204 and attempt["outcome"] == "succeeded"
    assert attempt["duration_ms"] >= 0 and attempt["at"]


def test_a_succeeded_delivery_never_sends_again(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.succeeded",))
    [delivery_id] = delivery_ids(redis_client, job_id)
    receiver = Receiver(OutboundResponse(200))
    deliver_webhook(delivery_id, runtime(redis_client, receiver))
    assert deliver_webhook(delivery_id, runtime(redis_client, receiver)) == "skipped (succeeded)"
    assert len(receiver.calls) == 1


def test_failures_retry_with_the_same_webhook_id_then_give_up(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.succeeded",))
    [delivery_id] = delivery_ids(redis_client, job_id)
    receiver = Receiver(OutboundResponse(500, body=b"boom"), OutboundError("POST x: connection reset"))
    hooks = runtime(redis_client, receiver)
    assert deliver_webhook(delivery_id, hooks) == "pending"
    assert deliver_webhook(delivery_id, hooks) == "pending"
    assert deliver_webhook(delivery_id, hooks) == "failed"  # 1 + 2 scheduled retries
    assert deliver_webhook(delivery_id, hooks) == "skipped (failed)"
    assert len({headers["webhook-id"] for _, _, headers in receiver.calls}) == 1
    delivery = only_delivery(redis_client, job_id)
    assert [a["outcome"] for a in delivery["attempts"]] == ["pending", "pending", "failed"]
    assert delivery["attempts"][0]["error"] == "HTTP 500: boom"
    assert "connection reset" in delivery["attempts"][1]["error"]


def test_a_retry_is_not_sent_before_it_is_due(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.succeeded",))
    [delivery_id] = delivery_ids(redis_client, job_id)
    receiver = Receiver(OutboundResponse(503))
    hooks = runtime(redis_client, receiver, schedule=(600.0,))
    deliver_webhook(delivery_id, hooks)
    delivery = only_delivery(redis_client, job_id)
    assert delivery["status"] == "pending" and delivery["next_attempt_at"]
    assert deliver_webhook(delivery_id, hooks) == "skipped (not_due)"  # a duplicated message
    assert len(receiver.calls) == 1
    score = redis_client.zscore("fg:webhook:retries", delivery_id)
    assert score is not None and 590 < score - time.time() <= 600


def test_retry_after_is_honoured(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.succeeded",))
    [delivery_id] = delivery_ids(redis_client, job_id)
    receiver = Receiver(OutboundResponse(429, headers={"retry-after": "120"}))
    deliver_webhook(delivery_id, runtime(redis_client, receiver, schedule=(5.0, 3600.0)))
    score = redis_client.zscore("fg:webhook:retries", delivery_id)
    assert score is not None and 110 < score - time.time() <= 120


def test_410_stops_at_once(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.succeeded",))
    [delivery_id] = delivery_ids(redis_client, job_id)
    receiver = Receiver(OutboundResponse(410))
    assert deliver_webhook(delivery_id, runtime(redis_client, receiver)) == "stopped"
    delivery = only_delivery(redis_client, job_id)
    assert (delivery["status"], len(delivery["attempts"])) == ("stopped", 1)
    assert redis_client.zscore("fg:webhook:retries", delivery_id) is None


def test_redirects_and_refused_addresses_are_failures(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.succeeded",))
    [delivery_id] = delivery_ids(redis_client, job_id)
    receiver = Receiver(
        OutboundResponse(301, headers={"location": "http://10.0.0.1/"}),
        OutboundRefused("resolves to 10.0.0.1"),
    )
    hooks = runtime(redis_client, receiver)
    deliver_webhook(delivery_id, hooks)
    deliver_webhook(delivery_id, hooks)
    errors = [a["error"] for a in only_delivery(redis_client, job_id)["attempts"]]
    assert errors == ["redirect to 'http://10.0.0.1/' not followed", "refused: resolves to 10.0.0.1"]


def test_progress_deliveries_are_never_retried(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.progress",))
    [delivery_id] = delivery_ids(redis_client, job_id, ("job.progress",))
    assert deliver_webhook(delivery_id, runtime(redis_client, Receiver(OutboundResponse(500)))) == "failed"


def test_a_purged_job_stops_its_deliveries(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.succeeded",))
    [delivery_id] = delivery_ids(redis_client, job_id)
    redis_client.delete(f"fg:job:{job_id}")
    receiver = Receiver(OutboundResponse(200))
    assert deliver_webhook(delivery_id, runtime(redis_client, receiver)) == "stopped"
    assert receiver.calls == []


def test_a_leased_delivery_is_not_attempted_twice_at_once(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.succeeded",))
    [delivery_id] = delivery_ids(redis_client, job_id)
    store = DeliveryStore(redis_client)
    assert not isinstance(store.begin(delivery_id, time.time(), 30), str)  # another task holds it
    receiver = Receiver(OutboundResponse(200))
    assert deliver_webhook(delivery_id, runtime(redis_client, receiver)) == "skipped (leased)"
    assert receiver.calls == []


def test_replay_starts_a_fresh_round(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.succeeded",))
    [delivery_id] = delivery_ids(redis_client, job_id)
    receiver = Receiver(OutboundResponse(500))
    hooks = runtime(redis_client, receiver, schedule=())
    assert deliver_webhook(delivery_id, hooks) == "failed"
    DeliveryStore(redis_client).replay(delivery_id, time.time())
    receiver.answers = [OutboundResponse(200)]
    assert deliver_webhook(delivery_id, hooks) == "succeeded"
    delivery = only_delivery(redis_client, job_id)
    assert [a["n"] for a in delivery["attempts"]] == [1, 2]
    assert json.loads(receiver.calls[0][1])["type"] == "job.succeeded"


@pytest.mark.parametrize("overlap", [True, False])
def test_rotation_overlap_sends_both_signatures(redis_client: redis.Redis, overlap: bool) -> None:
    job_id = hooked_job(redis_client, URL, ("job.succeeded",))
    [delivery_id] = delivery_ids(redis_client, job_id)
    secrets = WebhookSecrets(redis_client, overlap_s=60 if overlap else 0)
    old = secrets.current("alice")
    new = secrets.rotate("alice").key
    receiver = Receiver(OutboundResponse(200))
    hooks = runtime(redis_client, receiver)
    hooks.secrets = secrets
    deliver_webhook(delivery_id, hooks)
    [(_, body, headers)] = receiver.calls
    Webhook(new).verify(body, headers)
    assert len(headers["webhook-signature"].split(" ")) == (2 if overlap else 1)
    if overlap:
        Webhook(old).verify(body, headers)


def test_a_rendering_failure_is_recorded_and_retried(redis_client: redis.Redis) -> None:
    job_id = hooked_job(redis_client, URL, ("job.succeeded",))
    [delivery_id] = delivery_ids(redis_client, job_id)
    receiver = Receiver(OutboundResponse(200))
    hooks = runtime(redis_client, receiver, schedule=(600.0,))

    def broken(record: JobRecord) -> dict[str, Any]:
        raise RuntimeError("storage unreachable")

    hooks.render_job = broken
    assert deliver_webhook(delivery_id, hooks) == "pending"
    [attempt] = only_delivery(redis_client, job_id)["attempts"]
    assert attempt["error"] == "internal error: RuntimeError: storage unreachable"
    assert receiver.calls == []
