"""The worker's job store waits out a Redis restart instead of abandoning its job.

On the gateway a Redis outage is a 503 the client retries. A worker in the middle of a job has no
one to retry for it: if its claim or its final write fails, the job would stay queued without a
message, or running under a live worker that no sweeper requeues. So the worker retries those
writes with backoff for up to ``patience_s`` (Redis restarts take seconds), and treats a lost
progress update as skippable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from shared.jobstore import JobRecord, JobStore

log = logging.getLogger("fluxgate.worker")
T = TypeVar("T")
TRANSIENT = (redis.ConnectionError, redis.TimeoutError)


class RetryingJobStore(JobStore):
    """A JobStore whose claim, reads and transitions retry through Redis connection failures."""

    def __init__(self, client: redis.Redis, patience_s: float = 120.0) -> None:
        super().__init__(client)
        self.patience_s = patience_s

    def _retry(self, operation: Callable[[], T], what: str) -> T:
        deadline, delay = time.monotonic() + self.patience_s, 0.2
        while True:
            try:
                return operation()
            except TRANSIENT as error:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("%s: Redis unavailable (%s); retrying in %.1fs", what, error, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def claim_batch(
        self, job_id: str, attempt: int, worker_id: str, max_attempts: int, **kwargs: Any
    ) -> list[JobRecord]:
        # Safe to repeat: a claim whose reply was lost is given back to the same worker (same ticket),
        # the whole batch with it. (``claim`` goes through here too.)
        return self._retry(
            lambda: super(RetryingJobStore, self).claim_batch(
                job_id, attempt, worker_id, max_attempts, **kwargs
            ),
            f"claim {job_id}",
        )

    def get(self, job_id: str) -> JobRecord | None:
        return self._retry(lambda: super(RetryingJobStore, self).get(job_id), f"read {job_id}")

    def transition(self, job_id: str, to: str, **kwargs: Any) -> JobRecord:
        return self._retry(
            lambda: super(RetryingJobStore, self).transition(job_id, to, **kwargs), f"move {job_id} to {to}"
        )

    def record_progress(self, job_id: str, attempt: int, worker: str, step: int, total: int) -> str:
        """A progress update lost to an outage is skipped; the job keeps running."""
        try:
            return super().record_progress(job_id, attempt, worker, step, total)
        except TRANSIENT as error:
            log.warning("progress of %s not recorded (Redis unavailable: %s)", job_id, error)
            return "running"
