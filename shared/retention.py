"""Purging jobs: their record, events, index entries, webhook deliveries, and stored objects.

The sweeper purges terminal jobs ``FLUXGATE_RETENTION_S`` after they ended; admins purge one job at
once. Result links are signed for at most ``FLUXGATE_RESULT_URL_TTL_S``, which the settings keep
shorter than the retention, so no link handed out can outlive its object.
"""

from __future__ import annotations

import logging
import time

from shared.jobstore import JobStore
from shared.storage import Storage
from shared.webhook_deliveries import DeliveryStore

log = logging.getLogger("fluxgate.retention")


def purge_job(store: JobStore, storage: Storage, job_id: str) -> bool:
    """Delete everything of a job; objects first, so a failure leaves the record to retry from."""
    record = store.get(job_id)
    if record is None:
        store.purge(job_id)  # drop any index entry left behind
        return False
    keys = [image.key for image in record.images or []] + [image.key for image in record.params.images]
    if keys:
        storage.delete(keys)
    DeliveryStore(store.redis).delete_for_job(job_id)
    store.purge(job_id)
    return True


def sweep_retention(store: JobStore, storage: Storage, retention_s: float, now: float | None = None) -> int:
    """Purge the terminal jobs that ended more than ``retention_s`` ago; returns how many."""
    cutoff = (time.time() if now is None else now) - retention_s
    purged = 0
    for job_id in store.ended_before(cutoff):
        purge_job(store, storage, job_id)
        purged += 1
    if purged:
        log.info("purged %s jobs past the retention of %ss", purged, retention_s)
    return purged
