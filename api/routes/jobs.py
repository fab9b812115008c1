"""Native jobs API: submit, read and list generation jobs."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentPrincipal, ServicesDep
from api.presenters import job_public
from api.services import Services
from api.submission import parse_prefer_wait, submit_job, submit_job_async, wait_for_terminal
from shared.errors import ApiError, not_found
from shared.ids import is_job_id
from shared.jobstore import JobRecord
from shared.schemas import JobCreate, JobList, JobPublic

router = APIRouter(prefix="/v1", tags=["jobs"])

StatusFilter = Literal["queued", "running", "succeeded", "failed", "canceled"]


MAX_IDEMPOTENCY_KEY_CHARS = 255


@router.post("/jobs", status_code=202, response_model=JobPublic)
async def create_job(
    body: JobCreate,
    principal: CurrentPrincipal,
    services: ServicesDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header()] = None,
    prefer: Annotated[str | None, Header()] = None,
) -> JobPublic:
    """Submit a generation job; 202 and its Location, or 200 with the finished job under ``Prefer: wait``."""
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise ApiError(
            400, "invalid_parameter", "Idempotency-Key must be 1 to 255 characters.", "Idempotency-Key"
        )
    wait_s = parse_prefer_wait(prefer)
    if body.images or idempotency_key is not None:  # fetches, stores, waits: blocking work, on a thread
        submission = await run_in_threadpool(submit_job, services, principal, body, idempotency_key)
    else:
        submission = await submit_job_async(services, principal, body)
    record = submission.record
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    if submission.replayed:
        response.status_code = 200
    if wait_s is not None:
        response.headers["Preference-Applied"] = f"wait={wait_s}"
        finished = await run_in_threadpool(wait_for_terminal, services, record.id, wait_s)
        if finished is not None:
            response.status_code = 200
            return await run_in_threadpool(job_public, finished, services)
    if submission.replayed:
        return await run_in_threadpool(job_public, record, services)
    return job_public(record, services, submission.queue_position)


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


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, principal: CurrentPrincipal, services: ServicesDep) -> JobPublic:
    """Cancel a job: a queued one never runs, a running one stops at its next step (no decode, no upload)."""
    return job_public(cancel_or_conflict(services, owned_job(services, principal, job_id)), services)


def cancel_or_conflict(services: Services, record: JobRecord) -> JobRecord:
    """Cancel ``record``'s job (terminal jobs are left as they are); 409 if it succeeded or failed,
    also when it finished while we were canceling."""
    canceled = services.store.cancel(record.id) or record
    if canceled.status in ("succeeded", "failed"):
        raise ApiError(409, "job_not_cancelable", f"The job already {canceled.status}.", "id")
    return canceled


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
