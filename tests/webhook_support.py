"""Helpers for the webhook tests: jobs with a webhook, driven through the job store."""

from __future__ import annotations

import redis

from shared.ids import new_job_id, now_iso
from shared.jobrecord import JobOptions
from shared.jobstore import JobStore
from shared.schemas import GenerationParams
from tests.support import generation_params

ALL_EVENTS = ("job.queued", "job.started", "job.progress", "job.succeeded", "job.failed", "job.canceled")


def params() -> GenerationParams:
    return generation_params(prompt="a lighthouse", num_inference_steps=4)


def hooked_job(
    client: redis.Redis, url: str, events: tuple[str, ...] = ALL_EVENTS, owner: str = "alice"
) -> str:
    """A queued job whose webhook selects ``events`` (its ``job.queued`` is in the outbox if selected)."""
    job_id = new_job_id()
    JobStore(client).create(job_id, owner, params(), JobOptions(webhook_url=url, webhook_events=events))
    return job_id


def run_to_success(client: redis.Redis, job_id: str, progress_steps: int = 0) -> None:
    """Claim the job, report ``progress_steps`` steps, then succeed it."""
    store = JobStore(client)
    assert store.claim(job_id, 1, "worker-1", max_attempts=3) is not None
    for step in range(1, progress_steps + 1):
        store.record_progress(job_id, 1, "worker-1", step, progress_steps)
    store.transition(
        job_id, "succeeded", allowed_from={"running"}, expect_attempt=1, fields={"finished_at": now_iso()}
    )
