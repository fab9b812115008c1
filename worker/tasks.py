"""Celery task adapters: thin wrappers that call plain functions."""

from __future__ import annotations

from celery import Celery

from shared.queue import GENERATE_TASK
from worker.runner import WorkerRuntime, run_job


def register_generate_task(app: Celery, runtime: WorkerRuntime) -> None:
    """Bind the generation task name to ``run_job`` on this process's runtime."""

    @app.task(name=GENERATE_TASK, ignore_result=True)
    def generate(job_id: str, attempt: int) -> str:
        return run_job(job_id, int(attempt), runtime)
