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
from api.quotas import check_quotas, quota_error, quotas_for
from api.references import load_references, store_references
from api.services import Services
from api.validation import check_job_options, check_metadata, resolve_model, resolve_params
from shared.errors import ApiError
from shared.ids import iso, new_job_id, utcnow
from shared.jobstore import JobOptions, JobRecord, QuotaExceeded, Quotas, Submitted, events_key
from shared.keys import Principal
from shared.queue import generation_message
from shared.schemas import DEFAULT_WEBHOOK_EVENTS, TERMINAL_STATUSES, GenerationParams, JobCreate
from shared.settings import ModelConfig

IDEMPOTENCY_TTL_S = 24 * 3600
MAX_WAIT_S = 60


@dataclass
class Submission:
    record: JobRecord
    replayed: bool
    queue_position: int | None = None  # known when this request created the job


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
    model, params = _checked(services, body)
    references = list(uploads) or load_references(body.images or [], model, services.settings)
    job_id = new_job_id()
    body_hash = _body_hash(body, uploads) if idempotency_key is not None else ""
    reservation, replayed = _reserve(services, principal, idempotency_key, job_id, body_hash)
    if replayed is not None:  # a replay returns its job whatever the quotas say now
        return Submission(replayed, replayed=True)
    now = time.time()
    try:
        quotas = quotas_for(services.settings.limits, principal, now)
        if references:  # checked before the images are stored, so a refused job stores none
            check_quotas(services, principal, model.name)
            quotas = Quotas()
            stored = store_references(services.storage, job_id, references)
            params = params.model_copy(update={"images": stored})
        message = generation_message(services.celery, model.queue, job_id, 1, body.priority)
        options = job_options(body)
        submitted = services.store.submit(job_id, principal.owner, params, options, quotas, message)
    except QuotaExceeded as refused:
        if reservation:
            services.redis.delete(reservation)
        raise quota_error(refused, services.settings.limits, model.name, now) from None
    except Exception:
        if reservation:
            services.redis.delete(reservation)
        raise
    return _created(submitted)


async def submit_job_async(services: Services, principal: Principal, body: JobCreate) -> Submission:
    """:func:`submit_job` for a body without reference images or Idempotency-Key, on the event loop: the
    asyncio Redis client, one round trip (quotas, record, task message, queue position), no thread."""
    model, params = _checked(services, body)
    job_id, now = new_job_id(), time.time()
    quotas = quotas_for(services.settings.limits, principal, now)
    message = generation_message(services.celery, model.queue, job_id, 1, body.priority)
    try:
        submitted = await services.store.submit_async(
            services.redis_async, job_id, principal.owner, params, job_options(body), quotas, message
        )
    except QuotaExceeded as refused:
        raise quota_error(refused, services.settings.limits, model.name, now) from None
    return _created(submitted)


def _checked(services: Services, body: JobCreate) -> tuple[ModelConfig, GenerationParams]:
    """The body's model and resolved parameters; 400 for anything the limits or the model refuse."""
    limits = services.settings.limits
    check_body_without_images(body, limits)
    model = resolve_model(services.settings, body.model)
    params = resolve_params(body, model, limits)
    check_metadata(body.metadata, limits)
    check_job_options(body, services.settings)
    return model, params


def _created(submitted: Submitted) -> Submission:
    return Submission(submitted.record, replayed=False, queue_position=submitted.queue_position)


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
