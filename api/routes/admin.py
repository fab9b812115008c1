"""Admin API (role ``admin``): keys, queues, workers, job inspection and cancel, webhook replays."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CurrentPrincipal, ServicesDep
from api.presenters import job_public
from api.routes.jobs import cancel_or_conflict
from shared.errors import ApiError, not_found
from shared.ids import is_job_id, job_id_bound
from shared.jobrecord import JobRecord
from shared.jobsearch import JobQuery, search_jobs
from shared.jobstore import events_key
from shared.keys import Principal
from shared.queue import enqueue_generation
from shared.queues import queue_stats
from shared.retention import purge_job
from shared.webhook_deliveries import DeliveryStore, deliveries_for_job
from shared.workers import live_workers


def require_admin(principal: CurrentPrincipal) -> Principal:
    """403 for user keys on admin routes."""
    if not principal.is_admin:
        raise ApiError(403, "forbidden", "This route needs an admin key.")
    return principal


router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: str = Field(min_length=1, max_length=128)
    role: Literal["user", "admin"] = "user"


@router.get("/keys")
def list_keys(services: ServicesDep) -> dict[str, Any]:
    """Every API key's id, owner, role, creation and revocation (never the key itself)."""
    return {"object": "list", "data": services.keys.all_keys()}


@router.post("/keys", status_code=201)
def create_key(body: KeyCreate, services: ServicesDep) -> dict[str, Any]:
    """Create a key; the response is the only time its value is shown."""
    api_key = services.keys.create(body.owner, body.role)
    principal = services.keys.lookup(api_key)
    assert principal is not None
    return {"key": api_key, "key_id": principal.key_id, "owner": body.owner, "role": body.role}


@router.delete("/keys/{key_id}")
def revoke_key(key_id: str, services: ServicesDep) -> dict[str, Any]:
    """Revoke a key: requests with it get 401 from now on."""
    if not services.keys.revoke(key_id):
        raise not_found("Key", "key_not_found", "key_id")
    return {"key_id": key_id, "revoked": True}


@router.get("/queues")
def queues(services: ServicesDep) -> dict[str, Any]:
    """Queued jobs per model and priority, and the oldest one's wait."""
    return {"object": "list", "data": queue_stats(services.redis, services.settings)}


@router.get("/workers")
def workers(services: ServicesDep) -> dict[str, Any]:
    """Registered workers: model, device, GPUs, options, current job, jobs done, last heartbeat, liveness."""
    return {"object": "list", "data": live_workers(services.redis)}


@router.get("/jobs")
def search(
    services: ServicesDep,
    status: Literal["queued", "running", "succeeded", "failed", "canceled"] | None = None,
    model: str | None = None,
    owner: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Search every owner's jobs by status, model, owner and creation time, newest first."""
    if cursor is not None and not is_job_id(cursor):
        raise ApiError(
            400, "invalid_cursor", "cursor must be a next_cursor returned by this endpoint.", "cursor"
        )
    query = JobQuery(
        status=status,
        model=model,
        owner=owner,
        cursor=cursor,
        limit=limit,
        since_id=job_id_bound(since, upper=False) if since else None,
        until_id=job_id_bound(until, upper=True) if until else None,
    )
    records, next_cursor = search_jobs(services.store, query)
    data = [{**job_public(r, services).model_dump(mode="json"), "owner": r.owner} for r in records]
    return {"object": "list", "data": data, "next_cursor": next_cursor}


def any_job(services: ServicesDep, job_id: str) -> JobRecord:
    record = services.store.get(job_id) if is_job_id(job_id) else None
    if record is None:
        raise not_found("Job", "job_not_found", "id")
    return record


@router.get("/jobs/{job_id}")
def inspect_job(job_id: str, services: ServicesDep) -> dict[str, Any]:
    """Everything about a job: the job object, owner, worker, error detail, events and deliveries."""
    record = any_job(services, job_id)
    entries: Any = services.redis.xrange(events_key(record.id))
    events = [
        {"id": entry_id, "type": fields.get("type"), "data": fields.get("data")}
        for entry_id, fields in entries
    ]
    return {
        "job": job_public(record, services).model_dump(mode="json"),
        "owner": record.owner,
        "worker": record.worker,
        "priority": record.priority,
        "cancel_requested": record.cancel_requested,
        "error_detail": record.error_detail,
        "webhook_url": record.webhook_url,
        "events": events,
        "webhook_deliveries": deliveries_for_job(services.redis, record.id),
    }


@router.post("/jobs/{job_id}/cancel")
def cancel_any_job(job_id: str, services: ServicesDep) -> dict[str, Any]:
    """Cancel any owner's job (same rules as the owner's cancel)."""
    canceled = cancel_or_conflict(services, any_job(services, job_id))
    return job_public(canceled, services).model_dump(mode="json")


@router.post("/jobs/{job_id}/retry")
def retry_job(job_id: str, services: ServicesDep) -> dict[str, Any]:
    """Run a finished job again as its next attempt (same parameters and seed)."""
    record = any_job(services, job_id)
    model = services.settings.model(record.model)
    if not record.is_terminal or model is None:
        raise ApiError(
            409,
            "job_not_retryable",
            f"Only a finished job of a configured model can be retried (status {record.status}).",
            "id",
        )
    cleared = {
        name: ""
        for name in (
            "error",
            "error_detail",
            "images",
            "metrics",
            "started_at",
            "finished_at",
            "worker",
            "cancel_requested",
            "deadline_at",
        )
    }
    moved = services.store.transition(
        record.id,
        "queued",
        allowed_from={"succeeded", "failed", "canceled"},
        expect_attempt=record.attempt,
        bump_attempt=True,
        fields={**cleared, "progress": record.progress.model_copy(update={"step": 0})},
    )
    enqueue_generation(services.celery, model.queue, moved.id, moved.attempt, moved.priority)
    return job_public(moved, services).model_dump(mode="json")


@router.delete("/jobs/{job_id}")
def purge(job_id: str, services: ServicesDep) -> dict[str, Any]:
    """Delete a job and everything it left: record, events, deliveries, result and input objects."""
    record = any_job(services, job_id)
    if record.status in ("queued", "running"):
        raise ApiError(409, "job_active", "Cancel the job before purging it.", "id")
    purge_job(services.store, services.storage, record.id)
    return {"id": record.id, "object": "job", "deleted": True}


@router.post("/webhook-deliveries/{delivery_id}/replay")
def replay_delivery(delivery_id: str, services: ServicesDep) -> dict[str, Any]:
    """Deliver a webhook event again, with a fresh round of attempts."""
    if not DeliveryStore(services.redis).replay(delivery_id, time.time()):
        raise not_found("Webhook delivery", "delivery_not_found", "delivery_id")
    return {"id": delivery_id, "status": "pending"}
