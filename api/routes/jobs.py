"""Native jobs API: submit, read and list generation jobs."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response

from api.deps import CurrentPrincipal, ServicesDep
from api.presenters import job_public
from api.validation import check_metadata, resolve_model, resolve_params
from shared.errors import ApiError, not_found
from shared.ids import is_job_id, new_job_id, now_iso
from shared.jobstore import JobRecord
from shared.queue import enqueue_generation
from shared.schemas import JobCreate, JobList, JobPublic

router = APIRouter(prefix="/v1", tags=["jobs"])

StatusFilter = Literal["queued", "running", "succeeded", "failed", "canceled"]


def _refuse_headers_not_yet_supported(idempotency_key: str | None, prefer: str | None) -> None:
    if idempotency_key is not None:
        raise ApiError(
            400, "unsupported_parameter", "Idempotency-Key is not supported yet.", "Idempotency-Key"
        )
    if prefer is not None and "wait" in prefer.lower():
        raise ApiError(400, "unsupported_parameter", "Prefer: wait is not supported yet.", "Prefer")


@router.post("/jobs", status_code=202, response_model=JobPublic)
def create_job(
    body: JobCreate,
    principal: CurrentPrincipal,
    services: ServicesDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header()] = None,
    prefer: Annotated[str | None, Header()] = None,
) -> JobPublic:
    """Submit a generation job; it is queued and runs on a worker of its model."""
    _refuse_headers_not_yet_supported(idempotency_key, prefer)
    settings = services.settings
    model = resolve_model(settings, body.model)
    params = resolve_params(body, model, settings.limits)
    check_metadata(body.metadata, settings.limits)
    record = services.store.create(new_job_id(), principal.owner, params, body.metadata)
    try:
        enqueue_generation(services.celery, model.queue, record.id, record.attempt)
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
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    return job_public(record, services)


def owned_job(services: ServicesDep, principal: CurrentPrincipal, job_id: str) -> JobRecord:
    """The caller's job, else 404 (another owner's job is indistinguishable from a missing one)."""
    record = services.store.get(job_id) if is_job_id(job_id) else None
    if record is None or record.owner != principal.owner:
        raise not_found("Job", "job_not_found", "id")
    return record


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: str, principal: CurrentPrincipal, services: ServicesDep) -> JobPublic:
    """Read a job: status, progress, parameters, result links, error and metrics."""
    return job_public(owned_job(services, principal, job_id), services)


@router.get("/jobs", response_model=JobList)
def list_jobs(
    principal: CurrentPrincipal,
    services: ServicesDep,
    status: StatusFilter | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> JobList:
    """List the caller's jobs, newest first, with cursor pagination."""
    if cursor is not None and not is_job_id(cursor):
        raise ApiError(
            400, "invalid_cursor", "cursor must be a next_cursor returned by this endpoint.", "cursor"
        )
    records, next_cursor = services.store.list_for_owner(principal.owner, status, limit, cursor)
    return JobList(data=[job_public(record, services) for record in records], next_cursor=next_cursor)
