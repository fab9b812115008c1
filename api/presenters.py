"""Job records → the job object of the HTTP contract."""

from __future__ import annotations

from datetime import timedelta

from api.services import Services
from shared.ids import iso, utcnow
from shared.jobstore import JobRecord
from shared.schemas import ImagePublic, JobPublic, ResultPublic


def job_public(record: JobRecord, services: Services, queue_position: int | None = None) -> JobPublic:
    """The public job; result links are signed afresh on every read and expire after the URL TTL.

    ``queue_position``: the queued job's position when the caller knows it (the submit script returns
    it), else it is read.
    """
    if record.status != "queued":
        queue_position = None
    elif queue_position is None:
        queue_position = services.store.queue_position(record.model, record.id)
    result = None
    if record.images is not None and record.status == "succeeded":
        ttl = services.settings.result_url_ttl_s
        images = [
            ImagePublic(
                url=services.storage.url(image.key, ttl),
                content_type=image.content_type,
                width=image.width,
                height=image.height,
                seed=image.seed,
                sha256=image.sha256,
            )
            for image in record.images
        ]
        result = ResultPublic(images=images, expires_at=iso(utcnow() + timedelta(seconds=ttl)))
    return JobPublic(
        id=record.id,
        model=record.model,
        status=record.status,  # type: ignore[arg-type]
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        attempt=record.attempt,
        queue_position=queue_position,
        progress=record.progress,
        params=record.params,
        result=result,
        error=record.error,
        metrics=record.metrics,
        metadata=record.metadata,
    )
