"""The sweeper: a periodic pass over what no single request or worker owns.

- ``cancel_after`` deadlines: a queued job past its deadline is canceled with ``deadline_exceeded``
  even when no worker serves its model; a running one is flagged and its worker stops at the next
  step. (Workers also check the deadline when they claim a job.)
- Retention: terminal jobs are purged ``FLUXGATE_RETENTION_S`` after they ended (shared/retention.py).
- Lost workers: a running job whose worker's heartbeat expired goes back to the queue as
  attempt + 1 with a new message (its old message, if Celery redelivers it, is stale and dropped),
  or fails ``worker_lost`` past the maximum attempts. So no job stays running longer than the
  heartbeat timeout plus one sweep after its worker is gone.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from shared.jobstore import DEADLINE_EXCEEDED, JobStore
from shared.queue import enqueue_generation
from shared.retention import sweep_retention
from shared.settings import Settings
from shared.storage import Storage

log = logging.getLogger("fluxgate.sweeper")


def sweep_deadlines(store: JobStore, now: float | None = None) -> int:
    """Cancel every job whose deadline passed; returns how many were handled."""
    handled = 0
    for job_id in store.due_deadlines(time.time() if now is None else now):
        record = store.cancel(job_id, DEADLINE_EXCEEDED)
        if record is None or record.is_terminal:
            store.forget_deadline(job_id)
        handled += 1
    return handled


def sweep_lost_workers(store: JobStore, celery: Celery, settings: Settings) -> int:
    """Requeue (or fail) running jobs whose worker is gone; returns how many were handled."""
    handled = 0
    for job_id in store.running_job_ids():
        record = store.requeue_lost(job_id, settings.max_attempts)
        if record is None:
            continue
        handled += 1
        model = settings.model(record.model)
        if record.status == "queued" and model is not None:
            log.warning("job %s lost its worker; requeued as attempt %s", job_id, record.attempt)
            enqueue_generation(celery, model.queue, record.id, record.attempt, record.priority)
    return handled


def run_sweeper(
    store: JobStore,
    storage: Storage,
    celery: Celery,
    settings: Settings,
    interval_s: float,
    stop: threading.Event,
) -> None:
    """Sweep every ``interval_s`` until ``stop`` is set; Redis outages are logged and retried."""
    while not stop.wait(interval_s):
        try:
            sweep_deadlines(store)
            sweep_lost_workers(store, celery, settings)
            sweep_retention(store, storage, settings.retention_s)
        except Exception as error:  # a Redis restart must not end the sweeper
            log.warning("sweep failed, retrying in %ss: %s", interval_s, error)
