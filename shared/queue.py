"""The Celery application both sides share: the gateway sends tasks by name, the worker runs them.

Job state lives in our own Redis records; Celery only carries messages (results are ignored).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from uuid import uuid4

import redis
from celery import Celery
from kombu.serialization import dumps as serialize
from kombu.utils.json import dumps as json_dumps

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


@dataclass(frozen=True)
class BrokerMessage:
    """A task message as kombu's Redis transport stores it: the list it waits on, and its JSON."""

    list_name: str
    payload: str


def generation_message(app: Celery, queue: str, job_id: str, attempt: int, priority: str) -> BrokerMessage:
    """The message :func:`enqueue_generation` would send, built without sending it (the gateway pushes it
    inside its submit script: one round trip for the job and its message).

    Celery builds the task (protocol 2: headers, properties, body); the envelope is what kombu's virtual
    transport adds on publish to the anonymous exchange (``basic_publish``: body base64-encoded,
    ``delivery_tag``, ``delivery_info``; Celery sends to a direct queue that way) and the list is the
    one kombu's Redis ``_put`` picks for the priority (``_q_for_pri``). ``tests/shared/test_queue.py``
    holds it equal to what ``send_task`` writes, and a real worker consumes it in the integration suite.
    Celery's ``before_task_publish``/``after_task_publish`` signals do not fire for it.
    """
    task_id = str(uuid4())
    headers, properties, body, _ = app.amqp.create_task_message(
        task_id, GENERATE_TASK, [job_id, attempt], {}, reply_to=app.thread_oid, ignore_result=None
    )
    content_type, content_encoding, encoded = serialize(body, app.conf.task_serializer)
    step = PRIORITY_STEPS[priority]
    message = {
        "body": base64.b64encode(encoded.encode()).decode(),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            **properties,
            "delivery_mode": 2,  # persistent: Celery's default for a queue's exchange
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": step,
            "body_encoding": "base64",
            "delivery_tag": str(uuid4()),
        },
    }
    list_name = f"{queue}{PRIORITY_SEP}{step}" if step else queue
    return BrokerMessage(list_name, json_dumps(message))


def broker_lists(queue: str) -> list[str]:
    """The Redis lists that hold a queue's waiting messages, one per priority step, as kombu names them."""
    return [f"{queue}{PRIORITY_SEP}{step}" if step else queue for step in PRIORITY_STEPS.values()]


def waiting_messages(client: redis.Redis, queue: str) -> int:
    """Messages waiting on a queue (not counting those a worker has taken and not yet acknowledged)."""
    pipe = client.pipeline(transaction=False)
    for name in broker_lists(queue):
        pipe.llen(name)
    return sum(int(length) for length in pipe.execute())
