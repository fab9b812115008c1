"""The sweeper: a periodic pass over what no single request or worker owns.

- ``cancel_after`` deadlines: a queued job past its deadline is canceled with ``deadline_exceeded``
  even when no worker serves its model; a running one is flagged and its worker stops at the next
  step. (Workers also check the deadline when they claim a job.)
- Retention: terminal jobs are purged ``FLUXGATE_RETENTION_S`` after they ended (shared/retention.py).
- Lost workers: a running job whose worker's heartbeat expired goes back to the queue as
  attempt + 1 with a new message (its old message, if Celery redelivers it, is a spare ticket),
  or fails ``worker_lost`` past the maximum attempts. So no job stays running longer than the
  heartbeat timeout plus one sweep after its worker is gone.
- Tickets: every queued job has a message on its model's queue (a ticket, docs/design.md). Fluxgate
  never spends one without taking a job while jobs are queued, but a broker can lose one (a worker
  killed between popping a message and claiming, a Redis crash that kept the job's write but not the
  message's). A model with fewer waiting messages than queued jobs in two sweeps running gets the
  missing ones sent again.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from shared.jobstore import DEADLINE_EXCEEDED, JobStore
from shared.queue import enqueue_generation, waiting_messages
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


def sweep_tickets(store: JobStore, celery: Celery, settings: Settings, missing_before: dict[str, int]) -> int:
    """Send a message for each queued job that was without one in this sweep and the one before.

    ``missing_before`` carries each model's shortfall from one sweep to the next. A single sweep can see
    a shortfall that is not one: a gateway between writing a job and sending its message, a worker
    between popping a message and claiming with it (milliseconds each). Returns how many were sent.
    """
    sent = 0
    for model in settings.models:
        missing = store.queue_depth(model.name) - waiting_messages(store.redis, model.queue)
        confirmed = min(missing, missing_before.get(model.name, 0))
        missing_before[model.name] = max(missing, 0)
        head = store.queue_head(model.name) if confirmed > 0 else None
        if head is None:
            continue
        log.warning(
            "%s: %s queued jobs had no message in two sweeps; sending new ones", model.name, confirmed
        )
        for _ in range(confirmed):
            enqueue_generation(celery, model.queue, head.id, head.attempt, head.priority)
        missing_before[model.name] -= confirmed
        sent += confirmed
    return sent


def run_sweeper(
    store: JobStore,
    storage: Storage,
    celery: Celery,
    settings: Settings,
    interval_s: float,
    stop: threading.Event,
) -> None:
    """Sweep every ``interval_s`` until ``stop`` is set; Redis outages are logged and retried."""
    missing_tickets: dict[str, int] = {}
    while not stop.wait(interval_s):
        try:
            sweep_deadlines(store)
            sweep_lost_workers(store, celery, settings)
            sweep_tickets(store, celery, settings, missing_tickets)
            sweep_retention(store, storage, settings.retention_s)
        except Exception as error:  # a Redis restart must not end the sweeper
            log.warning("sweep failed, retrying in %ss: %s", interval_s, error)
