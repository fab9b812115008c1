"""``run_job``: one attempt of one job, from claim to terminal state. Plain Python, no Celery here."""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any, Protocol, cast

from shared.ids import now_iso, parse_iso, utcnow
from shared.jobstore import (
    CANCELED_BY_USER,
    DEADLINE_EXCEEDED,
    IllegalTransition,
    JobRecord,
    JobStore,
    canceled_fields,
)
from shared.logging import job_context
from shared.schemas import CONTENT_TYPES, JobMetrics, StoredImage
from shared.storage import Storage, StorageError
from worker.encode import EXTENSIONS, encode_image
from worker.references import EditingEngine, ReferenceUnavailable, load_reference_images
from worker.types import Engine, GenerationOutput

log = logging.getLogger("fluxgate.runner")


class CurrentJob(Protocol):
    def set_current_job(self, job_id: str | None) -> None: ...


class JobObserver(Protocol):
    """Told of every attempt this worker ends (metrics); ``metrics`` on success, ``error_code`` on failure."""

    def job_finished(
        self, record: JobRecord, outcome: str, metrics: JobMetrics | None, error_code: str | None
    ) -> None: ...


@dataclass
class WorkerRuntime:
    """Everything a worker process holds for the lifetime of its pipeline."""

    store: JobStore
    storage: Storage
    engine: Engine
    worker_id: str
    max_attempts: int
    heartbeat: CurrentJob | None = None
    observer: JobObserver | None = None
    model: str | None = None  # the model it serves: its messages are tickets for this model's queue


def _finish(runtime: WorkerRuntime, record: JobRecord, status: str, fields: dict[str, Any]) -> str:
    """End this attempt as ``status``; "dropped" when the job is no longer this attempt's to end."""
    try:
        runtime.store.transition(
            record.id,
            status,
            allowed_from={"running"},
            expect_attempt=record.attempt,
            expect_worker=runtime.worker_id,
            fields={**fields, "finished_at": now_iso()},
        )
    except IllegalTransition as error:
        log.info("job %s: attempt %s could not end as %s: %s", record.id, record.attempt, status, error)
        status = "dropped"
    _observe(runtime, record, status, fields)
    return status


def _observe(runtime: WorkerRuntime, record: JobRecord, outcome: str, fields: dict[str, Any]) -> None:
    """Tell the observer; its failure is logged, never the job's (metrics must not fail a finished job)."""
    if runtime.observer is None:
        return
    error = fields.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    metrics = fields.get("metrics")
    try:
        runtime.observer.job_finished(
            record, outcome, metrics if isinstance(metrics, JobMetrics) else None, code
        )
    except Exception:
        log.exception("job %s: the job observer failed", record.id)


def _fail(
    runtime: WorkerRuntime, record: JobRecord, code: str, message: str, detail: str | None = None
) -> str:
    fields: dict[str, Any] = {"error": {"code": code, "message": message}}
    if detail:
        fields["error_detail"] = detail
    return _finish(runtime, record, "failed", fields)


def _upload(runtime: WorkerRuntime, record: JobRecord, output: GenerationOutput) -> list[StoredImage]:
    params = record.params
    stored = []
    for index, image in enumerate(output.images):
        data = encode_image(image, params.output_format, params.output_quality)
        key = f"{record.id}/{record.attempt}/{index}.{EXTENSIONS[params.output_format]}"
        content_type = CONTENT_TYPES[params.output_format]
        runtime.storage.put(key, data, content_type)
        stored.append(
            StoredImage(
                key=key,
                content_type=content_type,
                width=image.width,
                height=image.height,
                seed=params.image_seed(index),
                sha256=hashlib.sha256(data).hexdigest(),
                bytes=len(data),
            )
        )
    return stored


class JobInterrupted(Exception):
    """Raised from the step callback: the job was canceled, or this attempt no longer owns it."""

    def __init__(self, canceled: bool) -> None:
        super().__init__("canceled" if canceled else "no longer owned by this attempt")
        self.canceled = canceled


def _generate(runtime: WorkerRuntime, record: JobRecord) -> GenerationOutput:
    def on_step(step: int, total: int) -> None:
        status = runtime.store.record_progress(record.id, record.attempt, runtime.worker_id, step, total)
        if status != "running":  # raising inside the pipeline's step callback skips decode and upload
            raise JobInterrupted(canceled=status == "cancel")

    if not record.params.images:
        return runtime.engine.generate(record.params, on_step)
    references = load_reference_images(runtime.storage, record.params.images)
    return cast(EditingEngine, runtime.engine).generate(record.params, on_step, references=references)


def _cancel(runtime: WorkerRuntime, record: JobRecord, reason: str) -> str:
    return _finish(runtime, record, "canceled", canceled_fields(reason))


def _past_deadline(record: JobRecord) -> bool:
    return record.deadline_at is not None and parse_iso(record.deadline_at) <= utcnow()


def run_job(job_id: str, attempt: int, runtime: WorkerRuntime, ticket: str | None = None) -> str:
    """Spend one task message on a job and run it; returns the outcome: succeeded, failed, canceled or
    dropped.

    The message ``(job_id, attempt)`` is a ticket for the worker's model: the job store hands it the job
    whose turn it is under fair share, which need not be the one it names. ``ticket`` identifies the
    message across redeliveries (Celery's task id). Every failure ends the job with a code and a
    user-safe message (the traceback is kept for admins); nothing is swallowed, and the worker stays up
    for the next job.
    """
    record = runtime.store.claim(
        job_id, attempt, runtime.worker_id, runtime.max_attempts, model=runtime.model, ticket=ticket
    )
    if record is None:
        log.info(
            "message for %s attempt %s dropped: nothing queued, or a duplicate delivery", job_id, attempt
        )
        return "dropped"
    if record.id != job_id:
        log.info("message for %s attempt %s runs %s (fair share)", job_id, attempt, record.id)
    if runtime.heartbeat:
        runtime.heartbeat.set_current_job(record.id)
    try:
        with job_context(record.id, record.attempt, runtime.worker_id):
            return _run_claimed(runtime, record)
    finally:
        if runtime.heartbeat:
            runtime.heartbeat.set_current_job(None)


def _run_claimed(runtime: WorkerRuntime, record: JobRecord) -> str:
    queue_s = (utcnow() - parse_iso(record.created_at)).total_seconds()
    if _past_deadline(record):
        return _cancel(runtime, record, DEADLINE_EXCEEDED)
    started = time.perf_counter()
    try:
        output = _generate(runtime, record)
    except JobInterrupted as stop:
        if not stop.canceled:
            return "dropped"
        current = runtime.store.get(record.id)
        return _cancel(runtime, record, (current and current.cancel_requested) or CANCELED_BY_USER)
    except Exception as error:
        log.exception("job %s failed in the pipeline", record.id)
        code, message = _describe_pipeline_error(error)
        return _fail(runtime, record, code, message, traceback.format_exc())
    inference_s = time.perf_counter() - started
    started = time.perf_counter()
    try:
        images = _upload(runtime, record, output)
    except StorageError as error:
        return _fail(runtime, record, "storage_error", f"Uploading the result failed: {error}")
    metrics = JobMetrics(
        queue_s=round(queue_s, 4),
        inference_s=round(inference_s, 4),
        upload_s=round(time.perf_counter() - started, 4),
        peak_memory_mb=None if output.peak_memory_mb is None else round(output.peak_memory_mb, 1),
        cached_steps=output.cached_steps,
    )
    total = record.params.num_inference_steps
    fields = {
        "images": [image.model_dump() for image in images],
        "metrics": metrics,
        "progress": {"step": total, "total": total},
    }
    return _finish(runtime, record, "succeeded", fields)


def _describe_pipeline_error(error: Exception) -> tuple[str, str]:
    if isinstance(error, ReferenceUnavailable):
        return "reference_unavailable", f"Reading the job's reference images failed: {error}"
    if type(error).__name__ == "OutOfMemoryError":
        return "out_of_memory", "The GPU ran out of memory for this job; try a smaller size or fewer images."
    return "generation_failed", f"The pipeline failed ({type(error).__name__}); the error was recorded."
