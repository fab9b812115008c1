"""Submitting a job: options, idempotent replays, enqueueing, and waiting for the result."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from api.services import Services
from api.validation import check_job_options, check_metadata, resolve_model, resolve_params
from shared.errors import ApiError
from shared.ids import iso, new_job_id, now_iso, utcnow
from shared.jobstore import JobOptions, JobRecord, events_key
from shared.keys import Principal
from shared.queue import enqueue_generation
from shared.schemas import DEFAULT_WEBHOOK_EVENTS, TERMINAL_STATUSES, JobCreate

IDEMPOTENCY_TTL_S = 24 * 3600
MAX_WAIT_S = 60


@dataclass
class Submission:
    record: JobRecord
    replayed: bool


def job_options(body: JobCreate) -> JobOptions:
    deadline = iso(utcnow() + timedelta(seconds=body.cancel_after)) if body.cancel_after else None
    events = tuple(body.webhook_events) if body.webhook_events is not None else DEFAULT_WEBHOOK_EVENTS
    return JobOptions(
        metadata=body.metadata or {},
        priority=body.priority,
        webhook_url=body.webhook_url,
        webhook_events=events if body.webhook_url else (),
        deadline_at=deadline,
    )


def _body_hash(body: JobCreate) -> str:
    canonical = json.dumps(
        body.model_dump(mode="json", exclude_unset=True), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _idempotency_key(owner: str, key: str) -> str:
    return f"fg:idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"


def _replay(services: Services, stored: str, body_hash: str) -> JobRecord:
    claimed = json.loads(stored)
    if claimed["body"] != body_hash:
        raise ApiError(
            409,
            "idempotency_conflict",
            "This Idempotency-Key was used with a different request body.",
            "Idempotency-Key",
        )
    for _ in range(50):  # the first request may still be writing its job (it reserved the key first)
        record = services.store.get(claimed["job_id"])
        if record is not None:
            return record
        time.sleep(0.02)
    raise ApiError(
        409,
        "idempotency_in_progress",
        "A request with this Idempotency-Key is still being processed; retry shortly.",
        "Idempotency-Key",
        headers={"Retry-After": "1"},
    )


def submit_job(
    services: Services, principal: Principal, body: JobCreate, idempotency_key: str | None
) -> Submission:
    """Validate, write the record, then enqueue the first attempt; a replayed key returns the first job."""
    settings = services.settings
    model = resolve_model(settings, body.model)
    params = resolve_params(body, model, settings.limits)
    check_metadata(body.metadata, settings.limits)
    check_job_options(body, settings)
    job_id, reservation = new_job_id(), None
    if idempotency_key is not None:
        reservation, body_hash = _idempotency_key(principal.owner, idempotency_key), _body_hash(body)
        claim = json.dumps({"job_id": job_id, "body": body_hash})
        if not services.redis.set(reservation, claim, nx=True, ex=IDEMPOTENCY_TTL_S):
            return Submission(
                _replay(services, str(services.redis.get(reservation)), body_hash), replayed=True
            )
    try:
        record = services.store.create(job_id, principal.owner, params, job_options(body))
    except Exception:
        if reservation:
            services.redis.delete(reservation)
        raise
    _enqueue(services, record, model.queue)
    return Submission(record, replayed=False)


def _enqueue(services: Services, record: JobRecord, queue: str) -> None:
    try:
        enqueue_generation(services.celery, queue, record.id, record.attempt, record.priority)
    except Exception:
        # The record exists but no message does: fail it rather than leave it queued forever.
        services.store.transition(
            record.id,
            "failed",
            allowed_from={"queued"},
            fields={
                "error": {"code": "enqueue_failed", "message": "The job could not be queued."},
                "finished_at": now_iso(),
            },
        )
        raise


def parse_prefer_wait(prefer: str | None) -> int | None:
    """``Prefer: wait=N`` (RFC 7240), N clamped to 60; None when absent."""
    for preference in (prefer or "").replace(";", ",").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "wait":
            if not value.strip().isdigit():
                raise ApiError(400, "invalid_parameter", "Prefer: wait=N needs N in whole seconds.", "Prefer")
            return min(int(value.strip()), MAX_WAIT_S)
    return None


def wait_for_terminal(services: Services, job_id: str, seconds: float) -> JobRecord | None:
    """Block until the job ends or ``seconds`` pass, following its event stream; the job if it ended."""
    deadline = time.monotonic() + seconds
    last_id = "0-0"
    while True:
        record = services.store.get(job_id)
        if record is None or record.status in TERMINAL_STATUSES:
            return record
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        # Short blocks: the client's socket timeout is 5 s, and XREAD BLOCK must stay under it.
        replies: Any = services.redis.xread(
            {events_key(job_id): last_id}, block=int(min(remaining, 2) * 1000) or 1
        )
        for _stream, entries in replies or []:
            last_id = entries[-1][0]
