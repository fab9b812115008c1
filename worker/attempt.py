"""One attempt of a claimed job, from the worker's side: what it holds, and how the attempt ends.

Shared by the single-job path (``worker.runner``) and the batch path (``worker.batching``): every ending
goes through the job store's transition, compared on attempt and worker, and is told to the observer.
"""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shared.ids import now_iso, parse_iso, utcnow
from shared.jobstore import IllegalTransition, JobRecord, JobStore, canceled_fields
from shared.logging import job_context
from shared.schemas import CONTENT_TYPES, JobMetrics, StoredImage
from shared.storage import Storage, StorageError
from worker.encode import EXTENSIONS, encode_image
from worker.endings import ENDING, Endings
from worker.references import ReferenceUnavailable
from worker.types import Engine, GenerationOutput

log = logging.getLogger("fluxgate.runner")


class CurrentJob(Protocol):
    def set_current_job(self, job_id: str | Sequence[str] | None) -> None: ...


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
    max_batch_size: int = 1  # compatible queued jobs run together, up to this many (docs/design.md)
    # where finished jobs are encoded, uploaded and ended while the next runs (None: before run_job returns)
    endings: Endings | None = None


class JobInterrupted(Exception):
    """Raised from the step callback: the job was canceled, or this attempt no longer owns it."""

    def __init__(self, canceled: bool) -> None:
        super().__init__("canceled" if canceled else "no longer owned by this attempt")
        self.canceled = canceled


def finish(runtime: WorkerRuntime, record: JobRecord, status: str, fields: dict[str, Any]) -> str:
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


def end_or_fail(runtime: WorkerRuntime, record: JobRecord, end: Callable[[], str]) -> str:
    """``end`` the attempt (``succeed``); an unexpected error in it fails the job instead of leaving it
    running under a live worker."""
    with job_context(record.id, record.attempt, runtime.worker_id):
        try:
            return end()
        except Exception:
            log.exception("job %s: ending the attempt failed", record.id)
            detail = traceback.format_exc()
            try:
                return fail(runtime, record, "generation_failed", "Finishing the result failed.", detail)
            except Exception:
                log.exception("job %s: failing it failed too; it stays running", record.id)
                return "unfinished"


def hand_off(runtime: WorkerRuntime, record: JobRecord, end: Callable[[], str]) -> str:
    """End the attempt in the background when the runtime has ``endings`` (the outcome is then
    ``ending``), else now."""
    if runtime.endings is None:
        return end_or_fail(runtime, record, end)
    runtime.endings.submit(lambda: end_or_fail(runtime, record, end))
    return ENDING


def fail(
    runtime: WorkerRuntime, record: JobRecord, code: str, message: str, detail: str | None = None
) -> str:
    fields: dict[str, Any] = {"error": {"code": code, "message": message}}
    if detail:
        fields["error_detail"] = detail
    return finish(runtime, record, "failed", fields)


def cancel(runtime: WorkerRuntime, record: JobRecord, reason: str) -> str:
    return finish(runtime, record, "canceled", canceled_fields(reason))


def cancel_reason(runtime: WorkerRuntime, record: JobRecord, default: str) -> str:
    """Why a running job was asked to stop (``canceled`` or ``deadline_exceeded``), as its record says."""
    current = runtime.store.get(record.id)
    return (current and current.cancel_requested) or default


def past_deadline(record: JobRecord) -> bool:
    return record.deadline_at is not None and parse_iso(record.deadline_at) <= utcnow()


def queue_seconds(record: JobRecord) -> float:
    """Submission to claim."""
    return (utcnow() - parse_iso(record.created_at)).total_seconds()


def succeed(
    runtime: WorkerRuntime,
    record: JobRecord,
    output: GenerationOutput,
    queue_s: float,
    inference_s: float,
    batch_size: int = 1,
) -> str:
    """Encode and upload the images, then end the attempt as succeeded with its metrics (or failed with
    ``storage_error`` when the upload fails)."""
    started = time.perf_counter()
    try:
        images = _upload(runtime, record, output)
    except StorageError as error:
        return fail(runtime, record, "storage_error", f"Uploading the result failed: {error}")
    metrics = JobMetrics(
        queue_s=round(queue_s, 4),
        inference_s=round(inference_s, 4),
        upload_s=round(time.perf_counter() - started, 4),
        peak_memory_mb=None if output.peak_memory_mb is None else round(output.peak_memory_mb, 1),
        cached_steps=output.cached_steps,
        batch_size=batch_size,
    )
    total = record.params.num_inference_steps
    fields = {
        "images": [image.model_dump() for image in images],
        "metrics": metrics,
        "progress": {"step": total, "total": total},
    }
    return finish(runtime, record, "succeeded", fields)


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


def describe_pipeline_error(error: Exception) -> tuple[str, str]:
    """The job's error code and user-safe message for an exception the pipeline raised."""
    if isinstance(error, ReferenceUnavailable):
        return "reference_unavailable", f"Reading the job's reference images failed: {error}"
    if type(error).__name__ == "OutOfMemoryError":
        return "out_of_memory", "The GPU ran out of memory for this job; try a smaller size or fewer images."
    return "generation_failed", f"The pipeline failed ({type(error).__name__}); the error was recorded."
