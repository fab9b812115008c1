"""``run_job``: one task message, from claim to terminal state. Plain Python, no Celery here.

A message claims one job, or with ``--max-batch-size`` > 1 a batch of compatible ones
(``worker.batching``); the ending of each attempt lives in ``worker.attempt``.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import cast

from shared.jobstore import CANCELED_BY_USER, DEADLINE_EXCEEDED, JobRecord
from shared.logging import job_context
from worker.attempt import (
    CurrentJob,
    JobInterrupted,
    JobObserver,
    WorkerRuntime,
    cancel,
    cancel_reason,
    describe_pipeline_error,
    fail,
    hand_off,
    past_deadline,
    queue_seconds,
    succeed,
)
from worker.batching import run_batch
from worker.references import EditingEngine, load_reference_images
from worker.types import GenerationOutput

__all__ = ["CurrentJob", "JobInterrupted", "JobObserver", "WorkerRuntime", "run_claimed", "run_job"]

log = logging.getLogger("fluxgate.runner")


def run_job(job_id: str, attempt: int, runtime: WorkerRuntime, ticket: str | None = None) -> str:
    """Spend one task message and run what it claims; returns the outcome: succeeded, failed, canceled or
    dropped, or ``ending`` where the runtime's ``endings`` finish the job in the background (for a batch,
    each job's outcome in claim order, comma separated).

    The message ``(job_id, attempt)`` is a ticket for the worker's model: the job store hands it the job
    whose turn it is under fair share, which need not be the one it names, and with
    ``runtime.max_batch_size`` > 1 the queued jobs that can run in the same pipeline call. ``ticket``
    identifies the message across redeliveries (Celery's task id). Every failure ends the job with a code
    and a user-safe message (the traceback is kept for admins); nothing is swallowed, and the worker stays
    up for the next job.
    """
    records = runtime.store.claim_batch(
        job_id,
        attempt,
        runtime.worker_id,
        runtime.max_attempts,
        model=runtime.model,
        ticket=ticket,
        max_batch=runtime.max_batch_size,
    )
    if not records:
        log.info(
            "message for %s attempt %s dropped: nothing queued, or a duplicate delivery", job_id, attempt
        )
        return "dropped"
    if records[0].id != job_id:
        log.info("message for %s attempt %s runs %s (fair share)", job_id, attempt, records[0].id)
    if runtime.heartbeat:
        runtime.heartbeat.set_current_job([record.id for record in records])
    try:
        if len(records) > 1:
            return ",".join(run_batch(runtime, records))
        return run_claimed(runtime, records[0])
    finally:
        if runtime.heartbeat:
            runtime.heartbeat.set_current_job(None)


def run_claimed(runtime: WorkerRuntime, record: JobRecord) -> str:
    """Run one claimed attempt alone, to its end."""
    with job_context(record.id, record.attempt, runtime.worker_id):
        return _run_alone(runtime, record)


def _generate(runtime: WorkerRuntime, record: JobRecord) -> GenerationOutput:
    def on_step(step: int, total: int) -> None:
        status = runtime.store.record_progress(record.id, record.attempt, runtime.worker_id, step, total)
        if status != "running":  # raising inside the pipeline's step callback skips decode and upload
            raise JobInterrupted(canceled=status == "cancel")

    if not record.params.images:
        return runtime.engine.generate(record.params, on_step)
    references = load_reference_images(runtime.storage, record.params.images)
    return cast(EditingEngine, runtime.engine).generate(record.params, on_step, references=references)


def _run_alone(runtime: WorkerRuntime, record: JobRecord) -> str:
    queue_s = queue_seconds(record)
    if past_deadline(record):
        return cancel(runtime, record, DEADLINE_EXCEEDED)
    started = time.perf_counter()
    try:
        output = _generate(runtime, record)
    except JobInterrupted as stop:
        if not stop.canceled:
            return "dropped"
        return cancel(runtime, record, cancel_reason(runtime, record, CANCELED_BY_USER))
    except Exception as error:
        log.exception("job %s failed in the pipeline", record.id)
        code, message = describe_pipeline_error(error)
        return fail(runtime, record, code, message, traceback.format_exc())
    inference_s = time.perf_counter() - started
    return hand_off(runtime, record, lambda: succeed(runtime, record, output, queue_s, inference_s))
