"""The Celery application both sides share: the gateway sends tasks by name, the worker runs them.

Job state lives in our own Redis records; Celery only carries messages (results are ignored).
"""

from __future__ import annotations

import redis
from celery import Celery

from shared.settings import Settings

GENERATE_TASK = "fluxgate.generate"
PRIORITY_STEPS = {"high": 0, "normal": 3, "low": 6}
PRIORITY_SEP = ":"


def create_celery(settings: Settings) -> Celery:
    """A Celery app on the Redis broker, configured for long GPU tasks.

    Acks late with reject-on-worker-lost, prefetch 1: a message leaves the broker only when its job
    has ended, so a worker that dies mid-job gets its message redelivered (the job store's attempt
    check then decides whether it still runs). The visibility timeout must exceed the longest job,
    else Redis redelivers a message whose job is still running.
    """
    app = Celery("fluxgate", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        result_backend=None,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        task_default_queue="fluxgate.default",
        # Priorities on the Redis broker: one list per step, consumed lowest step first (0 = highest).
        broker_transport_options={
            "visibility_timeout": settings.job_time_limit_s * 2,
            "priority_steps": list(PRIORITY_STEPS.values()),
            "sep": PRIORITY_SEP,
            "queue_order_strategy": "priority",
        },
    )
    return app


def enqueue_generation(app: Celery, queue: str, job_id: str, attempt: int, priority: str = "normal") -> None:
    """Send the generation task for one attempt of a job to its model's queue, at the job's priority.

    The message is a ticket for the model's queue (fair share, docs/design.md): the worker that takes
    it runs whichever queued job's turn it is, and ``(job_id, attempt)`` is only a hint.
    """
    app.send_task(GENERATE_TASK, args=[job_id, attempt], queue=queue, priority=PRIORITY_STEPS[priority])


def broker_lists(queue: str) -> list[str]:
    """The Redis lists that hold a queue's waiting messages, one per priority step, as kombu names them."""
    return [f"{queue}{PRIORITY_SEP}{step}" if step else queue for step in PRIORITY_STEPS.values()]


def waiting_messages(client: redis.Redis, queue: str) -> int:
    """Messages waiting on a queue (not counting those a worker has taken and not yet acknowledged)."""
    pipe = client.pipeline(transaction=False)
    for name in broker_lists(queue):
        pipe.llen(name)
    return sum(int(length) for length in pipe.execute())
