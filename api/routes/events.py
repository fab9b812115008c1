"""A job's events as Server-Sent Events (api/sse.py describes the stream's guarantees)."""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api.deps import ServicesDep
from api.presenters import job_public
from api.routes.jobs import owned_job
from api.sse import Snapshot, StreamId, job_events, read_snapshot
from shared.errors import ApiError, not_found
from shared.jobstore import JobRecord

router = APIRouter(prefix="/v1", tags=["jobs"])


def job_snapshot(record: Annotated[JobRecord, Depends(owned_job)], services: ServicesDep) -> Snapshot:
    """The caller's job (else 404) with its stream position, read before the response starts."""
    snapshot = read_snapshot(services.redis, record.id)
    if snapshot is None:  # purged since owned_job read it
        raise not_found("Job", "job_not_found", "id")
    return replace(snapshot, job=job_public(snapshot.record, services).model_dump(mode="json"))


def resume_point(
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    last_event_id: Annotated[str | None, Query(description="For clients that cannot send headers.")] = None,
) -> StreamId | None:
    """Where a reconnecting client left off. The header wins: EventSource resends the original URL.

    An empty value means no id, as in the SSE spec (a browser whose last id is empty sends no header).
    """
    for value, param in ((last_event_id_header, "Last-Event-ID"), (last_event_id, "last_event_id")):
        if value is None or not value.strip():
            continue
        resume = StreamId.parse(value)
        if resume is None:
            message = f"{param} must be the id of an event of this stream (<ms>-<seq>), got {value[:64]!r}."
            raise ApiError(400, "invalid_last_event_id", message, param)
        return resume
    return None


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse)
async def stream_job_events(
    snapshot: Annotated[Snapshot, Depends(job_snapshot)],
    resume_after: Annotated[StreamId | None, Depends(resume_point)],
    services: ServicesDep,
) -> AsyncIterable[ServerSentEvent]:
    """Stream a job's events: a snapshot, then each event until the terminal one (resumable)."""
    async for event in job_events(services.redis_async, snapshot, resume_after):
        yield event
