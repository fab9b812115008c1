"""Webhook delivery on the ``webhooks`` queue: one attempt per task, plus the ``fluxgate webhooks`` process.

CPU only: nothing here imports torch or the engine, so the gateway's install can run it.

Body: ``{"type": <the event's type>, "timestamp": <when the event happened>, "data": <job object>}``.
The job object is rendered when the attempt is made, not when the event happened: the event stream
keeps no full job snapshot, and a retry hours later should carry result links that have not expired.
So a late ``job.started`` may show a job that has since succeeded; receivers should act on
``data.status`` and deduplicate on ``webhook-id`` (the same on every attempt of one event).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from shared.ids import now_iso
from shared.jobrecord import JobRecord
from shared.jobstore import JobStore
from shared.outbound import OutboundPolicy, OutboundRefused
from shared.outbound_http import OutboundError, OutboundResponse, Timeouts, post
from shared.queue import create_celery
from shared.redis_client import connect
from shared.settings import Settings
from shared.webhook_deliveries import (
    DELIVER_TASK,
    FAILED,
    PENDING,
    STOPPED,
    SUCCEEDED,
    WEBHOOK_QUEUE,
    AttemptResult,
    Claim,
    DeliveryStore,
    event_time,
)
from shared.webhook_dispatcher import PROGRESS_EVENT, Dispatcher, DispatcherConfig
from shared.webhook_retry import RetryPolicy, parse_retry_after
from shared.webhook_secrets import WebhookSecrets
from shared.webhook_signing import webhook_headers

log = logging.getLogger("fluxgate.webhooks")

JobRenderer = Callable[[JobRecord], dict[str, Any]]
Poster = Callable[[str, bytes, dict[str, str]], OutboundResponse]
ERROR_CHARS = 300  # how much of an error or response body an attempt record keeps


@dataclass
class WebhookRuntime:
    """What a delivery process holds: stores, the outbound policy, the retry policy, the job renderer."""

    deliveries: DeliveryStore
    jobs: JobStore
    secrets: WebhookSecrets
    retry: RetryPolicy
    render_job: JobRenderer
    post: Poster
    lease_s: float = 30.0  # longer than one attempt can take (the total timeout), so leases never overlap
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)


def build_runtime(settings: Settings, client: redis.Redis, render_job: JobRenderer) -> WebhookRuntime:
    """The runtime of ``settings``: real Redis stores and HTTP under the outbound policy."""
    policy = OutboundPolicy.from_setting(settings.outbound_allow_cidrs)
    timeouts = Timeouts(connect_s=settings.webhook_connect_timeout_s, total_s=settings.webhook_timeout_s)
    return WebhookRuntime(
        deliveries=DeliveryStore(client),
        jobs=JobStore(client),
        secrets=WebhookSecrets(client, settings.webhook_secret_overlap_s),
        retry=RetryPolicy.from_setting(settings.webhook_retry_schedule_s, settings.webhook_retry_jitter),
        render_job=render_job,
        post=lambda url, body, headers: post(policy, url, body, headers, timeouts),
        lease_s=settings.webhook_timeout_s + 20.0,
    )


def webhook_body(event_type: str, event_id: str, job: dict[str, Any]) -> bytes:
    """The signed body: compact JSON, exactly the bytes sent."""
    payload = {"type": event_type, "timestamp": event_time(event_id), "data": job}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def deliver_webhook(delivery_id: str, runtime: WebhookRuntime) -> str:
    """Make the next attempt of a delivery if it is pending and due; returns what happened."""
    claim = runtime.deliveries.begin(delivery_id, runtime.clock(), runtime.lease_s)
    if not isinstance(claim, Claim):
        if claim in (SUCCEEDED, STOPPED, FAILED, "gone"):
            runtime.deliveries.unschedule(delivery_id)
        return f"skipped ({claim})"
    delivery = runtime.deliveries.get(delivery_id)
    job = runtime.jobs.get(delivery["job_id"]) if delivery else None
    if delivery is None or job is None:
        result = AttemptResult(STOPPED, now_iso(), 0, error="the job no longer exists")
        runtime.deliveries.finish(delivery_id, claim.token, _attempt_record(claim, result), result)
        return STOPPED
    try:
        result = _attempt(delivery, job, claim, runtime)
    except Exception as error:  # rendering or signing failed (storage, Redis): record it, retry later
        log.exception("webhook delivery %s: attempt %d could not be made", delivery_id, claim.attempt)
        detail = f"internal error: {type(error).__name__}: {error}"[:ERROR_CHARS]
        result = _unsuccessful(delivery, claim, runtime, now_iso(), 0, None, detail)
    if not runtime.deliveries.finish(delivery_id, claim.token, _attempt_record(claim, result), result):
        log.warning("webhook delivery %s: lease lost during attempt %d", delivery_id, claim.attempt)
    log.info(
        "webhook %s %s attempt %d: %s (%s)",
        delivery["type"],
        delivery["job_id"],
        claim.attempt,
        result.status,
        result.status_code or result.error,
    )
    return result.status


def _attempt(
    delivery: dict[str, Any], job: JobRecord, claim: Claim, runtime: WebhookRuntime
) -> AttemptResult:
    """Render, sign and send; classify the response into the delivery's next state."""
    at = now_iso()
    body = webhook_body(delivery["type"], delivery["event_id"], runtime.render_job(job))
    secrets = runtime.secrets.signing_secrets(job.owner)
    headers = webhook_headers(delivery["webhook_id"], int(runtime.clock()), body, secrets)
    started = time.monotonic()
    response: OutboundResponse | None = None
    error: str | None = None
    try:
        response = runtime.post(delivery["url"], body, headers)
    except OutboundRefused as refused:
        error = f"refused: {refused}"
    except OutboundError as failure:
        error = str(failure)
    duration_ms = int((time.monotonic() - started) * 1000)
    if response is not None and 200 <= response.status < 300:
        return AttemptResult(SUCCEEDED, at, duration_ms, status_code=response.status)
    if response is not None and response.status == 410:
        return AttemptResult(
            STOPPED, at, duration_ms, status_code=410, error="the receiver answered 410 Gone"
        )
    if response is not None:
        error = _describe_failure(response)
    return _unsuccessful(delivery, claim, runtime, at, duration_ms, response, error)


def _unsuccessful(
    delivery: dict[str, Any],
    claim: Claim,
    runtime: WebhookRuntime,
    at: str,
    duration_ms: int,
    response: OutboundResponse | None,
    error: str | None,
) -> AttemptResult:
    """A failed attempt: retried by the schedule (Retry-After honoured), or failed when out of attempts.

    ``job.progress`` deliveries are never retried: the next progress or terminal event supersedes them.
    """
    status_code = response.status if response is not None else None
    delay = None
    if delivery["type"] != PROGRESS_EVENT:
        retry_after = parse_retry_after(response.headers.get("retry-after")) if response is not None else None
        delay = runtime.retry.delay(claim.round_attempt, retry_after, runtime.rng)
    if delay is None:
        return AttemptResult(FAILED, at, duration_ms, status_code=status_code, error=error)
    next_at = runtime.clock() + delay
    return AttemptResult(PENDING, at, duration_ms, status_code, error, next_at)


def _describe_failure(response: OutboundResponse) -> str:
    if 300 <= response.status < 400:
        return f"redirect to {response.headers.get('location', '?')!r} not followed"[:ERROR_CHARS]
    excerpt = response.body[:ERROR_CHARS].decode("utf-8", "replace")
    return f"HTTP {response.status}: {excerpt}"[:ERROR_CHARS]


def _attempt_record(claim: Claim, result: AttemptResult) -> dict[str, Any]:
    return {
        "n": claim.attempt,
        "at": result.at,
        "duration_ms": result.duration_ms,
        "status_code": result.status_code,
        "error": result.error,
        "outcome": result.status,
    }


def register_webhook_task(app: Celery, runtime: WebhookRuntime) -> None:
    """Bind the delivery task name to :func:`deliver_webhook` on this process's runtime."""

    @app.task(name=DELIVER_TASK, ignore_result=True)
    def deliver(delivery_id: str) -> str:
        return deliver_webhook(delivery_id, runtime)


def run_webhook_service(settings: Settings, render_job: JobRenderer, concurrency: int | None = None) -> int:
    """``fluxgate webhooks``: the outbox dispatcher thread and a Celery worker for the ``webhooks`` queue.

    SIGTERM or SIGINT stops the Celery worker warmly (attempts in flight finish, bounded by the
    webhook timeout), then the dispatcher.
    """
    client = connect(settings.redis_url)
    app = create_celery(settings)
    register_webhook_task(app, build_runtime(settings, client, render_job))
    config = DispatcherConfig(progress_interval_s=settings.webhook_progress_interval_s)
    dispatcher = Dispatcher(client, lambda delivery_id: _enqueue(app, delivery_id), config)
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop,), name="webhook-dispatcher", daemon=True)
    thread.start()
    threads = str(concurrency or settings.webhook_concurrency)
    try:
        app.worker_main(
            ["worker", "--pool", "threads", "--concurrency", threads, "--queues", WEBHOOK_QUEUE,
             "--hostname", f"webhooks-{dispatcher.consumer}@%h", "--without-gossip", "--without-mingle",
             "--loglevel", "INFO"]
        )  # fmt: skip
    finally:
        stop.set()
        thread.join(timeout=10)
    return 0


def _enqueue(app: Celery, delivery_id: str) -> None:
    app.send_task(DELIVER_TASK, args=[delivery_id], queue=WEBHOOK_QUEUE)
