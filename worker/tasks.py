"""Celery task adapters: thin wrappers that call plain functions."""

from __future__ import annotations

from celery import Celery, Task

from shared.queue import GENERATE_TASK
from worker.runner import WorkerRuntime, run_job


def register_generate_task(app: Celery, runtime: WorkerRuntime) -> None:
    """Bind the generation task name to ``run_job`` on this process's runtime (each message is a ticket)."""

    @app.task(name=GENERATE_TASK, bind=True, ignore_result=True)
    def generate(self: Task, job_id: str, attempt: int) -> str:
        # The task id is the same on every delivery of one message: it tells a redelivery from a new ticket.
        return run_job(job_id, int(attempt), runtime, ticket=self.request.id)
