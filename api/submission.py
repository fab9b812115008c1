"""Submitting a job: options, idempotent replays, enqueueing, and waiting for the result."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from api.body_limits import check_body_without_images
from api.image_checks import DecodedImage
from api.quotas import check_active_jobs, check_submission_rate
from api.references import load_references, store_references
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


def _body_hash(body: JobCreate, uploads: Sequence[DecodedImage] = ()) -> str:
    """The request's identity for Idempotency-Key: the body as sent, plus the bytes of any uploads."""
    canonical = json.dumps(
        body.model_dump(mode="json", exclude_unset=True), sort_keys=True, separators=(",", ":")
    )
    if uploads:
        canonical += "|uploads:" + ",".join(image.source_sha256 for image in uploads)
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


def check_queue_room(services: Services, model: str) -> None:
    """429 with Retry-After when the model's queue is at its limit (checked before any work is stored)."""
    limits = services.settings.limits
    if (
        limits.max_queued_jobs_per_model
        and services.store.queue_depth(model) >= limits.max_queued_jobs_per_model
    ):
        raise ApiError(
            429,
            "queue_full",
            f"The queue of the model {model!r} is full; retry later.",
            "model",
            headers={"Retry-After": str(limits.queue_full_retry_after_s)},
        )


def submit_job(
    services: Services,
    principal: Principal,
    body: JobCreate,
    idempotency_key: str | None,
    uploads: Sequence[DecodedImage] = (),
) -> Submission:
    """Validate, write the record, then enqueue the first attempt; a replayed key returns the first job.

    Reference images come from ``body.images`` (URLs and data URIs, fetched and checked here) or, for
    the OpenAI edits route, as ``uploads`` already checked; either way they are stored under the new
    job's id before its record is written, and the record's params name them.
    """
    settings = services.settings
    check_body_without_images(body, settings.limits)
    model = resolve_model(settings, body.model)
    params = resolve_params(body, model, settings.limits)
    check_metadata(body.metadata, settings.limits)
    check_job_options(body, settings)
    references = list(uploads) or load_references(body.images or [], model, settings)
    job_id = new_job_id()
    body_hash = _body_hash(body, uploads) if idempotency_key is not None else ""
    reservation, replayed = _reserve(services, principal, idempotency_key, job_id, body_hash)
    if replayed is not None:  # a replay returns its job whatever the quotas say now
        return Submission(replayed, replayed=True)
    try:
        check_queue_room(services, model.name)
        check_active_jobs(services, principal)
        check_submission_rate(services, principal)
        if references:
            stored = store_references(services.storage, job_id, references)
            params = params.model_copy(update={"images": stored})
        record = services.store.create(job_id, principal.owner, params, job_options(body))
    except Exception:
        if reservation:
            services.redis.delete(reservation)
        raise
    _enqueue(services, record, model.queue)
    return Submission(record, replayed=False)


def _reserve(
    services: Services, principal: Principal, idempotency_key: str | None, job_id: str, body_hash: str
) -> tuple[str | None, JobRecord | None]:
    """Reserve the Idempotency-Key for ``job_id``: (the reservation, None), or (None, the first job)."""
    if idempotency_key is None:
        return None, None
    reservation = _idempotency_key(principal.owner, idempotency_key)
    claim = json.dumps({"job_id": job_id, "body": body_hash})
    if services.redis.set(reservation, claim, nx=True, ex=IDEMPOTENCY_TTL_S):
        return reservation, None
    return None, _replay(services, str(services.redis.get(reservation)), body_hash)


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
